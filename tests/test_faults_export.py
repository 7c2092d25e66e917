"""A crash or a bad file during the HF export (BUILD.md "Failure behaviour"): the export is
verified against the in-memory model before it is renamed into place, refuses non-finite
weights, and a kill mid-write leaves no half-written directory."""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fault_runs import run
from saro_jax import models, sharding, train
from saro_jax.models import hf
from saro_jax.models.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_model():
  config = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=5000.0,
                       rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=128)
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  with sharding.use(mesh):
    return models.init_random(config, seed=0, mesh=mesh)


def test_export_is_verified_and_renamed_into_place(tiny_model, tmp_path):
  out = hf.export_hf(tiny_model, tmp_path / "hf")
  assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary left
  diff = hf.verify_export(tiny_model, out)
  tol = hf.export_tolerance(tiny_model.config, 1.0)
  print(f"export fp32: reloaded vs in-memory max |d logits| = {diff:.2e} (bound {tol:.1e} x scale)")
  # bf16 export: compared with the in-memory weights rounded to bf16, so the same tight bound.
  out16 = hf.export_hf(tiny_model, tmp_path / "hf16", dtype="bfloat16")
  print(f"export bf16: max |d logits| = {hf.verify_export(tiny_model, out16, export_dtype='bfloat16'):.2e}")
  with pytest.raises(hf.ExportError, match="differ"):  # the bf16 files are not the fp32 model
    hf.verify_export(tiny_model, out16)


def test_export_with_a_wrong_tensor_is_refused_and_old_export_kept(tiny_model, tmp_path, monkeypatch):
  """The bound catches a real defect: one tensor off by a factor 1 + 1e-3."""
  out = hf.export_hf(tiny_model, tmp_path / "hf")
  before = {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)}
  original = hf._to_hf_layout
  hit = []

  def off_by_a_little(value, layout, config):
    value = original(value, layout, config)
    if not hit and value.ndim == 2 and value.shape[0] == config.intermediate_size:
      hit.append(True)
      return value * np.float32(1 + 1e-3)
    return value

  monkeypatch.setattr(hf, "_to_hf_layout", off_by_a_little)
  with pytest.raises(hf.ExportError, match="do not reproduce the model"):
    hf.export_hf(tiny_model, out)
  assert hit
  assert {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_refuses_nonfinite_weights(tiny_model, tmp_path):
  graphdef, params = train.split_model(tiny_model)
  leaf = jax.tree.leaves(params)[0]
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x is leaf else x, params)
  with pytest.raises(hf.ExportError, match="non-finite"):
    hf.export_hf(train.merge_model(graphdef, bad), tmp_path / "hf")
  assert not os.path.exists(tmp_path / "hf")


CRASHING_EXPORT = r"""
import os, signal, sys
import jax
from saro_jax import models
from saro_jax.models import hf
from saro_jax.models.config import ModelConfig
import safetensors.numpy as stn
config = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False)
model = models.init_random(config, seed=0)
if sys.argv[2] == "crash":
  real = stn.save_file
  def save_then_die(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:  # half of the weights on disk, then the machine goes away
      f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
  stn.save_file = save_then_die
hf.export_hf(model, sys.argv[1])
print("exported")
"""


@pytest.mark.heavy
def test_export_killed_mid_write_leaves_no_half_written_dir(tmp_path):
  script = tmp_path / "export.py"
  script.write_text(CRASHING_EXPORT)
  out = tmp_path / "hf"
  crashed = run([sys.executable, str(script), str(out), "crash"])
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
  assert not out.exists()  # only the hidden temporary, which nothing mistakes for an export
  assert os.listdir(tmp_path / ".hf.tmp-export")
  done = run([sys.executable, str(script), str(out), "ok"])
  assert done.returncode == 0 and "exported" in done.stdout, done.stderr[-3000:]
  assert (out / "model.safetensors").is_file()
  assert sorted(os.listdir(tmp_path)) == ["export.py", "hf"]  # the stale temporary is gone
