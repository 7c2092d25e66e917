"""Tokenized examples -> fixed-shape batch dicts (BUILD.md "Data" contract).

SFT rows hold one example (padded) or several (packed: first fit over the batch's rows, largest
first from a lookahead pool (``pack_window``; see ``_BatchIterator``), segment ids 1..k, positions
restarting at 0 in each segment). DPO rows hold one pair, chosen and rejected padded to the same
length. Padding is segment 0, position 0, token ``pad_id``, mask 0.
The last batch of a finite pass is padded with empty rows (DPO: ``example_id`` -1) unless
``drop_remainder``.

If every example of a full pass over the data is dropped (too long, ...), no batch can ever come:
the iterator then raises :class:`NoBatchError` with the drop counts by reason instead of reading
an endless stream forever (it knows the pass size ``records_per_pass`` from the pipeline).

The batching iterators are grain ``DatasetIterator``s whose state is the parent's state plus,
for each example read but not yet in an emitted batch (the packer's pool), the parent's state
before it, so a restored iterator re-reads exactly what the interrupted one still held. Each
element is ``(batch, counts)``: ``counts`` are the events of the examples this batch consumed
(used, dropped/<why>, truncated/<what>, real and padding tokens). They travel with the batch
because with multiprocess prefetch the batching runs in worker processes.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

SFT_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
DPO_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SFT_KEYS) + (
    "shared_len", "example_id")


class NoBatchError(ValueError):
  """A full pass over the data yields no batch: every example was dropped."""


def example_id(record_id: str) -> int:
  """A stable non-negative int64 for a record id (same on every host, run and Python version)."""
  digest = hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") & (2**63 - 1)


def bucket_length(n: int, max_length: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= n (``max_length`` without buckets): a bounded set of compiled shapes."""
  if not buckets:
    return max_length
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"sequence of {n} tokens exceeds the largest length bucket {max(buckets)}")


def check_buckets(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...] | None:
  if not buckets:
    return None
  buckets = tuple(sorted(int(b) for b in buckets))
  if buckets[-1] != max_length or buckets[0] < 1:
    raise ValueError(f"length_buckets {buckets} must be positive and end at max_length={max_length}")
  return buckets


def pack_rows(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], length: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows of examples ({"tokens", "loss_mask"}) -> the SFT batch dict, each row ``length`` long."""
  shape = (len(rows), length)
  out = {k: np.zeros(shape, np.int32) for k in SFT_KEYS}
  out["tokens"][:] = pad_id
  for r, row in enumerate(rows):
    at = 0
    for seg, ex in enumerate(row, start=1):
      n = len(ex["tokens"])
      if at + n > length:
        raise ValueError(f"row {r}: examples of {at + n} tokens exceed length {length}")
      out["tokens"][r, at:at + n] = ex["tokens"]
      out["loss_mask"][r, at:at + n] = ex["loss_mask"]
      out["segment_ids"][r, at:at + n] = seg
      out["positions"][r, at:at + n] = np.arange(n, dtype=np.int32)
      at += n
  return out


def pair_rows(pairs: Sequence[Mapping[str, Any] | None], length: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Tokenized preference pairs -> the DPO batch dict (chosen and rejected side by side).

  A ``None`` pair is a padding row (last batch of a finite pass): all masks 0, ``shared_len`` 0,
  ``example_id`` -1 (real ids are non-negative).
  """
  out: dict[str, np.ndarray] = {}
  for side in ("chosen", "rejected"):
    rows = [[{"tokens": p[f"{side}_tokens"], "loss_mask": p[f"{side}_loss_mask"]}] if p else []
            for p in pairs]
    for k, v in pack_rows(rows, length, pad_id).items():
      out[f"{side}_{k}"] = v
  out["shared_len"] = np.asarray([p["shared_len"] if p else 0 for p in pairs], np.int32).reshape(-1)
  out["example_id"] = np.asarray([example_id(p["id"]) if p else -1 for p in pairs],
                                 np.int64).reshape(-1)
  return out


def _first_fit(free: Sequence[int], n: int) -> int:
  for i, room in enumerate(free):
    if room >= n:
      return i
  return -1


# An example the packer has passed over this many batches goes first (before the largest-first
# order), so the lookahead reorders examples by a bounded distance and starves none.
MAX_WAIT = 2


# Packed rows choose from examples worth this many batches of tokens (``pack_window``).
PACK_WINDOW = 2.0


