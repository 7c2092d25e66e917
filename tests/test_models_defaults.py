"""config.json keys left out mean what transformers' config classes say they mean (issue 8 §3.3,
§3.4), and a checkpoint whose tensors disagree with its tie flag loads the way transformers loads
it, or fails clearly: a present tensor is never silently dropped.

Each family's tiny random checkpoint is saved with the weights its family default implies (Qwen3,
Llama, Mistral, Qwen2: untied with lm_head.weight; Gemma: tied), then the key is deleted from
config.json and both transformers (PyTorch) and saro_jax load the same directory.
"""

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import tiny_hf
from saro_jax.models import families, hf

# --- tolerance (fp32 forward vs. PyTorch fp32 forward) -----------------------------------------
# Both sides compute the same function in fp32 with different summation orders. A dot product of
# length n differs by at most ~n * u * sum|a_i b_i| (u = 2**-24, Higham's bound); the tiny models'
# reductions are D = 48 / 64 (projections, norms), F = 80 (MLP), L <= 12 (attention) and the
# head_dim 16 scores, chained through n_layers = 2 residual blocks and the output projection, so
# the worst case is about u * (D + F + L) * (n_layers + 1) relative to the logit scale. A factor 4
# covers softmax / RMSNorm / RoPE (each a few roundings) and the worst-case accumulation of the
# O(1)-norm residual stream. With a logit scale of ~1-3 this is ~1e-4; the defects this file
# guards against (an output layer replaced by the embedding) move logits by O(1).
U = 2.0**-24


def fp32_bound(config, ref_logits, seq_len):
  reductions = config.hidden_size + config.intermediate_size + seq_len
  return 4 * U * reductions * (config.num_layers + 1) * float(np.abs(ref_logits).max())


# family -> the tiny_hf overrides matching the family's transformers default tie flag.
DEFAULT_TIED = {f: bool(transformers.AutoConfig.for_model(tiny_hf.FAMILY_CONFIGS[f][0])
                        .tie_word_embeddings) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma")}
ABSENT_KEYS = {"llama": ("tie_word_embeddings",), "mistral": ("tie_word_embeddings", "sliding_window"),
               "qwen2": ("tie_word_embeddings",), "qwen3": ("tie_word_embeddings",),
               "gemma": ("tie_word_embeddings",)}


def test_transformers_defaults_are_as_the_issue_says():
  """The premise (transformers 5.x): Qwen3 is untied by default, Mistral has a 4096 window."""
  assert DEFAULT_TIED == {"llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                          "gemma": True}
  assert transformers.AutoConfig.for_model("mistral").sliding_window == 4096


def _without(directory, keys):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  for key in keys:
    config.pop(key, None)
  path.write_text(json.dumps(config))
  return config


def _compare(torch_model, model, batch):
  tokens, positions, segments = batch
  ref = tiny_hf.torch_logits(torch_model, tokens, positions, segments)
  ours = tiny_hf.jax_logits(model, *batch)
  real = segments > 0
  diff = float(np.abs(ours[real] - ref[real]).max())
  return diff, fp32_bound(model.config, ref[real], tokens.shape[1])


@pytest.mark.heavy
@pytest.mark.parametrize("family", list(ABSENT_KEYS))
def test_absent_keys_load_like_transformers(family, tmp_path):
  directory = tiny_hf.save_tiny_hf(family, tmp_path / family,
                                   tie_word_embeddings=DEFAULT_TIED[family])
  written = _without(directory, ABSENT_KEYS[family])
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory)
  model = hf.load_hf(str(directory))
  assert model.config.tie_embeddings == torch_model.config.tie_word_embeddings == DEFAULT_TIED[family]
  if family == "mistral":
    assert model.config.sliding_window == torch_model.config.sliding_window == 4096
  batch = tiny_hf.padded_batch()
  diff, bound = _compare(torch_model, model, batch)
  print(f"{family}: max|dlogits| = {diff:.2e} <= {bound:.2e}")
  assert diff <= bound, f"{family}: {diff} > {bound}"
  if not DEFAULT_TIED[family]:
    # The defect itself: with the key read as "tied", the embedding replaces lm_head.weight.
    tensors = load_file(directory / "model.safetensors")
    del tensors["lm_head.weight"]
    old_behaviour = hf.load_from_tensors({**written, "tie_word_embeddings": True}, tensors)
    wrong, _ = _compare(torch_model, old_behaviour, batch)
    assert wrong > 100 * bound, f"the bound would not catch a tied Qwen3-style load ({wrong})"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
@pytest.mark.parametrize("key", ["tie_word_embeddings", "sliding_window", "head_dim",
                                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                                 "rope_parameters", "hidden_act"])
def test_every_absent_key_takes_the_transformers_value(family, key):
  """No model needed: the ModelConfig read from a dict without ``key`` agrees with the config
  transformers builds from the same dict (e.g. Qwen3/Gemma head_dim 128/256, Qwen2/3 32 kv heads)."""
  config = tiny_hf.hf_config(family).to_dict()
  config.pop(key, None)
  ref = transformers.AutoConfig.for_model(config["model_type"],
                                          **{k: v for k, v in config.items() if k != "model_type"})
  try:
    ours = families.config_from_hf(config)
  except ValueError as e:  # e.g. 32 kv heads do not divide 4 heads: transformers cannot build it either
    assert "num_kv_heads" in str(e) and ref.num_attention_heads % ref.num_key_value_heads, e
    return
  head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
  assert (ours.tie_embeddings, ours.head_dim, ours.num_kv_heads, ours.rms_norm_eps,
          ours.max_position_embeddings, ours.rope_theta) == (
      ref.tie_word_embeddings, head_dim, ref.num_key_value_heads, ref.rms_norm_eps,
      ref.max_position_embeddings, ref.rope_parameters["rope_theta"])
  window = ref.sliding_window if family == "mistral" else None
  assert ours.sliding_window == window
  assert families.config_to_hf(ours)["hidden_act"] == ref.hidden_act


def test_tied_config_with_a_different_lm_head_loads_untied_like_transformers(tmp_path):
  directory = tiny_hf.save_tiny_hf("llama", tmp_path / "llama", tie_word_embeddings=False)
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory)
  model = hf.load_hf(str(directory))
  assert not model.config.tie_embeddings  # lm_head.weight is used, not dropped
  diff, bound = _compare(torch_model, model, tiny_hf.padded_batch())
  assert diff <= bound, (diff, bound)


def test_tied_config_with_an_equal_lm_head_stays_tied(tmp_path):
  directory = tiny_hf.save_tiny_hf("gemma", tmp_path / "gemma", tie_word_embeddings=True)
  tensors = load_file(directory / "model.safetensors")
  assert "lm_head.weight" not in tensors
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  model = hf.load_hf(str(directory))
  assert model.config.tie_embeddings
  diff, bound = _compare(transformers.AutoModelForCausalLM.from_pretrained(directory), model,
                         tiny_hf.padded_batch())
  assert diff <= bound, (diff, bound)


def test_untied_config_without_lm_head_is_refused(tmp_path):
  """transformers would start the output layer at random; we refuse, naming the key."""
  directory = tiny_hf.save_tiny_hf("qwen3", tmp_path / "qwen3", tie_word_embeddings=False)
  tensors = load_file(directory / "model.safetensors")
  del tensors["lm_head.weight"]
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  _without(directory, ["tie_word_embeddings"])
  with pytest.raises(ValueError, match=r"tie_word_embeddings=false \(absent from the file: "
                     r"transformers' qwen3 default\), but there is no lm_head\.weight"):
    hf.load_hf(str(directory))
