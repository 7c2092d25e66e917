r"""A decode step's products (few rows, cold weights) in three layouts and two dot backends,
GFLOP/s, with torch's ``F.linear`` beside them: where the sampler's next decode gain is.

A decode step multiplies B rows (one new token per sequence) by every weight of the model once.
Each shape is timed over ``--layers`` distinct weight matrices in turn (as a step reads each
layer's weights once, from memory, not from cache), one jitted product per call, the calls
dispatched back to back and waited for at the end:

  rows        x[B, in] @ W[in, out]          the model's own layout (the fp32 CPU decode's)
  rows_out_in x[B, in] . W[out, in]^T        the decode copy (``transformer.to_out_in``; bf16's)
  features    W[out, in] @ h[in, B]          feature-major: activations kept [features, B]
                                             through the step (no decode path does this yet)

each compiled with XLA:CPU's default dots (YNNPACK) and with ``xla_options.CPU_DECODE_OPTIONS`` (its
own Eigen dots). ``step_ms`` adds one SmolLM2 step's products at each variant's rates (per layer:
q, k, v, o, gate, up, down; then the lm head once). Rounds alternate the variants, so a noisy
neighbour hits them alike; read the ratios, not the absolute rates.

    .venv/bin/python benchmarks/decode_products.py [--batch 32] [--layers 30] [--rounds 3]
    .venv/bin/python benchmarks/decode_products.py --quick      # small shapes (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from saro_jax import sample, xla_options  # noqa: E402

# (in, out, products per layer) of SmolLM2-135M; the lm head [576 -> 49152] once per step.
SMOLLM2 = ((576, 1536, 2), (1536, 576, 1), (576, 576, 2), (576, 192, 2))
SMOLLM2_HEAD = (576, 49152)
QUICK = ((64, 128, 2), (128, 64, 1))
QUICK_HEAD = (64, 512)
LAYOUTS = ("rows", "rows_out_in", "features")


def _operands(layout: str, x: np.ndarray, w_in_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if layout == "rows":
    return x, w_in_out
  if layout == "rows_out_in":
    return x, np.ascontiguousarray(w_in_out.T)
  return np.ascontiguousarray(w_in_out.T), np.ascontiguousarray(x.T)


PRODUCTS = {"rows": lambda x, w: x @ w,
            "rows_out_in": lambda x, w: jnp.einsum("bi,oi->bo", x, w),
            "features": lambda w, h: w @ h}


def _seconds_per_product(fn, operand_sets: list, calls: int) -> float:
  start = time.perf_counter()
  out = None
  for i in range(calls):
    out = fn(*operand_sets[i % len(operand_sets)])
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def products(batch: int, shapes, head, layers: int, rounds: int, calls: int) -> dict:
  import torch

  rng = np.random.default_rng(0)
  backends = {"default": None, "xla_dots": xla_options.CPU_DECODE_OPTIONS}
  variants = [(layout, backend) for layout in LAYOUTS for backend in backends]
  results = {}
  for n_in, n_out, per_layer in (*shapes, (*head, 0)):
    count = layers if per_layer else 1  # one lm head
    x = rng.standard_normal((batch, n_in), dtype=np.float32)
    ws = [0.02 * rng.standard_normal((n_in, n_out), dtype=np.float32) for _ in range(count)]
    ours = {layout: [tuple(map(jnp.asarray, _operands(layout, x, w))) for w in ws]
            for layout in LAYOUTS}
    compiled = {(layout, backend): jax.jit(PRODUCTS[layout]).lower(*ours[layout][0]).compile(
        backends[backend]) for layout, backend in variants}
    reference = np.asarray(compiled["rows", "default"](*ours["rows"][0]))
    for (layout, backend), fn in compiled.items():  # every variant computes the same product
      got = np.asarray(fn(*ours[layout][0]))
      got = got.T if layout == "features" else got
      # An fp32 dot of length n_in errs by at most gamma_n * sum|x w| ~= n_in * (eps / 2) *
      # sum|x w| (any summation order), so two of them differ by at most n_in * eps * sum|x w|.
      # x ~ N(0, 1), w ~ N(0, 0.02): E|x w| = (2 / pi) * 0.02 ~= 0.0127, and a sum of n_in >= 64
      # such terms stays near n_in times that; 0.08 * n_in (6x the mean) bounds it. Seen: honest
      # variants 1/1500 of the bound or less; a dropped transpose, and one weight scaled by
      # 1 + 1e-3 in one variant, both fail it.
      bound = n_in * np.finfo(np.float32).eps * 0.08 * n_in
      assert np.max(np.abs(got - reference)) <= bound, (layout, backend)
    tx = torch.from_numpy(x)
    tws = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in ws]
    times = {v: [] for v in (*variants, ("torch", "linear"))}
    n = max(calls, count)
    for _ in range(rounds + 1):  # round 0 warms every variant up and is dropped
      for variant in variants:
        times[variant].append(_seconds_per_product(compiled[variant], ours[variant[0]], n))
      with torch.no_grad():
        start = time.perf_counter()
        for i in range(n):
          torch.nn.functional.linear(tx, tws[i % count])
        times["torch", "linear"].append((time.perf_counter() - start) / n)
    flops = 2 * batch * n_in * n_out
    key = f"{n_in}x{n_out}"
    results[key] = {"per_step": per_layer * layers or 1, "flops": flops,
                    **{f"{a}/{b}": statistics.median(t[1:]) for (a, b), t in times.items()}}
  return results


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--calls", type=int, default=120, help="products per timing (at least --layers)")
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  shapes, head = (QUICK, QUICK_HEAD) if args.quick else (SMOLLM2, SMOLLM2_HEAD)
  layers = 2 if args.quick else args.layers
  rounds = 1 if args.quick else args.rounds
  res = products(args.batch, shapes, head, layers, rounds, 4 if args.quick else args.calls)
  names = [k for k in next(iter(res.values())) if "/" in k]
  print(f"batch {args.batch}, {layers} weight matrices per shape, median of {rounds} rounds; "
        "GFLOP/s (in x out)")
  print("| variant | " + " | ".join(res) + " | step's products, ms |")
  print("|---|" + "---|" * (len(res) + 1))
  step_ms = {}
  for name in names:
    step_ms[name] = 1e3 * sum(r["per_step"] * r[name] for r in res.values())
    rates = " | ".join(f"{r['flops'] / r[name] / 1e9:.0f}" for r in res.values())
    print(f"| {name} | {rates} | {step_ms[name]:.1f} |")
  out = {"batch": args.batch, "layers": layers, "seconds": res, "step_ms": step_ms}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
