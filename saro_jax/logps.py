"""Per-sequence log-probs of preference pairs: the policy's forward in the SRPO loss and the
reference's forward (stages/reference.py) are this one function.

Two row layouts (``dpo.prefix_sharing``):
  pairs  chosen and rejected rows stacked into one forward of 2B rows (``PAIR_KEYS``)
  trees  token trees: one pair ``[shared | chosen | rejected]`` or, with ``dpo.share_prompts``,
         all the pairs of one prompt; several per row with ``dpo.pairs_per_row`` (``TREE_KEYS``;
         see ``data.batching.prompt_tree`` and ``tree_rows``)
Outputs are per-sequence SUMS (log-probs, completion lengths, per-token mean logits).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from saro_jax import losses
from saro_jax.data import batching

PAIR_KEYS = tuple(f"{side}_{name}" for side in ("chosen", "rejected")
                  for name in ("tokens", "positions", "segment_ids", "loss_mask"))
TREE_KEYS = batching.TREE_KEYS + batching.SPAN_KEYS  # the batcher's [rows, L] keys and spans


def input_keys(prefix_sharing: bool) -> tuple[str, ...]:
  """The batch entries the SRPO step and the reference forward read (all 2-D: [rows, L], the
  trees' spans [rows, pairs_per_row])."""
  return TREE_KEYS if prefix_sharing else PAIR_KEYS


def pair_logps(model: nnx.Module, batch: Mapping[str, jax.Array], *, vocab_size: int,
               chunk_size: int, keep_logits: bool = False) -> dict[str, jax.Array]:
  """Chosen and rejected in ONE forward of 2B rows: summed completion log-probs [B], completion
  lengths [B] and summed per-token mean logits [B] (TRL's ``logits/*``).

  A prefix-shared batch (it has ``subtree_end``) goes to ``tree_pair_logps``; its outputs are
  [rows * P] for P pair slots per row (pair slot k of row r at r * P + k; empty slots have
  lengths 0). ``keep_logits``: ``losses.token_logps_and_mean_logits``' (a policy's forward
  under a gradient; ``train.logps_keep_logits``)."""
  if "subtree_end" in batch:
    return tree_pair_logps(model, batch, vocab_size=vocab_size, chunk_size=chunk_size,
                           keep_logits=keep_logits)
  both = {name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
          for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  hidden_2BxLxD = model.hidden_states(both["tokens"], both["positions"], both["segment_ids"])
  targets_2BxL, mask_2BxL = losses.shift_targets(both["tokens"], both["loss_mask"],
                                                 both["segment_ids"])
  logps_2BxL, mean_logits_2BxL = losses.token_logps_and_mean_logits(
      hidden_2BxLxD, model.unembed_DxV(), targets_2BxL, vocab_size=vocab_size,
      chunk_size=chunk_size, mask_BxL=mask_2BxL, keep_logits=keep_logits)
  logps_2B, lengths_2B = losses.sequence_sums(logps_2BxL, mask_2BxL)
  logit_sums_2B, _ = losses.sequence_sums(mean_logits_2BxL, mask_2BxL)
  b = batch["chosen_tokens"].shape[0]
  out = {}
  for i, side in enumerate(("chosen", "rejected")):
    rows = slice(i * b, (i + 1) * b)
    out[f"{side}_logps"] = logps_2B[rows]
    out[f"{side}_lengths"] = lengths_2B[rows]
    out[f"{side}_logit_sums"] = logit_sums_2B[rows]
  return out


def tree_pair_logps(model: nnx.Module, batch: Mapping[str, jax.Array], *, vocab_size: int,
                    chunk_size: int, keep_logits: bool = False) -> dict[str, jax.Array]:
  """``pair_logps`` for prefix-shared rows: ONE forward of R rows of token trees (up to P pairs
  per row, the spans' width), every common prefix computed once.

  Each token is scored from the hidden state of its parent in the tree (``source``), the token
  before it in each of its own sequences: a branch's first token from the last shared token,
  exactly as in the unshared row. The hidden states are gathered to the target slots (a
  [R, L, D] copy, small next to the log-prob matmul), so one chunked log-prob pass serves every
  sequence, and each sequence sums its own path's span (``losses.span_sums``).
  """
  hidden_RxLxD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                     batch["subtree_end"])
  source_hidden_RxLxD = jnp.take_along_axis(hidden_RxLxD, batch["source"][..., None], axis=1)
  mask_RxL = batch["loss_mask"]
  logps_RxL, mean_logits_RxL = losses.token_logps_and_mean_logits(
      source_hidden_RxLxD, model.unembed_DxV(), batch["tokens"], vocab_size=vocab_size,
      chunk_size=chunk_size, mask_BxL=mask_RxL, keep_logits=keep_logits)
  out = {}
  for side in ("chosen", "rejected"):
    sums = lambda values_RxL: losses.span_sums(values_RxL, batch["subtree_end"],
                                               batch[f"{side}_first"], batch[f"{side}_last"])
    logps_RxT, lengths_RxT = sums(logps_RxL)
    logit_sums_RxT, _ = sums(mean_logits_RxL)
    out[f"{side}_logps"] = logps_RxT.reshape(-1)
    out[f"{side}_lengths"] = lengths_RxT.reshape(-1)
    out[f"{side}_logit_sums"] = logit_sums_RxT.reshape(-1)
  return out
