"""benchmarks/prefix_dpo.py's TRL mode at a tiny size: TRL's DPOTrainer gets the same bundled
pairs as saro_jax's unshared mode (equal ids fingerprints), its first step agrees with saro_jax's
within the fp32 error-model bound, and a perturbed weight on TRL's side breaks that bound."""

import pytest

import benchmark_scripts

pytest.importorskip("trl")

# One batch of 2 pairs, one timed step per mode: the check runs on the first (warm-up) steps.
SIZES = ["--model", "tiny", "--pairs", "2", "--batches", "1", "--steps", "1", "--rounds", "1",
         "--modes", "unshared,trl"]


@pytest.fixture(scope="module")
def prefix_dpo():
  return benchmark_scripts.load("prefix_dpo")


@pytest.mark.heavy  # two runs: each tokenizes the bundled pairs, compiles the tiny SRPO step, builds TRL
def test_trl_mode_gets_the_unshared_pairs_and_agrees_then_a_perturbed_weight_breaks_it(
    prefix_dpo, tmp_path):
  out = prefix_dpo.main([*SIZES, "--cache_dir", str(tmp_path / "ok")])
  modes, check = out["modes"], out["check"]
  assert list(modes) == ["unshared", "trl"]
  assert modes["trl"]["ids_sha"] == modes["unshared"]["ids_sha"] != ""
  assert modes["trl"]["mixed_precision"] == "no"  # fp32, like saro_jax here
  assert out["check_ok"] and check["ok"]
  for key, bound in check["bounds"].items():
    assert abs(modes["trl"]["first"][key] - modes["unshared"]["first"][key]) <= bound, key
  # The figures are real: a DPO loss of log 2 at the start (policy == reference), sequence
  # log-probs of hundreds of tokens far from zero, positive throughput, ratios against trl.
  assert abs(modes["unshared"]["first"]["loss"] - 0.6931472) <= check["bounds"]["loss"]
  assert modes["unshared"]["first"]["logps/chosen"] < -100
  for res in modes.values():
    assert res["pairs_per_s"] > 0 and res["pairs_per_step"] == 2
  assert modes["trl"]["vs_trl"] == 1.0 and modes["unshared"]["vs_trl"] > 0

  # TRL's policy's final norm weight doubled (its reference stays exact), as a (1 + w) norm
  # convention applied to a w-convention checkpoint would do: the same ids, but the policy's
  # log-probs leave the bound, and the run reports the break instead of passing. Why not a
  # small scale: this random tiny model's logits are nearly uniform (max |logit| ~1.5), so
  # scaling them moves a sequence log-prob only by a random-sign sum over its tokens (measured
  # on this batch, chosen / rejected means: 1.05x -> 0.11 / 0.04, 1.5x -> 1.5 / 0.58, 2x ->
  # 4.0 / 1.6, against a worst-case bound of 0.29; the typical fp32 error is 0.004).
  # This run puts TRL in a child process (--split_processes, as goals.py runs it): the same ids
  # and the child's own figures come back over the pipe, the perturbation with them.
  bad = prefix_dpo.main([*SIZES, "--cache_dir", str(tmp_path / "bad"), "--perturb", "1.0",
                         "--no_assert", "--split_processes"])
  assert modes["trl"]["process"] == "this" and bad["modes"]["trl"]["process"] == "child"
  assert bad["modes"]["trl"]["ids_sha"] == bad["modes"]["unshared"]["ids_sha"] == \
      modes["unshared"]["ids_sha"]
  assert bad["modes"]["trl"]["pairs_per_s"] > 0
  assert not bad["check_ok"]
  for key in ("logps/chosen", "logps/rejected"):
    err = abs(bad["modes"]["trl"]["first"][key] - bad["modes"]["unshared"]["first"][key])
    assert err > bad["check"]["bounds"][key], (key, err)


@pytest.mark.heavy  # tokenizes the bundled pairs, compiles the tiny SRPO step in bf16, builds TRL
def test_bf16_mode_runs_trl_with_its_autocast_on_the_same_pairs(prefix_dpo, tmp_path):
  """--compute_dtype bfloat16: saro_jax in bf16 over fp32 master weights, TRL with bf16=True; the
  ids are still checked equal (the figures are printed, not bounded: side_by_side.py says why)."""
  out = prefix_dpo.main([*SIZES, "--cache_dir", str(tmp_path), "--compute_dtype", "bfloat16"])
  modes = out["modes"]
  assert out["compute_dtype"] == "bfloat16" and out["check_ok"]
  assert modes["trl"]["ids_sha"] == modes["unshared"]["ids_sha"] != ""
  assert modes["trl"]["mixed_precision"] == "bf16"  # TRL's trainer autocasts
  assert modes["unshared"]["first"]["logps/chosen"] < -100 and modes["trl"]["pairs_per_s"] > 0
