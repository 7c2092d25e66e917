"""AdamW with linear warmup, a decay schedule, global-norm clipping and a weight-decay mask.

Semantics follow PyTorch/HF ``AdamW`` + ``get_{cosine,linear,constant}_schedule_with_warmup`` so
hyperparameters carry over from TRL recipes: decoupled weight decay scaled by the learning rate,
bias-corrected moments, ``eps`` outside the square root, warmup from 0 at step 0.

Weight-decay mask: every parameter with 2 or more dimensions is decayed (projections AND the
token embedding / unembedding, as HF's Trainer does); 1-D parameters (norm scales, biases) are not,
since shrinking a norm scale toward 0 rescales activations rather than regularising.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int,
                  schedule: str = "cosine", min_lr_ratio: float = 0.0) -> optax.Schedule:
  """Learning rate at an (optimizer) step: warmup ``0 -> learning_rate`` over ``warmup_steps``,
  then ``cosine``/``linear`` decay to ``min_lr_ratio * learning_rate`` at ``total_steps`` (held
  after), or ``constant``. Usable in jit (``step`` may be traced) and for logging."""
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer schedule={schedule!r} is unknown; valid: {list(SCHEDULES)}")
  if not learning_rate > 0:
    raise ValueError(f"optimizer learning_rate={learning_rate} must be > 0")
  if not 0 < total_steps:
    raise ValueError(f"optimizer total_steps={total_steps} must be > 0")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"optimizer warmup_steps={warmup_steps} must be in [0, total_steps="
                     f"{total_steps}]")
  if not 0.0 <= min_lr_ratio <= 1.0:
    raise ValueError(f"optimizer min_lr_ratio={min_lr_ratio} must be in [0, 1]")
  if schedule == "constant" and min_lr_ratio != 0.0:
    raise ValueError(f"optimizer min_lr_ratio={min_lr_ratio} does not apply to schedule="
                     "'constant' (nothing decays); set it to 0")
  decay_steps = max(total_steps - warmup_steps, 1)

  def lr_at(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if schedule == "cosine":
      shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif schedule == "linear":
      shape = 1.0 - progress
    else:
      shape = jnp.ones_like(progress)
    after = min_lr_ratio + (1.0 - min_lr_ratio) * shape
    return learning_rate * jnp.where(step < warmup_steps, warmup, after)

  return lr_at


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: leaves with ``ndim >= 2`` (same tree as ``params``)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of every leaf together (fp32): the square root of the sum, over the leaves, of
  each leaf's dot product with itself over all its dims.

  Why not ``optax.tree.norm`` (the same value up to the order of the fp32 sums): XLA:CPU writes
  each leaf's squares out as a buffer and then sums it (a reduce-window tree), one more write and
  read of every gradient; the dot reads it once. SmolLM2-135M's norm + clip + AdamW, jitted as in
  the train step, with ``clip_by_global_norm`` taking the step's norm: 0.26 s against 0.33 s
  (benchmarks/README.md, session 43)."""

  def sum_of_squares(x):
    dims = tuple(range(jnp.ndim(x)))
    return jax.lax.dot_general(x, x, ((dims, dims), ((), ())),
                               preferred_element_type=jnp.float32)

  return jnp.sqrt(sum((sum_of_squares(x) for x in jax.tree.leaves(tree)), jnp.float32(0)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm``'s rule and (empty) state: updates unchanged when their global
  norm is below ``max_norm``, else scaled to it. The norm is ``global_norm``, or the one given as
  ``update(..., grad_norm=n)``: the train step computes it once for its metric and its non-finite
  check, so the update does not read every gradient again for it.

  The scale is one scalar, ``max_norm / norm`` (1 below ``max_norm``), times each update: optax
  computes ``(update / norm) * max_norm``, the same two roundings per element in another order.
  Why: its ``select`` between the kept and the scaled tree made XLA:CPU write the clipped
  gradients out before AdamW read them twice (its moments): SmolLM2-135M's clip + AdamW jitted
  with donation, 370 ms against 210 ms as a multiply (benchmarks/README.md, session 57)."""

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates) if grad_norm is None else grad_norm
    scale = jnp.where(norm < max_norm, jnp.float32(1), max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   schedule: str = "cosine", min_lr_ratio: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0
                   ) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping (skipped when ``max_grad_norm`` is 0 or None) then masked AdamW. Its
  ``update`` takes the gradients' global norm as ``grad_norm=`` when the caller has it
  (``clip_by_global_norm``); without it, it computes it.

  Works on any params pytree, including an ``nnx.State`` (``nnx.Optimizer(model, tx, wrt=...)``):
  the mask is computed from the tree it is given, so it always matches its structure.
  """
  lr = make_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps,
                     total_steps=total_steps, schedule=schedule, min_lr_ratio=min_lr_ratio)
  if weight_decay < 0:
    raise ValueError(f"optimizer weight_decay={weight_decay} must be >= 0")
  if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
    raise ValueError(f"optimizer b1={b1}, b2={b2} must be in [0, 1)")
  if not eps > 0:
    raise ValueError(f"optimizer eps={eps} must be > 0")
  if max_grad_norm is not None and max_grad_norm < 0:
    raise ValueError(
        f"optimizer max_grad_norm={max_grad_norm} must be >= 0 (0 or None: no clipping)")
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  if not max_grad_norm:
    return optax.with_extra_args_support(adamw)  # takes (and ignores) grad_norm= too
  return optax.chain(clip_by_global_norm(max_grad_norm), adamw)
