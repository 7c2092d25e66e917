r"""Reasoning-style Warmup (RW): SFT on reasoning traces, loss on the assistant turn only.

  python -m saro_jax.main --config configs/rw.py            # preset tiny (default), CPU, ~1 min
  python -m saro_jax.main --config configs/rw.py:smollm2_135m --config.train.steps=20

Presets: tiny (random small Llama + bundled tokenizer/data, 300 steps: loss ~7.6 -> ~0.9),
smollm2_135m (the real SmolLM2-135M-Instruct GGUF, CPU: the RW part of configs/saro.py's recipe,
16 steps of 4 packed rows of 256 tokens at lr 1.5e-4; here on the bundled traces; ~1 min per step
on 2 busy cores), qwen2_5_7b / llama3_8b (hub ids or local dirs, fsdp
over all devices, bf16 compute with fp32 master weights, remat, grad accumulation). Writes checkpoints, metrics.jsonl,
TensorBoard events and (export.enabled) an HF dir under the workdir (default runs/rw-<preset>).
"""

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "rw")
  config = presets.base("rw", "rw", preset)
  config.update(presets.rw_recipe(preset))
  return config
