"""A real 2-process training run (jax.distributed over 127.0.0.1) through launch/local_multiprocess.sh:
each process feeds its own half of every global batch, the step runs across both, process 0
writes the logs, and every process checkpoints its own data-iterator state."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multiprocess
def test_two_process_rw_run(tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES="2", PY=sys.executable, LOGDIR=str(logs),
             PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 2 devices
  cmd = ["bash", "launch/local_multiprocess.sh", "--config", "configs/rw.py", f"--workdir={workdir}",
         "--config.model.arch.hidden_size=32", "--config.model.arch.intermediate_size=64",
         "--config.model.arch.num_layers=1", "--config.model.arch.head_dim=8",
         "--config.data.max_length=64", "--config.train.steps=3", "--config.train.batch_size=8",
         "--config.train.log_every=1", "--config.train.progress_bar=false",
         "--config.opt.warmup_steps=1", "--config.export.enabled=false"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  details = out.stdout[-2000:] + "".join(
      (logs / f).read_text()[-3000:] for f in sorted(os.listdir(logs)) if (logs / f).is_file())
  assert out.returncode == 0, details
  log0 = (logs / "process_0.log").read_text()
  assert "2 process(es), 4 device(s)" in log0, details
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(0 < r["loss"] < 20 for r in rows)
  ckpt = workdir / "checkpoints"
  assert (ckpt / "3").is_dir()
  states = sorted(os.listdir(ckpt / "data_state"))
  assert states == ["3.process_0.json", "3.process_1.json"]
  a, b = (json.loads((ckpt / "data_state" / s).read_text()) for s in states)
  assert a != b  # each process reads its own shard
