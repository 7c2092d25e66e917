"""Per-family differences as data, and HF ``config.json`` <-> ``ModelConfig``.

Adding a family = one row in ``FAMILIES`` (plus, if its weights are named differently, one mapping
table in ``hf.py``). The decoder itself never branches on the family name, only on config fields.

A key absent from ``config.json`` takes the default of the family's transformers config class
(read at load time, offline), so a checkpoint means here what it means in transformers: e.g.
Qwen3 without ``tie_word_embeddings`` is untied, Mistral without ``sliding_window`` has a 4096
window, Qwen3 / Gemma without ``head_dim`` use 128 / 256 (not hidden_size // heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import transformers

from saro_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_type: str  # HF config.json "model_type"
  architecture: str  # HF config.json "architectures"[0]
  qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 always; no o_proj bias)
  qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
  embed_scale: bool  # embeddings * sqrt(hidden) (Gemma)
  norm_offset: float  # RMSNorm scale is (offset + w) (Gemma: 1.0)
  uses_sliding_window: bool  # honours config "sliding_window" on every layer (Mistral)
  gelu_means_tanh: bool = False  # Gemma's released configs say "gelu" but mean the tanh form


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False, embed_scale=False,
           norm_offset=0.0, uses_sliding_window=False),
    Family("mistral", "mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False,
           embed_scale=False, norm_offset=0.0, uses_sliding_window=True),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, embed_scale=False,
           norm_offset=0.0, uses_sliding_window=False),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, embed_scale=False,
           norm_offset=0.0, uses_sliding_window=False),
    Family("gemma", "gemma", "GemmaForCausalLM", qkv_bias=False, qk_norm=False, embed_scale=True,
           norm_offset=1.0, uses_sliding_window=False, gelu_means_tanh=True),
)}

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}

# HF activation names -> ours (ModelConfig.hidden_act).
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def supported() -> str:
  return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def family_of(hf_config: Mapping[str, Any], *, source: str = "config.json") -> Family:
  """The family of an HF config, by model_type (or architectures); unknown -> clear error."""
  model_type = hf_config.get("model_type")
  if model_type in _BY_MODEL_TYPE:
    return _BY_MODEL_TYPE[model_type]
  for arch in hf_config.get("architectures") or ():
    if arch in _BY_ARCHITECTURE:
      return _BY_ARCHITECTURE[arch]
  raise ValueError(
      f"{source}: unsupported architecture (model_type={model_type!r}, architectures="
      f"{hf_config.get('architectures')!r}); supported: {supported()}")


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling) from either the legacy keys or transformers v5 "rope_parameters"."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = dict(hf.get("rope_scaling") or {}) or params
  scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  scaling["rope_type"] = rope_type
  scaling.pop("type", None)
  return float(theta), scaling


def transformers_config(hf: Mapping[str, Any], *, source: str = "config.json"
                        ) -> transformers.PretrainedConfig:
  """The HF dict read by its family's transformers config class: every absent key gets the value
  transformers would use (the class's default, or its derivation, e.g. head_dim)."""
  fam = family_of(hf, source=source)
  kwargs = {k: v for k, v in hf.items() if k != "model_type"}
  try:
    return transformers.AutoConfig.for_model(fam.model_type, **kwargs)
  except Exception as e:  # transformers validates values; say which file it refused
    raise ValueError(f"{source}: transformers' {fam.model_type} config class refuses it "
                     f"({type(e).__name__}: {e})") from e


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict; ``overrides`` (e.g. dtypes) win over the file.

  The shape fields below (``need``) must be present; every other absent key takes transformers'
  default for the family (see the module docstring). Token ids are taken as written.
  """
  fam = family_of(hf, source=source)
  resolved = transformers_config(hf, source=source)

  def need(key):
    if key not in hf or hf[key] is None:
      raise ValueError(f"{source}: missing field {key!r} required for {fam.name}")
    return hf[key]

  def get(key, default=None):
    value = getattr(resolved, key, None)
    return default if value is None else value

  def refuse(cond, field, why):
    if cond:
      raise ValueError(f"{source}: field {field!r}={get(field)!r} is not supported for "
                       f"{fam.name}: {why}")

  refuse(bool(get("attention_bias")) and not fam.qkv_bias, "attention_bias",
         "o_proj bias is not implemented")
  refuse(bool(get("mlp_bias")), "mlp_bias", "MLP biases are not implemented")
  refuse(bool(get("use_sliding_window")), "use_sliding_window",
         "per-layer sliding windows are not implemented")
  refuse(float(get("partial_rotary_factor", 1.0)) != 1.0, "partial_rotary_factor",
         "partial RoPE is not implemented")
  act_name = get("hidden_act", "silu")
  if fam.gelu_means_tanh and act_name == "gelu":
    act_name = "gelu_pytorch_tanh"
  refuse(act_name not in _ACT_FROM_HF, "hidden_act", f"supported: {sorted(_ACT_FROM_HF)}")

  num_heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  theta, scaling = _rope_from_hf({"rope_parameters": get("rope_parameters")} if get("rope_parameters")
                                 else hf)
  if scaling is not None and scaling["rope_type"] not in ("linear", "llama3"):
    raise ValueError(f"{source}: rope scaling rope_type={scaling['rope_type']!r} is not supported;"
                     " supported: default, linear, llama3")
  fields = dict(
      family=fam.name,
      vocab_size=int(need("vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(need("intermediate_size")),
      num_layers=int(need("num_hidden_layers")),
      num_heads=num_heads,
      num_kv_heads=int(get("num_key_value_heads", num_heads)),
      head_dim=int(get("head_dim", hidden // num_heads)),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      attention_bias=fam.qkv_bias,
      qk_norm=fam.qk_norm,
      hidden_act=_ACT_FROM_HF[act_name],
      embed_scale=fam.embed_scale,
      norm_offset=fam.norm_offset,
      sliding_window=(int(get("sliding_window")) if fam.uses_sliding_window
                      and get("sliding_window") else None),
      max_position_embeddings=int(get("max_position_embeddings", 4096)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"),
  )
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype in ("float32", "bfloat16", "float16"):
    fields["param_dtype"] = dtype
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """An HF config.json dict that transformers loads into the family's *ForCausalLM."""
  fam = FAMILIES[config.family]
  if config.attention_bias != fam.qkv_bias or config.qk_norm != fam.qk_norm or (
      config.embed_scale != fam.embed_scale or config.norm_offset != fam.norm_offset):
    raise ValueError(f"export: ModelConfig flags do not match HF family {fam.name!r} "
                     "(attention_bias / qk_norm / embed_scale / norm_offset differ); "
                     "no transformers class implements this combination")
  if config.sliding_window is not None and not fam.uses_sliding_window:
    raise ValueError(f"export: sliding_window is only exported for mistral, not {fam.name}")
  rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
  if config.rope_scaling is not None:
    rope = {**dict(config.rope_scaling), "rope_theta": float(config.rope_theta)}
  eos = config.eos_token_id
  hf = {
      "architectures": [fam.architecture],
      "model_type": fam.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": _ACT_TO_HF[config.hidden_act],
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": rope,
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
      "pad_token_id": config.pad_token_id,
      "dtype": dtype or config.param_dtype,
  }
  if fam.model_type in ("llama", "qwen3", "gemma"):
    hf["attention_bias"] = False
  if fam.model_type == "mistral":
    hf["sliding_window"] = config.sliding_window
  if fam.model_type in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = False
  return hf
