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

The query tiles are a ``lax.scan`` (each tile's queries read as they lie, [n, B, K, M, H]
from ``query_tiles``; outputs stacked as its ys) and each one's key tiles a ``lax.fori_loop``
over its data-dependent list (a traced trip count: a while loop), so the gradient is a
``jax.custom_vjp``, the flash-attention recipe: the forward keeps a running max and sum per query
(online softmax) and saves only the outputs and each query's log-sum-exp; the backward
recomputes each visited tile's probabilities from them. Nothing L x L in fp32 is ever held: the
residuals are q, k, v, the output, the log-sum-exp and the boolean mask.
The backward has two tile layouts with the same sums: queries along the rows, or transposed
tiles (keys along the rows), which bf16 takes on XLA:CPU (``prefers_transposed_backward``). In
both, every product contracts its left operand's minor dim, as XLA:CPU's GEMM library wants.

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


def query_tiles(q_BxLxNxH: jax.Array, num_kv_heads: int, tile: int) -> jax.Array:
  """Queries [B, L, N, H] (L a multiple of ``tile``) -> [n, B, K, M, H], n = L / tile query
  tiles, M = G * tile: each tile's queries of the G heads of a kv head stacked, m = g * tile + t.
  One transpose; the loops then read whole tiles as they lie."""
  B, L, N, H = q_BxLxNxH.shape
  K, n = num_kv_heads, L // tile
  G = N // K
  return q_BxLxNxH.reshape(B, n, tile, K, G, H).transpose(1, 0, 3, 4, 2, 5).reshape(
      n, B, K, G * tile, H)


def from_query_tiles(x_nxBxKxMxH: jax.Array, tile: int) -> jax.Array:
  """``query_tiles``' inverse: [n, B, K, M, H] -> [B, L, N, H]."""
  n, B, K, M, H = x_nxBxKxMxH.shape
  G = M // tile
  return x_nxBxKxMxH.reshape(n, B, K, G, tile, H).transpose(1, 0, 4, 2, 3, 5).reshape(
      B, n * tile, K * G, H)


def _forward(q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile):
  """(out [n, B, K, M, H], (log-sum-exp [n, B, K, M], the tile lists)): a scan over the query
  tiles (their outputs stacked as the scan's ys, no [B, K, G, L, H] carry to zero and update),
  an online softmax over each one's visited key tiles."""
  n, B, K, M, H = q_nxBxKxMxH.shape
  G = M // tile
  keys_nxn, count_n = tile_lists(mask_BxLxL, tile)

  def query_tile(_, xs):
    i, q_BxKxMxH, keys_n, count = xs

    def key_tile(visit, state):
      j = keys_n[visit]
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
    max_BxKxM, sum_BxKxM, acc_BxKxMxH = lax.fori_loop(0, count, key_tile, start)
    o_BxKxMxH = (acc_BxKxMxH / sum_BxKxM[..., None]).astype(q_BxKxMxH.dtype)
    return None, (o_BxKxMxH, max_BxKxM + jnp.log(sum_BxKxM))

  _, (out_nxBxKxMxH, lse_nxBxKxM) = lax.scan(
      query_tile, None, (jnp.arange(n), q_nxBxKxMxH, keys_nxn, count_n))
  return out_nxBxKxMxH, (lse_nxBxKxM, keys_nxn, count_n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile, transposed):
  return _forward(q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile)[0]


def _attend_fwd(q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile, transposed):
  out, (lse, keys, count) = _forward(q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale, tile)
  return out, (q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, out, lse, keys, count)


def _scores_t(k_BxKxTxH, q_BxKxMxH, visible_BxTxM, scale: float) -> jax.Array:
  """``_scores`` transposed, computed as such: [B, K, T, M] (keys along the rows).
  ``visible_BxTxM``: key s is visible to stacked query m = g * T + t (the tile pair's mask,
  transposed and repeated over the G heads)."""
  s_BxKxTxM = jnp.einsum("bksh,bkmh->bksm", k_BxKxTxH, q_BxKxMxH,
                         preferred_element_type=jnp.float32) * jnp.float32(scale)
  return jnp.where(visible_BxTxM[:, None], s_BxKxTxM, BIG_NEGATIVE)


