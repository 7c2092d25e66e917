"""Faults a real run meets (BUILD.md "Failure behaviour"): SIGTERM, kill -9 at random moments
(also during an async checkpoint save), damaged checkpoints, non-finite losses, finite data that
runs out, and a crash or a bad file during the HF export.

The process-level tests start ``python -m saro_jax.main`` on a tiny RW config (one device, 8
steps) as a user would, and compare final weights with an uninterrupted run's BIT FOR BIT: a
resume replays exactly the same computation, so any difference is a bug, not roundoff.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine, models, sharding, train
from saro_jax.models import hf
from saro_jax.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TINY = ["--config.model.arch.hidden_size=32", "--config.model.arch.intermediate_size=64",
        "--config.model.arch.num_layers=1", "--config.model.arch.head_dim=8",
        "--config.data.max_length=64", "--config.train.log_every=1",
        "--config.train.progress_bar=false", "--config.opt.warmup_steps=1",
        "--config.checkpoint.keep=2", "--config.export.enabled=false"]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


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


# ------------------------------------------------------------------------------ non-finite loss


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


# --------------------------------------------------------------------------------------- export


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


# ---------------------------------------------------------------------------- SIGTERM, 2 hosts


@pytest.mark.multiprocess
@pytest.mark.heavy
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Real jax.distributed over 127.0.0.1: SIGTERM reaches process 1 only; JAX's preemption sync
  point makes both stop after the same step, which both checkpoint (each its data position)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  steps = 60
  procs, logs = [], []
  for i in range(2):
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, "-m", "saro_jax.main", "--multihost", "--config", "configs/rw.py",
           f"--workdir={workdir}", *TINY, f"--config.train.steps={steps}", "--config.checkpoint.every=0"]
    log = open(tmp_path / f"process_{i}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  deadline = time.time() + 600
  while not metric_steps(workdir) and procs[0].poll() is None and time.time() < deadline:
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=300) for p in procs]
  for log in logs:
    log.close()
  texts = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [train.PREEMPTED_EXIT_CODE] * 2, [t[-3000:] for t in texts]
  reached = [int(t.split("preempted at step ")[1].split()[0]) for t in texts]
  print(f"SIGTERM to process 1: both stopped at step {reached}")
  assert reached[0] == reached[1] < steps
  assert steps_on_disk(workdir) == [reached[0]]
  for i in range(2):
    assert os.path.isfile(workdir / "checkpoints" / "data_state" / f"{reached[0]}.process_{i}.json")
