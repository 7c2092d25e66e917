"""Real weights: batched KV-cache greedy decoding of SmolLM2-135M-Instruct == transformers' greedy.

Both sides use the same dequantized GGUF weights in fp32: saro_jax through `load_gguf`, PyTorch
through the HF directory `gguf_to_hf_dir` writes. Our three prompts decode together in one
left-padded batch; the reference decodes each prompt alone, without padding.
"""

import numpy as np
import pytest

import error_model as em
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
def hf_dir(smollm2_hf_dir):  # tests/conftest.py: one conversion per run, shared by the workers
  return smollm2_hf_dir


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def torch_greedy(hf_dir, prompt_ids: list[list[int]], eos_ids: tuple[int, ...]
                 ) -> list[tuple[list[int], np.ndarray]]:
  """Per prompt: the greedy tokens (up to EOS) and the logits [steps, V] each was chosen from."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
  out = []
  with torch.no_grad():
    for ids in prompt_ids:
      result = model.generate(torch.tensor([ids]),
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None,
                              temperature=None, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0],
                              return_dict_in_generate=True, output_logits=True)
      new = result.sequences[0, len(ids):].tolist()
      logits = torch.cat(result.logits).numpy()
      out.append((new[:next((k for k, t in enumerate(new) if t in eos_ids), len(new))], logits))
  return out


def test_greedy_matches_transformers(hf_dir, tokenizer):
  model = gguf.load_gguf(gguf.smollm2_gguf_path())
  eos = sample.eos_token_ids(tokenizer, model.config)
  # One call: a repeated call's equality is tests/test_sample.py's (seeded sampling, compiles once
  # per bucket), and speed is benchmarks/sampler.py's, not a test's.
  gens = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=4)

  prompt_ids = [sample.render_prompt(tokenizer, p)[1] for p in PROMPTS]
  reference = torch_greedy(hf_dir, prompt_ids, eos)
  for g, ids, (ref, ref_logits) in zip(gens, prompt_ids, reference):
    # Greedy tokens are equal until a near-tie: two fp32 programs may legitimately pick the other
    # of two tokens whose reference logits are within 2 max_bound (tests/error_model.py; the
    # SmolLM2 depth at this length, relative to max|logit|) -- on another CPU, say. After such a
    # step the continuations differ by construction, so the comparison stops there.
    depth = em.transformer_depth(layers=30, hidden=576, intermediate=1536, num_heads=9,
                                 head_dim=64, seq_len=len(ids) + NEW_TOKENS)
    tie = em.decision_tie(float(np.abs(ref_logits).max()), depth)
    split = next((k for k, (a, b) in enumerate(zip(g.tokens, ref)) if a != b), None)
    if split is None:
      assert g.tokens == ref, (g.text, tokenizer.decode(ref))
      assert g.finish_reason == ("eos" if len(ref) < NEW_TOKENS else "length")
      continue
    gap = float(ref_logits[split, ref[split]] - ref_logits[split, g.tokens[split]])
    print(f"greedy paths split at step {split}: reference logit gap {gap:.2e} "
          f"(near-tie <= {tie:.2e})")
    assert gap <= tie, (split, gap, g.text, tokenizer.decode(ref))
  assert sum(len(r) for r, _ in reference) > 2 * NEW_TOKENS  # long enough to mean something
  assert "Paris" in gens[0].text

