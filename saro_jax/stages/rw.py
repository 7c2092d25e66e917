"""Reasoning-style Warmup (RW): SFT on reasoning traces, loss on assistant tokens only.

The loss is the summed token NLL over the whole global batch divided by its number of target
tokens, so packing and gradient accumulation do not re-weight examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from saro_jax import engine, losses, models

SFT_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def target_token_count(batch) -> jax.Array:
  """The divisor: target tokens of the whole global batch (a token-weighted mean)."""
  _, mask_BxL = losses.shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
  return jnp.maximum(jnp.sum(mask_BxL), 1).astype(jnp.float32)


def make_loss_fn(graphdef: nnx.GraphDef, *, vocab_size: int, chunk_size: int):
  """``loss_fn(params, batch, n_target_tokens) -> (sum NLL / n_target_tokens, metrics)``."""

  def loss_fn(params, batch, n_target_tokens):
    model = models.merge(graphdef, params)
    hidden_BxLxD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    targets_BxL, mask_BxL = losses.shift_targets(batch["tokens"], batch["loss_mask"],
                                                 batch["segment_ids"])
    nll_sum, count = losses.token_nll_sum(hidden_BxLxD, model.unembed_DxV(), targets_BxL,
                                          mask_BxL, vocab_size=vocab_size, chunk_size=chunk_size)
    return nll_sum / n_target_tokens, {"target_tokens": count}

  return loss_fn


STAGE = engine.Stage(
    name="rw", data="sft",
    loss_fn=lambda s: make_loss_fn(s.graphdef, vocab_size=s.model_config.vocab_size,
                                   chunk_size=s.cfg.train.logps_chunk),
    divisor=lambda s: target_token_count,
    batch_ndims=lambda cfg: {k: 2 for k in SFT_KEYS})


def run(config: ml_collections.ConfigDict, workdir: str):
  return engine.run(config, workdir, STAGE)
