"""The model on a real 2x2x2 data x fsdp x tensor mesh of 8 (virtual CPU) devices: weights really
sharded, each device holding only its slice, and results equal to one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import error_model as em
import tiny_hf
from saro_jax import sharding
from saro_jax.models import ModelConfig, hf, init_random


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 virtual devices"
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  return tiny_hf.save_tiny_hf("qwen2", tmp_path_factory.mktemp("sharded") / "qwen2")


def _forward_and_decode(model, mesh, tokens, positions, segments, decode=True):
  """Full-sequence logits and a 2-step cache decode of the last two tokens, jitted on ``mesh``."""

  @nnx.jit
  def run(model, tokens, positions, segments):
    full = model(tokens, positions, segments)
    if not decode:
      return full, None
    cache = model.init_cache(tokens.shape[0], 16)
    _, cache = model(tokens[:, :-2], positions[:, :-2], segments[:, :-2], cache=cache, cache_index=0)
    step, _ = model(tokens[:, -2:], positions[:, -2:], segments[:, -2:], cache=cache,
                    cache_index=tokens.shape[1] - 2)
    return full, step

  if mesh is None:
    return run(model, tokens, positions, segments)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  with sharding.use(mesh):
    return run(model, put(tokens), put(positions), put(segments))


def test_loaded_weights_are_sharded_and_logits_match_one_device(qwen2_dir, mesh):
  single = hf.load_hf(str(qwen2_dir), vocab_padding_multiple=64)
  sharded = hf.load_hf(str(qwen2_dir), vocab_padding_multiple=64, mesh=mesh)

  wq = sharded.layers[0].attn.wq_DxNxH[...]  # [64, 4, 16]: embed over fsdp, heads over tensor
  assert wq.sharding.spec == P("fsdp", "tensor", None)
  assert {s.data.shape for s in wq.addressable_shards} == {(32, 2, 16)}
  embed = sharded.embed_VxD[...]  # [128 (padded), 64]
  assert embed.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in embed.addressable_shards} == {(64, 32)}
  assert sharded.layers[1].attn.bk_KxH[...].sharding.spec == P("tensor", None)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single)),
                               nnx.to_flat_state(nnx.state(sharded))):
    assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), path

  tokens, positions, segments = tiny_hf.padded_batch(seed=3, lengths=(12, 7, 9, 12),
                                                     left_pad=(False, True, False, True))
  full_1, step_1 = _forward_and_decode(single, None, tokens, positions, segments)
  full_8, step_8 = _forward_and_decode(sharded, mesh, tokens, positions, segments)
  assert full_8.sharding.spec[0] == ("data", "fsdp")  # the batch stays sharded
  real = segments > 0
  # Error model (tests/error_model.py): the sharded program sums the same terms in another order
  # (per-device partial sums, then all-reduces); depth = transformer_depth at the sequence length
  # (12), or the 16-slot cache the decode attends over.
  full_depth, cache_depth = (em.model_depth(single.config, n) for n in (12, 16))
  em.assert_parity(full_8, full_1, full_depth, mask=real, what="8 devices vs 1")
  em.assert_parity(step_8, step_1, cache_depth, mask=real[:, -2:], what="8 vs 1, cache decode")
  em.assert_parity(step_8, full_8[:, -2:], cache_depth, mask=real[:, -2:],
                   what="8 devices, cache decode vs full")
  # Negative control: one weight off (a final-norm element by 0.1, its scale ~1) fails the same
  # bound by >= 10x, so a sharding bug of that size or larger cannot pass.
  bugged = nnx.clone(single)
  bugged.final_norm.scale_D[...] = bugged.final_norm.scale_D[...].at[0].add(0.1)
  full_bug, _ = _forward_and_decode(bugged, None, tokens, positions, segments, decode=False)
  em.assert_caught(full_bug, full_8, full_depth, mask=real, what="one weight off vs 8 devices")


def test_init_random_sharded_equals_unsharded_and_tolerates_uneven_heads(mesh):
  # 6 query / 3 kv heads (like SmolLM2's 9 / 3): 3 kv heads cannot split over tensor=2, so that
  # dim is replicated instead of failing.
  config = ModelConfig(family="llama", vocab_size=100, hidden_size=48, intermediate_size=64,
                       num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8,
                       vocab_padding_multiple=8)
  sharded = init_random(config, seed=3, mesh=mesh)
  single = init_random(config, seed=3)
  assert sharded.layers[0].attn.wq_DxNxH[...].sharding.spec == P("fsdp", "tensor", None)
  assert sharded.layers[0].attn.wk_DxKxH[...].sharding.spec == P("fsdp", None, None)
  assert sharded.layers[0].mlp.w_down_FxD[...].sharding.spec == P("tensor", "fsdp")
  # Same random draws; per-shard code generation may round the elementwise normal transform
  # (log, erfinv polynomial, scale) a few ulp apart: ELEMENTWISE_ULPS u, relative to each value
  # and (near zero) to the tensor's scale.
  tol = em.ELEMENTWISE_ULPS * em.U
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single)),
                               nnx.to_flat_state(nnx.state(sharded))):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(a).max(), err_msg=str(path))
  assert not np.any(np.asarray(sharded.embed_VxD[...])[100:])  # vocab padding rows are zero

  tokens, positions, segments = tiny_hf.padded_batch(seed=4, lengths=(10, 6, 8, 10),
                                                     left_pad=(True, False, True, False))
  full_1, _ = _forward_and_decode(single, None, tokens, positions, segments, decode=False)
  full_8, _ = _forward_and_decode(sharded, mesh, tokens, positions, segments, decode=False)
  assert full_8.shape == (4, 10, 100)
  em.assert_parity(full_8, full_1, em.model_depth(config, 10), mask=segments > 0,
                   what="init_random, 8 devices vs 1")


def test_long_rows_take_the_tiled_attention_and_match_one_device(qwen2_dir, mesh):
  # Rows of 300 slots take ``tiled_attention`` (64-slot tiles, the row padded to 320): its tile
  # ranges reduce the mask over the batch, which the mesh splits over data x fsdp.
  from saro_jax.models import transformer
  assert transformer.attention_tile(300) == 64
  single = hf.load_hf(str(qwen2_dir), vocab_padding_multiple=64)
  sharded = hf.load_hf(str(qwen2_dir), vocab_padding_multiple=64, mesh=mesh)
  tokens, positions, segments = tiny_hf.padded_batch(seed=5, lengths=(300, 171, 256, 290),
                                                     left_pad=(False, True, False, False))
  full_1, _ = _forward_and_decode(single, None, tokens, positions, segments, decode=False)
  full_8, _ = _forward_and_decode(sharded, mesh, tokens, positions, segments, decode=False)
  # Error model as above, at the row length (300).
  em.assert_parity(full_8, full_1, em.model_depth(single.config, 300), mask=segments > 0,
                   what="8 devices vs 1, tiled attention")
