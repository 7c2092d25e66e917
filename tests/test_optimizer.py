"""optimizer.py against a NumPy AdamW written from the PyTorch/HF definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import error_model as em
from saro_jax import optimizer

# One fp32 evaluation of the schedule: ~10 roundings + cos, relative to the peak lr.
SCHEDULE_ERR = em.gamma(10 + em.ELEMENTWISE_ULPS)


def np_lr(step, lr, warmup, total, schedule, min_ratio):
  """HF get_*_schedule_with_warmup, with a floor of min_ratio * lr."""
  if step < warmup:
    return lr * step / warmup
  progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
  shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
           "constant": 1.0}[schedule]
  return lr * (min_ratio + (1 - min_ratio) * shape)


@pytest.mark.parametrize("schedule,min_ratio", [("cosine", 0.1), ("cosine", 0.0), ("linear", 0.2),
                                                ("constant", 0.0)])
def test_schedule_values_at_key_steps(schedule, min_ratio):
  lr_at = optimizer.make_schedule(learning_rate=3e-4, warmup_steps=10, total_steps=110,
                                  schedule=schedule, min_lr_ratio=min_ratio)
  steps = [0, 1, 5, 10, 35, 60, 85, 109, 110, 500]
  got = [float(lr_at(s)) for s in steps]
  want = [np_lr(s, 3e-4, 10, 110, schedule, min_ratio) for s in steps]
  # fp32 schedule vs float64: ~10 roundings (divisions, pi * p, 0.5 (1 + cos), the floor mix, the
  # lr product) plus cos itself (ELEMENTWISE_ULPS), each <= u relative to a value <= 1 in the
  # shape, hence absolute in units of the peak lr (near pi, 1 + cos cancels: relative is no use).
  np.testing.assert_allclose(got, want, rtol=0, atol=SCHEDULE_ERR * 3e-4)
  assert got[0] == 0.0 and got[3] == pytest.approx(3e-4)  # warmup starts at 0, peaks at step 10
  if schedule != "constant":
    assert got[5] == pytest.approx(3e-4 * (min_ratio + (1 - min_ratio) * 0.5))  # half-way
    assert got[-1] == pytest.approx(3e-4 * min_ratio, rel=1e-6, abs=1e-12)  # held at the floor
  # jit-able with a traced step, as the train step logs it
  assert float(jax.jit(lr_at)(jnp.int32(35))) == pytest.approx(got[4], rel=1e-6)


def test_cosine_schedule_agrees_with_optax():
  ours = optimizer.make_schedule(learning_rate=1e-3, warmup_steps=7, total_steps=50,
                                 schedule="cosine", min_lr_ratio=0.05)
  theirs = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 7, 50, end_value=5e-5)
  # Two fp32 programs of the schedule: twice one program's error (see above).
  np.testing.assert_allclose([ours(s) for s in range(60)], [theirs(s) for s in range(60)],
                             rtol=0, atol=2 * SCHEDULE_ERR * 1e-3)


def test_no_warmup_starts_at_peak():
  lr_at = optimizer.make_schedule(learning_rate=1.0, warmup_steps=0, total_steps=4,
                                  schedule="linear")
  # Exact binary fractions, computed exactly in fp32: equal to the default 1e-7.
  np.testing.assert_allclose([lr_at(s) for s in range(5)], [1.0, 0.75, 0.5, 0.25, 0.0])


class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 6, rngs=rngs)
    self.norm = nnx.RMSNorm(6, rngs=rngs)
    self.proj = nnx.Linear(6, 4, use_bias=True, rngs=rngs)


def test_weight_decay_skips_norms_and_biases_on_an_nnx_model():
  model = Tiny(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = optimizer.decay_mask(params)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): bool(v)
          for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat == {"embed/embedding/value": True, "norm/scale/value": False,
                  "proj/bias/value": False, "proj/kernel/value": True}

  before = jax.tree.map(np.asarray, params)
  tx = optimizer.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10,
                                weight_decay=0.5, max_grad_norm=1.0)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  update = nnx.jit(lambda opt, model, grads: opt.update(model, grads))
  update(opt, model, jax.tree.map(jnp.zeros_like, params))  # zero grads: only decay moves weights
  after = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path
  for (path, old), (_, new) in zip(leaves(before), leaves(after)):
    factor = 1 - 0.1 * 0.5 if old.ndim >= 2 else 1.0  # decoupled decay: p -= lr * wd * p
    # wd * p, times lr, p + update, and the fp32 constants 0.1, 0.5, 0.95: <= 8 roundings.
    np.testing.assert_allclose(new, old * factor, rtol=em.gamma(8), err_msg=str(path))


def np_adamw(params, grads_seq, *, lrs, b1, b2, eps, wd, max_norm, sqrt_v_hats=None):
  """PyTorch AdamW (decoupled decay, bias correction) after global-norm clipping. Appends each
  step's {name: sqrt(v_hat)} to ``sqrt_v_hats`` when given (for the error model)."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    scale = min(1.0, max_norm / norm) if max_norm else 1.0
    if sqrt_v_hats is not None:
      sqrt_v_hats.append({})
    for k in params:
      g = grads[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if sqrt_v_hats is not None:
        sqrt_v_hats[-1][k] = np.sqrt(v[k] / (1 - b2 ** t))
      decay = wd * params[k] if params[k].ndim >= 2 else 0.0
      params[k] = params[k] - lr * (step + decay)
  return params


@pytest.mark.parametrize("max_norm", [1.0, None, 0.0])
def test_adamw_steps_match_numpy_including_clipping(max_norm):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  # Norms ~20, ~0.2, ~5: clipping changes the moments' relative scales, hence the updates.
  grads_seq = [{k: (rng.normal(size=p.shape) * s).astype(np.float32) for k, p in params.items()}
               for s in (5.0, 0.05, 1.2)]
  kw = dict(learning_rate=1e-2, warmup_steps=1, total_steps=4, schedule="linear",
            min_lr_ratio=0.0, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6)
  tx = optimizer.make_optimizer(**kw, max_grad_norm=max_norm)
  state = tx.init(params)
  got = params
  update = jax.jit(tx.update)
  for grads in grads_seq:
    updates, state = update(grads, state, got)
    got = optax.apply_updates(got, updates)
  lrs = [np_lr(s, 1e-2, 1, 4, "linear", 0.0) for s in range(3)]  # optax counts from step 0
  sqrt_v_hats = []
  want = np_adamw(params, grads_seq, lrs=lrs, b1=0.8, b2=0.95, eps=1e-6, wd=0.1, max_norm=max_norm,
                  sqrt_v_hats=sqrt_v_hats)
  # Error model (tests/error_model.py, adam_param_bound): one fp32 program vs float64. The clipped
  # gradient carries the global norm's 18-term sum and ~ELEMENTWISE_ULPS of elementwise ops; Adam
  # divides that by each element's RMS gradient; decay and the parameter update add a few
  # roundings of |p| per step.
  grad_rel_err = em.gamma(18 + em.ELEMENTWISE_ULPS)
  bound = {k: em.adam_param_bound([s[k] for s in sqrt_v_hats], lr=max(lrs),
                                  grad_rel_err=grad_rel_err, eps=1e-6)
           + len(lrs) * em.gamma(4) * np.abs(want[k]) for k in params}
  for k in params:
    excess = np.abs(got[k] - want[k]) / bound[k]
    print(f"{k}: max|d| {np.abs(got[k] - want[k]).max():.1e}, worst |d|/bound {excess.max():.2e}")
    assert excess.max() <= 1.0, k
  other = np_adamw(params, grads_seq, lrs=lrs, b1=0.8, b2=0.95, eps=1e-6, wd=0.1,
                   max_norm=None if max_norm else 1.0)  # 0 and None both disable clipping
  # Clipping is observable: toggling it moves the result >= 10x beyond the bound.
  assert max((np.abs(other[k] - want[k]) / bound[k]).max() for k in params) >= 10


def test_clipping_scales_to_exactly_max_norm():
  # With eps >> |g|, Adam's first step is -lr * g / eps: the update reveals the clipped gradient.
  eps = 1e4
  tx = optimizer.make_optimizer(learning_rate=1.0, warmup_steps=0, total_steps=1,
                                schedule="constant", eps=eps, max_grad_norm=2.0)
  params = {"a": jnp.zeros((4,)), "w": jnp.zeros((2, 2))}
  big = {"a": jnp.full((4,), 3.0), "w": jnp.zeros((2, 2))}  # norm 6: clipped to 2
  small = {"a": jnp.full((4,), 0.25), "w": jnp.full((2, 2), 0.25)}  # norm 0.71: untouched
  for grads, want_norm in ((big, 2.0), (small, 0.5 * 2**0.5)):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) * eps == pytest.approx(want_norm, rel=1e-3)


