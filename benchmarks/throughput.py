r"""Throughput of the three hot paths: RW (SFT) step, SRPO (DPO) step with a live reference, sampler.

  python benchmarks/throughput.py --model tiny --batch 8 --length 256 --steps 5
  python benchmarks/throughput.py --model smollm2 --batch 2 --length 128 --steps 3 --new_tokens 16
  python benchmarks/throughput.py --model /path/to/hf_dir --peak_tflops 989
  python benchmarks/throughput.py --arch llama_1b --compute_dtype bfloat16 --attention_impl auto \
      --batch 8 --length 2048 --skip sample --peak_tflops 989       # a 1B-shaped random Llama

``--arch`` (with ``--model tiny``, the random preset): ``llama_1b`` (Llama-3.2-1B's shape: 16
layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192, vocab 128256, tied embeddings) or a JSON
dict of ModelConfig fields, drawn at random. ``--compute_dtype`` / ``--attention_impl`` /
``--remat`` / ``--scan_layers`` override the preset's model settings (params stay fp32: the
master weights). MFU: model FLOPs per step / step time / (``--peak_tflops`` x devices), with
6 N per trained token (forward + backward) and, for SRPO, 2 N more per token for the live
reference forward (N = params; attention's L^2 term is not counted: ``*_tflops_with_attention``
adds the causal q.k and p.v products, 3x the forward's for a trained row, 1x for a reference one).
The devices' peak memory (GiB) is printed where the backend reports it (GPU/TPU). A JSON line of
the figures so far follows each of RW and SRPO.

It only PRINTS figures (a table, then one JSON line); it asserts no speed target. Batches are
synthetic random tokens in the "Data" contract's format (BUILD.md), so no data pipeline is timed.
The model, optimizer and DPO settings come from the training configs (configs/rw.py, srpo.py) of
the matching preset, so the steps timed are the ones `saro_jax.main` would run.

Devices: the largest k <= jax.device_count() that divides --batch (batches shard over data x fsdp,
so every device needs whole rows); the mesh is fsdp=k.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saro_jax import engine, logps, models, sample, sharding, train
from saro_jax.config import StageConfig, training_config
from saro_jax.models import transformer
from saro_jax.stages import reference, rw, srpo

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
# Llama-3.2-1B's shape (random weights): ~1.24B params.
ARCHS = {"llama_1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_layers=16,
                          num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                          rms_norm_eps=1e-5, tie_embeddings=True, vocab_size=128256,
                          max_position_embeddings=8192)}
PROMPT = "Explain, step by step, why the sky looks blue during the day."


def _stage_config(stage: str, model: str, batch: int, length: int, devices: int,
                  args: argparse.Namespace | None = None) -> StageConfig:
  """The training config of ``stage`` for the preset matching ``model``, resized to the benchmark."""
  spec = importlib.util.spec_from_file_location(f"saro_bench_{stage}",
                                                os.path.join(CONFIGS_DIR, f"{stage}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny" if model == "tiny" else "smollm2_135m")
  if model not in ("tiny", "smollm2"):
    if not os.path.isdir(model):
      raise ValueError(f"--model {model!r}: expected 'tiny', 'smollm2' or an existing HF directory")
    config.model.init_from = model
    config.model.tokenizer = ""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, devices, 1
  config.train.batch_size = batch
  config.train.grad_accum = 1
  config.train.logps_chunk = min(config.train.logps_chunk, length)
  config.data.max_length = length
  if stage == "srpo":
    # dpo_batch's layout: every pair as two whole rows (the smollm2_135m preset shares the
    # prefix; the shared and packed layouts have their own benchmark, prefix_dpo.py)
    config.dpo.prefix_sharing, config.dpo.pairs_per_row = False, 1
  if args is not None:
    if args.arch:
      config.model.arch = ARCHS[args.arch] if args.arch in ARCHS else json.loads(args.arch)
    for name in ("compute_dtype", "attention_impl", "remat"):
      if getattr(args, name):
        setattr(config.model, name, getattr(args, name))
    if args.scan_layers:
      config.model.scan_layers = True
  return training_config(config, stage, device_count=devices)


def _timed(fn: Callable[[], object], steps: int, warmup: int) -> float:
  """Seconds per call of ``fn`` (its outputs blocked on), ``warmup`` calls excluded."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t0) / steps


