r"""LoRA vs full fine-tuning: one SFT train step (AdamW), step time and memory, side by side.

Full: value_and_grad over every param, AdamW moments for every param. LoRA: value_and_grad over
the adapters only (``models/lora.py``), the base params a frozen jit argument, AdamW moments for
the adapters only. Same tokens, same model, same run; timed steps alternate A, B, A, B.

Memory per variant: the persistent train state (trainable params + optimizer moments; LoRA adds
the frozen base, which full fine-tuning holds as its params) and XLA's compiled peak for the step
(arguments + outputs + temporaries, from ``memory_analysis``; outputs alias donated inputs).

    .venv/bin/python benchmarks/lora.py --model smollm2 --batch 2 --length 128 --steps 3 --rank 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from saro_jax import models, optimizer, train  # noqa: E402
from saro_jax.models import lora  # noqa: E402
from saro_jax.stages import rw  # noqa: E402


def make_steps(graphdef, tx, cfg: lora.LoraConfig, vocab_size: int):
  rw_loss = rw.make_loss_fn(graphdef, vocab_size=vocab_size, chunk_size=128)
  sft_loss = lambda params, batch: rw_loss(params, batch, rw.target_token_count(batch))[0]

  def full_step(state, batch):
    loss, grads = jax.value_and_grad(lambda p: sft_loss(p, batch))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  def lora_step(state, batch, base):
    loss_fn = lambda a: sft_loss(lora.adapted_params(base, a, cfg), batch)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  return jax.jit(full_step, donate_argnums=0), jax.jit(lora_step, donate_argnums=0)


def nbytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def load_model(name: str):
  if name == "smollm2":
    from saro_jax.models import gguf
    return gguf.load_gguf(gguf.smollm2_gguf_path(), param_dtype="float32", compute_dtype="float32")
  config = models.ModelConfig(family="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
  return models.init_random(config, seed=0)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="smollm2 | tiny")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--targets", default="q,k,v,o,gate,up,down")
  args = p.parse_args(argv)
  model = load_model(args.model)
  vocab_size = model.config.vocab_size
  graphdef, params = train.split_model(model)
  del model
  cfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")))
  tx = optimizer.make_optimizer(learning_rate=1e-5, warmup_steps=0, total_steps=100,
                                schedule="constant")
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, params["embed_VxD"][...].shape[0] // 2, (args.batch, args.length))
  ones = jnp.ones(tokens.shape, jnp.int32)  # one sequence per row; the loss on every token
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": ones, "loss_mask": ones,
           "positions": jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)}
  full_step, lora_step = make_steps(graphdef, tx, cfg, vocab_size)
  adapters = lora.init_adapters(params, cfg, seed=0)
  lora_state = train.init_state(adapters, tx, seed=0)
  # Full fine-tuning trains a copy (its state is donated), so the LoRA base stays intact.
  full_state = train.init_state(jax.tree.map(jnp.copy, params), tx, seed=0)
  figures = {}
  t = time.perf_counter()
  full_c = full_step.lower(full_state, batch).compile()
  figures["full_compile_s"] = time.perf_counter() - t
  t = time.perf_counter()
  lora_c = lora_step.lower(lora_state, batch, params).compile()
  figures["lora_compile_s"] = time.perf_counter() - t
  full_state, _ = full_c(full_state, batch)  # warm-up
  lora_state, _ = lora_c(lora_state, batch, params)
  full_s, lora_s = [], []
  for _ in range(args.steps):  # A, B, A, B
    t = time.perf_counter()
    full_state, loss = full_c(full_state, batch)
    jax.block_until_ready(loss)
    full_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    lora_state, loss = lora_c(lora_state, batch, params)
    jax.block_until_ready(loss)
    lora_s.append(time.perf_counter() - t)
  n_base, n_adapters = lora.count(params), lora.count(adapters)
  figures.update(
      full_step_s=statistics.median(full_s), lora_step_s=statistics.median(lora_s),
      full_state_bytes=nbytes(full_state.params) + nbytes(full_state.opt_state),
      lora_state_bytes=nbytes(params) + nbytes(lora_state.params) + nbytes(lora_state.opt_state),
      full_peak_bytes=peak_bytes(full_c), lora_peak_bytes=peak_bytes(lora_c),
      base_params=n_base, adapter_params=n_adapters,
      full_ckpt_bytes=nbytes(full_state.params) + nbytes(full_state.opt_state),
      lora_ckpt_bytes=nbytes(lora_state.params) + nbytes(lora_state.opt_state))
  f, mb = figures, 2**20
  print(f"model {args.model}: {n_base / 1e6:.1f}M params; LoRA rank {args.rank} on"
        f" {','.join(cfg.targets)}: {n_adapters / 1e6:.2f}M adapter params"
        f" ({100 * n_adapters / n_base:.2f} %); batch {args.batch} x {args.length} tokens")
  print("| | full fine-tuning | LoRA | LoRA / full |")
  print("|---|---|---|---|")
  for label, a, b, unit in [
      ("step s (median)", f["full_step_s"], f["lora_step_s"], 1),
      ("compile s", f["full_compile_s"], f["lora_compile_s"], 1),
      ("train state MiB (params + opt)", f["full_state_bytes"], f["lora_state_bytes"], mb),
      ("checkpoint MiB", f["full_ckpt_bytes"], f["lora_ckpt_bytes"], mb),
      ("compiled step peak MiB", f["full_peak_bytes"], f["lora_peak_bytes"], mb)]:
    print(f"| {label} | {a / unit:.2f} | {b / unit:.2f} | {b / a:.2f} |")
  return figures


if __name__ == "__main__":
  from saro_jax import host_memory  # as saro_jax.main does, before the backend starts
  print(host_memory.reuse_freed_memory(), flush=True)
  main()
