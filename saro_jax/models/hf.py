"""HF checkpoints in and out: safetensors <-> Transformer through one mapping table per family.

A row of the table names an HF key, the model path, and how the HF tensor's dims relate to the
model's (``Layout``); import and export both read the same row. Import streams: each device reads
only its own slice of each tensor (``jax.make_array_from_callback``), never a full host copy per
device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from saro_jax.data import jsonl
from saro_jax.models import families
from saro_jax.models.config import ModelConfig
from saro_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

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


def _expand(config: ModelConfig) -> dict[str, tuple[str | tuple[str, ...], Layout]]:
  """model path -> (HF key, layout) for every weight of a model with this config.

  Scanned models (``scan_layers``) hold one stacked weight ``layers.<rest>`` [Y, ...] per per-layer
  rule: its HF key is then the tuple of the Y per-layer keys, slice i <-> layer i's key."""
  out = {}
  for rule in MAPPINGS[config.family]:
    if rule.hf_key == "lm_head.weight" and config.tie_embeddings:
      continue
    if "{i}" not in rule.hf_key:
      out[rule.model_path] = (rule.hf_key, rule.layout)
    elif config.scan_layers:
      out[rule.model_path.replace("{i}.", "")] = (
          tuple(rule.hf_key.format(i=i) for i in range(config.num_layers)), rule.layout)
    else:
      for i in range(config.num_layers):
        out[rule.model_path.format(i=i)] = (rule.hf_key.format(i=i), rule.layout)
  return out


def _hf_keys(hf_key: str | tuple[str, ...]) -> tuple[str, ...]:
  return hf_key if isinstance(hf_key, tuple) else (hf_key,)


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