def sft_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  """One unpacked row per example; every token after the first is a target."""
  loss_mask_BxL = np.ones((batch, length), np.int32)
  loss_mask_BxL[:, 0] = 0
  return {"tokens": rng.integers(0, vocab, (batch, length), dtype=np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
          "segment_ids": np.ones((batch, length), np.int32), "loss_mask": loss_mask_BxL}


def dpo_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  """Pairs sharing their first half (the prompt); loss masks cover the completions only."""
  shared = length // 2
  prefix_BxS = rng.integers(0, vocab, (batch, shared), dtype=np.int32)
  out: dict[str, np.ndarray] = {}
  for side in ("chosen", "rejected"):
    completion = rng.integers(0, vocab, (batch, length - shared), dtype=np.int32)
    mask_BxL = np.zeros((batch, length), np.int32)
    mask_BxL[:, shared:] = 1
    out.update({f"{side}_tokens": np.concatenate([prefix_BxS, completion], axis=1),
                f"{side}_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                                     (batch, length)).copy(),
                f"{side}_segment_ids": np.ones((batch, length), np.int32),
                f"{side}_loss_mask": mask_BxL})
  out["shared_len"] = np.full((batch,), shared, np.int32)
  out["example_id"] = np.arange(batch, dtype=np.int64)
  return out


def _compile(step, state, batch) -> tuple[Callable, float]:
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def bench_rw(cfg: StageConfig, graphdef, params, optimizer, lr_fn, mesh, args) -> dict[str, float]:
  vocab = args.vocab_size
  loss_fn = rw.make_loss_fn(graphdef, vocab_size=vocab, chunk_size=cfg.train.logps_chunk)
  step = train.make_train_step(loss_fn, optimizer, grad_accum=1, normalizer_fn=rw.target_token_count,
                               mesh=mesh, learning_rate_fn=lr_fn)
  state = train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)
  batch = train.put_batch(sft_batch(np.random.default_rng(0), args.batch, args.length, vocab), mesh)
  jitted = train.jit_step(step, state, {k: 2 for k in rw.SFT_KEYS}, mesh)
  compiled, compile_s = _compile(jitted, state, batch)
  holder = [state]

  def one():
    holder[0], metrics = compiled(holder[0], batch)
    return holder[0].step, metrics["loss"]

  step_s = _timed(one, args.steps, args.warmup)
  tokens = args.batch * args.length
  tflops = 6 * args.n_params * tokens / step_s / 1e12
  out = {"rw_compile_s": compile_s, "rw_step_s": step_s, "rw_tokens_per_s": tokens / step_s,
         "rw_tokens_per_s_per_device": tokens / step_s / args.devices, "rw_tflops": tflops,
         "rw_tflops_with_attention": tflops + 3 * attention_flops(args, args.batch) / step_s / 1e12}
  if args.peak_tflops:
    out["rw_mfu"] = tflops / (args.peak_tflops * args.devices)
  return out


def attention_flops(args: argparse.Namespace, rows: int) -> float:
  """The forward's attention products (q.k and p.v) of ``rows`` causal rows: 2 products x 2 flops
  x L^2 / 2 visible (query, key) pairs x N x H per layer (a backward is 2 forwards more)."""
  return 2 * rows * args.length ** 2 * args.attention_width * args.num_layers


