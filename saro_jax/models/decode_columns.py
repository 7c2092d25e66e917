"""One decode step with the activations stored feature-major: [features, batch] ("columns").

A decode step's products have few rows (M = the batch). On XLA:CPU the product W[out, in] @ h[in, B]
of a weight stored [out, in] (``transformer.to_out_in``) with activations whose minor dim is the
batch runs faster than any row-major form x[B, in] @ W (benchmarks/decode_products.py: SmolLM2's
products at batch 32, 79 ms against 102 ms for today's row decode). XLA folds a transpose that
sits right beside a dot back into it, so the gain needs the whole step in columns: embedding,
norms, q/k/v, rope, residuals, MLP and the lm head all keep [D, B]-shaped activations. Only the
attention over the cache turns the few query values into rows ([B, 1, N, H], a few KB per layer,
for the row decode's own ``transformer.cached_attention``), since the cache keeps its layouts
(``transformer.Cache``): prefill, cache grafting and every other consumer stay as they are.

Same arithmetic as ``Transformer.__call__`` with a cache and one new column (fp32 norms, rope from
the same tables, fp32 attention logits and softmax); only the order of the products' sums may
differ, so logits agree to fp32 roundoff (tests/test_sample_speed_paths.py). fp32 compute only:
this is XLA:CPU's fp32 decode path, and XLA:CPU's plain dots take no bf16 x bf16 -> fp32
(bf16 decoding keeps ``transformer.out_in_dot``'s ``cpu_bf16`` products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saro_jax.models import transformer
from saro_jax.models.config import ModelConfig


def _norm(x: jax.Array, scale: jax.Array, config: ModelConfig, axis: int) -> jax.Array:
  """``transformer.RMSNorm`` over ``axis``; ``scale`` broadcast along the other dims."""
  return transformer.rms_norm(x, scale, float(config.rms_norm_eps), float(config.norm_offset), axis)


def _project(w_OxI: jax.Array, h_IxB: jax.Array, dtype) -> jax.Array:
  """W[out..., in] @ h[in, B] -> [out..., B] as one 2-D product (the reshapes are bitcasts)."""
  out_dims = w_OxI.shape[:-1]
  y_OxB = jnp.dot(w_OxI.reshape(-1, w_OxI.shape[-1]).astype(dtype), h_IxB)
  return y_OxB.reshape(*out_dims, h_IxB.shape[-1])


def _layer(config: ModelConfig, p: dict, x_DxB, cos_HxB, sin_HxB, mask_Bx1x1xS, kv_cache, slot):
  """One decoder block on columns; returns (x_DxB, the layer's cache with the new slot written:
  (keys, values), or one such pair per group of a grouped cache)."""
  c = config
  dt = x_DxB.dtype
  N, H = c.num_heads, c.head_dim
  B = x_DxB.shape[1]
  h_DxB = _norm(x_DxB, p["attn_norm"][:, None], c, axis=0)
  q_NxHxB = _project(p["wq"], h_DxB, dt)
  k_KxHxB = _project(p["wk"], h_DxB, dt)
  v_KxHxB = _project(p["wv"], h_DxB, dt)
  if c.attention_bias:
    q_NxHxB = q_NxHxB + p["bq"][..., None].astype(dt)
    k_KxHxB = k_KxHxB + p["bk"][..., None].astype(dt)
    v_KxHxB = v_KxHxB + p["bv"][..., None].astype(dt)
  if c.qk_norm:
    q_NxHxB = _norm(q_NxHxB, p["q_norm"][:, None], c, axis=1)
    k_KxHxB = _norm(k_KxHxB, p["k_norm"][:, None], c, axis=1)
  q_NxHxB = transformer.rotate(q_NxHxB, cos_HxB, sin_HxB, axis=1)
  k_KxHxB = transformer.rotate(k_KxHxB, cos_HxB, sin_HxB, axis=1)

  k_BxKxHx1 = k_KxHxB.transpose(2, 0, 1)[..., None]
  v_BxKx1xH = v_KxHxB.transpose(2, 0, 1)[:, :, None, :]
  q_Bx1xNxH = q_NxHxB.transpose(2, 0, 1)[:, None]
  out_Bx1xNxH, kv_cache = transformer.write_and_attend(q_Bx1xNxH, k_BxKxHx1, v_BxKx1xH, kv_cache,
                                                       mask_Bx1x1xS, slot, H ** -0.5)
  out_NHxB = out_Bx1xNxH.reshape(B, N * H).T
  x_DxB = x_DxB + _project(p["wo"].reshape(-1, N * H), out_NHxB, dt)

  h_DxB = _norm(x_DxB, p["mlp_norm"][:, None], c, axis=0)
  gate_FxB = _project(p["w_gate"], h_DxB, dt)
  up_FxB = _project(p["w_up"], h_DxB, dt)
  if c.hidden_act == "silu":
    act_FxB = jax.nn.silu(gate_FxB)
  else:
    act_FxB = jax.nn.gelu(gate_FxB, approximate=c.hidden_act == "gelu_tanh")
  x_DxB = x_DxB + _project(p["w_down"], act_FxB * up_FxB, dt)
  return x_DxB, kv_cache


def _layer_arrays(block) -> dict:
  """A block's (or the stacked blocks') arrays in the decode copy's [out, in] layout."""
  attn, mlp = block.attn, block.mlp
  p = dict(attn_norm=block.attn_norm.scale_D[...], mlp_norm=block.mlp_norm.scale_D[...],
           wq=attn.wq_NxHxD[...], wk=attn.wk_KxHxD[...], wv=attn.wv_KxHxD[...],
           wo=attn.wo_DxNxH[...], w_gate=mlp.w_gate_FxD[...], w_up=mlp.w_up_FxD[...],
           w_down=mlp.w_down_DxF[...])
  if attn.config.attention_bias:
    p.update(bq=attn.bq_NxH[...], bk=attn.bk_KxH[...], bv=attn.bv_KxH[...])
  if attn.config.qk_norm:
    p.update(q_norm=attn.q_norm.scale_D[...], k_norm=attn.k_norm.scale_D[...])
  return p


