r"""Issue 10's measurable goals (1, 2, 3, 4, 6) from one run: each benchmark in its own child
process, one after the other (their memory never adds up), then one table of every goal's figure
beside its target.

  .venv/bin/python benchmarks/goals.py      # SmolLM2, the sizes of benchmarks/README.md
                                            # (~40 min on 2 quiet cores; needs the bench extra)
  .venv/bin/python benchmarks/goals.py --model tiny --quick    # a smoke run of the machinery
  .venv/bin/python benchmarks/goals.py --cpu_gemm mkl --attention_impl cpu_flash
                                            # goal 1 with the CPU opt-ins (Intel Xeons; BUILD.md)

Children (their own output is passed through; each ends with one JSON line this script reads):
  side_by_side.py  --systems saro_jax,trl,torch                 goal 1: DPO and SFT steps vs TRL
                   --split_processes --torch_malloc reuse       (gc off) and the plain torch loop
  prefix_dpo.py    --modes trl,unshared,prefix,trie+cached      goal 2 on all the pairs;
                   (rows of 1024, up to 8 pairs per row)        goal 4: prompt trees, packed,
                                                                cached reference, vs TRL
  prefix_dpo.py    --modes unshared,prefix,trie                 goal 2 as the issue states it:
                   --pair_kind process                          on the process pairs, one pair
                                                                per row and as prompt trees
  sampler.py       --batches 16,32                              goal 6: new tokens/s vs
                                                                transformers.generate
Goal 1's systems run in two processes (saro_jax; TRL and the loop) under one allocator policy,
host_memory's: sharing one heap, the saro_jax step faulted its temp buffer in again beside torch's
buffers (800 k and 550 k minor faults, 6.3 and 5.1 s of system time, in its first two steps after
the plain loop's on a 2-core AMD EPYC; none alone), which no user's run pays. Goal 4's TRL mode
still shares prefix_dpo.py's process: with ``--split_processes`` there, the parent (three saro_jax
modes, 15.6 GB resident) and the TRL child (8.4 GB) did not fit in 24 GB together and the kernel
killed the parent (session 36). In one process the switch between systems costs the first
step after it ~0.6 M page faults (3.6-6 s of system time, TRL and saro_jax alike), later ones
almost none.
Goal 3 (fill of packed rows on the bundled pairs) is read in this process from the real data
pipeline: 20 batches of 8 rows of 1024 slots, up to 8 pairs per row (the suite's fill test).

The targets are the issue's. Goal 6's is >= 10x the issue's 10-16 new tokens/s at batch 4,
i.e. >= 160 new tokens/s at batch >= 16 (the upper end, so the machine's speed-up cannot pass
it alone). A child that fails (or a broken like-for-like check) is reported and the run goes on;
the exit status is 1 if any child failed. Speed figures only: no target is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # like_for_like, beside this file (numpy only: no jax in this process)
from like_for_like import cpu_identity  # noqa: E402
GOAL6_TOKENS_PER_S = 160.0  # 10x the 16 new tok/s at batch 4 (its upper figure)


def children(model: str, quick: bool, goal1_options: Sequence[str] = ()) -> dict[str, list[str]]:
  """The benchmark commands (script, args) of one run; ``goal1_options`` go to side_by_side."""
  runs = _children(model, quick)
  runs["side_by_side"] = [*runs["side_by_side"], *goal1_options]
  return runs


def _children(model: str, quick: bool) -> dict[str, list[str]]:
  if quick:
    return {
        "side_by_side": ["side_by_side.py", "--model", model, "--systems", "saro_jax,torch",
                         "--rounds", "1", "--pairs", "2", "--prompt_len", "8",
                         "--completion_len", "8", "--rows", "2", "--row_length", "32",
                         "--loss_tokens", "16"],
        "prefix_dpo": ["prefix_dpo.py", "--model", model, "--pairs", "2", "--rows", "1",
                       "--row_length", "512", "--pairs_per_row", "4", "--batches", "1",
                       "--steps", "1", "--rounds", "1", "--modes", "unshared,prefix,trie+cached"],
        "prefix_process": ["prefix_dpo.py", "--model", model, "--pairs", "2", "--rows", "1",
                           "--row_length", "512", "--pairs_per_row", "4", "--batches", "1",
                           "--steps", "1", "--rounds", "1", "--modes", "unshared,prefix,trie",
                           "--pair_kind", "process"],
        "sampler": ["sampler.py", "--model", model, "--batches", "16", "--new_tokens", "2",
                    "--repeats", "1"],
    }
  return {
      "side_by_side": ["side_by_side.py", "--model", model, "--systems", "saro_jax,trl,torch",
                       "--rounds", "3", "--split_processes", "--torch_malloc", "reuse"],
      "prefix_dpo": ["prefix_dpo.py", "--model", model, "--pairs", "4", "--rows", "2",
                     "--row_length", "1024", "--pairs_per_row", "8", "--batches", "3",
                     "--steps", "2", "--rounds", "2", "--modes",
                     "trl,unshared,prefix,trie+cached"],
      "prefix_process": ["prefix_dpo.py", "--model", model, "--pairs", "4", "--rows", "2",
                         "--row_length", "1024", "--pairs_per_row", "8", "--batches", "3",
                         "--steps", "2", "--rounds", "2", "--modes", "unshared,prefix,trie",
                         "--pair_kind", "process"],
      "sampler": ["sampler.py", "--model", model, "--batches", "16,32", "--new_tokens", "32",
                  "--repeats", "2"],
  }


def run_child(script: str, args: list[str]) -> tuple[dict | None, float, int]:
  """Runs one benchmark, echoing its output; -> (its last JSON line, seconds, exit status)."""
  cmd = [sys.executable, "-u", os.path.join(HERE, script), *args]
  print(f"\n=== {' '.join(cmd[2:])}", flush=True)
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  last = None
  for line in proc.stdout:
    sys.stdout.write(line)
    if line.startswith("{"):
      try:
        last = json.loads(line)
      except json.JSONDecodeError:
        pass
  status = proc.wait()
  return last, time.perf_counter() - start, status


def packed_fill(model: str, batches: int = 20) -> float:
  """Goal 3: the fill of packed tree rows on the bundled training pairs (8 rows of 1024 slots, up
  to 8 pairs per row, ``batches`` batches), with the model's tokenizer."""
  from saro_jax import models  # noqa: PLC0415  (the parent imports no jax before the children)
  from saro_jax.data import bundled, pipeline  # noqa: PLC0415
  if model == "tiny":
    tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  else:
    from saro_jax.models import gguf  # noqa: PLC0415
    tokenizer = models.load_tokenizer(gguf.smollm2_gguf_path())
  it = pipeline.dpo_batches("bundled:pairs_train", tokenizer, batch_size=8, max_length=1024,
                            seed=0, num_epochs=0, process_index=0, process_count=1,
                            prefix_sharing=True, pairs_per_row=8)
  for _ in range(batches):
    next(it)
  return float(it.stats.as_dict()["fill"])


