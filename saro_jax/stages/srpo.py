"""Safety-oriented Reasoning Process Optimization (SRPO): DPO on outcome- and process-level pairs.

The policy starts from ``model.init_from`` (in the SaRO pipeline: the RW result) and the reference
is ``dpo.reference_from`` or, by default, those same starting weights. See ``reference.py`` for the
three reference modes; the step itself is one function for all of them.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from saro_jax import losses, sharding, train
from saro_jax.config import StageConfig, training_config
from saro_jax.stages import _data, _setup, reference


def make_loss_fn(graphdef: nnx.GraphDef, cfg: StageConfig, *, vocab_size: int):
  """``loss_fn(params, batch, grad_accum) -> (loss / A, metrics / A)``: equal-size micro-batches,
  so the sum over the A micro-batches is the mean over the global batch."""
  dpo = cfg.dpo
  reference_free = dpo.reference == "none"

  def loss_fn(params, batch, grad_accum):
    out = reference.pair_logps(train.merge_model(graphdef, params), batch, vocab_size=vocab_size,
                               chunk_size=cfg.train.logps_chunk, trees=dpo.pairs_per_row)
    loss, metrics = losses.dpo_loss(
        out["chosen_logps"], out["rejected_logps"],
        None if reference_free else batch["ref_chosen_logps"].reshape(-1),
        None if reference_free else batch["ref_rejected_logps"].reshape(-1),
        chosen_lengths=out["chosen_lengths"], rejected_lengths=out["rejected_lengths"],
        loss_type=dpo.loss_type, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
        reference_free=reference_free, rpo_alpha=dpo.rpo_alpha or None,
        chosen_logit_sums=out["chosen_logit_sums"], rejected_logit_sums=out["rejected_logit_sums"])
    return loss / grad_accum, {k: v / grad_accum for k, v in metrics.items()}

  return loss_fn


def batch_ndims(cfg: StageConfig) -> dict[str, int]:
  ndims = {k: 2 for k in reference.input_keys(cfg.dpo.prefix_sharing)}
  if cfg.dpo.reference != "none":  # prefix-shared: [rows, pairs_per_row]
    ndims.update({k: 2 if cfg.dpo.prefix_sharing else 1 for k in reference.REF_KEYS})
  return ndims


def _reference_params(s: _setup.Setup, resumed: bool):
  """The reference weights, sharded like the policy's."""
  dpo = s.cfg.dpo
  if not dpo.reference_from and not resumed:
    return jax.tree.map(jnp.copy, s.state.params)  # the start weights, before any update
  spec = dataclasses.replace(s.cfg.model, init_from=dpo.reference_from or s.cfg.model.init_from)
  with sharding.use(s.mesh):
    model = _setup.load_model(spec, s.tokenizer, s.mesh, s.cfg.seed)
  return train.split_model(model)[1]


def _to_device_fn(s: _setup.Setup, resumed: bool):
  """Host batch -> device batch with the reference log-probs the step expects."""
  cfg = s.cfg
  keys = reference.input_keys(cfg.dpo.prefix_sharing)
  if cfg.dpo.reference == "none":
    return lambda host: train.put_batch({k: host[k] for k in keys}, s.mesh)
  ref_params = _reference_params(s, resumed)
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
    table = reference.precompute(ref_fn, ref_params, _data.one_epoch_dpo_batches(cfg, s.tokenizer),
                                 s.mesh, path, keys)
  del ref_params

  def precomputed(host):
    return train.put_batch({**{k: host[k] for k in keys},
                            **reference.lookup(table, host["example_id"])}, s.mesh)

  return precomputed


def train_stage(cfg: StageConfig, workdir: str) -> tuple[_setup.Setup, train.LoopResult]:
  """Runs (or resumes, or skips if finished) the SRPO stage in ``workdir``."""
  s = _setup.setup(cfg, workdir)
  resumed = s.data_state is not None or int(jax.device_get(s.state.step)) > 0
  loss_fn = make_loss_fn(s.graphdef, cfg, vocab_size=s.model_config.vocab_size)
  step = train.make_train_step(loss_fn, s.optimizer, grad_accum=cfg.train.grad_accum,
                               normalizer_fn=lambda _: jnp.float32(cfg.train.grad_accum),
                               mesh=s.mesh, learning_rate_fn=s.learning_rate_fn)
  done = int(jax.device_get(s.state.step)) >= cfg.train.steps
  to_device = None if done else _to_device_fn(s, resumed)
  batches = _data.dpo_batches(cfg, s.tokenizer, s.data_state)
  with sharding.use(s.mesh):
    jitted = train.jit_step(step, s.state, batch_ndims(cfg), s.mesh)
    result = train.run_loop(
        step_fn=jitted, state=s.state, batches=batches, mesh=s.mesh, steps=cfg.train.steps,
        workdir=workdir, log_every=cfg.train.log_every, checkpointer=s.checkpointer,
        data_state_fn=batches.get_state, progress_bar=cfg.train.progress_bar, to_device=to_device,
        stop_at=cfg.train.stop_at, desc="srpo")
  s.state = result.state
  _data.log_stats(batches, workdir)
  s.checkpointer.close()
  return s, result


def run(config: ml_collections.ConfigDict, workdir: str):
  s, result = train_stage(training_config(config, "srpo"), workdir)
  return _setup.finish(s, result, "SRPO")
