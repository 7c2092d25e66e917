r"""One layer's training attention, forward and forward + backward, for each layout side by side:
``causal_attention``'s query blocks against ``tiled_attention``'s tiles, on causal rows and on
rows packed with several segments (DPO trees), SmolLM2's heads (9 query, 3 kv, head dim 64).

  python benchmarks/attention_tiles.py
  python benchmarks/attention_tiles.py --shapes 2x1024:trees,4x512:causal --tiles 64,128
  python benchmarks/attention_tiles.py --shapes 2x64:causal --tiles 32 --repeats 1   # a smoke run
  python benchmarks/attention_tiles.py --dtype bfloat16 --shapes 4x512:causal --tiles 128 \
      --backward rows,transposed     # the tiled backward's two layouts side by side
  python benchmarks/attention_tiles.py --dtype bfloat16 --heads 32,8,64 --shapes 8x2048:causal \
      --tiles 128 --cudnn            # a GPU: cuDNN's fused attention beside ours (Llama-3.2-1B)

A shape is ``BxL:kind``: ``causal`` rows are one segment each; ``trees`` rows are packed with
segments of 200..420 slots (the bundled DPO trees' range under SmolLM2's tokenizer) and the last
15 % padding, drawn from a fixed seed. Every layout runs the same q, k, v and mask. The gradient
is of sum(out * q) (any cotangent costs the same). Each figure is the median of ``--repeats``
calls after one untimed call; layouts alternate within a repeat. ``--dtype bfloat16`` runs q, k, v
in bf16; ``--backward`` lists the tiled gradient's layouts to run (``tiled_attention``'s
``transposed_backward``: ``rows``, ``transposed``, or ``auto``, the default for the dtype and
backend). ``--heads N,K,H`` sets the query heads, kv heads and head dim. ``--cudnn`` (a GPU, bf16)
adds ``transformer.cudnn_attention`` (what ``attention_impl`` cudnn/auto runs there: the mask as
a bias plus cuDNN's causal mask) and ``cudnn:causal`` (cuDNN's causal mask alone, no bias: the
bias's cost; run on ``causal`` shapes only, where it is the same attention).
Every function compiles with the train steps' options
(``xla_options.step_options``: on a CPU, the memory-optimized scheduler and YNNPACK for the dots
only), as the attention runs inside a step. Also printed: the largest relative difference of
each layout's output and gradients from the blocks' (fp32 roundoff, ~1e-7..1e-6; bf16
roundings, ~1e-2). Speed figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saro_jax import sharding, xla_options
from saro_jax.models import tiled_attention, transformer

HEADS = "9,3,64"  # SmolLM2-135M's attention heads: query, kv, head dim


def segments(B: int, L: int, kind: str, rng: np.random.Generator) -> np.ndarray:
  seg_BxL = np.ones((B, L), np.int32)
  if kind == "trees":
    for b in range(B):
      at, s = 0, 1
      while at < L:
        n = int(rng.integers(200, 421))
        seg_BxL[b, at:at + n] = s
        at, s = at + n, s + 1
      seg_BxL[b, int(0.85 * L):] = 0
  elif kind != "causal":
    raise ValueError(f"shape kind {kind!r}: 'causal' or 'trees'")
  return seg_BxL


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="2x1024:trees,2x1024:causal,4x512:causal,8x448:trees,"
                 "8x256:causal,4x200:causal")
  p.add_argument("--tiles", default="32,64,128")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--backward", default="auto", help="comma list of auto | rows | transposed")
  p.add_argument("--heads", default=HEADS, help="query heads, kv heads, head dim")
  p.add_argument("--cudnn", action="store_true", help="add cuDNN's fused attention (a GPU)")
  args = p.parse_args(argv)
  N, K, H = (int(x) for x in args.heads.split(","))
  tiles = [int(t) for t in args.tiles.split(",") if t]
  backwards = [b for b in args.backward.split(",") if b]
  if not backwards or set(backwards) - {"auto", "rows", "transposed"}:
    p.error(f"--backward {args.backward!r}: a comma list of auto, rows, transposed")
  dtype = jnp.dtype(args.dtype)
  options = xla_options.step_options(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  results = {}
  for shape in args.shapes.split(","):
    dims, kind = shape.split(":")
    B, L = (int(x) for x in dims.split("x"))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, L, N, H)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, L, K, H)), dtype) for _ in range(2))
    seg = jnp.asarray(segments(B, L, kind, rng))
    slots = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask = transformer.attention_mask(slots, seg, seg, None)
    layouts = {"blocks": lambda q, k, v, m: transformer.causal_attention(q, k, v, m, H ** -0.5)}
    for t in tiles:
      for backward in backwards:
        name = f"tile{t}" if backward == "auto" else f"tile{t}:{backward}"
        transposed = None if backward == "auto" else backward == "transposed"
        layouts[name] = (lambda t, transposed: lambda q, k, v, m: tiled_attention.tiled_attention(
            q, k, v, m, H ** -0.5, t, transposed))(t, transposed)
    if args.cudnn:
      layouts["cudnn"] = lambda q, k, v, m: transformer.cudnn_attention(q, k, v, m, H ** -0.5)
      if kind == "causal":
        layouts["cudnn:causal"] = lambda q, k, v, m: jax.nn.dot_product_attention(
            q, k, v, scale=H ** -0.5, is_causal=True, implementation="cudnn")
    fwd = {name: jax.jit(f, compiler_options=options) for name, f in layouts.items()}
    objective = lambda q, k, v, m, f: jnp.sum((f(q, k, v, m) * q).astype(jnp.float32))
    both = {name: jax.jit(jax.value_and_grad(lambda q, k, v, m, f=f: objective(q, k, v, m, f),
                                             argnums=(0, 1, 2)), compiler_options=options)
            for name, f in layouts.items()}
    first = {name: (jax.block_until_ready(fwd[name](q, k, v, mask)),
                    jax.block_until_ready(both[name](q, k, v, mask))[1]) for name in layouts}
    times = {name: ([], []) for name in layouts}
    for _ in range(args.repeats):
      for name in layouts:
        t0 = time.perf_counter()
        jax.block_until_ready(fwd[name](q, k, v, mask))
        t1 = time.perf_counter()
        jax.block_until_ready(both[name](q, k, v, mask))
        times[name][0].append(t1 - t0)
        times[name][1].append(time.perf_counter() - t1)
    ref_out, ref_grads = first["blocks"]
    row = {}
    line = f"{shape:<16}"
    for name in layouts:
      out, grads = first[name]
      f32 = lambda x: x.astype(jnp.float32)
      diff = max(float(jnp.max(jnp.abs(f32(a) - f32(b))) / jnp.max(jnp.abs(f32(b))))
                 for a, b in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads)))
      f_ms, b_ms = (1e3 * float(np.median(t)) for t in times[name])
      row[name] = {"fwd_ms": f_ms, "fwd_bwd_ms": b_ms, "max_rel_diff": diff}
      line += f"  {name} {f_ms:.1f}/{b_ms:.1f}"
    base = row["blocks"]["fwd_bwd_ms"]
    best = min(row, key=lambda n: row[n]["fwd_bwd_ms"])
    print(f"{line}  ms fwd/fwd+bwd; best {best} {base / row[best]['fwd_bwd_ms']:.2f}x blocks;"
          f" shipped tile {transformer.attention_tile(L) or 'none (blocks)'};"
          f" max rel diff {max(r['max_rel_diff'] for r in row.values()):.1e}", flush=True)
    results[shape] = row
  return results


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
