r"""Compile seconds and step seconds of the RW step for several layouts of the training attention
(``transformer.training_attention``: ``causal_attention``'s query blocks or ``tiled_attention``'s
tiles), side by side in one process.

  python benchmarks/attention_blocks.py --model smollm2 --batch 2 --length 512 --blocks t128,t64,4
  python benchmarks/attention_blocks.py --model tiny --batch 2 --length 64 --blocks 2,1 --rounds 1
  python benchmarks/attention_blocks.py --model tiny --arch '{"family": "llama", ...}' \
      --compile_rounds 3 --rounds 1       # a SmolLM2-shaped random model, fewer layers

Variants (``--blocks``): ``default`` is the shipped rule (``transformer.attention_tile``, then
``transformer.query_block`` below 256 slots); ``n`` forces ``causal_attention`` with ceil(L / n)
query rows per block (n blocks); ``tN`` forces ``tiled_attention`` with tiles of N slots. Each
variant sets its rule while the step is traced, then compiles its own
RW step (``throughput.bench_rw``'s step: the preset's model, optimizer and loss). Compilation
(trace + lower + XLA compile) is timed per variant, wall and process CPU s (``--compile_rounds``
times, interleaved: medians); then ``--rounds`` rounds run one step of every
variant in turn (A, B, C, A, B, C, ...), all on the same state, so every variant sees the same
machine load. Prints compile s, the median step's wall s and process CPU s (all threads; on a
shared machine less disturbed by the other jobs than wall time) with their ratios to the first
variant, and the load average before and after. Speed figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saro_jax import engine, models, sharding, train
from saro_jax.models import transformer
from saro_jax.stages import rw

_spec = importlib.util.spec_from_file_location(
    "saro_benchmarks_throughput", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "throughput.py"))
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)


def _rules(variant: str):
  """-> (attention_tile rule, query_block rule) for ``default``, ``n`` (blocks) or ``tN`` (tiles)."""
  if variant == "default":
    return transformer.attention_tile, transformer.query_block
  if variant.startswith("t"):
    tile = int(variant[1:])
    if tile < 1:
      raise ValueError(f"--blocks entry {variant!r}: a tile must be >= 1 slot")
    return (lambda length, trees=False: tile), transformer.query_block
  n = int(variant)
  if n < 1:
    raise ValueError(f"--blocks entry {variant!r} must be 'default', an integer >= 1 or tN")
  return (lambda length, trees=False: 0), (lambda length: -(-length // n))


def _layout(rules, length: int) -> str:
  tile_rule, block_rule = rules
  tile = tile_rule(length)
  return f"tile {tile}" if tile else f"{-(-length // block_rule(length))} blocks"


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="tiny", help="tiny | smollm2 | <HF directory>")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--blocks", default="default,1", help="comma list: 'default' or block counts")
  p.add_argument("--rounds", type=int, default=3, help="timed steps per variant, interleaved")
  p.add_argument("--compile_rounds", type=int, default=1,
                 help="compilations per variant, interleaved (medians are reported)")
  p.add_argument("--arch", default="", help="with --model tiny: a JSON dict of ModelConfig fields "
                 "(random weights), as throughput.py's --arch")
  args = p.parse_args(argv)
  for name in ("compute_dtype", "attention_impl", "remat"):
    setattr(args, name, "")
  args.scan_layers = False
  variants = [v for v in args.blocks.split(",") if v]
  rules = {v: _rules(v) for v in variants}

  args.devices = math.gcd(args.batch, jax.device_count())
  mesh = sharding.make_mesh(1, args.devices, 1, devices=jax.devices()[:args.devices])
  cfg = throughput._stage_config("rw", args.model, args.batch, args.length, args.devices, args)
  tokenizer = models.load_tokenizer(cfg.model)
  load_before = os.getloadavg()
  shipped = transformer.attention_tile, transformer.query_block
  with sharding.use(mesh):
    model = models.load(cfg.model, tokenizer=tokenizer, mesh=mesh, seed=cfg.seed)
    graphdef, params = models.split(model)
    vocab = model.config.vocab_size
    optimizer, lr_fn = engine.make_optimizer(cfg)
    loss_fn = rw.make_loss_fn(graphdef, vocab_size=vocab, chunk_size=cfg.train.logps_chunk)
    batch = train.put_batch(throughput.sft_batch(np.random.default_rng(0), args.batch,
                                                 args.length, vocab), mesh)
    holder = [train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)]
    compiled, compile_s, compile_cpu, layout = {}, {}, {}, {}
    for _ in range(args.compile_rounds):
      for v in variants:
        # A fresh step function per compilation: nothing traced before is reused.
        step = train.make_train_step(loss_fn, optimizer, grad_accum=1,
                                     normalizer_fn=rw.target_token_count, mesh=mesh,
                                     learning_rate_fn=lr_fn)
        jitted = train.jit_step(step, holder[0], {k: 2 for k in rw.SFT_KEYS}, mesh)
        transformer.attention_tile, transformer.query_block = rules[v]
        try:
          t0, c0 = time.perf_counter(), time.process_time()
          compiled[v] = jitted.lower(holder[0], batch).compile()
          compile_s.setdefault(v, []).append(time.perf_counter() - t0)
          compile_cpu.setdefault(v, []).append(time.process_time() - c0)
        finally:
          transformer.attention_tile, transformer.query_block = shipped
        layout[v] = _layout(rules[v], args.length)
        print(f"compiled {v} ({layout[v]}): {compile_s[v][-1]:.1f} s, "
              f"CPU {compile_cpu[v][-1]:.1f} s", flush=True)
    compile_s = {v: float(np.median(t)) for v, t in compile_s.items()}
    compile_cpu = {v: float(np.median(t)) for v, t in compile_cpu.items()}
    steps = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for v in variants:  # one untimed step each (first-run allocations)
      holder[0], _ = compiled[v](holder[0], batch)
      jax.block_until_ready(holder[0].step)
    for _ in range(args.rounds):
      for v in variants:
        t0, c0 = time.perf_counter(), time.process_time()
        holder[0], metrics = compiled[v](holder[0], batch)
        jax.block_until_ready(metrics["loss"])
        steps[v].append(time.perf_counter() - t0)
        cpu[v].append(time.process_time() - c0)
  load_after = os.getloadavg()
  first = variants[0]
  base = float(np.median(steps[first]))
  base_cpu = float(np.median(cpu[first]))
  print(f"model={args.model} batch={args.batch} length={args.length} rounds={args.rounds} "
        f"load before {load_before[0]:.1f} after {load_after[0]:.1f} (1-min averages)")
  print(f"{'variant':<10}{'layout':>10}{'compile s':>11}{'CPU s':>7}{'step s':>9}{'vs ' + first:>11}"
        f"{'step CPU s':>12}{'vs ' + first:>11}   wall s / CPU s of each step")
  figures = {}
  for v in variants:
    med, med_cpu = float(np.median(steps[v])), float(np.median(cpu[v]))
    figures[v] = {"layout": layout[v], "compile_s": compile_s[v],
                  "compile_cpu_s": compile_cpu[v], "step_s": med,
                  "step_cpu_s": med_cpu, "steps": steps[v], "cpu": cpu[v],
                  "step_ratio": med / base, "step_cpu_ratio": med_cpu / base_cpu}
    each = " ".join(f"{w:.1f}/{c:.1f}" for w, c in zip(steps[v], cpu[v]))
    print(f"{v:<10}{layout[v]:>10}{compile_s[v]:>11.1f}{compile_cpu[v]:>7.1f}{med:>9.2f}{med / base:>11.3f}"
          f"{med_cpu:>12.2f}{med_cpu / base_cpu:>11.3f}   {each}")
  return {"variants": figures, "load_before": load_before, "load_after": load_after}


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
