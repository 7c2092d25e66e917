"""fp32 projections through MKL's sgemm inside XLA:CPU programs (``model.cpu_gemm="mkl"``, opt-in).

Why: on an Intel Xeon with AVX-512, PyTorch's GEMMs (oneDNN / MKL) ran six SmolLM2 MLP blocks
fwd + bwd 1.35x faster than XLA:CPU's own dots, and XLA's oneDNN dot fusion aborts on a fwd + bwd
program. MKL called from inside the jitted step (this module) ran side_by_side's SRPO step 1.129x
(faster in 5 of 5 in-process rounds) and the RW step 1.10x there; on an AMD Zen 3 the same call
ran 0.99x XLA's, so it stays off by default (benchmarks/README.md, sessions 53 and 56).

How: ``cpu_gemm.cc``, a ~40-line XLA FFI handler, built on first use (``cpu_ffi.build``: the
system's C++ compiler, a per-user cache keyed by source and versions) and linked to the ``sgemm_``
that torch's CPU wheel exports from its MKL. ``matmul`` is a ``custom_vjp`` whose forward and both
gradients are that call, transposes as flags, no copies.

Limits (``cpu_ffi``): CPU only, one device per program (a custom call is opaque to XLA's
partitioner; the training config and ``models.load`` refuse more). MKL's OpenMP threads sleep
between calls (``cpu_ffi.register``).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from saro_jax.models import cpu_ffi

TARGET = "saro_jax_sgemm"
SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")
OPTION = 'model.cpu_gemm="mkl"'
CpuGemmError = cpu_ffi.CpuFfiError


def blas_library() -> pathlib.Path:
  """The shared library with MKL's ``sgemm_``: torch's CPU wheel's ``libtorch_cpu.so``."""
  return cpu_ffi.torch_library(OPTION)


def _build(blas: pathlib.Path) -> pathlib.Path:
  return cpu_ffi.build(SOURCE, OPTION, [blas])


@functools.cache
def register() -> None:
  """Builds (once per cache) and registers the handler with XLA:CPU."""
  cpu_ffi.register(_build(blas_library()), {TARGET: "SaroJaxSgemm"})


def check_mesh(devices) -> None:
  """Raises unless ``devices`` (a mesh's, or a model's) are one CPU device."""
  cpu_ffi.check_devices(devices, OPTION)


def _sgemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """op(a) @ op(b) for 2-D fp32 operands, one sgemm call."""
  register()
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def matmul(x_MxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """``x @ w`` (fp32, 2-D) as an MKL sgemm; its gradients are sgemm calls too."""
  return _sgemm(x_MxI, w_IxO)


def _matmul_fwd(x_MxI, w_IxO):
  return _sgemm(x_MxI, w_IxO), (x_MxI, w_IxO)


def _matmul_bwd(residuals, g_MxO):
  x_MxI, w_IxO = residuals
  return _sgemm(g_MxO, w_IxO, trans_b=True), _sgemm(x_MxI, g_MxO, trans_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def applies(gemm: str, *dtypes) -> bool:
  """Whether ``dense`` runs a product with these operand dtypes through ``matmul``."""
  return gemm == "mkl" and all(jnp.dtype(d) == jnp.float32 for d in dtypes)
