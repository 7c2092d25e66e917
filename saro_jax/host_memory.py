r"""How the C allocator treats XLA's per-step buffers when the host CPU is the device.

XLA's CPU runtime allocates each executable's temp buffer anew on every call (3.7 GiB for the
SmolLM2 RW or SRPO step) and frees it on return, from one of its worker threads. glibc serves any
allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so every step page-faults on
all of it again and the kernel zeroes it again: 1.2 M minor faults and ~3.3 CPU s of system time
per SmolLM2 SRPO step, measured with ``getrusage``. On an accelerator the device allocator (BFC)
already keeps its memory; only the CPU backend pays.

``reuse_freed_memory`` makes glibc keep what it frees, as an accelerator's allocator does:
every thread allocates from the main heap (``M_ARENA_MAX`` 1; a thread's own arena cannot hold a
block over 64 MiB and would fall back to ``mmap``), large blocks come from that heap too
(``M_MMAP_MAX`` 0), and glibc never hands freed memory back itself (``M_TRIM_THRESHOLD`` -1;
``release_if_grown`` does when the heap grows). The second step onwards then reuses the first
step's pages: 0 faults, and the SRPO step ran 1.12-1.19x faster in an in-process A/B (BUILD.md,
benchmarks/README.md). The cost: the process's resident memory stays at its peak (8.50 GB
against a peak of 8.10 GB for that step).

The arena limit only binds threads that have not allocated yet, so call this before the JAX
backend starts (``main.py`` does, right after ``import jax``). It changes the whole process, so
only entry points call it; importing saro_jax does not.

``SARO_JAX_HOST_MALLOC``: ``auto`` (the default: only when the CPU is JAX's device), ``reuse``
(always), ``system`` (never).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

ENV = "SARO_JAX_HOST_MALLOC"
CHOICES = ("auto", "reuse", "system")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def accelerator_installed() -> bool:
  """Whether JAX would start on a TPU or GPU when JAX_PLATFORMS is unset (it prefers them)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
    return True
  try:
    import jax_plugins  # the namespace package JAX also scans for PJRT plugins
  except ImportError:
    return False
  return any(True for _ in getattr(jax_plugins, "__path__", ()))


def wanted(choice: str, platforms: str | None, has_accelerator: bool) -> bool:
  """The policy. ``platforms``: ``jax.config.jax_platforms`` (e.g. "cpu", "cuda,cpu", None)."""
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
  if choice != "auto":
    return choice == "reuse"
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  return not has_accelerator


def _glibc():
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None
  return libc


def reuse_freed_memory(platforms: str | None = None) -> str:
  """Sets the policy for this process; returns a line saying what was done, for the log."""
  choice = os.environ.get(ENV, "auto")
  if platforms is None:
    import jax
    platforms = jax.config.jax_platforms
  if not wanted(choice, platforms, choice == "auto" and not platforms and accelerator_installed()):
    return f"host malloc: the system's ({ENV}={choice}, platforms {platforms or 'auto'})"
  libc = _glibc()
  if libc is None:
    return "host malloc: the system's (not glibc)"
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  ok = (libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
        libc.mallopt(_M_TRIM_THRESHOLD, -1))
  if not all(ok):
    raise RuntimeError(f"mallopt refused a setting (arena, mmap, trim: {ok})")
  libc.sbrk.restype = ctypes.c_void_p
  libc.sbrk.argtypes = [ctypes.c_ssize_t]
  _heap.update(libc=libc, top=0, checks=0, released=0)
  return "host malloc: freed memory is kept and reused (one arena, no mmap, no trim)"


_heap: dict = {"libc": None}


def reusing() -> bool:
  """Whether ``reuse_freed_memory`` applied its policy in this process."""
  return _heap["libc"] is not None


def release_if_grown(warmup: int = 2) -> bool:
  """Hands the heap's free pages back if the heap grew since the last call (after ``warmup``
  calls, which see the programs' first allocations). Call it between steps: the train loop does,
  at its host syncs.

  One heap keeps its freed blocks, so a block that is freed and allocated again each call (XLA's
  temp buffer) lands where it was, unless a small block that lives on was carved from its hole
  meanwhile: then the next one no longer fits and the heap grows by a whole temp buffer, and the
  old hole stays resident. A program that does this on most calls would grow without bound.
  Each growth is seen here (the heap's end, ``sbrk(0)``, moved up) and answered with
  ``malloc_trim(0)``, which hands every free page back: the next step faults its temp in again,
  as glibc's default policy would on every step, and the old holes stop counting as resident.
  Returns whether it released. A no-op unless ``reuse_freed_memory`` applied its policy.
  """
  libc = _heap["libc"]
  if libc is None:
    return False
  top = libc.sbrk(0) or 0
  grew, _heap["top"] = top > _heap["top"], max(top, _heap["top"])
  _heap["checks"] += 1
  if not grew or _heap["checks"] <= warmup:
    return False
  libc.malloc_trim(0)
  _heap["released"] += 1
  if _heap["released"] == 1:
    log.info("host malloc: the heap grew after warm-up; its free pages were handed back"
             " (host_memory.release_if_grown)")
  return True


def available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
  """The kernel's estimate of the memory a new allocation can take without swapping
  (``MemAvailable``), or None where it cannot be read (not Linux)."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # "MemAvailable:  12345 kB"
  except (OSError, ValueError, IndexError):
    return None
  return None
