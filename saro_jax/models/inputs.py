"""From an HF-style padded batch (tokens + attention mask) to what the decoder takes.

The decoder is called with explicit ``positions`` and ``segment_ids`` (packing needs both). A
padded batch only has an ``attention_mask`` (1 = token, 0 = padding, on either side): each row's
real tokens become segment 1 counting positions from 0, padding becomes segment 0 (which attends
to nothing real and is never attended to).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saro_jax.models.transformer import Transformer


def positions_and_segments(attention_mask_BxL) -> tuple[jax.Array, jax.Array]:
  """(positions [B, L], segment ids [B, L]) of a left- or right-padded batch."""
  mask_BxL = jnp.asarray(attention_mask_BxL, jnp.int32)
  positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0) * mask_BxL
  return positions_BxL, mask_BxL


def forward(model: Transformer, tokens_BxL, *, attention_mask=None) -> jax.Array:
  """Logits [B, L, vocab_size] (float32); ``attention_mask`` None = no padding.

  One compiled program per (model graph, batch shape): run eagerly, a forward dispatches and
  compiles each of its ~100 operations on its own (seconds even for a tiny model).
  """
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(tokens_BxL)
  return _masked_forward(model, tokens_BxL, jnp.asarray(attention_mask, jnp.int32))


@nnx.jit
def _masked_forward(model: Transformer, tokens_BxL, attention_mask_BxL) -> jax.Array:
  positions_BxL, segment_ids_BxL = positions_and_segments(attention_mask_BxL)
  return model(tokens_BxL, positions_BxL, segment_ids_BxL)
