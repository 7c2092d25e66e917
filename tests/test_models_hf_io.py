"""HF checkpoints in and out: bit-identical round trips that transformers reloads, sharded
safetensors, tokenizers, and a clear error for every malformed checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import error_model as em
import tiny_hf
from saro_jax import models
from saro_jax.data import jsonl
from saro_jax.models import hf


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf_io")
  return {f: tiny_hf.save_tiny_hf(f, root / f) for f in tiny_hf.FAMILIES}


def _all_tensors(directory):
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(f))
  return out


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(family, tiny_dirs, tmp_path):
  src = tiny_dirs[family]
  model = hf.load_hf(str(src), vocab_padding_multiple=64)  # padding must be stripped on export
  out = hf.export_hf(model, tmp_path / "export", tokenizer=models.load_tokenizer(str(src)))

  original, exported = _all_tensors(src), _all_tensors(out)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert np.array_equal(exported[key].view(np.uint8), value.view(np.uint8)), f"{key} changed"

  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(reloaded).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]
  reference = transformers.AutoModelForCausalLM.from_pretrained(src)
  tokens, positions, segments = tiny_hf.padded_batch()
  # Bit-identical tensors in the same PyTorch class: any difference is fp32 rounding at most.
  em.assert_parity(tiny_hf.torch_logits(reloaded, tokens, positions, segments),
                   tiny_hf.torch_logits(reference, tokens, positions, segments),
                   em.model_depth(model.config, tokens.shape[1]), mask=segments > 0,
                   what=f"{family} exported vs original, both in PyTorch")
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["eos_token_id"] == 2
  tok = models.load_tokenizer(str(out))
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
      "<|im_start|>user")


def test_exported_model_reproduces_jax_logits_in_torch(tiny_dirs, tmp_path):
  model = hf.load_hf(str(tiny_dirs["qwen2"]))
  out = hf.export_hf(model, tmp_path / "qwen2")
  tokens, positions, segments = tiny_hf.padded_batch(seed=7)
  ours = tiny_hf.jax_logits(model, tokens, positions, segments)
  theirs = tiny_hf.torch_logits(transformers.AutoModelForCausalLM.from_pretrained(out),
                                tokens, positions, segments)
  em.assert_parity(ours, theirs, em.model_depth(model.config, tokens.shape[1]),
                   mask=segments > 0, what="qwen2 exported, PyTorch vs saro_jax")


def test_sharded_export_writes_an_index_and_reloads(tiny_dirs, tmp_path):
  model = hf.load_hf(str(tiny_dirs["llama"]))
  out = hf.export_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and not (out / "model.safetensors").exists()
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in _all_tensors(out).values())
  again = hf.load_hf(str(out))
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), path
  _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bf16_export_loads_as_bf16(tiny_dirs, tmp_path):
  model = hf.load_hf(str(tiny_dirs["qwen3"]))
  out = hf.export_hf(model, tmp_path / "bf16", dtype="bfloat16")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert reloaded.dtype == torch.bfloat16
  again = hf.load_hf(str(out))
  assert again.config.param_dtype == "bfloat16"
  # One rounding to bfloat16 (8 significand bits, to nearest): relative error <= u = 2^-8.
  np.testing.assert_allclose(np.asarray(again.embed_VxD[...], np.float32),
                             np.asarray(model.embed_VxD[...]), rtol=2.0 ** -8, atol=0)


def test_load_dispatches_on_init_from(tiny_dirs):
  model = models.load(str(tiny_dirs["mistral"]), compute_dtype="bfloat16")
  assert model.config.family == "mistral" and model.config.sliding_window == 5
  assert model.config.compute_dtype == "bfloat16" and model.config.param_dtype == "float32"


# -- errors ----------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tiny_dirs, tmp_path):
  dst = tmp_path / "llama"
  shutil.copytree(tiny_dirs["llama"], dst)
  return dst


def _edit_tensors(directory, edit):
  tensors = load_file(directory / "model.safetensors")
  edit(tensors)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory, edit):
  config = json.loads((directory / "config.json").read_text())
  edit(config)
  (directory / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(llama_copy):
  _edit_tensors(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf(str(llama_copy))


def test_unexpected_tensor_is_named(llama_copy):
  _edit_tensors(llama_copy, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
    hf.load_hf(str(llama_copy))


def test_shape_mismatch_names_key_and_both_shapes(llama_copy):
  _edit_config(llama_copy, lambda c: c.update(intermediate_size=96))
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                     r"\((80, 48|48, 80)\) but the config implies \((96, 48|48, 96)\)"):
    hf.load_hf(str(llama_copy))


def test_pickle_refused_unless_allowed(llama_copy, tiny_dirs):
  state = {k: torch.from_numpy(v) for k, v in load_file(llama_copy / "model.safetensors").items()}
  (llama_copy / "model.safetensors").unlink()
  torch.save(state, llama_copy / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
    hf.load_hf(str(llama_copy))
  model = hf.load_hf(str(llama_copy), allow_pickle=True)
  reference = hf.load_hf(str(tiny_dirs["llama"]))
  assert np.array_equal(np.asarray(model.layers[1].attn.wq_DxNxH[...]),
                        np.asarray(reference.layers[1].attn.wq_DxNxH[...]))


def test_unsupported_architecture_lists_supported(llama_copy):
  _edit_config(llama_copy, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ValueError, match=r"config\.json: unsupported architecture.*gpt2.*supported: "
                     r"llama.*mistral.*qwen2.*qwen3.*gemma"):
    hf.load_hf(str(llama_copy))


def test_unsupported_rope_type_is_refused(llama_copy):
  _edit_config(llama_copy, lambda c: c.update(rope_parameters={
      "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
  with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
    hf.load_hf(str(llama_copy))


def test_invalid_config_json_names_file_and_line(llama_copy):
  (llama_copy / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
  with pytest.raises(jsonl.InputError, match=r"config\.json:3: malformed JSON at column 3"):
    hf.load_hf(str(llama_copy))


def test_config_json_with_a_byte_order_mark_loads(llama_copy):
  """Issue 8 §3.5: Windows editors start files with a UTF-8 BOM."""
  path = llama_copy / "config.json"
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  assert hf.load_hf(str(llama_copy)).config.family == "llama"


def test_directory_without_weights_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(tiny_hf.hf_config("llama").to_dict()))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_hf(str(tmp_path))


def test_gemma_legacy_gelu_means_tanh_and_config_dict_round_trips():
  from saro_jax.models import families
  from saro_jax.models.config import ModelConfig

  hf_config = tiny_hf.hf_config("gemma").to_dict()
  hf_config["hidden_act"] = "gelu"  # as in the released gemma-2b/7b config.json
  config = families.config_from_hf(hf_config)
  assert config.hidden_act == "gelu_tanh" and config.embed_scale and config.norm_offset == 1.0
  llama3 = families.config_from_hf(tiny_hf.hf_config("llama3").to_dict())
  assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.rope_theta == 50000.0
  assert ModelConfig.from_dict(llama3.to_dict()) == llama3
  assert hash(llama3) == hash(ModelConfig.from_dict(llama3.to_dict()))
  legacy = {k: v for k, v in tiny_hf.hf_config("llama").to_dict().items() if k != "rope_parameters"}
  legacy.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})  # v4 keys
  old = families.config_from_hf(legacy)
  assert old.rope_theta == 500000.0 and dict(old.rope_scaling) == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("change,message", [
    (dict(family="gpt2"), r"ModelConfig\.family='gpt2': unsupported; supported families: llama"),
    (dict(num_kv_heads=3), r"num_kv_heads=3: must divide num_heads=4"),
    (dict(remat="full"), r"remat='full': must be one of"),
    (dict(compute_dtype="fp8"), r"compute_dtype='fp8'"),
    (dict(attention_impl="cudnn"), r"attention_impl='cudnn': \"cudnn\" .*takes bf16/fp16 compute only"),
])
def test_model_config_rejects_bad_fields(change, message):
  from saro_jax.models.config import ModelConfig

  good = dict(family="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
              num_heads=4, num_kv_heads=2, head_dim=2)
  ModelConfig(**good)
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**good, **change})


def test_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    hf.load_hf(str(tmp_path / "runs" / "final"))
