"""``model.attention_impl="cpu_flash"``: PyTorch's CPU flash attention inside the XLA:CPU program
(saro_jax/models/cpu_attention.py). Values and gradients against the plain XLA attention for
every mask the training rows produce, the model's logits and gradients against ``xla``, and the
refusals (bf16, meshes)."""

import shutil

import jax
import jax.numpy as jnp
import pytest

import error_model as em
import tiny_hf
from saro_jax import config as config_lib
from saro_jax import models, sharding
from saro_jax.models import cpu_attention, cpu_ffi, hf
from saro_jax.models.config import ModelConfig
from test_attention import FORWARD_DEPTH, GRAD_DEPTH, H, _inputs, _masks, _value_and_grads

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("g++") or shutil.which("c++")),
        reason='attention_impl="cpu_flash" compiles its handlers with the system C++ compiler'),
    pytest.mark.usefixtures("cpu_ffi_cache"),  # conftest: this module builds the handlers
]


def _flash(mask):
  return lambda q, k, v: cpu_attention.attention(q, k, v, cpu_attention.mask_bias(mask),
                                                 H ** -0.5)


def _reference(mask):
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5,
                                                      implementation="xla")


# Tolerance: test_attention's error model (the same fp32 sums in other orders: H-term scores,
# L-term softmax sums and weighted sums, a few ulp of exp; the gradients twice that depth). The
# kernel rescales its running sum once per key block, inside the 3 L there.
@pytest.mark.parametrize("kind", ["packed", "tree", "window"])
def test_cpu_flash_equals_dot_product_attention(kind):
  mask = _masks()[kind]
  q, k, v, cotangent = _inputs()
  got, got_grads = jax.jit(lambda *a: _value_and_grads(_flash(mask), *a))(q, k, v, cotangent)
  want, want_grads = jax.jit(lambda *a: _value_and_grads(_reference(mask), *a))(
      q, k, v, cotangent)
  em.assert_parity(got, want, FORWARD_DEPTH, what=f"{kind} out")
  for name, g, w in zip("qkv", got_grads, want_grads):
    em.assert_parity(g, w, GRAD_DEPTH, what=f"{kind} d{name}")
  # Negative control: the mask dropped (the kernel's causal rule alone, what a handler that lost
  # the bias would compute) breaks the same bounds: the segments, branches and window matter.
  causal = jnp.tril(jnp.ones(mask.shape[-2:], bool))[None, None]
  bug, bug_grads = jax.jit(lambda *a: _value_and_grads(_flash(jnp.broadcast_to(causal, mask.shape)),
                                                       *a))(q, k, v, cotangent)
  em.assert_caught(bug, want, FORWARD_DEPTH, what=f"{kind} out, mask dropped")
  em.assert_caught(bug_grads[0], want_grads[0], GRAD_DEPTH, what=f"{kind} dq, mask dropped")


def test_a_scale_off_by_one_percent_is_caught():
  mask = _masks()["packed"]
  q, k, v, _ = _inputs()
  want = _reference(mask)(q, k, v)
  off = cpu_attention.attention(q, k, v, cpu_attention.mask_bias(mask), 1.01 * H ** -0.5)
  em.assert_caught(off, want, FORWARD_DEPTH, what="out with the scale 1 % off")


def test_bad_operands_are_clear_errors():
  q, k, v, _ = _inputs()
  bias = cpu_attention.mask_bias(_masks()["packed"])
  with pytest.raises(ValueError, match=r'"cpu_flash" computes in float32'):
    cpu_attention.attention(q.astype(jnp.bfloat16), k, v, bias, 1.0)
  # Key heads that do not divide the query heads: the handler's own check, as an XLA error.
  with pytest.raises(Exception, match=r"K dividing N"):
    jax.block_until_ready(cpu_attention.attention(q[:, :, :5], k, v, bias, 1.0))


def test_logits_and_gradients_with_cpu_flash_match_xla(llama_dir):
  xla = hf.load_hf(str(llama_dir))
  flash = hf.load_hf(str(llama_dir), attention_impl="cpu_flash")
  assert flash.config.attention_impl == "cpu_flash" and flash.config.rope_theta != 10_000.0
  tokens, positions, segments = tiny_hf.padded_batch(seed=1, lengths=(12, 7), left_pad=(False, True))
  # The attention really is the custom call (one per layer), not ours.
  jaxpr = str(jax.make_jaxpr(lambda m: m(tokens, positions, segments))(flash))
  assert jaxpr.count(cpu_attention.FORWARD) == flash.config.num_layers
  assert cpu_attention.FORWARD not in str(
      jax.make_jaxpr(lambda m: m(tokens, positions, segments))(xla))
  # Logits and gradients (the padding rows' too) within the error model of our attention; a
  # planted bug caught.
  tiny_hf.assert_same_function(xla, flash, "cpu_flash vs xla")


def test_cpu_flash_is_refused_on_a_mesh_of_several_devices_and_in_bf16(llama_dir):
  spec = config_lib.ModelSpec(init_from=str(llama_dir), attention_impl="cpu_flash")
  mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  with pytest.raises(cpu_ffi.CpuFfiError,
                     match=r'attention_impl="cpu_flash" runs on one CPU device.*2 cpu'):
    models.load(spec, mesh=mesh)
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert models.load(spec, mesh=one).config.attention_impl == "cpu_flash"
  # Both CPU kernels at once: each check sees the mesh's devices (not an exhausted iterator).
  both = models.load(config_lib.ModelSpec(init_from=str(llama_dir), attention_impl="cpu_flash",
                                          cpu_gemm="mkl"), mesh=one).config
  assert (both.attention_impl, both.cpu_gemm) == ("cpu_flash", "mkl")
  with pytest.raises(config_lib.ConfigError, match=r'"cpu_flash".*computes in float32'):
    config_lib.ModelSpec(attention_impl="cpu_flash", compute_dtype="bfloat16").validate()
  with pytest.raises(ValueError, match=r'ModelConfig\.attention_impl=.*"cpu_flash".*float32'):
    ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=4, attention_impl="cpu_flash",
                compute_dtype="bfloat16")
