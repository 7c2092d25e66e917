"""HF checkpoints in and out: safetensors <-> Transformer through one mapping table per family.

A row of the table names an HF key, the model path, and how the HF tensor's dims relate to the
model's (``Layout``); import and export both read the same row. Import streams: each device reads
only its own slice of each tensor (``jax.make_array_from_callback``), never a full host copy per
device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from saro_jax import sharding
from saro_jax.models import families
from saro_jax.models.config import ModelConfig
from saro_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Layout:
  """HF dim i holds the row-major product of the symbolic dims ``hf_dims[i]``; the model array's
  dims are ``model_dims`` (a permutation of the same symbols). V is padded on the model side."""

  hf_dims: tuple[tuple[str, ...], ...]
  model_dims: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_key: str  # "{i}" = layer index
  model_path: str  # dotted nnx state path, "{i}" = layer index
  layout: Layout


_MATRIX_IN = Layout((("F",), ("D",)), ("D", "F"))  # nn.Linear(D -> F) weight [F, D]
_BASE_RULES = (
    Rule("model.embed_tokens.weight", "embed_VxD", Layout((("V",), ("D",)), ("V", "D"))),
    Rule("model.norm.weight", "final_norm.scale_D", Layout((("D",),), ("D",))),
    Rule("lm_head.weight", "lm_head_DxV", Layout((("V",), ("D",)), ("D", "V"))),
    Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.scale_D",
         Layout((("D",),), ("D",))),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale_D",
         Layout((("D",),), ("D",))),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq_DxNxH",
         Layout((("N", "H"), ("D",)), ("D", "N", "H"))),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk_DxKxH",
         Layout((("K", "H"), ("D",)), ("D", "K", "H"))),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv_DxKxH",
         Layout((("K", "H"), ("D",)), ("D", "K", "H"))),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo_NxHxD",
         Layout((("D",), ("N", "H")), ("N", "H", "D"))),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.w_gate_DxF", _MATRIX_IN),
    Rule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.w_up_DxF", _MATRIX_IN),
    Rule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.w_down_FxD",
         Layout((("D",), ("F",)), ("F", "D"))),
)
_QKV_BIAS_RULES = (
    Rule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.bq_NxH",
         Layout((("N", "H"),), ("N", "H"))),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.bk_KxH",
         Layout((("K", "H"),), ("K", "H"))),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.bv_KxH",
         Layout((("K", "H"),), ("K", "H"))),
)
_QK_NORM_RULES = (
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale_D",
         Layout((("H",),), ("H",))),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale_D",
         Layout((("H",),), ("H",))),
)

# One table per family (the HF names coincide across these families; the extras differ).
MAPPINGS: dict[str, tuple[Rule, ...]] = {
    "llama": _BASE_RULES,
    "mistral": _BASE_RULES,
    "gemma": _BASE_RULES,
    "qwen2": _BASE_RULES + _QKV_BIAS_RULES,
    "qwen3": _BASE_RULES + _QK_NORM_RULES,
}

# HF keys that carry no weights of ours (buffers some old checkpoints saved).
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def _sizes(config: ModelConfig, *, padded: bool) -> dict[str, int]:
  return {"V": config.padded_vocab_size if padded else config.vocab_size, "D": config.hidden_size,
          "N": config.num_heads, "K": config.num_kv_heads, "H": config.head_dim,
          "F": config.intermediate_size}


def _expand(config: ModelConfig) -> dict[str, tuple[str, Layout]]:
  """model path -> (HF key, layout) for every weight of a model with this config."""
  out = {}
  for rule in MAPPINGS[config.family]:
    if rule.hf_key == "lm_head.weight" and config.tie_embeddings:
      continue
    layers = range(config.num_layers) if "{i}" in rule.hf_key else [None]
    for i in layers:
      out[rule.model_path.format(i=i)] = (rule.hf_key.format(i=i), rule.layout)
  return out


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------------------------
# Import


def _shape_of(tensor) -> tuple[int, ...]:
  return tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(tensor.get_shape())


def _read_block(tensor, layout: Layout, config: ModelConfig, index: tuple[slice, ...]) -> np.ndarray:
  """The model-layout block ``index`` of an HF tensor, reading only the HF rows it needs."""
  hf_sizes, model_sizes = _sizes(config, padded=False), _sizes(config, padded=True)
  # Slice wanted on each symbolic dim (model side, so V may extend into the zero padding).
  want = {}
  for sym, sl in zip(layout.model_dims, index):
    start, stop, _ = sl.indices(model_sizes[sym])
    want[sym] = (start, stop)
  # Clamp to the real HF extent; padding rows are filled with zeros below.
  have = {s: (min(a, hf_sizes[s]), min(b, hf_sizes[s])) for s, (a, b) in want.items()}
  hf_index, inner_index = [], []
  for group in layout.hf_dims:
    outer, inner = group[0], group[1:]
    inner_size = math.prod(hf_sizes[s] for s in inner)
    a, b = have[outer]
    hf_index.append(slice(a * inner_size, b * inner_size))
    inner_index.append((slice(None),) + tuple(slice(*have[s]) for s in inner))
  block = np.asarray(tensor[tuple(hf_index)])
  split_shape = [have[g[0]][1] - have[g[0]][0] if k == 0 else hf_sizes[s]
                 for g in layout.hf_dims for k, s in enumerate(g)]
  block = block.reshape(split_shape)[tuple(s for idx in inner_index for s in idx)]
  flat_syms = [s for g in layout.hf_dims for s in g]
  block = block.transpose([flat_syms.index(s) for s in layout.model_dims])
  pads = [(0, (want[s][1] - want[s][0]) - (have[s][1] - have[s][0])) for s in layout.model_dims]
  if any(p for _, p in pads):
    block = np.pad(block, pads)
  return block


def load_from_tensors(hf_config: Mapping[str, Any], tensors: Mapping[str, Any], *,
                      mesh: Mesh | None = None, rules=None, param_dtype=None, compute_dtype=None,
                      source: str = "<tensors>", **config_overrides) -> Transformer:
  """A Transformer from an HF config dict and a name -> tensor mapping (read lazily, per slice)."""
  config = families.config_from_hf(hf_config, source=f"{source}/config.json",
                                   param_dtype=param_dtype, compute_dtype=compute_dtype,
                                   **config_overrides)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  if mesh is None:
    device_sharding = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device_sharding, abstract_state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
  flat_shardings = dict(nnx.to_flat_state(shardings))
  expected = _expand(config)

  present = set(tensors.keys())
  wanted = {hf_key for hf_key, _ in expected.values()}
  missing = sorted(wanted - present)
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                     f" required by {config.family} with {config.num_layers} layers")
  tolerated = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(k for k in present - wanted - tolerated if not _IGNORED_HF.match(k))
  if unexpected:
    raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''} not used by {config.family}")

  hf_sizes = _sizes(config, padded=False)
  flat = []
  for path, variable in nnx.to_flat_state(abstract_state):
    name = _path_str(path)
    hf_key, layout = expected[name]
    tensor = tensors[hf_key]
    want_shape = tuple(math.prod(hf_sizes[s] for s in g) for g in layout.hf_dims)
    if _shape_of(tensor) != want_shape:
      raise ValueError(f"{source}: tensor {hf_key!r} has shape {_shape_of(tensor)} but the config "
                       f"implies {want_shape} (for {name})")
    dtype = variable.dtype
    read = lambda index, t=tensor, lay=layout, dt=dtype: _read_block(t, lay, config, index).astype(dt)
    value = jax.make_array_from_callback(variable.shape, flat_shardings[path], read)
    flat.append((path, variable.replace(value=value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class _SafetensorsDir(Mapping):
  """name -> lazily sliceable tensor over model.safetensors or a sharded index."""

  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from e
    elif (directory / "model.safetensors").exists():
      weight_map = None
    else:
      raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    self._handles = {f: safe_open(str(directory / f), framework="np") for f in files}
    if weight_map is None:
      weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
    self._map = weight_map

  def __getitem__(self, key):
    return self._handles[self._map[key]].get_slice(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._map)

  def __len__(self):
    return len(self._map)


def _pickled_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  import torch  # only for explicitly allowed legacy .bin checkpoints

  out = {}
  for f in sorted(directory.glob("pytorch_model*.bin")):
    for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
      out[k] = (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16
                else v.numpy())
  return out


def _resolve(path_or_id: str) -> pathlib.Path:
  path = pathlib.Path(path_or_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{path}: expected an HF model directory (config.json + safetensors)")
  text = str(path_or_id)
  if text.startswith((".", "/", "~")) or text.count("/") != 1:
    raise FileNotFoundError(f"{text}: no such model directory (and not an 'org/name' hub id)")
  from huggingface_hub import snapshot_download

  return pathlib.Path(snapshot_download(
      str(path_or_id), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                       "*.txt", "*.jinja"]))


def load_hf(path_or_id: str, *, mesh: Mesh | None = None, rules=None, param_dtype=None,
            compute_dtype=None, allow_pickle: bool = False, **config_overrides) -> Transformer:
  """A Transformer from a local HF directory (or hub id): config.json + safetensors."""
  directory = _resolve(path_or_id)
  config_file = directory / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{directory}: no config.json")
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: line {e.lineno}: invalid JSON ({e.msg})") from e
  has_safetensors = ((directory / "model.safetensors").exists()
                     or (directory / "model.safetensors.index.json").exists())
  if has_safetensors:
    tensors = _SafetensorsDir(directory)
  elif list(directory.glob("pytorch_model*.bin")):
    if not allow_pickle:
      raise ValueError(f"{directory}: only pickled pytorch_model*.bin weights found; pickle can run "
                       "arbitrary code, so they are refused. Convert to safetensors, or pass "
                       "allow_pickle=True if you trust the source")
    tensors = _pickled_tensors(directory)
  else:
    raise FileNotFoundError(f"{directory}: no model.safetensors, index, or pytorch_model*.bin")
  return load_from_tensors(hf_config, tensors, mesh=mesh, rules=rules, param_dtype=param_dtype,
                           compute_dtype=compute_dtype, source=str(directory), **config_overrides)


# ---------------------------------------------------------------------------------------------
# Export


def _to_hf_layout(value: np.ndarray, layout: Layout, config: ModelConfig) -> np.ndarray:
  hf_sizes = _sizes(config, padded=False)
  if "V" in layout.model_dims:  # strip vocabulary padding
    axis = layout.model_dims.index("V")
    value = np.take(value, np.arange(config.vocab_size), axis=axis)
  flat_syms = [s for g in layout.hf_dims for s in g]
  value = value.transpose([layout.model_dims.index(s) for s in flat_syms])
  return np.ascontiguousarray(value.reshape(
      [math.prod(hf_sizes[s] for s in g) for g in layout.hf_dims]))


def _host_value(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def export_hf(model: Transformer, out_dir, *, tokenizer=None, max_shard_bytes: int = 2**30 * 4,
              dtype: str | None = None) -> pathlib.Path:
  """Writes an HF directory (config.json, generation_config.json, safetensors, tokenizer)."""
  from safetensors.numpy import save_file
  import transformers

  config = model.config
  out = pathlib.Path(out_dir)
  write = jax.process_index() == 0
  np_dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or config.param_dtype) == "bfloat16" else (
      np.dtype(dtype or config.param_dtype))
  expected = _expand(config)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    hf_key, layout = expected[_path_str(path)]
    value = _to_hf_layout(_host_value(variable[...]), layout, config).astype(np_dtype)
    if shards[-1] and sizes[-1] + value.nbytes > max_shard_bytes:
      shards.append({})
      sizes.append(0)
    shards[-1][hf_key] = value
    sizes[-1] += value.nbytes
  if not write:
    return out
  out.mkdir(parents=True, exist_ok=True)
  hf_config = families.config_to_hf(config, dtype=np_dtype.name)
  # Through transformers' own class so the file is canonical for the installed version.
  transformers.AutoConfig.for_model(**hf_config).save_pretrained(out)
  generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config[k] is not None}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
    stale.unlink()
  if len(shards) == 1:
    save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for n, shard in enumerate(shards, 1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(out / name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
  return out
