"""Training attention in square tiles that visits only the key tiles some query can see: packed
rows (several sequences or DPO trees per row) stop paying for the scores between segments that
never see each other, token trees for the sibling branches between a branch and its root, and
causal rows for the tiles above the diagonal.

The row is cut into tiles of ``tile`` slots. Query tile i visits, in ascending order, the key
tiles that hold a key visible to ANY query of the tile in ANY row of the batch (read off the
boolean mask, so every mask ``transformer.attention_mask`` builds works: causal, segments,
prefix-shared branches, sliding windows). Every key of a tile it skips is masked for every query
of the tile: skipping drops only exact zeros of the softmax and its gradients, so the visited
list gives the bits a dense sweep of the same tiles would. A visited tile pair that is partly
masked is computed and masked as usual.

The loops run over data-dependent lists (``lax.fori_loop`` with traced trip counts: while loops), so
the gradient is a ``jax.custom_vjp``, the flash-attention recipe: the forward keeps a running max
and sum per query (online softmax) and saves only the outputs and each query's log-sum-exp; the
backward recomputes each visited tile's probabilities from them. Nothing L x L in fp32 is ever
held: the residuals are q, k, v, the output, the log-sum-exp and the boolean mask.
The backward has two tile layouts with the same sums: queries along the rows, or transposed
tiles (keys along the rows), which bf16 takes on XLA:CPU (``prefers_transposed_backward``).

Arithmetic: scores in fp32 (``preferred_element_type``), the scale applied after the product,
masked scores set to -0.7 * f32 max, probabilities cast to the values' dtype before the weighted
sum, accumulation in fp32; the same as ``transformer.causal_attention`` up to the order of the
sums (the running sum is rescaled once per key tile: at most L / tile more roundings per output).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from saro_jax.models import cpu_bf16

# Masked scores: far below any real score, yet x - max stays finite (exp underflows to exactly 0).
BIG_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


def grouped_layouts(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array):
  """The training attentions' GQA layouts: queries [B, K, G, L, H] (the G query heads of each kv
  head grouped under it, no repeated keys), keys and values [B, K, L, H] (products batched over
  the leading B, K, as CPU gemms want them)."""
  B, L, N, H = q_BxLxNxH.shape
  K = k_BxLxKxH.shape[2]
  q_BxKxGxLxH = q_BxLxNxH.reshape(B, L, K, N // K, H).transpose(0, 2, 3, 1, 4)
  return q_BxKxGxLxH, k_BxLxKxH.transpose(0, 2, 1, 3), v_BxLxKxH.transpose(0, 2, 1, 3)


def tile_lists(mask_BxLxS: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
  """(keys [n, n], count [n]) int32 for n = L / tile query tiles: query tile i visits key tiles
  keys[i, :count[i]], ascending, the tiles where some query of tile i sees some key in some
  row. A query tile whose queries see nothing (only possible in padding added here) visits its
  own tile.

  A token tree's branch sees its root at the row's start and its own path, not the sibling
  branches laid out between them: bundled prompt trees in 2 x 1024 rows visit 80 of the 94 tiles
  of 128 (and 211 of the 333 tiles of 64) that a contiguous first..last range spans
  (benchmarks/README.md, session 46)."""
  B, L, S = mask_BxLxS.shape
  n = L // tile
  seen_nxn = mask_BxLxS.reshape(B, n, tile, S // tile, tile).any(axis=(0, 2, 4))
  seen_nxn |= jnp.eye(n, dtype=bool) & ~seen_nxn.any(axis=1, keepdims=True)
  keys_nxn = jnp.argsort(~seen_nxn, axis=1, stable=True)  # the seen tiles first, ascending
  return keys_nxn.astype(jnp.int32), seen_nxn.sum(axis=1).astype(jnp.int32)


def _scores(q_BxKxMxH, k_BxKxTxH, mask_BxTxT, G: int, scale: float) -> jax.Array:
  """Masked fp32 scores [B, K, M = G*T, T] of one tile pair (queries of G heads stacked)."""
  B, K, M, _ = q_BxKxMxH.shape
  T = k_BxKxTxH.shape[2]
  s_BxKxMxT = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxTxH,
                         preferred_element_type=jnp.float32) * jnp.float32(scale)
  s_BxKxGxTxT = jnp.where(mask_BxTxT[:, None, None], s_BxKxMxT.reshape(B, K, G, M // G, T),
                          BIG_NEGATIVE)
  return s_BxKxGxTxT.reshape(B, K, M, T)


def _forward(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile):
  B, K, G, L, H = q_BxKxGxLxH.shape
  M = G * tile
  keys_nxn, count_n = tile_lists(mask_BxLxL, tile)

  def query_tile(i, carry):
    out_BxKxGxLxH, lse_BxKxGxL = carry
    q_BxKxMxH = lax.dynamic_slice_in_dim(q_BxKxGxLxH, i * tile, tile, 3).reshape(B, K, M, H)

    def key_tile(visit, state):
      j = keys_nxn[i, visit]
      max_BxKxM, sum_BxKxM, acc_BxKxMxH = state
      k_BxKxTxH = lax.dynamic_slice_in_dim(k_BxKxLxH, j * tile, tile, 2)
      v_BxKxTxH = lax.dynamic_slice_in_dim(v_BxKxLxH, j * tile, tile, 2)
      mask_BxTxT = lax.dynamic_slice(mask_BxLxL, (0, i * tile, j * tile), (B, tile, tile))
      s_BxKxMxT = _scores(q_BxKxMxH, k_BxKxTxH, mask_BxTxT, G, scale)
      new_max = jnp.maximum(max_BxKxM, s_BxKxMxT.max(-1))
      p_BxKxMxT = jnp.exp(s_BxKxMxT - new_max[..., None])
      rescale = jnp.exp(max_BxKxM - new_max)
      pv_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", p_BxKxMxT.astype(v_BxKxTxH.dtype), v_BxKxTxH,
                              preferred_element_type=jnp.float32)
      return (new_max, sum_BxKxM * rescale + p_BxKxMxT.sum(-1),
              acc_BxKxMxH * rescale[..., None] + pv_BxKxMxH)

    start = (jnp.full((B, K, M), BIG_NEGATIVE, jnp.float32), jnp.zeros((B, K, M), jnp.float32),
             jnp.zeros((B, K, M, H), jnp.float32))
    max_BxKxM, sum_BxKxM, acc_BxKxMxH = lax.fori_loop(0, count_n[i], key_tile, start)
    o_BxKxGxTxH = (acc_BxKxMxH / sum_BxKxM[..., None]).astype(q_BxKxGxLxH.dtype).reshape(
        B, K, G, tile, H)
    lse_BxKxGxT = (max_BxKxM + jnp.log(sum_BxKxM)).reshape(B, K, G, tile)
    return (lax.dynamic_update_slice_in_dim(out_BxKxGxLxH, o_BxKxGxTxH, i * tile, 3),
            lax.dynamic_update_slice_in_dim(lse_BxKxGxL, lse_BxKxGxT, i * tile, 3))

  carry = (jnp.zeros_like(q_BxKxGxLxH), jnp.zeros((B, K, G, L), jnp.float32))
  out_BxKxGxLxH, lse_BxKxGxL = lax.fori_loop(0, L // tile, query_tile, carry)
  return out_BxKxGxLxH, (lse_BxKxGxL, keys_nxn, count_n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile, transposed):
  return _forward(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile)[0]


def _attend_fwd(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile, transposed):
  out, (lse, keys, count) = _forward(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile)
  return out, (q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, out, lse, keys, count)


def _scores_t(k_BxKxTxH, q_BxKxMxH, visible_BxTxM, scale: float) -> jax.Array:
  """``_scores`` transposed, computed as such: [B, K, T, M] (keys along the rows).
  ``visible_BxTxM``: key s is visible to stacked query m = g * T + t (the tile pair's mask,
  transposed and repeated over the G heads)."""
  s_BxKxTxM = jnp.einsum("bksh,bkmh->bksm", k_BxKxTxH, q_BxKxMxH,
                         preferred_element_type=jnp.float32) * jnp.float32(scale)
  return jnp.where(visible_BxTxM[:, None], s_BxKxTxM, BIG_NEGATIVE)


def _pair_grads(q_BxKxMxH, k_BxKxTxH, v_BxKxTxH, d_out_BxKxMxH, lse_BxKxM, delta_BxKxM,
                mask_BxTxT, G: int, scale: float):
  """(d Q [B, K, M, H], d K, d V [B, K, T, H]) of one tile pair, queries along the rows."""
  p_BxKxMxT = jnp.exp(_scores(q_BxKxMxH, k_BxKxTxH, mask_BxTxT, G, scale) - lse_BxKxM[..., None])
  dv_BxKxTxH = jnp.einsum("bkms,bkmh->bksh", p_BxKxMxT.astype(d_out_BxKxMxH.dtype), d_out_BxKxMxH,
                          preferred_element_type=jnp.float32)
  dp_BxKxMxT = jnp.einsum("bkmh,bksh->bkms", d_out_BxKxMxH, v_BxKxTxH,
                          preferred_element_type=jnp.float32)
  ds_BxKxMxT = p_BxKxMxT * (dp_BxKxMxT - delta_BxKxM[..., None]) * jnp.float32(scale)
  dq_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", ds_BxKxMxT.astype(k_BxKxTxH.dtype), k_BxKxTxH,
                          preferred_element_type=jnp.float32)
  dk_BxKxTxH = jnp.einsum("bkms,bkmh->bksh", ds_BxKxMxT.astype(q_BxKxMxH.dtype), q_BxKxMxH,
                          preferred_element_type=jnp.float32)
  return dq_BxKxMxH, dk_BxKxTxH, dv_BxKxTxH


def _pair_grads_t(q_BxKxMxH, k_BxKxTxH, kt_BxKxHxT, v_BxKxTxH, d_out_BxKxMxH, lse_BxKxM,
                  delta_BxKxM, visible_BxTxM, scale: float):
  """``_pair_grads`` from transposed tiles, d Q returned transposed: (d Q^T [B, K, H, M], d K,
  d V). Every product contracts the minor dim of its left operand: P^T and dS^T [keys, queries]
  come straight out of the scores' product, d V = P^T dO and d K = dS^T Q read them as they
  lie, and d Q^T = K^T dS^T reads K^T (``kt``, stored once per call)."""
  pt_BxKxTxM = jnp.exp(_scores_t(k_BxKxTxH, q_BxKxMxH, visible_BxTxM, scale)
                       - lse_BxKxM[:, :, None])
  dv_BxKxTxH = jnp.einsum("bksm,bkmh->bksh", pt_BxKxTxM.astype(d_out_BxKxMxH.dtype),
                          d_out_BxKxMxH, preferred_element_type=jnp.float32)
  dpt_BxKxTxM = jnp.einsum("bksh,bkmh->bksm", v_BxKxTxH, d_out_BxKxMxH,
                           preferred_element_type=jnp.float32)
  dst_BxKxTxM = pt_BxKxTxM * (dpt_BxKxTxM - delta_BxKxM[:, :, None]) * jnp.float32(scale)
  dqt_BxKxHxM = jnp.einsum("bkhs,bksm->bkhm", kt_BxKxHxT, dst_BxKxTxM.astype(kt_BxKxHxT.dtype),
                           preferred_element_type=jnp.float32)
  dk_BxKxTxH = jnp.einsum("bksm,bkmh->bksh", dst_BxKxTxM.astype(q_BxKxMxH.dtype), q_BxKxMxH,
                          preferred_element_type=jnp.float32)
  return dqt_BxKxHxM, dk_BxKxTxH, dv_BxKxTxH


def prefers_transposed_backward(dtype) -> bool:
  """Whether the backward works on transposed tiles (``_pair_grads_t``) by default: bf16 on
  XLA:CPU.

  XLA:CPU hands its GEMM library (YNNPACK) only products whose left operand contracts its minor
  dim. In the rows' layout d V = P^T dO and d K = dS^T Q contract the rows of P and dS, so they
  run as plain (Eigen) dots, in bf16 compute as fp32 ones (``transformer.rows_contracted_dot``
  says why): in a bf16 SmolLM2 RW step (4 x 512) 600 such dots took 0.66 s of 7.7 s of thunk
  time, against 0.19 s for as many P V and d Q products. From transposed tiles every product is
  a bf16 GEMM. Measured on an Intel Xeon (benchmarks/README.md, "bf16 attention backward"): one
  layer's attention fwd + bwd in bf16 84.5 -> 64.0 ms (4 x 512 causal, tiles of 128), 94.1 ->
  80.6 ms (2 x 1024 packed trees); the bf16 RW step 1.13x and the SRPO policy step (8 x 320)
  1.07x faster in in-process A/Bs. In fp32, YNNPACK runs the transposed products slower than
  Eigen runs the rows' (88.2 against 102.9 ms at 4 x 512), and other backends transpose operands
  for free, so everything else keeps the rows' layout.
  """
  return cpu_bf16.applies(dtype)


def _attend_bwd(scale, tile, transposed, residuals, d_out_BxKxGxLxH):
  (q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, out_BxKxGxLxH, lse_BxKxGxL, keys_nxn,
   count_n) = residuals
  B, K, G, L, H = q_BxKxGxLxH.shape
  M = G * tile
  # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij: the softmax's backward without the full P.
  delta_BxKxGxL = jnp.sum(d_out_BxKxGxLxH.astype(jnp.float32) * out_BxKxGxLxH.astype(jnp.float32),
                          axis=-1)
  if transposed:  # K^T and the mask's transpose, each written once, read in place by the pairs
    kt_BxKxHxL = jnp.swapaxes(k_BxKxLxH, 2, 3)
    mask_t_BxLxL = jnp.swapaxes(mask_BxLxL, 1, 2)

  def query_tile(i, carry):
    dq_BxKxGxLxH, dk_BxKxLxH, dv_BxKxLxH = carry
    rows = lambda x: lax.dynamic_slice_in_dim(x, i * tile, tile, 3)
    q_BxKxMxH = rows(q_BxKxGxLxH).reshape(B, K, M, H)
    d_out_BxKxMxH = rows(d_out_BxKxGxLxH).reshape(B, K, M, H)
    lse_BxKxM = rows(lse_BxKxGxL).reshape(B, K, M)
    delta_BxKxM = rows(delta_BxKxGxL).reshape(B, K, M)
    if transposed:
      # Every key's visibility to this tile's stacked queries, written once per query tile: the
      # same mask broadcast over G inside each pair's fusion ran ~7x slower on XLA:CPU.
      visible_BxLxM = jnp.tile(lax.dynamic_slice_in_dim(mask_t_BxLxL, i * tile, tile, 2),
                               (1, 1, G))

    def key_tile(visit, state):
      j = keys_nxn[i, visit]
      dq_acc, dk_BxKxLxH, dv_BxKxLxH = state
      keys = lambda x: lax.dynamic_slice_in_dim(x, j * tile, tile, 2)
      k_BxKxTxH, v_BxKxTxH = keys(k_BxKxLxH), keys(v_BxKxLxH)
      if transposed:
        kt_BxKxHxT = lax.dynamic_slice_in_dim(kt_BxKxHxL, j * tile, tile, 3)
        visible_BxTxM = lax.dynamic_slice_in_dim(visible_BxLxM, j * tile, tile, 1)
        dq_part, dk_BxKxTxH, dv_BxKxTxH = _pair_grads_t(
            q_BxKxMxH, k_BxKxTxH, kt_BxKxHxT, v_BxKxTxH, d_out_BxKxMxH, lse_BxKxM, delta_BxKxM,
            visible_BxTxM, scale)
      else:
        mask_BxTxT = lax.dynamic_slice(mask_BxLxL, (0, i * tile, j * tile), (B, tile, tile))
        dq_part, dk_BxKxTxH, dv_BxKxTxH = _pair_grads(
            q_BxKxMxH, k_BxKxTxH, v_BxKxTxH, d_out_BxKxMxH, lse_BxKxM, delta_BxKxM, mask_BxTxT,
            G, scale)
      add = lambda total, part: lax.dynamic_update_slice_in_dim(total, keys(total) + part,
                                                                j * tile, 2)
      return dq_acc + dq_part, add(dk_BxKxLxH, dk_BxKxTxH), add(dv_BxKxLxH, dv_BxKxTxH)

    # d Q of this query tile, summed over its key tiles (transposed: [B, K, H, M]).
    start = (jnp.zeros((B, K, H, M) if transposed else (B, K, M, H), jnp.float32), dk_BxKxLxH,
             dv_BxKxLxH)
    dq_acc, dk_BxKxLxH, dv_BxKxLxH = lax.fori_loop(0, count_n[i], key_tile, start)
    dq_BxKxMxH = jnp.swapaxes(dq_acc, 2, 3) if transposed else dq_acc
    dq_BxKxGxLxH = lax.dynamic_update_slice_in_dim(
        dq_BxKxGxLxH, dq_BxKxMxH.reshape(B, K, G, tile, H), i * tile, 3)
    return dq_BxKxGxLxH, dk_BxKxLxH, dv_BxKxLxH

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = lax.fori_loop(0, L // tile, query_tile,
                             (zeros(q_BxKxGxLxH), zeros(k_BxKxLxH), zeros(v_BxKxLxH)))
  return (dq.astype(q_BxKxGxLxH.dtype), dk.astype(k_BxKxLxH.dtype), dv.astype(v_BxKxLxH.dtype),
          None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def tiled_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                    mask_Bx1xLxL: jax.Array, scale: float, tile: int,
                    transposed_backward: bool | None = None) -> jax.Array:
  """Grouped-query attention of whole sequences (no cache) -> [B, L, N, H]; see the module
  docstring. ``mask_Bx1xLxL`` must let every real query see at least one key (every
  ``attention_mask`` does: the diagonal). L need not be a multiple of ``tile``: the row is
  padded to one, each added slot seeing only itself, and cut back. ``transposed_backward``: the
  gradient's tile layout (the same numbers up to the order of fp32 sums); None picks
  ``prefers_transposed_backward(q.dtype)``."""
  if tile < 1:
    raise ValueError(f"tiled_attention: tile={tile} must be >= 1")
  B, L, N, H = q_BxLxNxH.shape
  q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH = grouped_layouts(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
  mask_BxLxL = mask_Bx1xLxL[:, 0]
  pad = -L % tile
  if pad:
    widen = lambda x, axis: jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    q_BxKxGxLxH = widen(q_BxKxGxLxH, 3)
    k_BxKxLxH, v_BxKxLxH = widen(k_BxKxLxH, 2), widen(v_BxKxLxH, 2)
    added_diagonal = jnp.eye(L + pad, dtype=bool) & (jnp.arange(L + pad) >= L)
    mask_BxLxL = widen(widen(mask_BxLxL, 1), 2) | added_diagonal[None]
  if transposed_backward is None:
    transposed_backward = prefers_transposed_backward(q_BxLxNxH.dtype)
  out_BxKxGxLxH = _attend(q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile,
                          bool(transposed_backward))
  return out_BxKxGxLxH[:, :, :, :L].transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)
