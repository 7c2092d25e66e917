"""Checkpoints: stop after k steps, run the same thing again -> exactly the uninterrupted result
(params, optimizer, data position); keep-last-K; a stage checkpoint starts the next stage."""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from saro_jax import checkpoint as ckpt_lib
from saro_jax.config import training_config
from saro_jax import engine, models
from saro_jax.stages import rw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def tiny_rw_config(**train_overrides):
  spec = importlib.util.spec_from_file_location("cfg_saro", os.path.join(ROOT, "configs", "saro.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
  config.rw.data.max_length = 64
  config.rw.train.update(steps=STEPS, batch_size=8, log_every=1, progress_bar=False,
                         **train_overrides)
  config.rw.opt.warmup_steps = 1
  config.checkpoint.update(every=1, keep=2)
  return training_config(config, "rw")


def flat_params(state):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  s, result = engine.run_stage(tiny_rw_config(), workdir, rw.STAGE)
  assert result.finished
  return workdir, s


def test_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  straight_dir, straight = uninterrupted
  workdir = str(tmp_path)
  _, first = engine.run_stage(tiny_rw_config(stop_at=2), workdir, rw.STAGE)
  assert not first.finished and int(first.state.step) == 2
  s, second = engine.run_stage(tiny_rw_config(), workdir, rw.STAGE)  # the same command again
  assert second.finished and int(s.state.step) == STEPS
  a, b = flat_params(straight.state), flat_params(s.state)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f"max |param diff| resumed vs uninterrupted: {diff:.2e}")
  assert diff == 0.0
  # The data iterator resumed where it stopped: steps 3 and 4 saw the same batches.
  straight_losses, resumed_losses = losses_by_step(straight_dir), losses_by_step(workdir)
  assert sorted(resumed_losses) == [1, 2, 3, 4]
  for step in (3, 4):
    assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-6)


def test_keep_last_k_and_restore_of_optimizer_state(uninterrupted):
  workdir, straight = uninterrupted
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == [STEPS - 1, STEPS]  # every=1, keep=2
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
  restored, data_state = checkpointer.restore(STEPS, straight.state)
  checkpointer.close()
  assert int(restored.step) == STEPS and data_state is not None
  for x, y in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(straight.state.opt_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(restored.rng), np.asarray(straight.state.rng))


def test_stage_checkpoint_is_a_starting_point(uninterrupted):
  """The RW checkpoint dir (or its stage dir) as ``model.init_from`` gives the RW weights, the
  RW tokenizer, and the saved ModelConfig (the SRPO hand-off)."""
  workdir, straight = uninterrupted
  cfg = tiny_rw_config()
  spec = dataclasses.replace(cfg.model, init_from=workdir, tokenizer="")
  assert models.tokenizer_source(spec) == os.path.join(workdir, "tokenizer")
  model = models.load(spec, mesh=straight.mesh, seed=123)
  assert model.config == straight.model_config
  a = flat_params(straight.state)
  for k, v in flat_params(type(straight.state)(step=0, params=_split(model), opt_state=None,
                                               rng=None)).items():
    np.testing.assert_array_equal(v, a[k])


def _split(model):
  from saro_jax import train
  return train.split_model(model)[1]