def test_bad_settings_fail_with_the_field_name():
  base = dict(learning_rate=1e-3, warmup_steps=1, total_steps=10)
  valid = r"schedule='step' is unknown; valid: \['cosine', 'linear', 'constant'\]"
  with pytest.raises(ValueError, match=valid):
    optimizer.make_optimizer(**base, schedule="step")
  with pytest.raises(ValueError, match="warmup_steps=11"):
    optimizer.make_optimizer(**{**base, "warmup_steps": 11})
  with pytest.raises(ValueError, match="min_lr_ratio=0.1 does not apply"):
    optimizer.make_optimizer(**base, schedule="constant", min_lr_ratio=0.1)
  with pytest.raises(ValueError, match="max_grad_norm=-1"):
    optimizer.make_optimizer(**base, max_grad_norm=-1)
  with pytest.raises(ValueError, match="weight_decay=-1"):
    optimizer.make_optimizer(**base, weight_decay=-1)
  with pytest.raises(ValueError, match="learning_rate=0"):
    optimizer.make_optimizer(**{**base, "learning_rate": 0})


def test_global_norm_matches_float64_and_a_dropped_leaf_breaks_it():
  rng = np.random.default_rng(3)
  tree = {"w": (rng.normal(size=(37, 29)) * 3).astype(np.float32),
          "b": (rng.normal(size=(29,)) * 3).astype(np.float32),
          "e": np.zeros((0, 4), np.float32), "s": np.float32(2.0),
          "t": (rng.normal(size=(3, 4, 5)) * 0.5).astype(np.float32)}
  n = sum(np.size(x) for x in tree.values())
  want = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in tree.values()))
  got = float(jax.jit(optimizer.global_norm)(tree))
  # Error model: n non-negative fp32 squares (one rounding each) summed in any order, then one
  # sqrt: relative error <= gamma(n + 1) / 2 + u for the norm; gamma(n + 2) covers both.
  bound = em.gamma(n + 2) * want
  print(f"norm {got} vs float64 {want}: |d| {abs(got - want):.2e}, bound {bound:.2e}")
  assert abs(got - want) <= bound
  assert got == pytest.approx(float(optax.tree.norm(tree)), rel=em.gamma(2 * n + 4))
  # A norm that misses a leaf (the bias's 29 of 1152 terms) leaves the bound >= 10x.
  dropped = float(optimizer.global_norm({k: v for k, v in tree.items() if k != "b"}))
  assert abs(dropped - want) >= 10 * bound


