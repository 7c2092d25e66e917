"""The model layer: the decoder, and everything about its weights (``load.py``).

  model = models.load("smollm2")                # or any init_from a config accepts
  tokenizer = models.load_tokenizer("smollm2")
  logits_BxLxV = models.forward(model, tokens_BxL, attention_mask=mask_BxL)
  models.export(model, tokenizer, "out/hf")
"""

from saro_jax.models.config import ModelConfig
from saro_jax.models.inputs import forward, positions_and_segments
from saro_jax.models.load import (Spec, abstract_model, abstract_params, as_spec, export,
                                  init_random, load, load_tokenizer, lora_base, lora_config,
                                  lora_record, merge, random_config, random_model_config,
                                  spec_changes, split, tokenizer_source, weights_path)
from saro_jax.models.transformer import Cache, Transformer

__all__ = ["Cache", "ModelConfig", "Spec", "Transformer", "abstract_model", "abstract_params",
           "as_spec", "export", "forward", "init_random", "load", "load_tokenizer", "lora_base",
           "lora_config", "lora_record", "merge",
           "positions_and_segments", "random_config", "split", "tokenizer_source", "weights_path"]
