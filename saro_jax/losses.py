"""Pure losses: chunked token log-probs, the SFT (RW) loss and the DPO family (SRPO).

Arrays in, scalars and a metric dict out: no model, no config objects. Every formula follows TRL
(``trl.DPOTrainer``) so runs are comparable with the PyTorch ecosystem; metric names are TRL's.

Shift convention (BUILD.md data contract): ``loss_mask[b, t] = 1`` marks ``tokens[b, t]`` as a token
to predict from the tokens before it, so the hidden state at ``t - 1`` scores token ``t``.
``shift_targets`` turns a batch into per-position targets and masks for ``token_logps``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from saro_jax import sharding
from saro_jax.models import transformer

# --------------------------------------------------------------------------------------------
# Token log-probs without a B x L x V tensor
# --------------------------------------------------------------------------------------------


def shift_targets(tokens_BxL: jax.Array, loss_mask_BxL: jax.Array,
                  segment_ids_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position targets: position ``t`` predicts ``tokens[t + 1]``.

  Returns ``(targets_BxL, target_mask_BxL)``; the last column and any position whose next token
  lies in another (packed) segment or in padding (segment 0) are masked out, so a packed row never
  scores one example's first token from the previous example's context.
  """
  targets_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))
  next_mask_BxL = jnp.pad(loss_mask_BxL[:, 1:], ((0, 0), (0, 1)))
  next_segment_BxL = jnp.pad(segment_ids_BxL[:, 1:], ((0, 0), (0, 1)))
  same_segment_BxL = (next_segment_BxL == segment_ids_BxL) & (next_segment_BxL != 0)
  target_mask_BxL = (next_mask_BxL != 0) & same_segment_BxL
  return targets_BxL, target_mask_BxL.astype(jnp.int32)


