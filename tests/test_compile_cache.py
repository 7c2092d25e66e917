"""The persistent compilation cache of ``python -m saro_jax.main`` (saro_jax/compile_cache.py):
a second run of the same command loads every program the first one wrote, and trains to the
same bits; JAX_COMPILATION_CACHE_DIR wins over ``--compile_cache``; a directory that cannot be
made leaves the cache off instead of stopping the run."""

import os
import re

import fault_runs
from saro_jax import compile_cache


def _run(workdir, env, *extra):
  import subprocess
  cmd = fault_runs.cli(workdir, *extra)
  proc = subprocess.run(cmd, cwd=fault_runs.ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  used = re.search(r"compile cache: (\S+) \(from ([^;]+);", proc.stderr)
  done = re.search(r"compile cache: (\d+) program\(s\) loaded \(([\d.]+) s of compiling saved\),"
                   r" (\d+) written", proc.stderr)
  assert used and done, proc.stderr[-3000:]
  return used.group(1), used.group(2), int(done.group(1)), int(done.group(3))


def test_second_run_loads_every_program_and_trains_to_the_same_bits(tmp_path):
  cache, other = tmp_path / "cache", tmp_path / "flag_dir"
  # The suite's own cache (conftest) is dropped so that main's flag decides; conftest's zero
  # compile-time threshold is inherited, so the tiny model's programs are written at all.
  env = {k: v for k, v in fault_runs.ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  where, why, loaded, written = _run(tmp_path / "a", env, f"--compile_cache={cache}")
  assert (where, why, loaded) == (str(cache), "--compile_cache", 0)
  assert written >= 2, "the train step and at least one more program are written"
  entries = {p.name for p in cache.iterdir() if p.name.endswith("-cache")}
  assert len(entries) == written

  # JAX's own variable wins over the flag: the run loads from it and the flag's dir stays empty.
  env_b = dict(env, JAX_COMPILATION_CACHE_DIR=str(cache))
  where, why, loaded, written_b = _run(tmp_path / "b", env_b, f"--compile_cache={other}")
  assert (where, why) == (str(cache), "JAX_COMPILATION_CACHE_DIR")
  assert (loaded, written_b) == (written, 0), "every program of the first run is loaded"
  assert not other.exists()
  fault_runs.assert_bit_identical(fault_runs.final_params(tmp_path / "a"),
                                  fault_runs.final_params(tmp_path / "b"))


def test_choose_the_directory(tmp_path):
  assert compile_cache.choose(str(tmp_path / "x"), "/from/jax") == ("/from/jax",
                                                                    "JAX_COMPILATION_CACHE_DIR")
  for off in ("", "off", "OFF", "none"):
    assert compile_cache.choose(off, None)[0] is None
  path, why = compile_cache.choose(str(tmp_path / "a" / "b"), None)
  assert path == str(tmp_path / "a" / "b") and os.path.isdir(path) and why == "--compile_cache"
  assert compile_cache.choose("gs://bucket/xla", None) == ("gs://bucket/xla", "--compile_cache")
  # A path under a regular file cannot be made (as root too, unlike a read-only directory).
  (tmp_path / "file").write_text("")
  path, why = compile_cache.choose(str(tmp_path / "file" / "xla"), None)
  assert path is None and "cannot create" in why and str(tmp_path / "file" / "xla") in why


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == str(tmp_path / "saro_jax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compile_cache.default_dir() == os.path.expanduser("~/.cache/saro_jax/xla")
