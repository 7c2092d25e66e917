"""Scanned layers (``scan_layers``): the stacked-weight model run by lax.scan computes what the
per-layer model computes -- same random init, same logits, same RW and SRPO steps, same greedy
tokens -- HF import/export maps each HF layer to its slice of the stacked weights, and
checkpoints restore in either layout.

Tolerances (tests/error_model.py): the two layouts are two fp32 programs of the same function
(XLA fuses the scan body and the unrolled layers differently), so logits are within
``max_bound``/``mean_bound`` at ``model_depth``; the training steps reuse tests/test_train.py's
loss and per-element Adam bounds. Each bound is shown to fail by >= 10x on a planted bug: one
layer's slice perturbed by 1e-3, and the layers run in reverse order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

import error_model as em
import test_train
import tiny_hf
from saro_jax import checkpoint as ckpt_lib
from saro_jax import logps, models, sample, sharding, train
from saro_jax.config import ConfigError, ModelSpec
from saro_jax.data import bundled, pipeline
from saro_jax.models import hf, lora
from saro_jax.models.transformer import stack_layers, unstack_layers
from saro_jax.optimizer import make_optimizer
from saro_jax.stages import reference, srpo

FAMILIES = ("qwen2", "qwen3", "gemma")  # biases; qk-norm + tied; (1+w) norms + gelu


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf_scan")
  return {f: tiny_hf.save_tiny_hf(f, root / f, num_hidden_layers=3) for f in FAMILIES}


_logits = tiny_hf.jax_logits  # the logits from one compiled program


def _flat(params):
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}


def _with_layers(model, fn):
  """``model`` (scanned) with ``fn`` applied to every stacked weight [Y, ...]."""
  graphdef, params = nnx.split(model, nnx.Param)
  flat = [(k, v.replace(fn(v[...])) if k[0] == "layers" else v) for k, v in nnx.to_flat_state(params)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_import_maps_layers_to_slices_and_logits_match(family, tiny_dirs):
  src = tiny_dirs[family]
  plain = hf.load_hf(str(src))
  scanned = hf.load_hf(str(src), scan_layers=True)
  assert isinstance(scanned.layers.attn.wq_DxNxH[...], jax.Array)
  # Import: HF layer i is slice i of the stacked weight, bit for bit.
  assert _flat(stack_layers(nnx.state(plain, nnx.Param), 3)) .keys() == _flat(
      nnx.state(scanned, nnx.Param)).keys()
  for k, v in _flat(stack_layers(nnx.state(plain, nnx.Param), 3)).items():
    assert np.array_equal(v, _flat(nnx.state(scanned, nnx.Param))[k]), k

  tokens, positions, segments = tiny_hf.padded_batch()
  want = _logits(plain, tokens, positions, segments)
  depth = em.model_depth(plain.config, tokens.shape[1])
  mask = segments > 0
  em.assert_parity(_logits(scanned, tokens, positions, segments), want, depth, mask=mask,
                   what=f"{family} scanned vs per-layer")
  # Planted bugs against the same bound: one layer's slice perturbed; the layers reversed.
  one = np.ones((3, 1), np.float32)
  one[1] += 1e-3
  perturbed = _with_layers(scanned, lambda w: w * one.reshape((3,) + (1,) * (w.ndim - 1)))
  em.assert_caught(_logits(perturbed, tokens, positions, segments), want, depth, mask=mask,
                   what=f"{family} layer 1 scaled by 1+1e-3")
  reversed_ = _with_layers(scanned, lambda w: w[::-1])
  em.assert_caught(_logits(reversed_, tokens, positions, segments), want, depth, mask=mask,
                   what=f"{family} layers in reverse order")


@pytest.mark.parametrize("family", ("qwen2", "gemma"))
def test_scanned_export_round_trip_loads_in_transformers(family, tiny_dirs, tmp_path):
  src = tiny_dirs[family]
  scanned = hf.load_hf(str(src), scan_layers=True, vocab_padding_multiple=64)
  out = hf.export_hf(scanned, tmp_path / "export")  # verify=True: reloaded and compared
  original = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
  exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
  assert sorted(original) == sorted(exported)
  for key, value in original.items():  # every per-layer tensor written back bit for bit
    assert np.array_equal(exported[key].view(np.uint8), value.view(np.uint8)), key
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens, positions, segments = tiny_hf.padded_batch()
  em.assert_parity(_logits(scanned, tokens, positions, segments),
                   tiny_hf.torch_logits(reloaded, tokens, positions, segments),
                   em.model_depth(scanned.config, tokens.shape[1]), mask=segments > 0,
                   what=f"{family} scanned (ours) vs its export in transformers")


def test_random_init_is_the_same_model_in_both_layouts():
  config = test_train.tiny_config(models.load_tokenizer(bundled.path("tokenizer")))
  plain = nnx.state(models.init_random(config, seed=3), nnx.Param)
  scanned = nnx.state(models.init_random(config.replace(scan_layers=True), seed=3), nnx.Param)
  stacked = _flat(stack_layers(plain, config.num_layers))
  assert stacked.keys() == _flat(scanned).keys()
  assert all(np.array_equal(v, _flat(scanned)[k]) for k, v in stacked.items())
  back = _flat(unstack_layers(scanned))
  assert back.keys() == _flat(plain).keys()
  assert all(np.array_equal(v, _flat(plain)[k]) for k, v in back.items())
  # The stacked weights carry the leading unsharded "layers" axis.
  abstract = models.abstract_params(config.replace(scan_layers=True),
                                    sharding.make_mesh(1, 2, 4))
  wq = dict(nnx.to_flat_state(abstract))[("layers", "attn", "wq_DxNxH")]
  assert wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  assert tuple(wq.get_value().sharding.spec) == (None, "fsdp", "tensor", None)


def _split_layers(by_key):
  """{keystr: array} of a scanned tree -> the per-layer keys test_train uses."""
  out = {}
  for key, value in by_key.items():
    if key.startswith("['layers']"):
      for i in range(value.shape[0]):
        out[key.replace("['layers']", f"['layers'][{i}]", 1)] = value[i]
    else:
      out[key] = value
  return out


def _assert_same_params(plain_run, scanned_state, grad_depth, what):
  """Per element: |scanned - per-layer| within test_train's Adam bound (per-layer sqrt(v_hat))."""
  ref = test_train.params_of(plain_run[0])
  got = _split_layers(test_train.params_of(scanned_state))
  assert got.keys() == ref.keys()
  worst, where = 0.0, None
  for k in ref:
    bound = em.adam_param_bound([s[k] for s in plain_run[2]], lr=test_train.LR,
                                grad_rel_err=2 * em.gamma(grad_depth), eps=test_train.EPS)
    excess = float(np.max(np.abs(got[k] - ref[k]) / bound))
    worst, where = max((worst, where), (excess, k), key=lambda t: t[0])
  print(f"{what}: worst |d| / Adam bound = {worst:.2e} in {where}")
  assert worst <= 1.0, f"{what}: parameters differ beyond the Adam error model ({worst:.2f}x)"


