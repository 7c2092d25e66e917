"""Orbax checkpoints of a training stage, resume, and the hand-off between stages.

A stage's checkpoint directory holds orbax steps (items ``params``, ``opt_state``, ``meta``),
``model.json`` (the ModelConfig and the tokenizer dir, so a later stage can start from it) and
``data_state/`` (each process's data-iterator state per step, JSON: every process reads a
different shard, so each keeps its own file).

Pytrees are stored as flat ``{path: array}`` dicts: any structure (nnx.State, optax namedtuples)
round-trips, and restoring only ``params`` needs nothing but the model's abstract params.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

MODEL_META = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"


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


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the last ``keep``, async if asked."""

  def __init__(self, directory: str, *, every: int = 0, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: Any = None) -> None:
    """``state``: a train.TrainState; ``data_state``: this process's iterator state (JSON-able)."""
    if data_state is not None:
      path = os.path.join(self.directory, "data_state", f"{step}.process_{jax.process_index()}.json")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(data_state, f)
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(_flat(state.params)),
        opt_state=ocp.args.StandardSave(_flat(state.opt_state)),
        meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng})), force=True)

  def restore(self, step: int, like) -> tuple[Any, Any]:
    """Restores into the structure and shardings of ``like`` (a TrainState of arrays or
    ShapeDtypeStructs); returns ``(state, data_state or None)``."""
    target = abstract(like)
    got = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_flat(target.params)),
        opt_state=ocp.args.StandardRestore(_flat(target.opt_state)),
        meta=ocp.args.StandardRestore({"step": target.step, "rng": target.rng})))
    state = like.replace(params=_unflat(target.params, got["params"]),
                         opt_state=_unflat(target.opt_state, got["opt_state"]),
                         step=got["meta"]["step"], rng=got["meta"]["rng"])
    path = os.path.join(self.directory, "data_state", f"{step}.process_{jax.process_index()}.json")
    data_state = None
    if os.path.exists(path):
      with open(path) as f:
        data_state = json.load(f)
    return state, data_state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def write_model_meta(directory: str, model_config: dict, tokenizer_dir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_META), "w") as f:
      json.dump({"model_config": model_config, "tokenizer": os.path.abspath(tokenizer_dir)}, f,
                indent=2)


def find_stage_checkpoint(path: str) -> str | None:
  """The checkpoint dir if ``path`` is a stage workdir or its checkpoint dir, else None."""
  for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
    if os.path.isfile(os.path.join(candidate, MODEL_META)):
      return candidate
  return None


def read_model_meta(directory: str) -> dict:
  with open(os.path.join(directory, MODEL_META)) as f:
    return json.load(f)


def restore_params(directory: str, abstract_params) -> Any:
  """The latest ``params`` of a stage checkpoint, placed by ``abstract_params``' shardings."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("params", "opt_state", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: has {MODEL_META} but no finished checkpoint step;"
                            " did that stage finish?")
  got = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_flat(abstract_params))))
  manager.close()
  log.info("restored params of step %d from %s", step, directory)
  return _unflat(abstract_params, got["params"])
