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
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saro_jax import host_memory, models, sharding, xla_options
from saro_jax import optimizer as opt_lib
from saro_jax.checkpoint import Checkpointer

log = logging.getLogger(__name__)

Batch = Mapping[str, jax.Array]
NONFINITE = "nonfinite"  # per-step metric of train_step: 1.0 when the update was dropped
NONFINITE_MODES = ("raise", "skip")
# Exit status after a SIGTERM was handled (checkpoint written): what a shell reports for a process
# ended by SIGTERM (128 + 15), so wrappers that treat 143 as "preempted, requeue" keep working.
PREEMPTED_EXIT_CODE = 143
LossFn = Callable[[nnx.State, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


# The model as a pytree and back; models/load.py owns them (older names kept for callers).
split_model, merge_model = models.split, models.merge


def _state_init_fn(params, optimizer: optax.GradientTransformation, seed: int):
  """The jittable TrainState init. Optimizer-state subtrees shaped like the params (AdamW's mu and
  nu) are constrained to the params' shardings: ``zeros_like`` carries no sharding, and without
  the constraint jit REPLICATES them (2x the fp32 weights on every device; found by
  ``saro_jax.plan``). Other leaves (step counters) are left to the compiler."""
  treedef = jax.tree.structure(params)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  params_like = lambda x: jax.tree.structure(x) == treedef

  def place(subtree):
    if params_like(subtree):
      return jax.tree.map(jax.lax.with_sharding_constraint, subtree, shardings)
    return subtree

  def init(params):
    opt_state = jax.tree.map(place, optimizer.init(params), is_leaf=params_like)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.key(seed)))

  return init


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Optimizer state sharded like the params (nothing is ever gathered on one device)."""
  return jax.jit(_state_init_fn(params, optimizer, seed), donate_argnums=0)(params)


def abstract_state(abstract_params: nnx.State, optimizer: optax.GradientTransformation,
                   seed: int) -> TrainState:
  """Shapes and shardings of the TrainState without materialising anything (resume targets)."""
  init = _state_init_fn(abstract_params, optimizer, seed)
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
                    mesh: Mesh | None = None, learning_rate_fn: Callable | None = None,
                    adapt: Callable[[Any, Any], nnx.State] | None = None):
  """The pure step ``(state, batch) -> (state, metrics)``; call it jitted or not.

  ``adapt(trainable, frozen) -> params`` (LoRA: the base weights with the adapters applied): the
  step is then ``(state, batch, frozen)``; ``state.params`` (and so the optimizer state and the
  checkpoints) holds only the trainable part, ``loss_fn`` sees ``adapt(state.params, frozen)``,
  and ``frozen`` is an argument that is neither differentiated nor updated."""

  def loss_of(trainable, micro_batch, normalizer, frozen):
    params = trainable if adapt is None else adapt(trainable, frozen)
    return loss_fn(params, micro_batch, normalizer)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)  # w.r.t. the trainable params only
  optimizer = optax.with_extra_args_support(optimizer)  # takes grad_norm= (below)

  def train_step(state: TrainState, batch: Batch, frozen: Any = None
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    normalizer = normalizer_fn(batch)
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, normalizer, frozen)
    else:
      micro = micro_batches(batch, grad_accum, mesh)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.params, first, normalizer, frozen)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      # The frozen params ride in the carry, not the closure (a model merged inside the loop
      # from closed-over params breaks nnx.remat; see stages/reference.py).
      def body(carry, mb):
        total, frozen = carry
        out = grad_fn(state.params, mb, normalizer, frozen)
        return (jax.tree.map(jnp.add, total, out), frozen), None

      (((loss, metrics), grads), _), _ = jax.lax.scan(body, (zeros, frozen), micro)
    grad_norm = opt_lib.global_norm(grads)
    # A non-finite loss or gradient never reaches the weights or the optimizer moments: the
    # update is skipped on the device (no host round trip) and the step is flagged; run_loop
    # decides from the flags whether to stop (train.nonfinite="raise") or go on ("skip").
    # A ``lax.cond``, not a select of new against old: with a select XLA fuses each moment's
    # update into the weight's fusion as well, reads the old moments after they are overwritten
    # in place, and so copies both moment buffers first (SmolLM2's RW step: 0.28 GiB more temp
    # memory, ~0.8 s); the cond's branches copy nothing (tests/test_train.py checks it).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      # The norm once per step: our clipping takes it (optimizer.clip_by_global_norm); an
      # optimizer without that argument ignores it (with_extra_args_support).
      updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state: (params, opt_state),
                                     state.params, state.opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   **{NONFINITE: jnp.logical_not(finite).astype(jnp.float32)})
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_step(train_step, state: TrainState, batch_ndims: Mapping[str, int], mesh: Mesh,
             frozen: Any = None):
  """Jits ``train_step`` ONCE with explicit in/out shardings; the state is donated. On CPU it
  compiles with ``xla_options.CPU_STEP_OPTIONS`` (XLA's memory-optimized scheduler, YNNPACK for
  the dots only).

  ``frozen`` (a step made with ``adapt``): the jitted step takes it as a third argument, placed
  as it is and never donated (it is the same arrays every step)."""
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in batch_ndims.items()}
  replicated = NamedSharding(mesh, PartitionSpec())
  in_sh = (state_sh, batch_sh)
  if frozen is not None:
    in_sh += (jax.tree.map(lambda x: x.sharding, frozen),)
  return jax.jit(train_step, in_shardings=in_sh, out_shardings=(state_sh, replicated),
                 donate_argnums=0, compiler_options=xla_options.step_options(mesh))


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
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_partial_last_line(path)  # a kill -9 mid-write must not glue two rows together
      self._jsonl = open(path, "a")
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


def _drop_partial_last_line(path: str) -> None:
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


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


class Preempted(SystemExit):
  """Raised by ``run_loop`` after a SIGTERM: the step reached is checkpointed (with the data
  position); the process exits with ``PREEMPTED_EXIT_CODE``; re-running the command resumes."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


