"""Building the C++ XLA:CPU FFI handlers that call into torch's CPU wheel: the opt-in CPU kernels
``model.cpu_gemm="mkl"`` (``cpu_gemm.py``: MKL's sgemm) and ``model.attention_impl="cpu_flash"``
(``cpu_attention.py``: ATen's flash attention).

A handler's source ships in the package; on first use it is compiled with the system's C++
compiler against ``jax.ffi.include_dir()`` (and torch's headers where it includes them) into a
per-user cache (``~/.cache/saro_jax/cpu_ffi``, or ``$SARO_JAX_CPU_FFI_CACHE``), keyed by its
source, the jaxlib and torch versions and the libraries it links, and loaded from there after.
Concurrent builders (test workers, hosts sharing a home) each write a temp file and rename it into
place, so a reader never sees half a library. torch is the reference of the test extra; only these
opt-ins need it at run time.

Both kernels are custom calls, opaque to XLA's partitioner: one CPU device per program
(``check_devices``; the training config refuses them on more devices before any weights load).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import jax
import jaxlib

CACHE_ENV = "SARO_JAX_CPU_FFI_CACHE"
COMPILER_ENV = "CXX"


class CpuFfiError(RuntimeError):
  """An opt-in CPU kernel cannot run here; the message names the option, what is missing and the
  fix."""


def torch_dir(option: str) -> pathlib.Path:
  """The installed torch package's directory (its ``lib`` and ``include``); ``option`` (e.g.
  ``'model.cpu_gemm="mkl"'``) is named in the error when torch is missing."""
  spec = importlib.util.find_spec("torch")
  if spec is None or not spec.submodule_search_locations:
    raise CpuFfiError(f"config.{option} calls into torch's CPU wheel, and torch is not installed: "
                      f"pip install torch, or leave {option.split('=')[0]} at its default")
  return pathlib.Path(spec.submodule_search_locations[0])


def torch_library(option: str, name: str = "libtorch_cpu.so") -> pathlib.Path:
  """``torch/lib/<name>`` (Linux CPU wheels carry it), or a ``CpuFfiError``."""
  path = torch_dir(option) / "lib" / name
  if not path.exists():
    raise CpuFfiError(f"config.{option}: {path} is missing (torch's Linux CPU wheel carries it); "
                      f"leave {option.split('=')[0]} at its default")
  return path


def _cache_dir() -> pathlib.Path:
  root = os.environ.get(CACHE_ENV) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "saro_jax", "cpu_ffi")
  return pathlib.Path(root)


def _torch_version() -> str:
  try:
    return importlib.metadata.version("torch")
  except importlib.metadata.PackageNotFoundError:
    return ""


def build(source: pathlib.Path, option: str, libraries: Sequence[pathlib.Path], *,
          include_dirs: Iterable[pathlib.Path] = (), defines: Iterable[str] = ()) -> pathlib.Path:
  """The shared library compiled from ``source`` and linked to ``libraries``: built once, then
  read from the cache. ``option`` is named in the errors."""
  include_dirs, defines = [str(d) for d in include_dirs], list(defines)
  key_text = "\n".join([jaxlib.__version__, _torch_version(), *map(str, libraries), *include_dirs,
                        *defines])
  key = hashlib.sha256(source.read_bytes() + key_text.encode()).hexdigest()[:16]
  out = _cache_dir() / f"lib{source.stem}_{key}.so"
  if out.exists():
    return out
  named = os.environ.get(COMPILER_ENV)
  compiler = shutil.which(named) if named else (shutil.which("g++") or shutil.which("c++"))
  if not compiler:
    raise CpuFfiError(f"config.{option} compiles a small C++ handler on first use, and no C++ "
                      "compiler was found"
                      + (f" ({COMPILER_ENV}={named!r} is not an executable)" if named else "")
                      + f" (install g++, or set CXX); or leave {option.split('=')[0]} at its"
                      " default")
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", *(f"-D{d}" for d in defines),
         f"-I{jax.ffi.include_dir()}", *(f"-I{d}" for d in include_dirs), str(source), "-o", tmp]
  for lib in libraries:
    cmd += [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise CpuFfiError(f"compiling {source} for config.{option} failed ({' '.join(cmd)}):\n"
                      f"{done.stderr[-2000:]}")
  os.replace(tmp, out)
  return out


def register(library: pathlib.Path, targets: Mapping[str, str]) -> None:
  """Loads a built handler library and registers its handlers with XLA:CPU, ``targets`` mapping
  each custom-call target name to the handler symbol the library exports.

  torch's kernels run their own OpenMP threads beside XLA's pool: with ``OMP_WAIT_POLICY=PASSIVE``
  (set here unless the environment has a value) they sleep at once between calls instead of
  spinning (six MLP blocks through MKL 1.21x instead of 1.18x on an Intel Xeon). OpenMP reads it
  when it starts, i.e. when the first library loads, unless torch was imported first (then its
  value stands)."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  loaded = ctypes.cdll.LoadLibrary(str(library))
  for target, symbol in targets.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")


def check_devices(devices, option: str) -> None:
  """Raises unless ``devices`` (a mesh's, or a model's) are one CPU device."""
  devices = list(devices)
  if len(devices) != 1 or devices[0].platform != "cpu":
    raise CpuFfiError(
        f"config.{option} runs on one CPU device, and this program spans {len(devices)} "
        f"{devices[0].platform} device(s): a custom call is opaque to XLA's partitioner; leave "
        f"{option.split('=')[0]} at its default for meshes and accelerators")
