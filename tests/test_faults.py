"""Faults a real run meets (BUILD.md "Failure behaviour"): SIGTERM, kill -9 at random moments
(also during an async checkpoint save), damaged checkpoints, non-finite losses, finite data that
runs out, and a crash or a bad file during the HF export.

The process-level tests start ``python -m saro_jax.main`` on a tiny RW config (one device, 8
steps) as a user would, and compare final weights with an uninterrupted run's BIT FOR BIT: a
resume replays exactly the same computation, so any difference is a bug, not roundoff.
"""

import glob
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from fault_runs import (ROOT, STEPS, assert_bit_identical, cli, final_params, metric_steps, run,
                        start, steps_on_disk, toy_setup)
from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine, models, sharding, train
from saro_jax.models.config import ModelConfig


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: 8 steps, a checkpoint every step."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  out = run(cli(workdir, "--config.checkpoint.every=1"))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  assert steps_on_disk(workdir) == [STEPS - 1, STEPS]
  return workdir, final_params(workdir)


# ------------------------------------------------------------------------------------- SIGTERM


@pytest.mark.heavy
def test_sigterm_checkpoints_the_step_reached_and_resumes_exactly(reference, tmp_path):
  workdir = tmp_path / "run"
  # Periodic checkpoints only every 5 steps: the SIGTERM checkpoint is an extra one.
  cmd = cli(workdir, "--config.checkpoint.every=5")
  proc, log = start(cmd, tmp_path / "first.log")
  deadline = time.time() + 600
  while not metric_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=300)
  log.close()
  text = (tmp_path / "first.log").read_text()
  assert rc == train.PREEMPTED_EXIT_CODE, text[-4000:]
  reached = metric_steps(workdir)[-1]
  print(f"SIGTERM after step 1 was logged: stopped at step {reached}")
  assert f"preempted at step {reached} of {STEPS}" in text
  assert reached < STEPS
  assert steps_on_disk(workdir)[-1] == reached  # the step reached, whatever the schedule
  assert os.path.isfile(workdir / "checkpoints" / "data_state" / f"{reached}.process_0.json")
  out = run(cmd)  # the same command again
  assert out.returncode == 0, out.stderr[-4000:]
  assert metric_steps(workdir) == list(range(1, STEPS + 1))  # continued at exactly reached + 1
  assert_bit_identical(final_params(workdir), reference[1])


def test_sigterm_in_the_loop_saves_the_step_in_flight(tmp_path):
  """Deterministic, in-process: SIGTERM arrives while step 3's batch is read; step 3 finishes,
  is checkpointed (no periodic checkpoints), and ``Preempted`` (exit status 143) is raised."""

  def batches():
    for i in range(10):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      yield {"x": np.full((2, 4), i + 1.0, np.float32)}

  mesh, state, step = toy_setup()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every=0, async_save=True)
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Preempted) as info:
    train.run_loop(step_fn=step, state=state, batches=batches(), mesh=mesh, steps=10,
                   workdir=str(tmp_path), log_every=100, checkpointer=checkpointer,
                   data_state_fn=lambda: {"position": "after-step"}, progress_bar=False)
  assert info.value.step == 3 and info.value.code == train.PREEMPTED_EXIT_CODE
  assert signal.getsignal(signal.SIGTERM) is previous  # the loop's handler is gone again
  assert checkpointer.all_steps() == [3]
  restored, data_state = checkpointer.restore(3, state)
  checkpointer.close()
  assert int(restored.step) == 3 and data_state == {"position": "after-step"}


# ------------------------------------------------------------------------------------- kill -9


