r"""The RW (SFT) step of ``benchmarks/throughput.py`` in plain PyTorch, for a side-by-side on a GPU:
a transformers Llama of the same shape (``--arch``, random weights), fp32 master weights under
bf16 autocast, SDPA attention (flash attention on a GPU), the transformers model's own loss
(cross-entropy on every token after the first, its logits upcast to fp32), gradients clipped at
norm 1 and fused AdamW: the loop a transformers user writes. Prints seconds per step, tokens/s,
TFLOP/s and MFU counted as throughput.py counts them (6 N per trained token), the peak memory,
and one JSON line; it asserts nothing.

  python benchmarks/torch_step.py --arch llama_1b --batch 8 --length 2048 --peak_tflops 989
  python benchmarks/torch_step.py --arch '{"hidden_size": 64, ...}' --batch 2 --length 64  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

# throughput.py (for ARCHS) imports jax: keep jax off the GPU, which this process's torch uses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # throughput, beside this file

import torch  # noqa: E402
import transformers  # noqa: E402

from throughput import ARCHS  # noqa: E402


def hf_config(arch: dict) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
      num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_heads"],
      num_key_value_heads=arch["num_kv_heads"], head_dim=arch["head_dim"],
      rope_theta=arch.get("rope_theta", 10000.0), rms_norm_eps=arch.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=arch.get("tie_embeddings", False), vocab_size=arch["vocab_size"],
      max_position_embeddings=arch.get("max_position_embeddings", 4096))


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="llama_1b", help=f"{list(ARCHS)} or a JSON dict (throughput.py)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--peak_tflops", type=float, default=0.0)
  args = p.parse_args(argv)
  arch = ARCHS[args.arch] if args.arch in ARCHS else json.loads(args.arch)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM._from_config(
      hf_config(arch), attn_implementation="sdpa", dtype=torch.float32).to(device)
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0, fused=device.type == "cuda")
  tokens = torch.randint(0, arch["vocab_size"], (args.batch, args.length), device=device)

  def step() -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  for _ in range(args.warmup):
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / args.steps
  tokens_per_step = args.batch * args.length
  tflops = 6 * n_params * tokens_per_step / step_s / 1e12
  out = {"system": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
         "device": str(device), "params": n_params, "batch": args.batch, "length": args.length,
         "rw_step_s": step_s, "rw_tokens_per_s": tokens_per_step / step_s, "rw_tflops": tflops,
         "loss": float(loss.detach())}
  if args.peak_tflops:
    out["rw_mfu"] = tflops / args.peak_tflops
  if device.type == "cuda":
    out["rw_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
  print(f"torch RW step ({device}, params {n_params / 1e6:.2f}M, {args.batch}x{args.length}): "
        f"{step_s:.4f} s, {tokens_per_step / step_s:.0f} tok/s, {tflops:.4f} TFLOP/s"
        + (f", MFU {100 * out['rw_mfu']:.1f}%" if "rw_mfu" in out else "")
        + (f", peak {out['rw_peak_gib']:.1f} GiB" if "rw_peak_gib" in out else ""))
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