class _BatchIterator(grain.DatasetIterator):
  """Shared loop: read examples into a pool, place them in rows, emit when no more fit.

  Greedy (no lookahead: unpacked rows, or ``pack_window`` 0): examples are placed in the order
  read and the batch closes at the first one that fits no row, which waits for the next batch.
  With a lookahead (packed rows): the pool is topped up with examples worth ``pack_window``
  batches of tokens, and is placed largest first (best fit decreasing), after those that have
  waited ``MAX_WAIT`` batches; what fits no row stays in the pool for the next batch."""

  def __init__(self, parent: grain.DatasetIterator, ds: "_BatchDataset"):
    super().__init__(parent)
    self._ds = ds
    # [parent state before it, example, batches it has waited]: read, not yet in a batch.
    self._pool: list[list] = []
    # Dropped examples read since the last kept one: distinct record ids and counts by reason.
    # Drops depend only on the record, so once every record of a pass is in here, none ever fits.
    self._drop_ids: set[str] = set()
    self._drop_counts: collections.Counter = collections.Counter()

  def _note_drop(self, ex) -> None:
    n = self._ds.records_per_pass
    if n is None:
      return
    self._drop_ids.add(ex.get("id"))
    self._drop_counts[ex["dropped"]] += 1
    # 2n - 1 consecutive reads hold one whole (epoch-aligned) pass even if ids repeat.
    if len(self._drop_ids) >= n or sum(self._drop_counts.values()) >= 2 * n - 1:
      reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self._drop_counts.items()))
      examples = sorted(map(str, self._drop_ids))[:3]
      where = f" of {self._ds.source_name}" if self._ds.source_name else ""
      raise NoBatchError(
          f"data{where}: a full pass over the {n} records of this process yields no batch: every "
          f"example was dropped ({reasons}; e.g. record ids {examples}). Raise data.max_length / "
          "data.max_prompt_length, choose another data.truncation, or fix the data")

  def _prepare(self, ex):
    """A kept example as the rows take it (the tree iterator fits trees to the row length)."""
    return ex

  def _place(self, rows, free, ex) -> bool:
    raise NotImplementedError

  def _top_up(self, pool, counts) -> bool:
    """Reads into ``pool`` until it holds the lookahead's tokens (one example without lookahead);
    returns False once the parent is exhausted."""
    ds = self._ds
    budget = ds.lookahead_tokens
    held = sum(ds.size(ex) for _, ex, _ in pool) if budget else 0
    while not pool or held < budget:
      state = self._parent.get_state()
      try:
        ex = next(self._parent)
      except StopIteration:
        return False
      if "dropped" not in ex:
        ex = self._prepare(ex)  # may drop it too (a tree too long to cut)
      if "dropped" in ex:
        counts[ex["dropped"]] += 1
        self._note_drop(ex)
        continue
      self._drop_ids.clear()
      self._drop_counts.clear()
      pool.append([state, ex, 0])
      held += ds.size(ex) if budget else 0
    return True

  def __next__(self):
    ds = self._ds
    rows: list[list[dict]] = [[] for _ in range(ds.batch_size)]
    free = [ds.max_length] * ds.batch_size
    counts: collections.Counter = collections.Counter()
    pool, self._pool = self._pool, []
    more = True
    while not ds.is_full(rows):
      more = more and self._top_up(pool, counts)
      if ds.lookahead_tokens:
        # The long-waiting oldest first, then the rest largest first; stable (reading order breaks
        # ties).
        pool.sort(key=lambda e: (0, -e[2]) if e[2] >= MAX_WAIT else (1, -ds.size(e[1])))
      left, placed = [], False
      for entry in pool:  # greedy: the pool holds one example
        if not ds.is_full(rows) and self._place(rows, free, entry[1]):
          placed = True
          counts["examples"] += 1
          counts.update(entry[1].get("events", ()))
        else:
          left.append(entry)
      pool = left
      if not placed or not more:
        break
    used = sum(1 for r in rows if r)
    if used == 0 or (used < ds.batch_size and ds.drop_remainder):
      if used:
        counts["dropped/remainder"] += sum(len(r) for r in rows)
      self._pool = pool
      raise StopIteration
    self._pool = [[state, ex, wait + 1] for state, ex, wait in pool]
    batch = ds.assemble(rows)
    counts["rows"] += ds.batch_size
    for prefix in ds.sides:
      counts["slots"] += int(batch[f"{prefix}segment_ids"].size)
      counts["tokens"] += int((batch[f"{prefix}segment_ids"] > 0).sum())
      counts["loss_tokens"] += int(batch[f"{prefix}loss_mask"].sum())
    return batch, dict(counts)

  def get_state(self) -> dict[str, Any]:
    # The pool's examples are re-read from their parent states on restore.
    return {"parent": self._parent.get_state(),
            "pool": [[state, wait] for state, _, wait in self._pool]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._pool = []
    for before, wait in state.get("pool", ()):
      self._parent.set_state(before)
      self._pool.append([before, self._prepare(next(self._parent)), wait])
    self._parent.set_state(state["parent"])


class _SftIterator(_BatchIterator):

  def _place(self, rows, free, ex) -> bool:
    n = len(ex["tokens"])
    if self._ds.pack:
      i = _first_fit(free, n)
    else:
      i = next((j for j, r in enumerate(rows) if not r), -1)
    if i < 0:
      return False
    rows[i].append(ex)
    free[i] -= n
    return True


class _DpoIterator(_BatchIterator):

  def _place(self, rows, free, ex) -> bool:
    i = next((j for j, r in enumerate(rows) if not r), -1)
    if i < 0:
      return False
    rows[i].append(ex)
    return True


class _BatchDataset(grain.IterDataset):
  """Tokenized examples -> (batch dict, counts); see the module docstring."""

  sides = ("",)  # key prefixes of the token arrays, for the usage counts

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, max_length: int,
               pad_id: int = 0, length_buckets: Sequence[int] | None = None,
               drop_remainder: bool = False, records_per_pass: int | None = None,
               source_name: str = "", pack_window: float = PACK_WINDOW):
    """``records_per_pass``: distinct records in one pass of ``parent`` (None = unknown: an
    all-dropped stream is then not detected); ``source_name`` names the data in that error.
    ``pack_window``: the lookahead of packed rows, in batches of tokens (0 = greedy)."""
    super().__init__(parent)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not pack_window >= 0:
      raise ValueError(f"pack_window must be >= 0, got {pack_window}")
    self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
    self.buckets = check_buckets(length_buckets, max_length)
    self.drop_remainder = drop_remainder
    self.records_per_pass, self.source_name = records_per_pass, source_name
    self.pack_window = pack_window

  @property
  def packs(self) -> bool:
    """Several examples per row (the lookahead applies)."""
    return False

  @property
  def lookahead_tokens(self) -> int:
    return int(self.pack_window * self.batch_size * self.max_length) if self.packs else 0

  def size(self, ex) -> int:
    """The slots an example takes in a row."""
    return len(ex["tokens"])

  def is_full(self, rows) -> bool:
    return all(rows)


