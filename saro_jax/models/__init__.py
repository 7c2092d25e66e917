"""The model layer: build a decoder at random, or load one from an HF directory or a GGUF file.

``init_random`` and every loader place weights on the mesh without ever holding a full copy on one
device: shapes come from ``nnx.eval_shape``, shardings from the weights' logical names, and values
from a jitted init (or, for checkpoints, from per-device slices read straight from disk).
"""

from __future__ import annotations

import os

import jax
from flax import nnx
from jax.sharding import Mesh

from saro_jax import sharding
from saro_jax.models.config import ModelConfig
from saro_jax.models.transformer import Cache, Transformer

__all__ = ["Cache", "ModelConfig", "Transformer", "init_random", "load", "load_tokenizer"]


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves (no memory), for shapes, shardings and loading."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def init_random(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None,
                rules=None) -> Transformer:
  """A randomly initialised model, its weights sharded on ``mesh`` (one device if None)."""
  graphdef, abstract_state = nnx.split(abstract_model(config))
  out_shardings = None if mesh is None else sharding.state_shardings(abstract_state, mesh, rules)

  def make_state():
    return nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))

  return nnx.merge(graphdef, jax.jit(make_state, out_shardings=out_shardings)())


def load(init_from: str, *, mesh: Mesh | None = None, rules=None, param_dtype=None,
         compute_dtype=None, allow_pickle: bool = False) -> Transformer:
  """A model from a ``.gguf`` file, a local HF directory, or an HF hub id."""
  kw = dict(mesh=mesh, rules=rules, param_dtype=param_dtype, compute_dtype=compute_dtype)
  if str(init_from).endswith(".gguf"):
    from saro_jax.models import gguf
    return gguf.load_gguf(init_from, **kw)
  from saro_jax.models import hf
  return hf.load_hf(init_from, allow_pickle=allow_pickle, **kw)


def load_tokenizer(init_from: str):
  """The tokenizer that goes with ``init_from`` (HF dir / hub id / .gguf file)."""
  if str(init_from).endswith(".gguf"):
    from saro_jax.models import gguf
    return gguf.gguf_tokenizer(init_from)
  import transformers
  if not os.path.isdir(init_from) and os.path.exists(init_from):
    raise ValueError(f"load_tokenizer: {init_from} is a file but neither a .gguf nor an HF directory")
  return transformers.AutoTokenizer.from_pretrained(init_from)