def bench_srpo(cfg: StageConfig, graphdef, params, optimizer, lr_fn, mesh, args) -> dict[str, float]:
  vocab = args.vocab_size
  loss_fn = srpo.make_loss_fn(graphdef, cfg, vocab_size=vocab)
  step = train.make_train_step(loss_fn, optimizer, grad_accum=1,
                               normalizer_fn=lambda _: jnp.float32(1), mesh=mesh,
                               learning_rate_fn=lr_fn)
  ref_params = jax.tree.map(jnp.copy, params)
  state = train.init_state(jax.tree.map(jnp.copy, params), optimizer, cfg.seed)
  ref_fn = reference.make_reference_fn(graphdef, vocab_size=vocab, chunk_size=cfg.train.logps_chunk,
                                       micro_batches=1, mesh=mesh)
  host = dpo_batch(np.random.default_rng(1), args.batch, args.length, vocab)
  device = train.put_batch({k: host[k] for k in logps.PAIR_KEYS}, mesh)
  t0 = time.perf_counter()
  device["ref_chosen_logps"], device["ref_rejected_logps"] = jax.block_until_ready(
      ref_fn(ref_params, device))
  ref_compile_s = time.perf_counter() - t0  # compile + one reference forward
  jitted = train.jit_step(step, state, srpo.batch_ndims(cfg), mesh)
  compiled, compile_s = _compile(jitted, state, device)
  holder = [state]
  pairs = {k: device[k] for k in logps.PAIR_KEYS}

  def one():  # the live mode: a reference forward, then the policy step, every step
    b = dict(pairs)
    b["ref_chosen_logps"], b["ref_rejected_logps"] = ref_fn(ref_params, pairs)
    holder[0], metrics = compiled(holder[0], b)
    return holder[0].step, metrics["loss"]

  step_s = _timed(one, args.steps, args.warmup)
  tokens = 2 * args.batch * args.length
  tflops = 8 * args.n_params * tokens / step_s / 1e12  # policy fwd+bwd (6N) + reference fwd (2N)
  out = {"srpo_compile_s": compile_s + ref_compile_s, "srpo_step_s": step_s,
         "srpo_pairs_per_s": args.batch / step_s, "srpo_tokens_per_s": tokens / step_s,
         "srpo_tflops": tflops,
         "srpo_tflops_with_attention": tflops + 4 * attention_flops(args, 2 * args.batch) / step_s / 1e12}
  if args.peak_tflops:
    out["srpo_mfu"] = tflops / (args.peak_tflops * args.devices)
  return out


