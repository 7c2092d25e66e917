"""The decoder shared by every family (Llama, Mistral, Qwen2/3, Gemma) in Flax NNX.

Weights carry their shape in their name (``wq_DxNxH``: D = hidden, N = query heads, K = kv heads,
H = head dim, F = mlp width, V = padded vocabulary) and their logical axes as ``out_sharding``
metadata, so ``sharding.state_shardings`` places them and ``hf.py`` maps them by name.

Numerics follow HF ``transformers`` so fp32 logits agree to ~1e-6: RoPE angles in fp32 from the
same inv_freq, RMSNorm normalises in fp32 and casts back before the weight (Gemma: after (1+w)).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import layout
import numpy as np
from flax import nnx, struct

from saro_jax import sharding
from saro_jax.models import cpu_attention, cpu_bf16, cpu_gemm
from saro_jax.models import tiled_attention
from saro_jax.models.config import ModelConfig

_INIT_STD = 0.02  # HF's default initializer_range: random models look like HF's random models.


class Cache(NamedTuple):
  """KV cache for sampling. Slot s of every layer holds the token written at slot s.

  ``segment_ids_BxS`` is 0 for empty slots and left padding, so no real token ever attends to them.
  Layouts are chosen so both attention products are plain batched matmuls over (B, K) with no
  per-step transpose of the cache: keys [B, K, H, S] (q·k contracts H, S is the output's minor
  dim), values [B, K, S, H] (p·v contracts S).
  """

  keys: tuple[jax.Array, ...] | jax.Array  # per layer [B, K, H, S]; scanned: one [Y, B, K, H, S]
  values: tuple[jax.Array, ...] | jax.Array  # per layer [B, K, S, H]; scanned: one [Y, B, K, S, H]
  segment_ids_BxS: jax.Array  # int32


# The cache's logical axes (``sharding``): rows split like the batch; a scanned cache adds "layers".
CACHE_KEY_AXES = ("batch", "act_kv_heads", "head_dim", "cache_length")
CACHE_VALUE_AXES = ("batch", "act_kv_heads", "cache_length", "head_dim")
CACHE_SEGMENT_AXES = ("batch", "cache_length")


def _param(rngs: nnx.Rngs | None, shape, dtype, names, init: str = "normal") -> nnx.Param:
  if init == "normal":
    # Drawn as a matrix and reshaped: XLA compiles a 3-D random normal several times slower.
    matrix = (shape[0], math.prod(shape[1:]))
    value = _INIT_STD * jax.random.normal(rngs.params(), matrix, jnp.float32).reshape(shape)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=tuple(names))


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF's computation, incl. "linear" and "llama3" rope scaling)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """inv_freq [H/2] in float32 exactly as HF builds it (and rescales it for rope_scaling)."""
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  scaling = dict(config.rope_scaling or {})
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return inv_freq
  if rope_type == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if rope_type == "llama3":
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`; short ones kept; the band between is interpolated.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)
  raise ValueError(
      f"rope_scaling rope_type={rope_type!r} is not supported; supported: default, linear, llama3")


def rope_cos_sin(config: ModelConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, H] in float32 (HF duplicates the half-dim angles: cat(freqs, freqs))."""
  inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs_BxLxh = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  emb_BxLxH = jnp.concatenate([freqs_BxLxh, freqs_BxLxh], axis=-1)
  return computed_once(jnp.cos(emb_BxLxH)), computed_once(jnp.sin(emb_BxLxH))


def computed_once(x: jax.Array) -> jax.Array:
  """``x``, bit for bit, as a buffer its consumers read instead of recomputing it.

  XLA fuses an elementwise producer into every consumer and computes it per consumer element:
  the rope's cos and sin were evaluated again inside each layer's q and k rotations, forward and
  backward, and once per head (the tables broadcast over heads): 120 fusions recomputing ~190 M
  transcendentals per SmolLM2 RW step on 4 x 512 tokens, ~0.7 s of a 15 s step on a 2-core CPU.
  ``lax.optimization_barrier`` does not stop that (XLA expands it before fusing); a reduction
  does, since XLA never fuses one into its consumers. So ``x`` is summed with zeros over a new
  axis of two, which is exact (x + 0 = x; a -0.0 would become +0.0, which no consumer of the
  rope tables tells apart). ``tests/test_models_parity.py`` checks that the compiled step holds
  one cos and one sin.
  """
  return jnp.stack([x, jnp.zeros_like(x)], axis=-1).sum(axis=-1)


def apply_rope(x_BxLxNxH: jax.Array, cos_BxLxH: jax.Array, sin_BxLxH: jax.Array) -> jax.Array:
  return rotate(x_BxLxNxH, cos_BxLxH[:, :, None, :], sin_BxLxH[:, :, None, :], axis=-1)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, axis: int) -> jax.Array:
  """HF's rotary embedding of ``x`` along its head dim ``axis``; ``cos`` and ``sin`` broadcast
  against ``x`` (any layout: the sampler's feature-major decode keeps the batch minor)."""
  dtype = x.dtype
  x1, x2 = jnp.split(x, 2, axis=axis)
  rotated = jnp.concatenate([-x2, x1], axis=axis)
  return x * cos.astype(dtype) + rotated * sin.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Attention mask: causal by row/slot index, same segment, optional sliding window.


def attention_mask(q_slot_BxT: jax.Array, q_segment_BxT: jax.Array, k_segment_BxS: jax.Array,
                   sliding_window: int | None, subtree_end_BxL: jax.Array | None = None,
                   positions_BxL: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, T, S]: query t (at slot q_slot) sees key slot s.

  ``subtree_end_BxL`` (no cache, T = S = L; prefix-shared DPO rows, token trees laid out depth
  first: ``data.batching.prompt_tree``): key s is also seen only by the slots before
  ``subtree_end[s]``, its own node's later tokens and its descendants, so no branch sees a sibling
  (rejected never sees chosen). The sliding window then counts positions (a token's index in its
  own sequence), not slots.
  """
  k_slot_S = jnp.arange(k_segment_BxS.shape[1], dtype=jnp.int32)
  q_slot = q_slot_BxT[:, :, None]
  visible = k_slot_S[None, None, :] <= q_slot
  visible &= q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
  distance = q_slot - k_slot_S[None, None, :]
  if subtree_end_BxL is not None:
    visible &= q_slot < subtree_end_BxL[:, None, :]
    distance = positions_BxL[:, :, None] - positions_BxL[:, None, :]
  if sliding_window is not None:
    visible &= distance < sliding_window
  return visible[:, None, :, :]


@struct.dataclass
class CacheMask:
  """The mask of a decode cache kept in groups of rows (``Transformer.__call__``'s
  ``cache_windows``): ``windows`` = ((first row r_g, first slot s_g), ...) in row order, static;
  group g (rows r_g .. r_(g+1) - 1) holds only the cache's slots s_g .. S - 1, in arrays of its
  own, and ``visible`` its boolean mask over them, [B_g, 1, T, S - s_g]."""
  visible: tuple[jax.Array, ...]
  windows: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)


def group_ends(windows: tuple[tuple[int, int], ...], rows: int) -> list[int]:
  """The row each window's group ends before."""
  return [r for r, _ in windows[1:]] + [rows]


def cache_mask(segment_ids_BxS, segment_ids_BxL: jax.Array, cache_index,
               sliding_window: int | None, windows: tuple[tuple[int, int], ...] | None = None):
  """(the cache's segment ids with L new columns written at slot ``cache_index``, the new
  columns' mask over the cache: boolean [B, 1, L, S]). ``windows``: a grouped cache (segment ids
  and the mask per group, a ``CacheMask``), each group's slots counted from its first one."""
  B, L = segment_ids_BxL.shape
  if windows is not None:
    parts = [cache_mask(segments, segment_ids_BxL[r:e], cache_index - s, sliding_window)
             for (r, s), e, segments in zip(windows, group_ends(windows, B), segment_ids_BxS)]
    return tuple(p[0] for p in parts), CacheMask(tuple(p[1] for p in parts), windows)
  write_B = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (B,))
  segments_BxS = write_slots(segment_ids_BxS, segment_ids_BxL, write_B)
  slots_BxL = write_B[:, None] + jnp.arange(L, dtype=jnp.int32)
  return segments_BxS, attention_mask(slots_BxL, segment_ids_BxL, segments_BxS, sliding_window)


