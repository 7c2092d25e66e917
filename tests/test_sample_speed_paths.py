"""The sampler's fast paths: cache-layout attention == the generic attention, the decode copy of
the weights stored [out, in] (``transformer.to_out_in``) computes the model's logits, the
feature-major decode step (``decode_columns``) computes the row decode's logits and cache, the compiled
decode step moves no cache- or weight-sized data besides the matmuls' own reads (in either
layout), and the side-by-side benchmarks (which assert token identity: with transformers'
generate, and between the two layouts) run at a tiny size."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import error_model as em
import tiny_hf
from saro_jax import models, sample, sharding, xla_options
from saro_jax.models import decode_columns, hf, transformer


@pytest.mark.parametrize("T", [5, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_cached_attention_equals_dot_product_attention(num_kv_heads, T):
  """T = 1 is a decode step's column: on CPU its own multiply-and-reduce form
  (``transformer._decode_attention``), the prefill's batched dots otherwise."""
  B, S, N, H = 3, 11, 4, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, S, num_kv_heads, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, S, num_kv_heads, H)), jnp.float32)
  # Left padding in row 1, a query row that sees only its own slot in row 2: the mask cases the
  # sampler produces.
  q_slot = np.broadcast_to(np.arange(S - T, S), (B, T))
  k_seg = np.ones((B, S), np.int32)
  k_seg[1, :4] = k_seg[2, :S - T] = 0

  @jax.jit  # one program (op by op, each op compiled on its own: most of this test's time)
  def both(q, k, v):
    mask = transformer.attention_mask(q_slot, jnp.ones((B, T), jnp.int32), k_seg, None)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5, implementation="xla")
    got = transformer.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask,
                                       H ** -0.5)
    wrong_group = transformer.cached_attention(q[:, :, ::-1], k.transpose(0, 2, 3, 1),
                                               v.transpose(0, 2, 1, 3), mask, H ** -0.5)
    unmasked = transformer.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3),
                                            jnp.ones_like(mask), H ** -0.5)
    # A grouped cache (``write_and_attend``): each row's group holds only the slots from the first
    # one it sees on (row 1 past its left padding, row 2 its last T slots), the new columns
    # written at their slot in each group's own arrays; and a window one slot too short.
    k_c, v_c = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

    def grouped(windows):
      ends = transformer.group_ends(windows, B)
      kv = tuple((k_c[r:e, :, :, s:], v_c[r:e, :, s:]) for (r, s), e in zip(windows, ends))
      mask_g = transformer.CacheMask(tuple(mask[r:e, :, :, s:] for (r, s), e in zip(windows, ends)),
                                     windows)
      return transformer.write_and_attend(q, k_c[..., S - T:], v_c[:, :, S - T:], kv, mask_g,
                                          S - T, H ** -0.5)[0]

    windowed, cut = grouped(((0, 0), (1, 4), (2, S - T))), grouped(((0, 0), (1, 5), (2, S - T)))
    return want, got, wrong_group[:, :, ::-1], unmasked, windowed, cut

  want, got, wrong_group, unmasked, windowed, cut = both(q, k, v)
  # Error model: both sides compute the same fp32 sums in possibly different orders. Logits are
  # H-term dot products of unit normals (|logit| <~ 4 * sqrt(H) after scaling ~4); a reordering
  # moves each by <= H * u * sum|q_i k_i| ~ 16 * 6e-8 * 16 = 1.5e-5 relative to 1, softmax
  # passes that to the probabilities as a relative error of the same size, and the output (a
  # convex mix of unit normals, |v| <~ 4) moves by <= 4 * 2 * 1.5e-5 ~ 1.2e-4 in the worst case.
  # We use 1e-4 absolute; a real bug (a wrong key, a dropped mask, a mis-grouped head) moves the
  # output by O(0.1-1).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(windowed), np.asarray(want), atol=1e-4, rtol=0)
  assert np.abs(np.asarray(cut[1]) - np.asarray(want[1])).max() > 1e-2  # a visible slot cut off
  if num_kv_heads > 1:  # the bound catches heads paired with the wrong kv group
    assert np.abs(np.asarray(wrong_group) - np.asarray(want)).max() > 1e-2
  assert np.abs(np.asarray(unmasked) - np.asarray(want)).max() > 1e-2  # and a dropped mask


