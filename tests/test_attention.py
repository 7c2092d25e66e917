"""The training attention (``transformer.causal_attention``: query blocks that skip the keys above
the diagonal, grouped-query layouts) == ``jax.nn.dot_product_attention``'s plain XLA path, in
values and gradients, for every mask the training rows produce: packed segments with padding,
prefix-shared branches with restarting positions, and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saro_jax.models import transformer
import error_model

B, L, N, K, H = 2, 200, 6, 2, 16  # L = 200: 4 query blocks of 64 rows, the last one partial


def _masks():
  slots = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  # Row 0: two packed segments then padding. Row 1: one tree [shared | chosen | rejected], the
  # positions restarting at the rejected branch, then padding.
  segments = np.ones((B, L), np.int32)
  segments[0, 120:190] = 2
  segments[0, 190:] = 0
  segments[1, 180:] = 0
  branches = np.zeros((B, L), np.int32)
  branches[1, 40:110] = 1
  branches[1, 110:180] = 2
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
  positions[1, 110:180] = np.arange(40, 110)
  seg, br, pos = jnp.asarray(segments), jnp.asarray(branches), jnp.asarray(positions)
  return {
      "packed": transformer.attention_mask(slots, seg, seg, None),
      "tree": transformer.attention_mask(slots, seg, seg, None, br, pos),
      "window": transformer.attention_mask(slots, seg, seg, 37, br, pos),
  }


def _inputs():
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return draw(B, L, N, H), draw(B, L, K, H), draw(B, L, K, H), draw(B, L, N, H)


def _value_and_grads(attend, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)
  out = attend(q, k, v)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# Error model (tests/error_model.py): both sides evaluate the same fp32 sums in other orders
# (other matmul shapes; a softmax over the causal prefix instead of the whole row, the dropped
# terms being exact zeros). On the path to one output: the q.k scores (H terms), the softmax
# denominator and the probability-weighted sum of values (L terms each; L again for the
# gradients' sums over queries), and a few ulp of exp. The gradients run the same reductions
# transposed: twice the depth.
FORWARD_DEPTH = H + 3 * L + error_model.ELEMENTWISE_ULPS
GRAD_DEPTH = 2 * FORWARD_DEPTH


# Query blocks: the shipped rule (4 blocks of 64 rows at L = 200, the last one 8 rows), 2 equal
# blocks (L a multiple of the block), one block (nothing skipped: the plain computation).
BLOCKS = [None, 100, L]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b or 'default'}")
@pytest.mark.parametrize("kind", ["packed", "tree", "window"])
def test_causal_attention_equals_dot_product_attention(kind, block):
  assert transformer.query_block(L) == 64 and L % 64 != 0  # several blocks, the last partial
  mask = _masks()[kind]
  q, k, v, cotangent = _inputs()
  scale = H ** -0.5
  ours = lambda q, k, v: transformer.causal_attention(q, k, v, mask, scale, block)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                     implementation="xla")
  got, got_grads = jax.jit(lambda *a: _value_and_grads(ours, *a))(q, k, v, cotangent)
  want, want_grads = jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v, cotangent)
  error_model.assert_parity(got, want, FORWARD_DEPTH, what=f"{kind} out")
  for name, g, w in zip("qkv", got_grads, want_grads):
    error_model.assert_parity(g, w, GRAD_DEPTH, what=f"{kind} d{name}")


@pytest.mark.parametrize("kind", ["packed", "tree", "window"])
def test_parity_bounds_catch_a_leaked_key(kind):
  # Negative control: a key the mask hides made visible (the diagonal shifted by one slot, what
  # an off-by-one block boundary would do) breaks the bounds of the parity test above.
  mask = _masks()[kind]
  q, k, v, cotangent = _inputs()
  scale = H ** -0.5
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                     implementation="xla")
  want, want_grads = jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v, cotangent)
  leaky = mask | jnp.eye(L, k=1, dtype=bool)[None, None]
  bug = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=leaky, scale=scale,
                                                     implementation="xla")
  bug_out, bug_grads = jax.jit(lambda *a: _value_and_grads(bug, *a))(q, k, v, cotangent)
  error_model.assert_caught(bug_out, want, FORWARD_DEPTH, what=f"{kind} out")
  error_model.assert_caught(bug_grads[0], want_grads[0], GRAD_DEPTH, what=f"{kind} dq")


def test_query_block_sizes():
  # At most 4 blocks, at least 64 rows: a short sequence is one block (the plain computation).
  assert transformer.query_block(32) == 64
  assert transformer.query_block(256) == 64
  assert transformer.query_block(512) == 128
  assert transformer.query_block(4096) == 1024
  with pytest.raises(ValueError, match="block=0"):
    transformer.causal_attention(*_inputs()[:3], _masks()["packed"], 1.0, block=0)
