"""The DPO reference model in its three modes (its forward is ``logps.pair_logps``, the policy's).

  live         a frozen, sharded copy of the reference weights; one forward per step (no grads)
  precomputed  one pass over the pairs before training writes per-example reference log-probs to
               ``<workdir>/reference_logps/<hash>.process_<i>.npz``; the hash covers the data
               config, the tokenizer and a fingerprint of the reference weights, so a later run with
               the same inputs reuses the file
  none         reference-free DPO (reference log-probs = 0)

Either way the reference enters the step as two batch entries, ``ref_chosen_logps`` and
``ref_rejected_logps`` [B], so the SRPO step is the same function in every mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from saro_jax import host_memory, logps, sharding, train, xla_options
from saro_jax.config import StageConfig

log = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def make_reference_fn(graphdef: nnx.GraphDef, *, vocab_size: int, chunk_size: int,
                      micro_batches: int, mesh: Mesh, trees: int | None = None):
  """Jitted ``(ref_params, batch) -> (ref_chosen_logps, ref_rejected_logps)``, micro-batched
  like the step so the reference forward never needs more memory than the policy's.
  ``trees`` (prefix-shared batches): outputs are [rows, trees], like the batch's tree slots."""

  def one(params, batch):
    out = logps.pair_logps(train.merge_model(graphdef, params), batch, vocab_size=vocab_size,
                           chunk_size=chunk_size)
    if trees is None:
      return out["chosen_logps"], out["rejected_logps"]
    return out["chosen_logps"].reshape(-1, trees), out["rejected_logps"].reshape(-1, trees)

  def ref_fn(params, batch):
    params = jax.lax.stop_gradient(params)
    if micro_batches == 1:
      return one(params, batch)
    micro = train.micro_batches(batch, micro_batches, mesh)
    # The params ride in the loop carry, not the closure: a model merged inside the loop body
    # from closed-over params breaks nnx.remat ("Cannot mutate Param from a different trace
    # level"), i.e. every remat'ed model with grad_accum > 1 (the 7-8B presets).
    _, (chosen_AxB, rejected_AxB) = jax.lax.scan(lambda p, mb: (p, one(p, mb)), params, micro)
    # Undo the interleaving of train.micro_batches: row r sits at [r % A, r // A].
    unsplit = lambda x_AxB: x_AxB.swapaxes(0, 1).reshape((-1,) + x_AxB.shape[2:])
    return unsplit(chosen_AxB), unsplit(rejected_AxB)

  out_sh = sharding.batch_sharding(mesh, 1 if trees is None else 2)
  return jax.jit(ref_fn, out_shardings=(out_sh, out_sh),
                 compiler_options=xla_options.step_options(mesh))


@jax.jit
def _leaf_stats(params):
  """Every leaf's sum and sum of squares, as ONE program.

  Why one program: computed eagerly, each leaf's sums were separate small programs dispatched
  asynchronously, each with its own all-reduce over the weights' devices. On XLA:CPU's virtual
  devices, many such programs in flight at once can deadlock: one device never reaches a
  rendezvous the others wait at, and XLA aborts the process when its collective timeout runs
  out (reproduced: 7 of 8 participants waiting, under CPU load, within a minute of eager calls;
  the suite's lost workers of sessions 44 and 53 died in an eager sum over sharded weights,
  session 53's in this one).
  ``test_weights_fingerprint_is_one_program_that_survives_a_loaded_machine``.
  """
  return jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                           jnp.sum(jnp.square(x.astype(jnp.float32)))]), params)


def fingerprint(params) -> str:
  """A cheap content hash of weights: per-leaf sum and sum of squares (float64 on host)."""
  values = np.concatenate([np.asarray(v, np.float64).ravel()
                           for v in jax.tree.leaves(jax.device_get(_leaf_stats(params)))])
  shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
  return hashlib.sha256(repr((np.round(values, 6).tolist(), shapes)).encode()).hexdigest()[:16]


def cache_key(cfg: StageConfig, tokenizer, params) -> str:
  data = {"sources": cfg.data.sources, "max_length": cfg.data.max_length, "pack": cfg.data.pack,
          "truncation": cfg.data.truncation, "tags": list(cfg.data.reasoning_tags),
          # what tokenization keeps of a pair (its log-probs change with them)
          "cut": [cfg.data.max_prompt_length, cfg.data.response_truncation,
                  cfg.data.min_response_tokens],
          "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
          "weights": fingerprint(params), "process_count": jax.process_count()}
  if cfg.dpo is not None and cfg.dpo.prefix_sharing:  # trees may be cut differently
    data["layout"] = ["prefix", cfg.dpo.pairs_per_row]
    if cfg.dpo.share_prompts:  # processes then share prompts, not records: other shards
      data["layout"].append("share_prompts")
  return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def precompute(ref_fn: Callable, ref_params, batches: Iterable[Mapping[str, np.ndarray]],
               mesh: Mesh, path: str, keys: tuple[str, ...] = logps.PAIR_KEYS
               ) -> dict[int, tuple[float, float]]:
  """One pass over ``batches`` (one epoch, this process's shard): example_id -> (chosen, rejected)."""
  if os.path.exists(path):
    data = np.load(path)
    log.info("reference log-probs: reusing %s (%d examples)", path, len(data["example_id"]))
    return dict(zip(data["example_id"].tolist(),
                    zip(data["chosen"].tolist(), data["rejected"].tolist())))
  table: dict[int, tuple[float, float]] = {}
  for host in batches:
    device = train.put_batch({k: host[k] for k in keys}, mesh)
    chosen, rejected = ref_fn(ref_params, device)
    chosen = _local_rows(chosen).reshape(-1)
    rejected = _local_rows(rejected).reshape(-1)
    ids = np.asarray(host["example_id"]).reshape(-1)
    # Padding rows of a last batch (and empty tree slots) have example_id -1.
    for i in np.flatnonzero(ids >= 0).tolist():
      table[int(ids[i])] = (float(chosen[i]), float(rejected[i]))
    host_memory.release_if_grown()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ids = np.asarray(list(table), np.int64)
  np.savez(path + ".tmp.npz", example_id=ids, chosen=np.asarray([table[i][0] for i in ids.tolist()]),
           rejected=np.asarray([table[i][1] for i in ids.tolist()]))
  os.replace(path + ".tmp.npz", path)
  log.info("reference log-probs: wrote %s (%d examples)", path, len(table))
  return table


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def lookup(table: Mapping[int, tuple[float, float]], example_ids: np.ndarray) -> dict[str, np.ndarray]:
  """Reference log-probs for ``example_ids`` (any shape; -1 = padding pair, gets 0.0)."""
  ids = np.asarray(example_ids).reshape(-1)
  missing = [int(i) for i in ids if i >= 0 and int(i) not in table]
  if missing:
    raise KeyError(f"precomputed reference log-probs lack example ids {missing[:5]}; delete the"
                   " reference_logps dir of this workdir to recompute it")
  pairs = np.asarray([table[int(i)] if i >= 0 else (0.0, 0.0) for i in ids],
                     np.float32).reshape(-1, 2)
  shape = np.shape(example_ids)
  return {"ref_chosen_logps": pairs[:, 0].reshape(shape),
          "ref_rejected_logps": pairs[:, 1].reshape(shape)}
