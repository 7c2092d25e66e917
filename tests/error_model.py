"""The fp32 error model every parity / equivalence tolerance in tests/ is derived from.

Two programs that compute the same function in fp32 differ only by rounding: another CPU
(vector width, FMA contraction, threading split), XLA's sharded program (partial sums per device,
then an all-reduce) or PyTorch's kernels each add the same terms in another order. Nothing here
is fitted to a measurement; every number follows from the shapes.

1. One reduction. A sum or dot product of n terms evaluated in ANY order has
   |error| <= gamma(n) * sum|terms|, gamma(n) = n u / (1 - n u), u = 2^-24 (fp32 unit roundoff;
   Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.4-3.5). This is the worst case
   (every rounding the same sign), so it holds for whichever order a machine picks; the
   random-walk estimate sqrt(n) u is what one typically sees.
2. A chain of reductions. A transformer logit is a composition: norm -> projection -> scores ->
   softmax -> weighted sum -> projection -> MLP, per layer, then the unembedding. To first order the
   relative errors of the stages add, so the depth of a computation is the SUM of the reduction
   lengths along its path (`transformer_depth`), and one program's relative error is at most
   gamma(depth). RMS norms re-scale the residual stream every layer, so errors stay relative to
   the scale of the values, and the scale we compare against is the largest |value| of the
   reference (e.g. max |logit|; SmolLM2's reach ~40, so an absolute 1e-4 means nothing).
3. Two programs. Each is within gamma(depth) * scale of the exact result, so they are within
   2 * gamma(depth) * scale of each other (`max_bound`). The mean |difference| over many outputs is
   a typical error, bounded by the random-walk estimate with the same scale (`mean_bound`).

Why this safety factor: the worst-case linear gamma(depth) is sqrt(depth) times the random-walk
size (sqrt(depth) ~ 30-370 here). That factor, not a multiplier picked after measuring, is what
absorbs the first-order model's neglected terms (layer-to-layer amplification of O(1) through the
normed residual stream, sum|terms| exceeding |result| by a small factor). The bug cases the tests
plant exceed these bounds by >= 10x, so the bounds are loose where it costs nothing and tight
where a real bug lives.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

U = 2.0 ** -24  # fp32 unit roundoff (round to nearest)
ELEMENTWISE_ULPS = 16  # exp/log/rsqrt/silu/sin/cos on a layer's path: a few ulp each, per library


def gamma(n: int) -> float:
  """Worst-case relative error of an n-term fp32 sum or dot product, in any order."""
  if n * U >= 1:
    raise ValueError(f"gamma({n}) undefined: n * u >= 1")
  return n * U / (1 - n * U)


def transformer_depth(*, layers: int, hidden: int, intermediate: int, num_heads: int,
                      head_dim: int, seq_len: int, qk_norm: bool = False) -> int:
  """Sum of reduction lengths on the path to one logit (see the module docstring, point 2).

  Per layer: attention RMS norm (mean of D squares; the rsqrt halves its relative error: D/2),
  q/k/v projections (D), q.k scores (head_dim), RoPE angle pos * inv_freq (relative error u times
  pos: seq_len), softmax denominator (seq_len), probability-weighted sum of values (seq_len), output
  projection (heads * head_dim), MLP norm (D/2), gate/up (D), down (intermediate), elementwise
  functions (ELEMENTWISE_ULPS), and Qwen3's per-head q/k norms (head_dim/2).
  Then the final norm (D/2) and the unembedding (D).
  """
  per_layer = (hidden // 2 + hidden + head_dim + 3 * seq_len + num_heads * head_dim
               + hidden // 2 + hidden + intermediate + ELEMENTWISE_ULPS
               + (head_dim // 2 if qk_norm else 0))
  return layers * per_layer + hidden // 2 + hidden


def model_depth(config, seq_len: int) -> int:
  """`transformer_depth` of a saro_jax ``ModelConfig``."""
  return transformer_depth(layers=config.num_layers, hidden=config.hidden_size,
                           intermediate=config.intermediate_size, num_heads=config.num_heads,
                           head_dim=config.head_dim, seq_len=seq_len, qk_norm=config.qk_norm)


def loss_depth(forward_depth: int, *, vocab: int, tokens: int) -> int:
  """Token-mean cross-entropy: the logits' depth, then logsumexp over the vocabulary (a sum of V
  positive terms) and the sum over the batch's target tokens."""
  return forward_depth + vocab + tokens


def grad_depth(forward_depth: int, *, vocab: int, tokens: int) -> int:
  """A parameter gradient: the forward activations it is built from, the same reductions
  transposed on the way back (another forward_depth), softmax - onehot and its contraction with
  the unembedding (2 V), and the weight-gradient sum over every target token of the step
  (tokens; micro-batch accumulation is part of that same sum)."""
  return 2 * forward_depth + 2 * vocab + tokens


