"""Packing, padding, pair batches and resumable batching iterators (no tokenizer needed)."""

import json

import grain
import numpy as np
import pytest

from saro_jax.data import batching


def sft_example(i: int, n: int, prompt: int = 2) -> dict:
  tokens = np.arange(1000 * i, 1000 * i + n, dtype=np.int32)  # unique per example
  mask = np.zeros(n, np.int32)
  mask[min(prompt, n - 1):] = 1
  return {"id": f"e{i}", "tokens": tokens, "loss_mask": mask, "events": []}


def stream(examples) -> grain.IterDataset:
  return grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0))


def segments(batch):
  """Every (tokens, mask) segment of a SFT batch, row by row."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert where.size and np.all(np.diff(where) == 1), "a segment must be contiguous"
      out.append((batch["tokens"][r, where], batch["loss_mask"][r, where], batch["positions"][r, where]))
  return out


def test_pack_rows_layout():
  a, b, c = sft_example(1, 3), sft_example(2, 4), sft_example(3, 5)
  batch = batching.pack_rows([[a, b], [c], []], length=8, pad_id=7)
  assert set(batch) == set(batching.SFT_KEYS)
  assert all(v.shape == (3, 8) and v.dtype == np.int32 for v in batch.values())
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(batch["tokens"][0, :7], np.concatenate([a["tokens"], b["tokens"]]))
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 0, 0, 1, 1, 0])
  assert batch["tokens"][0, 7] == 7 and (batch["tokens"][2] == 7).all()
  assert batch["segment_ids"][2].sum() == 0 and batch["loss_mask"][2].sum() == 0
  with pytest.raises(ValueError, match="exceed length 8"):
    batching.pack_rows([[a, b, c]], length=8)


def test_greedy_packed_batches_hold_every_example_once_first_fit():
  """pack_window 0: first fit in reading order, the batch closes at the first miss."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 40, size=60)
  examples = [sft_example(i, int(n)) for i, n in enumerate(lengths)]
  ds = batching.SftBatchDataset(stream(examples), pack=True, batch_size=3, max_length=48,
                                pack_window=0)
  batches = list(ds)
  seen = []
  for k, (batch, counts) in enumerate(batches):
    assert batch["tokens"].shape == (3, 48)
    assert counts["slots"] == 3 * 48 and counts["tokens"] == (batch["segment_ids"] > 0).sum()
    assert counts["loss_tokens"] == batch["loss_mask"].sum()
    # Padding is segment 0 with mask 0, only at the end of a row.
    assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
    for r in range(3):
      used = (batch["segment_ids"][r] > 0).sum()
      assert (batch["segment_ids"][r, used:] == 0).all()
    for tokens, mask, positions in segments(batch):
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))
      seen.append(int(tokens[0]) // 1000)
      np.testing.assert_array_equal(tokens, examples[seen[-1]]["tokens"])
      np.testing.assert_array_equal(mask, examples[seen[-1]]["loss_mask"])
    if k + 1 < len(batches):
      # The batch closed because the next example fit in none of its rows.
      free = 48 - (batch["segment_ids"] > 0).sum(axis=1)
      first_next = int(batches[k + 1][0]["tokens"][0, 0]) // 1000
      assert lengths[first_next] > free.max()
  assert sorted(seen) == list(range(60))
  assert sum(c["examples"] for _, c in batches) == 60
  fill = sum(c["tokens"] for _, c in batches) / sum(c["slots"] for _, c in batches)
  assert fill > 0.7, fill


def packed_run(examples, pack_window, batch_size=4, max_length=100):
  """Every batch of one pass with ``pack_window``: (batches, fill, the longest wait in the pool)."""
  it = iter(batching.SftBatchDataset(stream(examples), pack=True, batch_size=batch_size,
                                     max_length=max_length, pack_window=pack_window))
  batches, waits = [], [0]
  for batch, counts in it:
    batches.append((batch, counts))
    waits += [wait for _, _, wait, _ in it._pool]  # batches each pooled example has been passed over
  fill = sum(c["tokens"] for _, c in batches) / sum(c["slots"] for _, c in batches)
  return batches, fill, max(waits)


@pytest.mark.parametrize("shape", ["uniform", "bimodal"])
def test_lookahead_packs_fuller_keeps_every_example_once_and_starves_none(shape):
  """pack_window 2: the packer chooses from two batches' worth of examples, largest first, so
  rows fill fuller than greedy packing; every example still comes exactly once, intact, and the
  long-waiting go first, so none waits more than a few batches (integer logic on fixed data: the
  figures below are exact, not measured)."""
  rng = np.random.default_rng(3)
  if shape == "uniform":  # like the bundled trees in rows of 1024: 180..434 tokens
    lengths = rng.integers(18, 44, size=400)
  else:  # large ones of which two never share a row, and small ones
    lengths = np.where(rng.random(400) < 0.5, rng.integers(5, 15, 400), rng.integers(55, 95, 400))
  examples = [sft_example(i, int(n)) for i, n in enumerate(lengths)]
  _, greedy_fill, greedy_wait = packed_run(examples, 0)
  batches, fill, wait = packed_run(examples, 2)
  seen = []
  for batch, _ in batches:
    for tokens, mask, positions in segments(batch):
      i = int(tokens[0]) // 1000
      seen.append(i)
      np.testing.assert_array_equal(tokens, examples[i]["tokens"])
      np.testing.assert_array_equal(mask, examples[i]["loss_mask"])
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))
  assert sorted(seen) == list(range(400)) and seen != list(range(400))  # reordered, none lost
  assert greedy_wait <= 1  # greedy: only the one example that closed a batch waits
  assert wait <= batching.MAX_WAIT + 2, wait
  if shape == "uniform":
    assert fill >= greedy_fill + 0.02, (fill, greedy_fill)
  else:  # one large per row whatever the order: the lookahead cannot do worse
    assert fill >= greedy_fill, (fill, greedy_fill)


