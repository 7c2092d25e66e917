"""host_memory: the CPU backend's per-call buffers are reused instead of faulted in on every call.

Each check runs in a fresh process (the allocator settings are process-wide and must precede the
threads that allocate) and counts the process's minor page faults around a write of a large
block: a block that is fresh memory faults at least once per page written, and a page is at most
2 MiB (a transparent huge page, where the kernel gives them: `HUGE`); a block that reuses freed
pages faults on none of them.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from saro_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = (2 << 20) // 4096  # 4 KiB pages in a 2 MiB one: the fewest faults fresh memory can take

PROBE = r"""
import json, resource, sys
from saro_jax import host_memory
line = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp

def rss_mib():
  return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) // 1024

def f(x_NxD, v_D):  # two [N, D] intermediates feed products: 2 x 64 MiB of temp, every call
  a_NxD = jnp.sin(x_NxD)
  b_NxD = jnp.cos(x_NxD)
  return jnp.sum(a_NxD @ v_D) + jnp.sum(b_NxD @ v_D)

x, v = jnp.ones((2048, 8192), jnp.float32), jnp.ones((8192,), jnp.float32)
compiled = jax.jit(f).lower(x, v).compile()
faults, rss = [], []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(compiled(x, v))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  host_memory.release_if_grown()  # as the train loop does between steps
  rss.append(rss_mib())
print(json.dumps({"line": line, "temp": compiled.memory_analysis().temp_size_in_bytes,
                  "faults": faults, "rss_mib": rss}))
"""

# glibc directly: one thread frees a 256 MiB block, a thread started later allocates as much and
# writes it (XLA's temp buffers come and go on its worker threads, as here).
THREADS = r"""
import ctypes, json, resource, threading
from saro_jax import host_memory
line = host_memory.reuse_freed_memory(platforms="cpu")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
out = {}

def use(name, keep):
  p = libc.malloc(SIZE)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(p, 1, SIZE)
  out[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  if not keep:
    libc.free(p)

for name in ("first", "second"):
  t = threading.Thread(target=use, args=(name, name == "second"))
  t.start()
  t.join()
print(json.dumps(dict(out, line=line, pages=SIZE // 4096)))
"""


def _run(script: str, mode: str) -> dict:
  env = dict(os.environ, SARO_JAX_HOST_MALLOC=mode, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
  return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


needs_glibc = pytest.mark.skipif(not _glibc() or "GLIBC_TUNABLES" in os.environ,
                                 reason="glibc's default malloc policy is what this compares against")


@needs_glibc
def test_a_block_freed_on_one_thread_is_reused_by_the_next():
  reuse, system = _run(THREADS, "reuse"), _run(THREADS, "system")
  assert "kept and reused" in reuse["line"] and "the system's" in system["line"]
  fresh = reuse["pages"] // HUGE
  # The system's policy maps a 256 MiB block afresh (above its 32 MiB mmap threshold) for each
  # thread: writing it faults on every page, twice.
  assert system["first"] >= fresh and system["second"] >= fresh, system
  # One heap that keeps what it frees: the second thread gets the first one's pages back.
  assert reuse["first"] >= fresh and reuse["second"] < fresh, reuse


@needs_glibc
def test_xla_calls_reuse_their_temp_buffer_and_resident_memory_stays_bounded():
  reuse, system = _run(PROBE, "reuse"), _run(PROBE, "system")
  assert reuse["temp"] >= 128 << 20, reuse  # above glibc's 32 MiB mmap threshold, by far
  fresh = reuse["temp"] // 4096 // HUGE
  # The system's policy: each call maps its temp afresh and faults on every page it writes.
  assert min(system["faults"][1:]) >= fresh, system
  # Reuse: calls that find the previous call's temp fault on none of it. Not every call does:
  # when a small block that lives on is carved from the freed temp, the next temp no longer fits
  # there and the heap grows (release_if_grown's docstring); the growth is handed back at once,
  # so resident memory stays within two temps of the first call's.
  assert min(reuse["faults"][1:]) < fresh, reuse
  temp_mib = reuse["temp"] >> 20
  assert max(reuse["rss_mib"]) <= reuse["rss_mib"][0] + 2 * temp_mib, reuse


@pytest.mark.parametrize("choice, platforms, accelerator, expected", [
    ("auto", "cpu", True, True),          # JAX_PLATFORMS=cpu: the host is the device
    ("auto", "cuda,cpu", False, False),   # an accelerator first: its allocator keeps its memory
    ("auto", "tpu", False, False),
    ("auto", None, True, False),          # unset, and a GPU/TPU plugin installed: JAX takes it
    ("auto", None, False, True),          # unset, nothing installed: CPU
    ("reuse", "cuda", True, True),
    ("system", "cpu", False, False),
])
def test_policy(choice, platforms, accelerator, expected):
  assert host_memory.wanted(choice, platforms, accelerator) is expected


def test_a_misspelt_choice_names_the_variable():
  with pytest.raises(ValueError, match="SARO_JAX_HOST_MALLOC='reues'"):
    host_memory.wanted("reues", "cpu", False)
