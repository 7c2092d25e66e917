"""SRPO reference modes: ``precomputed`` == ``live``; the precomputed file is reused; ``none``."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import error_model as em
from saro_jax import engine, logps, models
from saro_jax.config import training_config
from saro_jax.stages import reference, srpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


N_PAIRS = 40  # a slice of the bundled pairs keeps the precompute pass short


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  from saro_jax.data import bundled
  path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
  with open(bundled.path("pairs_train")) as f:
    path.write_text("".join(f.readline() for _ in range(N_PAIRS)))
  return str(path)


def tiny_srpo_config(reference_mode: str, pairs: str, steps: int = 2):
  spec = importlib.util.spec_from_file_location("cfg_saro", os.path.join(ROOT, "configs", "saro.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
  config.srpo.data.update(max_length=64, sources=pairs)
  config.srpo.train.update(steps=steps, batch_size=8, log_every=1, progress_bar=False)
  config.srpo.opt.update(learning_rate=1e-2, warmup_steps=0)
  config.srpo.dpo.reference = reference_mode
  return training_config(config, "srpo")


def logp_depth(cfg) -> int:
  """Error model (tests/error_model.py) of a sequence's summed log-prob: the tiny model's logits
  at max_length 64, logsumexp over the vocabulary, the sum over <= 64 same-sign token terms
  (so its bound is relative to |sum| itself)."""
  from saro_jax import models
  from saro_jax.data import bundled
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  forward = em.model_depth(_random_config(cfg, tokenizer), 64)
  return em.loss_depth(forward, vocab=len(tokenizer), tokens=64)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def live(tmp_path_factory, pairs_file):
  workdir = str(tmp_path_factory.mktemp("live"))
  engine.run_stage(tiny_srpo_config("live", pairs_file), workdir, srpo.STAGE)
  return metrics(workdir)


def test_precomputed_reference_equals_live_and_is_reused(live, pairs_file, tmp_path):
  workdir = str(tmp_path)
  engine.run_stage(tiny_srpo_config("precomputed", pairs_file), workdir, srpo.STAGE)
  pre = metrics(workdir)
  # Step 1: policy == reference, so every reward is 0 and the loss is log 2, up to the two
  # programs' rounding of the summed log-probs: margins = beta ((pc - rc) - (pr - rr)) is within
  # beta * 2 gamma(depth) (|pc| + |pr|), and -log sigmoid has slope 1/2 at 0.
  beta = 0.1
  margin_bound = beta * em.max_bound(abs(live[0]["logps/chosen"]) + abs(live[0]["logps/rejected"]),
                                     logp_depth(tiny_srpo_config("live", pairs_file)))
  print(f"step 1: |margins| {abs(live[0]['rewards/margins']):.1e} <= {margin_bound:.1e}")
  assert abs(live[0]["rewards/margins"]) <= margin_bound
  assert abs(live[0]["loss"] - np.log(2)) <= margin_bound / 2 + em.gamma(em.ELEMENTWISE_ULPS)
  for a, b in zip(live, pre):
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
      # Not derived (see BUILD.md "Parity bounds"): after step 1 the two runs' policies differ by
      # Adam's per-element amplification of rounding (tests/test_train.py bounds that); these
      # logged means are a weaker, empirical check of the same thing.
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
  assert live[-1]["rewards/margins"] > 0  # one update already moved the policy
  files = os.listdir(os.path.join(workdir, "reference_logps"))
  assert len(files) == 1 and files[0].endswith(".process_0.npz")
  path = os.path.join(workdir, "reference_logps", files[0])
  table = dict(np.load(path))
  assert len(table["example_id"]) == N_PAIRS  # every pair, incl. the last partial batch's
  assert np.all(table["chosen"] < 0) and np.all(table["rejected"] < 0)

  def must_not_run(*_):
    raise AssertionError("the reference forward ran although its results were on disk")

  reused = reference.precompute(must_not_run, None, iter(()), None, path)
  assert len(reused) == len(table["example_id"])


def test_lookup_names_missing_examples():
  with pytest.raises(KeyError, match=r"lack example ids \[7\]"):
    reference.lookup({1: (-1.0, -2.0)}, np.asarray([1, 7]))


def test_reference_free(pairs_file, tmp_path):
  engine.run_stage(tiny_srpo_config("none", pairs_file, steps=1), str(tmp_path), srpo.STAGE)
  first = metrics(str(tmp_path))[0]
  # Without a reference the rewards are beta * policy log-probs: negative, not 0.
  # mean(beta * pc) vs beta * mean(pc): the same 8 same-sign terms, a product moved across the
  # mean: <= 2 gamma(8 + 2) relative (and the float32 -> JSON float64 logging is exact).
  assert first["rewards/chosen"] < 0 and first["rewards/chosen"] == pytest.approx(
      0.1 * first["logps/chosen"], rel=2 * em.gamma(8 + 2))


def test_micro_batched_reference_equals_one_pass(pairs_file):
  """The live reference runs in grad_accum micro-batches; the rows come back in batch order."""
  import jax
  from saro_jax import models, sharding, train
  from saro_jax.data import bundled, pipeline
  cfg = tiny_srpo_config("live", pairs_file)
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  mesh = sharding.make_mesh(1, 2, 4)
  with sharding.use(mesh):
    model = models.init_random(_random_config(cfg, tokenizer), seed=0, mesh=mesh)
    graphdef, params = train.split_model(model)
    host = next(pipeline.dpo_batches(pairs_file, tokenizer, batch_size=8, max_length=64, seed=0))
    batch = train.put_batch({k: host[k] for k in logps.PAIR_KEYS}, mesh)
    outs = [jax.device_get(reference.make_reference_fn(
        graphdef, vocab_size=len(tokenizer), chunk_size=16, micro_batches=a, mesh=mesh)(params, batch))
        for a in (1, 4)]
    # Remat'ed blocks inside the micro-batch loop (the 7-8B presets: remat=block, grad_accum 4).
    from flax import nnx
    remat_graphdef, _ = nnx.split(models.abstract_model(model.config.replace(remat="block")), nnx.Param)
    outs.append(jax.device_get(reference.make_reference_fn(
        remat_graphdef, vocab_size=len(tokenizer), chunk_size=16, micro_batches=4,
        mesh=mesh)(params, batch)))
  # Two programs (1 pass vs 4 micro-batches, with or without remat) of each row's summed
  # log-prob: relative to |sum|.
  bound = em.max_bound(1.0, logp_depth(cfg))
  for one, micro, remat in zip(*outs):
    print(f"micro vs one: worst relative |d| {np.max(np.abs(micro - one) / np.abs(one)):.1e} "
          f"<= {bound:.1e}")
    np.testing.assert_allclose(micro, one, rtol=bound, atol=0)
    np.testing.assert_allclose(remat, one, rtol=bound, atol=0)
  assert len(set(np.round(outs[0][0], 3))) > 1  # distinct rows, so an order mix-up would show


def _random_config(cfg, tokenizer):
  return models.random_config(cfg.model.arch, tokenizer)


# The child of the fingerprint test: weights sharded over 8 virtual devices, a first call with its
# backend compiles counted (no persistent cache), then repeated calls for SECONDS.
_FINGERPRINT_CHILD = r"""
import os, sys, time
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from saro_jax.stages import reference
compiles = []
COMPILE = "/jax/core/compile/backend_compile_duration"
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(1) if event == COMPILE else None)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
rng = np.random.default_rng(0)
specs = [P("b", None), P(None, "a"), P(("a", "b"), None), P()]
params = {f"w{i}": jax.device_put(rng.standard_normal((64 * (1 + i % 3), 48)).astype(np.float32),
                                  NamedSharding(mesh, specs[i % 4])) for i in range(60)}