def test_unpacked_batches_one_example_per_row_in_order():
  examples = [sft_example(i, 5 + i) for i in range(7)]
  batches = list(batching.SftBatchDataset(stream(examples), pack=False, batch_size=3, max_length=16))
  assert len(batches) == 3
  order = [int(t[0]) // 1000 for b, _ in batches for t, _, _ in segments(b)]
  assert order == list(range(7))
  assert all(b["segment_ids"].max(axis=1).max() == 1 for b, _ in batches)
  last, counts = batches[-1]
  # The short last batch is padded with empty rows (no data lost) ...
  assert last["segment_ids"][1:].sum() == 0 and counts["examples"] == 1
  # ... or dropped, and counted.
  dropped = list(batching.SftBatchDataset(stream(examples), pack=False, batch_size=3,
                                          max_length=16, drop_remainder=True))
  assert len(dropped) == 2


def test_length_buckets_bound_the_shapes():
  examples = [sft_example(i, n) for i, n in enumerate([5, 6, 20, 3, 30, 4])]
  ds = batching.SftBatchDataset(stream(examples), pack=False, batch_size=2, max_length=32,
                                length_buckets=(8, 16, 32))
  lengths = [b["tokens"].shape[1] for b, _ in ds]
  assert lengths == [8, 32, 32]
  assert batching.bucket_length(9, 32, (8, 16, 32)) == 16
  with pytest.raises(ValueError, match="end at max_length"):
    batching.check_buckets((8, 16), 32)


def test_dropped_examples_are_counted_not_batched():
  examples = [sft_example(0, 4), {"id": "x", "dropped": "dropped/prompt_too_long"},
              sft_example(2, 4), {"id": "y", "dropped": "dropped/prompt_too_long"},
              {"id": "z", "dropped": "dropped/no_response_left"}, sft_example(5, 4)]
  examples[2]["events"] = ["truncated/response"]
  batches = list(batching.SftBatchDataset(stream(examples), pack=False, batch_size=4, max_length=8))
  (batch, counts), = batches
  assert counts["dropped/prompt_too_long"] == 2 and counts["dropped/no_response_left"] == 1
  assert counts["examples"] == 3 and counts["truncated/response"] == 1
  assert batch["segment_ids"].max(axis=1).tolist() == [1, 1, 1, 0]


def pair(i: int, shared: int, n_chosen: int, n_rejected: int) -> dict:
  prefix = np.arange(shared, dtype=np.int32) + 1
  out = {"id": f"pair-{i}", "shared_len": shared, "events": []}
  for side, n, base in (("chosen", n_chosen, 100), ("rejected", n_rejected, 200)):
    out[f"{side}_tokens"] = np.concatenate([prefix, base + np.arange(n, dtype=np.int32)])
    out[f"{side}_loss_mask"] = np.concatenate([np.zeros(shared, np.int32), np.ones(n, np.int32)])
  return out


def test_dpo_batches_side_by_side():
  pairs = [pair(i, 3 + i, 4, 6 - i) for i in range(5)]
  batches = list(batching.DpoBatchDataset(stream(pairs), batch_size=2, max_length=16))
  batch, counts = batches[0]
  assert tuple(batch) == batching.DPO_KEYS
  assert batch["shared_len"].dtype == np.int32 and batch["example_id"].dtype == np.int64
  assert all(batch[k].shape == (2, 16) for k in batching.DPO_KEYS[:8])
  np.testing.assert_array_equal(batch["shared_len"], [3, 4])
  for r in range(2):
    s = batch["shared_len"][r]
    np.testing.assert_array_equal(batch["chosen_tokens"][r, :s], batch["rejected_tokens"][r, :s])
    for side in ("chosen", "rejected"):
      assert batch[f"{side}_loss_mask"][r, :s].sum() == 0
      np.testing.assert_array_equal(batch[f"{side}_loss_mask"][r], pairs[r][f"{side}_loss_mask"].tolist()
                                    + [0] * (16 - len(pairs[r][f"{side}_loss_mask"])))
  np.testing.assert_array_equal(batch["example_id"], [batching.example_id("pair-0"),
                                                      batching.example_id("pair-1")])
  assert counts["tokens"] == (3 + 4) + (3 + 6) + (4 + 4) + (4 + 5)
  # Last pass batch: one pair and one padding row (no masks, example_id -1).
  last, _ = batches[-1]
  assert last["example_id"][1] == -1 and last["shared_len"][1] == 0
  assert last["chosen_loss_mask"][1].sum() == 0 and last["rejected_segment_ids"][1].sum() == 0
  assert len(list(batching.DpoBatchDataset(stream(pairs), batch_size=2, max_length=16,
                                           drop_remainder=True))) == 2


def test_example_id_is_stable_int63():
  # Golden: the id keys precomputed reference log-probs on disk; it must never change.
  assert batching.example_id("pair-0") == batching.example_id("pair-0")
  # blake2b-64 of the UTF-8 id, little endian, top bit cleared.
  assert batching.example_id("rw_train.jsonl:17") == 874873708604069919
  ids = {batching.example_id(f"x{i}") for i in range(1000)}
  assert len(ids) == 1000 and min(ids) >= 0 and max(ids) < 2**63


@pytest.mark.parametrize("pack", [True, False])
def test_state_restores_the_following_batches(pack):
  rng = np.random.default_rng(1)
  examples = [sft_example(i, int(n)) for i, n in enumerate(rng.integers(3, 30, size=40))]
  ds = batching.SftBatchDataset(stream(examples), pack=pack, batch_size=2, max_length=32)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert bool(state["pool"]) == pack  # packed: the lookahead holds examples read, not yet placed
  rest = [b for b, _ in it]
  fresh = iter(ds)
  fresh.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
  again = [b for b, _ in fresh]
  assert len(again) == len(rest) > 0
  for a, b in zip(rest, again):
    for k in batching.SFT_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_state_of_a_greedy_packer_written_before_the_lookahead_still_restores():
  """Checkpoints from before the lookahead hold {"parent": the state before the example that
  closed the last batch}; the greedy packer's state now names that example in its pool."""
  examples = [sft_example(i, int(n)) for i, n in enumerate(np.random.default_rng(2).integers(3, 30, 40))]
  ds = batching.SftBatchDataset(stream(examples), pack=True, batch_size=2, max_length=32,
                                pack_window=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert len(state["pool"]) == 1 and state["pool"][0][1] == 1  # passed over by one batch
  old = {"parent": state["pool"][0][0]}
  rest = [b for b, _ in it]
  fresh = iter(ds)
  fresh.set_state(old)
  again = [b for b, _ in fresh]
  assert len(again) == len(rest) > 0
  for a, b in zip(rest, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_endless_stream_of_dropped_examples_raises_after_one_pass():
  """Ids may repeat (a caller's MapDataset): 2n - 1 consecutive drops still hold a whole pass."""
  dropped = [{"id": "same", "dropped": "dropped/prompt_too_long"}] * 3
  endless = grain.MapDataset.source(dropped).repeat(None).to_iter_dataset(
      grain.ReadOptions(num_threads=0))
  ds = batching.SftBatchDataset(endless, batch_size=2, max_length=8, records_per_pass=3,
                                source_name="x.jsonl")
  with pytest.raises(batching.NoBatchError, match=r"data of x.jsonl: .*3 records .*"
                     r"dropped/prompt_too_long: 5"):
    next(iter(ds))


def prompt_group(g: int, n_pairs: int, steps: int = 6) -> dict:
  """One prompt's process pairs (as ``pipeline.dpo_batches(share_prompts=True)`` hands them on):
  pair k shares the prompt and the first k steps of one rejected trajectory."""
  prompt, trajectory = [1000 * g + 1, 1000 * g + 2], list(range(1000 * g + 10, 1000 * g + 10 + steps))
  pairs = []
  for k in range(1, n_pairs + 1):
    shared = prompt + trajectory[:k]
    chosen, rejected = [1000 * g + 500 + k, 1000 * g + 600], trajectory[k:]
    mask = lambda rest: np.asarray([0] * len(shared) + [1] * len(rest), np.int32)
    pairs.append({"id": f"g{g}p{k}", "shared_len": len(shared),
                  "chosen_tokens": np.asarray(shared + chosen, np.int32),
                  "chosen_loss_mask": mask(chosen),
                  "rejected_tokens": np.asarray(shared + rejected, np.int32),
                  "rejected_loss_mask": mask(rejected)})
  return {"id": f"g{g}", "pairs": pairs, "events": []}


def tree_batches_pairs(batches) -> list[int]:
  return [int(i) for b in batches for i in b["example_id"].reshape(-1) if i >= 0]


@pytest.mark.parametrize("window", [0.0, 2.0])
def test_prompt_groups_larger_than_a_batch_go_through_and_restore(window):
  """A prompt's pairs in trees of at most 2 pairs (``pairs_per_row``) and 16 slots: a group of 5
  makes 3 trees, more than a batch of one row holds, so its trees are placed one by one (across
  batches), every pair exactly once; a state saved mid-group replays the same batches."""
  groups = [prompt_group(g, n) for g, n in enumerate([5, 1, 3, 4, 2, 5, 1])]
  ds = batching.DpoTreeBatchDataset(stream(groups), batch_size=1, max_length=16, pairs_per_row=2,
                                    pack_window=window)
  batches = [b for b, _ in ds]
  want = sorted(batching.example_id(p["id"]) for g in groups for p in g["pairs"])
  assert sorted(tree_batches_pairs(batches)) == want
  assert max(int((b["example_id"] >= 0).sum()) for b in batches) == 2  # two pairs share a tree
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  assert any(part > 0 for _, _, part in state["pool"]) or window == 0.0
  rest = [b for b, _ in it]
  fresh = iter(ds)
  fresh.set_state(json.loads(json.dumps(state)))
  again = [b for b, _ in fresh]
  assert len(again) == len(rest) > 0
  for a, b in zip(rest, again):
    for k in batching.TREE_KEYS + batching.SPAN_KEYS + ("example_id",):
      np.testing.assert_array_equal(a[k], b[k])
