"""The decoder against transformers (PyTorch) for every family, and its own invariants:
packing == separate rows, KV-cache decoding == full recompute, remat == no remat."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import error_model as em
import tiny_hf
from saro_jax.models import hf

# Tolerances: tests/error_model.py. A tiny config (2 layers, D 48-64, F 80, 4 x 16 heads) at
# L = 12 has transformer_depth ~780, so two fp32 programs (XLA vs PyTorch, jit vs eager, cache
# decode vs full) agree within max|d| <= 2 gamma(780) max|logit| ~ 9e-5 max|logit| and mean|d|
# <= 2 sqrt(780) u max|logit| ~ 3e-6 max|logit|.
LENGTHS, LEFT_PAD = (12, 7, 9), (False, True, False)  # one batch shape: compiles are shared
PAD = 64  # vocab_padding_multiple everywhere: the same config, hence the same compiled forward


def load(family, dirs, **kw):
  return hf.load_hf(str(dirs[family]), vocab_padding_multiple=PAD, **kw)


def batch(seed=0):
  return tiny_hf.padded_batch(seed=seed, lengths=LENGTHS, left_pad=LEFT_PAD)


forward = tiny_hf.jax_logits  # the logits from one compiled program


@nnx.jit  # one program: called eagerly, each op would compile on its own (most of a test's time)
def hidden_states(model, tokens, positions, segment_ids):
  return model.hidden_states(tokens, positions, segment_ids)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf")
  return {f: tiny_hf.save_tiny_hf(f, root / f) for f in tiny_hf.FAMILIES}


def depth(model, tokens) -> int:
  return em.model_depth(model.config, tokens.shape[1])


def _final_norm_weight_off_by_a_tenth(model):
  """A planted bug: one element of the final norm's weight off by 0.1 (its scale is ~1)."""
  bugged = nnx.clone(model)
  w = bugged.final_norm.scale_D
  w[...] = w[...].at[0].add(0.1)
  return bugged


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_logits_match_transformers_on_padded_batch(family, tiny_dirs):
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
  model = load(family, tiny_dirs)
  tokens, positions, segments = batch()
  ref = tiny_hf.torch_logits(torch_model, tokens, positions, segments)
  ours = forward(model, tokens, positions, segments)
  assert ours.shape == ref.shape and ours.dtype == jnp.float32  # vocab padding sliced off
  real = segments > 0
  em.assert_parity(ours, ref, depth(model, tokens), mask=real, what=f"{family} vs transformers")
  # Negative control (same compiled forward, so nearly free): one weight off fails the bound.
  bugged = forward(_final_norm_weight_off_by_a_tenth(model), tokens, positions, segments)
  em.assert_caught(bugged, ref, depth(model, tokens), mask=real, what=f"{family} one weight off")


@pytest.mark.parametrize("family,field,neutral", [
    ("llama3", "rope_scaling", None),  # the llama3 frequency bands change the logits
    ("llama_linear", "rope_scaling", None),
    ("mistral", "sliding_window", None),  # window 5 < sequence length 12
])
def test_family_feature_is_exercised(family, field, neutral, tiny_dirs):
  model = load(family, tiny_dirs)
  tokens, positions, segments = batch()
  with_feature = forward(model, tokens, positions, segments)
  without = _with_config(model, model.config.replace(**{field: neutral}))
  # Losing the feature must fail the parity bound above by >= 10x (else that test could not
  # tell whether the feature is implemented).
  em.assert_caught(forward(without, tokens, positions, segments), with_feature,
                   depth(model, tokens), mask=segments > 0, what=f"{family} without {field}")


def _with_config(model, config):
  """The same weights under another config (for switching off one feature)."""
  from saro_jax.models import Transformer

  other = nnx.eval_shape(lambda: Transformer(config))
  nnx.update(other, nnx.state(model))
  return other


