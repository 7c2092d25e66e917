"""Tiny random HF (PyTorch) checkpoints of every supported family, saved the way the hub saves them.

``save_tiny_hf("qwen3", tmp_path)`` writes config.json + model.safetensors (by transformers'
``save_pretrained``) + a small BPE tokenizer with a ChatML chat template. Every weight is random
(norm scales near 1, biases non-zero) and rope_theta / rms_norm_eps / head_dim are non-default, so
a parity test fails if any of them is ignored.
"""

from __future__ import annotations

import functools
import pathlib

import torch
import transformers

VOCAB_SIZE = 100

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # 16 != 48 / 4: decoupled
    rms_norm_eps=3e-5, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)

# family -> (HF model_type, overrides). "llama3" is Llama with the llama3 rope scaling.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 2345.0})),
    "llama3": ("llama", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_linear": ("llama", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 3000.0, "factor": 4.0})),
    "mistral": ("mistral", dict(sliding_window=5,
                                rope_parameters={"rope_type": "default", "rope_theta": 7777.0})),
    "qwen2": ("qwen2", dict(head_dim=None, num_attention_heads=4, hidden_size=64,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "gemma": ("gemma", dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
}
FAMILIES = tuple(FAMILY_CONFIGS)

_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "the model reasons about the request before it answers",
    "how do i kill a python process? use the kill command with its pid",
    "wait, this request would cause harm, so i refuse and offer a safe alternative",
    "safety policy: refuse harmful instructions and help with benign ones",
]


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
  model_type, family_overrides = FAMILY_CONFIGS[family]
  kwargs = {**_COMMON, **family_overrides, **overrides}
  if kwargs.get("head_dim") is None:
    kwargs.pop("head_dim")
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
  """A BPE tokenizer trained here on a few sentences; ids < vocab_size; ChatML template."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
  tok.train_from_iterator(_CORPUS, trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>",
      unk_token="<unk>", chat_template=_CHATML)


def random_torch_model(family: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
  config = hf_config(family, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # near the identity scale (Gemma's identity is w = 0)
        p.copy_((0.0 if config.model_type == "gemma" else 1.0) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()


def save_tiny_hf(family: str, out_dir, *, seed: int = 0, **config_overrides) -> pathlib.Path:
  """Saves a tiny random ``family`` model + tokenizer to ``out_dir``; returns the directory."""
  out = pathlib.Path(out_dir)
  random_torch_model(family, seed=seed, **config_overrides).save_pretrained(out)
  tiny_tokenizer(int(hf_config(family, **config_overrides).vocab_size)).save_pretrained(out)
  return out


def padded_batch(seed: int = 0, lengths=(12, 7), left_pad=(False, True), vocab_size=VOCAB_SIZE):
  """(tokens, positions, segment_ids) int32 [B, L]: padding is segment 0; positions count real
  tokens from 0 (left-padded rows start their positions after the padding)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  L = max(lengths)
  tokens = rng.integers(3, vocab_size, (len(lengths), L)).astype(np.int32)
  segment_ids = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for b, (n, left) in enumerate(zip(lengths, left_pad)):
    real = slice(L - n, L) if left else slice(0, n)
    segment_ids[b, real] = 1
    positions[b, real] = np.arange(n)
    tokens[b, segment_ids[b] == 0] = 0
  return tokens, positions, segment_ids


def right_padded(prompt_ids):
  """(tokens, positions, segment_ids) int32 [B, L] of all prompts (sequences of token ids) in one
  batch: right padding is segment 0, which no real token attends to."""
  import numpy as np

  length = max(len(ids) for ids in prompt_ids)
  tokens_BxL = np.zeros((len(prompt_ids), length), np.int32)
  segment_ids_BxL = np.zeros_like(tokens_BxL)
  for b, ids in enumerate(prompt_ids):
    tokens_BxL[b, :len(ids)] = ids
    segment_ids_BxL[b, :len(ids)] = 1
  positions_BxL = np.broadcast_to(np.arange(length, dtype=np.int32), tokens_BxL.shape).copy()
  return tokens_BxL, positions_BxL, segment_ids_BxL


def torch_logits(model: torch.nn.Module, tokens, positions, segment_ids):
  """Reference logits from a transformers model (padding = segment 0 -> attention_mask 0)."""
  import numpy as np

  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
                attention_mask=torch.as_tensor((np.asarray(segment_ids) > 0).astype(np.int64)),
                position_ids=torch.as_tensor(np.asarray(positions, np.int64)))
  return out.logits.float().numpy()


def jax_logits(model, tokens, positions, segment_ids):
  """A saro_jax model's logits from ONE compiled program, as a NumPy array. Called eagerly, an NNX
  model compiles each of its ops as a program of its own (60-90 for a 2-layer model, 0.1-0.3 s
  each), which was most of the time of the tests that compared logits that way."""
  import numpy as np

  return np.asarray(_forward()(model, tokens, positions, segment_ids))


@functools.cache  # one jitted function for every caller: its traces are cached per model shape
def _forward():
  from flax import nnx

  return nnx.jit(lambda model, t, p, s: model(t, p, s))


def assert_same_function(ref, model, what: str) -> None:
  """``model`` (the same weights as ``ref``, other kernels) computes ``ref``'s function: on
  ``padded_batch(seed=1)``, the logits and every gradient leaf of mean(logits ** 2) within the error
  model of two fp32 programs of one function (error_model point 3) at the model's depth, and one
  final-norm weight of ``model`` off by 0.1 is caught."""
  import jax.numpy as jnp
  from flax import nnx

  import error_model as em

  tokens, positions, segments = padded_batch(seed=1, lengths=(12, 7), left_pad=(False, True))
  depth = em.model_depth(model.config, tokens.shape[1])
  real = segments > 0
  want = jax_logits(ref, tokens, positions, segments)
  em.assert_parity(jax_logits(model, tokens, positions, segments), want, depth, mask=real,
                   what=f"logits, {what}")
  bugged = nnx.clone(model)
  bugged.final_norm.scale_D[...] = bugged.final_norm.scale_D[...].at[0].add(0.1)
  em.assert_caught(jax_logits(bugged, tokens, positions, segments), want, depth, mask=real,
                   what=f"logits, {what} with one weight off")

  def loss(m):
    return jnp.mean(m(tokens, positions, segments) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  g_depth = em.grad_depth(depth, vocab=model.config.vocab_size, tokens=tokens.size)
  results = {path: em.parity(b[...], a[...], g_depth) for (path, a), (_, b) in
             zip(nnx.to_flat_state(grad(ref)), nnx.to_flat_state(grad(model)))}
  worst = max(results, key=lambda path: results[path].excess)
  print(f"{what}: worst gradient leaf {worst}: {results[worst]}")
  assert all(r.ok for r in results.values()), {p: str(r) for p, r in results.items() if not r.ok}