def table(results: dict) -> list[dict]:
  """One row per goal figure: goal, key, what, value (None: not measured), target, met."""
  rows = []

  def add(goal, key, what, value, target, fmt="{:.3f}x"):
    met = None if value is None else value >= target
    rows.append({"goal": goal, "key": key, "what": what, "value": value, "target": target,
                 "met": met,
                 "text": "–" if value is None else fmt.format(value),
                 "target_text": ">= " + fmt.format(target)})

  stages = (results.get("side_by_side") or {}).get("stages", {})
  dpo = stages.get("dpo", {}).get("systems", {}).get("saro_jax", {})
  sft = stages.get("sft", {}).get("systems", {}).get("saro_jax", {})
  def efficiency(stage: str) -> str:  # the machine-independent reading of the same step
    res = stages.get(stage, {})
    mine = res.get("systems", {}).get("saro_jax", {})
    if "of_sgemm" not in mine:
      return ""
    others = ", ".join(f"{name} {100 * s['of_sgemm']:.0f} %" for name, s in res["systems"].items()
                       if name != "saro_jax")
    return (f" (model FLOP/s at {100 * mine['of_sgemm']:.0f} % of this machine's"
            f" {res['sgemm_gflops']:.0f} GFLOP/s fp32 sgemm; {others})")

  add(1, "dpo_vs_trl", "SRPO (DPO) step vs TRL, pairs/s" + efficiency("dpo"), dpo.get("vs_trl"),
      1.2)
  add(1, "sft_vs_trl", "RW (SFT) step vs TRL, tokens/s" + efficiency("sft"), sft.get("vs_trl"),
      1.2)
  add(1, "sft_vs_torch", "RW (SFT) step vs the plain PyTorch loop", sft.get("vs_torch"), 1.0)

  def sharing(child: str, key: str, pairs: str) -> None:
    run = results.get(child) or {}
    modes = run.get("modes", {})
    ratio = modes.get("prefix", {}).get("ratio") if "unshared" in modes else None
    token_ratio = run.get("token_ratio")
    add(2, key, f"prefix-shared vs our unshared on {pairs}, pairs/s" + (
        f" (sharing removes {1 - 1 / token_ratio:.1%} of the pairs' real tokens: "
        f"{token_ratio:.3f}x)" if token_ratio else ""), ratio, 1.5)

  # The issue states goal 2 on the process pairs (prompt + first steps shared); the figure on
  # all the bundled pairs (the outcome pairs share the prompt only) stays beside it.
  sharing("prefix_process", "prefix_vs_unshared", "the process pairs")
  process = (results.get("prefix_process") or {}).get("modes", {})
  add(2, "trie_vs_unshared", "prompt trees (a prompt's pairs in one tree, packed; live reference)"
      " vs our unshared on the process pairs, pairs/s",
      process.get("trie", {}).get("ratio") if "unshared" in process else None, 1.5)
  sharing("prefix_dpo", "prefix_vs_unshared_all", "all the pairs")
  packed = (results.get("prefix_dpo") or {}).get("modes", {}).get("trie+cached", {})
  add(3, "fill", "fill of packed rows on the bundled pairs", results.get("fill"), 0.9, "{:.3f}")
  add(4, "packed_cached_vs_trl", "prompt trees, packed, cached reference vs TRL, pairs/s (the"
      " step)", packed.get("vs_trl"), 2.5)
  add(4, "packed_cached_epoch_vs_trl", "the same, one-time reference pass paid at one epoch",
      packed.get("amortised_epoch_vs_trl"), 2.5)
  sampled = results.get("sampler") or {}
  for batch, figures in sorted(sampled.items(), key=lambda kv: int(kv[0])):
    if int(batch) >= 16:
      add(6, f"sampler_batch{batch}", f"sampler new tokens/s at batch {batch} (transformers: "
          f"{figures['theirs_tok_s']:.0f}, {figures['ratio']:.2f}x)", figures["ours_tok_s"],
          GOAL6_TOKENS_PER_S, "{:.0f}")
  return rows


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
  p.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery only")
  p.add_argument("--skip", default="", help="comma list of children not to run "
                 "(side_by_side, prefix_dpo, sampler)")
  # The CPU opt-ins apply to goal 1's rows of one sequence; goals 2-4 pack rows and trees, which
  # cpu_flash does not skip between (BUILD.md), and keep the defaults.
  p.add_argument("--cpu_gemm", default="xla", choices=("xla", "mkl"),
                 help="goal 1's saro_jax steps: model.cpu_gemm (side_by_side.py --cpu_gemm)")
  p.add_argument("--attention_impl", default="xla", choices=("xla", "cpu_flash"),
                 help="goal 1's saro_jax steps: model.attention_impl (side_by_side.py)")
  args = p.parse_args(argv)
  goal1_options = [f"--{k}={getattr(args, k)}" for k in ("cpu_gemm", "attention_impl")
                   if getattr(args, k) != "xla"]
  skip = {s for s in args.skip.split(",") if s}
  results, seconds, failed = {}, {}, []
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  cpu = cpu_identity()
  load_before = os.getloadavg()[0]
  for name, (script, *child_args) in children(args.model, args.quick, goal1_options).items():
    if name in skip:
      continue
    out, seconds[name], status = run_child(script, child_args)
    if status:
      failed.append(f"{name} (exit {status})")
    if name == "sampler" and out is not None:
      out = out.get("results", out)
    results[name] = out
  results["fill"] = packed_fill(args.model)
  rows = table(results)
  print(f"\n## Issue 10 goals, one run ({args.model}{', quick' if args.quick else ''}"
        + "".join(f", goal 1 {o[2:]}" for o in goal1_options) + "; started "
        f"{started}, load {load_before:.1f} -> {os.getloadavg()[0]:.1f}; child seconds "
        + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()) + f")\n\nCPU: {cpu}\n")
  print("| goal | figure | measured | target | met |")
  print("|---|---|---|---|---|")
  for r in rows:
    met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
    print(f"| {r['goal']} | {r['what']} | {r['text']} | {r['target_text']} | {met} |")
  if failed:
    print(f"\nfailed: {', '.join(failed)}")
  summary = {"model": args.model, "quick": args.quick, "goal1_options": goal1_options, "cpu": cpu,
             "rows": rows, "seconds": seconds,
             "failed": failed, "children": results}
  print(json.dumps(summary, default=float))
  if failed and argv is None:
    raise SystemExit(1)
  return summary


if __name__ == "__main__":
  main()
