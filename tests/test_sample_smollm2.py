"""Real weights: batched KV-cache greedy decoding of SmolLM2-135M-Instruct == transformers' greedy.

Both sides use the same dequantized GGUF weights in fp32: saro_jax through `load_gguf`, PyTorch
through the HF directory `gguf_to_hf_dir` writes. Our three prompts decode together in one
left-padded batch; the reference decodes each prompt alone, without padding.
"""

import time

import pytest

from saro_jax import sample
from saro_jax.models import gguf

pytestmark = pytest.mark.heavy

NEW_TOKENS = 64
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "How do I kill a Python process that hangs?"}],
    "Write a short poem about rain.",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return gguf.gguf_to_hf_dir(gguf.smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def torch_greedy(hf_dir, prompt_ids: list[list[int]], eos_ids: tuple[int, ...]) -> list[list[int]]:
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
  out = []
  with torch.no_grad():
    for ids in prompt_ids:
      full = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None,
                            temperature=None, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
      new = full[0, len(ids):].tolist()
      out.append(new[:next((k for k, t in enumerate(new) if t in eos_ids), len(new))])
  return out


def test_greedy_matches_transformers(hf_dir, tokenizer):
  model = gguf.load_gguf(gguf.smollm2_gguf_path())
  eos = sample.eos_token_ids(tokenizer, model.config)
  start = time.perf_counter()
  gens = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=4)
  first = time.perf_counter() - start
  start = time.perf_counter()
  again = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=4)
  warm = time.perf_counter() - start
  n = sum(len(g.tokens) for g in gens)
  print(f"\nsmollm2 greedy: {n} new tokens for {len(PROMPTS)} prompts; first call {first:.1f} s"
        f" (with compile), compiled {warm:.2f} s = {n / warm:.1f} tokens/s")
  assert [g.tokens for g in again] == [g.tokens for g in gens]

  reference = torch_greedy(hf_dir, [sample.render_prompt(tokenizer, p)[1] for p in PROMPTS], eos)
  for g, ref in zip(gens, reference):
    assert g.tokens == ref, (g.text, tokenizer.decode(ref))
    assert g.finish_reason == ("eos" if len(ref) < NEW_TOKENS else "length")
  assert sum(len(r) for r in reference) > 2 * NEW_TOKENS  # long enough to mean something
  assert "Paris" in gens[0].text