def span_sums(values_BxL: jax.Array, subtree_end_BxL: jax.Array, first_BxP: jax.Array,
              last_BxP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sequence ``(sum of values, count)``, both [B, P] float32, in prefix-shared rows (token
  trees laid out depth first, ``data.batching.prompt_tree``): sequence p's scored tokens are the
  slots t of its path from ``first[p]`` to ``last[p]``, those whose subtree holds ``last[p]``
  (``subtree_end[t] > last[p]``). A token may count for several sequences (a rejected trajectory
  that several process pairs continue). An empty slot has last < first and counts nothing."""
  slot_L = jnp.arange(values_BxL.shape[1], dtype=jnp.int32)
  first_BxPx1, last_BxPx1 = first_BxP[..., None], last_BxP[..., None]
  picked_BxPxL = ((slot_L >= first_BxPx1) & (slot_L <= last_BxPx1)
                  & (subtree_end_BxL[:, None, :] > last_BxPx1))
  sums_BxP = jnp.sum(jnp.where(picked_BxPxL, values_BxL[:, None, :], 0.0), axis=-1)
  return sums_BxP, jnp.sum(picked_BxPxL, axis=-1).astype(jnp.float32)


def _chunk_logits(hidden_BxCxD: jax.Array, unembed_DxV: jax.Array) -> jax.Array:
  # The weights in the compute dtype (as the model's own unembedding reads them), fp32
  # accumulation whatever the compute dtype: a log-softmax over 1e5 classes in bf16 is too coarse.
  # With fp32 compute the cast is the identity. With bf16 compute the product is a bf16 x bf16
  # GEMM (an fp32 [D, V] operand made it an fp32 GEMM: TF32 at half the bf16 rate on a GPU, and
  # no AMX on a CPU), for a head that is ~20 % of a 1B model's FLOPs at a 128k vocabulary.
  logits_BxCxV = transformer.dense(hidden_BxCxD, unembed_DxV.astype(hidden_BxCxD.dtype),
                                   preferred_element_type=jnp.float32)
  return sharding.constrain(logits_BxCxV, ("batch", "length", "act_vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _full_vocab_stats(hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, n_active, vocab_size,
                      keep_logits=False):
  """(log p(target), mean logit), each [N, B, C], for N sequence chunks of C positions, all
  vocabulary columns at once, one chunk at a time; only the first ``n_active`` chunks are computed
  (the rest hold no scored position and give 0).

  ``read_DxV``: ``unembed_DxV`` in the compute dtype, the operand both products read, cast once
  by the caller outside the chunk loop (XLA does not hoist the cast out of the loop: 30 ms per
  chunk and pass for SmolLM2's [576, 49152] in bf16). The gradient goes to ``unembed_DxV`` in its
  own dtype, so the chunks' contributions add up in fp32 for fp32 master weights; ``read_DxV``
  gets none (it is the same array with fp32 compute).

  Its own VJP (``_full_vocab_stats_bwd``) over the whole chunk loop: the backward recomputes each
  chunk's logits from the saved hidden states and log-sum-exp (the [B, C, V] logits are never
  stored), forms d logits = g_logp * (onehot - softmax) + g_mean / V in ONE elementwise pass
  (autodiff of the forward made several [B, C, V] passes: the masks, the log-sum-exp's max and
  exp, the target gather's scatter and the mean's broadcast), and adds the chunk's [D, V] weight
  gradient into one accumulator. Both loops run ``n_active`` times (a ``while`` loop): a chunk
  past them costs nothing, where a per-chunk VJP inside ``lax.map`` paid a zero-filled [D, V]
  gradient and its addition for every skipped chunk (113 MB each for SmolLM2).

  ``keep_logits``: the forward keeps every chunk's fp32 logits ([N, B, C, V], 4 bytes each) and
  the backward reads them instead of recomputing them: three [B, C, D] x [D, V] products per chunk
  instead of four, as PyTorch's autograd runs an lm head it does not checkpoint. The same logits
  (one product either way), so the same log-probs and gradients."""
  # Not under a gradient: nothing to keep.
  stats, _ = _full_vocab_stats_fwd(hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC,
                                   n_active, vocab_size, False)
  return stats


def _real_columns(logits_BxCxV: jax.Array, vocab_size: int, fill: float) -> jax.Array:
  """``logits`` with the padding columns (>= vocab_size) set to ``fill``; no op (and no [B, C, V]
  mask, which XLA would hoist out of the chunk loop as a buffer) when there are none."""
  if vocab_size == logits_BxCxV.shape[-1]:
    return logits_BxCxV
  return jnp.where(jnp.arange(logits_BxCxV.shape[-1]) < vocab_size, logits_BxCxV, fill)


def _chunk_stats(hidden_BxCxD, read_DxV, targets_BxC, vocab_size):
  """One chunk's logits [B, C, V] (fp32), log-sum-exp, target logit and logit sum, each [B, C]."""
  logits_BxCxV = _chunk_logits(hidden_BxCxD, read_DxV)
  lse_BxC = jax.nn.logsumexp(_real_columns(logits_BxCxV, vocab_size, -jnp.inf), axis=-1)
  target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  logit_sum_BxC = jnp.sum(_real_columns(logits_BxCxV, vocab_size, 0.0), axis=-1)
  return logits_BxCxV, lse_BxC, target_logit_BxC, logit_sum_BxC


def _chunk_grads(hidden_BxCxD, read_DxV, targets_BxC, logits_BxCxV, lse_BxC, g_logp_BxC,
                 g_mean_BxC, vocab_size):
  """(d hidden [B, C, D], d unembed [D, V]), both fp32, of one chunk's
  sum(g_logp * logp + g_mean * mean logit) (``g_mean`` None: no mean-logit term)."""
  # d logp / d logits = onehot(target) - softmax; d mean / d logits = 1/V; both 0 on the padding
  # columns (their logits set to -inf give softmax 0; the select drops the mean's share).
  probs_BxCxV = jnp.exp(_real_columns(logits_BxCxV, vocab_size, -jnp.inf) - lse_BxC[..., None])
  onehot_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
  d_logits_BxCxV = g_logp_BxC[..., None] * (onehot_BxCxV.astype(jnp.float32) - probs_BxCxV)
  if g_mean_BxC is not None:
    d_logits_BxCxV = d_logits_BxCxV + g_mean_BxC[..., None] / vocab_size
  d_logits_BxCxV = _real_columns(d_logits_BxCxV, vocab_size, 0.0)
  d_logits_BxCxV = sharding.constrain(d_logits_BxCxV, ("batch", "length", "act_vocab"))
  # Both products in the compute dtype with fp32 accumulation, as the forward's: d logits is
  # rounded to it once (as autodiff of a bf16 model rounds every cotangent), the weight's
  # gradient stays fp32 (the master weight's dtype; autodiff would round it to bf16 first).
  # Identities with fp32 compute.
  d_logits_BxCxV = d_logits_BxCxV.astype(hidden_BxCxD.dtype)
  # Over flattened [B*C] rows: contracting (b, c) of a 3-D einsum makes XLA CPU copy a
  # transposed operand first (``transformer.dense``). unembed_DxV read as [out, in] for d_hidden.
  d_hidden_BxCxD = transformer.out_in_dot(d_logits_BxCxV, read_DxV, 1,
                                          preferred_element_type=jnp.float32)
  D, V = read_DxV.shape
  d_unembed_DxV = transformer.rows_contracted_dot(
      hidden_BxCxD.reshape(-1, D), d_logits_BxCxV.reshape(-1, V), wide=True)
  return d_hidden_BxCxD, d_unembed_DxV


def _full_vocab_stats_fwd(hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, n_active,
                          vocab_size, keep_logits):
  def chunk(i, carry):
    stats_3xNxBxC, kept_NxBxCxV = carry
    logits_BxCxV, lse_BxC, target_logit_BxC, logit_sum_BxC = _chunk_stats(
        hidden_NxBxCxD[i], read_DxV, targets_NxBxC[i], vocab_size)
    new_3xBxC = (target_logit_BxC - lse_BxC, logit_sum_BxC / vocab_size, lse_BxC)
    if keep_logits:
      kept_NxBxCxV = kept_NxBxCxV.at[i].set(logits_BxCxV)
    return tuple(s.at[i].set(x) for s, x in zip(stats_3xNxBxC, new_3xBxC)), kept_NxBxCxV

  zeros_NxBxC = jnp.zeros(targets_NxBxC.shape, jnp.float32)
  N, B, C, _ = hidden_NxBxCxD.shape
  # On a mesh XLA splits the kept logits as it splits each chunk's (sharding propagation from
  # ``_chunk_logits``' constraint; a constraint here changes nothing:
  # test_kept_logits_are_split_over_the_mesh_like_the_chunks).
  kept_NxBxCxV = jnp.zeros((N, B, C, read_DxV.shape[1]), jnp.float32) if keep_logits else None
  (logp_NxBxC, mean_NxBxC, lse_NxBxC), kept_NxBxCxV = jax.lax.fori_loop(
      0, n_active, chunk, ((zeros_NxBxC,) * 3, kept_NxBxCxV))
  residuals = (hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, n_active, lse_NxBxC,
               kept_NxBxCxV)
  return (logp_NxBxC, mean_NxBxC), residuals


def _full_vocab_stats_bwd(vocab_size, keep_logits, residuals, cotangents):
  (hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, n_active, lse_NxBxC,
   kept_NxBxCxV) = residuals
  g_logp_NxBxC, g_mean_NxBxC = cotangents

  def chunk(i, grads):
    d_hidden_NxBxCxD, d_unembed_DxV = grads
    hidden_BxCxD = hidden_NxBxCxD[i]
    # Kept from the forward, or recomputed (never stored).
    logits_BxCxV = kept_NxBxCxV[i] if keep_logits else _chunk_logits(hidden_BxCxD, read_DxV)
    d_hidden_BxCxD, d_unembed_chunk_DxV = _chunk_grads(
        hidden_BxCxD, read_DxV, targets_NxBxC[i], logits_BxCxV, lse_NxBxC[i], g_logp_NxBxC[i],
        g_mean_NxBxC[i], vocab_size)
    return (d_hidden_NxBxCxD.at[i].set(d_hidden_BxCxD.astype(hidden_BxCxD.dtype)),
            d_unembed_DxV + d_unembed_chunk_DxV.astype(unembed_DxV.dtype))

  init = (jnp.zeros_like(hidden_NxBxCxD), jnp.zeros_like(unembed_DxV))
  d_hidden_NxBxCxD, d_unembed_DxV = jax.lax.fori_loop(0, n_active, chunk, init)
  return d_hidden_NxBxCxD, d_unembed_DxV, None, None, None


_full_vocab_stats.defvjp(_full_vocab_stats_fwd, _full_vocab_stats_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _full_vocab_nll_sum(hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, scored_NxBxC,
                        n_active, vocab_size):
  """-sum of log p(target) over the scored slots of N sequence chunks (only the first
  ``n_active`` run), a scalar, with its gradient formed in the forward.

  The gradient of an NLL sum is known before the backward (d sum / d logits = softmax - onehot
  at each scored slot, times the one scalar cotangent), so the forward computes each chunk's
  logits ONCE and forms d hidden and the [D, V] d unembed from them right away (the fused linear
  cross-entropy of Liger's kernels); the backward only scales the two by the cotangent.
  ``_full_vocab_stats``' backward recomputes each chunk's logits instead: a fourth [B, C, D] x
  [D, V] product per chunk, a quarter of the lm head's FLOPs."""

  def chunk(i, nll_sum):
    _, lse_BxC, target_logit_BxC, _ = _chunk_stats(hidden_NxBxCxD[i], read_DxV, targets_NxBxC[i],
                                                   vocab_size)
    return nll_sum + jnp.sum(jnp.where(scored_NxBxC[i], lse_BxC - target_logit_BxC, 0.0))

  return jax.lax.fori_loop(0, n_active, chunk, jnp.float32(0))


def _full_vocab_nll_sum_fwd(hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, scored_NxBxC,
                            n_active, vocab_size):
  def chunk(i, carry):
    nll_sum, d_hidden_NxBxCxD, d_unembed_DxV = carry
    hidden_BxCxD, targets_BxC, scored_BxC = hidden_NxBxCxD[i], targets_NxBxC[i], scored_NxBxC[i]
    logits_BxCxV, lse_BxC, target_logit_BxC, _ = _chunk_stats(hidden_BxCxD, read_DxV, targets_BxC,
                                                               vocab_size)
    nll_sum = nll_sum + jnp.sum(jnp.where(scored_BxC, lse_BxC - target_logit_BxC, 0.0))
    # d sum / d logp: -1 at a scored slot, 0 elsewhere (whatever an unscored slot holds).
    g_logp_BxC = jnp.where(scored_BxC, -1.0, 0.0)
    d_hidden_BxCxD, d_unembed_chunk_DxV = _chunk_grads(
        hidden_BxCxD, read_DxV, targets_BxC, logits_BxCxV, lse_BxC, g_logp_BxC, None, vocab_size)
    return (nll_sum, d_hidden_NxBxCxD.at[i].set(d_hidden_BxCxD),
            d_unembed_DxV + d_unembed_chunk_DxV.astype(unembed_DxV.dtype))

  # d hidden stays fp32 until the backward scales it (one rounding to the compute dtype, which a
  # zero-size array carries: residuals are arrays).
  init = (jnp.float32(0), jnp.zeros(hidden_NxBxCxD.shape, jnp.float32),
          jnp.zeros_like(unembed_DxV))
  nll_sum, d_hidden_NxBxCxD, d_unembed_DxV = jax.lax.fori_loop(0, n_active, chunk, init)
  return nll_sum, (d_hidden_NxBxCxD, d_unembed_DxV, jnp.zeros((0,), hidden_NxBxCxD.dtype))


def _full_vocab_nll_sum_bwd(vocab_size, residuals, g):
  d_hidden_NxBxCxD, d_unembed_DxV, compute_dtype = residuals
  return ((g * d_hidden_NxBxCxD).astype(compute_dtype.dtype),
          (g * d_unembed_DxV).astype(d_unembed_DxV.dtype), None, None, None, None)


_full_vocab_nll_sum.defvjp(_full_vocab_nll_sum_fwd, _full_vocab_nll_sum_bwd)


def _vocab_chunked_stats(hidden_BxCxD, unembed_DxV, targets_BxC, vocab_size, vocab_chunk):
  """Same as ``_full_vocab_stats`` with an online log-sum-exp over vocabulary slices."""
  d, v = unembed_DxV.shape
  n_vocab_chunks = -(-v // vocab_chunk)
  unembed_DxVp = jnp.pad(unembed_DxV, ((0, 0), (0, n_vocab_chunks * vocab_chunk - v)))
  unembed_NxDxK = unembed_DxVp.reshape(d, n_vocab_chunks, vocab_chunk).transpose(1, 0, 2)
  starts_N = jnp.arange(n_vocab_chunks, dtype=jnp.int32) * vocab_chunk

  @jax.checkpoint  # the scan keeps only its B x C carries, never a B x C x K slice per step
  def step(carry, xs):
    max_BxC, sumexp_BxC, target_BxC, logit_sum_BxC = carry
    unembed_DxK, start = xs
    logits_BxCxK = _chunk_logits(hidden_BxCxD, unembed_DxK)
    real_K = start + jnp.arange(vocab_chunk) < vocab_size
    masked_BxCxK = jnp.where(real_K, logits_BxCxK, -jnp.inf)
    # The log-sum-exp does not depend on the shift, so the shift carries no gradient.
    new_max_BxC = jax.lax.stop_gradient(jnp.maximum(max_BxC, jnp.max(masked_BxCxK, axis=-1)))
    sumexp_BxC = (sumexp_BxC * jnp.exp(max_BxC - new_max_BxC)
                  + jnp.sum(jnp.exp(masked_BxCxK - new_max_BxC[..., None]), axis=-1))
    local_BxC = targets_BxC - start
    in_chunk_BxC = (local_BxC >= 0) & (local_BxC < vocab_chunk)
    picked_BxC = jnp.take_along_axis(
        logits_BxCxK, jnp.clip(local_BxC, 0, vocab_chunk - 1)[..., None], axis=-1)[..., 0]
    target_BxC = target_BxC + jnp.where(in_chunk_BxC, picked_BxC, 0.0)
    logit_sum_BxC = logit_sum_BxC + jnp.sum(jnp.where(real_K, logits_BxCxK, 0.0), axis=-1)
    return (new_max_BxC, sumexp_BxC, target_BxC, logit_sum_BxC), None

  zeros_BxC = jnp.zeros(targets_BxC.shape, jnp.float32)
  init = (jnp.full(targets_BxC.shape, -jnp.inf, jnp.float32), zeros_BxC, zeros_BxC, zeros_BxC)
  (max_BxC, sumexp_BxC, target_BxC, logit_sum_BxC), _ = jax.lax.scan(
      step, init, (unembed_NxDxK, starts_N))
  return target_BxC - (max_BxC + jnp.log(sumexp_BxC)), logit_sum_BxC / vocab_size


def _check_token_args(hidden_BxLxD, unembed_DxV, targets_BxL, vocab_size, chunk_size,
                      vocab_chunk_size, name="token_logps"):
  if hidden_BxLxD.ndim != 3 or unembed_DxV.ndim != 2 or targets_BxL.ndim != 2:
    raise ValueError(
        f"{name}: expected hidden [B, L, D], unembed [D, V], targets [B, L]; got hidden"
        f" {hidden_BxLxD.shape}, unembed {unembed_DxV.shape}, targets {targets_BxL.shape}")
  b, l, d = hidden_BxLxD.shape
  if unembed_DxV.shape[0] != d:
    raise ValueError(f"{name}: hidden size {d} != unembed rows {unembed_DxV.shape[0]}"
                     " (pass model.unembed_DxV(), shaped [D, V])")
  if targets_BxL.shape != (b, l):
    raise ValueError(f"{name}: targets shape {targets_BxL.shape} != hidden's [B, L] {(b, l)}")
  if not 0 < vocab_size <= unembed_DxV.shape[1]:
    raise ValueError(f"{name}: vocab_size={vocab_size} must be in [1, {unembed_DxV.shape[1]}]"
                     " (the unembedding's column count)")
  if chunk_size <= 0 or (vocab_chunk_size is not None and vocab_chunk_size <= 0):
    raise ValueError(f"{name}: chunk_size={chunk_size} and vocab_chunk_size="
                     f"{vocab_chunk_size} must be positive")


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """A batch's positions as N chunks of [B, C] slots (C = ``chunk_size``).

  Without a mask: chunk j holds positions [j * C, (j + 1) * C) of every row.
  With one: the scored positions of each device's block of rows move to the front of that block
  (K blocks = the batch's data x fsdp devices, ``sharding.batch_blocks``: 1 on one device), and
  chunk j holds the block's slots [j * G * C, (j + 1) * G * C) for its G = B / K rows, laid out
  as [G, C]. The loops then run to the fullest block's scored count, not to the longest row's in
  every row: a row with few scored positions leaves its chunk slots to the next rows. Sorting
  within a block keeps every gather on its device.
  """
  hidden_NxBxCxD: jax.Array
  targets_NxBxC: jax.Array
  scored_NxBxC: jax.Array | None  # the slots holding a scored position (None: no mask)
  n_active: jax.Array | int       # chunks holding a scored slot (all without a mask)
  scored_BxL: jax.Array | None    # the mask, in the rows' own order
  inverse_KxM: jax.Array | None   # block k's position j is in its slot inverse[k, j]
  blocks: int                     # K
  length: int                     # L

  @classmethod
  def of(cls, hidden_BxLxD, targets_BxL, mask_BxL, chunk_size):
    b, l, d = hidden_BxLxD.shape
    targets_BxL = targets_BxL.astype(jnp.int32)
    chunk = min(chunk_size, l)
    n_chunks = -(-l // chunk)
    if mask_BxL is None:
      k, m, c = b, l, chunk
      hidden_KxMxD, targets_KxM = hidden_BxLxD, targets_BxL
      scored_BxL = inverse_KxM = slots_KxM = None
      n_active = n_chunks
    else:
      # Each block's M = rows x L positions in row-major order; its rows are contiguous on the
      # batch axis, so the reshape and the sort stay on the block's device.
      k = sharding.batch_blocks(b)
      m, c = b // k * l, b // k * chunk
      scored_BxL = mask_BxL != 0
      scored_KxM = scored_BxL.reshape(k, m)
      # Scored positions first, in the block's own order; ``order`` is a permutation of the block.
      order_KxM = jnp.argsort(~scored_KxM, axis=1, stable=True)
      hidden_KxMxD = jnp.take_along_axis(hidden_BxLxD.reshape(k, m, d), order_KxM[..., None],
                                         axis=1)
      targets_KxM = jnp.take_along_axis(targets_BxL.reshape(k, m), order_KxM, axis=1)
      count_K = jnp.sum(scored_KxM, axis=1)
      slots_KxM = jnp.arange(m) < count_K[:, None]
      n_active = (jnp.max(count_K) + c - 1) // c
      # The inverse permutation, once (``to_rows`` reads it for every output); a sort along
      # the block like ``order``'s, so it stays on the block's device too.
      inverse_KxM = jnp.argsort(order_KxM, axis=1)
    pad = n_chunks * c - m
    # A block's slots [j * c, (j + 1) * c) are chunk j's; they are laid out as the block's rows
    # x ``chunk`` (the [B, C] chunk the per-row layout had), so each chunk's products, reductions
    # and sharding have the shapes they have without the mask. Padding to whole chunks copies
    # hidden (D wide), never logits (V wide).
    g = b // k
    to_chunks = lambda x_KxM: jnp.pad(x_KxM, ((0, 0), (0, pad))).reshape(
        k, n_chunks, g, chunk).transpose(1, 0, 2, 3).reshape(n_chunks, b, chunk)
    hidden_NxBxCxD = jnp.pad(hidden_KxMxD, ((0, 0), (0, pad), (0, 0))).reshape(
        k, n_chunks, g, chunk, d).transpose(1, 0, 2, 3, 4).reshape(n_chunks, b, chunk, d)
    return cls(hidden_NxBxCxD, to_chunks(targets_KxM),
               None if slots_KxM is None else to_chunks(slots_KxM), n_active, scored_BxL,
               inverse_KxM, k, l)

  def to_rows(self, x_NxBxC: jax.Array) -> jax.Array:
    """Per-slot values back to the rows' own [B, L] positions; unscored positions give 0."""
    n, b, chunk = x_NxBxC.shape
    k = self.blocks
    x_KxM = x_NxBxC.reshape(n, k, b // k, chunk).transpose(1, 0, 2, 3).reshape(k, -1)[
        :, :b // k * self.length]
    if self.inverse_KxM is None:
      return x_KxM
    x_KxM = jnp.take_along_axis(x_KxM, self.inverse_KxM, axis=1)
    return jnp.where(self.scored_BxL, x_KxM.reshape(b, self.length), 0.0)


def token_logps_and_mean_logits(
    hidden_BxLxD: jax.Array, unembed_DxV: jax.Array, targets_BxL: jax.Array, *,
    vocab_size: int, chunk_size: int, vocab_chunk_size: int | None = None,
    mask_BxL: jax.Array | None = None, keep_logits: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """``log p(targets[b, t] | hidden[b, t])`` and the mean logit over the vocabulary, both [B, L].

  The sequence is processed ``chunk_size`` positions at a time (a loop whose backward recomputes
  each chunk's logits), so forward and backward hold one ``B x chunk_size x V`` fp32 block, never
  ``B x L x V``.
  ``vocab_chunk_size`` further splits the vocabulary (online log-sum-exp), for huge vocabularies;
  leave it ``None`` when the vocabulary is tensor-sharded (slicing it would gather it).
  Columns ``>= vocab_size`` of ``unembed_DxV`` (padding rows added for speed) are excluded from the
  softmax and the mean. Targets must lie in ``[0, vocab_size)``; give 0 at masked positions.
  The mean logit is TRL's ``logits/chosen`` ingredient (logging only).

  ``mask_BxL`` (the scored positions): only those are computed; every other position returns 0.
  The scored positions of each device's block of rows move to the block's front (a stable sort
  and a gather within the block: the batch sharding stays put; ``_Chunks``), and with the
  full-vocabulary path the chunks past the fullest block's count are never run, forward or
  backward (the loops' trip count), so the unembedding's matmuls and [B, C, V] passes cost the
  block's scored tokens (rounded up to one chunk of B x C slots) instead of every prompt and
  padding slot, or every row the longest row's count. Each scored position's result is the same
  computation as without the mask.

  ``keep_logits`` (full-vocabulary path only): the backward reads each chunk's fp32 logits kept
  from the forward instead of recomputing them, one fewer lm-head product per chunk for
  rows x L x V x 4 bytes more (``_full_vocab_stats``; ``train.logps_keep_logits``).
  """
  _check_token_args(hidden_BxLxD, unembed_DxV, targets_BxL, vocab_size, chunk_size,
                    vocab_chunk_size)
  full_vocab = vocab_chunk_size is None or vocab_chunk_size >= unembed_DxV.shape[1]
  if keep_logits and not full_vocab:
    raise ValueError(f"token_logps: keep_logits needs the full-vocabulary path; with"
                     f" vocab_chunk_size={vocab_chunk_size} the logits are never whole")
  chunks = _Chunks.of(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size)
  hidden_NxBxCxD, targets_NxBxC = chunks.hidden_NxBxCxD, chunks.targets_NxBxC
  # The full-vocabulary products' operand, cast to the compute dtype once (``_full_vocab_stats``).
  read_DxV = unembed_DxV.astype(hidden_BxLxD.dtype)
  if full_vocab:
    # With a mask, only the chunks up to the fullest block's scored count (a traced count).
    logps_NxBxC, mean_logits_NxBxC = _full_vocab_stats(
        hidden_NxBxCxD, unembed_DxV, read_DxV, targets_NxBxC, chunks.n_active, vocab_size,
        keep_logits)
  else:
    # Each chunk's backward recomputes its logits instead of storing them.
    stats = jax.checkpoint(_vocab_chunked_stats, static_argnums=(3, 4))
    logps_NxBxC, mean_logits_NxBxC = jax.lax.map(
        lambda xs: stats(xs[0], unembed_DxV, xs[1], vocab_size, vocab_chunk_size),
        (hidden_NxBxCxD, targets_NxBxC))
  return chunks.to_rows(logps_NxBxC), chunks.to_rows(mean_logits_NxBxC)


def token_logps(hidden_BxLxD: jax.Array, unembed_DxV: jax.Array, targets_BxL: jax.Array, *,
                vocab_size: int, chunk_size: int, vocab_chunk_size: int | None = None,
                mask_BxL: jax.Array | None = None, keep_logits: bool = False) -> jax.Array:
  """``log p(targets[b, t] | hidden[b, t])`` [B, L], chunked (``token_logps_and_mean_logits``)."""
  logps_BxL, _ = token_logps_and_mean_logits(
      hidden_BxLxD, unembed_DxV, targets_BxL, vocab_size=vocab_size, chunk_size=chunk_size,
      vocab_chunk_size=vocab_chunk_size, mask_BxL=mask_BxL, keep_logits=keep_logits)
  return logps_BxL


def token_nll_sum(hidden_BxLxD: jax.Array, unembed_DxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array, *, vocab_size: int, chunk_size: int,
                  vocab_chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """``sft_loss(token_logps(..., mask_BxL=mask_BxL), mask_BxL)``: the summed negative
  log-likelihood over the scored positions and their count, both scalars, with the same chunks
  and scored-positions-only path.

  Its gradient is formed in the forward (``_full_vocab_nll_sum``): the lm head computes each
  chunk's logits once, where ``token_logps`` recomputes them in the backward (its log-probs may
  feed any loss, whose cotangents are known only then). With ``vocab_chunk_size`` it is
  ``token_logps`` under ``sft_loss``."""
  _check_token_args(hidden_BxLxD, unembed_DxV, targets_BxL, vocab_size, chunk_size,
                    vocab_chunk_size, "token_nll_sum")
  if vocab_chunk_size is not None and vocab_chunk_size < unembed_DxV.shape[1]:
    return sft_loss(token_logps(hidden_BxLxD, unembed_DxV, targets_BxL, vocab_size=vocab_size,
                                chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                                mask_BxL=mask_BxL), mask_BxL)
  chunks = _Chunks.of(hidden_BxLxD, targets_BxL, mask_BxL, chunk_size)
  nll_sum = _full_vocab_nll_sum(chunks.hidden_NxBxCxD, unembed_DxV,
                                unembed_DxV.astype(hidden_BxLxD.dtype), chunks.targets_NxBxC,
                                chunks.scored_NxBxC, chunks.n_active, vocab_size)
  return nll_sum, jnp.sum(chunks.scored_BxL.astype(jnp.float32))


def sequence_sums(values_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum of values over masked positions, number of masked positions)``, both [B] float32.

  Per-sequence log-probs for DPO are ``sequence_sums(logps_BxL, target_mask_BxL)``; the same call
  on the mean logits gives the sums behind TRL's ``logits/chosen``.
  """
  # where, not multiply: a junk value (NaN from an out-of-range target) at a masked slot stays out.
  values_BxL = jnp.where(mask_BxL != 0, values_BxL, 0.0)
  return jnp.sum(values_BxL, axis=-1), jnp.sum((mask_BxL != 0).astype(jnp.float32), axis=-1)


# --------------------------------------------------------------------------------------------
# SFT (RW stage)
# --------------------------------------------------------------------------------------------


def sft_loss(logps_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood over masked tokens and the token count, both scalars.

  The caller divides the sum over the whole global batch (all micro-batches, all processes) by
  the total count, so every assistant token weighs the same whatever the packing or accumulation
  (a mean of per-micro-batch means would over-weight short micro-batches).
  """
  mask_BxL = mask_BxL != 0
  return -jnp.sum(jnp.where(mask_BxL, logps_BxL, 0.0)), jnp.sum(mask_BxL.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# DPO family (SRPO stage)
# --------------------------------------------------------------------------------------------
# ``logits_B`` below is TRL's name: (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected).


def sigmoid_loss(logits_B: jax.Array, *, beta: float, label_smoothing: float) -> jax.Array:
  """DPO (Rafailov et al.); with ``label_smoothing`` > 0, conservative DPO (cDPO)."""
  return (-jax.nn.log_sigmoid(beta * logits_B) * (1.0 - label_smoothing)
          - jax.nn.log_sigmoid(-beta * logits_B) * label_smoothing)


def robust_loss(logits_B: jax.Array, *, beta: float, label_smoothing: float) -> jax.Array:
  """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate ``label_smoothing``."""
  return (-jax.nn.log_sigmoid(beta * logits_B) * (1.0 - label_smoothing)
          + jax.nn.log_sigmoid(-beta * logits_B) * label_smoothing) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(logits_B: jax.Array, *, beta: float) -> jax.Array:
  """SLiC / RSO hinge on the reward margin."""
  return jax.nn.relu(1.0 - beta * logits_B)


def ipo_loss(logits_B: jax.Array, *, beta: float) -> jax.Array:
  """IPO (Azar et al., eq. 17), beta = tau; TRL feeds it length-averaged log-probs."""
  return (logits_B - 1.0 / (2.0 * beta)) ** 2


@dataclasses.dataclass(frozen=True)
class DpoLoss:
  fn: Callable[..., jax.Array]
  label_smoothing: bool  # takes label_smoothing (else a non-zero value is an error)
  length_normalized: bool  # uses per-token average log-probs, as TRL does for IPO


DPO_LOSSES: Mapping[str, DpoLoss] = {
    "sigmoid": DpoLoss(sigmoid_loss, label_smoothing=True, length_normalized=False),
    "robust": DpoLoss(robust_loss, label_smoothing=True, length_normalized=False),
    "hinge": DpoLoss(hinge_loss, label_smoothing=False, length_normalized=False),
    "ipo": DpoLoss(ipo_loss, label_smoothing=False, length_normalized=True),
}


def _check_dpo_flags(loss_type: str, beta: float, label_smoothing: float,
                     rpo_alpha: float | None) -> DpoLoss:
  if loss_type not in DPO_LOSSES:
    raise ValueError(f"dpo loss_type={loss_type!r} is unknown; valid: {sorted(DPO_LOSSES)}")
  spec = DPO_LOSSES[loss_type]
  if not beta > 0:
    raise ValueError(f"dpo beta={beta} must be > 0")
  if label_smoothing and not spec.label_smoothing:
    takes = sorted(k for k, v in DPO_LOSSES.items() if v.label_smoothing)
    raise ValueError(f"dpo label_smoothing={label_smoothing} does not apply to loss_type="
                     f"{loss_type!r} (only {takes}); set it to 0")
  # robust divides by 1 - 2 * label_smoothing, so 0.5 itself is excluded there.
  in_range = (0.0 <= label_smoothing < 0.5 if loss_type == "robust"
              else 0.0 <= label_smoothing <= 0.5)
  if not in_range:
    bound = "0.5)" if loss_type == "robust" else "0.5]"
    raise ValueError(f"dpo label_smoothing={label_smoothing} must be in [0, {bound} for"
                     f" loss_type={loss_type!r}")
  if rpo_alpha is not None and rpo_alpha < 0:
    raise ValueError(f"dpo rpo_alpha={rpo_alpha} must be >= 0 (or None to disable the NLL term)")
  return spec


check_dpo_flags = _check_dpo_flags  # config.py validates dpo.* with these same rules


def dpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None, ref_rejected_logps: jax.Array | None, *,
    chosen_lengths: jax.Array, rejected_lengths: jax.Array,
    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
    reference_free: bool = False, rpo_alpha: float | None = None,
    chosen_logit_sums: jax.Array | None = None, rejected_logit_sums: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRL's DPO loss (mean over the B pairs) and TRL-named metrics.

  All ``*_logps`` are per-sequence SUMS over completion tokens [B] (as ``sequence_sums`` gives and
  as reference log-probs are precomputed, independent of the loss type); ``*_lengths`` are the
  completion token counts [B]. For ``ipo`` both policy and reference sums are divided by the
  lengths first, as TRL does, and ``logps/*`` then report those averages (TRL logs the same).
  ``reference_free``: reference log-probs are taken as 0 (pass ``None`` for them); rewards are
  then ``beta * policy_logps``. ``rpo_alpha``: adds ``rpo_alpha * nll`` with TRL's RPO ``nll`` =
  mean negative log-likelihood over all chosen completion tokens of the batch (metric
  ``nll_loss``; ``rpo_alpha=0`` logs it without training on it). ``chosen/rejected_logit_sums``
  (sums of per-token mean logits, optional) give ``logits/chosen`` and ``logits/rejected`` as TRL
  computes them: a mean over all completion tokens.
  Pairs with no completion token on either side (the pipeline's padding rows) weigh nothing; the
  loss and pair metrics are means over the other pairs.
  """
  spec = _check_dpo_flags(loss_type, beta, label_smoothing, rpo_alpha)
  refs_given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
  if refs_given != ((False, False) if reference_free else (True, True)):
    raise ValueError(
        "dpo: pass ref_chosen_logps/ref_rejected_logps=None exactly when reference_free=True"
        f" (reference_free={reference_free}, ref chosen/rejected given: {refs_given})")
  shape = policy_chosen_logps.shape
  others = [policy_rejected_logps, chosen_lengths, rejected_lengths]
  others += [] if reference_free else [ref_chosen_logps, ref_rejected_logps]
  if len(shape) != 1 or any(x.shape != shape for x in others):
    raise ValueError(f"dpo: every per-sequence input must be [B]; got policy_chosen {shape} and"
                     f" {[x.shape for x in others]}")

  chosen_lengths = chosen_lengths.astype(jnp.float32)
  rejected_lengths = rejected_lengths.astype(jnp.float32)
  if reference_free:
    ref_chosen_logps = ref_rejected_logps = jnp.zeros(shape, jnp.float32)
  chosen, rejected = policy_chosen_logps, policy_rejected_logps
  ref_chosen, ref_rejected = ref_chosen_logps, ref_rejected_logps
  if spec.length_normalized:
    # max(n, 1): a pair without completion tokens is bad data, not a reason to emit NaN.
    chosen_n, rejected_n = jnp.maximum(chosen_lengths, 1.0), jnp.maximum(rejected_lengths, 1.0)
    chosen, ref_chosen = chosen / chosen_n, ref_chosen / chosen_n
    rejected, ref_rejected = rejected / rejected_n, ref_rejected / rejected_n

  # The pipeline pads a finite pass's last batch with empty rows (no completion tokens): they
  # must weigh nothing, in the loss or in the metrics.
  valid_B = ((chosen_lengths > 0) & (rejected_lengths > 0)).astype(jnp.float32)
  n_valid = jnp.maximum(jnp.sum(valid_B), 1.0)
  pair_mean = lambda x_B: jnp.sum(jnp.where(valid_B > 0, x_B, 0.0)) / n_valid

  logits_B = (chosen - rejected) - (ref_chosen - ref_rejected)
  kwargs = {"label_smoothing": label_smoothing} if spec.label_smoothing else {}
  loss = pair_mean(spec.fn(logits_B, beta=beta, **kwargs))

  stop = jax.lax.stop_gradient
  chosen_rewards_B = beta * stop(chosen - ref_chosen)
  rejected_rewards_B = beta * stop(rejected - ref_rejected)
  metrics = {
      "rewards/chosen": pair_mean(chosen_rewards_B),
      "rewards/rejected": pair_mean(rejected_rewards_B),
      "rewards/accuracies": pair_mean((chosen_rewards_B > rejected_rewards_B).astype(jnp.float32)),
      "rewards/margins": pair_mean(chosen_rewards_B - rejected_rewards_B),
      "logps/chosen": pair_mean(stop(chosen)),
      "logps/rejected": pair_mean(stop(rejected)),
  }
  if chosen_logit_sums is not None:
    metrics["logits/chosen"] = stop(
        jnp.sum(chosen_logit_sums) / jnp.maximum(jnp.sum(chosen_lengths), 1.0))
  if rejected_logit_sums is not None:
    metrics["logits/rejected"] = stop(
        jnp.sum(rejected_logit_sums) / jnp.maximum(jnp.sum(rejected_lengths), 1.0))
  if rpo_alpha is not None:
    # From the un-normalised sums: TRL's RPO term is token-level cross-entropy, even for IPO.
    nll = -jnp.sum(policy_chosen_logps) / jnp.maximum(jnp.sum(chosen_lengths), 1.0)
    loss = loss + rpo_alpha * nll
    metrics["nll_loss"] = stop(nll)
  return loss, metrics
