"""Non-finite losses (BUILD.md "Failure behaviour"): a real SRPO run stops with a diagnosis and
keeps its last good checkpoint; the loop's raise and skip modes on a one-matrix model; and finite
data that runs out before train.steps."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from fault_runs import ROOT, cli, final_params, run, steps_on_disk, toy_setup
from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine, train


@pytest.mark.heavy
def test_nonfinite_loss_stops_with_diagnosis_and_keeps_last_good_checkpoint(tmp_path):
  """SRPO with an absurd learning rate: step 1 has lr 0 (warmup), step 2 applies a 1e30 update,
  step 3's forward overflows. The run stops naming step 3, the metric and the pairs' example
  ids; the newest checkpoint is step 2; nothing non-finite is written; no export happens."""
  workdir = tmp_path / "run"
  out = run(cli(workdir, "--config.checkpoint.every=1", "--config.opt.learning_rate=1e30",
                "--config.export.enabled=true", "--config.dpo.reference=none",
                config="configs/srpo.py"))
  text = out.stdout + out.stderr
  assert out.returncode != 0
  assert "NonFiniteError: step 3: non-finite" in text, text[-4000:]
  assert any(f"{k}={v}" in text for k in ("loss", "grad_norm") for v in ("nan", "inf"))
  assert "batch: example ids [" in text
  assert steps_on_disk(workdir)[-1] == 2
  assert all(np.all(np.isfinite(v)) for v in final_params(workdir).values())
  assert not os.path.exists(workdir / "hf") and not glob.glob(str(tmp_path / "run" / ".hf*"))
  assert max(r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))) == 2



def _toy_batches(bad_steps):
  for i in range(1, 100):
    x = np.full((2, 4), 0.1 * i, np.float32)
    if i in bad_steps:
      x[0, 0] = np.nan
    yield {"x": x, "example_id": np.asarray([10 * i, 10 * i + 1], np.int64)}


def _toy_loop(tmp_path, state, step, mesh, *, steps, bad_steps, **kw):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every=1, async_save=False)
  try:
    return train.run_loop(step_fn=step, state=state, batches=_toy_batches(bad_steps), mesh=mesh,
                          steps=steps, workdir=str(tmp_path), log_every=2, checkpointer=checkpointer,
                          progress_bar=False, to_device=lambda b: train.put_batch({"x": b["x"]}, mesh),
                          **kw), checkpointer
  finally:
    checkpointer.close()


def test_nonfinite_raise_names_step_batch_and_metric(tmp_path):
  mesh, state, step = toy_setup()
  with pytest.raises(train.NonFiniteError) as info:
    _toy_loop(tmp_path, state, step, mesh, steps=6, bad_steps={3})
  message = str(info.value)
  print(message)
  assert message.startswith("step 3: non-finite grad_norm=nan, loss=nan; batch: example ids [30, 31]")
  assert "the newest checkpoint (step 2) holds the last good weights" in message
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [1, 2]


def test_nonfinite_skip_drops_the_update_counts_it_and_goes_on(tmp_path):
  mesh, state, step = toy_setup()
  w0 = np.asarray(state.params["w"])
  # Step 2 alone: the NaN batch leaves params and optimizer exactly as they were.
  state1, m1 = step(state, train.put_batch({"x": np.full((2, 4), 0.1, np.float32)}, mesh))
  before = jax.device_get(state1)
  bad = np.full((2, 4), 0.2, np.float32)
  bad[0, 0] = np.nan
  state2, m2 = step(state1, train.put_batch({"x": bad}, mesh))
  assert float(m2[train.NONFINITE]) == 1.0 and float(m1[train.NONFINITE]) == 0.0
  after = jax.device_get(state2)
  for x, y in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(x, y)
  assert int(after.step) == 2 and not np.array_equal(np.asarray(before.params["w"]), w0)

  mesh, state, step = toy_setup()
  result, checkpointer = _toy_loop(tmp_path, state, step, mesh, steps=6, bad_steps={3, 5},
                                   nonfinite="skip", max_skipped_steps=2)
  assert result.finished
  assert [r["skipped_steps"] for r in result.history] == [0.0, 0.0, 1.0, 2.0]  # steps 1,2,4,6
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(result.state)))
  reopened = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert reopened.loop_state(6) == {"skipped_steps": 2}  # survives a resume
  reopened.close()

  mesh, state, step = toy_setup()
  with pytest.raises(train.NonFiniteError, match="3 steps had a non-finite .*max_skipped_steps=2"):
    _toy_loop(tmp_path / "again", state, step, mesh, steps=8, bad_steps={2, 3, 5},
              nonfinite="skip", max_skipped_steps=2)


# ------------------------------------------------------------------------ finite data runs out


def test_finite_data_that_runs_out_says_how_many_batches(tmp_path):
  """Two records fit, one is too long (dropped); one epoch = 1 batch of 8 rows; steps=3."""
  import importlib.util
  from saro_jax.config import training_config
  from saro_jax.stages import rw
  data = tmp_path / "rw.jsonl"
  rows = [{"id": "a", "prompt": "Hi", "reasoning": "greet", "response": "Hello."},
          {"id": "b", "prompt": "Bye", "reasoning": "part", "response": "Goodbye."},
          {"id": "long", "prompt": "word " * 400, "reasoning": "r", "response": "x"}]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  spec = importlib.util.spec_from_file_location("cfg_rw", os.path.join(ROOT, "configs", "rw.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
  config.data.update(sources=str(data), max_length=64, num_epochs=1, truncation="drop")
  config.train.update(steps=3, batch_size=8, log_every=1, progress_bar=False)
  config.opt.warmup_steps = 1
  config.export.enabled = False
  with pytest.raises(train.DataExhaustedError) as info:
    engine.run_stage(training_config(config), str(tmp_path / "run"), rw.STAGE)
  message = str(info.value)
  print(message)
  assert "the data ran out before step 2 of train.steps=3: it gave 1 batches" in message
  assert "Dropped examples: 1 {'dropped/prompt_too_long': 1}" in message
  stats = json.loads(message.split("Data stats: ", 1)[1])
  assert stats["examples"] == 2 and stats["dropped"] == 1
  assert any(k.startswith("dropped/") for k in stats)
