"""benchmarks/throughput.py runs end to end at a tiny size and reports every figure, positive."""

import json

import jax
import pytest

import benchmark_scripts


def test_throughput_tiny_reports_positive_figures(capsys):
  figures = benchmark_scripts.load("throughput").main(
      ["--model", "tiny", "--batch", "2", "--length", "32", "--steps", "2", "--new_tokens", "4",
       "--peak_tflops", "1.0"])
  # batch 2 on the 8 virtual CPU devices: the mesh takes the 2 devices that hold whole rows.
  assert figures["devices"] == 2 and jax.device_count() == 8
  assert figures["params"] > 100_000
  for key in ("rw_compile_s", "rw_step_s", "rw_tokens_per_s", "rw_tokens_per_s_per_device",
              "rw_tflops", "rw_mfu", "srpo_compile_s", "srpo_step_s", "srpo_pairs_per_s",
              "srpo_tokens_per_s", "sample_s", "sample_new_tokens_per_s"):
    assert figures[key] > 0, key
  assert figures["rw_tokens_per_s"] == 2 * 32 / figures["rw_step_s"]
  assert figures["rw_tokens_per_s_per_device"] * 2 == figures["rw_tokens_per_s"]
  assert figures["srpo_pairs_per_s"] == 2 / figures["srpo_step_s"]
  # the attention products add to the model FLOPs; on a CPU "auto" would run our attention
  assert figures["rw_tflops_with_attention"] > figures["rw_tflops"]
  assert figures["srpo_tflops_with_attention"] > figures["srpo_tflops"]
  assert figures["attention_runs"] == "xla"
  # greedy, EOS disabled: every prompt gets exactly --new_tokens tokens
  assert figures["sample_new_tokens"] == 2 * 4
  out = capsys.readouterr().out.strip().splitlines()
  assert any(line.startswith("RW step") for line in out)
  assert json.loads(out[-1]) == figures


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_throughput_srpo_config_reads_the_rows_it_is_given(model):
  """The smollm2_135m preset shares the prefix; throughput.py times the unshared layout that
  its dpo_batch builds, so its SRPO config must ask for exactly those keys (a shared-prefix config
  once made ``--model smollm2`` fail on a missing ``tokens``)."""
  import numpy as np
  from saro_jax import logps
  module = benchmark_scripts.load("throughput")
  cfg = module._stage_config("srpo", model, 2, 64, 1)
  rows = module.dpo_batch(np.random.default_rng(0), 2, 64, 100)
  assert set(logps.input_keys(cfg.dpo.prefix_sharing)) <= set(rows)


def test_prefix_dpo_pair_kind_reads_only_that_kind(tmp_path):
  """``--pair_kind``: the process and the outcome pairs are the bundled pairs split by their
  ``kind``; every pair lands in exactly one, and their tokens add up to all the pairs'."""
  from saro_jax import models
  from saro_jax.data import bundled

  module = benchmark_scripts.load("prefix_dpo")
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  every = module.data_lengths(tokenizer, module.pair_source("all", str(tmp_path)))
  kinds = {k: module.data_lengths(tokenizer, module.pair_source(k, str(tmp_path)))
           for k in ("process", "outcome")}
  assert kinds["process"]["pairs"] == 544 and kinds["outcome"]["pairs"] == 570
  for key in ("pairs", "unshared_tokens", "shared_tokens"):
    assert kinds["process"][key] + kinds["outcome"][key] == every[key], key
  with open(module.pair_source("process", str(tmp_path))) as f:
    assert {json.loads(line)["kind"] for line in f} == {"process"}


