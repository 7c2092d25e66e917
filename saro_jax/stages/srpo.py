"""Safety-oriented Reasoning Process Optimization (SRPO): DPO on outcome- and process-level pairs.

The policy starts from ``model.init_from`` (in the SaRO pipeline: the RW result) and the reference
is ``dpo.reference_from`` or, by default, those same starting weights (with LoRA: the frozen base,
i.e. the adapters off). See ``reference.py`` for the three reference modes; the step itself is one
function for all of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from saro_jax import engine, logps, losses, models, sharding, train
from saro_jax.config import StageConfig
from saro_jax.stages import reference


def make_loss_fn(graphdef: nnx.GraphDef, cfg: StageConfig, *, vocab_size: int):
  """``loss_fn(params, batch, n_micro_batches) -> (loss / A, metrics / A)``: equal-size
  micro-batches, so the sum over the A micro-batches is the mean over the global batch."""
  dpo = cfg.dpo
  reference_free = dpo.reference == "none"

  def loss_fn(params, batch, n_micro_batches):
    out = logps.pair_logps(models.merge(graphdef, params), batch, vocab_size=vocab_size,
                           chunk_size=cfg.train.logps_chunk,
                           keep_logits=cfg.train.logps_keep_logits)
    loss, metrics = losses.dpo_loss(
        out["chosen_logps"], out["rejected_logps"],
        None if reference_free else batch["ref_chosen_logps"].reshape(-1),
        None if reference_free else batch["ref_rejected_logps"].reshape(-1),
        chosen_lengths=out["chosen_lengths"], rejected_lengths=out["rejected_lengths"],
        loss_type=dpo.loss_type, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
        reference_free=reference_free, rpo_alpha=dpo.rpo_alpha or None,
        chosen_logit_sums=out["chosen_logit_sums"], rejected_logit_sums=out["rejected_logit_sums"])
    return loss / n_micro_batches, {k: v / n_micro_batches for k, v in metrics.items()}

  return loss_fn


def batch_ndims(cfg: StageConfig) -> dict[str, int]:
  ndims = {k: 2 for k in logps.input_keys(cfg.dpo.prefix_sharing)}
  if cfg.dpo.reference != "none":  # prefix-shared: [rows, pairs_per_row]
    ndims.update({k: 2 if cfg.dpo.prefix_sharing else 1 for k in reference.REF_KEYS})
  return ndims


def batch_options(cfg: StageConfig) -> dict:
  """The DPO row layout: one pair per row (default), prefix-shared trees, or packed trees."""
  if not cfg.dpo.prefix_sharing:
    return {}
  return {"prefix_sharing": True, "pairs_per_row": cfg.dpo.pairs_per_row,
          "share_prompts": cfg.dpo.share_prompts}


def one_epoch_batches(cfg: StageConfig, tokenizer) -> Iterator[dict]:
  """Every pair of this process's shard at least once, in a number of batches that is the same on
  every process (the reference forward is one global computation): ceil(records / batch) + 1
  batches of the unshuffled, repeated stream (the +1 covers the last partial batch, which the
  DPO batcher would otherwise drop)."""
  it = engine.batches("dpo", cfg, tokenizer, shuffle=False, num_epochs=0, **batch_options(cfg))
  records = int(it.stats.counts.get("source/kept", 0))
  if records <= 0:
    raise ValueError(f"data {cfg.data.sources}: the source reported no records")
  for _ in range(math.ceil(records / cfg.train.batch_size) + 1):
    yield next(it)


def _reference_params(s: engine.Setup):
  """The reference weights, sharded like the policy's. LoRA: the frozen base itself (the model
  with its adapters off), no second copy of the weights."""
  dpo = s.cfg.dpo
  if not dpo.reference_from and s.base is not None:
    return s.base
  if not dpo.reference_from and not s.resumed:
    return jax.tree.map(jnp.copy, s.state.params)  # the start weights, before any update
  spec = dataclasses.replace(s.cfg.model, init_from=dpo.reference_from or s.cfg.model.init_from)
  with sharding.use(s.mesh):
    model = models.load(spec, tokenizer=s.tokenizer, mesh=s.mesh, seed=s.cfg.seed)
  return models.split(model)[1]


def to_device_fn(s: engine.Setup):
  """Host batch -> device batch with the reference log-probs the step expects."""
  cfg = s.cfg
  keys = logps.input_keys(cfg.dpo.prefix_sharing)
  if cfg.dpo.reference == "none":
    return lambda host: train.put_batch({k: host[k] for k in keys}, s.mesh)
  ref_params = _reference_params(s)
  ref_fn = reference.make_reference_fn(s.graphdef, vocab_size=s.model_config.vocab_size,
                                       chunk_size=cfg.train.logps_chunk,
                                       micro_batches=cfg.train.grad_accum, mesh=s.mesh,
                                       trees=cfg.dpo.pairs_per_row if cfg.dpo.prefix_sharing else None)
  if cfg.dpo.reference == "live":

    def live(host):
      device = train.put_batch({k: host[k] for k in keys}, s.mesh)
      device["ref_chosen_logps"], device["ref_rejected_logps"] = ref_fn(ref_params, device)
      return device

    return live
  key = reference.cache_key(cfg, s.tokenizer, ref_params)
  path = os.path.join(s.workdir, "reference_logps", f"{key}.process_{jax.process_index()}.npz")
  with sharding.use(s.mesh):
    table = reference.precompute(ref_fn, ref_params, one_epoch_batches(cfg, s.tokenizer), s.mesh,
                                 path, keys)
  del ref_params

  def precomputed(host):
    return train.put_batch({**{k: host[k] for k in keys},
                            **reference.lookup(table, host["example_id"])}, s.mesh)

  return precomputed


STAGE = engine.Stage(
    name="srpo", data="dpo",
    loss_fn=lambda s: make_loss_fn(s.graphdef, s.cfg, vocab_size=s.model_config.vocab_size),
    divisor=lambda s: lambda _: jnp.float32(s.cfg.train.grad_accum),
    batch_ndims=batch_ndims, to_device=to_device_fn, batch_options=batch_options)


def run(config: ml_collections.ConfigDict, workdir: str):
  return engine.run(config, workdir, STAGE)
