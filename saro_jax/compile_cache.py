r"""JAX's persistent compilation cache for ``python -m saro_jax.main``: a run loads the programs an
earlier run compiled (train steps, the reference pass, the sampler's prefill and decode per
bucket) from disk instead of compiling them again.

Every run of the same command compiles the same programs: a resume after preemption, a pipeline
re-run whose finished stages are skipped, the evaluation of another checkpoint of the same model.
Some settings are baked into a program: another learning rate or step count compiles the train
step anew (its schedule is a constant), another seed the initialisation (tiny RW runs: each loaded
the other of their 2 programs). On a 2-core CPU the README's tiny pipeline took
80 s cold and 48 s with the cache warm (RW loss bit-identical); a SmolLM2 SRPO step alone compiles
for ~20 s, the sampler's prefill and decode ~9 s per prompt bucket, and an 8B model's steps take
minutes on an accelerator host.

What a hit loads is the executable XLA built for the same program: JAX's key covers the lowered
program, the devices and their topology, the compile options, ``XLA_FLAGS`` and the jaxlib version,
so results are bit-identical to a fresh compile. XLA:CPU's loader checks that the host has the
CPU features the code was built for and recompiles when it does not (a cache directory shared by
different CPUs is safe); an unreadable entry is a warning and a recompile, never a wrong program.

Choices (``--compile_cache`` in main.py):
  * default directory ``$XDG_CACHE_HOME/saro_jax/xla`` (``~/.cache/saro_jax/xla``); ``""`` or
    ``off`` turns it off. ``JAX_COMPILATION_CACHE_DIR``, when set, wins (JAX's own knob, as the
    test suite sets it).
  * the size is capped (4 GiB unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` says otherwise): a cap makes
    JAX evict least-recently-used entries AND take a file lock around every read and write, so
    processes sharing the directory (the hosts of a pod on a shared filesystem, concurrent local
    runs) never read a half-written entry.
  * only programs that took >= 1 s to compile are written (JAX's default threshold): the small
    ones cost less to compile than to read back.
  * a directory that cannot be created or written leaves the cache off and says so in the log:
    a cache never stops a run.
On a multi-host run JAX writes entries from process 0 only; point the flag at a filesystem every
host sees (``gs://...`` needs ``etils``) for the other hosts to hit too.
"""

from __future__ import annotations

import collections
import os

MAX_BYTES = 4 << 30
OFF = ("", "off", "none")


def cache_home() -> str:
  """Where saro_jax keeps its caches: ``$XDG_CACHE_HOME/saro_jax`` (``~/.cache/saro_jax``)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "saro_jax")


def default_dir() -> str:
  return os.path.join(cache_home(), "xla")


def choose(requested: str, jax_dir: str | None) -> tuple[str | None, str]:
  """(directory or None, why): JAX's own setting wins, then ``requested``; a local directory
  must be creatable and writable."""
  if jax_dir:
    return jax_dir, "JAX_COMPILATION_CACHE_DIR"
  if requested.strip().lower() in OFF:
    return None, "--compile_cache is off"
  if "://" in requested:  # a remote filesystem (gs://, s3://): JAX opens it through etils
    return requested, "--compile_cache"
  path = os.path.abspath(os.path.expanduser(requested))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    return None, f"cannot create {path} ({e.strerror}); running without it"
  if not os.access(path, os.W_OK | os.X_OK):
    return None, f"{path} is not writable; running without it"
  return path, "--compile_cache"


_counts: collections.Counter = collections.Counter()
_listening = False


def _on_event(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _counts["loaded"] += 1
  elif event == "/jax/compilation_cache/cache_misses":  # recorded when an entry is written
    _counts["written"] += 1


def _on_duration(event: str, duration_secs: float, **_) -> None:
  if event == "/jax/compilation_cache/compile_time_saved_sec":
    _counts["saved_s"] += duration_secs


def enable(requested: str | None = None) -> str:
  """Turns the cache on at ``requested`` (None: ``default_dir()``; see the module doc); returns
  one line for the log. Call it before the first compile."""
  import jax

  requested = default_dir() if requested is None else requested
  directory, why = choose(requested, jax.config.jax_compilation_cache_dir)
  if directory is None:
    return f"compile cache: off ({why})"
  jax.config.update("jax_compilation_cache_dir", directory)
  if jax.config.jax_compilation_cache_max_size == -1:  # unset: cap it, which also turns on the lock
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  cap = jax.config.jax_compilation_cache_max_size
  return (f"compile cache: {directory} (from {why}; cap {cap / 2**30:.1f} GiB; programs that"
          f" compile in >= {jax.config.jax_persistent_cache_min_compile_time_secs:g} s)")


def summary() -> str:
  """What the cache did in this process so far, for the log at the end of a run."""
  return (f"compile cache: {_counts['loaded']} program(s) loaded ({_counts['saved_s']:.1f} s of"
          f" compiling saved), {_counts['written']} written")