@pytest.mark.heavy  # compiles the tiny RW step twice
def test_attention_blocks_benchmark_tiny_reports_each_variant(capsys):
  """benchmarks/attention_blocks.py end to end at a tiny size: one row of figures per variant."""
  out = benchmark_scripts.load("attention_blocks").main(
      ["--model", "tiny", "--batch", "2", "--length", "64", "--blocks", "2,default,t32",
       "--rounds", "1"])
  assert set(out["variants"]) == {"2", "default", "t32"}
  layouts = {v: f["layout"] for v, f in out["variants"].items()}
  assert layouts == {"2": "2 blocks", "default": "1 blocks", "t32": "tile 32"}
  for figures in out["variants"].values():
    for key in ("compile_s", "compile_cpu_s", "step_s", "step_cpu_s"):
      assert figures[key] > 0, key
  assert out["variants"]["2"]["step_ratio"] == 1.0
  printed = capsys.readouterr().out
  assert "compiled 2 (2 blocks)" in printed and "compiled default (1 blocks)" in printed
  assert "compiled t32 (tile 32)" in printed


def test_attention_tiles_benchmark_reports_every_layout(capsys):
  """benchmarks/attention_tiles.py at a small size: every layout's times (the tiled gradient in
  both of its layouts too), and its output and gradients agree with the blocks' to fp32 roundoff
  (error model of tests/test_attention.py: depth H + 3 L + 16 at L = 256 -> 2 gamma(848) ~ 1e-4
  relative)."""
  out = benchmark_scripts.load("attention_tiles").main(
      ["--shapes", "1x256:trees", "--tiles", "64,128", "--repeats", "1",
       "--backward", "auto,rows,transposed"])
  row = out["1x256:trees"]
  assert set(row) == {"blocks", "tile64", "tile128", "tile64:rows", "tile128:rows",
                      "tile64:transposed", "tile128:transposed"}
  for figures in row.values():
    assert figures["fwd_ms"] > 0 and figures["fwd_bwd_ms"] > 0
    assert figures["max_rel_diff"] < 1e-4
  assert "shipped tile 64" in capsys.readouterr().out


def test_attention_tiles_benchmark_bound_catches_a_skipped_visible_tile(monkeypatch):
  """Negative control for the 1e-4 bound above: tile lists that skip each query tile's first
  visible key tile (the off-by-one tests/test_attention.py plants) drop visible keys and the
  reported difference exceeds the bound."""
  from saro_jax.models import tiled_attention
  from test_attention import skip_first_visible_tile
  monkeypatch.setattr(tiled_attention, "tile_lists",
                      skip_first_visible_tile(tiled_attention.tile_lists))
  out = benchmark_scripts.load("attention_tiles").main(
      ["--shapes", "1x256:trees", "--tiles", "64", "--repeats", "1"])
  assert out["1x256:trees"]["tile64"]["max_rel_diff"] > 1e-4


def test_benchmarks_name_the_cpu_from_cpuinfo(tmp_path):
  """The CPU line goals.py and side_by_side.py print (``like_for_like.cpu_identity``): the first
  processor's fields of /proc/cpuinfo (tab-padded keys), the vector units that matter, and the
  platform's string when there is no cpuinfo."""
  lfl = benchmark_scripts.load("like_for_like")
  info = tmp_path / "cpuinfo"
  core = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
          "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 sha_ni\n")
  info.write_text(core.format(n=0) + "\n" + core.format(n=1).replace("avx512f ", ""))
  line = lfl.cpu_identity(str(info))
  assert line.startswith("AuthenticAMD AMD EPYC, family 25 model 17, ")
  assert line.endswith(" cores, avx2 avx512f avx512_bf16")  # the first processor's flags
  assert "cores" in lfl.cpu_identity(str(tmp_path / "absent"))


def test_round_order_puts_each_system_in_each_slot_equally_often():
  """side_by_side.py's and prefix_dpo.py's timed rounds (``like_for_like.round_order``): over n
  rounds each of n systems runs once in every slot, and every round runs each system once."""
  lfl = benchmark_scripts.load("like_for_like")
  names = ["saro_jax", "trl", "torch"]
  rounds = [lfl.round_order(names, r) for r in range(6)]
  assert rounds[:3] == [names, ["trl", "torch", "saro_jax"], ["torch", "saro_jax", "trl"]]
  assert all(sorted(order) == sorted(names) for order in rounds)
  for slot in range(3):
    assert sorted(order[slot] for order in rounds) == sorted(names * 2)
  assert lfl.round_order(["a"], 5) == ["a"] and lfl.round_order([], 3) == []