def cache_groups(cache, windows) -> tuple[Cache, ...]:
  """A decode cache's groups: (cache,) when ungrouped; with ``windows`` one Cache per window, all
  ending at the same slot (checked)."""
  if windows is None:
    return (cache,)
  if isinstance(cache, Cache) or len(cache) != len(windows):
    got = "one Cache" if isinstance(cache, Cache) else f"{len(cache)} caches"
    raise ValueError(f"cache_windows={windows}: the cache must be one Cache per window, got {got}")
  ends = {s + g.segment_ids_BxS.shape[1] for (_, s), g in zip(windows, cache)}
  if len(ends) != 1:
    raise ValueError(f"cache_windows={windows}: every group's cache must end at the same slot"
                     f" (they end at {sorted(ends)})")
  return tuple(cache)


def layer_kv(cache, windows, layer: int | None = None):
  """One layer's (keys, values) of a decode cache (``layer`` None: a scanned cache's stacked
  arrays), or of a grouped cache (``windows``: a Cache per group) one such pair per group."""
  groups = cache_groups(cache, windows)
  kvs = [(g.keys, g.values) if layer is None else (g.keys[layer], g.values[layer]) for g in groups]
  return kvs[0] if windows is None else tuple(kvs)


def cache_segment_ids(cache, windows):
  return cache.segment_ids_BxS if windows is None else tuple(
      g.segment_ids_BxS for g in cache_groups(cache, windows))


def rebuild_cache(new_kv, segment_ids, windows, *, stacked: bool):
  """The Cache (a grouped cache: one per group) from the layers' new ``layer_kv`` values: a list
  over layers, or (``stacked``) the layer scan's stacked output."""
  if stacked:
    per_group = [new_kv] if windows is None else list(new_kv)
  else:
    layers = [[kv] if windows is None else list(kv) for kv in new_kv]
    per_group = [tuple(zip(*kvs)) for kvs in zip(*layers)]  # (keys per layer, values per layer)
  caches = tuple(Cache(keys, values, segments) for (keys, values), segments in
                 zip(per_group, (segment_ids,) if windows is None else segment_ids))
  return caches[0] if windows is None else caches


def write_and_attend(q_BxTxNxH: jax.Array, k_BxKxHxT: jax.Array, v_BxKxTxH: jax.Array, kv_cache,
                     mask_Bx1xTxS: jax.Array | CacheMask, slot, scale: float):
  """Writes T new columns' keys and values (in the cache's layouts) into one layer's cache at
  ``slot`` (every row the same slot: a dynamic-update-slice done in place, not a per-row scatter)
  and attends the new queries over it: (out [B, T, N, H] in q's dtype, the layer's new cache).

  A grouped cache (``CacheMask``; ``kv_cache`` one (keys, values) per group) writes and attends
  each group of rows in its own arrays, from its first slot on: a decode step reads the whole
  cache once per layer, so the slots a group does not hold (a batch's short prompts beside long
  ones: their left padding) are memory traffic saved. The slots left out are ones no row of the
  group sees, so only the order of the softmax's and the values' sums changes (fp32 roundoff).
  (Slicing one shared array per group instead let XLA fuse the in-place write into each slice and
  copy the whole cache every step.)"""
  if isinstance(mask_Bx1xTxS, CacheMask):
    windows, outs, caches = mask_Bx1xTxS.windows, [], []
    for (r, s), e, kv, visible in zip(windows, group_ends(windows, q_BxTxNxH.shape[0]), kv_cache,
                                      mask_Bx1xTxS.visible):
      out, kv = write_and_attend(q_BxTxNxH[r:e], k_BxKxHxT[r:e], v_BxKxTxH[r:e], kv, visible,
                                 slot - s, scale)
      outs.append(out)
      caches.append(kv)
    return jnp.concatenate(outs, axis=0), tuple(caches)
  cache_k_BxKxHxS, cache_v_BxKxSxH = kv_cache
  cache_k_BxKxHxS = jax.lax.dynamic_update_slice_in_dim(
      cache_k_BxKxHxS, k_BxKxHxT.astype(cache_k_BxKxHxS.dtype), slot, 3)
  cache_v_BxKxSxH = jax.lax.dynamic_update_slice_in_dim(
      cache_v_BxKxSxH, v_BxKxTxH.astype(cache_v_BxKxSxH.dtype), slot, 2)
  dt = q_BxTxNxH.dtype
  out_BxTxNxH = cached_attention(q_BxTxNxH, cache_k_BxKxHxS.astype(dt), cache_v_BxKxSxH.astype(dt),
                                 mask_Bx1xTxS, scale)
  return out_BxTxNxH, (cache_k_BxKxHxS, cache_v_BxKxSxH)