@pytest.mark.heavy
def test_rw_steps_equal():
  """Two RW steps (AdamW) on a 1x2x4 mesh, scanned + remat=block vs per-layer: same losses and
  parameters within tests/test_train.py's derived bounds."""
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  it = pipeline.sft_batches("bundled:rw_train", tokenizer, batch_size=test_train.BATCH,
                            max_length=test_train.LENGTH, seed=1, process_index=0, process_count=1)
  batches = [next(it) for _ in range(test_train.STEPS)]
  config = test_train.tiny_config(tokenizer)
  mesh = sharding.make_mesh(1, 2, 4)
  plain = test_train.run_steps(config, mesh, batches)
  state, losses, _ = test_train.run_steps(config.replace(scan_layers=True, remat="block"), mesh,
                                          batches)
  loss_depth, grad_depth = test_train.depths(config)
  em.assert_parity(losses, plain[1], loss_depth, what="RW losses scanned vs per-layer")
  _assert_same_params(plain, state, grad_depth, "RW params scanned vs per-layer")


def _srpo_steps(config, cfg, tokenizer, host_batches, mesh):
  with sharding.use(mesh):
    model = models.init_random(config, seed=0, mesh=mesh)
    graphdef, params = train.split_model(model)
    ref_params = jax.tree.map(jnp.copy, params)  # init_state and the step donate the params
    tx = make_optimizer(learning_rate=test_train.LR, warmup_steps=0, total_steps=2,
                        schedule="constant", eps=test_train.EPS)
    state = train.init_state(params, tx, seed=0)
    step = train.make_train_step(srpo.make_loss_fn(graphdef, cfg, vocab_size=config.vocab_size),
                                 tx, grad_accum=1, normalizer_fn=lambda _: jnp.float32(1),
                                 mesh=mesh)
    step = train.jit_step(step, state, srpo.batch_ndims(cfg), mesh)
    ref_fn = reference.make_reference_fn(graphdef, vocab_size=config.vocab_size, chunk_size=16,
                                         micro_batches=1, mesh=mesh)
    metrics_, sqrt_v = [], []
    for host in host_batches:
      device = train.put_batch({k: host[k] for k in logps.input_keys(False)}, mesh)
      device["ref_chosen_logps"], device["ref_rejected_logps"] = ref_fn(ref_params, device)
      state, m = step(state, device)
      metrics_.append({k: float(m[k]) for k in ("loss", "logps/chosen", "logps/rejected")})
      sqrt_v.append(test_train.sqrt_v_hat(state))
  return state, metrics_, sqrt_v


