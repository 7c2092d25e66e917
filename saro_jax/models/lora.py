"""LoRA: low-rank adapters on chosen projections, trained while the base weights stay frozen.

An adapter on weight W (in dims I, out dims O, flattened: W is [I, O]) adds ``(alpha / rank) * A @ B``
with A [I, rank] (small random) and B [rank, O] (zeros), so a fresh adapter leaves the model
exactly as it was. Adapters are a plain pytree ``{param path: {"a": A, "b": B}}``, separate from the
model's params:

- the train state holds only the adapters: optimizer moments and checkpoints are adapter-sized;
- the base params are passed to the step as a frozen argument, never differentiated;
- the DPO reference is the base params themselves (adapters off): no second copy of the weights;
- export merges ``W + (alpha / rank) A @ B`` into a plain model (``merged_params``).

The adapted forward applies the adapters to the weights (``adapted_params``: W' = W + s A B per
step, cost I*rank*O per weight, negligible next to a batch's tokens) and runs the unchanged model,
so every model path (chunked log-probs, cache decode, sharding) serves adapted models as is. The
backward still forms dL/dW' for the adapted weights (the weight-gradient matmuls of full
fine-tuning) but keeps no gradient or Adam state for any base weight.

What a training stage calls (see BUILD.md "LoRA"):
  adapters = lora.init_adapters(base_params, cfg, seed)         # trainable pytree
  state = train.init_state(adapters, optimizer, seed)           # adapter-only opt state/ckpts
  loss(adapters, batch, n, base) = stage_loss(lora.adapted_params(base, adapters, cfg), batch, n)
  grads w.r.t. adapters only; base passed as a (donated-free) jit argument
  reference log-probs: stage_loss's model on ``base`` (adapters off)
  export: hf.export_hf(nnx.merge(graphdef, lora.merged_params(base, adapters, cfg)), ...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Target name -> (module attribute path inside a Block, weight name, number of leading INPUT axes).
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "wq_DxNxH", 1),
    "k": ("attn", "wk_DxKxH", 1),
    "v": ("attn", "wv_DxKxH", 1),
    "o": ("attn", "wo_NxHxD", 2),
    "gate": ("mlp", "w_gate_DxF", 1),
    "up": ("mlp", "w_up_DxF", 1),
    "down": ("mlp", "w_down_FxD", 1),
}

Adapters = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 = LoRA off (full fine-tuning). ``targets``: names from ``TARGETS``."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    self.validate()

  def validate(self, where: str = "lora") -> None:
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f"config.{where}.rank={self.rank!r} must be an integer >= 0 (0 = off)")
    if not self.alpha > 0:
      raise ValueError(f"config.{where}.alpha={self.alpha!r} must be > 0")
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown or (self.rank and not self.targets):
      raise ValueError(f"config.{where}.targets={list(self.targets)}: unknown {unknown}; choose"
                       f" one or more of {list(TARGETS)}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _key(path) -> str:
  return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _targets(params: nnx.State, cfg: LoraConfig) -> dict[str, tuple[tuple, int, int]]:
  """{adapter key: (param path, input axes, leading layer axes)} for every targeted weight.

  A scanned model (``scan_layers``) holds each target once, stacked [Y, ...] under ``layers.<rest>``
  (no layer index in the path): its adapter is stacked too, A [Y, I, rank] and B [Y, rank, O],
  slice i adapting layer i exactly as the unscanned layer i's adapter would."""
  wanted = {(TARGETS[t][0], TARGETS[t][1]): TARGETS[t][2] for t in cfg.targets}
  found = {}
  for path, _ in nnx.to_flat_state(params):
    names = tuple(str(p) for p in path)
    if len(names) >= 2 and names[-2:] in wanted:
      stacked = names[0] == "layers" and not names[1].isdigit()
      found[".".join(names)] = (path, wanted[names[-2:]], int(stacked))
  if not found:
    raise ValueError(f"lora.targets={list(cfg.targets)} match no weight of the model")
  return found


def init_adapters(params: nnx.State, cfg: LoraConfig, seed: int) -> Adapters:
  """A ~ N(0, 1/I) (Kaiming-like fan-in scale), B = 0: the adapted model starts as the base.

  Adapters are replicated on the base weight's mesh (they are tiny)."""
  flat = dict(nnx.to_flat_state(params))
  out: Adapters = {}
  root = jax.random.key(seed)
  for n, (key, (path, n_in, n_lead)) in enumerate(sorted(_targets(params, cfg).items())):
    w = flat[path][...]
    lead = w.shape[:n_lead]
    fan_in = math.prod(w.shape[n_lead:n_lead + n_in])
    fan_out = math.prod(w.shape[n_lead + n_in:])
    a = jax.random.normal(jax.random.fold_in(root, n), lead + (fan_in, cfg.rank), jnp.float32)
    a = (a / math.sqrt(fan_in)).astype(w.dtype)
    b = jnp.zeros(lead + (cfg.rank, fan_out), w.dtype)
    # Traced (jax.eval_shape: saro_jax.plan's abstract adapters) -> no sharding to read; the
    # caller places them replicated.
    mesh = getattr(getattr(w, "sharding", None), "mesh", None)
    if mesh is not None and not getattr(mesh, "empty", False) and len(mesh.devices.flat) > 1:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      a, b = jax.device_put(a, replicated), jax.device_put(b, replicated)
    out[key] = {"a": a, "b": b}
  return out


def _delta(adapter: Mapping[str, jax.Array], shape, dtype, scale: float) -> jax.Array:
  a, b = adapter["a"], adapter["b"]  # [..., I, rank] and [..., rank, O]; "..." = stacked layers
  product = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  return (scale * product).astype(dtype).reshape(shape)


def adapted_params(params: nnx.State, adapters: Adapters, cfg: LoraConfig) -> nnx.State:
  """Params with W + (alpha / rank) A @ B on every adapted weight (same tree as ``params``).

  With B = 0 the product is exactly 0 and W + 0 == W bit for bit: zero-initialised adapters give
  the base model's logits exactly."""
  targets = _targets(params, cfg)
  missing = sorted(set(targets) - set(adapters))
  extra = sorted(set(adapters) - set(targets))
  if missing or extra:
    raise ValueError(f"lora adapters do not fit the model and config: missing {missing[:3]},"
                     f" unexpected {extra[:3]} (rank/targets changed since they were made?)")
  by_path = {path: key for key, (path, _, _) in targets.items()}
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path in by_path:
      w = var[...]
      var = var.replace(w + _delta(adapters[by_path[path]], w.shape, w.dtype, cfg.scale))
    flat.append((path, var))
  return nnx.from_flat_state(flat)


# Export: the merged weights are the adapted weights, computed once.
merged_params = adapted_params


def count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