def cached_attention(q_BxTxNxH: jax.Array, k_BxKxHxS: jax.Array, v_BxKxSxH: jax.Array,
                     mask_Bx1xTxS: jax.Array, scale: float) -> jax.Array:
  """Grouped-query attention over the cache layouts above -> [B, T, N, H].

  Same arithmetic as ``jax.nn.dot_product_attention``'s xla path (fp32 logits, scale after the
  product, masked to a large negative, fp32 softmax), but the cache is read in place: on CPU the
  generic path transposed every layer's whole cache on every decode step. One query column (a
  decode step) on CPU: ``_decode_attention``.
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxKxHxS.shape[1]
  if T == 1 and jax.default_backend() == "cpu":
    return _decode_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_Bx1xTxS, scale)
  q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  logits_BxKxGxTxS = jnp.einsum("bkgth,bkhs->bkgts", q_BxKxGxTxH, k_BxKxHxS,
                                preferred_element_type=jnp.float32)
  logits_BxKxGxTxS = logits_BxKxGxTxS * jnp.float32(scale)
  logits_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], logits_BxKxGxTxS,
                               tiled_attention.BIG_NEGATIVE)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxKxSxH.dtype)
  out_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", probs, v_BxKxSxH)
  return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _decode_attention(q_Bx1xNxH: jax.Array, k_BxKxHxS: jax.Array, v_BxKxSxH: jax.Array,
                      mask_Bx1x1xS: jax.Array, scale: float) -> jax.Array:
  """``cached_attention`` for one new column on CPU: both products as multiply-and-reduce over the
  cache's layouts instead of batched dots (B x K dots of [G, H] x [H, S] each, too small to run
  at the memory rate). Same arithmetic otherwise; the sums' order differs (fp32 roundoff).

  A decode step reads the whole cache once per layer, so at long contexts this attention costs
  as much as the weights: SmolLM2 at batch 32 and 320 slots, 30 layers 61.7 ms as batched dots
  against 48.6 ms reduced (the cache is 472 MB: ~47 ms at this Intel Xeon's ~10 GB/s); at 88 slots
  both 19-20 ms. ``generate`` at batch 30 with 192 new tokens (the evaluation preset's shape) ran
  1.08x faster (3 of 3 alternating rounds, every token equal); at batch 16 with 32 new tokens
  even (benchmarks/README.md, session 58)."""
  B, _, N, H = q_Bx1xNxH.shape
  K = k_BxKxHxS.shape[1]
  f32 = jnp.float32  # the products and sums in fp32, as the dots' preferred_element_type
  q_BxKxGxHx1 = q_Bx1xNxH.reshape(B, K, N // K, H, 1).astype(f32)
  logits_BxKxGxS = jnp.sum(q_BxKxGxHx1 * k_BxKxHxS[:, :, None].astype(f32), axis=3)
  logits_BxKxGxS = logits_BxKxGxS * jnp.float32(scale)
  logits_BxKxGxS = jnp.where(mask_Bx1x1xS.reshape(B, 1, 1, -1), logits_BxKxGxS,
                             tiled_attention.BIG_NEGATIVE)
  probs_BxKxGxSx1 = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(v_BxKxSxH.dtype)[..., None]
  out_BxKxGxH = jnp.sum(probs_BxKxGxSx1.astype(f32) * v_BxKxSxH[:, :, None].astype(f32), axis=3)
  return out_BxKxGxH.astype(v_BxKxSxH.dtype).reshape(B, 1, N, H)


def query_block(length: int) -> int:
  """Query rows per block of ``causal_attention``: at most 4 blocks, at least 64 rows.

  Every block is its own pair of matmuls with its own key width, so each block adds distinct
  kernels to compile, in every unrolled layer. Measured at L = 512 with SmolLM2's widths
  (benchmarks/attention_blocks.py; benchmarks/README.md): the RW step compiled in 28 / 20 / 15.5
  CPU s (8 layers) with 8 / 4 / 1 blocks, and the whole 30-layer step ran no slower with 4 blocks
  than with 8 (CPU time 0.94x); 4 blocks keep (n + 1) / 2n = 62.5 % of the full score work (8
  would keep 56 %). Below 64 rows the products lose more to overhead than the skipped keys save.
  """
  return max(64, -(-length // 4))


def causal_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                     mask_Bx1xLxL: jax.Array, scale: float, block: int | None = None) -> jax.Array:
  """Grouped-query attention of a whole sequence (no cache) whose mask is causal by slot, with
  the keys above the diagonal never computed -> [B, L, N, H]. ``training_attention`` uses it for
  rows under 256 slots (``tiled_attention`` for longer ones).

  Same arithmetic as ``cached_attention`` (fp32 logits, scale after the product, masked to a large
  negative, fp32 softmax) in blocks of ``block`` query rows (default ``query_block(L)``; the last
  block may be shorter); block i scores only the keys
  0 .. end of block i. Every key it drops lies after the query (``attention_mask`` always
  includes causality), where the full softmax gives exactly 0: exp(-0.7 * f32 max - row max)
  underflows. Each row keeps its own slot (the diagonal is always visible), so no row is fully
  masked and the row max is a real logit. Work and the fp32 scores held for the backward shrink
  to (n + 1) / 2n of the full L x L for n blocks.

  Layouts are the cache's: queries [B, K, G*T, H] (the G query heads sharing a kv head stacked
  along the rows, so GQA needs no repeated keys and each product is one larger matmul), keys and
  values [B, K, S, H]; both products are batched over the leading (B, K), as CPU gemms want them.
  """
  B, L, N, H = q_BxLxNxH.shape
  K = k_BxLxKxH.shape[2]
  G = N // K
  q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH = tiled_attention.grouped_layouts(q_BxLxNxH, k_BxLxKxH,
                                                                     v_BxLxKxH)
  block = query_block(L) if block is None else block
  if block < 1:
    raise ValueError(f"causal_attention: block={block} query rows must be >= 1")
  outs = []
  for start in range(0, L, block):
    end = min(start + block, L)
    T = end - start
    q_BxKxMxH = q_BxKxGxLxH[:, :, :, start:end].reshape(B, K, G * T, H)
    logits_BxKxMxS = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxLxH[:, :, :end],
                                preferred_element_type=jnp.float32)
    logits_BxKxGxTxS = logits_BxKxMxS.reshape(B, K, G, T, end) * jnp.float32(scale)
    logits_BxKxGxTxS = jnp.where(mask_Bx1xLxL[:, :, None, start:end, :end], logits_BxKxGxTxS,
                                 tiled_attention.BIG_NEGATIVE)
    probs_BxKxMxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxLxKxH.dtype).reshape(
        B, K, G * T, end)
    out_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", probs_BxKxMxS, v_BxKxLxH[:, :, :end])
    outs.append(out_BxKxMxH.reshape(B, K, G, T, H))
  out_BxKxGxLxH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


def attention_tile(length: int, trees: bool = False) -> int:
  """Tile of ``tiled_attention`` for training rows of ``length`` slots; 0 = rows this short take
  ``causal_attention`` (its query blocks) instead. ``trees``: the rows hold token trees
  (prefix-shared DPO, ``attention_mask``'s ``subtree_end``).

  Measured (fwd + bwd of one SmolLM2 layer's attention, 2-core CPU; benchmarks/README.md
  "Tiled attention"): below 256 slots the tile loops cost more than they skip; 128-slot tiles
  are fastest on causal rows of 512 and 1024, 64-slot tiles where a row is not a multiple of 128
  (no padded tile) or is packed with short segments. Token trees take 64-slot tiles at every
  length: a branch sees its root and its own path, and finer tiles skip more of the sibling
  branches between them. The bundled prompt trees in 2 x 1024 rows, fwd / fwd + bwd per layer:
  31.5 / 87.2 ms with tiles of 64, 34.7 / 103.6 ms with tiles of 128 (session 46).
  """
  if length < 256:
    return 0
  if trees:
    return 64
  return 128 if length % 128 == 0 and length >= 512 else 64


@struct.dataclass
class RowsMask:
  """The mask of whole training rows (no cache) and the tile their attention runs in: the tile
  is chosen from the row layout, which the boolean mask alone does not tell (``attention_tile``),
  and rides along as static data through the layer scan and remat."""
  visible_Bx1xLxL: jax.Array
  tile: int = struct.field(pytree_node=False)


def training_attention_impl(impl: str, dtype, head_dim: int, length: int) -> str:
  """What ``attention_impl`` runs for rows of ``length`` slots (no cache): ``xla``
  (``training_attention``), ``cudnn`` (``cudnn_attention``) or ``cpu_flash``
  (``cpu_attention.attention``; the config allows it with fp32 compute only). ``auto`` takes
  cuDNN where it runs: the default backend is a GPU, the compute dtype bf16/fp16, the head dim a
  multiple of 8 up to 128 (cuDNN's limits before Hopper) and the length even (cuDNN's rule for a
  bias in training); everywhere else ours. (JAX's own ``implementation=None`` is its XLA path, which keeps
  the B x N x L x L scores.) An explicit ``cudnn`` off a GPU is a ValueError."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f'attention_impl="cudnn" is cuDNN\'s fused attention and needs a GPU backend'
                     f' (this one is {jax.default_backend()}); use "auto" (cuDNN on a GPU, ours'
                     f' elsewhere) or "xla"')
  if impl != "auto":
    return impl
  runs_cudnn = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0)
  return "cudnn" if runs_cudnn else "xla"


def cudnn_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                    mask_Bx1xLxL: jax.Array, scale: float) -> jax.Array:
  """The ``cudnn`` attention of whole rows: cuDNN's fused (flash) attention through
  ``jax.nn.dot_product_attention`` (GPU; bf16/fp16). The mask is always causal by slot
  (``attention_mask``), so ``is_causal`` lets cuDNN skip the tiles above the diagonal; the boolean
  mask (segments, trees, windows) goes in as an additive bias."""
  return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_Bx1xLxL,
                                      scale=scale, is_causal=True, implementation="cudnn")


def training_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                       mask_Bx1xLxL: jax.Array, scale: float, tile: int | None = None) -> jax.Array:
  """The ``xla`` attention of whole rows (no cache): ``tiled_attention`` (only the key tiles
  some query sees) from 256 slots up, ``causal_attention`` below (``attention_tile``; ``tile``
  overrides it, 0 = the query blocks)."""
  tile = attention_tile(q_BxLxNxH.shape[1]) if tile is None else tile
  if tile:
    return tiled_attention.tiled_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, scale,
                                           tile)
  return causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, scale)


