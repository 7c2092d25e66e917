"""The AOT memory planner at tiny size: its split of XLA's figures adds up, weights are sharded as
the mesh says, donation aliases the whole state, the verdict flips with the HBM given, and a knob
(gradient accumulation) is re-planned to a lower peak. The paper-scale plans are
benchmarks/plan_paper_scale.py (minutes per compile on 2 cores)."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest

from saro_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough to compile in seconds, big enough that weights dominate the scalars.
ARCH = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16)
OVERRIDES = [f"--config.model.arch.{k}={v}" for k, v in ARCH.items()] + [
    f"--config.{s}.{k}" for s in ("rw", "srpo")
    for k in ("data.max_length=64", "train.batch_size=8", "train.logps_chunk=32")]


def _config():
  spec = importlib.util.spec_from_file_location("saro_test_plan_cfg",
                                                os.path.join(ROOT, "configs", "saro.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.arch.update(ARCH)
  for stage in ("rw", "srpo"):
    config[stage].data.max_length = 64
    config[stage].train.batch_size = 8
    config[stage].train.logps_chunk = 32
  return config


@pytest.fixture(scope="module")
def tiny_plan():
  """fsdp=4 x tensor=2 on the 8 virtual CPU devices: every weight axis rule is exercised."""
  lines = []
  p = plan.make_plan(_config(), devices=jax.devices()[:8], hbm_gib=1.0,
                     mesh=dict(data=1, fsdp=4, tensor=2), try_knobs=False, echo=lines.append)
  return p, "\n".join(lines)


def test_weights_and_optimizer_bytes_follow_the_mesh(tiny_plan):
  p, _ = tiny_plan
  rw = p.stages["rw"]
  # Every weight matrix is split 8 ways (embed over fsdp=4, heads/mlp/vocab over tensor=2); the
  # 1-D norm scales (2 per layer + the final one, D floats each) and head_dim-only axes are
  # replicated. So per-device bytes lie between params*4/8 and that plus the replicated norms.
  D, layers = ARCH["hidden_size"], ARCH["num_layers"]
  norms = (2 * layers + 1) * D
  low = rw.params * 4 // 8
  assert low <= rw.weights <= low + norms * 4, (rw.weights, low)
  assert rw.weights > 0.9 * rw.params * 4 / 8
  # AdamW: mu and nu like the params (fp32), plus a few int32 step counters.
  assert 2 * rw.weights <= rw.opt_state <= 2 * rw.weights + 64
  # A real bug -- weights not sharded at all -- would be 8x the bound.
  assert rw.params * 4 > 7 * (low + norms * 4)


def test_xla_arguments_are_state_plus_batch(tiny_plan):
  p, _ = tiny_plan
  for stage, sp in p.stages.items():
    # XLA's argument bytes (compiler's count) == the sharding-derived split, up to the step
    # counter and the RNG key (a few scalars, replicated).
    scalars = sp.step.argument - (sp.weights + sp.opt_state + sp.batch)
    assert 0 <= scalars <= 64, (stage, scalars)
    # The state is donated: its outputs are written over the inputs.
    assert sp.step.alias >= sp.weights + sp.opt_state, stage
    # Global-norm clipping needs every gradient before any update: all of them are live at once.
    assert sp.step.temp >= sp.weights, stage
  rw, srpo = p.stages["rw"], p.stages["srpo"]
  # SFT batch: 4 int32 [8, 64] arrays over data*fsdp=4 -> 4*2*64*4 bytes; SRPO: 8 of them + 2 f32 [8].
  assert rw.batch == 4 * 2 * 64 * 4
  assert srpo.batch == 8 * 2 * 64 * 4 + 2 * 2 * 4
  # The live reference keeps a frozen copy of the weights resident during the step.
  assert srpo.reference_mode == "live" and srpo.ref_weights == srpo.weights
  assert srpo.phases["step"] == srpo.step.peak + srpo.weights
  assert srpo.peak == max(srpo.phases.values())


def test_hand_formula_matches_the_resident_state(tiny_plan):
  p, text = tiny_plan
  for sp in p.stages.values():
    # The formula's weights ignore replication of norms: within the same bound as above.
    norms = (2 * ARCH["num_layers"] + 1) * ARCH["hidden_size"] * 4
    assert abs(sp.hand["weights"] - sp.weights) <= norms
  assert "step temporaries, XLA" in text and "hand formula" in text


def test_verdict_flips_with_hbm(tiny_plan):
  p, _ = tiny_plan
  peak = p.peak
  assert p.fits and p.summary().endswith(plan.verdict(peak, p.hbm_bytes))
  small = plan.Plan(p.name, p.target, p.devices, peak - 1, p.stages, {})
  big = plan.Plan(p.name, p.target, p.devices, peak, p.stages, {})
  assert not small.fits and "does not fit by" in small.summary()
  assert big.fits and "fits" in big.summary() and "does not" not in big.summary()


@pytest.mark.heavy
def test_cli_replans_knobs_when_it_does_not_fit(tmp_path):
  """The command line in a fresh process (4 CPU devices set by the planner itself): RW at an HBM
  it cannot fit, knobs re-planned, the last line the verdict."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = os.environ["SARO_TEST_XLA_FLAGS"]  # no device count: the planner sets it
  # 16 rows on 4 devices: 4 rows per device, 2 with grad_accum x2, 1 with x4; the logits chunk
  # (rows x 32 x vocab x fp32) dominates the activations, so each halving lowers the peak.
  cmd = [sys.executable, "-m", "saro_jax.plan", "--config", "configs/saro.py:tiny", "--devices", "4",
         "--hbm_gib", "0.001", "--stages", "rw", *OVERRIDES, "--config.rw.train.batch_size=16"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-1].startswith("PLAN saro-tiny on 4 x 0.001 GiB (cpu)"), lines[-1]
  assert "does not fit by" in lines[-1]
  assert "mesh data=1 fsdp=4 tensor=1" in out.stdout  # the planner made the 4 devices itself
  peaks = {}
  for line in lines:
    for label in ("train.grad_accum x2", "train.grad_accum x4", "model.remat=block"):
      if line.strip().startswith(label) and " peak " in line:
        peaks[label] = float(line.split(" peak ")[1].split()[0])
  assert set(peaks) == {"train.grad_accum x2", "train.grad_accum x4", "model.remat=block"}, lines
  base_peak = float(next(l for l in lines if l.strip().startswith("PEAK")).split()[1])
  # Splitting the 8 rows into 2 and 4 micro-batches shrinks the activations; the state stays.
  assert peaks["train.grad_accum x4"] < peaks["train.grad_accum x2"] < base_peak * 1.0001
  assert plan.LORA_NOTE in out.stdout


