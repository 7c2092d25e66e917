r"""The sampler's prefill and decode step in process CPU seconds (and wall seconds): the model's
own weight layout ([in, out]) vs the decode copy stored [out, in] (``transformer.to_out_in``) vs
the model's own layout decoded with XLA's own dots (``xla_options.CPU_DECODE_OPTIONS``, the fp32 CPU
default in sessions 33-34) vs the feature-major step on the copy (``decode_columns``, activations
[D, B]; the fp32 CPU default since session 35), side by side.

On a shared, loaded machine wall time measures the neighbours; the CPU time of this process (all
its threads, ``time.process_time``) measures the work; on a quiet machine the wall time is what a
user waits. All three run the REAL ``sample._prefill`` and ``sample._decode`` jits on the same
left-padded batch of the bundled eval prompts, EOS off (every row decodes every step), in turn per
round after one compiling round each; every round asserts that all produced the same tokens.
Rounds alternate the order (A, B, C, D / D, C, B, A).

    .venv/bin/python benchmarks/decode_layout.py --model smollm2 --batch 32 --steps 16 --rounds 2

``--model tiny``: a tiny random Llama with the bundled tokenizer (seconds; used by a test).
Round 0 (both layouts) includes the compiles: its excess over the timed rounds is the compile cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from saro_jax import sample  # noqa: E402
from saro_jax.data import bundled  # noqa: E402
from saro_jax.models import gguf, transformer  # noqa: E402

NEVER = jnp.asarray([-1], jnp.int32)  # an EOS id no token has: every row decodes every step


def load(model_name: str):
  if model_name == "smollm2":
    path = gguf.smollm2_gguf_path()
    return (gguf.load_gguf(path, param_dtype="float32", compute_dtype="float32"),
            gguf.gguf_tokenizer(path))
  if model_name == "tiny":
    import transformers
    from sampler import tiny_model  # benchmarks/sampler.py: the same tiny model
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
    return tiny_model(tokenizer), tokenizer
  raise ValueError(f"--model {model_name!r}: smollm2 | tiny")


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
  with open(bundled.path("eval_prompts")) as f:
    rows = [json.loads(line)["prompt"] for line in f]
  return [sample.render_prompt(tokenizer, rows[i % len(rows)])[1] for i in range(n)]


def cpu_s(fn):
  """(result, process CPU seconds, wall seconds) of fn(), waiting for its arrays."""
  start, wall = time.process_time(), time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.process_time() - start, time.perf_counter() - wall


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="smollm2 | tiny")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
  p.add_argument("--rounds", type=int, default=2, help="timed A, B rounds (after one compiling round)")
  p.add_argument("--decodes", type=int, default=2,
                 help="decode runs per prefill and round (each from a copy of the prefill's carry)")
  args = p.parse_args(argv)
  model, tokenizer = load(args.model)
  ids = prompt_ids(tokenizer, args.batch)
  longest = max(len(x) for x in ids)
  plen = sample.bucket(longest, 32)
  cache_len = plen + args.steps + 1
  packed = [jnp.asarray(x) for x in sample.pack_prompts(ids, args.batch, plen, 0).arrays()]
  index = jnp.arange(args.batch, dtype=jnp.uint32)
  done = jnp.zeros(args.batch, bool)
  greedy = sample.Sampling.of()

  start = time.process_time()
  out_in_model = jax.block_until_ready(transformer.to_out_in(model))
  convert_cpu_s = time.process_time() - start
  layouts = {"in_out": nnx.split(model), "out_in": nnx.split(out_in_model)}
  layouts["in_out_cpu_dots"] = layouts["in_out"]  # XLA's own dots (xla_options.CPU_DECODE_OPTIONS)
  layouts["columns"] = layouts["out_in"]  # activations [D, B] (decode_columns)

  def prefill(layout, packed, plen):
    graphdef, state = layouts[layout]
    return sample._prefill(graphdef, state, *packed, index, done, jnp.uint32(0),
                           NEVER, greedy, cache_len=plen + args.steps + 1, mesh=None)

  def decode(layout, carry, plen):
    graphdef, state = layouts[layout]
    decoder = sample._decode_cpu_dots() if layout == "in_out_cpu_dots" else sample._decode
    return decoder(graphdef, state, carry, jnp.int32(args.steps + 1), NEVER, greedy,
                   prompt_len=plen, mesh=None, columns=layout == "columns")

  print(f"model {args.model}; batch {args.batch}, prompts {min(len(x) for x in ids)}-{longest}"
        f" tokens (bucket {plen}), cache {cache_len}, {args.steps} decode steps per round;"
        f" to_out_in copy: {convert_cpu_s:.2f} CPU s", flush=True)
  times = {name: {"prefill": [], "step": [], "wall_step": []} for name in layouts}
  out_tokens = {}
  for round_ in range(args.rounds + 1):  # round 0 compiles
    # A, B, C, D then D, C, B, A: none always runs first (after the others' cache traffic).
    for name in (list(layouts) if round_ % 2 == 0 else list(layouts)[::-1]):
      first, t_prefill, _ = cpu_s(lambda: prefill(name, packed, plen))
      t_decodes, wall_decodes = [], []
      for _ in range(args.decodes):
        carry = jax.block_until_ready(jax.tree.map(jnp.copy, first))  # _decode donates it
        carry, t_decode, wall = cpu_s(lambda: decode(name, carry, plen))
        assert int(carry["step"]) == args.steps + 1
        out_tokens[name] = np.asarray(carry["out"])[:, :args.steps + 1]
        t_decodes.append(t_decode / args.steps)
        wall_decodes.append(wall / args.steps)
      if round_:
        times[name]["prefill"].append(t_prefill)
        times[name]["step"].extend(t_decodes)
        times[name]["wall_step"].extend(wall_decodes)
      print(f"round {round_} {name}: prefill {t_prefill:.2f} CPU s, decode"
            f" {', '.join(f'{1000 * t:.1f}' for t in t_decodes)} CPU ms/step"
            f" ({', '.join(f'{1000 * t:.1f}' for t in wall_decodes)} wall)", flush=True)
    for name in out_tokens:  # greedy, EOS off: every layout must pick the same tokens
      same = (out_tokens[name] == out_tokens["in_out"]).all()
      assert same, f"round {round_}: {name} and in_out decoded different tokens"
  results = dict(convert_cpu_s=convert_cpu_s, batch=args.batch, prompt_bucket=plen,
                 steps=args.steps, layouts={})
  base = {k: statistics.median(v) for k, v in times["in_out"].items()}
  print("| layout | prefill CPU s | decode CPU ms/step | prefill / in_out | step / in_out |"
        " decode wall ms/step | wall step / in_out |")
  print("|---|---|---|---|---|---|---|")
  for name, t in times.items():
    med = {k: statistics.median(v) for k, v in t.items()}
    results["layouts"][name] = dict(prefill_cpu_s=med["prefill"], step_cpu_s=med["step"],
                                    prefill_ratio=med["prefill"] / base["prefill"],
                                    step_ratio=med["step"] / base["step"],
                                    wall_step_s=med["wall_step"],
                                    wall_step_ratio=med["wall_step"] / base["wall_step"],
                                    prefill_all=t["prefill"], step_all=t["step"])
    print(f"| {name} | {med['prefill']:.2f} | {1000 * med['step']:.1f} |"
          f" {med['prefill'] / base['prefill']:.3f} | {med['step'] / base['step']:.3f} |"
          f" {1000 * med['wall_step']:.1f} | {med['wall_step'] / base['wall_step']:.3f} |", flush=True)

  return results


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