def decode_step(model: transformer.Transformer, cache: transformer.Cache, tokens_B: jax.Array,
                positions_B: jax.Array, cache_index,
                cache_windows: tuple[tuple[int, int], ...] | None = None,
                ) -> tuple[jax.Array, transformer.Cache]:
  """Logits [B, vocab_size] (float32) of one new token per row, and the cache with it written at
  slot ``cache_index`` (a scalar: the sampler's rows share a column). ``model``: the decode copy
  (``transformer.to_out_in``). ``cache_windows``: as ``Transformer.__call__``'s."""
  if not model.out_in:
    raise ValueError("decode_columns.decode_step reads the [out, in] decode copy: pass "
                     "transformer.to_out_in(model)")
  c = model.config
  if jnp.dtype(c.compute_dtype) != jnp.float32:
    raise ValueError(f"decode_columns.decode_step computes in float32; this model's compute_dtype"
                     f" is {c.compute_dtype} (decode it with decode_layout 'out_in' or 'rows')")
  dt = jnp.dtype(c.compute_dtype)
  B = tokens_B.shape[0]
  x_DxB = jnp.take(model.embed_VxD[...], tokens_B, axis=0).astype(dt).T
  if c.embed_scale:
    x_DxB = x_DxB * jnp.asarray(c.hidden_size ** 0.5, dt)
  cos_Bx1xH, sin_Bx1xH = transformer.rope_cos_sin(c, positions_B[:, None])
  cos_HxB, sin_HxB = cos_Bx1xH[:, 0].T, sin_Bx1xH[:, 0].T
  slot = jnp.asarray(cache_index, jnp.int32)
  windows = None if cache_windows is None else tuple(tuple(w) for w in cache_windows)
  segments, mask = transformer.cache_mask(transformer.cache_segment_ids(cache, windows),
                                          jnp.ones((B, 1), jnp.int32), slot, c.sliding_window,
                                          windows)
  step = lambda p, x, kv: _layer(c, p, x, cos_HxB, sin_HxB, mask, kv, slot)
  if c.scan_layers:
    x_DxB, new_kv = jax.lax.scan(lambda x, layer: step(layer[0], x, layer[1]), x_DxB,
                                 (_layer_arrays(model.layers), transformer.layer_kv(cache, windows)))
  else:
    new_kv = []
    for i, block in enumerate(model.layers):
      x_DxB, kv = step(_layer_arrays(block), x_DxB, transformer.layer_kv(cache, windows, i))
      new_kv.append(kv)
  cache = transformer.rebuild_cache(new_kv, segments, windows, stacked=c.scan_layers)
  h_DxB = _norm(x_DxB, model.final_norm.scale_D[...][:, None], c, axis=0)
  head_VxD = model.embed_VxD[...] if c.tie_embeddings else model.lm_head_VxD[...]
  # As W @ h [V, B] (``transformer.vocab_rows_head``): XLA would fold the transpose to [B, V] into
  # the product and hand it to its slow Eigen kernel.
  logits_BxV = transformer.vocab_rows_head(h_DxB.T, head_VxD)
  return logits_BxV[:, :c.vocab_size], cache
