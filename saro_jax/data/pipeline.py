"""Records -> batches on this host: the grain pipelines of the RW (SFT) and SRPO (DPO) stages.

  records (sources.open_source, or a MapDataset given by the caller)
    -> (SRPO with share_prompts) groups of the records of one prompt, in first-seen order; from
       here on a group is one element
    -> this process's fixed share [process_index::process_count], equal sizes (the last
       n % process_count records are left out and counted)
    -> shuffle the share, reshuffled every epoch -> repeat(num_epochs; 0 = forever)
    -> tokenize (chat template, masks, truncation)          (tokenize.py)
    -> pack / pad into batch_size // process_count rows    (batching.py)
    -> optional multiprocess prefetch
    -> BatchIterator: yields batch dicts, keeps DataStats, get_state()/set_state() for checkpoints

Everything before the iterator is a deterministic function of (records, seed, process_index,
process_count), so restoring a saved state replays exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from saro_jax.data import batching, formats, sources, tokenize


class DataStats:
  """Running counts of one pipeline, for the run log.

  Keys: ``examples`` (in batches; prefix-shared DPO: trees), ``pairs`` (prefix-shared DPO),
  ``dropped/<why>``, ``truncated/<what>``, ``rows``, ``slots`` (rows x length), ``tokens``
  (real), ``loss_tokens``, ``source/<count>`` (from the sources).
  ``as_dict()`` adds ``fill`` = tokens / slots (the packing efficiency).
  """

  def __init__(self, counts: Mapping[str, int] | None = None):
    self.counts: collections.Counter = collections.Counter(counts or {})

  def update(self, delta: Mapping[str, int]) -> None:
    self.counts.update(delta)

  @property
  def dropped(self) -> int:
    return sum(v for k, v in self.counts.items() if k.startswith("dropped/"))

  def as_dict(self) -> dict[str, float]:
    out = {k: int(v) for k, v in sorted(self.counts.items())}
    out["dropped"] = self.dropped
    out["fill"] = self.counts["tokens"] / self.counts["slots"] if self.counts["slots"] else 0.0
    return out


class BatchIterator:
  """Yields batch dicts (NumPy); ``stats`` counts what went in; state is JSON-serializable."""

  def __init__(self, inner: grain.DatasetIterator, stats: DataStats):
    self._inner = inner
    self.stats = stats

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    batch, counts = next(self._inner)
    self.stats.update(counts)
    return batch

  def get_state(self) -> dict[str, Any]:
    """Save with the checkpoint; the stats travel along so logged totals survive a resume."""
    return {"grain": self._inner.get_state(), "stats": dict(self.stats.counts)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._inner.set_state(state["grain"])
    self.stats.counts = collections.Counter(state.get("stats", {}))

  def close(self) -> None:
    close = getattr(self._inner, "close", None)
    if close is not None:
      close()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only here: the pipeline itself needs no accelerator
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def _records(spec, kind: str, on_error: str, reasoning_tags, stats: DataStats) -> grain.MapDataset:
  if isinstance(spec, grain.MapDataset):
    return spec
  specs = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
  if not specs:
    raise ValueError("data sources are empty; give a path, hf:..., tfds:... or bundled:<name>")
  counts: dict[str, Any] = {}
  ds = sources.open_source(specs, kind=kind, on_error=on_error, reasoning_tags=reasoning_tags,
                           stats=counts)
  for k, v in counts.items():
    if isinstance(v, Mapping):
      stats.update({f"source/skipped/{r}": n for r, n in v.items()})
    else:
      stats.update({f"source/{k}": int(v)})
  return ds


class _Share(Sequence):
  """Records at fixed indices of a parent dataset: the share is a plain source, so the per-epoch
  reseeding of grain's ``repeat`` (which folds the epoch into every upstream shuffle) cannot
  move records between processes."""

  def __init__(self, records: grain.MapDataset, indices: np.ndarray):
    self._records, self._indices = records, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._records[int(self._indices[i])]


class _Groups(Sequence):
  """Lists of records at fixed index groups of a parent dataset (a plain source, as ``_Share``)."""

  def __init__(self, records: grain.MapDataset, groups: list[list[int]]):
    self._records, self._groups = records, groups

  def __len__(self) -> int:
    return len(self._groups)

  def __getitem__(self, i):
    return [self._records[j] for j in self._groups[i]]


def _by_prompt(records: grain.MapDataset) -> grain.MapDataset:
  """The records grouped by prompt (the messages before the completion), groups in the order of
  their first record, records in reading order: reads every record once to build the index."""
  groups: dict[str, list[int]] = {}
  for i in range(len(records)):
    key = json.dumps(records[i]["prompt"], sort_keys=True, ensure_ascii=False)
    groups.setdefault(key, []).append(i)
  return grain.MapDataset.source(_Groups(records, list(groups.values())))


def _shard(records: grain.MapDataset, *, process_index: int, process_count: int,
           stats: DataStats) -> grain.MapDataset:
  """This process's fixed share of the records: ``[process_index::process_count]``, equal sizes.

  The share depends on nothing but the process index and count (not on the seed, nor on whether
  the stream is shuffled), so a per-process pass such as the SRPO reference log-probs (unshuffled)
  covers exactly what the shuffled training stream on that process will see, in every epoch.
  The ``n % process_count`` last records are left out (equal shares keep hosts in step) and counted.
  """
  n = len(records)
  if n < process_count:
    raise ValueError(f"data: {n} records cannot be shared by {process_count} processes")
  per_process = n // process_count
  if n % process_count:
    stats.update({"dropped/process_remainder": n % process_count})
  indices = np.arange(process_index, per_process * process_count, process_count)
  return grain.MapDataset.source(_Share(records, indices))


def _tokenized(records: grain.MapDataset, tokenize_fn, *, shuffle: bool, seed: int,
               num_epochs: int, read_threads: int) -> grain.IterDataset:
  ds = records.shuffle(seed % 2**32) if shuffle else records
  # shuffle before repeat: grain reshuffles each epoch with the seed folded with the epoch.
  ds = ds.repeat(num_epochs if num_epochs > 0 else None)
  ds = ds.map(tokenize_fn)
  # HF tokenizers are not safe to call from several threads at once (and chat templates are
  # Python): parallelism comes from prefetch worker processes instead.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(1, 4 * read_threads)))


def _host_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) is not divisible by process_count={process_count}")
  return batch_size // process_count


def _finish(batches: grain.IterDataset, stats: DataStats, prefetch_workers: int) -> BatchIterator:
  if prefetch_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside an absl app (library use, tests) take the defaults.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=prefetch_workers))
  return BatchIterator(iter(batches), stats)


_TOKENIZE = {"rw": tokenize.tokenize_rw, "preference": tokenize.tokenize_pref}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """The keyword options ``sft_batches`` and ``dpo_batches`` share: one name, one default each
  (the tokenizer's come from ``tokenize.TokenizeOptions``; ``config.DataConfig`` takes them all
  from here)."""
  batch_size: int  # GLOBAL rows (RW) / pairs, or rows with packed DPO trees, per step
  max_length: int
  shuffle: bool = True
  seed: int = 0
  num_epochs: int = 0  # 0 = repeat forever
  on_error: str = "raise"  # a bad record: "raise" or "skip" (counted)
  reasoning_tags: Sequence[str] = formats.DEFAULT_TAGS
  # prompts over max_prompt_length: keep_end | keep_start | drop
  truncation: str = tokenize.TokenizeOptions.prompt_truncation
  max_prompt_length: int = tokenize.TokenizeOptions.max_prompt_length  # 0 = no prompt limit
  # completions past max_length: cut | drop
  response_truncation: str = tokenize.TokenizeOptions.response_truncation
  min_response_tokens: int = tokenize.TokenizeOptions.min_response_tokens
  length_buckets: Sequence[int] = ()  # () = every batch is max_length long; else ends at it
  # Packed rows (packed RW, pairs_per_row > 1) choose from examples worth this many batches of
  # tokens, largest first; 0 = greedy in reading order (batching._BatchIterator).
  pack_window: float = batching.PACK_WINDOW
  process_index: int | None = None  # None = this JAX process
  process_count: int | None = None
  drop_remainder: bool = False  # a last partial batch: dropped, or padded with empty rows
  read_threads: int = 0  # grain read threads (0 = read in the calling thread)
  prefetch_workers: int = 0  # > 0: grain worker processes


def _examples(kind: str, sources_spec, tokenizer, o: PipelineOptions, share_prompts: bool = False):
  """Records of ``kind`` (``share_prompts``: groups of one prompt's records) -> this process's
  share -> tokenized examples (both entry points); returns (examples, stats, the batch datasets'
  shared keyword arguments)."""
  process_index, process_count = _process(o.process_index, o.process_count)
  _check_buckets(o.length_buckets, process_count)
  stats = DataStats()
  records = _records(sources_spec, kind, o.on_error, o.reasoning_tags, stats)
  if share_prompts:
    records = _by_prompt(records)
  records = _shard(records, process_index=process_index, process_count=process_count, stats=stats)
  opts = tokenize.TokenizeOptions(
      max_length=o.max_length, max_prompt_length=o.max_prompt_length,
      prompt_truncation=o.truncation, response_truncation=o.response_truncation,
      min_response_tokens=o.min_response_tokens)
  fn = functools.partial(tokenize.tokenize_pref_group if share_prompts else _TOKENIZE[kind],
                         tokenizer=tokenizer, opts=opts,
                         specials=tokenize.special_ids(tokenizer))
  examples = _tokenized(records, fn, shuffle=o.shuffle, seed=o.seed, num_epochs=o.num_epochs,
                        read_threads=o.read_threads)
  common = dict(batch_size=_host_batch(o.batch_size, process_count), max_length=o.max_length,
                pad_id=_pad_id(tokenizer), length_buckets=o.length_buckets,
                drop_remainder=o.drop_remainder, records_per_pass=len(records),
                source_name=_name(sources_spec), pack_window=o.pack_window)
  return examples, stats, common


def sft_batches(sources_spec: str | Sequence[str] | grain.MapDataset, tokenizer, *,
                pack: bool = True, **options) -> BatchIterator:
  """RW batches for this process: dicts of int32 [batch_size // process_count, L] arrays
  ``tokens``, ``positions``, ``segment_ids``, ``loss_mask`` (L = max_length or a length bucket).
  ``options``: the fields of :class:`PipelineOptions` (``batch_size`` and ``max_length`` required)."""
  o = PipelineOptions(**options)
  examples, stats, common = _examples("rw", sources_spec, tokenizer, o)
  return _finish(batching.SftBatchDataset(examples, pack=pack, **common), stats, o.prefetch_workers)


def dpo_batches(sources_spec: str | Sequence[str] | grain.MapDataset, tokenizer, *,
                prefix_sharing: bool = False, pairs_per_row: int = 1, share_prompts: bool = False,
                **options) -> BatchIterator:
  """SRPO batches for this process: ``chosen_*`` / ``rejected_*`` (tokens, positions, segment_ids,
  loss_mask; int32 [B, L]), ``shared_len`` int32 [B], ``example_id`` int64 [B].
  ``options``: the fields of :class:`PipelineOptions` (``batch_size`` and ``max_length`` required).

  ``prefix_sharing``: prefix-shared rows instead (``batching.tree_rows``: ``tokens``,
  ``positions``, ``segment_ids``, ``subtree_end``, ``source``, ``loss_mask`` [B, L]; the spans
  ``chosen_first`` ... ``rejected_last``, ``shared_len``, ``example_id`` [B, pairs_per_row]);
  ``pairs_per_row > 1`` packs several pairs per row, and ``batch_size`` then counts rows.
  ``share_prompts`` (needs ``pairs_per_row > 1``) puts the pairs of one prompt in one token tree
  (several trees when they exceed ``max_length`` or ``pairs_per_row``); the shuffle then moves
  whole prompts. Pairs longer than ``max_length`` are
  cut or dropped by ``response_truncation``."""
  if pairs_per_row > 1 and not prefix_sharing:
    raise ValueError(f"pairs_per_row={pairs_per_row} needs prefix_sharing=True")
  if share_prompts and pairs_per_row < 2:
    raise ValueError("share_prompts needs prefix_sharing=True and pairs_per_row > 1")
  o = PipelineOptions(**options)
  examples, stats, common = _examples("preference", sources_spec, tokenizer, o, share_prompts)
  if prefix_sharing:
    batches = batching.DpoTreeBatchDataset(examples, pairs_per_row=pairs_per_row,
                                           truncation=o.response_truncation, **common)
  else:
    batches = batching.DpoBatchDataset(examples, **common)
  return _finish(batches, stats, o.prefetch_workers)


def batches_from_config(kind: str, data, tokenizer, *, batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        **overrides) -> BatchIterator:
  """``kind`` "sft" | "dpo" from a ``config.DataConfig`` (or any object with its field names)."""
  # Every PipelineOptions field the data section carries (batch size, seed, process come from
  # the training sections and the runtime).
  keys = [f.name for f in dataclasses.fields(PipelineOptions)
          if f.name not in ("batch_size", "seed", "process_index", "process_count")]
  kw = {k: getattr(data, k) for k in keys if getattr(data, k, None) is not None}
  kw["reasoning_tags"] = tuple(kw.get("reasoning_tags", formats.DEFAULT_TAGS))
  kw.update(overrides)
  common = dict(batch_size=batch_size, seed=seed, process_index=process_index,
                process_count=process_count, **kw)
  if kind == "sft":
    return sft_batches(data.sources, tokenizer, pack=getattr(data, "pack", True), **common)
  if kind == "dpo":
    return dpo_batches(data.sources, tokenizer, **common)
  raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")


def _name(spec) -> str:
  """The sources spec as a user wrote it, for error messages."""
  if isinstance(spec, grain.MapDataset):
    return ""
  return spec if isinstance(spec, str) else ",".join(map(str, spec))


def _pad_id(tokenizer) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad) if pad is not None else 0


def _check_buckets(length_buckets, process_count: int) -> None:
  # Each host would pick its own bucket; a global batch needs one shape on every host.
  if length_buckets and process_count > 1:
    raise ValueError("length_buckets need process_count == 1: each process would choose its own"
                     " length and the global batch could not be assembled; use a fixed max_length")