def dense(x: jax.Array, w_IxO: jax.Array, n_in: int = 1, preferred_element_type=None,
          gemm: str = "xla") -> jax.Array:
  """x [*rows, *in] times a weight stored [*in, *out] (its first ``n_in`` dims are the input) ->
  [*rows, *out], as one 2-D product [rows, in] x [in, out] (rows, input and output dims each
  flattened into one): the product and both of its gradients contract exactly one dim.

  Why: written as a 3-D einsum (``"bld,df->blf"``), the weight's gradient contracts two dims
  (b, l), and XLA CPU then materialises a transposed copy of the activation gradient (fused into
  its elementwise producer) before every weight-gradient dot. In a 6-layer SmolLM2-shaped MLP
  fwd + bwd those copies took ~0.4 s of ~1.6 s on an Intel Xeon; with the rows flattened every
  gradient is one plain GEMM and the same fwd + bwd took ~1.1 s, with bit-identical gradients
  (benchmarks/README.md, "Flattened rows"). The reshapes merge contiguous dims: bitcasts.

  ``gemm="mkl"`` (``ModelConfig.cpu_gemm``): an fp32 product runs as MKL's sgemm inside the
  program (``cpu_gemm.matmul``; one CPU device); other dtypes keep the paths below.
  """
  rows, out_dims = x.shape[:x.ndim - n_in], w_IxO.shape[n_in:]
  I, O = math.prod(w_IxO.shape[:n_in]), math.prod(out_dims)
  # Sharding survives the merges: a weight's sharded dim (heads, mlp) is the major one of those
  # it merges with, and so is the batch among the rows.
  x_MxI, w_IxO = x.reshape(-1, I), w_IxO.reshape(I, O)
  if preferred_element_type is None and cpu_bf16.applies(x_MxI.dtype, w_IxO.dtype):
    y_MxO = _cpu_low_precision_matmul(x_MxI, w_IxO)
  elif preferred_element_type in (None, jnp.float32) and cpu_gemm.applies(gemm, x_MxI.dtype,
                                                                          w_IxO.dtype):
    y_MxO = cpu_gemm.matmul(x_MxI, w_IxO)
  else:
    y_MxO = jnp.dot(x_MxI, w_IxO, preferred_element_type=preferred_element_type)
  return y_MxO.reshape(*rows, *out_dims)