@pytest.mark.heavy
def test_kill9_at_random_moments_then_rerun_equals_uninterrupted(reference, tmp_path):
  """kill -9 once while an async checkpoint save is in flight (its temporary directory exists),
  then at seeded random moments after the loop made progress; re-running finishes with the
  uninterrupted run's weights, bit for bit."""
  workdir = tmp_path / "run"
  cmd = cli(workdir, "--config.checkpoint.every=1")
  rng = np.random.default_rng(0)
  kills = []
  for attempt in range(3):
    proc, log = start(cmd, tmp_path / f"attempt{attempt}.log")
    committed, deadline, during_save = max(steps_on_disk(workdir), default=0), time.time() + 600, False
    if attempt == 0:
      while proc.poll() is None and time.time() < deadline:
        if glob.glob(str(workdir / "checkpoints" / "*tmp*")):
          during_save = True
          break
        time.sleep(0.002)
    else:  # after this attempt committed a new step (progress), at a random moment
      while (max(steps_on_disk(workdir), default=0) <= committed and proc.poll() is None
             and time.time() < deadline):
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 1.0))
    if proc.poll() is not None:
      log.close()
      break  # it finished before the kill: nothing left to interrupt
    proc.kill()
    proc.wait()
    log.close()
    kills.append((attempt, steps_on_disk(workdir), during_save))
  print("kills (attempt, committed steps, during an async save):", kills)
  assert kills and kills[0][2], "the first kill should land during an async save"
  out = run(cmd)
  assert out.returncode == 0, out.stderr[-4000:]
  assert steps_on_disk(workdir)[-1] == STEPS
  assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))  # leftovers of the kills removed
  assert sorted(set(metric_steps(workdir))) == list(range(1, STEPS + 1))
  assert_bit_identical(final_params(workdir), reference[1])


# --------------------------------------------------------------------------- damaged checkpoints


def _largest_data_file(step_dir, item):
  files = glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bit(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


@pytest.mark.heavy
def test_damaged_latest_checkpoint_falls_back_to_previous_step(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  damaged = _largest_data_file(str(workdir / "checkpoints" / str(STEPS)), "params")
  _truncate(damaged)
  out = run(cli(workdir, "--config.checkpoint.every=1"))
  assert out.returncode == 0, out.stderr[-4000:]
  text = out.stdout + out.stderr
  assert f"checkpoint step {STEPS} in {workdir / 'checkpoints'}: item 'params'" in text
  assert "falling back to the previous checkpoint" in text
  assert os.path.isdir(workdir / "checkpoints" / "corrupt" / str(STEPS))  # kept for inspection
  assert metric_steps(workdir)[-1] == STEPS  # step 8 was redone from step 7
  assert_bit_identical(final_params(workdir), reference[1])


def test_damaged_checkpoints_in_process_name_the_problem(reference, tmp_path):
  """Each kind of damage is named; a flipped bit (which orbax reads back silently as a wrong
  number) is caught by the checksums; with no good step left the error lists every step."""
  like = _abstract_like(reference[0])
  cases = {
      "deleted data file": (lambda d: os.remove(_largest_data_file(d, "opt_state")),
                            "item 'opt_state'"),
      "deleted item": (lambda d: shutil.rmtree(os.path.join(d, "meta")), "item(s) ['meta'] missing"),
      "flipped bit": (lambda d: _flip_bit(_largest_data_file(d, "params")),
                      "item 'params' fails its checksum"),
  }
  for name, (damage, expected) in cases.items():
    copy = tmp_path / name.replace(" ", "_")
    shutil.copytree(reference[0] / "checkpoints", copy)
    damage(str(copy / str(STEPS)))
    checkpointer = ckpt_lib.Checkpointer(str(copy))
    with pytest.raises(ckpt_lib.CheckpointError, match=re.escape(expected)):
      checkpointer.restore(STEPS, like)
    state, data_state = checkpointer.restore_latest(like)
    assert int(state.step) == STEPS - 1 and data_state is not None, name
    assert checkpointer.all_steps() == [STEPS - 1]
    checkpointer.close()
  copy = tmp_path / "all_bad"
  shutil.copytree(reference[0] / "checkpoints", copy)
  for step in (STEPS - 1, STEPS):
    _flip_bit(_largest_data_file(str(copy / str(step)), "params"))
  checkpointer = ckpt_lib.Checkpointer(str(copy))
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    checkpointer.restore_latest(like)
  checkpointer.close()
  message = str(info.value)
  print(message)
  assert "no usable checkpoint" in message
  assert f"checkpoint step {STEPS} " in message and f"checkpoint step {STEPS - 1} " in message


def _abstract_like(workdir):
  """The TrainState target of the reference run's checkpoints (rw.py tiny, same overrides)."""
  from saro_jax.config import training_config
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_rw", os.path.join(ROOT, "configs", "rw.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.train.steps = STEPS
  config.opt.warmup_steps = 1
  config.mesh.fsdp = 1
  cfg = training_config(config, device_count=1)
  ckpt = os.path.join(str(workdir), "checkpoints")
  model_config = ModelConfig.from_dict(ckpt_lib.read_model_meta(ckpt)["model_config"])
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  params_like = models.abstract_params(model_config, mesh)
  optimizer, _ = engine.make_optimizer(cfg)
  return train.abstract_state(params_like, optimizer, cfg.seed)
