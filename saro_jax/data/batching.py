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
    # [parent state before it, piece, batches it has waited, piece index]: read, not yet in a
    # batch. A piece is what one row takes: the example itself, or one of a prompt's trees.
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

  def _pieces(self, ex) -> list:
    """A prepared example's pieces, placed one by one (possibly in different batches)."""
    return [ex]

  def _place(self, rows, free, ex) -> bool:
    raise NotImplementedError

  def _top_up(self, pool, counts) -> bool:
    """Reads into ``pool`` until it holds the lookahead's tokens (one example without lookahead);
    returns False once the parent is exhausted."""
    ds = self._ds
    budget = ds.lookahead_tokens
    held = sum(ds.size(entry[1]) for entry in pool) if budget else 0
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
      for part, piece in enumerate(self._pieces(ex)):
        pool.append([state, piece, 0, part])
        held += ds.size(piece) if budget else 0
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
          counts.update(ds.example_counts(entry[1]))
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
    self._pool = [[state, piece, wait + 1, part] for state, piece, wait, part in pool]
    batch = ds.assemble(rows)
    counts["rows"] += ds.batch_size
    for prefix in ds.sides:
      counts["slots"] += int(batch[f"{prefix}segment_ids"].size)
      counts["tokens"] += int((batch[f"{prefix}segment_ids"] > 0).sum())
      counts["loss_tokens"] += int(batch[f"{prefix}loss_mask"].sum())
    return batch, dict(counts)

  def get_state(self) -> dict[str, Any]:
    # The pool's pieces are re-read from their parent states on restore.
    return {"parent": self._parent.get_state(),
            "pool": [[state, wait, part] for state, _, wait, part in self._pool]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._pool = []
    for before, wait, *part in state.get("pool", ()):  # states saved before pieces: no part
      part = part[0] if part else 0
      self._parent.set_state(before)
      piece = self._pieces(self._prepare(next(self._parent)))[part]
      self._pool.append([before, piece, wait, part])
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

  def example_counts(self, ex) -> Mapping[str, int]:
    """Counts an example adds to the batch's beyond ``examples`` and its events."""
    return {}

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
# Prefix-shared DPO rows: pairs as token trees, several trees per row.
#
# A tree holds one pair ([shared | chosen | rejected]) or, with ``share_prompts``, several pairs
# of one prompt: the token trie of all their chosen and rejected sequences, so every common prefix
# (the prompt, a process pair's reasoning steps, a rejected trajectory that several process pairs
# continue) is computed once. The trie is laid out depth first (a node's tokens, then its
# children's subtrees), which makes each token's visibility one number: token j is seen by the
# tokens from j up to ``subtree_end[j]`` (exclusive), its own node's later tokens and its
# descendants. Every sequence is a root-to-node path, and its scored tokens are the slots of its
# path from ``first`` to ``last``, the tokens t in that range with ``subtree_end[t] > last``.

TREE_KEYS = ("tokens", "positions", "segment_ids", "subtree_end", "source", "loss_mask")
SPAN_KEYS = ("chosen_first", "chosen_last", "rejected_first", "rejected_last")


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


def _check_pair(p: Mapping[str, Any]) -> None:
  s = int(p["shared_len"])
  chosen, rejected = np.asarray(p["chosen_tokens"]), np.asarray(p["rejected_tokens"])
  if not (np.array_equal(chosen[:s], rejected[:s]) and not np.any(p["chosen_loss_mask"][:s])
          and not np.any(p["rejected_loss_mask"][:s])):
    raise ValueError(f"pair {p['id']}: the first shared_len={s} tokens must be identical in"
                     " chosen and rejected and carry no loss")


def _scored_span(mask: np.ndarray, pid: str, side: str) -> tuple[int, int]:
  """First and last scored index of a sequence whose scored tokens are one run."""
  scored = np.flatnonzero(mask)
  if scored.size == 0:
    raise ValueError(f"pair {pid}: {side} has no scored token")
  if scored[-1] - scored[0] + 1 != scored.size:
    raise ValueError(f"pair {pid}: {side}'s scored tokens are not one contiguous run")
  if scored[0] == 0:
    raise ValueError(f"pair {pid}: {side} scores its first token, which no token predicts")
  return int(scored[0]), int(scored[-1])


def prompt_tree(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Tokenized pairs (one, or several of one prompt) -> one tree, laid out depth first.

  Returns ``tokens``, ``positions`` (a token's index in its own sequences), ``subtree_end``,
  ``source`` (the slot whose hidden state predicts the token: its parent; a root its own slot),
  ``loss_mask`` (scored in some sequence), all [n], and ``pairs``: per pair its id, shared_len
  and the slots of its sequences' first and last scored tokens. Pairs with no token in common
  still make one valid forest (several roots); callers group by prompt so that they share.
  """
  children: list[dict[int, int]] = [{}]  # node 0: a virtual root above the real roots
  token: list[int] = [-1]
  paths = []
  for p in pairs:
    _check_pair(p)
    for side in ("chosen", "rejected"):
      node, path = 0, []
      for t in np.asarray(p[f"{side}_tokens"]).tolist():
        nxt = children[node].get(t)
        if nxt is None:
          nxt = len(token)
          children[node][t] = nxt
          children.append({})
          token.append(t)
        path.append(nxt)
        node = nxt
      paths.append(path)
  # Depth-first order (children in insertion order: chosen before rejected, as pairs came).
  n = len(token) - 1
  slot_of = np.zeros(len(token), np.int64)
  tokens, positions, parent = (np.zeros(n, np.int32) for _ in range(3))
  end = np.zeros(n, np.int32)
  placed, stack = 0, [(c, 0, -1) for c in reversed(list(children[0].values()))]
  while stack:
    node, depth, parent_slot = stack.pop()
    if node < 0:  # closing marker: the subtree of ~node ends here
      end[slot_of[~node]] = placed
      continue
    slot, placed = placed, placed + 1
    slot_of[node] = slot
    tokens[slot], positions[slot] = token[node], depth
    parent[slot] = slot if parent_slot < 0 else parent_slot
    stack.append((~node, 0, 0))
    stack.extend((c, depth + 1, slot) for c in reversed(list(children[node].values())))
  loss_mask = np.zeros(n, np.int32)
  out_pairs = []
  for k, p in enumerate(pairs):
    spans = {}
    for i, side in enumerate(("chosen", "rejected")):
      slots = slot_of[paths[2 * k + i]]
      first, last = _scored_span(np.asarray(p[f"{side}_loss_mask"]), p["id"], side)
      loss_mask[slots[first:last + 1]] = 1
      spans[f"{side}_first"], spans[f"{side}_last"] = int(slots[first]), int(slots[last])
    out_pairs.append({"id": p["id"], "shared_len": int(p["shared_len"]), **spans})
  return {"tokens": tokens, "positions": positions, "subtree_end": end, "source": parent,
          "loss_mask": loss_mask, "pairs": out_pairs}


def tree_rows(rows: Sequence[Sequence[Mapping[str, Any]]], length: int, pairs_per_row: int = 1,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows of trees (``prompt_tree``) -> the prefix-shared DPO batch dict.

  Tree k of row r is segment k + 1. [rows, length]: ``tokens``, ``positions``, ``segment_ids``,
  ``subtree_end`` and ``source`` (row slots), ``loss_mask``. Per pair slot [rows, pairs_per_row],
  pairs numbered across the row's trees: ``chosen_first`` / ``chosen_last`` /
  ``rejected_first`` / ``rejected_last`` (row slots; an empty slot has first 0, last -1),
  ``shared_len`` and ``example_id`` (-1: empty slot / padding row). Padding: segment 0, token
  ``pad_id``, ``subtree_end`` = length (padding sees earlier padding only, by segment).
  """
  shape = (len(rows), length)
  out = {k: np.zeros(shape, np.int32) for k in TREE_KEYS}
  out["tokens"][:] = pad_id
  out["subtree_end"][:] = length
  out["source"][:] = np.arange(length, dtype=np.int32)
  for k in SPAN_KEYS + ("shared_len",):
    out[k] = np.zeros((len(rows), pairs_per_row), np.int32)
  for side in ("chosen", "rejected"):
    out[f"{side}_last"][:] = -1
  out["example_id"] = np.full((len(rows), pairs_per_row), -1, np.int64)
  for i, row in enumerate(rows):
    at, slot = 0, 0
    for seg, tree in enumerate(row, start=1):
      n = len(tree["tokens"])
      if at + n > length:
        raise ValueError(f"row {i}: trees of {at + n} tokens exceed length {length}")
      if slot + len(tree["pairs"]) > pairs_per_row:
        raise ValueError(f"row {i}: {slot + len(tree['pairs'])} pairs exceed {pairs_per_row}"
                         " pair slots per row")
      span = slice(at, at + n)
      for k in ("tokens", "positions", "loss_mask"):
        out[k][i, span] = tree[k]
      out["subtree_end"][i, span] = tree["subtree_end"] + at
      out["source"][i, span] = tree["source"] + at
      out["segment_ids"][i, span] = seg
      for p in tree["pairs"]:
        for k in SPAN_KEYS:
          out[k][i, slot] = p[k] + at
        out["shared_len"][i, slot] = p["shared_len"]
        out["example_id"][i, slot] = example_id(p["id"])
        slot += 1
      at += n
  return out


def prompt_trees(pairs: Sequence[Mapping[str, Any]], max_length: int, max_pairs: int,
                 truncation: str = "cut") -> tuple[list[dict[str, Any]], list[str]]:
  """Tokenized pairs (of one prompt) -> trees of at most ``max_pairs`` pairs and ``max_length``
  slots each, and the events of the pairs (``fit_tree``'s cuts and drops). Pairs join the current
  tree while it still fits, else open the next one (reading order)."""
  trees, events, group = [], [], []
  current = None
  for p in pairs:
    p = fit_tree(p, max_length, truncation)
    if "dropped" in p:
      events.append(p["dropped"])
      continue
    events += list(p.get("events", ()))
    if group and len(group) < max_pairs:
      merged = prompt_tree(group + [p])
      if len(merged["tokens"]) <= max_length:
        group, current = group + [p], merged
        continue
    if group:
      trees.append(current)
    group, current = [p], prompt_tree([p])
  if group:
    trees.append(current)
  return trees, events


def _pairs_in(row) -> int:
  return sum(len(tree["pairs"]) for tree in row)


class _DpoTreeIterator(_BatchIterator):

  def _prepare(self, ex):
    """A pair, or a prompt's group of pairs (``{"id", "pairs", "events"}``), -> its trees."""
    ds = self._ds
    group = "pairs" in ex
    trees, events = prompt_trees(ex["pairs"] if group else [ex], ds.max_length,
                                 ds.pairs_per_row, ds.truncation)
    if group:
      events = list(ex.get("events", ())) + events
    if not trees:
      return {"id": ex["id"], "dropped": events[-1]}
    return {"id": ex["id"], "trees": trees, "events": events}

  def _pieces(self, ex) -> list:
    # One piece per tree, so a prompt with more trees than a batch holds still goes through;
    # the example's events ride on its first tree.
    return [{"id": ex["id"], "tree": tree, "events": ex["events"] if i == 0 else []}
            for i, tree in enumerate(ex["trees"])]

  def _place(self, rows, free, piece) -> bool:
    # Best fit (the fullest row that still holds the tree) keeps large holes open for later trees.
    tree = piece["tree"]
    n, k = len(tree["tokens"]), len(tree["pairs"])
    fits = [j for j, r in enumerate(rows)
            if _pairs_in(r) + k <= self._ds.pairs_per_row and free[j] >= n]
    if not fits:
      return False
    i = min(fits, key=lambda j: free[j])
    rows[i].append(tree)
    free[i] -= n
    return True


class DpoTreeBatchDataset(_BatchDataset):
  """Prefix-shared DPO rows (``tree_rows``). The examples are tokenized pairs, or with
  ``pipeline.dpo_batches(share_prompts=True)`` a prompt's group of them (``{"id", "pairs",
  "events"}``), each made into trees (``prompt_trees``) that are placed one by one (the stats'
  ``examples`` count trees, ``pairs`` pairs). A row holds up to ``pairs_per_row`` pairs: one pair
  per row, or with ``pairs_per_row > 1`` several trees packed per row (best fit, largest first
  from the lookahead pool; the batch closes when no pooled tree fits), so a batch of
  ``batch_size`` rows holds a varying number of pairs."""

  def __init__(self, parent: grain.IterDataset, *, pairs_per_row: int = 1, truncation: str = "cut",
               **kw):
    super().__init__(parent, **kw)
    if pairs_per_row < 1:
      raise ValueError(f"pairs_per_row must be >= 1, got {pairs_per_row}")
    self.pairs_per_row, self.truncation = pairs_per_row, truncation

  @property
  def packs(self) -> bool:
    return self.pairs_per_row > 1

  def size(self, piece) -> int:
    return len(piece["tree"]["tokens"])

  def example_counts(self, piece) -> Mapping[str, int]:
    # A piece is one tree: a pair, or several of one prompt. ``pairs`` counts pairs either way.
    return {"pairs": len(piece["tree"]["pairs"])}

  def is_full(self, rows) -> bool:
    return all(_pairs_in(r) >= self.pairs_per_row for r in rows)

  def assemble(self, rows) -> dict[str, np.ndarray]:
    longest = max(sum(len(tree["tokens"]) for tree in r) for r in rows)
    return tree_rows(rows, bucket_length(longest, self.max_length, self.buckets),
                     self.pairs_per_row, self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _DpoTreeIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return (f"DpoTreeBatchDataset(batch_size={self.batch_size}, max_length={self.max_length},"
            f" pairs_per_row={self.pairs_per_row})")