def test_a_grouped_cache_must_be_one_cache_per_window_ending_together():
  config = models.ModelConfig(family="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                              num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8)
  model = models.init_random(config, seed=0)
  one = jnp.ones((4, 1), jnp.int32)
  windows = ((0, 0), (2, 8))
  for bad, says in [(model.init_cache(4, 16), "one Cache per window, got one Cache"),
                    ((model.init_cache(4, 16),), "got 1 caches"),
                    ((model.init_cache(2, 16), model.init_cache(2, 16)), "end at [16, 24]")]:
    with pytest.raises(ValueError, match=re.escape(says)):
      model(one, one, one, cache=bad, cache_index=9, cache_windows=windows)


# (family, scan_layers): biases (qwen2), qk-norm + tied head (qwen3), (1+w) norms + gelu + tied
# (gemma), the untied lm head (llama), and the stacked [Y, ...] weights of a scanned model.
OUT_IN_CASES = [("llama", False), ("qwen2", True), ("qwen3", False), ("gemma", True)]


def _owner(model, weight_name: str, scan: bool):
  """The module that holds ``weight_name`` (layer 0's, or the stacked layers' when scanned)."""
  if weight_name.startswith("lm_head"):
    return model
  layer = model.layers if scan else model.layers[0]
  return layer.mlp if weight_name.startswith("w_") else layer.attn


@pytest.mark.parametrize("family,scan", OUT_IN_CASES)
def test_out_in_copy_computes_the_same_logits(family, scan, tmp_path):
  model = hf.load_hf(str(tiny_hf.save_tiny_hf(family, tmp_path / family)), scan_layers=scan)
  copy = transformer.to_out_in(model)
  assert copy.out_in and not model.out_in and transformer.to_out_in(copy) is copy
  moved = 0
  for name, (new_name, n_in, _) in transformer.OUT_IN_WEIGHTS.items():
    old, new = _owner(model, name, scan), _owner(copy, name, scan)
    if not hasattr(old, name):  # a tied head
      continue
    w = np.asarray(getattr(old, name)[...])
    lead = 1 if scan and old is not model else 0  # stacked layers: [Y, ...]
    # A pure permutation: out dims first, then the in dims in their order (bit for bit).
    dims = list(range(w.ndim))
    perm = dims[:lead] + dims[lead + n_in:] + dims[lead:lead + n_in]
    assert np.array_equal(np.asarray(getattr(new, new_name)[...]), w.transpose(perm)), name
    assert not hasattr(new, name) and hasattr(old, name)
    moved += 1
  assert moved == (8 if family in ("llama", "qwen2") else 7)  # the untied heads move too
  # Every array that is not transposed is shared with the model, not copied.
  assert copy.embed_VxD[...] is model.embed_VxD[...]

  tokens, positions, segments = tiny_hf.padded_batch()
  forward = jax.jit(lambda m, t, p, s: m(t, p, s))
  want = np.asarray(forward(model, tokens, positions, segments))
  # Same products over the same terms; XLA may sum them in another order: two fp32 programs of
  # one function (tests/error_model.py), logits within max/mean_bound at the model's depth.
  depth = em.model_depth(model.config, tokens.shape[1])
  mask = segments > 0
  em.assert_parity(np.asarray(forward(copy, tokens, positions, segments)), want, depth, mask=mask,
                   what=f"{family} out_in vs in_out")
  # Planted bug against the same bound: wo's two input dims (N, H) flipped, as a blanket ``.T``
  # of [N, H, D] would leave them ([D, H, N], read as [D, N, H]).
  attn = _owner(copy, "wo", scan)
  value = attn.wo_DxNxH[...]
  attn.wo_DxNxH = attn.wo_DxNxH.replace(jnp.swapaxes(value, -1, -2).reshape(value.shape))
  em.assert_caught(np.asarray(forward(copy, tokens, positions, segments)), want, depth, mask=mask,
                   what=f"{family} wo in dims flipped")


# The families' non-default features on the column path: the untied head and an unscanned model
# (llama), biases + scanned (qwen2), qk-norm + tied head (qwen3), (1+w) norms + gelu + embedding
# scale + scanned (gemma), a sliding window of 5 that the steps below slide past (mistral), and
# llama3's rope scaling.
COLUMN_CASES = OUT_IN_CASES + [("mistral", False), ("llama3", True)]


@pytest.mark.parametrize("family,scan", COLUMN_CASES)
def test_column_decode_step_equals_the_row_decode(family, scan, tmp_path):
  """A prefilled cache, then 4 decode steps fed the same tokens: each step's logits and the cache it
  writes from ``decode_columns.decode_step`` (activations [D, B], the [out, in] copy) against the
  model's own cached call (activations [B, 1, D])."""
  model = hf.load_hf(str(tiny_hf.save_tiny_hf(family, tmp_path / family)), scan_layers=scan)
  copy = transformer.to_out_in(model)
  tokens, positions, segments = tiny_hf.padded_batch(lengths=(12, 7), left_pad=(True, True))
  B, L = tokens.shape
  steps = 4
  prefill = jax.jit(lambda m, c: m(tokens, positions, segments, cache=c, cache_index=0,
                                   last_only=True))
  rows = jax.jit(lambda m, c, t, p, i: m(t[:, None], p[:, None], jnp.ones((B, 1), jnp.int32),
                                         cache=c, cache_index=i))
  columns = jax.jit(decode_columns.decode_step)
  logits, cache = prefill(model, model.init_cache(B, L + steps))
  next_B, pos_B = jnp.argmax(logits[:, -1], -1).astype(jnp.int32), jnp.asarray(positions[:, -1] + 1)
  # Two fp32 programs of one function (tests/error_model.py): the same products and reductions,
  # summed in possibly other orders (a [D, B] dot splits its sums unlike a [B, D] one). Bound at
  # the model's depth over the cache length, relative to the largest |logit| / |key| / |value|.
  depth = em.model_depth(model.config, L + steps)
  row_cache = col_cache = cache
  for i in range(L, L + steps):
    want, row_cache = rows(model, row_cache, next_B, pos_B, i)
    got, col_cache = columns(copy, col_cache, next_B, pos_B, i)
    em.assert_parity(np.asarray(got), np.asarray(want[:, 0]), depth, what=f"{family} step {i} logits")
    col_cache = row_cache  # both continue from the reference's cache
    next_B, pos_B = jnp.argmax(want[:, 0], -1).astype(jnp.int32), pos_B + 1
  _, col_cache = columns(copy, cache, jnp.asarray(tokens[:, 0]), jnp.asarray(positions[:, -1] + 1), L)
  _, row_cache = rows(model, cache, jnp.asarray(tokens[:, 0]), jnp.asarray(positions[:, -1] + 1), L)
  np.testing.assert_array_equal(np.asarray(col_cache.segment_ids_BxS),
                                np.asarray(row_cache.segment_ids_BxS))
  # The slot each wrote: keys [Y, B, K, H, S], values [Y, B, K, S, H] (stacked when unscanned).
  slot = {"keys": lambda x: x[..., L], "values": lambda x: x[..., L, :]}
  for name, written in slot.items():
    stack = lambda cache: written(np.asarray(getattr(cache, name) if scan else
                                             jnp.stack(getattr(cache, name))))
    em.assert_parity(stack(col_cache), stack(row_cache), depth, what=f"{family} written {name}")
  # Planted bug against the same bound: the column step's rope built from the default theta
  # (the bug a popular JAX library ships), one step after the prefill.
  want, _ = rows(model, cache, jnp.asarray(tokens[:, 0]), jnp.asarray(positions[:, -1] + 1), L)
  copy.config = copy.config.replace(rope_theta=10000.0)
  wrong, _ = columns(copy, cache, jnp.asarray(tokens[:, 0]), jnp.asarray(positions[:, -1] + 1), L)
  em.assert_caught(np.asarray(wrong), np.asarray(want[:, 0]), depth, what=f"{family} rope theta dropped")


def test_column_decode_step_needs_the_out_in_copy_in_fp32(tmp_path):
  path = str(tiny_hf.save_tiny_hf("llama", tmp_path / "llama"))
  args = lambda m: (m.init_cache(1, 4), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), 0)
  model = hf.load_hf(path)
  with pytest.raises(ValueError, match="to_out_in"):
    decode_columns.decode_step(model, *args(model))
  bf16 = transformer.to_out_in(hf.load_hf(path, compute_dtype="bfloat16"))
  with pytest.raises(ValueError, match="compute_dtype is bfloat16"):
    decode_columns.decode_step(bf16, *args(bf16))