class SftBatchDataset(_BatchDataset):
  """SFT rows: packed (first fit, several segments per row) or one padded example per row."""

  def __init__(self, parent: grain.IterDataset, *, pack: bool = True, **kw):
    super().__init__(parent, **kw)
    self.pack = pack

  @property
  def packs(self) -> bool:
    return self.pack

  def is_full(self, rows) -> bool:
    # A packed batch closes only when an example fits no row (the iterator carries it over).
    return not self.pack and all(rows)

  def assemble(self, rows) -> dict[str, np.ndarray]:
    longest = max(sum(len(ex["tokens"]) for ex in r) for r in rows)
    return pack_rows(rows, bucket_length(longest, self.max_length, self.buckets), self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _SftIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"SftBatchDataset(batch_size={self.batch_size}, max_length={self.max_length}, pack={self.pack})"


class DpoBatchDataset(_BatchDataset):
  """DPO rows: one pair per row, chosen and rejected padded to one common length."""

  sides = ("chosen_", "rejected_")

  def assemble(self, rows) -> dict[str, np.ndarray]:
    pairs = [r[0] if r else None for r in rows]
    longest = max(max(len(p["chosen_tokens"]), len(p["rejected_tokens"])) for p in pairs if p)
    return pair_rows(pairs, bucket_length(longest, self.max_length, self.buckets), self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _DpoIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"DpoBatchDataset(batch_size={self.batch_size}, max_length={self.max_length})"


# ---------------------------------------------------------------------------------------------
# Prefix-shared DPO rows: each pair is a tree [shared | chosen | rejected] in one row.

TREE_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "loss_mask", "shared_len",
             "example_id")
TRUNK, CHOSEN, REJECTED = 0, 1, 2  # branch ids


def fit_tree(pair: Mapping[str, Any], max_length: int, truncation: str = "cut") -> dict[str, Any]:
  """A tokenized pair whose tree (shared + chosen rest + rejected rest) fits ``max_length``.

  Too long: ``truncation="cut"`` shortens the completions (the shorter keeps up to half the
  room, the longer gets the rest; event ``truncated/tree``), ``"drop"`` drops the pair
  (``dropped/tree_too_long``, also when not even one token of each completion fits).
  """
  s = int(pair["shared_len"])
  c, r = len(pair["chosen_tokens"]) - s, len(pair["rejected_tokens"]) - s
  room = max_length - s
  if c + r <= room:
    return dict(pair)
  if truncation != "cut" or room < 2:
    return {"id": pair["id"], "dropped": "dropped/tree_too_long"}
  if c <= r:
    c = min(c, room // 2)
    r = room - c
  else:
    r = min(r, room // 2)
    c = room - r
  out = dict(pair)
  for side, n in (("chosen", c), ("rejected", r)):
    out[f"{side}_tokens"] = pair[f"{side}_tokens"][:s + n]
    out[f"{side}_loss_mask"] = pair[f"{side}_loss_mask"][:s + n]
  out["events"] = list(pair.get("events", ())) + ["truncated/tree"]
  return out


def tree_length(pair: Mapping[str, Any]) -> int:
  return len(pair["chosen_tokens"]) + len(pair["rejected_tokens"]) - int(pair["shared_len"])


def tree_rows(rows: Sequence[Sequence[Mapping[str, Any]]], length: int, trees: int = 1,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows of tokenized pairs -> the prefix-shared DPO batch dict.

  Pair k of row r is segment k + 1 laid out as ``[shared | chosen rest | rejected rest]``:
  ``branch_ids`` 0 / 1 / 2; positions 0..S-1 on the trunk, and S.. again on EACH branch (restart
  at the branch), so every token keeps the position it has in its own unshared sequence.
  ``loss_mask`` marks both completions. Per tree slot [R, trees]: ``shared_len`` and
  ``example_id`` (-1: empty slot / padding row).
  """
  shape = (len(rows), length)
  out = {k: np.zeros(shape, np.int32) for k in TREE_KEYS[:5]}
  out["tokens"][:] = pad_id
  out["shared_len"] = np.zeros((len(rows), trees), np.int32)
  out["example_id"] = np.full((len(rows), trees), -1, np.int64)
  for i, row in enumerate(rows):
    if len(row) > trees:
      raise ValueError(f"row {i}: {len(row)} pairs exceed {trees} tree slots per row")
    at = 0
    for k, p in enumerate(row):
      s = int(p["shared_len"])
      chosen, rejected = np.asarray(p["chosen_tokens"]), np.asarray(p["rejected_tokens"])
      if not (np.array_equal(chosen[:s], rejected[:s]) and not np.any(p["chosen_loss_mask"][:s])
              and not np.any(p["rejected_loss_mask"][:s])):
        raise ValueError(f"pair {p['id']}: the first shared_len={s} tokens must be identical in"
                         " chosen and rejected and carry no loss")
      n = tree_length(p)
      if at + n > length:
        raise ValueError(f"row {i}: pairs of {at + n} tokens exceed length {length}")
      c, r = len(chosen) - s, len(rejected) - s
      span = slice(at, at + n)
      out["tokens"][i, span] = np.concatenate([chosen, rejected[s:]])
      out["loss_mask"][i, span] = np.concatenate([p["chosen_loss_mask"], p["rejected_loss_mask"][s:]])
      out["positions"][i, span] = np.concatenate([np.arange(s + c), s + np.arange(r)])
      out["branch_ids"][i, span] = np.repeat([TRUNK, CHOSEN, REJECTED], [s, c, r])
      out["segment_ids"][i, span] = k + 1
      out["shared_len"][i, k] = s
      out["example_id"][i, k] = example_id(p["id"])
      at += n
  return out


class _DpoTreeIterator(_BatchIterator):

  def _prepare(self, ex):
    return fit_tree(ex, self._ds.max_length, self._ds.truncation)

  def _place(self, rows, free, ex) -> bool:
    n = self._ds.size(ex)
    trees = self._ds.trees
    # Best fit (the fullest row that still holds the tree) keeps large holes open for later trees.
    fits = [j for j, r in enumerate(rows) if len(r) < trees and free[j] >= n]
    if not fits:
      return False
    i = min(fits, key=lambda j: free[j])
    rows[i].append(ex)
    free[i] -= n
    return True


class DpoTreeBatchDataset(_BatchDataset):
  """Prefix-shared DPO rows (``tree_rows``): one pair per row, or with ``trees > 1`` up to that
  many pairs packed per row (best fit, largest first from the lookahead pool; the batch closes
  when no pooled pair fits a row), so a batch of ``batch_size`` rows holds a varying number of
  pairs."""

  def __init__(self, parent: grain.IterDataset, *, trees: int = 1, truncation: str = "cut", **kw):
    super().__init__(parent, **kw)
    if trees < 1:
      raise ValueError(f"trees (pairs per row) must be >= 1, got {trees}")
    self.trees, self.truncation = trees, truncation

  @property
  def packs(self) -> bool:
    return self.trees > 1

  def size(self, ex) -> int:
    return tree_length(ex)

  def is_full(self, rows) -> bool:
    return all(len(r) >= self.trees for r in rows)

  def assemble(self, rows) -> dict[str, np.ndarray]:
    longest = max(sum(tree_length(p) for p in r) for r in rows)
    return tree_rows(rows, bucket_length(longest, self.max_length, self.buckets), self.trees,
                     self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _DpoTreeIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return (f"DpoTreeBatchDataset(batch_size={self.batch_size}, max_length={self.max_length},"
            f" trees={self.trees})")