@jax.custom_vjp
def _cpu_low_precision_matmul(x_MxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """``x @ w`` for bf16 operands on XLA:CPU, with the numbers a bf16 dot defines (bf16 products
  are exact in fp32, accumulated in fp32 in the GEMM library's order, rounded to bf16 once), run
  as a bf16 GEMM.

  Why: XLA:CPU runs a bf16 x bf16 -> bf16 dot as an fp32 GEMM (it converts both operands to fp32
  first), so bf16 compute was no faster than fp32 on a CPU (a SmolLM2 RW step: 15.8 s against
  16.0 s on an Intel Xeon with AMX). Asked for an fp32 result it keeps the bf16 operands and its
  GEMM library uses the CPU's bf16 units (AMX): [2048, 576] x [576, 1536] ran at 530-800 GFLOP/s
  against 150-180. The backward keeps that form: d x is the same kind of product (its weight
  operand contracting its minor dim, which the GEMM library also takes); d w contracts the rows,
  which XLA:CPU would run as an fp32 product, and goes through ``rows_contracted_dot``. The RW
  step: 10.9-11.5 s against 14.8-15.8 s, and 7.7-8.6 s with d w in bf16 too (benchmarks/README.md,
  "bf16 compute on a CPU"). Other backends never take this path.
  """
  return jnp.dot(x_MxI, w_IxO, preferred_element_type=jnp.float32).astype(x_MxI.dtype)


def _cpu_low_precision_matmul_fwd(x_MxI, w_IxO):
  return _cpu_low_precision_matmul(x_MxI, w_IxO), (x_MxI, w_IxO)


def _cpu_low_precision_matmul_bwd(residuals, d_y_MxO):
  x_MxI, w_IxO = residuals
  d_y_MxO = d_y_MxO.astype(x_MxI.dtype)
  # Each gradient sharded as its primal (what autodiff's transpose of a dot asks for too; a mesh
  # with explicit axes requires it when the contracted dim is sharded).
  d_x_MxI = jax.lax.dot_general(d_y_MxO, w_IxO, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32,
                                out_sharding=jax.typeof(x_MxI).sharding).astype(x_MxI.dtype)
  d_w_IxO = rows_contracted_dot(x_MxI, d_y_MxO,
                                 out_sharding=jax.typeof(w_IxO).sharding).astype(w_IxO.dtype)
  return d_x_MxI, d_w_IxO


_cpu_low_precision_matmul.defvjp(_cpu_low_precision_matmul_fwd, _cpu_low_precision_matmul_bwd)


def rows_contracted_dot(a_MxI: jax.Array, b_MxO: jax.Array, out_sharding=None, *,
                        wide: bool = False) -> jax.Array:
  """a^T b with an fp32 result (a weight's gradient: the rows contracted); for bf16 a, b on
  XLA:CPU, and with ``wide`` for any dtype there, run as a GEMM on a row-major copy of a^T.

  Why: XLA:CPU hands its GEMM library (YNNPACK, which uses AMX for bf16) no dot whose left
  operand contracts its major dim, and a^T b is exactly that, so it converted both operands to
  fp32 and ran an fp32 GEMM (110-145 GFLOP/s for SmolLM2's shapes on an Intel Xeon with AMX).
  A transposed copy alone does not help: XLA gives a transpose a layout that makes it free, and
  the simplifier folds it into the dot. ``with_layout_constraint`` asks layout assignment for
  a^T in row-major order, which makes it a real copy ([M, I] bf16, read once), and the product
  then contracts the copy's minor dim: a bf16 GEMM with an fp32 result, the same numbers (bf16
  products are exact in fp32, fp32 accumulation). Any other dtype or backend: the plain product.

  ``wide``: the lm head's [D, V] gradient (a few hundred rows, a vocabulary of columns). In fp32
  XLA:CPU runs a^T b there as an Eigen product that reads a^T in place, at 38-69 GFLOP/s for
  SmolLM2's D 576, V 49152 and M 128-1024 rows on a 2-core AMD EPYC, against 62-145 GFLOP/s for
  the row-major copy's plain product (the copy is [D, M], 0.3-2.4 MB; benchmarks/README.md,
  "Session 40"). The model's own weight gradients ([2048, 576-1536] by [2048, 192-1536]) keep
  the plain product, an Eigen dot: alone it is the slower form (102-140 against 144-172 GFLOP/s
  for a YNNPACK product of a row-major copy, which needs an optimization barrier as well, or the
  simplifier folds the copy back into an Eigen dot), but in the whole SRPO step the Eigen dots
  run beside the other work and the YNNPACK form ran 0.936x (benchmarks/README.md, "Session 54").
  """
  if cpu_bf16.applies(a_MxI.dtype, b_MxO.dtype) or (wide and jax.default_backend() == "cpu"):
    a_IxM = layout.with_layout_constraint(a_MxI.T, layout.Layout(major_to_minor=(0, 1)))
    return jax.lax.dot_general(a_IxM, b_MxO, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32, out_sharding=out_sharding)
  return jax.lax.dot_general(a_MxI, b_MxO, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32, out_sharding=out_sharding)


def out_in_dot(x: jax.Array, w_OxI: jax.Array, n_in: int, preferred_element_type=None) -> jax.Array:
  """x [*rows, *in] times a weight stored [*out, *in] (its last ``n_in`` dims are the input) ->
  [*rows, *out], as one 2-D product that contracts the weight's minor dim.

  The sampler's decode layout (``to_out_in``): for a decode step's few rows (M = batch) XLA CPU
  runs ``einsum("md,fd->mf")`` on [out, in] weights in ~25 % less CPU than ``x @ W[in, out]`` in
  a matmul-only microbenchmark; in the real decode jit (SmolLM2, batch 32) the step took 4-14 %
  less CPU (benchmarks/README.md, ``benchmarks/decode_layout.py``). The reshapes merge
  contiguous dims: bitcasts, no copies.
  """
  rows, out_dims = x.shape[:x.ndim - n_in], w_OxI.shape[:w_OxI.ndim - n_in]
  O, I = math.prod(out_dims), math.prod(w_OxI.shape[w_OxI.ndim - n_in:])
  x_MxI, w_OxI = x.reshape(-1, I), w_OxI.reshape(O, I)
  # bf16 on XLA:CPU: an fp32 result keeps the GEMM in bf16 (``_cpu_low_precision_matmul``), then
  # one rounding to bf16, as the bf16 dot would round it. Forward only (the decode copy).
  low = preferred_element_type is None and cpu_bf16.applies(x_MxI.dtype, w_OxI.dtype)
  y_MxO = jnp.einsum("mi,oi->mo", x_MxI, w_OxI,
                     preferred_element_type=jnp.float32 if low else preferred_element_type)
  return (y_MxO.astype(x.dtype) if low else y_MxO).reshape(*rows, *out_dims)


def vocab_rows_head(x: jax.Array, w_VxD: jax.Array) -> jax.Array:
  """x [*rows, D] times a head stored [V, D] (a tied embedding; the decode copy's head) -> fp32
  [*rows, V], computed as W @ x^T [V, rows] and transposed after an optimization barrier, so that
  XLA cannot fold the transpose back into the product.

  Why: XLA:CPU gives x @ W^T to its own Eigen dot, which reads the [V, D] weight across its rows,
  slowly. SmolLM2's head (49152 x 576) on an Intel Xeon: in the feature-major decode step
  (``decode_columns``, YNNPACK dots otherwise) 35 / 40 ms of a 108 / 144 ms step at batch 16 / 32,
  against 12.6 / 19.9 ms as W @ x^T; with XLA's own dots (the fp32 "rows" decode) 31 / 46 / 275 ms
  at 16 / 64 / 128 rows against 13 / 28 / 56 ms (benchmarks/README.md, session 58). The
  transpose afterwards copies the logits once (rows x V floats).
  """
  rows = x.shape[:-1]
  x_MxD = x.reshape(-1, x.shape[-1])
  y_VxM = jnp.dot(w_VxD.astype(x.dtype), x_MxD.T, preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(y_VxM).T.reshape(*rows, w_VxD.shape[0])


def write_slots(buffer_BxS: jax.Array, new_BxT: jax.Array, index_B: jax.Array) -> jax.Array:
  """Row b of ``new`` written into row b of ``buffer`` at slots index_B[b] .. index_B[b] + T - 1
  (trailing dims ride along)."""
  write_row = lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0)
  return jax.vmap(write_row)(buffer_BxS, new_BxT, index_B)


def unpack_cache(packed: Cache, row_B: jax.Array, slot_BxP: jax.Array, cache_len: int) -> Cache:
  """A decode cache of ``cache_len`` slots per batch row from a cache of packed prompt rows
  (``Transformer.prefill``): batch row b's slot s < P takes packed row row_B[b]'s slot
  slot_BxP[b, s] (-1: an empty slot: zeros, segment 0); slots P .. cache_len - 1 start empty.

  Keys and values depend only on the tokens and positions a slot attends to, so a prompt's slots
  hold the same values whether computed in a row of its own or packed beside other prompts (and
  beside one copy of a prefix all of them share) with a mask that keeps them apart."""
  empty_BxP = slot_BxP < 0
  slot_BxP = jnp.maximum(slot_BxP, 0)
  P = slot_BxP.shape[1]
  if cache_len < P:
    raise ValueError(f"unpack_cache: cache_len={cache_len} is shorter than the {P} prompt slots")

  def gather(buffer, batch_axis, slot_axis, axes):  # batch_axis < slot_axis in every layout
    rows = jnp.take(buffer, row_B, axis=batch_axis)  # one packed row per batch row
    take = lambda row, slots: jnp.take(row, slots, axis=slot_axis - 1)
    out = jax.vmap(take, in_axes=(batch_axis, 0), out_axes=batch_axis)(rows, slot_BxP)
    others = tuple(a for a in range(out.ndim) if a not in (batch_axis, slot_axis))
    out = jnp.where(jnp.expand_dims(~empty_BxP, others), out, jnp.zeros((), out.dtype))
    out = jnp.pad(out, [(0, cache_len - P) if a == slot_axis else (0, 0) for a in range(out.ndim)])
    return sharding.constrain(out, axes)  # as ``Transformer.init_cache`` lays the cache out

  if isinstance(packed.keys, tuple):  # per layer: keys [R, K, H, S], values [R, K, S, H]
    keys = tuple(gather(k, 0, 3, CACHE_KEY_AXES) for k in packed.keys)
    values = tuple(gather(v, 0, 2, CACHE_VALUE_AXES) for v in packed.values)
  else:  # scanned: [Y, R, K, H, S] and [Y, R, K, S, H]
    keys = gather(packed.keys, 1, 4, ("layers",) + CACHE_KEY_AXES)
    values = gather(packed.values, 1, 3, ("layers",) + CACHE_VALUE_AXES)
  segment_ids_BxS = jnp.pad((~empty_BxP).astype(jnp.int32), [(0, 0), (0, cache_len - P)])
  return Cache(keys, values, sharding.constrain(segment_ids_BxS, CACHE_SEGMENT_AXES))


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, config: ModelConfig, names=("norm",)):
    self.eps = float(config.rms_norm_eps)
    self.offset = float(config.norm_offset)
    # Gemma stores w with the scale (1 + w), so its identity is w = 0.
    self.scale_D = _param(None, (dim,), config.param_dtype, names,
                          init="zeros" if self.offset else "ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale_D[...], self.eps, self.offset, axis=-1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float, axis: int) -> jax.Array:
  """RMS norm of ``x`` over ``axis`` in fp32, times ``scale`` (broadcast against ``x``); Gemma's
  ``offset`` multiplies by (offset + scale) in fp32 before the cast back."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  y32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
  if offset:
    return (y32 * (offset + scale.astype(jnp.float32))).astype(dtype)
  return scale.astype(dtype) * y32.astype(dtype)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    pd = c.param_dtype
    self.config = c
    self.out_in = False  # True in the sampler's decode copy (``to_out_in``): weights [out, in]
    self.wq_DxNxH = _param(rngs, (D, N, H), pd, ("embed", "heads", "head_dim"))
    self.wk_DxKxH = _param(rngs, (D, K, H), pd, ("embed", "kv_heads", "head_dim"))
    self.wv_DxKxH = _param(rngs, (D, K, H), pd, ("embed", "kv_heads", "head_dim"))
    self.wo_NxHxD = _param(rngs, (N, H, D), pd, ("heads", "head_dim", "embed"))
    if c.attention_bias:
      self.bq_NxH = _param(None, (N, H), pd, ("heads", "head_dim"), init="zeros")
      self.bk_KxH = _param(None, (K, H), pd, ("kv_heads", "head_dim"), init="zeros")
      self.bv_KxH = _param(None, (K, H), pd, ("kv_heads", "head_dim"), init="zeros")
    if c.qk_norm:
      self.q_norm = RMSNorm(H, c, names=("head_dim",))
      self.k_norm = RMSNorm(H, c, names=("head_dim",))

  def __call__(self, x_BxLxD, cos_BxLxH, sin_BxLxH, mask_Bx1xTxS, kv_cache=None, write_index_B=None):
    """``mask_Bx1xTxS``: with ``kv_cache`` the boolean [B, 1, T, S] mask over the cache's slots;
    without, whole rows' ``RowsMask``."""
    c = self.config
    dt = x_BxLxD.dtype
    if self.out_in:
      q = out_in_dot(x_BxLxD, self.wq_NxHxD[...].astype(dt), 1)
      k = out_in_dot(x_BxLxD, self.wk_KxHxD[...].astype(dt), 1)
      v = out_in_dot(x_BxLxD, self.wv_KxHxD[...].astype(dt), 1)
    else:
      q = dense(x_BxLxD, self.wq_DxNxH[...].astype(dt), gemm=c.cpu_gemm)
      k = dense(x_BxLxD, self.wk_DxKxH[...].astype(dt), gemm=c.cpu_gemm)
      v = dense(x_BxLxD, self.wv_DxKxH[...].astype(dt), gemm=c.cpu_gemm)
    if c.attention_bias:
      q, k, v = q + self.bq_NxH[...].astype(dt), k + self.bk_KxH[...].astype(dt), v + self.bv_KxH[...].astype(dt)
    if c.qk_norm:  # Qwen3: per-head RMSNorm before RoPE.
      q, k = self.q_norm(q), self.k_norm(k)
    q_BxLxNxH = sharding.constrain(apply_rope(q, cos_BxLxH, sin_BxLxH),
                                   ("batch", "length", "act_heads", "head_dim"))
    k_BxLxKxH = sharding.constrain(apply_rope(k, cos_BxLxH, sin_BxLxH),
                                   ("batch", "length", "act_kv_heads", "head_dim"))
    v_BxLxKxH = sharding.constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))

    new_cache = None
    if kv_cache is not None and isinstance(mask_Bx1xTxS, RowsMask):
      # Whole rows into a fresh cache of exactly their L slots (``Transformer.prefill``), with the
      # rows' own attention.
      cache_k_BxKxHxS, cache_v_BxKxSxH = kv_cache
      new_cache = (jax.lax.dynamic_update_slice_in_dim(
                       cache_k_BxKxHxS, k_BxLxKxH.transpose(0, 2, 3, 1).astype(cache_k_BxKxHxS.dtype),
                       0, 3),
                   jax.lax.dynamic_update_slice_in_dim(
                       cache_v_BxKxSxH, v_BxLxKxH.transpose(0, 2, 1, 3).astype(cache_v_BxKxSxH.dtype),
                       0, 2))
      out_BxTxNxH = self._rows_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xTxS)
    elif kv_cache is not None:
      out_BxTxNxH, new_cache = write_and_attend(
          q_BxLxNxH, k_BxLxKxH.transpose(0, 2, 3, 1), v_BxLxKxH.transpose(0, 2, 1, 3), kv_cache,
          mask_Bx1xTxS, write_index_B[0], c.head_dim ** -0.5)
    else:
      out_BxTxNxH = self._rows_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xTxS)
    # wo contracts (N, H) as ONE flat dim (``dense``): as a two-axis contraction XLA CPU copied a
    # transposed wo on every decode step.
    if self.out_in:
      return out_in_dot(out_BxTxNxH, self.wo_DxNxH[...].astype(dt), 2), new_cache
    return dense(out_BxTxNxH, self.wo_NxHxD[...].astype(dt), 2, gemm=c.cpu_gemm), new_cache

  def _rows_attention(self, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask: RowsMask) -> jax.Array:
    """The attention of whole rows (``attention_impl``; ``training_attention_impl``)."""
    c = self.config
    scale = c.head_dim ** -0.5
    impl = training_attention_impl(c.attention_impl, q_BxLxNxH.dtype, c.head_dim,
                                   q_BxLxNxH.shape[1])
    if impl == "xla":
      return training_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask.visible_Bx1xLxL, scale,
                                mask.tile)
    if impl == "cpu_flash":
      return cpu_attention.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                     cpu_attention.mask_bias(mask.visible_Bx1xLxL), scale)
    return cudnn_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask.visible_Bx1xLxL, scale)


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    D, F, pd = config.hidden_size, config.intermediate_size, config.param_dtype
    self.hidden_act = config.hidden_act
    self.gemm = config.cpu_gemm
    self.out_in = False  # see Attention
    self.w_gate_DxF = _param(rngs, (D, F), pd, ("embed", "mlp"))
    self.w_up_DxF = _param(rngs, (D, F), pd, ("embed", "mlp"))
    self.w_down_FxD = _param(rngs, (F, D), pd, ("mlp", "embed"))

  def __call__(self, x_BxLxD):
    dt = x_BxLxD.dtype
    if self.out_in:
      gate = out_in_dot(x_BxLxD, self.w_gate_FxD[...].astype(dt), 1)
      up = out_in_dot(x_BxLxD, self.w_up_FxD[...].astype(dt), 1)
    else:
      gate = dense(x_BxLxD, self.w_gate_DxF[...].astype(dt), gemm=self.gemm)
      up = dense(x_BxLxD, self.w_up_DxF[...].astype(dt), gemm=self.gemm)
    if self.hidden_act == "silu":
      act = jax.nn.silu(gate)
    else:  # Gemma's gelu_pytorch_tanh is the tanh approximation; plain "gelu" is exact erf.
      act = jax.nn.gelu(gate, approximate=self.hidden_act == "gelu_tanh")
    h_BxLxF = sharding.constrain(act * up, ("batch", "length", "act_mlp"))
    if self.out_in:
      return out_in_dot(h_BxLxF, self.w_down_DxF[...].astype(dt), 1)
    return dense(h_BxLxF, self.w_down_FxD[...].astype(dt), gemm=self.gemm)


