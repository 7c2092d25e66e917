"""Orbax checkpoints of a training stage, resume, and the hand-off between stages.

A stage's checkpoint directory holds orbax steps (items ``params``, ``opt_state``, ``meta``,
``info``), ``model.json`` (the ModelConfig and the tokenizer dir, so a later stage can start from
it; a LoRA stage adds ``lora``: its adapters' config and how to rebuild the frozen base, whose
weights are not in the checkpoint) and ``data_state/`` (each process's data-iterator state per step, JSON: every process reads a
different shard, so each keeps its own file).

Pytrees are stored as flat ``{path: array}`` dicts: any structure (nnx.State, optax namedtuples)
round-trips, and restoring only ``params`` needs nothing but the model's abstract params.

Integrity. Orbax commits a step atomically (a temporary directory renamed into place, so a
``kill -9`` during an async save leaves only an ignored ``*.orbax-checkpoint-tmp-*``), but it
reads a damaged step silently when the damage is inside a data file: a flipped byte comes back
as a wrong number. So every step also stores ``info`` (JSON): a checksum per leaf, the wrapping
uint32 sum of the leaf's bit patterns, computed on the devices before the save (exact and
independent of sharding or reduction order; any single flipped bit changes it). ``restore``
recomputes and compares them. ``restore_latest`` walks back from the newest step: a step that
is unreadable, incomplete or fails its checksums is moved to ``corrupt/<step>`` with a warning
that names what was wrong, and the previous step is tried; when no step is good it raises
``CheckpointError`` listing every step's problem.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

MODEL_META = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"
DATA_STATE_SUBDIR = "data_state"
CORRUPT_SUBDIR = "corrupt"
ITEMS = ("params", "opt_state", "meta", "info")
_ARRAY_ITEMS = ("params", "opt_state", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names the step, the item and what is wrong."""


def _flat(tree: Any) -> dict[str, Any]:
  """``{sanitized key path: leaf}``; the sanitized names are unique or this raises."""
  out: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", jax.tree_util.keystr(path)).strip("_") or "leaf"
    if key in out:
      raise ValueError(f"checkpoint: two leaves map to the key {key!r}")
    out[key] = leaf
  return out