def bench_sampler(model, tokenizer, mesh, args) -> dict[str, float]:
  prompts = [PROMPT] * args.batch
  # An EOS id no token can equal: every row decodes exactly --new_tokens tokens.
  run = lambda: sample.generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens,
                                batch_size=args.batch, mesh=mesh, eos_ids=[-1], chat_template=False)
  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  generations = run()  # returns host data: already synchronised
  gen_s = time.perf_counter() - t0
  new_tokens = sum(len(g.tokens) for g in generations)
  return {"sample_first_call_s": first_s, "sample_s": gen_s, "sample_new_tokens": new_tokens,
          "sample_new_tokens_per_s": new_tokens / gen_s}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="tiny", help="tiny | smollm2 | <HF directory>")
  p.add_argument("--batch", type=int, default=8, help="global rows (SFT) / pairs (DPO) / prompts")
  p.add_argument("--length", type=int, default=256, help="sequence length of the train batches")
  p.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--new_tokens", type=int, default=32, help="greedy tokens generated per prompt")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak; > 0 adds MFU")
  p.add_argument("--skip", default="", help="comma list of rw,srpo,sample to leave out")
  p.add_argument("--arch", default="", help=f"with --model tiny: {list(ARCHS)} or a JSON dict of "
                 "ModelConfig fields (random weights)")
  p.add_argument("--compute_dtype", default="", help="override, e.g. bfloat16 (params stay fp32)")
  p.add_argument("--attention_impl", default="", help="override: xla | cudnn | auto")
  p.add_argument("--remat", default="", help="override: none | block | dots")
  p.add_argument("--scan_layers", action="store_true", help="lax.scan over the layers")
  args = p.parse_args(argv)
  if args.arch and args.model != "tiny":
    p.error("--arch draws a random model: use it with --model tiny")
  for name in ("batch", "length", "steps", "new_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, float | int | str]:
  """Runs the benchmarks, prints a table and one JSON line, returns the figures."""
  args = parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  args.devices = math.gcd(args.batch, jax.device_count())
  devices = jax.devices()[:args.devices]
  mesh = sharding.make_mesh(1, args.devices, 1, devices=devices)
  cfg_rw = _stage_config("rw", args.model, args.batch, args.length, args.devices, args)
  cfg_srpo = _stage_config("srpo", args.model, args.batch, args.length, args.devices, args)
  tokenizer = models.load_tokenizer(cfg_rw.model)
  with sharding.use(mesh):
    model = models.load(cfg_rw.model, tokenizer=tokenizer, mesh=mesh, seed=cfg_rw.seed)
    graphdef, params = models.split(model)
    args.vocab_size = model.config.vocab_size
    args.n_params = sum(x.size for x in jax.tree.leaves(params))
    args.num_layers = model.config.num_layers
    args.attention_width = model.config.num_heads * model.config.head_dim
    figures: dict[str, float | int | str] = {
        "model": (args.arch if args.arch in ARCHS else
                  "arch" + json.dumps(json.loads(args.arch), separators=(",", ":"))
                  if args.arch else args.model), "compute_dtype": str(model.config.compute_dtype),
        "attention_impl": str(model.config.attention_impl),
        "attention_runs": transformer.training_attention_impl(
            model.config.attention_impl, model.config.compute_dtype, model.config.head_dim,
            args.length), "remat": str(model.config.remat),
        "backend": jax.default_backend(), "devices": args.devices,
        "params": args.n_params, "batch": args.batch, "length": args.length, "steps": args.steps}
    if "rw" not in skip:
      optimizer, lr_fn = engine.make_optimizer(cfg_rw)
      figures.update(bench_rw(cfg_rw, graphdef, params, optimizer, lr_fn, mesh, args))
      figures.update(_peak_memory("rw", devices))
      print(json.dumps(figures), flush=True)  # so far: a later stage that fails loses nothing
    if "srpo" not in skip:
      optimizer, lr_fn = engine.make_optimizer(cfg_srpo)
      figures.update(bench_srpo(cfg_srpo, graphdef, params, optimizer, lr_fn, mesh, args))
      figures.update(_peak_memory("srpo", devices))
      print(json.dumps(figures), flush=True)
    if "sample" not in skip:
      figures["new_tokens"] = args.new_tokens
      figures.update(bench_sampler(model, tokenizer, mesh, args))
  print_table(figures)
  print(json.dumps(figures))
  return figures


def _peak_memory(stage: str, devices) -> dict[str, float]:
  """The largest peak of the devices' allocators since the process started (GiB), where the
  backend reports one (GPU/TPU; XLA:CPU does not): after SRPO it is max(RW, SRPO)."""
  stats = [d.memory_stats() for d in devices]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return {f"{stage}_peak_gib": max(peaks) / 2 ** 30} if peaks else {}


def _peak_text(f: dict, stage: str) -> str:
  return f", peak {f[stage + '_peak_gib']:.1f} GiB" if stage + "_peak_gib" in f else ""


def print_table(f: dict) -> None:
  print(f"model={f['model']} compute={f['compute_dtype']} attention={f['attention_impl']} "
        f"(runs {f['attention_runs']}) "
        f"remat={f['remat']} backend={f['backend']} devices={f['devices']} "
        f"params={f['params'] / 1e6:.2f}M batch={f['batch']} length={f['length']} steps={f['steps']}")
  rows = []
  if "rw_step_s" in f:
    mfu = f"  MFU {100 * f['rw_mfu']:.1f}%" if "rw_mfu" in f else ""
    rows.append(("RW step", f["rw_compile_s"], f["rw_step_s"],
                 f"{f['rw_tokens_per_s']:.0f} tok/s ({f['rw_tokens_per_s_per_device']:.0f}/device),"
                 f" {f['rw_tflops']:.4f} TFLOP/s{mfu}{_peak_text(f, 'rw')}"))
  if "srpo_step_s" in f:
    mfu = f"  MFU {100 * f['srpo_mfu']:.1f}%" if "srpo_mfu" in f else ""
    rows.append(("SRPO step+ref", f["srpo_compile_s"], f["srpo_step_s"],
                 f"{f['srpo_pairs_per_s']:.2f} pairs/s ({f['srpo_tokens_per_s']:.0f} tok/s), "
                 f"{f['srpo_tflops']:.4f} TFLOP/s{mfu}{_peak_text(f, 'srpo')}"))
  if "sample_s" in f:
    rows.append((f"sample {f['new_tokens']} new", f["sample_first_call_s"], f["sample_s"],
                 f"{f['sample_new_tokens_per_s']:.1f} new tok/s"))
  print(f"{'what':<18}{'compile/first s':>16}{'steady s':>11}  throughput")
  for name, first, steady, text in rows:
    print(f"{name:<18}{first:>16.2f}{steady:>11.4f}  {text}")


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
