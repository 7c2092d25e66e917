"""The bundled data set is exactly what its generator (tools/bundled_data.py) writes."""

import os
import subprocess
import sys

from saro_jax.data import bundled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_rewrites_the_bundled_files_byte_for_byte(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "tools.bundled_data", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  written = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
  assert len(written) >= 8  # 7 JSONL files + the tokenizer's files
  for fresh in written:
    committed = os.path.join(bundled.DIR, os.path.relpath(fresh, tmp_path))
    with open(fresh, "rb") as a, open(committed, "rb") as b:
      assert a.read() == b.read(), (f"{committed} differs from a fresh `python -m"
                                    " tools.bundled_data`; regenerate and commit")
