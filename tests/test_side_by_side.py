"""benchmarks/side_by_side.py at a tiny size: every system gets the same ids, and the first-step
losses (and DPO log-probs) of saro_jax, the plain PyTorch loop and, when installed, TRL agree
within the script's fp32 error-model bound; a perturbed weight in one system breaks that bound."""

import ctypes
import shutil

import pytest

import benchmark_scripts
SIZES = ["--pairs", "2", "--prompt_len", "24", "--completion_len", "40", "--rows", "2",
         "--row_length", "64", "--loss_tokens", "48", "--rounds", "1"]


@pytest.fixture(scope="module")
def sbs():
  return benchmark_scripts.load("side_by_side")


def _run(sbs, tmp_path, systems, *extra):
  return sbs.main(["--model", "tiny", "--cache_dir", str(tmp_path), "--systems", systems,
                   *SIZES, *extra])


def _assert_agree(out, names):
  for stage, res in out["stages"].items():
    systems = res["systems"]
    assert list(systems) == names, stage
    assert len({s["ids_sha"] for s in systems.values()}) == 1, stage  # the same ids and targets
    first = systems[names[0]]["first"]
    for name in names[1:]:
      for key, bound in res["bounds"].items():
        assert abs(systems[name]["first"][key] - first[key]) <= bound, (stage, name, key)
    assert res["check_ok"], stage
  # the figures are real: target counts as asked, a DPO loss of log 2 at the start (policy ==
  # reference), log-probs far from zero
  sft = out["stages"]["sft"]["systems"]
  assert all(s["first"]["target_tokens"] == 2 * 48 for s in sft.values())
  dpo = out["stages"]["dpo"]["systems"]
  assert all(abs(s["first"]["loss"] - 0.6931472) < out["stages"]["dpo"]["bounds"]["loss"]
             for s in dpo.values())
  assert all(s["first"]["logps/chosen"] < -40 for s in dpo.values())


@pytest.mark.heavy  # two runs, each compiling the SRPO step, its reference and the RW step
def test_saro_jax_and_torch_agree_and_a_perturbed_weight_breaks_the_bound(sbs, tmp_path):
  out = _run(sbs, tmp_path, "saro_jax,torch")
  _assert_agree(out, ["saro_jax", "torch"])
  assert out["check_ok"]
  import transformers
  directory = str(tmp_path / "tiny_llama_hf")
  params = sbs.parameter_count(directory)
  assert params == transformers.AutoModelForCausalLM.from_pretrained(directory).num_parameters()
  for stage, res in out["stages"].items():
    # model FLOPs: 6 N T for the policy, + 2 N T for DPO's reference (SIZES: 2 pairs x 2 x 64
    # tokens; 2 rows x 64), the same numerator for every system
    tokens = 2 * 2 * (24 + 40) if stage == "dpo" else 2 * 64
    assert res["model_flops"] == (8 if stage == "dpo" else 6) * params * tokens, stage
    assert res["sgemm_gflops"] > 0, stage
    assert "cores" in res["cpu"], stage  # the chip the figures belong to
    for s in res["systems"].values():
      assert s["step_s"] > 0 and s["throughput"] > 0
      assert s["gflops"] * 1e9 * s["step_s"] == pytest.approx(res["model_flops"])
      assert s["of_sgemm"] == pytest.approx(s["gflops"] / res["sgemm_gflops"])
  # the torch policy's final norm scaled by 1.05 (the reference stays exact): every figure that
  # depends on the policy's logits must leave the bound, in both stages
  bad = _run(sbs, tmp_path, "saro_jax,torch", "--perturb", "0.05", "--no_assert")
  assert not bad["check_ok"]
  for stage, keys in (("sft", ("loss",)), ("dpo", ("logps/chosen", "logps/rejected"))):
    res = bad["stages"][stage]
    for key in keys:
      err = abs(res["systems"]["torch"]["first"][key] - res["systems"]["saro_jax"]["first"][key])
      assert err > res["bounds"][key], (stage, key, err)


@pytest.mark.heavy  # compiles both CPU kernels' handlers, the SRPO step, its reference, RW
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="the CPU opt-ins compile their handlers with the system C++ compiler")
def test_the_cpu_opt_ins_agree_with_plain_torch_in_both_steps(sbs, tmp_path, cpu_ffi_cache):
  # model.cpu_gemm="mkl" and attention_impl="cpu_flash" in the real SRPO and RW steps: their
  # first steps within the script's fp32 error-model bound of the plain PyTorch loop's.
  out = _run(sbs, tmp_path, "saro_jax,torch", "--cpu_gemm", "mkl", "--attention_impl", "cpu_flash")
  _assert_agree(out, ["saro_jax", "torch"])
  for stage, res in out["stages"].items():
    assert "cpu_gemm mkl, attention cpu_flash" in res["systems"]["saro_jax"]["note"], stage


