"""The sampler's fast paths: cache-layout attention == the generic attention, the compiled decode
step moves no cache- or weight-sized data besides the matmuls' own reads, and the side-by-side
benchmark (which asserts saro_jax's greedy tokens == transformers' generate) runs at a tiny size."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saro_jax import models, sample
from saro_jax.models import transformer


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_cached_attention_equals_dot_product_attention(num_kv_heads):
  B, T, S, N, H = 3, 5, 11, 4, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, S, num_kv_heads, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, S, num_kv_heads, H)), jnp.float32)
  # Left padding in row 1, a query row that sees only its own slot in row 2: the mask cases the
  # sampler produces.
  q_slot = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  k_seg = jnp.ones((B, S), jnp.int32).at[1, :4].set(0).at[2, :S - T].set(0)
  mask = transformer.attention_mask(q_slot, jnp.ones((B, T), jnp.int32), k_seg, None)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5, implementation="xla")
  got = transformer.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask,
                                     H ** -0.5)
  # Error model: both sides compute the same fp32 sums in possibly different orders. Logits are
  # H-term dot products of unit normals (|logit| <~ 4 * sqrt(H) after scaling ~4); a reordering
  # moves each by <= H * u * sum|q_i k_i| ~ 16 * 6e-8 * 16 = 1.5e-5 relative to 1, softmax
  # passes that to the probabilities as a relative error of the same size, and the output (a
  # convex mix of unit normals, |v| <~ 4) moves by <= 4 * 2 * 1.5e-5 ~ 1.2e-4 in the worst case.
  # We use 1e-4 absolute; a real bug (a wrong key, a dropped mask, a mis-grouped head) moves the
  # output by O(0.1-1).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
  wrong_group = transformer.cached_attention(q[:, :, ::-1], k.transpose(0, 2, 3, 1),
                                             v.transpose(0, 2, 1, 3), mask, H ** -0.5)[:, :, ::-1]
  if num_kv_heads > 1:  # the bound catches heads paired with the wrong kv group
    assert np.abs(np.asarray(wrong_group) - np.asarray(want)).max() > 1e-2


def _decode_hlo(batch: int, plen: int, new: int) -> str:
  config = models.ModelConfig(family="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                              num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8)
  model = models.init_random(config, seed=0)
  graphdef, state = nnx.split(model)
  sampling = sample.Sampling.of()
  eos = jnp.asarray([-1], jnp.int32)
  zeros = jnp.zeros((batch, plen), jnp.int32)
  carry = jax.eval_shape(lambda: sample._prefill(
      graphdef, state, zeros, zeros, zeros + 1, jnp.zeros(batch, jnp.uint32),
      jnp.zeros(batch, bool), jnp.uint32(0), eos, sampling, cache_len=plen + new, mesh=None))
  return sample._decode.lower(graphdef, state, carry, jnp.int32(new), eos, sampling,
                              prompt_len=plen, mesh=None).compile().as_text()


def test_decode_step_copies_no_cache_or_weights():
  """Decoding is memory-bound: each step must read the weights and the cache once, in place.

  Before the cache layouts were chosen for it, XLA transposed every layer's K and V cache and a
  transposed copy of wo on every step (a quarter of the step time for SmolLM2 at batch 16).
  """
  batch, plen, new = 4, 8, 8
  hlo = _decode_hlo(batch, plen, new)
  S = plen + new
  big = {f"f32[{batch},2,8,{S}]", f"f32[{batch},2,{S},8]", f"f32[{batch},{S},2,8]",
         f"f32[{batch},2,{S}]", "f32[6,8,48]", "f32[8,6,48]", "f32[48,48]", "f32[48,6,8]",
         "f32[48,96]", "f32[96,48]", "f32[48,300]", "f32[300,48]"}
  moved = []
  for shape, op in re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} (copy|transpose|scatter)\(", hlo):
    if shape in big:
      moved.append((op, shape))
  assert not moved, f"the decode step copies cache- or weight-sized arrays: {moved}"


@pytest.mark.heavy
def test_benchmark_runs_and_tokens_match_transformers(tmp_path, capsys):
  """benchmarks/sampler.py asserts token identity with transformers.generate before timing."""
  import benchmark_scripts
  bench = benchmark_scripts.load("sampler")
  results = bench.main(["--model", "tiny", "--batches", "4", "--new_tokens", "8", "--repeats", "1",
                        "--workdir", str(tmp_path)])
  assert results[4]["new_tokens"] > 0 and results[4]["ratio"] > 0
  assert "| 4 |" in capsys.readouterr().out
