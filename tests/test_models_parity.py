"""The decoder against transformers (PyTorch) for every family, and its own invariants:
packing == separate rows, KV-cache decoding == full recompute, remat == no remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import tiny_hf
from saro_jax.models import hf

FP32_TOL = 1e-4
LENGTHS, LEFT_PAD = (12, 7, 9), (False, True, False)  # one batch shape: compiles are shared
PAD = 64  # vocab_padding_multiple everywhere: the same config, hence the same compiled forward


def load(family, dirs, **kw):
  return hf.load_hf(str(dirs[family]), vocab_padding_multiple=PAD, **kw)


def batch(seed=0):
  return tiny_hf.padded_batch(seed=seed, lengths=LENGTHS, left_pad=LEFT_PAD)


@nnx.jit
def forward(model, tokens, positions, segment_ids):
  return model(tokens, positions, segment_ids)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf")
  return {f: tiny_hf.save_tiny_hf(f, root / f) for f in tiny_hf.FAMILIES}


def _real_max_diff(a, b, segment_ids):
  real = np.asarray(segment_ids) > 0
  return float(np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max())


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_logits_match_transformers_on_padded_batch(family, tiny_dirs):
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
  model = load(family, tiny_dirs)
  tokens, positions, segments = batch()
  ref = tiny_hf.torch_logits(torch_model, tokens, positions, segments)
  ours = forward(model, tokens, positions, segments)
  assert ours.shape == ref.shape and ours.dtype == jnp.float32  # vocab padding sliced off
  diff = _real_max_diff(ours, ref, segments)
  print(f"{family}: max|dlogits| = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
  assert diff <= FP32_TOL, f"{family}: logits differ from transformers by {diff}"


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
  diff = float(jnp.abs(with_feature - forward(without, tokens, positions, segments)).max())
  assert diff > 1e-3, f"{family}.{field} has no effect on the logits ({diff})"


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
  diff = max(float(jnp.abs(logits[0, :7] - logits[1, :7]).max()),
             float(jnp.abs(logits[0, 7:12] - logits[2, :5]).max()))
  print(f"packed vs alone: max|d| = {diff:.2e}")
  assert diff <= 1e-5


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
  for i in range(prefill, tokens.shape[1]):
    logits, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], segments[:, i:i + 1],
                         cache, jnp.int32(i))
    decoded.append(logits)
  decoded = jnp.concatenate(decoded, axis=1)
  diff = _real_max_diff(decoded, full, segments)
  print(f"{family}: cache decode vs full: max|d| = {diff:.2e}")
  assert diff <= 1e-5
  assert cache.segment_ids_BxS.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(cache.segment_ids_BxS[:, :12]), segments)
  with pytest.raises(ValueError, match="cache_index=15 \\+ 2 new tokens does not fit"):
    model(tokens[:, :2], positions[:, :2], segments[:, :2], cache=cache, cache_index=15)


def test_remat_matches_no_remat_values_and_grads(tiny_dirs):
  model = load("llama", tiny_dirs)
  tokens, positions, segments = batch(3)

  def loss(m):
    return jnp.mean(m(tokens, positions, segments) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  g_plain = grad(model)
  for mode in ("block", "dots"):
    g_remat = grad(_with_config(model, model.config.replace(remat=mode)))
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_plain, g_remat)
    assert max(jax.tree.leaves(diffs)) <= 1e-6, mode


def test_bf16_compute_tracks_fp32(tiny_dirs):
  model = load("gemma", tiny_dirs)
  bf16 = load("gemma", tiny_dirs, param_dtype="bfloat16", compute_dtype="bfloat16")
  assert bf16.layers[0].attn.wq_DxNxH[...].dtype == jnp.bfloat16
  tokens, positions, segments = batch(4)
  ref = forward(model, tokens, positions, segments)
  low = forward(bf16, tokens, positions, segments)
  assert low.dtype == jnp.float32
  assert bf16.hidden_states(tokens, positions, segments).dtype == jnp.bfloat16
  rel = float(jnp.abs(low - ref).max() / jnp.abs(ref).max())
  print(f"bf16 vs fp32 relative max|d| = {rel:.3f}")
  assert rel < 0.05


def test_hidden_states_and_unembed_give_the_logits(tiny_dirs):
  model = load("qwen2", tiny_dirs)
  tokens, positions, segments = batch(5)
  hidden = model.hidden_states(tokens, positions, segments)
  unembed = model.unembed_DxV()
  assert unembed.shape == (model.config.hidden_size, 128)
  np.testing.assert_array_equal(np.asarray(unembed[:, 100:]), 0)  # padding columns stay zero
  logits = jnp.einsum("bld,dv->blv", hidden, unembed)[..., :100]
  assert float(jnp.abs(logits - forward(model, tokens, positions, segments)).max()) <= 1e-5
