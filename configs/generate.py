r"""Generate: completions for a prompt set, split into reasoning and answer, written as JSONL.

  python -m saro_jax.main --config configs/generate.py:smollm2_135m \
      --config.generate.prompts=prompts.jsonl --config.generate.max_new_tokens=128
  python -m saro_jax.main --config configs/generate.py \
      --config.model.init_from=runs/saro-tiny/srpo/hf --config.model.tokenizer= \
      --config.generate.prompts="text:How do I kill a Python process?"

Presets as in rw.py (tiny = random small Llama + bundled tokenizer, runs in seconds on CPU;
smollm2_135m = the real SmolLM2-135M-Instruct GGUF). ``generate.prompts`` is a .jsonl/.json file
(rows with "prompt": str or "messages": [...], optional "id"), a .txt file (one prompt per line),
"bundled:<name>" or "text:<one literal prompt>". Writes <workdir>/generations.jsonl (one row per
prompt: id, prompt, reasoning, answer, text, finish_reason, token counts) and prints its path.
"""

from saro_jax import presets
from saro_jax.config import GenerateConfig, defaults


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "generate")
  config = presets.header("generate", "generate", preset)
  # Every generate.* key and its default: saro_jax/config.py GenerateConfig.
  config.generate = defaults(
      GenerateConfig, prompts="text:How do I kill a Python process?",
      max_new_tokens={"tiny": 32, "smollm2_135m": 128}.get(preset, 1024),
      batch_size={"tiny": 8, "smollm2_135m": 8}.get(preset, 32))
  return config
