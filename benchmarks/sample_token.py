r"""The cost of picking one token per row: ``sample.sample_token`` against the sorted path (the
whole vocabulary sorted for every setting, as the sampler did before its shortcuts), side by
side on the same logits and keys, alternating A, B per round; every round ASSERTS that both
drew the same tokens, except for top-p, whose nucleus masses are normalised in another order
than the sorted path's (``sample._nucleus_cut``): a row may differ there only where its mass
sits within float32 rounding of top_p, and the table counts such rows.

    .venv/bin/python benchmarks/sample_token.py --batch 40 --vocab 49152 --rounds 7

On a 2-core CPU XLA sorts a [40, 49152] array in ~0.6-1.2 s, several times the SmolLM2 decode
step it follows (~0.15 s), so a sampled decode step cost ~6x a greedy one (benchmarks/README.md
"Sampling without the vocabulary sort").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from saro_jax import sample  # noqa: E402

SETTINGS = {"greedy": {}, "temperature 1": dict(temperature=1.0),
            "top_k 50": dict(temperature=1.0, top_k=50),
            "top_p 0.9": dict(temperature=0.5, top_p=0.9)}


def sorted_path_token(logits_BxV, keys_B, step, sampling):
  """The sampler's definition with the whole vocabulary sorted for every setting but greedy."""

  def draw():
    vocab = logits_BxV.shape[-1]
    logits = logits_BxV.astype(jnp.float32) / jnp.maximum(sampling.temperature, 1e-6)
    sorted_BxV = -jnp.sort(-logits, axis=-1)
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k_V = jnp.arange(vocab) < k
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B = jnp.clip(jnp.sum((before_BxV < sampling.top_p) & in_top_k_V, axis=-1), 1, k)
    n_keep_B = jnp.where(sampling.top_p >= 1.0, k, n_keep_B)
    cut_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cut_Bx1, -jnp.inf, logits)
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(step_keys_B, logits).astype(jnp.int32)

  return jax.lax.cond(sampling.temperature == 0.0,
                      lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), draw)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=40)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args(argv)
  logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab)) * 3
  keys = jax.random.split(jax.random.key(1), args.batch)
  ours, theirs = jax.jit(sample.sample_token), jax.jit(sorted_path_token)
  print(f"batch {args.batch}, vocab {args.vocab}, {args.rounds} rounds; ms per call (median)")
  print("| setting | sample_token ms | sorted path ms | speed-up | tokens equal |")
  print("|---|---|---|---|---|")
  results = {}
  for name, kw in SETTINGS.items():
    sampling = sample.Sampling.of(**kw)
    times = {"ours": [], "sorted": []}
    differing = 0
    for r in range(args.rounds + 1):  # round 0 compiles
      for side, f in (("ours", ours), ("sorted", theirs)):
        start = time.perf_counter()
        tokens = np.asarray(f(logits, keys, jnp.int32(r), sampling))
        if r:
          times[side].append(time.perf_counter() - start)
        if side == "ours":
          mine = tokens
      differ = int((mine != tokens).sum())
      assert differ == 0 or kw.get("top_p", 1.0) < 1.0, (
          f"{name}: the shortcut drew other tokens than the sorted path")
      differing += differ
    a, b = (statistics.median(times[s]) * 1e3 for s in ("ours", "sorted"))
    results[name] = dict(ours_ms=a, sorted_ms=b, speedup=b / a, rows_differing=differing)
    equal = "yes" if not differing else f"{differing} of {args.batch * (args.rounds + 1)} rows differ"
    print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {equal} |", flush=True)
  return results


if __name__ == "__main__":
  main()