def test_packed_row_equals_each_sequence_alone(tiny_dirs):
  model = load("qwen3", tiny_dirs)
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, 100, 7), rng.integers(3, 100, 5)
  packed = np.concatenate([a, b, [0, 0]])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
  # One batch (one compile): the packed row, then each sequence alone right-padded to 14.
  tokens = np.concatenate([packed, np.pad(a, (0, 7))[None], np.pad(b, (0, 9))[None]])
  segments = np.concatenate([segments, [[1] * 7 + [0] * 7], [[1] * 5 + [0] * 9]])
  positions = np.concatenate([positions, [list(range(14))], [list(range(14))]])
  logits = forward(model, tokens, positions, segments)
  packed_vs_alone = lambda logits: (jnp.concatenate([logits[0, :7], logits[0, 7:12]]),
                                    jnp.concatenate([logits[1, :7], logits[2, :5]]))
  em.assert_parity(*packed_vs_alone(logits), depth(model, tokens), what="packed vs alone")
  # Negative control: one segment id for the whole packed row lets b attend to a.
  leaky = forward(model, tokens, positions, np.where(segments > 0, 1, 0))
  em.assert_caught(*packed_vs_alone(leaky), depth(model, tokens), what="packed, segments merged")


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_kv_cache_decode_equals_full_recompute(family, tiny_dirs):
  model = load(family, tiny_dirs)
  # Row 1 is left-padded by 5 (segment 0 slots no real token sees); rows 0 and 2 right-padded.
  tokens, positions, segments = batch(2)
  full = forward(model, tokens, positions, segments)
  prefill = 6
  cache = model.init_cache(3, 16)
  step = nnx.jit(lambda m, t, p, s, c, i: m(t, p, s, cache=c, cache_index=i))
  logits, cache = step(model, tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill],
                       cache, 0)
  decoded = [logits]
  # last_only (the sampler's prefill): the same pass, only the last column unembedded.
  last, _ = nnx.jit(lambda m, t, p, s, c: m(t, p, s, cache=c, cache_index=0, last_only=True))(
      model, tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill],
      model.init_cache(3, 16))
  assert last.shape == (3, 1, logits.shape[2])
  depth16 = em.model_depth(model.config, 16)
  em.assert_parity(last, full[:, prefill - 1:prefill], depth16,
                   mask=segments[:, prefill - 1:prefill] > 0, what=f"{family} last_only prefill")
  em.assert_caught(last, full[:, prefill - 2:prefill - 1], depth16,
                   what=f"{family} last_only vs the column before")
  for i in range(prefill, tokens.shape[1]):
    logits, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], segments[:, i:i + 1],
                         cache, jnp.int32(i))
    decoded.append(logits)
  decoded = jnp.concatenate(decoded, axis=1)
  em.assert_parity(decoded, full, em.model_depth(model.config, 16), mask=segments > 0,
                   what=f"{family} cache decode vs full")  # attention over the 16-slot cache
  assert cache.segment_ids_BxS.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(cache.segment_ids_BxS[:, :12]), segments)
  with pytest.raises(ValueError, match="cache_index=15 \\+ 2 new tokens does not fit"):
    model(tokens[:, :2], positions[:, :2], segments[:, :2], cache=cache, cache_index=15)


