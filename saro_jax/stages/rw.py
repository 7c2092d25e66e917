"""Reasoning-style Warmup (RW): SFT on reasoning traces, loss on assistant tokens only.

The loss is the summed token NLL over the whole global batch divided by its number of target
tokens, so packing and gradient accumulation do not re-weight examples.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from saro_jax import losses, sharding, train
from saro_jax.config import StageConfig, training_config
from saro_jax.stages import _data, _setup

SFT_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def target_token_count(batch) -> jax.Array:
  _, mask_BxL = losses.shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
  return jnp.maximum(jnp.sum(mask_BxL), 1).astype(jnp.float32)


def make_loss_fn(graphdef: nnx.GraphDef, *, vocab_size: int, chunk_size: int):
  """``loss_fn(params, batch, n_tokens) -> (sum NLL / n_tokens, metrics)``."""

  def loss_fn(params, batch, n_tokens):
    model = train.merge_model(graphdef, params)
    hidden_BxLxD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    targets_BxL, mask_BxL = losses.shift_targets(batch["tokens"], batch["loss_mask"],
                                                 batch["segment_ids"])
    logps_BxL = losses.token_logps(hidden_BxLxD, model.unembed_DxV(), targets_BxL,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
    nll_sum, count = losses.sft_loss(logps_BxL, mask_BxL)
    return nll_sum / n_tokens, {"target_tokens": count}

  return loss_fn


def make_step(s: _setup.Setup):
  loss_fn = make_loss_fn(s.graphdef, vocab_size=s.model_config.vocab_size,
                         chunk_size=s.cfg.train.logps_chunk)
  return train.make_train_step(loss_fn, s.optimizer, grad_accum=s.cfg.train.grad_accum,
                               normalizer_fn=target_token_count, mesh=s.mesh,
                               learning_rate_fn=s.learning_rate_fn)


def train_stage(cfg: StageConfig, workdir: str) -> tuple[_setup.Setup, train.LoopResult]:
  """Runs (or resumes, or skips if finished) the RW stage in ``workdir``."""
  s = _setup.setup(cfg, workdir)
  batches = _data.sft_batches(cfg, s.tokenizer, s.data_state)
  with sharding.use(s.mesh):
    step = train.jit_step(make_step(s), s.state, {k: 2 for k in SFT_KEYS}, s.mesh)
    result = train.run_loop(
        step_fn=step, state=s.state, batches=_data.select(batches, SFT_KEYS), mesh=s.mesh,
        steps=cfg.train.steps, workdir=workdir, log_every=cfg.train.log_every,
        checkpointer=s.checkpointer, data_state_fn=batches.get_state,
        progress_bar=cfg.train.progress_bar, stop_at=cfg.train.stop_at, desc="rw",
        nonfinite=cfg.train.nonfinite, max_skipped_steps=cfg.train.max_skipped_steps)
  s.state = result.state
  _data.log_stats(batches, workdir)
  s.checkpointer.close()
  return s, result


def run(config: ml_collections.ConfigDict, workdir: str):
  s, result = train_stage(training_config(config, "rw"), workdir)
  return _setup.finish(s, result, "RW")
