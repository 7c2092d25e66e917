"""Per-sequence log-probs of preference pairs: the policy's forward in the SRPO loss and the
reference's forward (stages/reference.py) are this one function.

Two row layouts (``dpo.prefix_sharing``):
  pairs  chosen and rejected rows stacked into one forward of 2B rows (``PAIR_KEYS``)
  trees  one row ``[shared | chosen | rejected]`` per pair, several per row with
         ``dpo.pairs_per_row`` (``TREE_KEYS``; see ``data.batching.tree_rows``)
Outputs are per-sequence SUMS (log-probs, completion lengths, per-token mean logits).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from saro_jax import losses

PAIR_KEYS = tuple(f"{side}_{name}" for side in ("chosen", "rejected")
                  for name in ("tokens", "positions", "segment_ids", "loss_mask"))
TREE_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "loss_mask")


def input_keys(prefix_sharing: bool) -> tuple[str, ...]:
  """The batch entries the SRPO step and the reference forward read (all [rows, L])."""
  return TREE_KEYS if prefix_sharing else PAIR_KEYS


def pair_logps(model: nnx.Module, batch: Mapping[str, jax.Array], *, vocab_size: int,
               chunk_size: int, trees: int = 1) -> dict[str, jax.Array]:
  """Chosen and rejected in ONE forward of 2B rows: summed completion log-probs [B], completion
  lengths [B] and summed per-token mean logits [B] (TRL's ``logits/*``).

  A prefix-shared batch (it has ``branch_ids``) goes to ``tree_pair_logps``; its outputs are
  [rows * trees] (tree slot k of row r at r * trees + k; empty slots have lengths 0)."""
  if "branch_ids" in batch:
    return tree_pair_logps(model, batch, vocab_size=vocab_size, chunk_size=chunk_size,
                           trees=trees)
  both = {name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
          for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  hidden_2BxLxD = model.hidden_states(both["tokens"], both["positions"], both["segment_ids"])
  targets_2BxL, mask_2BxL = losses.shift_targets(both["tokens"], both["loss_mask"],
                                                 both["segment_ids"])
  logps_2BxL, mean_logits_2BxL = losses.token_logps_and_mean_logits(
      hidden_2BxLxD, model.unembed_DxV(), targets_2BxL, vocab_size=vocab_size,
      chunk_size=chunk_size, mask_BxL=mask_2BxL)
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
                    chunk_size: int, trees: int) -> dict[str, jax.Array]:
  """``pair_logps`` for prefix-shared rows: ONE forward of R rows ``[shared | chosen | rejected]``
  (up to ``trees`` per row), the shared part computed once.

  Each completion token is scored from the hidden state of its predecessor in ITS OWN sequence
  (``losses.tree_targets``): rejected's first token from the trunk's last token, exactly as in the
  unshared row. The hidden states are gathered to the target positions (a [R, L, D] copy, small
  next to the log-prob matmul), so one chunked log-prob pass serves both branches.
  """
  hidden_RxLxD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                     batch["branch_ids"])
  source_RxL, mask_RxL = losses.tree_targets(batch["loss_mask"], batch["segment_ids"],
                                             batch["branch_ids"])
  source_hidden_RxLxD = jnp.take_along_axis(hidden_RxLxD, source_RxL[..., None], axis=1)
  logps_RxL, mean_logits_RxL = losses.token_logps_and_mean_logits(
      source_hidden_RxLxD, model.unembed_DxV(), batch["tokens"], vocab_size=vocab_size,
      chunk_size=chunk_size, mask_BxL=mask_RxL)
  out = {}
  for branch, side in ((1, "chosen"), (2, "rejected")):
    sums = lambda values_RxL: losses.tree_sums(values_RxL, mask_RxL, batch["segment_ids"],
                                               batch["branch_ids"], branch, trees)
    logps_RxT, lengths_RxT = sums(logps_RxL)
    logit_sums_RxT, _ = sums(mean_logits_RxL)
    out[f"{side}_logps"] = logps_RxT.reshape(-1)
    out[f"{side}_lengths"] = lengths_RxT.reshape(-1)
    out[f"{side}_logit_sums"] = logit_sums_RxT.reshape(-1)
  return out