def test_goals_passes_the_cpu_opt_ins_to_goal_1_only():
  goals = benchmark_scripts.load("goals")
  plain = goals.children("smollm2", False)
  opted = goals.children("smollm2", False, ["--cpu_gemm=mkl", "--attention_impl=cpu_flash"])
  assert opted["side_by_side"] == [*plain["side_by_side"], "--cpu_gemm=mkl",
                                   "--attention_impl=cpu_flash"]
  # goals 2-4 pack rows and trees (cpu_flash does not skip between them) and goal 6 decodes
  assert all(opted[k] == plain[k] for k in plain if k != "side_by_side")


@pytest.mark.heavy  # four child processes: side_by_side, prefix_dpo (twice) and sampler, tiny model
def test_goals_runner_reads_every_child_and_tabulates_each_goal(capsys):
  """benchmarks/goals.py --quick: every child runs and ends with the JSON line the runner reads;
  each goal's row carries a figure (the TRL rows stay empty: --quick runs no TRL). The children's
  own results are checked here too rather than by runs of their own (the suite's time)."""
  out = benchmark_scripts.load("goals").main(["--model", "tiny", "--quick"])
  assert out["failed"] == []
  assert out["cpu"] == benchmark_scripts.load("like_for_like").cpu_identity()  # per-chip figures
  rows = {r["key"]: r for r in out["rows"]}
  assert rows["sft_vs_torch"]["value"] > 0
  # goal 2 as the issue states it (the process pairs) and on all the pairs, from two children
  assert rows["prefix_vs_unshared"]["value"] > 0 and rows["prefix_vs_unshared_all"]["value"] > 0
  assert "the process pairs" in rows["prefix_vs_unshared"]["what"]
  assert rows["trie_vs_unshared"]["value"] > 0  # prompt trees on the process pairs
  assert out["seconds"].keys() >= {"prefix_dpo", "prefix_process"}
  # benchmarks/prefix_dpo.py end to end (the quick child: tiny model, one row of 512 slots, up to
  # 4 pairs a row): every mode reports positive figures, and the sharing ceiling is sane.
  prefix = out["children"]["prefix_dpo"]
  modes = prefix["modes"]
  assert set(modes) == {"unshared", "prefix", "trie+cached"}
  assert modes["unshared"]["ratio"] == 1.0
  for figures in modes.values():
    assert figures["step_s"] > 0 and figures["pairs_per_s"] > 0 and 0 < figures["fill"] <= 1
  assert modes["trie+cached"]["pairs_per_step"] > 1  # several pairs in the one row
  # The ceiling sharing sets: every pair shares at least its prompt, and never a whole side.
  data = prefix["data"]
  assert data["pairs"] == 1114 and 0 < data["shared_tokens"] < data["unshared_tokens"]
  assert prefix["token_ratio"] == data["unshared_tokens"] / data["shared_tokens"] < 2
  assert out["children"]["prefix_process"]["data"]["pairs"] == 544  # --pair_kind process
  # goal 1's rows name the machine-independent reading too: saro_jax's and the torch loop's
  for key in ("dpo_vs_trl", "sft_vs_trl"):
    assert "% of this machine's" in rows[key]["what"] and "torch " in rows[key]["what"], key
  assert "of the pairs' real tokens" in rows["prefix_vs_unshared"]["what"]
  assert rows["fill"]["value"] >= 0.9  # as tests/test_packed_dpo.py's fill test
  assert rows["sampler_batch16"]["value"] > 0
  for key in ("dpo_vs_trl", "sft_vs_trl", "packed_cached_vs_trl", "packed_cached_epoch_vs_trl"):
    assert rows[key]["value"] is None and rows[key]["text"] == "–"  # --quick runs no TRL
  printed = capsys.readouterr().out
  assert "| goal | figure | measured | target | met |" in printed
  assert f"CPU: {out['cpu']}" in printed


