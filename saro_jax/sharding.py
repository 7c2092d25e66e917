"""Sharding declared once: logical axis names -> mesh axes.

Weights and activations carry *logical* axis names (``embed``, ``mlp``, ``heads`` ...). A single
rules table maps them onto the mesh axes ``data``, ``fsdp`` and ``tensor``; changing how a model
is sharded means changing the table, never the model code.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# Weights: fully sharded over fsdp on their embed dim, tensor-parallel over heads / mlp / vocab.
# Activations: the batch over data x fsdp, features over tensor where the weights put them.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    ("norm", None),
    ("layers", None),  # the leading axis of scanned (stacked) layer weights and caches
)

LogicalNames = Sequence[str | None]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh. ``-1`` in one axis takes all remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
          f"mesh: {len(devices)} devices are not divisible by the fixed axes (product {known});"
          " change config.mesh.data/fsdp/tensor")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f"mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = {int(np.prod(shape))} but"
        f" {len(devices)} devices are present; set config.mesh so the product equals the device"
        " count (or use -1 for one axis)")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: tuple = DEFAULT_RULES


_ctx = _Context()


@contextlib.contextmanager
def use(mesh: Mesh | None, rules=DEFAULT_RULES) -> Iterator[None]:
  """Within this context, ``constrain`` places activations on ``mesh`` by ``rules``."""
  old = (_ctx.mesh, _ctx.rules)
  _ctx.mesh, _ctx.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _ctx.mesh, _ctx.rules = old


def current_mesh() -> Mesh | None:
  return _ctx.mesh


def logical_to_spec(names: LogicalNames | None, rules=None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec; a mesh axis is used at most once per spec."""
  if names is None:
    return PartitionSpec()
  table = dict(_ctx.rules if rules is None else rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names: LogicalNames | None, rules=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules))


def fit(spec_sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """Replicates each dim its mesh axes do not divide (e.g. 9 heads on tensor=2) instead of failing."""
  mesh = spec_sharding.mesh
  spec = list(spec_sharding.spec) + [None] * (len(shape) - len(spec_sharding.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    if shape[i] % int(np.prod([mesh.shape[a] for a in names])):
      spec[i] = None
  return NamedSharding(mesh, PartitionSpec(*spec))


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Sharding constraint on an activation; identity when no mesh is in use."""
  mesh = _ctx.mesh
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, fit(named_sharding(mesh, names), x.shape))


def state_shardings(state: nnx.State | object, mesh: Mesh, rules=None):
  """NamedShardings for every leaf of an (abstract) nnx state, from its logical-name metadata,
  fitted to each leaf's shape."""

  def leaf_sharding(leaf):
    names = None
    if isinstance(leaf, nnx.Variable):
      meta = leaf.get_metadata()
      # flax >= 0.12 stores the names as ``out_sharding``; older releases as ``sharding``.
      for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
          names = meta[key]
          break
    return fit(named_sharding(mesh, names, rules), np.shape(leaf))

  return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_blocks(rows: int) -> int:
  """How many blocks ``constrain`` splits a batch axis of ``rows`` into under the mesh in use
  (its data x fsdp devices; 1 without a mesh, or when they do not divide ``rows``): each block's
  rows are one device's, contiguous along the axis."""
  mesh = _ctx.mesh
  if mesh is None:
    return 1
  # ``constrain``'s own placement (``fit``), so the two cannot disagree.
  placed = fit(named_sharding(mesh, ("batch",)), (rows,))
  return rows // placed.shard_shape((rows,))[0]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batches are sharded over data x fsdp on their leading axis."""
  return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


# Weights are created unsharded (or abstractly under eval_shape) and placed by ``state_shardings``;
# flax's eager sharding would instead demand a mesh at every variable's creation.
nnx.use_eager_sharding(False)