def max_bound(scale: float, depth: int, programs: int = 2) -> float:
  """Worst-case max |a - b| of `programs` fp32 evaluations of one function (point 3)."""
  return programs * gamma(depth) * scale


def decision_tie(scale: float, depth: int) -> float:
  """The largest gap between two tokens' logits that two fp32 programs may order differently: each
  logit of each program is within gamma(depth) * scale of the exact one, so the two programs'
  values of one logit are within max_bound, and the gap between two logits within twice that."""
  return 2 * max_bound(scale, depth)


def mean_bound(scale: float, depth: int, programs: int = 2) -> float:
  """Random-walk size of the typical |a - b|, relative to the same (maximum) scale."""
  return programs * math.sqrt(depth) * U * scale


@dataclasses.dataclass(frozen=True)
class Parity:
  """max and mean |ours - ref| against their bounds; ``ok`` iff both are within them."""
  max_err: float
  mean_err: float
  max_bound: float
  mean_bound: float
  scale: float
  depth: int

  @property
  def ok(self) -> bool:
    return self.max_err <= self.max_bound and self.mean_err <= self.mean_bound

  @property
  def excess(self) -> float:
    """How far the worse of the two errors exceeds its bound (< 1: within)."""
    return max(self.max_err / self.max_bound, self.mean_err / self.mean_bound)

  def __str__(self) -> str:
    def part(name, err, bound):
      ratio = f"{bound / err:.0f}x under" if err <= bound and err > 0 else (
          "exact" if err == 0 else f"{err / bound:.0f}x OVER")
      return f"{name} {err:.2e} vs bound {bound:.2e} ({ratio})"
    return (f"{part('max|d|', self.max_err, self.max_bound)}, "
            f"{part('mean|d|', self.mean_err, self.mean_bound)}; scale {self.scale:.3g}, "
            f"depth {self.depth}")


def parity(ours, ref, depth: int, mask=None, scale: float | None = None) -> Parity:
  """Compare ``ours`` to ``ref`` (over ``mask``'s True rows, e.g. real tokens) against the
  bounds for ``depth``, relative to ``scale`` (default: max |ref| over the compared entries)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shapes differ: {ours.shape} vs {ref.shape}")
  if mask is not None:
    ours, ref = ours[np.asarray(mask)], ref[np.asarray(mask)]
  diff = np.abs(ours - ref)
  scale = float(np.abs(ref).max()) if scale is None else float(scale)
  return Parity(max_err=float(diff.max()), mean_err=float(diff.mean()),
                max_bound=max_bound(scale, depth), mean_bound=mean_bound(scale, depth),
                scale=scale, depth=depth)


def assert_parity(ours, ref, depth: int, mask=None, scale: float | None = None,
                  what: str = "") -> Parity:
  """`parity`, printed, and asserted ``ok``."""
  result = parity(ours, ref, depth, mask=mask, scale=scale)
  print(f"{what}: {result}")
  assert result.ok, f"{what}: outside the fp32 error model: {result}"
  return result


def assert_caught(ours, ref, depth: int, mask=None, scale: float | None = None,
                  what: str = "", factor: float = 10.0) -> Parity:
  """Negative control: a planted bug must exceed the SAME bound by at least ``factor``."""
  result = parity(ours, ref, depth, mask=mask, scale=scale)
  print(f"{what} (planted bug): exceeds the bound {result.excess:.0f}x: {result}")
  assert result.excess >= factor, f"{what}: the bound would not catch this bug: {result}"
  return result


def adam_param_bound(sqrt_v_hat_per_step, *, lr: float, grad_rel_err: float, eps: float):
  """Per-element bound on |theta_a - theta_b| after Adam steps whose gradients differ by rounding.

  Adam's update u = m_hat / (sqrt(v_hat) + eps) is NOT relative-error stable: an element whose
  gradient is small next to the rest of its tensor (or cancels between steps) divides a rounding
  difference by a small sqrt(v_hat). Differentiating u: |du| <= (|dm_hat| + |u| |d sqrt(v_hat)|)
  / (sqrt(v_hat) + eps) <= 2 |dg| / (sqrt(v_hat) + eps), since m_hat is a weighted mean of the
  step gradients, sqrt(v_hat) their weighted RMS (both move by at most max |dg|) and |u| <= ~1.
  The gradient difference is |dg| <= grad_rel_err * G with G the tensor's gradient scale (its
  largest sqrt(v_hat)). Summed over the steps, times the learning rate; the change of step t's
  gradient caused by step t-1's (rounding-level) parameter difference is second order, neglected.

  ``sqrt_v_hat_per_step``: for each step, the bias-corrected sqrt(v_hat) of one tensor, taken from
  the reference run's optimizer state after that step (the clipped gradients Adam saw).
  """
  bound = 0.0
  for s in sqrt_v_hat_per_step:
    s = np.asarray(s, np.float64)
    bound = bound + lr * 2 * grad_rel_err * s.max() / (s + eps)
  return bound
