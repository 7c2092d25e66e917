"""The training stages' view of the data pipeline: config -> this process's batch iterator."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from saro_jax.config import StageConfig
from saro_jax.data import pipeline

log = logging.getLogger(__name__)


def _batches(kind: str, cfg: StageConfig, tokenizer, data_state: Any, **overrides):
  it = pipeline.batches_from_config(kind, cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                                    seed=cfg.seed, **overrides)
  if data_state is not None:
    it.set_state(data_state)
  return it


def sft_batches(cfg: StageConfig, tokenizer, data_state: Any = None) -> pipeline.BatchIterator:
  return _batches("sft", cfg, tokenizer, data_state)


def _dpo_layout(cfg: StageConfig) -> dict:
  dpo = cfg.dpo
  if dpo is None or not dpo.prefix_sharing:
    return {}
  return {"prefix_sharing": True, "pairs_per_row": dpo.pairs_per_row}


def dpo_batches(cfg: StageConfig, tokenizer, data_state: Any = None) -> pipeline.BatchIterator:
  return _batches("dpo", cfg, tokenizer, data_state, **_dpo_layout(cfg))


def one_epoch_dpo_batches(cfg: StageConfig, tokenizer) -> Iterator[dict]:
  """Every pair of this process's shard at least once, in a number of batches that is the same on
  every process (the reference forward is one global computation): ceil(records / batch) + 1
  batches of the unshuffled, repeated stream (the +1 covers the last partial batch, which the
  DPO batcher would otherwise drop)."""
  it = _batches("dpo", cfg, tokenizer, None, shuffle=False, num_epochs=0, **_dpo_layout(cfg))
  records = int(it.stats.counts.get("source/kept", 0))
  if records <= 0:
    raise ValueError(f"data {cfg.data.sources}: the source reported no records")
  for _ in range(math.ceil(records / cfg.train.batch_size) + 1):
    yield next(it)


def select(batches: Iterator[Mapping[str, Any]], keys: Sequence[str]) -> Iterator[dict]:
  for batch in batches:
    yield {k: batch[k] for k in keys}


def log_stats(batches: pipeline.BatchIterator, workdir: str) -> dict:
  """Logs the data counts (dropped / truncated / packing fill) and writes data_stats.json."""
  stats = batches.stats.as_dict()
  if stats.get("dropped"):
    log.warning("data: dropped %d examples: %s", stats["dropped"],
                {k: v for k, v in stats.items() if k.startswith("dropped/")})
  skipped = {k: v for k, v in stats.items() if k.startswith("source/skipped")}
  if skipped:
    log.warning("data: skipped bad records %s", skipped)
  log.info("data stats: %s", stats)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump(stats, f, indent=2, sort_keys=True)
  return stats