def _same_values(a, b, *, chunk_bytes: int = 2**26) -> bool:
  """Whether two 2-D tensors hold the same values, read a block of rows at a time."""
  if _shape_of(a) != _shape_of(b):
    return False
  rows, cols = _shape_of(a)
  step = max(1, chunk_bytes // (4 * max(cols, 1)))
  # safetensors slices do not clamp: stop at the last row.
  return all(np.array_equal(np.asarray(a[r:min(r + step, rows)]), np.asarray(b[r:min(r + step, rows)]))
             for r in range(0, rows, step))


def _output_layer(config: ModelConfig, hf_config: Mapping[str, Any], tensors: Mapping[str, Any],
                  source: str) -> ModelConfig:
  """Tied or not, the way transformers (5.x) decides it from the config AND the tensors present.

  - tied in the config, ``lm_head.weight`` present with other values than the embedding:
    transformers keeps them apart (with a warning), so the model is loaded untied;
  - tied, ``lm_head.weight`` equal to the embedding: tied (the copy carries nothing new);
  - untied, ``lm_head.weight`` absent: transformers would start the output layer at random;
    refused, since no weights for it exist.
  """
  has_head = "lm_head.weight" in tensors
  said = f"tie_word_embeddings={str(config.tie_embeddings).lower()}"
  if "tie_word_embeddings" not in hf_config:
    said += f" (absent from the file: transformers' {config.family} default)"
  if config.tie_embeddings and has_head and "model.embed_tokens.weight" in tensors:
    if not _same_values(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
      log.warning("%s: config.json says %s, but lm_head.weight differs from the embedding; "
                  "loading both, untied, as transformers does", source, said)
      return config.replace(tie_embeddings=False)
  if not config.tie_embeddings and not has_head:
    raise ValueError(f"{source}: config.json says {said}, but there is no lm_head.weight "
                     "(transformers would initialize the output layer at random). If the output "
                     "layer shares the embedding, set \"tie_word_embeddings\": true in config.json")
  return config


def load_from_tensors(hf_config: Mapping[str, Any], tensors: Mapping[str, Any], *,
                      mesh: Mesh | None = None, rules=None, param_dtype=None, compute_dtype=None,
                      source: str = "<tensors>", **config_overrides) -> Transformer:
  """A Transformer from an HF config dict and a name -> tensor mapping (read lazily, per slice)."""
  config = families.config_from_hf(hf_config, source=f"{source}/config.json",
                                   param_dtype=param_dtype, compute_dtype=compute_dtype,
                                   **config_overrides)
  config = _output_layer(config, hf_config, tensors, source)
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
  wanted = {k for hf_key, _ in expected.values() for k in _hf_keys(hf_key)}
  missing = sorted(wanted - present)
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                     f" required by {config.family} with {config.num_layers} layers")
  # Tied with an lm_head.weight left: _output_layer found it equal to the embedding.
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
    want_shape = tuple(math.prod(hf_sizes[s] for s in g) for g in layout.hf_dims)
    for key in _hf_keys(hf_key):
      if _shape_of(tensors[key]) != want_shape:
        raise ValueError(f"{source}: tensor {key!r} has shape {_shape_of(tensors[key])} but the"
                         f" config implies {want_shape} (for {name})")
    dtype = variable.dtype
    if isinstance(hf_key, tuple):  # stacked: block [layers, ...] = the listed layers' blocks
      def read(index, keys=hf_key, lay=layout, dt=dtype):
        layers = range(*index[0].indices(len(keys)))
        return np.stack([_read_block(tensors[keys[i]], lay, config, index[1:]).astype(dt)
                         for i in layers])
    else:
      read = lambda index, t=tensors[hf_key], lay=layout, dt=dtype: (
          _read_block(t, lay, config, index).astype(dt))
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
        weight_map = jsonl.read_json(index)["weight_map"]
      except (KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (no 'weight_map')") from e
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
  hf_config = jsonl.read_json(config_file)  # InputError names file:line; a BOM is accepted
  if not isinstance(hf_config, dict):
    raise ValueError(f"{config_file}: expected a JSON object, got {type(hf_config).__name__}")
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
              dtype: str | None = None, verify: bool = True) -> pathlib.Path:
  """Writes an HF directory (config.json, generation_config.json, safetensors, tokenizer).

  Atomic: everything is written to ``.<name>.tmp-export`` beside ``out_dir``, checked (``verify``:
  reloaded through ``load_hf`` and its logits on one batch compared with the in-memory model's,
  see ``verify_export``), then renamed into place. A crash leaves no ``out_dir`` or the previous
  complete one, never a half-written one; non-finite weights are refused (``ExportError``).
  """
  from safetensors.numpy import save_file
  import transformers

  config = model.config
  out = pathlib.Path(out_dir)
  tmp = out.parent / f".{out.name}.tmp-export"
  write = jax.process_index() == 0
  np_dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or config.param_dtype) == "bfloat16" else (
      np.dtype(dtype or config.param_dtype))
  expected = _expand(config)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    hf_key, layout = expected[_path_str(path)]
    host = _host_value(variable[...])
    # A stacked weight [Y, ...] is written as its Y per-layer HF tensors, slice i -> layer i.
    pieces = zip(hf_key, host) if isinstance(hf_key, tuple) else [(hf_key, host)]
    for key, piece in pieces:
      value = _to_hf_layout(piece, layout, config).astype(np_dtype)
      if not np.all(np.isfinite(value.astype(np.float32))):
        raise ExportError(f"export to {out}: weight {key} has non-finite values; refusing to"
                          " write it (the checkpoints still hold the last good weights)")
      if shards[-1] and sizes[-1] + value.nbytes > max_shard_bytes:
        shards.append({})
        sizes.append(0)
      shards[-1][key] = value
      sizes[-1] += value.nbytes
  if write:
    import shutil
    if tmp.exists():  # left by a crashed export
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    hf_config = families.config_to_hf(config, dtype=np_dtype.name)
    # Through transformers' own class so the file is canonical for the installed version.
    transformers.AutoConfig.for_model(**hf_config).save_pretrained(tmp)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config[k] is not None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if len(shards) == 1:
      save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
      weight_map = {}
      for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
      index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
  del shards
  _barrier(f"export_written_{out.name}")
  if verify:
    try:
      verify_export(model, tmp, export_dtype=np_dtype)
    except ExportError:
      _barrier(f"export_failed_{out.name}")
      if write:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
      raise
  if write:
    _replace_dir(tmp, out)
  _barrier(f"export_done_{out.name}")
  return out