def test_tpu_compiler_oom_is_a_verdict():
  """A TPU compile that cannot fit the chip fails; its message (both forms libtpu writes) is
  parsed into the bytes it needed, and the summary says by how much at least."""
  used = plan.CompilerOOM("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory"
                          " in memory space hbm. Used 20.53G of 15.75G hbm. Exceeded hbm capacity"
                          " by 4.78G.")
  assert used.used == int(20.53 * plan.GIB) and used.capacity == int(15.75 * plan.GIB)
  temps = plan.CompilerOOM("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required"
                           " for HLO temporaries (16.04G) exceeds available HBM (15.75G).")
  assert temps.used is None and temps.temporaries == int(16.04 * plan.GIB)
  p = plan.Plan("x", "tpu:v5e:4x4", 16, 16 * plan.GIB, {}, {}, {"srpo": temps})
  assert p.summary().endswith("does not fit (the compiler ran out of memory)")
  p.ooms["srpo"] = used
  assert p.summary().endswith(f"does not fit by >= {20.53 - 16:.2f} GiB")


def test_lora_plans_adapters_and_their_optimizer_only(tiny_plan):
  """config.lora.rank > 0: the engine's LoRA step is compiled. The trained state is the adapters
  (replicated) + AdamW over them, counted exactly from the adapter shapes; the base is a frozen,
  non-donated argument and serves as the SRPO reference (no second copy)."""
  full, _ = tiny_plan
  rank = 4
  config = _config()
  config.lora.rank = rank
  lines = []
  p = plan.make_plan(config, devices=jax.devices()[:8], hbm_gib=1.0,
                     mesh=dict(data=1, fsdp=4, tensor=2), try_knobs=False, echo=lines.append)
  D, F, layers = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["num_layers"]
  q, kv = ARCH["num_heads"] * ARCH["head_dim"], ARCH["num_kv_heads"] * ARCH["head_dim"]
  # (in, out) of the seven default targets: q, k, v, o, gate, up, down; A [in, r] + B [r, out].
  dims = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
  adapter_bytes = layers * sum(rank * (i + o) for i, o in dims) * 4  # fp32, replicated
  for stage, sp in p.stages.items():
    ft = full.stages[stage]
    assert sp.lora_rank == rank and sp.adapters == adapter_bytes, (stage, sp.adapters)
    assert sp.weights == ft.weights  # the frozen base, sharded as the full model's weights
    # AdamW mu and nu over the adapters, plus a few int32 counters; full FT's are 2x the weights.
    assert 2 * adapter_bytes <= sp.opt_state <= 2 * adapter_bytes + 64, (stage, sp.opt_state)
    # Smaller even here, where the replicated adapters (rank 4) meet a tiny model split 8 ways
    # (at 7B, rank 16: ~40M adapter params vs 7.6B); an optimizer over base + adapters fails it.
    assert sp.opt_state < ft.opt_state / 2
    # XLA's arguments: base + adapters + opt state + batch (+ scalars); only the trained state is
    # donated (aliased), never the base.
    scalars = sp.step.argument - (sp.weights + sp.adapters + sp.opt_state + sp.batch)
    assert 0 <= scalars <= 64, (stage, scalars)
    assert sp.adapters + sp.opt_state <= sp.step.alias <= sp.adapters + sp.opt_state + 64
    assert sp.hand["opt_state"] == 2 * adapter_bytes and sp.hand["adapters"] == adapter_bytes
  srpo = p.stages["srpo"]
  # The reference is the base: nothing extra resident during the step, and the reference
  # forward's weights are the state's base (counted once).
  assert srpo.ref_weights == 0 and srpo.phases["step"] == srpo.step.peak
  assert srpo.phases["reference forward"] == srpo.state - srpo.weights + srpo.reference.peak
  text = "\n".join(lines)
  assert f"LoRA rank {rank}" in text and "frozen base" in text and plan.LORA_NOTE not in text


def test_mesh_flag_is_applied_before_the_config_is_validated():
  """`--mesh` replaces config.mesh before the batch checks run. RW batch 4 does not divide the
  preset's mesh (fsdp=-1: 8-way) but divides `--mesh fsdp=4`: it is planned on that mesh (the
  planner used to refuse it, checking the preset's mesh). The reverse, a config mesh that divides
  the batch and a `--mesh` that does not, is refused naming the field (it used to be planned)."""
  from saro_jax.config import ConfigError
  base = ["plan", "--config", os.path.join(ROOT, "configs", "saro.py") + ":tiny", "--hbm_gib", "1",
          "--stages", "rw", "--noknobs", *OVERRIDES, "--config.rw.train.batch_size=4"]
  p = plan.main(base + ["--mesh", "data=1,fsdp=4,tensor=2"])
  rw = p.stages["rw"]
  assert rw.settings["mesh"] == dict(data=1, fsdp=4, tensor=2) and rw.settings["batch_size"] == 4
  with pytest.raises(ConfigError, match=r"rw\.train\.batch_size=4 is not divisible by mesh"):
    plan.main(base + ["--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                      "--mesh", "data=1,fsdp=8,tensor=1"])
