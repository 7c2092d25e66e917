"""ModelConfig: one frozen description of a decoder, shared by every family.

Family differences (biases, qk-norm, Gemma's quirks) are plain fields here; which values a family
takes, and how they map to and from an HF ``config.json``, lives in ``families.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from saro_jax.config import ATTENTION_IMPLS, CPU_GEMMS, DTYPES  # the config room owns the shared enums
from saro_jax.config import REMAT as REMAT_MODES

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
HIDDEN_ACTS = ("silu", "gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a decoder-only transformer (names follow HF where they exist)."""

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # HF's dict form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
  rope_scaling: Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  hidden_act: str = "silu"
  embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size), rounded to compute dtype.
  norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (1 + w) in fp32 before the cast.
  sliding_window: int | None = None  # Mistral: token i sees j iff i - j < sliding_window.
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "xla"
  # "mkl": fp32 projections (``transformer.dense``) through MKL's sgemm inside the program, on one
  # CPU device (cpu_gemm.py); "xla": XLA's own dots. Same products up to the GEMMs' summation order.
  cpu_gemm: str = "xla"
  # True: the decoder layers are one Block of stacked weights [num_layers, ...] run by lax.scan
  # (compile time flat in depth); False: a list of Blocks, unrolled. Same numbers either way.
  scan_layers: bool = False
  # Embedding / output rows are padded to a multiple of this (speed, even sharding); the padding is
  # zero, logits are sliced back to vocab_size and export strips it.
  vocab_padding_multiple: int = 1

  def __post_init__(self):
    # Frozen and hashable: nnx keeps the config in the static graph definition, which jit hashes.
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", _FrozenMapping(self.rope_scaling))
    if isinstance(self.eos_token_id, (list, tuple)):
      object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id))
    self._validate()

  def _validate(self):
    def bad(field, why):
      raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    if self.family not in FAMILIES:
      bad("family", f"unsupported; supported families: {', '.join(FAMILIES)}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "vocab_padding_multiple"):
      if int(getattr(self, field)) <= 0:
        bad(field, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"must divide num_heads={self.num_heads} (grouped-query attention)")
    if self.remat not in REMAT_MODES:
      bad("remat", f"must be one of {REMAT_MODES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"must be one of {ATTENTION_IMPLS}")
    if self.cpu_gemm not in CPU_GEMMS:
      bad("cpu_gemm", f"must be one of {CPU_GEMMS}")
    if not isinstance(self.scan_layers, bool):
      bad("scan_layers", "must be true or false")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in DTYPES:
        bad(field, f"must be one of {DTYPES}")
    if self.attention_impl == "cudnn" and self.compute_dtype == "float32":
      bad("attention_impl", '"cudnn" (cuDNN\'s fused attention) takes bf16/fp16 compute only;'
          ' set compute_dtype="bfloat16", or attention_impl="auto"')
    if self.attention_impl == "cpu_flash" and self.compute_dtype != "float32":
      bad("attention_impl", '"cpu_flash" (PyTorch\'s CPU flash attention) computes in float32;'
          ' set attention_impl="xla"')
    if self.hidden_act not in HIDDEN_ACTS:
      bad("hidden_act", f"must be one of {HIDDEN_ACTS}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      bad("sliding_window", "must be positive or None")

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_padding_multiple
    return -(-self.vocab_size // m) * m

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
    d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}; known: {sorted(names)}")
    return cls(**d)


class _FrozenMapping(Mapping):
  """A read-only, hashable dict (rope_scaling) so ModelConfig stays hashable."""

  def __init__(self, items: Mapping[str, Any]):
    self._d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(items).items()}

  def __getitem__(self, key):
    return self._d[key]

  def __iter__(self):
    return iter(self._d)

  def __len__(self):
    return len(self._d)

  def __hash__(self):
    return hash(tuple(sorted(self._d.items())))

  def __eq__(self, other):
    return isinstance(other, Mapping) and dict(self._d) == dict(other)

  def __repr__(self):
    return repr(self._d)