class Block(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BxLxD, cos, sin, mask, kv_cache=None, write_index_B=None):
    attn_out, new_cache = self.attn(self.attn_norm(x_BxLxD), cos, sin, mask, kv_cache, write_index_B)
    x_BxLxD = sharding.constrain(x_BxLxD + attn_out, ("batch", "length", "act_embed"))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed")), new_cache


def _run_block(block: Block, x, cos, sin, mask):
  return block(x, cos, sin, mask)[0]


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose every weight has a leading layer axis Y = num_layers (logical axis "layers"),
  slice i = the weights the unscanned model's layer i gets from the same ``rngs``.

  The Y blocks are drawn one by one, exactly as the unscanned model draws them, then stacked: a
  random model is the same model in either layout (tests compare them step for step, and a run
  may switch the flag). Only this init program grows with depth (Y x 7 random draws); the
  forward and train steps, which dominate compile time, scan.
  """
  blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
  graphdef, _ = nnx.split(blocks[0])
  flat = [nnx.to_flat_state(nnx.state(b)) for b in blocks]
  stacked = []
  for n, (path, first) in enumerate(flat[0]):
    var = first.replace(jnp.stack([f[n][1][...] for f in flat]))
    names = first.get_metadata().get("out_sharding")
    if names is not None:
      var.set_metadata(out_sharding=("layers",) + tuple(names))
    stacked.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


_REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it all on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Decoder-only transformer; see BUILD.md "Model" for the calling contract."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    c = config
    self.config = c
    self.out_in = False  # see Attention; the untied head is then lm_head_VxD
    V, Vp, D = c.vocab_size, c.padded_vocab_size, c.hidden_size
    pad_rows = jnp.arange(Vp)[:, None] < V  # padding rows start (and stay, on load) at zero
    embed = _param(rngs, (Vp, D), c.param_dtype, ("vocab", "embed"))
    self.embed_VxD = nnx.Param(jnp.where(pad_rows, embed[...], 0).astype(c.param_dtype),
                               out_sharding=("vocab", "embed"))
    if c.scan_layers:  # one Block of stacked weights [Y, ...], run by lax.scan (see _scan_layers)
      self.layers = _stacked_blocks(c, rngs)
    else:
      self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(D, c)
    if not c.tie_embeddings:
      head = _param(rngs, (D, Vp), c.param_dtype, ("embed", "vocab"))
      self.lm_head_DxV = nnx.Param(jnp.where(pad_rows.T, head[...], 0).astype(c.param_dtype),
                                   out_sharding=("embed", "vocab"))

  # -- public API ------------------------------------------------------------------------------

  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, *, cache: Cache | None = None,
               cache_index=None, last_only: bool = False,
               cache_windows: tuple[tuple[int, int], ...] | None = None):
    """Logits [B, L, vocab_size] float32; with ``cache``, returns (logits, updated cache).

    ``last_only``: logits of the last column only, [B, 1, vocab_size] (a prefill needs no others;
    the unembedding of the other columns is never computed). ``cache_windows``: ``cache`` is a
    grouped cache, one Cache per window ((first row r_g, first slot s_g), ...) holding rows
    r_g .. r_(g+1) - 1 and slots s_g .. on (``write_and_attend``); returned grouped likewise."""
    hidden_BxLxD, new_cache = self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, cache,
                                            cache_index, cache_windows=cache_windows)
    if last_only:
      hidden_BxLxD = hidden_BxLxD[:, -1:]
    decode_step = cache is not None and tokens_BxL.shape[1] == 1
    logits_BxLxV = self.logits(hidden_BxLxD, decode_step=decode_step)
    return logits_BxLxV if cache is None else (logits_BxLxV, new_cache)

  def prefill(self, tokens_RxL, positions_RxL, segment_ids_RxL,
              subtree_end_RxL) -> tuple[jax.Array, Cache]:
    """Whole rows into a fresh cache of exactly their L slots: (final-norm hidden states
    [R, L, D], the cache). The rows may hold several prompts each, kept apart by
    ``subtree_end_RxL`` (``attention_mask``; the sampler packs prompts as token trees under the
    prefix they share), and run the rows' attention (``attention_impl``, with its tiles), not
    the cache's."""
    R, L = jnp.shape(tokens_RxL)
    return self._forward(tokens_RxL, positions_RxL, segment_ids_RxL, self.init_cache(R, L), 0,
                         subtree_end_RxL)

  def logits(self, hidden_BxLxD: jax.Array, *, decode_step: bool = False) -> jax.Array:
    """Float32 logits [B, L, vocab_size] of final-norm hidden states. ``decode_step``: one
    column of a decode step (picks the CPU head layout below)."""
    if self.out_in:
      head_VxD = self.embed_VxD[...] if self.config.tie_embeddings else self.lm_head_VxD[...]
      logits_BxLxV = out_in_dot(hidden_BxLxD, head_VxD.astype(hidden_BxLxD.dtype), 1,
                                preferred_element_type=jnp.float32)
    elif (decode_step and self.config.tie_embeddings and hidden_BxLxD.dtype == jnp.float32
          and jax.default_backend() == "cpu"):
      # A CPU decode step with a tied head: its products run with XLA's own dots in fp32
      # ("rows" layout, ``sample.decode_plan``), which take h @ E^T through a slow Eigen kernel.
      logits_BxLxV = vocab_rows_head(hidden_BxLxD, self.embed_VxD[...])
    else:
      logits_BxLxV = dense(hidden_BxLxD, self.unembed_DxV().astype(hidden_BxLxD.dtype),
                           preferred_element_type=jnp.float32)
    logits_BxLxV = sharding.constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
    return logits_BxLxV[..., :self.config.vocab_size]

  def hidden_states(self, tokens_BxL, positions_BxL, segment_ids_BxL,
                    subtree_end_BxL=None) -> jax.Array:
    """Final-norm hidden states [B, L, D] in the compute dtype (for chunked log-probs).
    ``subtree_end_BxL``: prefix-shared DPO rows, see ``attention_mask``."""
    return self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, None, None, subtree_end_BxL)[0]

  def unembed_DxV(self) -> jax.Array:
    """Output projection [D, padded_vocab_size]; columns >= config.vocab_size are padding."""
    if self.config.tie_embeddings:
      return self.embed_VxD[...].T
    return self.lm_head_VxD[...].T if self.out_in else self.lm_head_DxV[...]

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    c = self.config
    dtype = jnp.dtype(dtype or c.compute_dtype)
    K, H = c.num_kv_heads, c.head_dim
    zeros = lambda shape, names: sharding.constrain(jnp.zeros(shape, dtype), names)
    if c.scan_layers:  # one stacked buffer per kind, scanned alongside the stacked weights
      Y = c.num_layers
      return Cache(keys=zeros((Y, batch, K, H, max_len), ("layers",) + CACHE_KEY_AXES),
                   values=zeros((Y, batch, K, max_len, H), ("layers",) + CACHE_VALUE_AXES),
                   segment_ids_BxS=sharding.constrain(jnp.zeros((batch, max_len), jnp.int32),
                                                      CACHE_SEGMENT_AXES))
    layers = range(c.num_layers)
    return Cache(keys=tuple(zeros((batch, K, H, max_len), CACHE_KEY_AXES) for _ in layers),
                 values=tuple(zeros((batch, K, max_len, H), CACHE_VALUE_AXES) for _ in layers),
                 segment_ids_BxS=sharding.constrain(jnp.zeros((batch, max_len), jnp.int32),
                                                    CACHE_SEGMENT_AXES))

  # -- internals -------------------------------------------------------------------------------

  def _forward(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache, cache_index,
               subtree_end_BxL=None, cache_windows=None):
    c = self.config
    dt = jnp.dtype(c.compute_dtype)
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    segment_ids_BxL = jnp.asarray(segment_ids_BxL, jnp.int32)
    B, L = tokens_BxL.shape
    # Gather the table's embed dim (FSDP all-gather) before the lookup: a lookup into an
    # fsdp-sharded embed dim would leave D sharded where the batch must be, a full reshuffle.
    embed_VxD = sharding.constrain(self.embed_VxD[...], ("vocab", None))
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dt)
    if c.embed_scale:  # Gemma rounds sqrt(D) to the compute dtype before multiplying.
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(c.hidden_size), dt)
    x_BxLxD = sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(c, jnp.asarray(positions_BxL))

    if cache is None:
      slots_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
      mask = RowsMask(
          attention_mask(slots_BxL, segment_ids_BxL, segment_ids_BxL, c.sliding_window,
                         None if subtree_end_BxL is None else jnp.asarray(subtree_end_BxL, jnp.int32),
                         jnp.asarray(positions_BxL, jnp.int32)),
          attention_tile(L, trees=subtree_end_BxL is not None))
      if c.scan_layers:
        x_BxLxD, _ = self._scan_layers(x_BxLxD, cos, sin, mask)
        return self.final_norm(x_BxLxD), None
      run = _run_block
      if c.remat != "none":
        run = nnx.remat(_run_block, policy=_REMAT_POLICIES[c.remat])
      for block in self.layers:
        x_BxLxD = run(block, x_BxLxD, cos, sin, mask)
      return self.final_norm(x_BxLxD), None

    # A grouped cache (``cache_windows``): one Cache per group of rows, group g holding the slots
    # s_g .. max_len - 1 (``write_and_attend``).
    windows = None if cache_windows is None else tuple(tuple(w) for w in cache_windows)
    max_len = (0 if windows is None else windows[0][1]) + \
        cache_groups(cache, windows)[0].segment_ids_BxS.shape[1]
    if isinstance(cache_index, int) and not 0 <= cache_index <= max_len - L:
      # dynamic_update_slice would clamp the start and silently overwrite earlier slots.
      raise ValueError(f"cache_index={cache_index} + {L} new tokens does not fit the cache of "
                       f"length {max_len}; allocate init_cache(batch, max_len >= {cache_index + L})")
    if jnp.ndim(cache_index) != 0:
      raise ValueError(f"cache_index must be a scalar (every row writes the same slot; the sampler"
                       f" left-pads so rows share columns), got shape {jnp.shape(cache_index)}")
    write_index_B = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (B,))
    if subtree_end_BxL is not None:  # whole rows (``prefill``): the rows' own attention
      if not (isinstance(cache_index, int) and cache_index == 0 and L == max_len and windows is None):
        raise ValueError(f"whole rows with subtree_end fill a fresh cache of exactly their {L}"
                         f" slots from slot 0; got cache_index={cache_index}, cache of {max_len}")
      cache_segments = write_slots(cache.segment_ids_BxS, segment_ids_BxL, write_index_B)
      slots_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
      mask = RowsMask(attention_mask(slots_BxL, segment_ids_BxL, segment_ids_BxL, c.sliding_window,
                                     jnp.asarray(subtree_end_BxL, jnp.int32),
                                     jnp.asarray(positions_BxL, jnp.int32)),
                      attention_tile(L, trees=True))
    else:
      cache_segments, mask = cache_mask(cache_segment_ids(cache, windows), segment_ids_BxL,
                                        cache_index, c.sliding_window, windows)
    if c.scan_layers:
      x_BxLxD, new_kv = self._scan_layers(x_BxLxD, cos, sin, mask, layer_kv(cache, windows),
                                          write_index_B)
    else:
      new_kv = []
      for i, block in enumerate(self.layers):
        x_BxLxD, kv = block(x_BxLxD, cos, sin, mask, layer_kv(cache, windows, i), write_index_B)
        new_kv.append(kv)
    return self.final_norm(x_BxLxD), rebuild_cache(new_kv, cache_segments, windows,
                                                   stacked=c.scan_layers)

  def _scan_layers(self, x_BxLxD, cos, sin, mask, kv_YxBx=None, write_index_B=None):
    """The stacked blocks run by one ``jax.lax.scan`` over the layer axis: XLA compiles the body
    once, so compile time does not grow with depth.

    The layer weights (and, when decoding, the stacked cache) are the scan's ``xs``; the hidden
    state is the carry. The body is a pure function of arrays (the Block is rebuilt from its
    slice by ``nnx.merge``), so ``jax.checkpoint`` applies the remat policy to each layer exactly
    as ``nnx.remat`` does unscanned. Returns (hidden, (keys, values) stacked, or None).
    """
    c = self.config
    graphdef, state_Y = nnx.split(self.layers)  # Variables are pytrees: lax.scan slices them

    def body(x_BxLxD, layer):
      layer_state, kv = layer
      return nnx.merge(graphdef, layer_state)(x_BxLxD, cos, sin, mask, kv, write_index_B)

    if kv_YxBx is None and c.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
    return jax.lax.scan(body, x_BxLxD, (state_Y, kv_YxBx))