def _unflat(like: Any, flat: Mapping[str, Any]) -> Any:
  keys = list(_flat(like))
  missing = [k for k in keys if k not in flat]
  if missing:
    raise ValueError(f"checkpoint: missing entries {missing[:5]} (of {len(missing)}); was it written"
                     " for a different model or optimizer?")
  return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in keys])


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of ``tree``'s arrays (restore targets)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _bits_u32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.bool_):
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:
    raise ValueError(f"checkpoint checksum: unsupported dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


@jax.jit
def _checksums(items: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
  # uint32 addition wraps: exact, associative and commutative, so the value does not depend on
  # the sharding or the order XLA reduces in (a float sum would). All items in one program: many
  # small programs with all-reduces in flight at once can deadlock XLA:CPU's virtual devices
  # (``stages.reference._leaf_stats``).
  return {name: {k: jnp.sum(_bits_u32(v), dtype=jnp.uint32) for k, v in flat.items()}
          for name, flat in items.items()}


def checksums(items: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, dict[str, int]]:
  """``{item: {leaf key: checksum}}`` of flat dicts of arrays (all processes must call it)."""
  got = jax.device_get(_checksums({name: dict(flat) for name, flat in items.items()}))
  return {name: {k: int(v) for k, v in sums.items()} for name, sums in got.items()}


def _write_json_atomic(path: str, value: Any) -> None:
  """Writes ``path`` via a temporary file and a rename: a crash leaves the old file or none."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _all_processes(ok: bool) -> bool:
  """True iff ``ok`` on every process (so all processes take the same resume decision)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _summary(e: BaseException, limit: int = 300) -> str:
  """The gist of an (often huge) orbax / tensorstore error and of the errors that caused it."""
  parts, seen = [], set()
  while e is not None and id(e) not in seen and len(parts) < 3:
    seen.add(id(e))
    text = re.sub(r"See full TensorStore details: .*", "", " ".join(str(e).split())).strip()
    text = re.sub(r"\[tensorstore_spec.*", "", text).strip()
    parts.append(f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}")
    e = e.__cause__ or e.__context__
  return " <- ".join(parts)


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the last ``keep``, async if asked."""

  def __init__(self, directory: str, *, every: int = 0, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.keep = keep
    # A step kept in `corrupt/` must not be re-saved into: orbax refuses existing steps anyway.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._remove_stale_temporaries()

  def _remove_stale_temporaries(self) -> None:
    """Temporary JSON files of a process killed mid-write (their final names were never made)."""
    patterns = [os.path.join(self.directory, DATA_STATE_SUBDIR,
                             f"*.process_{jax.process_index()}.json.tmp-*")]
    if jax.process_index() == 0:
      patterns.append(os.path.join(self.directory, f"{MODEL_META}.tmp-*"))
    for pattern in patterns:
      for path in glob.glob(pattern):
        try:
          os.remove(path)
        except FileNotFoundError:
          pass

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def _data_state_path(self, step: int) -> str:
    return os.path.join(self.directory, DATA_STATE_SUBDIR, f"{step}.process_{jax.process_index()}.json")

  def save(self, step: int, state, data_state: Any = None, loop_state: Mapping[str, Any] | None = None
           ) -> None:
    """``state``: a train.TrainState; ``data_state``: this process's iterator state (JSON-able);
    ``loop_state``: small JSON-able loop counters (e.g. skipped non-finite steps)."""
    if data_state is not None:  # written first: a committed step always has its data position
      _write_json_atomic(self._data_state_path(step), data_state)
    arrays = {"params": _flat(state.params), "opt_state": _flat(state.opt_state),
              "meta": {"step": state.step, "rng": state.rng}}
    info = {"checksums": checksums(arrays), "loop": dict(loop_state or {})}
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(arrays["params"]),
        opt_state=ocp.args.StandardSave(arrays["opt_state"]),
        meta=ocp.args.StandardSave(arrays["meta"]),
        info=ocp.args.JsonSave(info)), force=True)
    self._prune_data_states()

  def _prune_data_states(self) -> None:
    """Drops data-state files of steps orbax no longer keeps (and never of kept or newer ones)."""
    folder = os.path.join(self.directory, DATA_STATE_SUBDIR)
    if not os.path.isdir(folder):
      return
    kept = set(self._manager.all_steps())
    if not kept:
      return
    oldest = min(kept)
    suffix = f".process_{jax.process_index()}.json"
    for name in os.listdir(folder):
      if name.endswith(suffix) and name[:-len(suffix)].isdigit():
        step = int(name[:-len(suffix)])
        if step < oldest and step not in kept:
          try:
            os.remove(os.path.join(folder, name))
          except FileNotFoundError:
            pass

  def restore(self, step: int, like) -> tuple[Any, Any]:
    """Restores step ``step`` into the structure and shardings of ``like`` (a TrainState of
    arrays or ShapeDtypeStructs), verifying its checksums; returns ``(state, data_state or
    None)``. Raises ``CheckpointError`` naming the step, the item and the problem."""
    return self._restore_with_info(step, like)[:2]

  def _restore_with_info(self, step: int, like) -> tuple[Any, Any, dict]:
    where = f"checkpoint step {step} in {self.directory}"
    step_dir = os.path.join(self.directory, str(step))
    present = set(os.listdir(step_dir)) if os.path.isdir(step_dir) else set()
    missing = [name for name in ITEMS if name not in present]
    if not present:
      raise CheckpointError(f"{where}: the step directory is missing")
    if missing:
      raise CheckpointError(f"{where}: item(s) {missing} missing from {step_dir}")
    target = abstract(like)
    targets = {"params": _flat(target.params), "opt_state": _flat(target.opt_state),
               "meta": {"step": target.step, "rng": target.rng}}
    got: dict[str, Any] = {}
    for name in ITEMS:
      try:
        if name == "info":
          item = self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))
        else:
          item = self._manager.restore(step, args=ocp.args.Composite(
              **{name: ocp.args.StandardRestore(targets[name])}))
        got[name] = item[name]
      except Exception as e:  # orbax / tensorstore raise many types; name the item and the cause
        raise CheckpointError(f"{where}: item {name!r} ({os.path.join(step_dir, name)}) is unreadable:"
                              f" {_summary(e)}") from e
    info = got["info"] if isinstance(got["info"], dict) else {}
    want = info.get("checksums")
    if not isinstance(want, dict):
      raise CheckpointError(f"{where}: {os.path.join(step_dir, 'info')} has no checksums")
    have = checksums({name: got[name] for name in _ARRAY_ITEMS})
    for name in _ARRAY_ITEMS:
      bad = sorted(k for k in have[name] if want.get(name, {}).get(k) != have[name][k])
      if bad:
        raise CheckpointError(
            f"{where}: item {name!r} fails its checksum in {len(bad)} array(s), e.g. {bad[:3]}"
            f" (stored {[want.get(name, {}).get(k) for k in bad[:3]]}, read"
            f" {[have[name][k] for k in bad[:3]]}): the files under {os.path.join(step_dir, name)}"
            " are damaged")
    state = like.replace(params=_unflat(target.params, got["params"]),
                         opt_state=_unflat(target.opt_state, got["opt_state"]),
                         step=got["meta"]["step"], rng=got["meta"]["rng"])
    data_state = None
    path = self._data_state_path(step)
    if os.path.exists(path):
      try:
        with open(path) as f:
          data_state = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: data-iterator state {path} is unreadable: {_summary(e)}") from e
    return state, data_state, info.get("loop", {})

  def restore_latest(self, like) -> tuple[Any, Any] | None:
    """The newest good step: ``(state, data_state)``, or None when there is no step.

    A bad step (see the module docstring) is moved to ``corrupt/<step>`` with a warning and the
    previous one is tried; ``CheckpointError`` when none is good. Every process takes the same
    decision (a step is good only if it is good on all of them)."""
    problems = []
    for step in reversed(self.all_steps()):
      error = None
      try:
        result = self._restore_with_info(step, like)
      except CheckpointError as e:
        error, result = e, None
      if _all_processes(error is None):
        if problems:
          log.warning("resuming from step %d, the newest good checkpoint (set aside: %s)", step,
                      ", ".join(str(s) for s, _ in problems))
        return result[:2]
      message = str(error) if error is not None else f"checkpoint step {step}: bad on another process"
      log.warning("%s; falling back to the previous checkpoint", message)
      problems.append((step, message))
      self._set_aside(step)
    if problems:
      raise CheckpointError(
          f"no usable checkpoint in {self.directory}; every step is damaged:\n  "
          + "\n  ".join(m for _, m in problems)
          + f"\nThey were moved to {os.path.join(self.directory, CORRUPT_SUBDIR)}. Delete"
          f" {self.directory} to start over from model.init_from.")
    return None

  def loop_state(self, step: int) -> dict:
    """The loop counters saved with ``step`` (``{}`` if none)."""
    if step not in self._manager.all_steps():
      return {}
    info = self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
    return dict((info or {}).get("loop", {}))

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of orbax's sight (kept for inspection) and forgets it."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    if jax.process_index() == 0:
      dest = os.path.join(self.directory, CORRUPT_SUBDIR, str(step))
      if os.path.exists(dest):
        shutil.rmtree(dest)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.replace(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}_done")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def tree_checksum(tree: Any) -> str:
  """One digest of a tree of arrays from the per-leaf checksums: exact and independent of the
  sharding (e.g. that a LoRA stage's frozen base is the same weights on resume)."""
  sums = checksums({"tree": _flat(tree)})["tree"]
  return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]


def save_weights(path: str, params: Any) -> None:
  """A tree of arrays written once to ``path`` (orbax; every process calls it), e.g. a LoRA
  stage's random base, which cannot be redrawn bit for bit on another mesh."""
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.abspath(path), _flat(params), force=True)
    saver.wait_until_finished()


def restore_weights(path: str, like: Any) -> Any:
  """``save_weights``' tree, placed by ``like``'s shardings (ShapeDtypeStructs)."""
  with ocp.StandardCheckpointer() as saver:
    return _unflat(like, saver.restore(os.path.abspath(path), _flat(abstract(like))))


def write_model_meta(directory: str, model_config: dict, tokenizer_dir: str,
                     lora: Mapping[str, Any] | None = None) -> None:
  """``model.json``; ``lora``: a LoRA stage's record (``models.lora_record``)."""
  meta = {"model_config": model_config, "tokenizer": os.path.abspath(tokenizer_dir)}
  if lora is not None:
    meta["lora"] = dict(lora)
  if jax.process_index() == 0:
    _write_json_atomic(os.path.join(directory, MODEL_META), meta)


def find_stage_checkpoint(path: str) -> str | None:
  """The checkpoint dir if ``path`` is a stage workdir or its checkpoint dir, else None."""
  for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
    if os.path.isfile(os.path.join(candidate, MODEL_META)):
      return candidate
  return None


def read_model_meta(directory: str) -> dict:
  path = os.path.join(directory, MODEL_META)
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); the file is damaged") from e