def _pair_grads(q_BxKxMxH, qt_BxKxHxM, k_BxKxTxH, v_BxKxTxH, d_out_BxKxMxH, d_out_t_BxKxHxM,
                lse_BxKxM, delta_BxKxM, mask_BxTxT, G: int, scale: float):
  """(d Q [B, K, M, H], d K^T, d V^T [B, K, H, T]) of one tile pair, queries along the rows.
  d K and d V are formed transposed, d V^T = dO^T P and d K^T = Q^T dS, from ``qt`` and
  ``d_out_t`` (the query tile's Q^T and dO^T, written once per query tile): every product then
  contracts its left operand's minor dim, which XLA:CPU hands to its GEMM library (YNNPACK);
  formed as P^T dO and dS^T Q they contract P's and dS's rows and run as Eigen dots, half as
  fast (benchmarks/README.md, session 48)."""
  p_BxKxMxT = jnp.exp(_scores(q_BxKxMxH, k_BxKxTxH, mask_BxTxT, G, scale) - lse_BxKxM[..., None])
  dvt_BxKxHxT = jnp.einsum("bkhm,bkms->bkhs", d_out_t_BxKxHxM,
                           p_BxKxMxT.astype(d_out_t_BxKxHxM.dtype),
                           preferred_element_type=jnp.float32)
  dp_BxKxMxT = jnp.einsum("bkmh,bksh->bkms", d_out_BxKxMxH, v_BxKxTxH,
                          preferred_element_type=jnp.float32)
  ds_BxKxMxT = p_BxKxMxT * (dp_BxKxMxT - delta_BxKxM[..., None]) * jnp.float32(scale)
  dq_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", ds_BxKxMxT.astype(k_BxKxTxH.dtype), k_BxKxTxH,
                          preferred_element_type=jnp.float32)
  dkt_BxKxHxT = jnp.einsum("bkhm,bkms->bkhs", qt_BxKxHxM, ds_BxKxMxT.astype(qt_BxKxHxM.dtype),
                           preferred_element_type=jnp.float32)
  return dq_BxKxMxH, dkt_BxKxHxT, dvt_BxKxHxT


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
  dim. Before session 48 the rows' layout formed d V = P^T dO and d K = dS^T Q, contracting the
  rows of P and dS, so they ran as plain (Eigen) dots, in bf16 compute as fp32 ones
  (``transformer.rows_contracted_dot`` says why): in a bf16 SmolLM2 RW step (4 x 512) 600 such
  dots took 0.66 s of 7.7 s of thunk time. From transposed tiles every product is a bf16 GEMM.
  Measured on an Intel Xeon against that rows' layout (benchmarks/README.md, "bf16 attention
  backward"): one layer's attention fwd + bwd in bf16 84.5 -> 64.0 ms (4 x 512 causal, tiles of
  128), 94.1 -> 80.6 ms (2 x 1024 packed trees); the bf16 RW step 1.13x and the SRPO policy step
  (8 x 320) 1.07x faster in in-process A/Bs.
  The rows' layout now forms d V^T = dO^T P and d K^T = Q^T dS (``_pair_grads``), GEMMs in both
  dtypes too: fp32 one layer 38.1 -> 30.3 ms (8 x 256, tiles of 64) on a Zen 4, the SRPO and RW
  steps 1.040x and 1.056x. In fp32 it stays the default: on the Intel Xeon and the Zen 3,
  YNNPACK ran the transposed tiles' products 16-17 % slower than the rows' layout; other
  backends transpose operands for free. On the Zen 4 the two layouts now run even in bf16
  (4 x 512 causal 53.3 / 53.0 ms, 2 x 1024 trees 54.9 / 66.3 ms rows / transposed), which does
  not move bf16's default without a reading on the Intel Xeon it was measured on.
  """
  return cpu_bf16.applies(dtype)


def _attend_bwd(scale, tile, transposed, residuals, d_out_nxBxKxMxH):
  (q_nxBxKxMxH, k_BxKxLxH, v_BxKxLxH, mask_BxLxL, out_nxBxKxMxH, lse_nxBxKxM, keys_nxn,
   count_n) = residuals
  n, B, K, M, H = q_nxBxKxMxH.shape
  G, L = M // tile, k_BxKxLxH.shape[2]
  # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij: the softmax's backward without the full P.
  delta_nxBxKxM = jnp.sum(d_out_nxBxKxMxH.astype(jnp.float32) * out_nxBxKxMxH.astype(jnp.float32),
                          axis=-1)
  if transposed:  # K^T and the mask's transpose, each written once, read in place by the pairs
    kt_BxKxHxL = jnp.swapaxes(k_BxKxLxH, 2, 3)
    mask_t_BxLxL = jnp.swapaxes(mask_BxLxL, 1, 2)
  # The key side's gradients add up over the query tiles (the scan's carry): [B, K, L, H] from
  # transposed tiles, [B, K, H, L] in the rows' layout (d K^T, d V^T, transposed at the end).
  key_axis = 2 if transposed else 3

  def query_tile(carry, xs):
    dk_acc, dv_acc = carry
    i, q_BxKxMxH, d_out_BxKxMxH, lse_BxKxM, delta_BxKxM, keys_n, count = xs
    if transposed:
      # Every key's visibility to this tile's stacked queries, written once per query tile: the
      # same mask broadcast over G inside each pair's fusion ran ~7x slower on XLA:CPU.
      visible_BxLxM = jnp.tile(lax.dynamic_slice_in_dim(mask_t_BxLxL, i * tile, tile, 2),
                               (1, 1, G))
    else:  # Q^T and dO^T of this query tile, written once, read by its pairs
      qt_BxKxHxM, d_out_t_BxKxHxM = (jnp.swapaxes(x, 2, 3) for x in (q_BxKxMxH, d_out_BxKxMxH))

    def key_tile(visit, state):
      j = keys_n[visit]
      dq_acc, dk_acc, dv_acc = state
      keys = lambda x, axis=2: lax.dynamic_slice_in_dim(x, j * tile, tile, axis)
      k_BxKxTxH, v_BxKxTxH = keys(k_BxKxLxH), keys(v_BxKxLxH)
      if transposed:
        dq_part, dk_part, dv_part = _pair_grads_t(
            q_BxKxMxH, k_BxKxTxH, keys(kt_BxKxHxL, 3), v_BxKxTxH, d_out_BxKxMxH, lse_BxKxM,
            delta_BxKxM, keys(visible_BxLxM, 1), scale)
      else:
        mask_BxTxT = lax.dynamic_slice(mask_BxLxL, (0, i * tile, j * tile), (B, tile, tile))
        dq_part, dk_part, dv_part = _pair_grads(
            q_BxKxMxH, qt_BxKxHxM, k_BxKxTxH, v_BxKxTxH, d_out_BxKxMxH, d_out_t_BxKxHxM,
            lse_BxKxM, delta_BxKxM, mask_BxTxT, G, scale)
      add = lambda total, part: lax.dynamic_update_slice_in_dim(
          total, keys(total, key_axis) + part, j * tile, key_axis)
      return dq_acc + dq_part, add(dk_acc, dk_part), add(dv_acc, dv_part)

    # d Q of this query tile, summed over its key tiles (transposed: [B, K, H, M]).
    start = (jnp.zeros((B, K, H, M) if transposed else (B, K, M, H), jnp.float32), dk_acc,
             dv_acc)
    dq_acc, dk_acc, dv_acc = lax.fori_loop(0, count, key_tile, start)
    return (dk_acc, dv_acc), dq_acc.astype(q_BxKxMxH.dtype)

  key_zeros = jnp.zeros((B, K, L, H) if transposed else (B, K, H, L), jnp.float32)
  (dk, dv), dq = lax.scan(query_tile, (key_zeros, key_zeros),
                          (jnp.arange(n), q_nxBxKxMxH, d_out_nxBxKxMxH, lse_nxBxKxM, delta_nxBxKxM,
                           keys_nxn, count_n))
  if transposed:
    dq = jnp.swapaxes(dq, 3, 4)
  else:
    dk, dv = jnp.swapaxes(dk, 2, 3), jnp.swapaxes(dv, 2, 3)
  return dq, dk.astype(k_BxKxLxH.dtype), dv.astype(v_BxKxLxH.dtype), None


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
  K = k_BxLxKxH.shape[2]
  k_BxKxLxH, v_BxKxLxH = k_BxLxKxH.transpose(0, 2, 1, 3), v_BxLxKxH.transpose(0, 2, 1, 3)
  mask_BxLxL = mask_Bx1xLxL[:, 0]
  pad = -L % tile
  if pad:
    widen = lambda x, axis: jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    q_BxLxNxH = widen(q_BxLxNxH, 1)
    k_BxKxLxH, v_BxKxLxH = widen(k_BxKxLxH, 2), widen(v_BxKxLxH, 2)
    added_diagonal = jnp.eye(L + pad, dtype=bool) & (jnp.arange(L + pad) >= L)
    mask_BxLxL = widen(widen(mask_BxLxL, 1), 2) | added_diagonal[None]
  if transposed_backward is None:
    transposed_backward = prefers_transposed_backward(q_BxLxNxH.dtype)
  out_nxBxKxMxH = _attend(query_tiles(q_BxLxNxH, K, tile), k_BxKxLxH, v_BxKxLxH, mask_BxLxL, scale,
                          tile, bool(transposed_backward))
  return from_query_tiles(out_nxBxKxMxH, tile)[:, :L]