class ExportError(RuntimeError):
  """An export that would not reproduce the model (or holds non-finite weights)."""


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _replace_dir(src: pathlib.Path, dest: pathlib.Path) -> None:
  """``src`` -> ``dest`` by renames: a crash leaves the old ``dest`` (or, between the two renames,
  none and the old one under ``.<name>.old-export``), never a mixture."""
  import os
  import shutil
  if dest.exists():
    old = dest.parent / f".{dest.name}.old-export"
    if old.exists():
      shutil.rmtree(old)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old)
  else:
    os.replace(src, dest)


def _mesh_of(model: Transformer) -> Mesh | None:
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
      return leaf.sharding.mesh
  return None


def export_tolerance(config: ModelConfig, logit_scale: float) -> float:
  """Largest |logit difference| between two fp32 evaluations of the SAME weights that differ
  only in summation order (e.g. sharded in memory vs. as reloaded).

  Error model: each matmul's fp32 accumulation over K terms carries a relative error ~ sqrt(K) u
  (u = 2^-24, random-walk rounding; K = the longest reduction, max(hidden, intermediate)); the
  2 * num_layers + 2 matmul stages (attention and MLP per block, plus embedding/unembedding)
  add up; relative to the logit scale. The factor 4 covers the constant of the sqrt(K) law.
  Any real defect of an export (a wrong mapping, a transposed or truncated tensor, a flipped
  exponent bit) moves logits by a fraction of the scale, orders of magnitude above this (tiny
  test model: ~8e-6 * scale; one weight tensor scaled by 1 + 1e-3 already exceeds it).
  """
  u = 2.0**-24
  depth = 2 * config.num_layers + 2
  k = max(config.hidden_size, config.intermediate_size)
  return 4.0 * u * depth * math.sqrt(k) * max(logit_scale, 1.0)


def verify_export(model: Transformer, directory, *, export_dtype=None, length: int = 32) -> float:
  """Reloads ``directory`` with ``load_hf`` (on the model's mesh) and compares the logits of one
  batch with ``model``'s; returns the max |difference|, raises ``ExportError`` beyond
  ``export_tolerance`` or on non-finite logits.

  Both sides run in fp32 compute, and the in-memory side uses its weights rounded to the export
  dtype (bf16 export: exactly the values the files hold), so the comparison sees only summation
  order, never the export's deliberate rounding: the bound stays tight for bf16 exports too.
  """
  import jax.numpy as jnp

  config = model.config
  mesh = _mesh_of(model)
  export_dtype = np.dtype(export_dtype or config.param_dtype)
  reloaded = load_hf(str(directory), mesh=mesh, param_dtype=config.param_dtype,
                     compute_dtype="float32", scan_layers=config.scan_layers)
  params = nnx.state(model, nnx.Param)
  if export_dtype != np.dtype(config.param_dtype):
    params = jax.tree.map(lambda x: x.astype(export_dtype).astype(x.dtype), params)
  fp32 = config.replace(compute_dtype="float32")
  graph_ref, _ = nnx.split(nnx.eval_shape(lambda: Transformer(fp32, rngs=nnx.Rngs(0))), nnx.Param)
  graph_new, params_new = nnx.split(reloaded, nnx.Param)
  n = min(length, config.max_position_embeddings)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, n), dtype=np.int32)
  positions = np.arange(n, dtype=np.int32)[None]
  segments = np.ones((1, n), np.int32)

  def compare(p_ref, p_new):
    a = nnx.merge(graph_ref, p_ref)(tokens, positions, segments)
    b = nnx.merge(graph_new, p_new)(tokens, positions, segments)
    finite = jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))
    return jnp.max(jnp.abs(a - b)), jnp.max(jnp.abs(a)), finite

  out_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
  diff, scale, finite = jax.device_get(jax.jit(compare, out_shardings=out_sh)(params, params_new))
  diff, scale = float(diff), float(scale)
  if not finite:
    raise ExportError(f"export {directory}: the weights give non-finite logits; not exported")
  tol = export_tolerance(config, scale)
  if not diff <= tol:
    raise ExportError(f"export {directory}: reloaded logits differ from the in-memory model's by"
                      f" {diff:.3e} (max |logit| {scale:.3g}, bound {tol:.3e} from fp32 roundoff x"
                      f" depth); the written files do not reproduce the model, so it was not"
                      " exported")
  return diff
