"""Tiny ``python -m saro_jax.main`` runs as a user starts them, and what they leave on disk:
shared by the fault tests (tests/test_faults*.py, split so that pytest-xdist's loadfile spreads
them over the workers). One device, 8 RW steps; ``toy_setup`` is a one-matrix in-process loop."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saro_jax import checkpoint as ckpt_lib
from saro_jax import models, sharding, train
from saro_jax.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TINY = ["--config.model.arch.hidden_size=32", "--config.model.arch.intermediate_size=64",
        "--config.model.arch.num_layers=1", "--config.model.arch.head_dim=8",
        "--config.data.max_length=64", "--config.train.log_every=1",
        "--config.train.progress_bar=false", "--config.opt.warmup_steps=1",
        "--config.checkpoint.keep=2", "--config.export.enabled=false"]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ["SARO_TEST_XLA_FLAGS"])


def cli(workdir, *extra, config="configs/rw.py"):
  return [sys.executable, "-m", "saro_jax.main", "--config", config, f"--workdir={workdir}", *TINY,
          f"--config.train.steps={STEPS}", *extra]


def run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(cmd, log_path):
  log = open(log_path, "w")
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT), log


def metric_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def steps_on_disk(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def final_params(workdir):
  """The params of the newest checkpoint step, as host arrays by path."""
  ckpt = os.path.join(str(workdir), "checkpoints")
  config = ModelConfig.from_dict(ckpt_lib.read_model_meta(ckpt)["model_config"])
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with sharding.use(mesh):
    params = ckpt_lib.restore_params(ckpt, models.abstract_params(config, mesh))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_bit_identical(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def toy_setup(lr=0.1):
  """A one-matrix model whose loss is non-finite exactly when its batch has a NaN."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])

  def loss_fn(params, batch, normalizer):
    loss = jnp.mean((batch["x"] @ params["w"]) ** 2) / normalizer
    return loss, {"rows": jnp.float32(batch["x"].shape[0])}

  tx = optax.adam(lr)
  with sharding.use(mesh):
    state = train.init_state({"w": jnp.ones((4, 3), jnp.float32)}, tx, seed=0)
    step = train.make_train_step(loss_fn, tx, grad_accum=1, normalizer_fn=lambda b: jnp.float32(1))
    step = train.jit_step(step, state, {"x": 2}, mesh)
  return mesh, state, step