@pytest.mark.parametrize("rows", ["short", "long"])
def test_remat_matches_no_remat_values_and_grads(rows, tiny_dirs):
  # "long": rows of 300 slots take tiled_attention, whose custom gradient remat then recomputes.
  model = load("llama", tiny_dirs)
  if rows == "short":
    tokens, positions, segments = batch(3)
  else:
    tokens, positions, segments = tiny_hf.padded_batch(seed=3, lengths=(300, 201),
                                                       left_pad=(False, True))

  def loss(m):
    return jnp.mean(m(tokens, positions, segments) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  g_plain = grad(model)
  # A gradient's depth (error_model.grad_depth): the forward, its transpose, the loss's reduction
  # over the vocabulary and over the B * L outputs; each leaf relative to its own largest entry.
  g_depth = em.grad_depth(depth(model, tokens), vocab=100, tokens=tokens.size)
  for mode in ("block", "dots"):
    g_remat = grad(_with_config(model, model.config.replace(remat=mode)))
    results = {path: em.parity(b[...], a[...], g_depth) for (path, a), (_, b) in
               zip(nnx.to_flat_state(g_plain), nnx.to_flat_state(g_remat))}
    worst = max(results, key=lambda path: results[path].excess)
    print(f"remat={mode}, worst gradient leaf {worst}: {results[worst]}")
    assert all(r.ok for r in results.values()), {p: str(r) for p, r in results.items() if not r.ok}


def test_bf16_compute_tracks_fp32(tiny_dirs):
  model = load("gemma", tiny_dirs)
  bf16 = load("gemma", tiny_dirs, param_dtype="bfloat16", compute_dtype="bfloat16")
  assert bf16.layers[0].attn.wq_DxNxH[...].dtype == jnp.bfloat16
  tokens, positions, segments = batch(4)
  ref = forward(model, tokens, positions, segments)
  low = forward(bf16, tokens, positions, segments)
  assert low.dtype == jnp.float32
  assert hidden_states(bf16, tokens, positions, segments).dtype == jnp.bfloat16
  rel = float(jnp.abs(low - ref).max() / jnp.abs(ref).max())
  # bf16 (8 significand bits: u = 2^-8) rounds the weights once and every activation stored
  # between ops; accumulation stays fp32 (negligible next to that). On a logit's path per layer:
  # normed input, q, k, v, probabilities, attention output, o-projection output, normed MLP input,
  # gate, up, their product, down output (12), times 2 layers, plus the embedding, the final norm
  # and the weights of each matmul level (~3): ~30 roundings, worst case linear: 30 u_bf16 =
  # 0.12 relative to max|logit|.
  bound = 30 * 2.0 ** -8
  print(f"bf16 vs fp32 relative max|d| = {rel:.3f} <= {bound:.3f}")
  assert rel < bound


def test_hidden_states_and_unembed_give_the_logits(tiny_dirs):
  model = load("qwen2", tiny_dirs)
  tokens, positions, segments = batch(5)
  hidden = hidden_states(model, tokens, positions, segments)
  unembed = model.unembed_DxV()
  assert unembed.shape == (model.config.hidden_size, 128)
  np.testing.assert_array_equal(np.asarray(unembed[:, 100:]), 0)  # padding columns stay zero
  logits = jnp.einsum("bld,dv->blv", hidden, unembed)[..., :100]
  em.assert_parity(logits, forward(model, tokens, positions, segments), depth(model, tokens),
                   what="hidden_states @ unembed vs forward")


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_long_rows_match_transformers(family, tiny_dirs):
  # Rows of 300 slots run ``tiled_attention`` (transformer.attention_tile: 64-slot tiles, the row
  # padded to 320), the path every training row from 256 slots takes; mistral's sliding window
  # (5) leaves most key tiles unvisited, qwen3 adds q/k norms. Same error model at L = 300.
  from saro_jax.models import transformer
  assert transformer.attention_tile(300) == 64
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
  model = load(family, tiny_dirs)
  tokens, positions, segments = tiny_hf.padded_batch(seed=6, lengths=(300, 201),
                                                     left_pad=(False, True))
  ref = tiny_hf.torch_logits(torch_model, tokens, positions, segments)
  ours = forward(model, tokens, positions, segments)
  real = segments > 0
  em.assert_parity(ours, ref, depth(model, tokens), mask=real,
                   what=f"{family} L=300 vs transformers")
  bugged = forward(_final_norm_weight_off_by_a_tenth(model), tokens, positions, segments)
  em.assert_caught(bugged, ref, depth(model, tokens), mask=real,
                   what=f"{family} L=300 one weight off")


def test_rope_tables_are_computed_once_per_step(tiny_dirs):
  # transformer.computed_once: XLA would otherwise fuse cos and sin into every layer's q and k
  # rotations (forward and backward) and evaluate them again per head. The compiled value-and-grad
  # of a 2-layer model must hold one cos and one sin, whichever layers and passes read them.
  import re
  model = load("llama", tiny_dirs)
  tokens, positions, segments = batch(7)

  def loss(m):
    return jnp.mean(m(tokens, positions, segments) ** 2)

  hlo = nnx.jit(nnx.value_and_grad(loss)).lower(model).compile().as_text()
  ops = {op: len(re.findall(rf"\s{op}\(", hlo)) for op in ("cosine", "sine")}
  assert ops == {"cosine": 1, "sine": 1}, ops