def test_trl_gets_the_same_ids_and_agrees_with_plain_torch(sbs, tmp_path):
  """TRL's DPO/SFT steps (checkpointing off and on) on the ids its own collator made from ours;
  plain torch is the reference here (saro_jax vs torch is the test above), no JAX compile."""
  pytest.importorskip("trl")
  out = _run(sbs, tmp_path, "torch,trl,trl_gc")
  _assert_agree(out, ["torch", "trl", "trl_gc"])


def test_a_system_name_sets_its_logps_chunk(sbs, tmp_path):
  """saro_jax@N runs with train.logps_chunk N (so chunk sizes compare in one run) and agrees with
  plain torch; malformed or repeated names are refused before anything is built."""
  out = _run(sbs, tmp_path, "saro_jax@8,torch", "--stages", "dpo")
  res = out["stages"]["dpo"]
  assert list(res["systems"]) == ["saro_jax@8", "torch"] and res["check_ok"]
  assert res["systems"]["saro_jax@8"]["note"].startswith("logps_chunk 8,")
  assert res["systems"]["saro_jax@8"]["recompute"] == "remat none"
  for bad in ("saro_jax@0", "saro_jax@x", "trl@8", "saro_jax@8,saro_jax@8"):
    with pytest.raises(SystemExit):
      sbs.parse_args(["--systems", bad])


def test_torch_malloc_sets_only_the_torch_childs_allocator_and_needs_split_processes(sbs):
  """--torch_malloc: glibc's defaults for the torch child unless asked (TRL as it ships); reuse
  gives it the saro_jax policy; the saro_jax child always takes host_memory's own choice. Without
  --split_processes the flag would mean nothing, so it is refused."""
  default = sbs.parse_args(["--split_processes"])
  reuse = sbs.parse_args(["--split_processes", "--torch_malloc", "reuse"])
  assert [sbs.child_malloc(w, default) for w in ("jax", "torch")] == ["auto", "system"]
  assert [sbs.child_malloc(w, reuse) for w in ("jax", "torch")] == ["auto", "reuse"]
  with pytest.raises(SystemExit):
    sbs.parse_args(["--torch_malloc", "reuse"])
  with pytest.raises(SystemExit):
    sbs.parse_args(["--split_processes", "--torch_malloc", "tcmalloc"])


@pytest.mark.heavy  # two child processes, each importing jax and torch and compiling its side
def test_split_processes_run_each_side_in_its_own_process_with_its_allocator(sbs, tmp_path):
  """--split_processes: saro_jax in one child under host_memory's policy, torch in another under
  glibc's; the same ids and the same first-step agreement as in one process."""
  out = _run(sbs, tmp_path, "saro_jax,torch", "--split_processes")
  _assert_agree(out, ["saro_jax", "torch"])
  glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
  for res in out["stages"].values():
    assert res["split_processes"]
    for s in res["systems"].values():
      assert s["step_s"] > 0 and s["throughput"] > 0
    assert res["systems"]["torch"]["note"].endswith("host malloc system")
    assert res["systems"]["saro_jax"]["note"].endswith(
        "host malloc reuse" if glibc else "host malloc system")


@pytest.mark.heavy  # compiles the SRPO step, its reference and the RW step in bf16
def test_bf16_mode_runs_every_system_in_its_mixed_precision_on_the_same_ids(sbs, tmp_path):
  """--compute_dtype bfloat16: saro_jax computes in bf16 over fp32 master weights, the plain loop
  under torch.autocast; the ids and targets are still checked equal, the figures are real (the
  first steps' figures are not bounded in bf16: see the script's docstring)."""
  out = _run(sbs, tmp_path, "saro_jax,torch", "--compute_dtype", "bfloat16")
  assert out["check_ok"]
  for stage, res in out["stages"].items():
    systems = res["systems"]
    assert len({s["ids_sha"] for s in systems.values()}) == 1, stage
    assert systems["saro_jax"]["note"].endswith("bfloat16 compute"), stage
    assert systems["torch"]["note"].endswith("bf16 autocast"), stage
    assert all(s["step_s"] > 0 for s in systems.values())
  assert all(s["first"]["target_tokens"] == 2 * 48
             for s in out["stages"]["sft"]["systems"].values())
  assert all(s["first"]["logps/chosen"] < -40 for s in out["stages"]["dpo"]["systems"].values())
