"""The one reader of JSON Lines and JSON files, and the one error type for unreadable input.

Every input file the project reads as JSON goes through here: training sources
(``data/sources.py``), evaluation prompt sets (``evaluate/prompts.py``), HF ``config.json`` and
safetensors indexes (``models/hf.py``). So every one of them:
  - accepts a UTF-8 byte order mark at the start of the file (Windows editors write one);
  - refuses invalid UTF-8, malformed JSON and (JSONL) over-long lines with an :class:`InputError`
    naming "file:line" and the reason;
  - skips blank JSONL lines (a trailing newline is not a record).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

DEFAULT_MAX_LINE_BYTES = 16 * 2**20  # a JSONL line beyond this is a broken file, not a record
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark


class InputError(ValueError):
  """Input that cannot be read, at a named place: ``where`` ("file:line"), ``reason`` (a short
  key for counting, e.g. "malformed_json"), message "<where>: <detail>"."""

  def __init__(self, where: str, detail: str, *, reason: str = "invalid"):
    self.where, self.reason, self.detail = where, reason, detail
    super().__init__(f"{where}: {detail}" if where else detail)


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(where, f"invalid UTF-8 at byte {e.start}: {e.reason}",
                     reason="invalid_utf8") from None


def read_jsonl(path: str | os.PathLike, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               on_error: str = "raise") -> Iterator[tuple[str, Any]]:
  """(where = "path:line", value) for every non-blank line of a JSON Lines file, in order.

  A bad line raises :class:`InputError`; with ``on_error="yield"`` the error is yielded in place
  of the value and reading goes on (callers that skip and count bad lines).
  """
  if on_error not in ("raise", "yield"):
    raise ValueError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
  path = os.fspath(path)
  with open(path, "rb") as f:
    line_no = 0
    while True:
      line = f.readline(max_line_bytes + 1)
      if not line:
        return
      line_no += 1
      where = f"{path}:{line_no}"
      if line_no == 1 and line.startswith(BOM):
        line = line[len(BOM):]
      try:
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
          while line and not line.endswith(b"\n"):  # drain the rest without holding it in memory
            line = f.readline(max_line_bytes)
          raise InputError(where, f"line longer than max_line_bytes={max_line_bytes}",
                           reason="line_too_long")
        text = _decode(line, where)
        if not text.strip():
          continue
        try:
          value = json.loads(text)
        except json.JSONDecodeError as e:
          raise InputError(where, f"malformed JSON at character {e.pos}: {e.msg}",
                           reason="malformed_json") from None
      except InputError as e:
        if on_error == "raise":
          raise
        yield where, e
        continue
      yield where, value


def read_progress(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """A resumable stage's progress file: {row["id"]: row} of its JSONL lines (missing file -> {}).
  A line a crash cut short (bad JSON, no id) is skipped: that item is done again."""
  done: dict[str, dict[str, Any]] = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
          done[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
          continue
  return done


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document in ``path`` (a leading byte order mark is accepted)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith(BOM):
    data = data[len(BOM):]
  text = _decode(data, path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}:{e.lineno}", f"malformed JSON at column {e.colno}: {e.msg}",
                     reason="malformed_json") from None