first = reference.fingerprint(params)
print("compiles", len(compiles), flush=True)
t0, calls = time.time(), 0
while time.time() - t0 < float(sys.argv[1]):
  assert reference.fingerprint(params) == first
  calls += 1
print("calls", calls, flush=True)
"""


@pytest.mark.heavy  # ~15 s: two busy loops load both cores while the child runs
def test_weights_fingerprint_is_one_program_that_survives_a_loaded_machine(tmp_path):
  """``reference.fingerprint`` (part of the cached reference log-probs' key) takes every leaf's
  sums from ONE compiled program. Computed eagerly, each leaf's sums were small programs of their
  own, each with an all-reduce over the weights' devices, dispatched asynchronously; with many in
  flight, XLA:CPU's virtual devices deadlocked under load (7 of 8 participants waiting at a
  rendezvous the 8th never reached) until XLA aborted the process: the suite's lost workers
  (session 53 reproduced it within a minute of eager calls beside two busy loops).

  A fresh child process (no persistent compile cache) counts the backend compiles of a first call
  on 60 leaves sharded four ways over 8 devices: 1 (the eager form compiled 25, one per
  primitive and shape). Then it calls the fingerprint for 8 s while two busy loops load both
  cores, with a 30 s collective timeout instead of the suite's 300 s (XLA's default 60 s where
  this jaxlib lacks the flag), so a deadlock ends the child with an abort instead of passing."""
  # The suite's flags (tests/conftest.py: the collective timeout only where this jaxlib takes
  # it, since an unknown flag is fatal), with that timeout cut from 300 s to 30 s.
  flags = os.environ["SARO_TEST_XLA_FLAGS"].replace("_terminate_timeout_seconds=300",
                                                    "_terminate_timeout_seconds=30")
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + flags}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  hogs = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                            "while time.time() - t < 45: pass"]) for _ in range(2)]
  try:
    child = subprocess.run([sys.executable, "-c", _FINGERPRINT_CHILD, "8"], env=env,
                           capture_output=True, text=True, timeout=240, cwd=tmp_path)
  finally:
    for hog in hogs:
      hog.kill()
  assert child.returncode == 0, child.stderr[-3000:]
  lines = dict(line.split() for line in child.stdout.splitlines() if line.split()[0] in
               ("compiles", "calls"))
  assert int(lines["compiles"]) == 1, child.stdout
  # A liveness check, not a speed figure: each call is one dispatch of the compiled program
  # (milliseconds), so even a loaded machine makes hundreds in 8 s; the deadlock shows as the
  # abort above, not as a low count.
  assert int(lines["calls"]) > 10, child.stdout
