"""fp32 projections through MKL's sgemm inside XLA:CPU programs (``model.cpu_gemm="mkl"``, opt-in).

Why: on an Intel Xeon with AVX-512, PyTorch's GEMMs (oneDNN / MKL) ran six SmolLM2 MLP blocks
fwd + bwd 1.35x faster than XLA:CPU's own dots, and XLA's oneDNN dot fusion aborts on a fwd + bwd
program. MKL called from inside the jitted step (this module) ran side_by_side's SRPO step 1.129x
(faster in 5 of 5 in-process rounds) and the RW step 1.10x there; on an AMD Zen 3 the same call
ran 0.99x XLA's, so it stays off by default (benchmarks/README.md, sessions 53 and 56).

How: ``cpu_gemm.cc``, a ~40-line XLA FFI handler, is compiled with the system's C++ compiler
against ``jax.ffi.include_dir()`` on first use, into a per-user cache keyed by its source, the
jaxlib version and the BLAS it links; it calls the ``sgemm_`` that torch's CPU wheel exports from
its MKL (torch is the reference of the test extra; nothing else here imports it). ``matmul`` is a
``custom_vjp`` whose forward and both gradients are that call, transposes as flags, no copies.

Limits, checked where the model is loaded (``check_mesh``): CPU devices only, and one device per
program, since a custom call is opaque to XLA's partitioner. MKL runs its own OpenMP threads beside
XLA's pool; ``register`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment has a value, so
they sleep at once between calls (the MLP blocks 1.21x instead of 1.18x). That takes effect only
if OpenMP starts with the handler, i.e. torch was not imported before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

TARGET = "saro_jax_sgemm"
SOURCE = pathlib.Path(__file__).with_name("cpu_gemm.cc")
CACHE_ENV = "SARO_JAX_CPU_GEMM_CACHE"
COMPILER_ENV = "CXX"


class CpuGemmError(RuntimeError):
  """``model.cpu_gemm="mkl"`` cannot run here; the message says what is missing and the fix."""


def blas_library() -> pathlib.Path:
  """The shared library with MKL's ``sgemm_``: torch's CPU wheel's ``libtorch_cpu.so``."""
  spec = importlib.util.find_spec("torch")
  if spec is None or not spec.submodule_search_locations:
    raise CpuGemmError('config.model.cpu_gemm="mkl" calls the MKL inside torch\'s CPU wheel, and '
                       'torch is not installed: pip install torch, or set model.cpu_gemm="xla"')
  path = pathlib.Path(spec.submodule_search_locations[0]) / "lib" / "libtorch_cpu.so"
  if not path.exists():
    raise CpuGemmError(f'config.model.cpu_gemm="mkl": {path} is missing (torch\'s Linux CPU wheel '
                       'carries it); set model.cpu_gemm="xla"')
  return path


def _cache_dir() -> pathlib.Path:
  root = os.environ.get(CACHE_ENV) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "saro_jax", "cpu_gemm")
  return pathlib.Path(root)


def _build(blas: pathlib.Path) -> pathlib.Path:
  """The compiled handler for this source, jaxlib and BLAS: built once, then read from the cache.
  Concurrent builders (test workers, hosts sharing a home) each write a temp file and rename it
  into place, so a reader never sees half a library."""
  key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()
                       + str(blas).encode()).hexdigest()[:16]
  out = _cache_dir() / f"libsaro_jax_sgemm_{key}.so"
  if out.exists():
    return out
  named = os.environ.get(COMPILER_ENV)
  compiler = shutil.which(named) if named else (shutil.which("g++") or shutil.which("c++"))
  if not compiler:
    raise CpuGemmError('config.model.cpu_gemm="mkl" compiles a small C++ handler on first use, '
                       'and no C++ compiler was found'
                       + (f' ({COMPILER_ENV}={named!r} is not an executable)' if named else '')
                       + ' (install g++, or set CXX); or set model.cpu_gemm="xla"')
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
         str(SOURCE), "-o", tmp, f"-L{blas.parent}", f"-l:{blas.name}", f"-Wl,-rpath,{blas.parent}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise CpuGemmError(f"compiling {SOURCE} for model.cpu_gemm=\"mkl\" failed ({' '.join(cmd)}):\n"
                       f"{done.stderr[-2000:]}")
  os.replace(tmp, out)
  return out


@functools.cache
def register() -> None:
  """Builds (first time) and loads the handler, and registers it with XLA:CPU (once a process)."""
  path = _build(blas_library())
  # MKL's OpenMP threads then sleep at once between calls instead of spinning beside XLA's pool.
  # OpenMP reads this when it starts, i.e. here unless torch was imported first (then its value
  # stands).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  library = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.SaroJaxSgemm), platform="cpu")


def check_mesh(devices) -> None:
  """Raises unless ``devices`` (a mesh's, or a model's) are one CPU device."""
  devices = list(devices)
  if len(devices) != 1 or devices[0].platform != "cpu":
    raise CpuGemmError(
        f'config.model.cpu_gemm="mkl" runs on one CPU device, and this program spans '
        f"{len(devices)} {devices[0].platform} device(s): a custom call is opaque to XLA's "
        'partitioner; set model.cpu_gemm="xla" (the default) for meshes and accelerators')


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
