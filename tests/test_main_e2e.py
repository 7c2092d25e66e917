"""The README command end to end: ``python -m saro_jax.main --config configs/saro.py`` (tiny, CPU)
-> RW loss falls, SRPO prefers the chosen answers, the exported HF dir loads in transformers
(PyTorch) with the same logits as our model."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import error_model as em
import tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("saro")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  # Fewer steps than the preset's default to keep CI fast; everything else is the default.
  cmd = [sys.executable, "-m", "saro_jax.main", "--config", "configs/saro.py",
         f"--workdir={workdir}", "--config.rw.train.steps=24", "--config.srpo.train.steps=12",
         "--config.rw.train.progress_bar=false", "--config.srpo.train.progress_bar=false"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
  assert f"exported the SaRO model (HF format) to {workdir}/hf" in out.stdout
  return workdir


def test_pipeline_writes_summary_and_report(run_dir):
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["hf_dir"] == str(run_dir / "hf")
  report = (run_dir / "report.md").read_text()
  for stage in ("start", "rw", "srpo"):
    assert f"| {stage} |" in report  # the three models were evaluated


def test_rw_loss_falls(run_dir):
  rows = read_metrics(run_dir / "rw" / "metrics.jsonl")
  first, last = rows[0]["loss"], rows[-1]["loss"]
  print(f"RW loss {first:.3f} (step {rows[0]['step']}) -> {last:.3f} (step {rows[-1]['step']})")
  assert rows[-1]["step"] == 24
  assert last < first - 0.5
  stats = json.loads((run_dir / "rw" / "data_stats.json").read_text())
  assert stats["examples"] > 0 and "dropped" in stats


def test_srpo_prefers_chosen(run_dir):
  rows = read_metrics(run_dir / "srpo" / "metrics.jsonl")
  last = rows[-1]
  print({k: round(v, 3) for k, v in last.items() if k.startswith(("rewards/", "loss"))})
  assert last["step"] == 12
  assert last["rewards/accuracies"] >= 0.8
  assert last["rewards/margins"] > 0.5
  assert last["loss"] < 0.6931 - 0.2  # below log(2), the loss of an untrained policy
  for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected", "grad_norm", "learning_rate"):
    assert key in last


def test_export_loads_in_transformers_with_matching_logits(run_dir):
  import jax
  import torch
  import transformers

  from saro_jax import sharding
  from saro_jax.config import ModelSpec
  from saro_jax import models

  hf_dir = run_dir / "hf"
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I kill a Python process?"}],
                                       tokenize=False, add_generation_prompt=True)
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    want = torch_model(torch.tensor([ids])).logits[0].numpy()

  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  spec = dataclasses.replace(ModelSpec(), init_from=str(run_dir / "srpo"))
  with sharding.use(mesh):
    model = models.load(spec, mesh=mesh)
    n = len(ids)
    got = tiny_hf.jax_logits(model, np.asarray([ids]), np.arange(n)[None],
                             np.ones((1, n), np.int32))[0]
  assert got.shape == want.shape
  # Two fp32 programs of the same weights (tests/error_model.py).
  em.assert_parity(got, want, em.model_depth(model.config, n),
                   what="exported HF (PyTorch) vs saro_jax SRPO checkpoint")