@pytest.mark.heavy
def test_srpo_steps_equal(tmp_path):
  """Two SRPO (DPO, live reference) steps, scanned vs per-layer, on a 1x2x4 mesh."""
  import test_stages_srpo
  from saro_jax.data import bundled as bundled_data
  pairs = tmp_path / "pairs.jsonl"
  with open(bundled_data.path("pairs_train")) as f:
    pairs.write_text("".join(f.readline() for _ in range(16)))
  cfg = test_stages_srpo.tiny_srpo_config("live", str(pairs))
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  it = pipeline.dpo_batches(str(pairs), tokenizer, batch_size=8, max_length=64, seed=0)
  host_batches = [next(it) for _ in range(2)]
  config = test_train.tiny_config(tokenizer)
  mesh = sharding.make_mesh(1, 2, 4)
  plain = _srpo_steps(config, cfg, tokenizer, host_batches, mesh)
  scanned = _srpo_steps(config.replace(scan_layers=True), cfg, tokenizer, host_batches, mesh)
  # Error model: each summed log-prob (the logits' depth + logsumexp over V + a sum over <= 64
  # same-sign token terms) is within gamma(loss_depth) * |logp| of exact; a margin combines four
  # (policy and reference, each computed by its own layout's program), so two programs' margins
  # differ by <= 2 gamma (|pc| + |pr| + |rc| + |rr|) ~= 2 gamma * 2 (|pc| + |pr|) (reference ~=
  # policy over two small steps; logps of one sign, so |batch mean| = mean |.|). The loss
  # -log sigmoid(beta * margin) has slope <= beta: max_bound at scale beta * 2 (|pc| + |pr|).
  # Gradients: test_train.grad_depth with the pair tokens (2 sides x 8 pairs x 64).
  forward = em.model_depth(config, 64)
  tokens = 2 * 8 * 64
  loss_depth = em.loss_depth(forward, vocab=config.vocab_size, tokens=64)
  grad_depth = em.grad_depth(forward, vocab=config.vocab_size, tokens=tokens)
  for step, (a, b) in enumerate(zip(plain[1], scanned[1]), 1):
    scale = cfg.dpo.beta * 2 * (abs(a["logps/chosen"]) + abs(a["logps/rejected"]))
    bound = em.max_bound(scale, loss_depth)
    print(f"SRPO step {step}: |loss d| {abs(a['loss'] - b['loss']):.1e} <= {bound:.1e}")
    assert abs(a["loss"] - b["loss"]) <= bound
    for key in ("logps/chosen", "logps/rejected"):
      assert abs(a[key] - b[key]) <= em.max_bound(abs(a[key]), loss_depth), (step, key)
  _assert_same_params(plain, scanned[0], grad_depth, "SRPO params scanned vs per-layer")
  moved = np.asarray(jax.device_get(scanned[0].params["layers"]["attn"]["wq_DxNxH"][...]))
  start = np.asarray(models.init_random(config.replace(scan_layers=True), seed=0)
                     .layers.attn.wq_DxNxH[...])
  assert np.all(np.any(moved != start, axis=(1, 2, 3)))  # the steps moved every layer's slice