# ---------------------------------------------------------------------------------------------
# The sampler's decode layout: projection, MLP and untied lm-head weights stored [out, in]

# Training-layout name -> (decode-layout name, number of leading INPUT dims, rank per layer).
OUT_IN_WEIGHTS: dict[str, tuple[str, int, int]] = {
    "wq_DxNxH": ("wq_NxHxD", 1, 3),
    "wk_DxKxH": ("wk_KxHxD", 1, 3),
    "wv_DxKxH": ("wv_KxHxD", 1, 3),
    "wo_NxHxD": ("wo_DxNxH", 2, 3),
    "w_gate_DxF": ("w_gate_FxD", 1, 2),
    "w_up_DxF": ("w_up_FxD", 1, 2),
    "w_down_FxD": ("w_down_DxF", 1, 2),
    "lm_head_DxV": ("lm_head_VxD", 1, 2),
}


def _copy_dtype(dtype, config: ModelConfig, in_compute_dtype: bool):
  """The dtype ``to_out_in`` stores an array of ``dtype`` in."""
  compute = jnp.dtype(config.compute_dtype)
  narrower = in_compute_dtype and jnp.dtype(dtype).itemsize > compute.itemsize
  return compute if narrower else jnp.dtype(dtype)


def _out_in_modules(model: Transformer) -> list[nnx.Module]:
  """The modules whose weights ``to_out_in`` moves (and flags ``out_in``)."""
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, (Attention, MLP, Transformer))]


