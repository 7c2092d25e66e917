"""Training attention through PyTorch's CPU flash-attention kernel inside XLA:CPU programs
(``model.attention_impl="cpu_flash"``, opt-in, fp32, one CPU device).

Why: on an Intel Xeon (AVX-512, 2 cores) our tiled attention (``tiled_attention``) ran one
SmolLM2 layer's causal attention fwd + bwd in 64 ms at 8 x 256 slots and 111 ms at 4 x 512,
against 41 and 73 ms for this kernel called from inside the jitted program (the forward alone
24 / 36 ms against 12 / 24 ms); benchmarks/README.md, session 57.

How: ``cpu_attention.cc``, two XLA FFI handlers (forward; backward) around ATen's
``_scaled_dot_product_flash_attention_for_cpu`` and its backward, built on first use against
torch's headers and linked to its CPU wheel (``cpu_ffi.build``). ``attention`` is a
``custom_vjp``: the forward saves q, k, v, the output and the log-sum-exp (nothing L x L but the
mask's bias), the backward is the kernel's. The boolean mask goes in as an additive fp32 bias
(0 where visible, ``tiled_attention.BIG_NEGATIVE`` where not: a finite value, so a query that
sees nothing still gives finite numbers, as in our own attentions), with ``is_causal`` on, which
every training mask is by slot, so the kernel skips the key blocks above the diagonal. It visits
every block below it: packed rows and token trees do not skip the blocks between segments or
sibling branches, as ``tiled_attention`` does.

Same arithmetic as ``transformer.causal_attention`` up to the order of the fp32 sums (scores
scaled inside the kernel, an online softmax over key blocks); tests/test_cpu_attention.py bounds
both against a float64 attention. Limits as ``cpu_gemm``'s (``cpu_ffi``): CPU, one device, fp32.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from saro_jax.models import cpu_ffi, tiled_attention

FORWARD, BACKWARD = "saro_jax_flash_forward", "saro_jax_flash_backward"
SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
OPTION = 'model.attention_impl="cpu_flash"'


@functools.cache
def register() -> None:
  """Builds (once per cache) and registers both handlers with XLA:CPU."""
  torch = cpu_ffi.torch_dir(OPTION)
  libraries = [cpu_ffi.torch_library(OPTION, "libtorch_cpu.so"),
               cpu_ffi.torch_library(OPTION, "libc10.so")]
  # torch's Linux wheels are built with the C++11 string ABI (always, since torch 2.7).
  path = cpu_ffi.build(SOURCE, OPTION, libraries, include_dirs=[torch / "include"],
                       defines=["_GLIBCXX_USE_CXX11_ABI=1"])
  cpu_ffi.register(path, {FORWARD: "SaroJaxFlashForward", BACKWARD: "SaroJaxFlashBackward"})


def check_mesh(devices) -> None:
  """Raises unless ``devices`` (a mesh's, or a model's) are one CPU device."""
  cpu_ffi.check_devices(devices, OPTION)


def mask_bias(mask_Bx1xLxL: jax.Array) -> jax.Array:
  """The boolean mask as the kernel's additive fp32 bias."""
  return jnp.where(mask_Bx1xLxL, jnp.float32(0), jnp.float32(tiled_attention.BIG_NEGATIVE))


def _check(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL):
  dtypes = {x.dtype for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL)}
  if dtypes != {jnp.dtype(jnp.float32)}:
    raise ValueError(f'attention_impl="cpu_flash" computes in float32; got {sorted(map(str, dtypes))}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
              bias_Bx1xLxL: jax.Array, scale: float) -> jax.Array:
  """Grouped-query attention of whole rows -> [B, L, N, H]; ``bias`` from ``mask_bias`` of a mask
  that is causal by slot (the kernel skips the keys after each query regardless)."""
  return _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, scale)[0]


def _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, scale):
  _check(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL)
  register()
  B, L, N, _ = q_BxLxNxH.shape
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q_BxLxNxH.shape, jnp.float32),
                                    jax.ShapeDtypeStruct((B, N, L), jnp.float32)))
  return call(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, scale=np.float32(scale))


def _attention_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, scale):
  out_BxLxNxH, lse_BxNxL = _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, scale)
  return out_BxLxNxH, (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, out_BxLxNxH, lse_BxNxL)


def _attention_bwd(scale, residuals, d_out_BxLxNxH):
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias_Bx1xLxL, out_BxLxNxH, lse_BxNxL = residuals
  call = jax.ffi.ffi_call(BACKWARD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                          for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)))
  d_q, d_k, d_v = call(d_out_BxLxNxH.astype(jnp.float32), q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                       bias_Bx1xLxL, out_BxLxNxH, lse_BxNxL, scale=np.float32(scale))
  # The bias is a function of the boolean mask: no gradient (None: a zero cotangent).
  return d_q, d_k, d_v, None


attention.defvjp(_attention_fwd, _attention_bwd)
