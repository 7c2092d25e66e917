"""The grain pipelines end to end: real sources, the bundled HF tokenizer, determinism, per-process
shares, resume from saved iterator state, counted drops, and packed == unpacked model outputs."""

import collections
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from saro_jax.data import batching, pipeline


@pytest.fixture(scope="module")
def tok():
  import transformers
  from saro_jax.data import bundled
  return transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))


def rw_records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = " ".join(f"w{j}" for j in range(int(rng.integers(2, 30))))
    out.append({"id": f"rw-{i}", "category": None, "messages": [
        {"role": "user", "content": f"question {i}: {words}?"},
        {"role": "assistant", "content": f"<think>\nabout {i}\n</think>\n\nanswer {i} {words}"}]})
  return out


def pref_records(n: int) -> list[dict]:
  return [{"id": f"p-{i}", "kind": "process", "category": None,
           "prompt": [{"role": "user", "content": f"request {i}"}], "prefix": f"<think>\nstep {i}\n",
           "chosen": f"Wait, unsafe {i}.\n</think>\n\nNo.", "rejected": f"go {i}\n</think>\n\nYes."}
          for i in range(n)]


def sft(tok, records, **kw):
  args = dict(batch_size=4, max_length=128, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.sft_batches(grain.MapDataset.source(records), tok, **args)


def dpo(tok, records, **kw):
  args = dict(batch_size=4, max_length=128, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.dpo_batches(grain.MapDataset.source(records), tok, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bundled_sources_give_contract_batches(tok):
  it = pipeline.sft_batches("bundled:rw_train", tok, batch_size=8, max_length=256, seed=0,
                            process_index=1, process_count=2)
  batch = next(it)
  assert tuple(batch) == batching.SFT_KEYS
  assert all(v.shape == (4, 256) and v.dtype == np.int32 for v in batch.values())  # 8 / 2 hosts
  assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
  stats = it.stats.as_dict()
  assert stats["source/kept"] == 620 and stats["examples"] >= 4 and 0 < stats["fill"] <= 1
  pairs = pipeline.dpo_batches("bundled:pairs_train", tok, batch_size=4, max_length=512, seed=0,
                               process_index=0, process_count=1)
  batch = next(pairs)
  assert tuple(batch) == batching.DPO_KEYS and batch["example_id"].min() >= 0
  for r in range(4):
    s = batch["shared_len"][r]
    assert np.array_equal(batch["chosen_tokens"][r, :s], batch["rejected_tokens"][r, :s])
    assert batch["chosen_loss_mask"][r].sum() > 0 and batch["rejected_loss_mask"][r].sum() > 0


def test_seed_determines_the_batches(tok):
  records = rw_records(30)
  a, b, c = (take(sft(tok, records, seed=s), 4) for s in (3, 3, 4))
  assert all(same(x, y) for x, y in zip(a, b))
  assert not all(same(x, y) for x, y in zip(a, c))


def test_every_epoch_is_a_new_permutation_of_the_share(tok):
  ids = [int(i) for b in dpo(tok, pref_records(12), num_epochs=3) for i in b["example_id"]]
  assert len(ids) == 36
  epochs = [ids[0:12], ids[12:24], ids[24:36]]
  expected = sorted(batching.example_id(f"p-{i}") for i in range(12))
  assert all(sorted(e) == expected for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  unshuffled = [int(i) for b in dpo(tok, pref_records(12), num_epochs=1, shuffle=False)
                for i in b["example_id"]]
  assert unshuffled == [batching.example_id(f"p-{i}") for i in range(12)]


def test_process_shares_are_disjoint_equal_and_cover(tok):
  records = pref_records(20)
  shares = []
  for p in range(3):
    it = dpo(tok, records, batch_size=3, num_epochs=1, process_index=p, process_count=3)
    ids = [int(i) for b in it for i in b["example_id"] if i >= 0]
    shares.append(ids)
    assert it.stats.counts["dropped/process_remainder"] == 2
  assert [len(s) for s in shares] == [6, 6, 6]
  union = set().union(*map(set, shares))
  assert len(union) == 18 and union <= {batching.example_id(r["id"]) for r in records}
  # The share is fixed: a second epoch on a process sees the same records again ...
  two = dpo(tok, records, batch_size=3, num_epochs=2, process_index=1, process_count=3)
  ids = [int(i) for b in two for i in b["example_id"] if i >= 0]
  assert sorted(ids[:6]) == sorted(ids[6:]) == sorted(shares[1])
  # ... and an unshuffled pass with another seed (the reference log-probs) covers the same share.
  plain = dpo(tok, records, batch_size=3, num_epochs=1, shuffle=False, seed=99, process_index=1,
              process_count=3)
  ids = [int(i) for b in plain for i in b["example_id"] if i >= 0]
  assert ids == [batching.example_id(f"p-{i}") for i in (1, 4, 7, 10, 13, 16)]
  assert sorted(ids) == sorted(shares[1])


@pytest.mark.parametrize("pack", [True, False])
def test_resume_mid_epoch_replays_the_same_batches(tok, pack):
  records = rw_records(25)
  it = sft(tok, records, pack=pack, num_epochs=3, batch_size=2)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  stats_then = dict(it.stats.counts)
  rest = list(it)
  resumed = sft(tok, records, pack=pack, num_epochs=3, batch_size=2)
  resumed.set_state(state)
  assert dict(resumed.stats.counts) == stats_then
  again = list(resumed)
  assert len(again) == len(rest) > 5  # crosses epoch boundaries
  assert all(same(x, y) for x, y in zip(rest, again))
  assert resumed.stats.counts == it.stats.counts


def test_drops_and_truncations_reach_the_stats(tok):
  records = rw_records(10)
  records[3]["messages"][0]["content"] = "long " * 300
  records[7]["messages"][1]["content"] = "long " * 300
  it = sft(tok, records, max_length=256, num_epochs=1, shuffle=False, pack=False, batch_size=3)
  batches = list(it)
  stats = it.stats.as_dict()
  assert stats["dropped/prompt_too_long"] == 1 and stats["dropped"] == 1
  assert stats["truncated/response"] == 1 and stats["examples"] == 9
  assert sum(int(b["segment_ids"].max(axis=1).astype(bool).sum()) for b in batches) == 9
  assert max(int((b["segment_ids"] > 0).sum(axis=1).max()) for b in batches) == 256


def test_errors_are_clear(tok):
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    sft(tok, rw_records(6), batch_size=4, process_count=3)
  with pytest.raises(ValueError, match="single|process_count == 1"):
    sft(tok, rw_records(6), length_buckets=(64, 128), process_index=0, process_count=2)
  with pytest.raises(ValueError, match="empty"):
    pipeline.sft_batches(" , ", tok, batch_size=2, max_length=64, process_index=0, process_count=1)


def test_packed_and_unpacked_batches_give_the_same_model_log_probs(tok):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from saro_jax import models

  config = models.ModelConfig(family="llama", vocab_size=len(tok), hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=8, rope_theta=5000.0, max_position_embeddings=256)

  @jax.jit
  def token_logps(batch):
    # Built inside jit: one compilation for init + forward (the eager init is slow on 2 cores).
    model = models.Transformer(config, rngs=nnx.Rngs(0))
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]

  def per_example(it):
    """Token-tuple of each segment -> its summed log-prob over the loss mask."""
    out = {}
    for batch in it:
      logp = np.asarray(token_logps({k: jnp.asarray(v) for k, v in batch.items()}))
      mask = batch["loss_mask"][:, 1:]
      for r in range(batch["tokens"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
          where = np.flatnonzero(batch["segment_ids"][r] == s)
          key = tuple(batch["tokens"][r, where].tolist())
          out[key] = float((logp[r, where[1:] - 1] * mask[r, where[1:] - 1]).sum())
    return out

  records = rw_records(12)
  packed = per_example(sft(tok, records, pack=True, num_epochs=1, max_length=128, batch_size=2))
  padded = per_example(sft(tok, records, pack=False, num_epochs=1, max_length=128, batch_size=2))
  assert packed.keys() == padded.keys() and len(packed) == 12
  # Error model (tests/error_model.py): one jitted program on two layouts; a summed log-prob of
  # n <= 128 tokens has the logits' depth, + logsumexp over the vocabulary, + the n-term sum of
  # same-sign terms, so it is relative to |sum| itself.
  import error_model as em
  depth = em.loss_depth(em.model_depth(config, 128), vocab=len(tok), tokens=128)
  excess = max(abs(packed[k] - padded[k]) / em.max_bound(abs(padded[k]), depth) for k in packed)
  print(f"packed vs padded summed log-probs: worst |d| / bound = {excess:.2e}")
  assert excess <= 1.0, excess
  assert min(abs(v) for v in packed.values()) > 1.0


@pytest.mark.heavy
def test_multiprocess_prefetch_is_deterministic_and_resumable(tok):
  records = rw_records(24)
  kw = dict(pack=True, num_epochs=2, batch_size=2, prefetch_workers=2)
  first = sft(tok, records, **kw)
  try:
    head = take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    tail = take(first, 4)
  finally:
    first.close()
  second = sft(tok, records, **kw)
  try:
    assert all(same(x, y) for x, y in zip(head, take(second, 3)))
  finally:
    second.close()
  resumed = sft(tok, records, **kw)
  try:
    resumed.set_state(state)
    assert all(same(x, y) for x, y in zip(tail, take(resumed, 4)))
  finally:
    resumed.close()
  counts = collections.Counter()
  counts.update(resumed.stats.counts)
  assert counts["examples"] > 0


@pytest.mark.parametrize("num_epochs", [0, 1])
def test_all_records_dropped_is_an_error_not_a_hang(tok, tmp_path, num_epochs):
  """Issue 8 §3.1: the only record's prompt exceeds max_length; the endless stream used to skip
  it forever (num_epochs=0) or end in a bare StopIteration (num_epochs=1)."""
  path = tmp_path / "long.jsonl"
  path.write_text(json.dumps({"prompt": "long " * 300, "reasoning": "r", "response": "a"}) + "\n")
  it = pipeline.sft_batches(str(path), tok, batch_size=2, max_length=64, seed=0,
                            num_epochs=num_epochs, process_index=0, process_count=1)
  with pytest.raises(batching.NoBatchError) as info:
    next(it)
  message = str(info.value)
  assert str(path) in message and "1 records" in message
  assert "dropped/prompt_too_long: 1" in message and "long.jsonl:1" in message


def test_all_pairs_dropped_names_every_reason(tok):
  records = pref_records(3)
  records[0]["prompt"][0]["content"] = "long " * 300
  records[1]["chosen"] = "long " * 300 + "\n</think>\n\nNo."
  records[2]["prompt"][0]["content"] = "long " * 300
  it = dpo(tok, records, max_length=64, response_truncation="drop")
  with pytest.raises(batching.NoBatchError,
                     match=r"3 records .*dropped/prompt_too_long: 2, dropped/response_too_long: 1"):
    next(it)


def test_some_records_dropped_still_train(tok):
  """The check counts a whole pass of drops; a few long records among short ones are skipped."""
  records = rw_records(6)
  for i in (0, 2, 3, 5):
    records[i]["messages"][0]["content"] = "long " * 300
  it = sft(tok, records, max_length=256, batch_size=1, pack=False)  # endless
  batches = take(it, 10)  # 5 passes over the 2 short records
  assert len(batches) == 10 and it.stats.as_dict()["dropped/prompt_too_long"] >= 16


@pytest.mark.heavy
def test_main_exits_with_the_drop_counts_when_every_record_is_dropped(tmp_path):
  """The issue's repro through ``python -m saro_jax.main``: it used to sit at 0 % forever."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = tmp_path / "long.jsonl"
  data.write_text(json.dumps({"prompt": "long " * 3000, "reasoning": "r", "response": "a"}) + "\n")
  cmd = [sys.executable, "-m", "saro_jax.main", "--config", "configs/rw.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data.sources={data}",
         "--config.train.steps=2", "--config.opt.warmup_steps=0",
         "--config.train.progress_bar=false"]
  out = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "NoBatchError" in out.stderr and "dropped/prompt_too_long: 1" in out.stderr, out.stderr[-3000:]