def _moved_weights(modules: list[nnx.Module]) -> list[tuple[nnx.Module, str, nnx.Variable]]:
  """(module, training-layout name, variable) of every weight ``to_out_in`` moves, given
  ``_out_in_modules``."""
  return [(module, name, getattr(module, name)) for module in modules
          for name in OUT_IN_WEIGHTS if getattr(module, name, None) is not None]


def out_in_copy_bytes(model: Transformer, *, in_compute_dtype: bool = True) -> int:
  """Bytes of the arrays ``to_out_in(model)`` makes (the moved weights, and the embedding when it
  is cast to the compute dtype); 0 if ``model`` already is a copy."""
  if model.out_in:
    return 0
  nbytes = lambda a: a.size * _copy_dtype(a.dtype, model.config, in_compute_dtype).itemsize
  total = sum(nbytes(var[...]) for _, _, var in _moved_weights(_out_in_modules(model)))
  embed = model.embed_VxD[...]
  return total + (nbytes(embed) if nbytes(embed) != embed.nbytes else 0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _transposed(values: list[jax.Array], perms: tuple, dtypes: tuple) -> list[jax.Array]:
  """``to_out_in``'s moved weights, permuted and cast, in one program: one dispatch instead of one
  per array (SmolLM2's 210 transposes: 0.193 -> 0.172 s a copy, median of 8 alternating calls;
  the rest is the copy's memory traffic)."""
  return [jnp.transpose(v, p).astype(d) for v, p, d in zip(values, perms, dtypes)]


def to_out_in(model: Transformer, *, in_compute_dtype: bool = True) -> Transformer:
  """A copy of ``model`` whose projection, MLP and untied lm-head weights are stored [out, in]
  (``OUT_IN_WEIGHTS``; ``out_in_dot`` says why), for the sampler's decode. ``model`` itself if it
  already is one: a caller that only samples can convert once and pass the copy to every
  ``sample.generate`` call (no per-call copy). Concrete arrays only (not under ``eval_shape``'s
  abstract leaves: wrap the whole construction in ``nnx.eval_shape`` for shapes).

  Same products, same fp32 accumulation; only the weights' memory layout differs. The transposed
  weights are new arrays (for SmolLM2-135M +425 MB while the copy lives); every other array
  (norms, biases, and the embedding unless cast below) is shared with ``model``, not copied.
  ``model`` is unchanged. Scanned models keep their leading layer axis. Transposes keep each
  weight's logical sharding names (permuted alike); the caller places the copy
  (``sharding.state_shardings``).

  ``in_compute_dtype`` (default): when the compute dtype is narrower than the weights' (bf16
  compute over fp32 master weights), the moved weights and the embedding (the tied head) are
  stored in the compute dtype. Every product (and the embedding lookup) casts them to it at use
  anyway, so the decode computes the same numbers (tests/test_sample_speed_paths.py) from half the
  copy's memory (SmolLM2-135M: 212 MB instead of 425). Not a speed change: XLA:CPU had fused the
  per-step conversion into the products (SmolLM2 bf16, batch 16, 96 new tokens: 7.26-8.57 s per
  call against 7.49-8.43 s).
  """
  if model.out_in:
    return model
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)  # new Modules and Variables over the same arrays

  def stored(value: jax.Array) -> jax.Array:
    dtype = _copy_dtype(value.dtype, model.config, in_compute_dtype)
    return value if dtype == value.dtype else value.astype(dtype)

  modules = _out_in_modules(copy)
  weights = _moved_weights(modules)
  perms, dtypes = [], []
  for _, name, var in weights:
    _, n_in, rank = OUT_IN_WEIGHTS[name]
    lead = var[...].ndim - rank  # 1 for a scanned model's stacked [Y, ...] weights
    dims = list(range(var[...].ndim))
    perms.append(tuple(dims[:lead] + dims[lead + n_in:] + dims[lead:lead + n_in]))
    dtypes.append(_copy_dtype(var[...].dtype, model.config, in_compute_dtype).name)
  values = _transposed([var[...] for _, _, var in weights], tuple(perms), tuple(dtypes))
  for (module, name, var), perm, value in zip(weights, perms, values):
    new_name = OUT_IN_WEIGHTS[name][0]
    moved = var.replace(value)
    names = var.get_metadata().get("out_sharding")
    if names is not None:
      moved.set_metadata(out_sharding=tuple(names[i] for i in perm))
    delattr(module, name)
    setattr(module, new_name, moved)
  for module in modules:
    module.out_in = True
  copy.embed_VxD = copy.embed_VxD.replace(stored(copy.embed_VxD[...]))
  return copy


# ---------------------------------------------------------------------------------------------
# Layouts: per-layer params (layers.{i}.…) <-> stacked params (layers.… with a leading layer axis)


def stack_layers(params: nnx.State, num_layers: int) -> nnx.State:
  """Params of an unscanned model as the params of the same model with ``scan_layers=True``:
  ``layers.{i}.<rest>`` [..] -> ``layers.<rest>`` [Y, ..], slice i = layer i."""
  per_layer: dict[tuple, list] = {}
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path[0] == "layers":
      per_layer.setdefault(tuple(path[2:]), [None] * num_layers)[int(path[1])] = var
    else:
      flat.append((path, var))
  for rest, vars_ in per_layer.items():
    if any(v is None for v in vars_):
      raise ValueError(f"stack_layers: layers.*.{'.'.join(map(str, rest))} is missing for some of"
                       f" the {num_layers} layers")
    names = vars_[0].get_metadata().get("out_sharding")
    stacked = vars_[0].replace(jnp.stack([v[...] for v in vars_]))
    if names is not None:
      stacked.set_metadata(out_sharding=("layers",) + tuple(names))
    flat.append((("layers",) + rest, stacked))
  return nnx.from_flat_state(flat)


def unstack_layers(params: nnx.State) -> nnx.State:
  """The inverse of ``stack_layers``: ``layers.<rest>`` [Y, ..] -> ``layers.{i}.<rest>``."""
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path[0] != "layers":
      flat.append((path, var))
      continue
    names = var.get_metadata().get("out_sharding")
    value_Y = var[...]
    for i in range(value_Y.shape[0]):
      one = var.replace(value_Y[i])
      if names is not None:
        one.set_metadata(out_sharding=tuple(names)[1:])
      flat.append((("layers", i) + tuple(path[1:]), one))
  return nnx.from_flat_state(flat)