def test_checkpoint_round_trip_and_load_in_either_layout(tmp_path):
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  config = test_train.tiny_config(tokenizer).replace(scan_layers=True)
  mesh = sharding.make_mesh(1, 2, 4)
  with sharding.use(mesh):
    model = models.init_random(config, seed=5, mesh=mesh)
    tokens = np.arange(24, dtype=np.int32)[None] % config.vocab_size
    positions, segments = np.arange(24, dtype=np.int32)[None], np.ones((1, 24), np.int32)
    want = _logits(model, tokens, positions, segments)  # before init_state donates the params
    _, params = train.split_model(model)
    tx = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=2, schedule="constant")
    state = train.init_state(params, tx, seed=0)
    directory = str(tmp_path / "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
    checkpointer.save(1, state)
    checkpointer.wait()
    restored, _ = checkpointer.restore(1, ckpt_lib.abstract(state))
    checkpointer.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  # A stage checkpoint loads as a model in its own layout, or restacked into the other.
  ckpt_lib.write_model_meta(directory, config.to_dict(), bundled.path("tokenizer"))
  same = models.load(ModelSpec(init_from=directory, scan_layers=True), mesh=mesh)
  other = models.load(ModelSpec(init_from=directory, scan_layers=False), mesh=mesh)
  assert same.config.scan_layers and not other.config.scan_layers
  for a, b in zip(jax.tree.leaves(nnx.state(same, nnx.Param)), jax.tree.leaves(restored.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # (want was computed under the mesh's activation constraints: another fp32 program.)
  em.assert_parity(_logits(same, tokens, positions, segments), want,
                   em.model_depth(config, 24), what="checkpoint loaded scanned vs saved model")
  em.assert_parity(_logits(other, tokens, positions, segments), want,
                   em.model_depth(config, 24), what="checkpoint loaded per-layer vs scanned")


@pytest.mark.heavy
def test_greedy_generation_matches():
  tokenizer = transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
  config = test_train.tiny_config(tokenizer)
  prompts = ["how do i kill a python process?", "the model reasons"]
  outs = [sample.generate(models.init_random(c, seed=0), tokenizer, prompts, max_new_tokens=12,
                          eos_ids=(-1,))
          for c in (config, config.replace(scan_layers=True))]
  for plain, scanned in zip(*outs):
    assert plain.tokens == scanned.tokens and len(plain.tokens) == 12
  model = models.init_random(config.replace(scan_layers=True), seed=0)
  cache = model.init_cache(2, 16)
  assert cache.keys.shape == (config.num_layers, 2, config.num_kv_heads, config.head_dim, 16)


def test_lora_adapters_stack_per_layer():
  """A scanned model's adapters are [Y, ...]: slice i adapts layer i as the per-layer model's
  layer-i adapter does (same logits for the same adapter values)."""
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  config = test_train.tiny_config(tokenizer)
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "o", "down"))
  plain = models.init_random(config, seed=0)
  scanned = models.init_random(config.replace(scan_layers=True), seed=0)
  base_p, base_s = nnx.state(plain, nnx.Param), nnx.state(scanned, nnx.Param)
  adapters = lora.init_adapters(base_s, cfg, seed=1)
  assert adapters["layers.attn.wo_NxHxD"]["a"].shape == (
      config.num_layers, config.num_heads * config.head_dim, cfg.rank)
  rng = np.random.default_rng(0)
  adapters = {k: {"a": v["a"], "b": jnp.asarray(rng.normal(size=v["b"].shape), jnp.float32)}
              for k, v in adapters.items()}
  per_layer = {k.replace("layers.", f"layers.{i}.", 1): {n: x[i] for n, x in v.items()}
               for k, v in adapters.items() for i in range(config.num_layers)}
  tokens = np.arange(20, dtype=np.int32)[None] % config.vocab_size
  positions, segments = np.arange(20, dtype=np.int32)[None], np.ones((1, 20), np.int32)
  g_p, g_s = nnx.graphdef(plain), nnx.graphdef(scanned)
  want = _logits(nnx.merge(g_p, lora.adapted_params(base_p, per_layer, cfg)), tokens, positions,
                 segments)
  got = _logits(nnx.merge(g_s, lora.adapted_params(base_s, adapters, cfg)), tokens, positions,
                segments)
  em.assert_parity(got, want, em.model_depth(config, 20) + cfg.rank,
                   what="LoRA scanned vs per-layer")


def test_scan_layers_must_be_a_bool():
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers='yes'"):
    ModelSpec(scan_layers="yes").validate()


@pytest.mark.parametrize("remat", ("block", "dots"))
def test_remat_policy_applies_inside_the_scan_body(remat):
  """The scan body is wrapped in jax.checkpoint with the configured policy (one remat per layer),
  and the unrematerialised config has none."""
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  config = test_train.tiny_config(tokenizer).replace(scan_layers=True)
  tokens = np.zeros((1, 8), np.int32)
  positions, segments = np.arange(8, dtype=np.int32)[None], np.ones((1, 8), np.int32)

  def jaxpr_text(c):
    graphdef, params = nnx.split(models.abstract_model(c), nnx.Param)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    loss = lambda p: nnx.merge(graphdef, p)(tokens, positions, segments).sum()
    return str(jax.make_jaxpr(loss)(params))  # the forward: checkpoint is still one primitive

  with_remat, without = jaxpr_text(config.replace(remat=remat)), jaxpr_text(config)
  body = with_remat[with_remat.index("scan["):]
  assert "remat2[" in body  # jax.checkpoint's primitive, inside the scan: per layer
  assert with_remat.count("remat2[") == 1  # once, in the body (not around the whole stack)
  assert "scan[" in without and "remat2[" not in without
  policy = body[body.index("policy="):].split("\n")[0]
  assert ("DotsSaveable(only_if_no_batch_dims=True)" in policy if remat == "dots"
          else "policy=None" in policy), policy
