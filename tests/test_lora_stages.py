"""LoRA in the stage engine (config.lora.rank > 0), on the tiny random model:

- RW and SRPO train only the adapters: the frozen base is bit for bit what was loaded, the train
  state, optimizer moments and checkpoints are adapter-sized, and the loss on a fixed batch drops;
- SRPO's reference is the base itself (adapters off), not a copy;
- stopping and resuming gives exactly the adapters of an uninterrupted run;
- the exported HF dir holds the merged weights: transformers' logits == the adapted model's
  within the fp32 error model, while the base alone is far outside it;
- a LoRA stage's workdir is a valid ``init_from`` (base rebuilt as recorded + adapters merged).
"""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import error_model as em
import tiny_hf
from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine, models, sharding, train
from saro_jax.config import ConfigError, training_config
from saro_jax.models import lora
from saro_jax.stages import rw, srpo
from test_stages_srpo import pairs_file  # noqa: F401  (fixture: the first 40 bundled pairs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
LORA = dict(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))


def tiny_config(stage: str, data: str | None = None, *, lora_section=LORA, mesh=None,
                **train_overrides):
  spec = importlib.util.spec_from_file_location("cfg_saro", os.path.join(ROOT, "configs", "saro.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
  section = config[stage]
  section.data.max_length = 64
  if data:
    section.data.sources = data
  section.train.update({**dict(steps=STEPS, batch_size=8, log_every=1, progress_bar=False),
                        **train_overrides})
  section.opt.update(learning_rate=1e-2, warmup_steps=0)
  config.checkpoint.update(every=1, keep=2)
  config.lora = ml_collections.ConfigDict(dict(lora_section))
  if mesh:
    config.mesh.update(mesh)
  return training_config(config, stage)


def host(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def fresh_base(cfg):
  """The base weights loaded exactly as the engine loads them (same spec, seed and mesh)."""
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  with sharding.use(mesh):
    model = models.load(cfg.model, tokenizer=models.load_tokenizer(cfg.model), mesh=mesh,
                        seed=cfg.seed)
  return models.split(model)[1]


def assert_adapter_only(s: engine.Setup, cfg, workdir: str):
  """The base is untouched; what is trained, moved by Adam and checkpointed is the adapters."""
  base_now, base_then = host(s.base), host(fresh_base(cfg))
  assert base_now.keys() == base_then.keys()
  for k in base_now:
    np.testing.assert_array_equal(base_now[k], base_then[k], err_msg=k)
  meta = ckpt_lib.read_model_meta(os.path.join(workdir, "checkpoints"))
  assert meta["lora"]["base_checksum"] == ckpt_lib.tree_checksum(s.base)
  n_adapters, n_base = lora.count(s.state.params), lora.count(s.base)
  assert set(s.state.params) == {f"layers.0.{m}" for m in
                                 ("attn.wq_DxNxH", "attn.wv_DxKxH", "attn.wo_NxHxD", "mlp.w_down_FxD")}
  moments = sum(x.size for x in jax.tree.leaves(s.state.opt_state) if getattr(x, "ndim", 0) >= 2)
  assert moments == 2 * n_adapters and n_adapters < n_base // 4
  # B started at zero: a trained adapter has moved it.
  assert all(float(np.abs(np.asarray(a["b"])).max()) > 0 for a in s.state.params.values())


# ---- RW ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rw_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rw_lora"))
  cfg = tiny_config("rw")
  s, result = engine.run_stage(cfg, workdir, rw.STAGE)
  assert result.finished
  return cfg, workdir, s


def test_rw_lora_trains_only_the_adapters_and_the_loss_drops(rw_run):
  cfg, workdir, s = rw_run
  assert_adapter_only(s, cfg, workdir)
  it = engine.batches("sft", cfg, s.tokenizer)
  batch = train.put_batch({k: v for k, v in next(it).items() if k in rw.SFT_KEYS}, s.mesh)
  loss_fn = rw.make_loss_fn(s.graphdef, vocab_size=s.model_config.vocab_size, chunk_size=16)
  loss = jax.jit(lambda p: loss_fn(p, batch, rw.target_token_count(batch))[0])
  before, after = float(loss(s.base)), float(loss(models.split(s.model)[1]))
  # It must drop by more than the two programs' rounding of this loss could (error model: the
  # token-mean NLL's depth at L = 64, relative to the loss itself).
  config = s.model_config
  noise = em.max_bound(before, em.loss_depth(em.model_depth(config, 64), vocab=config.vocab_size,
                                              tokens=int(rw.target_token_count(batch))))
  print(f"RW LoRA: loss on a fixed batch {before:.4f} (base) -> {after:.4f} (adapted);"
        f" rounding bound {noise:.1e}")
  assert after < before - noise


def test_rw_lora_resume_gives_the_uninterrupted_adapters(rw_run, tmp_path):
  _, _, straight = rw_run
  workdir = str(tmp_path)
  _, first = engine.run_stage(tiny_config("rw", stop_at=2), workdir, rw.STAGE)
  assert not first.finished and int(first.state.step) == 2
  s, second = engine.run_stage(tiny_config("rw"), workdir, rw.STAGE)  # the same command again
  assert second.finished and int(s.state.step) == STEPS
  a, b = host(straight.state.params), host(s.state.params)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f"max |adapter diff| resumed vs uninterrupted: {diff:.2e}")
  assert diff == 0.0  # same programs, same devices, same batches: bit for bit
  # Resuming with other adapters (or none) is refused before anything is built.
  other = dict(LORA, rank=2)
  with pytest.raises(ConfigError, match=r"config.lora .* differs from what the checkpoints"):
    engine.run_stage(tiny_config("rw", lora_section=other, steps=STEPS + 1), workdir, rw.STAGE)
  with pytest.raises(ConfigError, match=r"full weights, no LoRA|differs"):
    engine.run_stage(tiny_config("rw", lora_section=dict(rank=0), steps=STEPS + 1), workdir, rw.STAGE)


def test_rw_lora_micro_batches_on_a_tensor_parallel_mesh(rw_run, tmp_path):
  """grad_accum 2 (the base rides in the micro-batch scan's carry) on data 1 x fsdp 4 x tensor 2
  (sharded base, replicated adapters): step 1's loss is the one-pass, fsdp-8 run's loss (the
  same adapters, B = 0, the same batch) up to rounding, and the base stays bit-identical."""
  _, straight_dir, _ = rw_run
  cfg = tiny_config("rw", mesh=dict(data=1, fsdp=4, tensor=2), grad_accum=2, steps=2)
  workdir = str(tmp_path)
  s, result = engine.run_stage(cfg, workdir, rw.STAGE)
  assert result.finished
  assert_adapter_only(s, cfg, workdir)

  def first_loss(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
      return json.loads(f.readline())["loss"]

  # Error model: two programs' token-mean NLL (depth: logits at L = 64, logsumexp over V, the
  # batch's target tokens, + 1 for the random base's last-bit differences between meshes).
  config = s.model_config
  depth = em.loss_depth(em.model_depth(config, 64), vocab=config.vocab_size, tokens=8 * 64) + 1
  a, b = first_loss(straight_dir), first_loss(workdir)
  print(f"step-1 loss: fsdp 8, one pass {a:.7f}; fsdp 4 x tensor 2, 2 micro-batches {b:.7f}")
  assert abs(a - b) <= em.max_bound(abs(a), depth)


def test_merged_export_matches_the_adapted_model_in_pytorch(rw_run, tmp_path):
  import transformers
  cfg, _, s = rw_run
  config = s.model_config
  tokens, positions, segments = tiny_hf.padded_batch(lengths=(24, 13), vocab_size=config.vocab_size)
  adapted = models.merge(s.graphdef, lora.adapted_params(s.base, s.state.params, cfg.lora))
  ours = np.asarray(jax.jit(lambda m, *b: m(*b))(adapted, tokens, positions, segments))

  def torch_logits(model):
    out = models.export(model, s.tokenizer, tmp_path / f"hf_{id(model)}")
    return tiny_hf.torch_logits(transformers.AutoModelForCausalLM.from_pretrained(str(out)),
                                tokens, positions, segments)

  # Error model (tests/error_model.py): the merged weights are written and read in fp32 bit for
  # bit, so only the two programs' summation orders differ: a logit's path has depth
  # model_depth(config, L), relative to the largest |logit|.
  depth, real = em.model_depth(config, tokens.shape[1]), segments > 0
  em.assert_parity(ours, torch_logits(s.model), depth, mask=real, what="merged export vs adapted")
  # The same check fails for an export of the base (adapters dropped): training moved the logits.
  em.assert_caught(ours, torch_logits(models.merge(s.graphdef, s.base)), depth, mask=real,
                   what="base-only export vs adapted")


def test_a_lora_stage_workdir_is_an_init_from(rw_run):
  _, workdir, s = rw_run
  loaded = host(models.split(models.load(workdir))[1])
  merged = host(models.split(s.model)[1])
  assert loaded.keys() == merged.keys()
  for k in merged:  # the same base, the same adapters, the same merge
    np.testing.assert_array_equal(loaded[k], merged[k], err_msg=k)


# ---- SRPO ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srpo_run(tmp_path_factory, pairs_file):
  cfg = tiny_config("srpo", pairs_file)
  assert cfg.dpo.reference == "live" and not cfg.dpo.reference_from
  workdir = str(tmp_path_factory.mktemp("srpo_lora"))
  s, result = engine.run_stage(cfg, workdir, srpo.STAGE)
  assert result.finished
  return cfg, workdir, s


def test_srpo_lora_reference_is_the_base_and_only_adapters_train(srpo_run):
  cfg, workdir, s = srpo_run
  assert srpo._reference_params(s) is s.base  # adapters off; no second copy of the weights
  assert_adapter_only(s, cfg, workdir)
  # DPO loss on a fixed batch, reference = the base: log 2 at the start (policy == reference,
  # zero-initialised adapters give the base bit for bit), lower after training.
  ref_fn = srpo.to_device_fn(s)
  device = ref_fn(next(engine.batches("dpo", cfg, s.tokenizer)))
  loss_fn = srpo.make_loss_fn(s.graphdef, cfg, vocab_size=s.model_config.vocab_size)
  loss = jax.jit(lambda p: loss_fn(p, device, 1))
  (before, m), (after, _) = loss(s.base), loss(models.split(s.model)[1])
  print(f"SRPO LoRA: DPO loss on a fixed batch {float(before):.4f} (base) -> {float(after):.4f}"
        " (adapted)")
  # Error model of "policy == reference" in two programs (the step's loss vs the reference
  # forward): margins = beta ((pc - rc) - (pr - rr)) within beta * 2 gamma(depth) (|pc| + |pr|),
  # depth = the summed log-prob's (logits at L = 64, logsumexp over V, <= 64 tokens); -log
  # sigmoid has slope 1/2 at 0 (as tests/test_stages_srpo.py).
  depth = em.loss_depth(em.model_depth(s.model_config, 64), vocab=s.model_config.vocab_size, tokens=64)
  margin_bound = cfg.dpo.beta * em.max_bound(
      abs(float(m["logps/chosen"])) + abs(float(m["logps/rejected"])), depth)
  assert abs(float(before) - np.log(2)) <= margin_bound / 2 + em.gamma(em.ELEMENTWISE_ULPS)
  assert float(after) < float(before) - margin_bound  # beyond what rounding could do
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == STEPS and all(np.isfinite(r["loss"]) for r in rows)


def test_lora_is_set_on_the_command_line():
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={os.path.join(ROOT, 'configs', 'saro.py')}", "--config.lora.rank=4",
          "--config.lora.targets=('q', 'v')"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  for stage in ("rw", "srpo"):  # the pipeline's top-level lora section serves both stages
    assert training_config(flag_values.config, stage, device_count=8).lora == lora.LoraConfig(
        rank=4, alpha=16.0, targets=("q", "v"))


def test_srpo_lora_resume_gives_the_uninterrupted_adapters(srpo_run, pairs_file, tmp_path):
  """The resumed run's live reference is the rebuilt base: the same adapters bit for bit."""
  _, _, straight = srpo_run
  workdir = str(tmp_path)
  engine.run_stage(tiny_config("srpo", pairs_file, stop_at=2), workdir, srpo.STAGE)
  s, result = engine.run_stage(tiny_config("srpo", pairs_file), workdir, srpo.STAGE)
  assert result.finished and int(s.state.step) == STEPS
  a, b = host(straight.state.params), host(s.state.params)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f"SRPO: max |adapter diff| resumed vs uninterrupted: {diff:.2e}")
  assert diff == 0.0
