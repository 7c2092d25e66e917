"""Every test process sees 8 virtual CPU devices, set before jax is imported anywhere.

One persistent XLA compilation cache per test session (JAX_COMPILATION_CACHE_DIR, a fresh
temporary directory unless set already), shared by the xdist workers and every subprocess the
tests start (they inherit the environment): the tiny models' steps are the same programs in many
files and in every `python -m saro_jax.main` a test launches, and each launch used to compile
them again. A cache hit loads the executable XLA built for the same program, devices and flags,
so results are bit-identical to a fresh compile. The size limit turns on jax's file lock, so
concurrent processes never read a half-written entry; an unreadable entry is only a warning and
a recompile. The directory is removed when the process that made it exits. Likewise one
directory for the tokenizers converted from GGUF files (SARO_JAX_GGUF_TOKENIZER_CACHE,
saro_jax/models/gguf.py), so the suite never writes to ~/.cache.

XLA's CPU code is compiled at LLVM optimisation level 0 (SARO_TEST_XLA_FLAGS, in XLA_FLAGS here
and passed to every subprocess a test starts): the suite compiles hundreds of small programs and
runs each on tiny inputs, so LLVM's optimisation passes were most of its CPU time
(test_models_scan's RW-steps and greedy tests: 77 s of user CPU at the default level, 45 s at
0). The level changes no HLO pass, no fusion and no buffer assignment (the planner's memory
figures are the same), and matrix products run in XLA's precompiled runtime either way; every
comparison in the suite is between programs compiled with the same flags or within a derived
error bound. Runs outside the tests keep XLA's default level.

A participant of a collective between the virtual devices may arrive up to 300 s late (XLA's
default is 60 s, then the process aborts); see COLLECTIVE_TIMEOUT_FLAG below.

PyTorch (the reference side of the parity tests) runs one intra-op thread (OMP_NUM_THREADS=1,
read when torch is imported, inherited by subprocesses): the suite runs two xdist workers on two
cores, so each worker has about one core, and torch's OpenMP team of two threads spins at every
barrier waiting for a thread the other worker has descheduled. Measured on this machine under
load (SmolLM2-135M greedy generate, 40-token prompt + 32 new tokens): 2 threads 39-45 s, 1 thread
10-12 s. It changes no result a test compares beyond fp32 reduction order, which every torch
comparison already bounds (tests/error_model.py). XLA's CPU thread pool does not read it.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# XLA:CPU aborts the process when a participant of a collective between the 8 virtual devices
# arrives 60 s after the others (20 s to a warning, 40 more to the abort). Inside pytest that
# abort shows only "Fatal Python error: Aborted": pytest captures fd 2, where XLA logs why
# (benchmarks/README.md, session 45). A worker died with exactly that symptom in session 44, its
# main thread in an eager sum over sharded parameters, on a 2-core machine running both workers
# and a benchmark subprocess; why a participant was that late is not known. The suite gives a
# late participant 300 s instead: a test that is only slow on a loaded machine passes, a real
# deadlock still ends the worker. The flag is added only where this jaxlib knows
# it (an unknown flag in XLA_FLAGS is fatal), probed once by the first process; the xdist
# workers and the tests' subprocesses inherit the result.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=300"


def _xla_takes(flag: str) -> bool:
  """Whether a process with ``flag`` in XLA_FLAGS starts its CPU backend (a probe that fails or
  hangs means no: the suite then runs with XLA's default)."""
  try:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"},
                           capture_output=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return probe.returncode == 0


if "SARO_TEST_XLA_FLAGS" not in os.environ:
  os.environ["SARO_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=0" + (
      " " + COLLECTIVE_TIMEOUT_FLAG if _xla_takes(COLLECTIVE_TIMEOUT_FLAG) else "")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["SARO_TEST_XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="saro_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
if "SARO_JAX_GGUF_TOKENIZER_CACHE" not in os.environ:  # saro_jax/models/gguf.py; not ~/.cache
  _tokenizers = tempfile.mkdtemp(prefix="saro_jax_test_gguf_tokenizers_")
  os.environ["SARO_JAX_GGUF_TOKENIZER_CACHE"] = _tokenizers
  atexit.register(shutil.rmtree, _tokenizers, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


import pytest  # noqa: E402  (after the environment above, which must precede any jax import)


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
  """SmolLM2-135M-Instruct's GGUF dequantized into an HF directory (`gguf_to_hf_dir`), written
  once per test run: the xdist workers of one run share it (their base temp dirs have one
  parent), a file lock makes the others wait for the first, and a marker file written last
  means a half-written directory is never used. Conversion costs ~45 s of one core."""
  import filelock
  from saro_jax.models import gguf
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  out, done = root / "smollm2_hf", root / "smollm2_hf.done"
  with filelock.FileLock(str(root / "smollm2_hf.lock")):
    if not done.exists():
      shutil.rmtree(out, ignore_errors=True)
      gguf.gguf_to_hf_dir(gguf.smollm2_gguf_path(), out)
      done.write_text("ok\n")
  return out


@pytest.fixture(scope="module")
def cpu_ffi_cache(tmp_path_factory):
  """A test module's own cache for the opt-in CPU kernels' handlers (saro_jax/models/cpu_ffi.py):
  the module builds them, so the build is part of its tests."""
  from saro_jax.models import cpu_ffi
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(cpu_ffi.CACHE_ENV, str(tmp_path_factory.mktemp("cpu_ffi")))
    yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A tiny random Llama saved in HF format (``tiny_hf``: non-default values where they change
  the numbers, rope theta 2345...), once per test module."""
  import tiny_hf
  return tiny_hf.save_tiny_hf("llama", tmp_path_factory.mktemp("tiny") / "llama")


# Heaviest files first under `--dist loadfile`. xdist's default queue puts files with many tests
# first, so the files of ONE slow test (the two-process SaRO run, the SmolLM2 eval and greedy
# runs) came last, and a worker takes another file whenever it has 2 tests or fewer left: the run
# could end with one worker on a few minutes of them while the other had nothing left. Giving out
# the longest remaining file first (longest-processing-time scheduling) leaves the many short
# files to even out the two workers at the end. Rough seconds per file on a quiet 2-core run: its
# slowest tests' setup + call from the whole suite's `--durations` (BUILD.md "Build and test
# here") plus an estimate for the rest of the file; only their ranking matters. A file not listed
# counts 0 and keeps xdist's order after the listed ones. Only the order changes: every test runs.
FILE_SECONDS = {
    "test_multiprocess_train.py": 140, "test_faults.py": 140, "test_mine.py": 120,
    "test_models_smollm2.py": 120, "test_main_e2e.py": 90, "test_sample.py": 90,
    "test_eval_smollm2.py": 85, "test_plan.py": 70, "test_sample_smollm2.py": 60,
    "test_benchmarks.py": 60, "test_faults_multihost.py": 50, "test_faults_nonfinite.py": 45,
    "test_faults_export.py": 40, "test_readme_api.py": 50, "test_models_scan.py": 45,
    "test_side_by_side.py": 35, "test_models_sharded.py": 25, "test_data_multiprocess.py": 20,
    "test_checkpoint.py": 15, "test_compile_cache.py": 30,
}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown (and unused) without xdist
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadfile":
    return None  # xdist's own scheduler for the other modes
  from xdist.scheduler import LoadFileScheduling

  class LongestFileFirst(LoadFileScheduling):
    def _assign_work_unit(self, node):
      # The work queue is keyed by file path; max keeps the first of equal costs (xdist's order).
      # xdist internals: if a later version changes them, fall back to its own order.
      queue = getattr(self, "workqueue", None)
      if queue and hasattr(queue, "move_to_end"):
        scope = max(queue, key=lambda s: FILE_SECONDS.get(os.path.basename(str(s)), 0))
        queue.move_to_end(scope, last=False)
      super()._assign_work_unit(node)

  return LongestFileFirst(config, log)