def test_matmul_benchmark_quick_reports_figures_and_flattened_rows_copy_nothing(capsys):
  """benchmarks/matmul.py at small shapes: every figure positive; the MLP written with flattened
  rows (``transformer.dense``) has the same gradients, bit for bit, as the 3-D einsums, and its
  compiled fwd + bwd holds no transposing copy fusion (what flattening removed)."""
  out = benchmark_scripts.load("matmul").main(["--quick"])
  assert len(out["products"]) == 2 * 3
  assert all(r["xla_gflops"] > 0 and r["torch_gflops"] > 0 for r in out["products"])
  mlp = out["mlp"]
  assert mlp["grads_bit_identical"]
  assert mlp["copy_fusions"]["dense"] == 0
  assert mlp["dense_s"] > 0 and mlp["torch_s"] > 0
  assert "MLP blocks fwd + bwd" in capsys.readouterr().out


def test_matmul_benchmark_bf16_times_both_result_types(capsys):
  """``--dtype bfloat16``: each product timed as a plain bf16 dot and with an fp32 result (the
  form ``transformer.dense`` takes on a CPU), and the MLP blocks in bf16."""
  out = benchmark_scripts.load("matmul").main(["--quick", "--dtype", "bfloat16"])
  assert out["dtype"] == "bfloat16"
  assert all(r["xla_gflops"] > 0 and r["xla_f32_out_gflops"] > 0 and r["torch_gflops"] > 0
             for r in out["products"])
  assert out["mlp"]["dense_s"] > 0 and out["mlp"]["torch_s"] > 0
  assert "| XLA, fp32 result |" in capsys.readouterr().out


def test_sample_token_benchmark_reports_every_setting(capsys):
  """benchmarks/sample_token.py at a small size: a figure per setting, and its assertion that the
  shortcuts draw the sorted path's tokens held (it raises otherwise; top-p counts the rows whose
  mass sat within rounding of top_p instead)."""
  out = benchmark_scripts.load("sample_token").main(["--batch", "4", "--vocab", "600",
                                                     "--rounds", "1"])
  assert set(out) == {"greedy", "temperature 1", "top_k 50", "top_p 0.9"}
  assert all(r["ours_ms"] > 0 and r["sorted_ms"] > 0 for r in out.values())
  assert "| top_k 50 |" in capsys.readouterr().out


def test_decode_products_benchmark_quick_times_every_layout(capsys):
  """benchmarks/decode_products.py at small shapes: every layout and backend computes the same
  product (checked inside against an fp32 bound) and gets a positive time, torch's too."""
  out = benchmark_scripts.load("decode_products").main(["--quick", "--batch", "4"])
  assert len(out["seconds"]) == 3  # two layer shapes and the head
  names = {f"{layout}/{backend}" for layout in ("rows", "rows_out_in", "features")
           for backend in ("default", "xla_dots")} | {"torch/linear"}
  for row in out["seconds"].values():
    assert {k for k in row if "/" in k} == names
    assert all(row[k] > 0 for k in names)
  assert set(out["step_ms"]) == names
  assert "| step's products, ms |" in capsys.readouterr().out


def test_torch_step_times_a_model_of_the_same_size_as_ours(capsys):
  """benchmarks/torch_step.py (the plain-PyTorch RW step of the GPU side-by-side) at a tiny size:
  its transformers Llama of ``--arch`` has exactly the parameters of our model of the same arch
  (MFU is 6 N per token on both sides, so N must agree), and its figures are positive."""
  from flax import nnx
  from saro_jax.models import transformer
  from saro_jax.models.config import ModelConfig
  arch = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
          "num_kv_heads": 2, "head_dim": 16, "tie_embeddings": True, "vocab_size": 4096,
          "rope_theta": 500000.0}
  out = benchmark_scripts.load("torch_step").main(
      ["--arch", json.dumps(arch), "--batch", "2", "--length", "32", "--steps", "1",
       "--warmup", "1", "--peak_tflops", "1.0"])
  ours = nnx.eval_shape(lambda: transformer.Transformer(ModelConfig(family="llama", **arch)))
  n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  assert out["params"] == n_ours == 336192
  for key in ("rw_step_s", "rw_tokens_per_s", "rw_tflops", "rw_mfu"):
    assert out[key] > 0, key
  assert out["rw_tokens_per_s"] == 2 * 32 / out["rw_step_s"]
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