def test_out_in_copy_keeps_the_weights_sharding():
  """On a mesh the transposes carry each weight's placement along: every weight of the copy sits
  where its (permuted) logical names say, and the sharded dims really are sharded."""
  mesh = sharding.make_mesh(2, 2, 2)
  config = models.ModelConfig(family="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                              num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                              tie_embeddings=False)
  model = models.init_random(config, seed=0, mesh=mesh)
  copy = transformer.to_out_in(model)
  state = nnx.state(copy)
  want = sharding.state_shardings(state, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)
  for var, placement in zip(jax.tree.leaves(state, is_leaf=is_var),
                            jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    assert var[...].sharding.is_equivalent_to(placement, var[...].ndim), var.get_metadata()
  up_FxD = copy.layers[0].mlp.w_up_FxD[...]
  assert up_FxD.sharding.shard_shape(up_FxD.shape) != up_FxD.shape  # not merely replicated


def _decode_hlo(batch: int, plen: int, new: int, out_in: bool, options=None, tied=False,
                columns=False, windows=None) -> str:
  config = models.ModelConfig(family="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                              num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                              tie_embeddings=tied)
  model = models.init_random(config, seed=0)
  graphdef, state = nnx.split(transformer.to_out_in(model) if out_in else model)
  sampling = sample.Sampling.of()
  eos = jnp.asarray([-1], jnp.int32)
  packed = sample.pack_prompts([[1] * plen] * batch, batch, plen, 0)
  carry = jax.eval_shape(lambda: sample._prefill(
      graphdef, state, *map(jnp.asarray, packed.arrays()), jnp.zeros(batch, jnp.uint32),
      jnp.zeros(batch, bool), jnp.uint32(0), eos, sampling, cache_len=plen + new, mesh=None,
      windows=windows))
  return sample._decode.lower(graphdef, state, carry, jnp.int32(new), eos, sampling,
                              prompt_len=plen, mesh=None, columns=columns,
                              windows=windows).compile(options).as_text()


@pytest.mark.parametrize("out_in,options,tied,columns,grouped", [
    (False, None, False, False, False), (True, None, False, False, False),
    (False, xla_options.CPU_DECODE_OPTIONS, False, False, False),
    (False, xla_options.CPU_DECODE_OPTIONS, True, False, False),
    (True, None, False, True, False), (True, None, True, True, False),
    (True, None, True, True, True), (False, xla_options.CPU_DECODE_OPTIONS, True, False, True)],
    ids=["in_out", "out_in", "in_out_cpu_dots", "in_out_cpu_dots_tied", "columns", "columns_tied",
         "columns_grouped", "in_out_cpu_dots_grouped"])
def test_decode_step_copies_no_cache_or_weights(out_in, options, tied, columns, grouped):
  """Decoding is memory-bound: each step must read the weights and the cache once, in place.

  Before the cache layouts were chosen for it, XLA transposed every layer's K and V cache and a
  transposed copy of wo on every step (a quarter of the step time for SmolLM2 at batch 16). The
  out_in copy (the bf16 CPU default), XLA's own dots (with the tied head read as [V, D]) and the
  feature-major step on the copy (the fp32 CPU default; its activations [D, B] turn to the
  cache's rows only around the attention) must not bring such a copy back either; nor a grouped
  cache (``sample.decode_windows``: rows 2-3 hold slots 8.. only; one shared cache sliced per
  group instead had XLA copy the whole cache every step).
  """
  batch, plen, new = 4, 8, 8
  windows = ((0, 0), (2, 8)) if grouped else None
  hlo = _decode_hlo(batch, plen, new, out_in, options, tied, columns, windows)
  assert ("ynn_fusion" in hlo) == (options is None)  # the option took effect (and only there)
  S = plen + new
  caches = [(batch, S)] + ([(2, S), (2, S - 8)] if grouped else [])
  big = {f"f32[{rows},2,8,{slots}]" for rows, slots in caches}
  big |= {f"f32[{rows},2,{slots},8]" for rows, slots in caches}
  big |= {f"f32[{batch},{S},2,8]", f"f32[{batch},2,{S}]", "f32[6,8,48]", "f32[8,6,48]",
          "f32[48,48]", "f32[48,6,8]", "f32[48,96]", "f32[96,48]", "f32[48,300]", "f32[300,48]",
          "f32[48,16]", "f32[16,48]", "f32[2,8,48]", "f32[48,2,8]"}
  moved = []
  for shape, op in re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} (copy|transpose|scatter)\(", hlo):
    if shape in big:
      moved.append((op, shape))
  assert not moved, f"the decode step copies cache- or weight-sized arrays: {moved}"


@pytest.mark.parametrize("out_in,options,tied,columns", [
    (False, xla_options.CPU_DECODE_OPTIONS, True, False), (True, None, False, True),
    (True, None, True, True)], ids=["in_out_cpu_dots_tied", "columns", "columns_tied"])
def test_decode_head_product_is_vocab_major(out_in, options, tied, columns):
  """The decode step's head product must write its logits [V, B] (vocab-major), reading the head
  stored [V, D] as the left operand (``transformer.vocab_rows_head``).

  XLA folds a transpose into the dot it follows: written as W @ h then transposed, the product
  became h^T @ W^T [B, V] for XLA:CPU's own Eigen dot, which reads the weight across its rows:
  SmolLM2's head then took 35-40 ms of a 108-144 ms step (three times its vocab-major time). The
  untied "rows" head is stored [D, V] and keeps its plain [B, V] product (no such slow read)."""
  batch, vocab = 4, 300
  hlo = _decode_hlo(batch, 8, 8, out_in, options, tied, columns)
  heads = [(dims, layout) for dims, layout in re.findall(r"= f32\[([0-9,]+)\]\{([0-9,]+)\} dot\(", hlo)
           if sorted(map(int, dims.split(","))) == [batch, vocab]]
  assert len(heads) == 1, heads
  dims, layout = heads[0]
  major = dims.split(",")[int(layout.split(",")[-1])]  # the last minor-to-major entry
  assert int(major) == vocab, f"the head's logits are stored [B, V]: f32[{dims}]{{{layout}}}"


@pytest.mark.heavy
def test_benchmark_runs_and_tokens_match_transformers(tmp_path, capsys):
  """benchmarks/sampler.py asserts token identity with transformers.generate before timing."""
  import benchmark_scripts
  bench = benchmark_scripts.load("sampler")
  results = bench.main(["--model", "tiny", "--batches", "4", "--new_tokens", "8", "--repeats", "1",
                        "--workdir", str(tmp_path), "--unshared"])
  assert results[4]["new_tokens"] > 0 and results[4]["ratio"] > 0
  assert results[4]["shared_over_unshared"] > 0  # the unshared rotation ran (and asserted tokens)
  assert "| 4 |" in capsys.readouterr().out


@pytest.mark.heavy
def test_sampler_benchmark_on_the_evaluation_prompts(tmp_path, capsys):
  """``--prompt_set eval``: all of the evaluation preset's prompts (long jailbreak-wrapped ones
  beside short ones) per call, in batches, token for token with transformers."""
  import benchmark_scripts
  bench = benchmark_scripts.load("sampler")
  results = bench.main(["--model", "tiny", "--prompt_set", "eval", "--batches", "32",
                        "--new_tokens", "4", "--repeats", "1", "--workdir", str(tmp_path)])
  assert results[32]["new_tokens"] > 0 and results[32]["ratio"] > 0
  assert "the evaluation preset's 60" in capsys.readouterr().out


@pytest.mark.heavy
def test_decode_layout_benchmark_runs_and_layouts_agree(capsys):
  """benchmarks/decode_layout.py asserts all four decode the same tokens before timing."""
  import benchmark_scripts
  bench = benchmark_scripts.load("decode_layout")
  results = bench.main(["--model", "tiny", "--batch", "4", "--steps", "4", "--rounds", "1"])
  assert set(results["layouts"]) == {"in_out", "out_in", "in_out_cpu_dots", "columns"}
  for figures in results["layouts"].values():
    assert figures["prefill_cpu_s"] > 0 and figures["step_cpu_s"] > 0
  assert results["layouts"]["in_out"]["step_ratio"] == 1.0
  assert "| out_in |" in capsys.readouterr().out


@pytest.mark.parametrize("family,scan", [("llama", False), ("gemma", True)])
def test_out_in_copy_in_the_compute_dtype_computes_the_same_logits(family, scan, tmp_path):
  """bf16 compute over fp32 weights: the decode copy stores its moved weights and the embedding in
  bf16 (every product casts them to bf16 at use anyway), so its logits are the logits of the copy
  that keeps them fp32, bit for bit, and the copy holds half the bytes."""
  model = hf.load_hf(str(tiny_hf.save_tiny_hf(family, tmp_path / family)), scan_layers=scan,
                     compute_dtype="bfloat16")
  narrow, wide = transformer.to_out_in(model), transformer.to_out_in(model, in_compute_dtype=False)
  assert narrow.embed_VxD[...].dtype == jnp.bfloat16 and wide.embed_VxD[...].dtype == jnp.float32
  attn, wide_attn = _owner(narrow, "wq", scan), _owner(wide, "wq", scan)
  assert attn.wq_NxHxD[...].dtype == jnp.bfloat16 and wide_attn.wq_NxHxD[...].dtype == jnp.float32
  # Norm scales are read in fp32 (RMSNorm normalises in fp32): never narrowed.
  assert narrow.final_norm.scale_D[...].dtype == jnp.float32
  tokens, positions, segments = tiny_hf.padded_batch()
  forward = jax.jit(lambda m, t, p, s: m(t, p, s))
  np.testing.assert_array_equal(np.asarray(forward(narrow, tokens, positions, segments)),
                                np.asarray(forward(wide, tokens, positions, segments)))
  # fp32 compute: nothing is narrowed (the copy shares the embedding with the model).
  fp32 = hf.load_hf(str(tmp_path / family), scan_layers=scan)
  assert transformer.to_out_in(fp32).embed_VxD[...] is fp32.embed_VxD[...]


def test_shared_prefix_is_the_common_start_rounded_down():
  p = list(range(1, 22))  # 21 tokens
  assert sample.shared_prefix([p]) == 0  # one prompt: nothing to share
  assert sample.shared_prefix([p + [5], p + [6, 7], p]) == 16  # 21 in common -> 16
  assert sample.shared_prefix([p, p]) == 16  # n samples of one prompt: all of it, rounded down
  assert sample.shared_prefix([p[:7] + [1], p[:7] + [2]]) == 0  # 7 < PREFIX_ALIGN
  assert sample.shared_prefix([[9] + p, p]) == 0


@pytest.mark.parametrize("family,scan", [("llama", False), ("qwen3", True)])
def test_packed_prefill_fills_the_cache_as_each_prompt_alone(family, scan, tmp_path):
  """The prompts packed as token trees under their shared prefix (``pack_prompts``, one pass of
  ``Transformer.prefill``), unpacked into right-aligned cache rows: the same keys, values, segment
  ids, positions and first tokens as each prompt run alone through the cache path. Prompts: a
  shared start of 21 tokens (16 kept once per packed row), then 9, 0, 14 and 3 more tokens; six
  cache rows (two fillers repeat prompt 0)."""
  model = hf.load_hf(str(tiny_hf.save_tiny_hf(family, tmp_path / family)), scan_layers=scan)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  V = model.config.vocab_size
  start = rng.integers(1, V, 21).tolist()
  prompts = [start + rng.integers(1, V, n).tolist() for n in (9, 0, 14, 3)]
  rows, plen, P = 6, 40, sample.shared_prefix(prompts)
  assert P == 16
  cache_len = plen + 4

  def prefill(packed):
    done = np.arange(rows) >= len(prompts)
    carry = sample._prefill(graphdef, state, *map(jnp.asarray, packed.arrays()),
                            jnp.arange(rows, dtype=jnp.uint32), done, jnp.uint32(0),
                            jnp.asarray([-1]), sample.Sampling.of(), cache_len=cache_len, mesh=None)
    del carry["keys"]  # PRNG keys (they depend on the prompt index only)
    return jax.tree.map(np.asarray, carry)

  def stacked(cache):  # [Y, B, ...] per kind, whether the cache is scanned or per layer
    return [np.asarray(x) for x in ((cache.keys, cache.values) if scan else
                                    (np.stack(cache.keys), np.stack(cache.values)))]

  @jax.jit  # one program per prompt length (op by op, the unscanned model took a minute)
  def cache_path(state, ids_1xN):
    one = nnx.merge(graphdef, state)
    n = ids_1xN.shape[1]
    return one(ids_1xN, jnp.arange(n)[None], jnp.ones_like(ids_1xN), cache=one.init_cache(1, n),
               cache_index=0, last_only=True)

  @functools.cache
  def alone(ids: tuple):  # one prompt through the cache path: (greedy first token, [keys, values])
    logits, cache = cache_path(state, jnp.asarray([ids], jnp.int32))
    return int(np.argmax(np.asarray(logits)[0, -1])), [x[:, 0] for x in stacked(cache)]

  token_flops, attention_flops = sample.prefill_flops(model.config)
  packed = sample.pack_prompts(prompts, rows, plen, P, min_width=16, token_flops=token_flops,
                               attention_flops=attention_flops)
  assert packed.tokens_RxL.shape[0] < len(prompts)  # prompts share packed rows
  got = prefill(packed)
  keys, values = stacked(got["cache"])
  # Two fp32 programs of one function (tests/error_model.py): a prompt's keys and values from
  # products over other row counts and widths, its attention summed over other (masked) slots.
  # Bound at the model's depth over the prompt length, relative to the largest |key| / |value|.
  depth = em.model_depth(model.config, plen)
  for b in range(rows):
    ids = prompts[b if b < len(prompts) else 0]
    n = len(ids)
    first, (ref_k, ref_v) = alone(tuple(ids))
    real_S = (np.arange(cache_len) >= plen - n) & (np.arange(cache_len) < plen)
    np.testing.assert_array_equal(got["cache"].segment_ids_BxS[b], real_S)
    assert got["pos"][b] == n and got["out"][b, 0] == first
    em.assert_parity(keys[:, b, :, :, plen - n:plen], ref_k, depth, what=f"{family} keys row {b}")
    em.assert_parity(values[:, b, :, plen - n:plen], ref_v, depth, what=f"{family} values row {b}")
    assert not keys[:, b, :, :, ~real_S].any() and not values[:, b, :, ~real_S].any()

  # Planted bugs against the same bound, on the later of two prompts packed into one row: the
  # prompts of a row seeing each other (no subtree ends), and the prefix's positions from 1.
  shared_row = np.flatnonzero(np.bincount(packed.row_B[:len(prompts)]) > 1)[0]
  b = max((i for i in range(len(prompts)) if packed.row_B[i] == shared_row
           and len(prompts[i]) > P), key=lambda i: packed.last_B[i])
  n = len(prompts[b])
  ref_k = alone(tuple(prompts[b]))[1][0]
  L = packed.tokens_RxL.shape[1]
  bugs = {"no subtree ends": dataclasses.replace(packed, subtree_end_RxL=np.full_like(
              packed.subtree_end_RxL, L)),
          "prefix positions from 1": dataclasses.replace(
              packed, positions_RxL=packed.positions_RxL + (np.arange(L) < P).astype(np.int32))}
  for what, bad in bugs.items():
    bad_keys = stacked(prefill(bad)["cache"])[0]
    em.assert_caught(bad_keys[:, b, :, :, plen - n:plen], ref_k, depth, what=f"{family} {what}")


def test_pack_prompts_places_every_prompt_once_under_the_prefix():
  rng = np.random.default_rng(1)
  prefix = rng.integers(1, 99, 8).tolist()
  prompts = [prefix + rng.integers(1, 99, n).tolist() for n in (0, 3, 10, 7, 1)]
  rows, plen = 8, 24  # three filler rows
  packed = sample.pack_prompts(prompts, rows, plen, 8, min_width=8, row_multiple=2)
  R, L = packed.tokens_RxL.shape
  assert R % 2 == 0 and (L - 8) % 8 == 0
  owner = np.full((R, L), -1)
  for b in range(rows):
    i = b if b < len(prompts) else 0
    ids, r, slots_S = prompts[i], packed.row_B[b], packed.slot_BxP[b]
    n = len(ids)
    assert (slots_S[:plen - n] == -1).all() and packed.length_B[b] == n
    mine = slots_S[plen - n:]
    np.testing.assert_array_equal(packed.tokens_RxL[r, mine], ids)
    np.testing.assert_array_equal(packed.positions_RxL[r, mine], np.arange(n))
    assert (packed.segment_ids_RxL[r, mine] == 1).all() and packed.last_B[b] == mine[-1]
    np.testing.assert_array_equal(mine[:8], np.arange(8))  # the row's own copy of the prefix
    own = mine[8:]
    if len(own):  # contiguous, ending where its subtree ends; no other prompt there
      np.testing.assert_array_equal(own, np.arange(own[0], own[0] + len(own)))
      assert (packed.subtree_end_RxL[r, own] == own[-1] + 1).all()
      assert (owner[r, own] == -1).all() or (owner[r, own] == i).all()
      owner[r, own] = i
  assert (packed.subtree_end_RxL[:, :8] == L).all()  # the prefix: seen by the whole row
  padding = (owner < 0) & (np.arange(L) >= 8)
  assert (packed.segment_ids_RxL[padding] == 0).all() and (packed.tokens_RxL[padding] == 0).all()

  # The plan: the fewest slots (rows are powers of two: three bins of 128 would take four rows);
  # for as many slots, the narrower rows (less attention per row).
  plan = lambda lengths: sample.pack_rows_plan(lengths, 0, min_width=32, row_multiple=1,
                                               token_flops=1.0, attention_flops=0.01)[:2]
  assert plan([100, 90, 40]) == (1, 256)
  assert plan([100, 90, 20, 20, 10]) == (2, 128)
  with pytest.raises(ValueError, match="plen 8"):
    sample.pack_prompts(prompts, rows, 8, 8)
