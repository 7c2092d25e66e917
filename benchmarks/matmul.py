r"""The products of a projection's forward and backward, XLA (jitted) against torch, GFLOP/s.

For each [rows, in] x [in, out] shape of a SmolLM2 train step (rows = 4 x 512), three forms:
``fwd`` x @ W, ``dx`` g @ W^T (contracts W's minor dim), ``dw`` x^T @ g (contracts the rows, the
major dim of both operands). Then one MLP block's fwd + bwd (gate, up, silu, down; 6 layers),
written as the model used to (3-D einsums ``"bld,df->blf"``) and as it does now (rows flattened,
``transformer.dense``), with torch's autograd on the same shapes as the yardstick. Each figure
is the median of ``--repeats`` calls after two warm-ups; systems alternate per shape, so a noisy
neighbour hits both alike. Read the ratios, not the absolute rates.

    .venv/bin/python benchmarks/matmul.py [--rows 2048] [--repeats 15] [--dtype bfloat16]

``--quick``: small shapes (a test runs it). ``--dtype bfloat16``: bf16 operands on both sides
(torch's ``bfloat16`` tensors); the XLA products are timed twice, as a plain bf16 dot (a bf16
result) and asked for an fp32 result (``preferred_element_type``, what ``transformer.dense``
does on a CPU; its ``dw`` goes through ``transformer.rows_contracted_dot``, a bf16 GEMM on a
row-major copy of x^T), and the MLP blocks' flattened rows then run ``dense``'s bf16 path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from saro_jax.models import transformer  # noqa: E402

SMOLLM2 = ((576, 1536), (1536, 576), (576, 576), (576, 192))  # (in, out): mlp, down, q/o, k/v


def _median_s(fn: Callable[[], object], repeats: int) -> float:
  fn(), fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def products(rows: int, shapes: Sequence[tuple[int, int]], repeats: int,
             dtype: str = "float32") -> list[dict]:
  import torch

  rng = np.random.default_rng(0)
  f32 = jnp.float32
  dims = {"fwd": (((1,), (0,)), ((), ())), "dx": (((1,), (1,)), ((), ())),
          "dw": (((0,), (0,)), ((), ()))}
  operands = {"fwd": lambda x, w, g: (x, w), "dx": lambda x, w, g: (g, w),
              "dw": lambda x, w, g: (x, g)}
  torch_forms = {"fwd": lambda x, w, g: x @ w, "dx": lambda x, w, g: g @ w.T,
                 "dw": lambda x, w, g: x.T @ g}
  out = []
  for n_in, n_out in shapes:
    arrays = [rng.standard_normal(s, dtype=np.float32)
              for s in ((rows, n_in), (n_in, n_out), (rows, n_out))]
    ours = [jnp.asarray(a, dtype) for a in arrays]
    theirs = [torch.from_numpy(a).to(getattr(torch, dtype)) for a in arrays]
    flops = 2 * rows * n_in * n_out
    for form, torch_fn in torch_forms.items():
      plain = jax.jit(lambda x, w, g, f=form: jax.lax.dot_general(*operands[f](x, w, g), dims[f]))
      xla_s = _median_s(lambda: plain(*ours).block_until_ready(), repeats)
      torch_s = _median_s(lambda: torch_fn(*theirs), repeats)
      row = {"shape": f"{rows}x{n_in}x{n_out}", "form": form, "xla_gflops": flops / xla_s / 1e9,
             "torch_gflops": flops / torch_s / 1e9, "xla_vs_torch": torch_s / xla_s}
      if dtype != "float32":  # the same product asked for an fp32 result
        wide = jax.jit(
            (lambda x, w, g: transformer.rows_contracted_dot(x, g)) if form == "dw" else
            (lambda x, w, g, f=form: jax.lax.dot_general(*operands[f](x, w, g), dims[f],
                                                         preferred_element_type=f32)))
        wide_s = _median_s(lambda: wide(*ours).block_until_ready(), repeats)
        row.update(xla_f32_out_gflops=flops / wide_s / 1e9, xla_f32_out_vs_torch=torch_s / wide_s)
      out.append(row)
  return out


def mlp_blocks(rows: int, hidden: int, width: int, layers: int, repeats: int,
               dtype: str = "float32") -> dict:
  """fwd + bwd of ``layers`` residual MLP blocks: 3-D einsums vs flattened rows vs torch."""
  import torch

  batch = 4
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, rows // batch, hidden), dtype=np.float32)
  ws = [0.02 * rng.standard_normal(s, dtype=np.float32)
        for s in ((hidden, width), (hidden, width), (width, hidden))]
  if dtype != "float32":  # the values both sides get: rounded to the dtype once
    rounded = lambda a: np.array(jnp.asarray(a, dtype).astype(jnp.float32))
    x, ws = rounded(x), [rounded(w) for w in ws]

  def einsum_mlp(x, wg, wu, wd):
    gate, up = jnp.einsum("bld,df->blf", x, wg), jnp.einsum("bld,df->blf", x, wu)
    return jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, wd)

  def dense_mlp(x, wg, wu, wd):
    d = transformer.dense
    return d(jax.nn.silu(d(x, wg)) * d(x, wu), wd)

  def grad_fn(mlp):
    def loss(ws, x):
      for _ in range(layers):
        x = x + mlp(x, *ws)
      return jnp.sum(x.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss))

  jx, jws = jnp.asarray(x, dtype), [jnp.asarray(w, dtype) for w in ws]
  tx = torch.from_numpy(x).to(getattr(torch, dtype))
  tws = [torch.from_numpy(w.copy()).to(getattr(torch, dtype)).requires_grad_() for w in ws]

  def torch_step():
    h = tx
    for _ in range(layers):
      h = h + (torch.nn.functional.silu(h @ tws[0]) * (h @ tws[1])) @ tws[2]
    (h.float() ** 2).sum().backward()
    for w in tws:
      w.grad = None

  einsum_g, dense_g = grad_fn(einsum_mlp), grad_fn(dense_mlp)
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(einsum_g(jws, jx), dense_g(jws, jx)))
  hlo = {name: g.lower(jws, jx).compile().as_text() for name, g in
         (("einsum", einsum_g), ("dense", dense_g))}
  flops = layers * 3 * 3 * 2 * rows * hidden * width  # 3 products x (fwd, dx, dw)
  times = {"einsum": [], "dense": [], "torch": []}
  for _ in range(3):  # alternate the three, so load hits them alike
    times["einsum"].append(_median_s(lambda: jax.block_until_ready(einsum_g(jws, jx)), repeats // 3 or 1))
    times["dense"].append(_median_s(lambda: jax.block_until_ready(dense_g(jws, jx)), repeats // 3 or 1))
    times["torch"].append(_median_s(torch_step, repeats // 3 or 1))
  s = {k: statistics.median(v) for k, v in times.items()}
  return {"layers": layers, "rows": rows, "grads_bit_identical": same,
          "copy_fusions": {k: v.count("copy_bitcast_fusion") for k, v in hlo.items()},
          **{f"{k}_s": v for k, v in s.items()},
          **{f"{k}_gflops": flops / v / 1e9 for k, v in s.items()},
          "dense_vs_einsum": s["einsum"] / s["dense"], "dense_vs_torch": s["torch"] / s["dense"]}


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=2048, help="rows of every product (batch x length)")
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--layers", type=int, default=6, help="MLP blocks in the fwd + bwd check")
  p.add_argument("--quick", action="store_true", help="small shapes: checks the machinery")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = p.parse_args(argv)
  shapes, hidden, width = SMOLLM2, 576, 1536
  if args.quick:
    args.rows, args.repeats, args.layers = 64, 3, 2
    shapes, hidden, width = ((32, 48), (48, 32)), 32, 48
  rows = products(args.rows, shapes, args.repeats, args.dtype)
  wide = args.dtype != "float32"
  print(f"single products, {args.rows} rows, {args.dtype}, GFLOP/s (median of {args.repeats}); "
        f"torch threads {__import__('torch').get_num_threads()}")
  print("| shape (rows x in x out) | form | XLA | " + ("XLA, fp32 result | " if wide else "")
        + "torch | XLA / torch |" + (" XLA fp32 result / torch |" if wide else "")
        + "\n|---|---|---|---|---|" + ("---|---|" if wide else ""))
  for r in rows:
    print(f"| {r['shape']} | {r['form']} | {r['xla_gflops']:.0f} | "
          + (f"{r['xla_f32_out_gflops']:.0f} | " if wide else "")
          + f"{r['torch_gflops']:.0f} | {r['xla_vs_torch']:.2f}x |"
          + (f" {r['xla_f32_out_vs_torch']:.2f}x |" if wide else ""))
  mlp = mlp_blocks(args.rows, hidden, width, args.layers, args.repeats, args.dtype)
  print(f"\n{mlp['layers']} MLP blocks fwd + bwd, {mlp['rows']} rows: 3-D einsums "
        f"{mlp['einsum_s']:.3f} s ({mlp['einsum_gflops']:.0f} GFLOP/s, "
        f"{mlp['copy_fusions']['einsum']} copy fusions), flattened rows {mlp['dense_s']:.3f} s "
        f"({mlp['dense_gflops']:.0f}, {mlp['copy_fusions']['dense']} copy fusions), torch "
        f"{mlp['torch_s']:.3f} s ({mlp['torch_gflops']:.0f}); flattened vs einsum "
        f"{mlp['dense_vs_einsum']:.2f}x, vs torch {mlp['dense_vs_torch']:.2f}x; gradients "
        f"bit-identical: {mlp['grads_bit_identical']}")
  result = {"dtype": args.dtype, "products": rows, "mlp": mlp}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