def test_clipping_takes_the_norm_it_is_given():
  """The train step hands its gradient norm to the clipping (``grad_norm=``), so the update does
  not compute it again; given or computed, the rule is optax's."""
  rng = np.random.default_rng(4)
  grads = {"w": jnp.asarray(rng.normal(size=(6, 5)) * 2, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  clip = optimizer.clip_by_global_norm(1.5)
  state = clip.init(grads)
  assert jax.tree.structure(state) == jax.tree.structure(optax.clip_by_global_norm(1.5).init(grads))
  own, _ = clip.update(grads, state)
  theirs, _ = optax.clip_by_global_norm(1.5).update(grads, optax.EmptyState())
  norm = optimizer.global_norm(grads)
  given, _ = clip.update(grads, state, grad_norm=norm)
  # optax's rule on norms that agree to the sums' rounding (<= 35 terms), then one divide and one
  # multiply on each side (ours t * (max / norm), optax's (t / norm) * max): relative
  # gamma(35 + 3) per element.
  for k in grads:
    np.testing.assert_array_equal(given[k], own[k])
    np.testing.assert_allclose(own[k], theirs[k], rtol=em.gamma(38), atol=0)
  # The given norm is the one used: twice the norm halves the clipped update. Each side is one
  # divide and one multiply on the same values (scaling by 2 is exact in fp32): gamma(4) covers
  # both sides' roundings.
  doubled, _ = clip.update(grads, state, grad_norm=2 * norm)
  for k in grads:
    np.testing.assert_allclose(doubled[k], 0.5 * np.asarray(own[k]), rtol=em.gamma(4), atol=0)
  # Below max_norm nothing changes, whatever the norm was computed from.
  small, _ = clip.update(grads, state, grad_norm=jnp.float32(1.0))
  for k in grads:
    np.testing.assert_array_equal(small[k], grads[k])
  # make_optimizer's chain forwards it; a plain optax transformation ignores it.
  tx = optimizer.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=2,
                                schedule="constant", max_grad_norm=1.5)
  a, _ = tx.update(grads, tx.init(grads), grads, grad_norm=norm)
  b, _ = tx.update(grads, tx.init(grads), grads)
  for k in grads:
    np.testing.assert_array_equal(a[k], b[k])
  plain = optimizer.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=2,
                                   schedule="constant", max_grad_norm=None)
  d, _ = plain.update(grads, plain.init(grads), grads, grad_norm=norm)  # no clipping to take it
  e, _ = plain.update(grads, plain.init(grads), grads)
  for k in grads:
    np.testing.assert_array_equal(d[k], e[k])
  sgd = optax.with_extra_args_support(optax.sgd(0.1))
  c, _ = sgd.update(grads, sgd.init(grads), grads, grad_norm=norm)
  np.testing.assert_allclose(c["w"], -0.1 * np.asarray(grads["w"]), rtol=em.gamma(1))