def restore_params(directory: str, abstract_params) -> Any:
  """The ``params`` of the newest good step of a stage checkpoint, placed by ``abstract_params``'
  shardings (verified against the step's checksums; a damaged step falls back to the previous
  one with a warning)."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    manager.close()
    raise FileNotFoundError(f"{directory}: has {MODEL_META} but no finished checkpoint step;"
                            " did that stage finish?")
  problems = []
  try:
    for step in steps:
      where = f"checkpoint step {step} in {os.path.abspath(directory)}"
      try:
        got = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_flat(abstract_params))))["params"]
        info = manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
        want = (info or {}).get("checksums", {}).get("params")
        if not isinstance(want, dict):
          raise CheckpointError(f"{where}: no checksums in its info item")
        have = checksums({"params": got})["params"]
        bad = sorted(k for k in have if want.get(k) != have[k])
        if bad:
          raise CheckpointError(f"{where}: params fail their checksum in {len(bad)} array(s), e.g."
                                f" {bad[:3]}; the files are damaged")
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors, summarized
        message = str(e) if isinstance(e, CheckpointError) else f"{where}: params unreadable: {_summary(e)}"
        log.warning("%s; trying the previous step", message)
        problems.append(message)
        continue
      if problems:
        log.warning("using params of step %d of %s (newer steps are damaged)", step, directory)
      log.info("restored params of step %d from %s", step, directory)
      return _unflat(abstract_params, got)
  finally:
    manager.close()
  raise CheckpointError(f"no usable params in {directory}:\n  " + "\n  ".join(problems))