class NonFiniteError(FloatingPointError):
  """A step's loss or gradient norm was NaN/inf (train.nonfinite="raise"), or more such steps
  than train.max_skipped_steps were skipped; the message has the step, batch and metrics."""


class DataExhaustedError(RuntimeError):
  """A finite dataset ran out before train.steps; the message has the batch count and stats."""


_SIGTERM_RECEIVED = threading.Event()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  if not _SIGTERM_RECEIVED.is_set():
    log.warning("SIGTERM: finishing the current step, then checkpointing and exiting")
  _SIGTERM_RECEIVED.set()


def _preemption_check() -> tuple[Callable[[int], bool], Callable[[], None]]:
  """``(reached(step) -> bool, restore)``: whether to stop after ``step`` because of SIGTERM.

  One process: a SIGTERM handler that sets a flag, installed for the loop (``restore`` puts the
  previous handler back; before and after the loop nothing is unsaved, so SIGTERM ends the
  process as usual). Several processes: JAX's preemption
  sync point (``jax.distributed`` installs a SIGTERM notifier and propagates a notice from any
  host to all; every host then stops at the same step, the first one all of them can still
  reach). Called after every step on every process.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    def reached_multihost(step: int) -> bool:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service=False
        log.warning("no SIGTERM handling across hosts: %s", e)
        return False

    return reached_multihost, lambda: None
  reached = lambda step: _SIGTERM_RECEIVED.is_set()  # noqa: E731
  if threading.current_thread() is not threading.main_thread():
    return reached, lambda: None  # (signals reach the main thread only)
  _SIGTERM_RECEIVED.clear()
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  return reached, lambda: signal.signal(signal.SIGTERM, previous)


def _batch_origin(host_batch: Mapping[str, np.ndarray], position: Any) -> str:
  """What identifies a batch in a diagnosis: its example ids, else its data position."""
  if "example_id" in host_batch:
    ids = [int(i) for i in np.asarray(host_batch["example_id"]).reshape(-1) if i >= 0]
    return f"example ids {ids}"
  if isinstance(position, Mapping) and "grain" in position:
    position = position["grain"]
  text = json.dumps(position, default=str) if position is not None else "unknown"
  return (f"data position {text[:400]} (SFT batches carry no record ids: restore this iterator"
          " state to replay the batch)")


def _data_stats(data_state_fn, data_stats_fn) -> dict:
  if data_stats_fn is not None:
    return dict(data_stats_fn())
  state = data_state_fn() if data_state_fn is not None else None
  stats = dict(state["stats"]) if isinstance(state, Mapping) and isinstance(state.get("stats"), Mapping) else {}
  if stats and "dropped" not in stats:
    stats["dropped"] = sum(v for k, v in stats.items() if k.startswith("dropped/"))
  return stats


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
             stop_at: int = 0, desc: str = "train", nonfinite: str = "raise",
             max_skipped_steps: int = 0, handle_sigterm: bool = True,
             data_stats_fn: Callable[[], Mapping[str, Any]] | None = None) -> LoopResult:
  """Steps from ``state.step`` to ``steps``: logs, checkpoints (periodic + final), returns.

  ``to_device`` turns a host batch into the step's device batch (default: ``put_batch``; SRPO
  adds the reference log-probs there). ``stop_at`` > 0 ends this invocation (checkpointed) at
  that step; the next one resumes.

  Faults (BUILD.md "Failure behaviour"):
  - SIGTERM (``handle_sigterm``): the step in flight finishes, the step reached is checkpointed
    with the data position, "preempted at step N" is logged and ``Preempted`` (a SystemExit,
    status 143) is raised. Every process stops at the same step (JAX's preemption sync point).
  - A step whose loss or gradient norm is non-finite is not applied (see ``make_train_step``).
    The per-step flags are read at the host syncs the loop already has (log steps, before each
    checkpoint, at the end): ``nonfinite="raise"`` raises ``NonFiniteError`` (step, batch,
    metrics) before anything is written, so the newest checkpoint is the last good one;
    ``"skip"`` counts the step (``skipped_steps`` in the metrics, kept in checkpoints) and raises
    once more than ``max_skipped_steps`` were skipped.
  - Finite data that runs out before ``steps`` raises ``DataExhaustedError`` with the number of
    batches it gave and the data stats (``data_stats_fn``, else ``data_state_fn()["stats"]``).
  """
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f"nonfinite={nonfinite!r} is not one of {list(NONFINITE_MODES)}")
  to_device = to_device or (lambda b: put_batch(b, mesh))
  from tqdm import tqdm

  writer = MetricsWriter(workdir)
  start = int(jax.device_get(state.step))
  history: list[dict[str, float]] = []
  last: dict[str, float] = {}
  skipped = int(checkpointer.loop_state(start).get("skipped_steps", 0)) if (
      checkpointer is not None and start > 0) else 0
  # Steps since the last host sync: (step, batch origin, device metrics); read by check().
  pending: list[tuple[int, Callable[[], str], dict[str, jax.Array]]] = []
  saved_step = checkpointer.latest_step() if checkpointer is not None else None

  def newest() -> str:
    return (f"the newest checkpoint (step {saved_step}) holds the last good weights"
            if saved_step is not None else "no checkpoint was written")

  def check() -> None:
    nonlocal skipped
    if not pending:
      return
    flags = jax.device_get([m[NONFINITE] for _, _, m in pending if NONFINITE in m])
    bad = [p for p, flag in zip((p for p in pending if NONFINITE in p[2]), flags) if flag]
    pending.clear()
    for step, origin, metrics in bad:
      values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != NONFINITE}
      names = sorted(k for k, v in values.items() if not np.isfinite(v))
      diagnosis = (f"step {step}: non-finite {', '.join(f'{k}={values[k]}' for k in names)};"
                   f" batch: {origin()}")
      if nonfinite == "raise":
        raise NonFiniteError(
            f"{diagnosis}. The update was not applied and nothing was saved after it; {newest()}."
            " Lower the learning rate"
            " or look at that batch; train.nonfinite='skip' skips such batches (up to"
            " train.max_skipped_steps).")
      skipped += 1
      log.warning("skipped %s (%d of at most %d)", diagnosis, skipped, max_skipped_steps)
      if skipped > max_skipped_steps:
        raise NonFiniteError(
            f"{skipped} steps had a non-finite loss or gradient norm, more than"
            f" train.max_skipped_steps={max_skipped_steps}; the last: {diagnosis}; {newest()}.")

  def save(step: int) -> None:
    nonlocal saved_step
    check()  # never checkpoint after an unnoticed non-finite step
    checkpointer.save(step, state, data_state_fn() if data_state_fn else None,
                      loop_state={"skipped_steps": skipped})
    saved_step = step

  bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress_bar or jax.process_index() != 0,
             dynamic_ncols=True)
  preempted, restore_sigterm = _preemption_check() if handle_sigterm else (lambda s: False, lambda: None)
  tokens, t0 = 0, time.perf_counter()
  last_step = min(steps, stop_at) if stop_at > 0 else steps
  need_position = True
  try:
    for step in range(start + 1, last_step + 1):
      # Where this batch starts, to name it in a diagnosis when it carries no example ids.
      position = data_state_fn() if data_state_fn is not None and need_position else None
      try:
        host_batch = next(batches)
      except StopIteration:
        stats = _data_stats(data_state_fn, data_stats_fn)
        raise DataExhaustedError(
            f"the data ran out before step {step} of train.steps={steps}: it gave {step - 1}"
            f" batches in all{f' ({start} before the resume)' if start else ''}. Set"
            f" train.steps <= {step - 1}, more data.num_epochs, or data.num_epochs=0 (repeat)."
            f" Dropped examples: {stats.get('dropped', 'unknown')}"
            f" { {k: v for k, v in stats.items() if k.startswith('dropped/')} }."
            f" Data stats: {json.dumps(stats, sort_keys=True, default=str)}") from None
      tokens += int(sum(np.count_nonzero(v) for k, v in host_batch.items() if k.endswith("segment_ids")))
      device_batch = to_device(host_batch)
      # Everything the step needs is on the devices already; an implicit host->device copy here
      # would be a silent per-step cost, so it is an error (big_vision's transfer guard).
      with jax.transfer_guard_host_to_device("disallow"):
        state, metrics = step_fn(state, device_batch)
      ids = host_batch.get("example_id")
      need_position = ids is None
      pending.append((step, lambda ids=ids, position=position: _batch_origin(
          {"example_id": ids} if ids is not None else {}, position), metrics))
      if step % log_every == 0 or step in (1, last_step):
        check()
        last = {k: float(v) for k, v in jax.device_get(metrics).items() if k != NONFINITE}
        if nonfinite == "skip":
          last["skipped_steps"] = float(skipped)
        elapsed = time.perf_counter() - t0
        last["tokens_per_s"] = tokens * jax.process_count() / max(elapsed, 1e-9)
        tokens, t0 = 0, time.perf_counter()
        writer.write(step, last)
        history.append({"step": step, **last})
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        host_memory.release_if_grown()  # a host sync: the steps so far have finished
      bar.update(1)
      stop = preempted(step)
      if checkpointer is not None and (checkpointer.should_save(step) or step == last_step or stop):
        save(step)
      if stop:
        check()
        if checkpointer is not None:
          checkpointer.wait()
        message = (f"preempted at step {step} of {steps}: "
                   + ("checkpoint written; re-run the same command to resume" if checkpointer
                      is not None else "no checkpointer, nothing saved"))
        log.warning(message)
        print(message, flush=True)
        _SIGTERM_RECEIVED.clear()
        raise Preempted(step)
    check()
  finally:
    restore_sigterm()
    bar.close()
    writer.close()
    if checkpointer is not None:
      checkpointer.wait()  # an in-flight save completes, whatever ended the loop
  if not last:  # nothing ran (a finished stage re-run): report the last logged values
    last = _last_logged(workdir)
  finished = int(jax.device_get(state.step)) >= steps
  return LoopResult(state=state, last_metrics=last, history=history, finished=finished)
