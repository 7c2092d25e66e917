"""The generic training engine: TrainState, sharded state init, one jitted step, the loop.

A stage supplies a pure ``loss_fn(params, micro_batch, normalizer) -> (loss, metrics)`` whose
loss and metrics are *contributions*: summed over the micro-batches of one step they give the
step's value (e.g. SFT divides its token-loss sum by the tokens of the WHOLE global batch, so
gradient accumulation and packing do not change the result). Everything else lives here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saro_jax import models, sharding
from saro_jax.checkpoint import Checkpointer

log = logging.getLogger(__name__)

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.State, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


# The model as a pytree and back; models/load.py owns them (older names kept for callers).
split_model, merge_model = models.split, models.merge


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Optimizer state sharded like the params (jit infers it from the sharded params; nothing is
  ever gathered on one device)."""

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  return jax.jit(init, donate_argnums=0)(params)


def abstract_state(abstract_params: nnx.State, optimizer: optax.GradientTransformation,
                   seed: int) -> TrainState:
  """Shapes and shardings of the TrainState without materialising anything (resume targets)."""

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  compiled = jax.jit(init).lower(abstract_params).compile()
  shapes = jax.eval_shape(init, abstract_params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      compiled.output_shardings)


def micro_batches(batch: Batch, grad_accum: int, mesh: Mesh | None) -> Batch:
  """[B, ...] -> [A, B/A, ...] where micro-batch i takes rows i, i+A, ...: every device keeps
  its own rows (its contiguous block splits evenly over the micro-batches), so no data moves."""

  def split(x):
    y = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, *sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1)))
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return y

  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    grad_accum: int, normalizer_fn: Callable[[Batch], jax.Array],
                    mesh: Mesh | None = None, learning_rate_fn: Callable | None = None):
  """The pure step ``(state, batch) -> (state, metrics)``; call it jitted or not."""

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    normalizer = normalizer_fn(batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, normalizer)
    else:
      micro = micro_batches(batch, grad_accum, mesh)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.params, first, normalizer)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(carry, mb):
        out = grad_fn(state.params, mb, normalizer)
        return jax.tree.map(jnp.add, carry, out), None

      ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_step(train_step, state: TrainState, batch_ndims: Mapping[str, int], mesh: Mesh):
  """Jits ``train_step`` ONCE with explicit in/out shardings; the state is donated."""
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in batch_ndims.items()}
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over data x fsdp (works multi-host)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in batch.items()}


class MetricsWriter:
  """metrics.jsonl (one object per logged step) + TensorBoard events, process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _last_logged(workdir: str) -> dict[str, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  if not lines:
    return {}
  row = json.loads(lines[-1])
  row.pop("step", None)
  return row


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  last_metrics: dict[str, float]
  history: list[dict[str, float]]
  finished: bool  # reached the configured number of steps (not stopped early by stop_at)


def run_loop(*, step_fn, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]],
             mesh: Mesh, steps: int, workdir: str, log_every: int, checkpointer: Checkpointer | None,
             data_state_fn: Callable[[], Any] | None = None, progress_bar: bool = True,
             to_device: Callable[[Mapping[str, np.ndarray]], Batch] | None = None,
             stop_at: int = 0, desc: str = "train") -> LoopResult:
  """Steps from ``state.step`` to ``steps``: logs, checkpoints (periodic + final), returns.

  ``to_device`` turns a host batch into the step's device batch (default: ``put_batch``; SRPO
  adds the reference log-probs there). ``stop_at`` > 0 ends this invocation (checkpointed) at
  that step; the next one resumes.
  """
  to_device = to_device or (lambda b: put_batch(b, mesh))
  from tqdm import tqdm

  writer = MetricsWriter(workdir)
  start = int(jax.device_get(state.step))
  history: list[dict[str, float]] = []
  last: dict[str, float] = {}
  bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress_bar or jax.process_index() != 0,
             dynamic_ncols=True)
  tokens, t0 = 0, time.perf_counter()
  last_step = min(steps, stop_at) if stop_at > 0 else steps
  for step in range(start + 1, last_step + 1):
    host_batch = next(batches)
    tokens += int(sum(np.count_nonzero(v) for k, v in host_batch.items() if k.endswith("segment_ids")))
    device_batch = to_device(host_batch)
    # Everything the step needs is on the devices already; an implicit host->device copy here
    # would be a silent per-step cost, so it is an error (big_vision's transfer guard).
    with jax.transfer_guard_host_to_device("disallow"):
      state, metrics = step_fn(state, device_batch)
    if step % log_every == 0 or step in (1, last_step):
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - t0
      last["tokens_per_s"] = tokens * jax.process_count() / max(elapsed, 1e-9)
      tokens, t0 = 0, time.perf_counter()
      writer.write(step, last)
      history.append({"step": step, **last})
      bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
    bar.update(1)
    if checkpointer is not None and (checkpointer.should_save(step) or step == last_step):
      checkpointer.save(step, state, data_state_fn() if data_state_fn else None)
  bar.close()
  writer.close()
  if checkpointer is not None:
    checkpointer.wait()
  if not last:  # nothing ran (a finished stage re-run): report the last logged values
    last = _last_logged(workdir)
  finished = int(jax.device_get(state.step)) >= steps
  return LoopResult(state=state, last_metrics=last, history=history, finished=finished)
