"""Prefix-shared DPO rows (token trees: ``[shared | chosen | rejected]`` per pair, or a prompt's
pairs in one trie): layout, mask, sources, spans, and exactness against the unshared two-row path
(per-pair log-prob sums, DPO loss, gradients, the SRPO stage)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saro_jax import engine, logps, losses, models
from saro_jax.data import batching, bundled, pipeline
from saro_jax.models import tiled_attention, transformer
from saro_jax.models.config import ModelConfig

U = 2.0 ** -24  # fp32 unit roundoff
LAYERS = 2
MAX_LENGTH = 512  # holds every bundled pair's tree (longest 398 tokens): nothing is cut


# ----------------------------------------------------------------------------------------------
# Error model shared with test_packed_dpo.py


def logp_sum_bound(sums, lengths, *, layers: int, row_length: int, max_logit: float):
  """Largest |shared - unshared| a per-pair log-prob SUM may show from fp32 roundoff alone.

  The two layouts run the same arithmetic on the same values, except that the reductions
  (attention over the row's keys, projections, the final sum) see different lengths and orders.
  - Hidden state: each of ``layers`` blocks, and the final norm + head, adds a relative error of
    about u * sqrt(K) (random-walk roundoff of a length-K reduction; K = the row length, the
    longest reduction in a block), so eps_h = (layers + 1) * u * sqrt(row_length).
  - One token's log-prob z_target - logsumexp(z): both terms move by at most max|z| * eps_h,
    so per token 2 * max|z| * eps_h; over a completion of n tokens, n times that (worst case).
  - The sum of n log-probs itself: n * u * sum|logp| = n * u * |sum| (all terms negative).
  A real bug moves a sum by far more: one wrongly attended key or one wrong position changes
  every later token's log-prob by O(1e-2..1) for a model with O(1) logits.
  """
  sums, lengths = np.abs(np.asarray(sums, np.float64)), np.asarray(lengths, np.float64)
  eps_h = (layers + 1) * U * math.sqrt(row_length)
  return lengths * 2.0 * max_logit * eps_h + lengths * U * sums


def sensitive_model(vocab_size: int, layers: int = LAYERS):
  """A random tiny Llama whose weights are scaled x10 (std 0.2): logits of O(1..10), so attention
  and position bugs show in the log-probs (HF's std 0.02 leaves attention almost uniform)."""
  config = ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=64,
                       intermediate_size=128, num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=16, rope_theta=1000.0)
  graphdef, state = nnx.split(models.init_random(config, seed=0))
  state = jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


def mixed_pairs_file(tmp_path, n_outcome: int = 4, n_process: int = 4) -> str:
  """Outcome pairs (shared = prompt) and process pairs (shared = prompt + first reasoning steps)."""
  import json
  with open(bundled.path("pairs_train")) as f:
    records = [json.loads(line) for line in f]
  outcome = [r for r in records if r["kind"] == "outcome"][:n_outcome]
  process = [r for r in records if r["kind"] == "process" and r["prefix"]][:n_process]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in outcome + process))
  return str(path)


def first_batch(source: str, tokenizer, **kw) -> dict:
  return next(pipeline.dpo_batches(source, tokenizer, shuffle=False, num_epochs=1,
                                   process_index=0, process_count=1, **kw))


def logps_fn(model, vocab_size: int):
  """A fresh jit each call, so monkeypatched internals are traced."""
  keys = logps.TREE_KEYS
  return jax.jit(lambda b: logps.pair_logps(model, b, vocab_size=vocab_size, chunk_size=128)), keys


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tokenizer = models.load_tokenizer(bundled.path("tokenizer"))
  source = mixed_pairs_file(tmp_path_factory.mktemp("pairs"))
  model = sensitive_model(len(tokenizer))
  unshared = first_batch(source, tokenizer, batch_size=8, max_length=MAX_LENGTH)
  shared = first_batch(source, tokenizer, batch_size=8, max_length=MAX_LENGTH, prefix_sharing=True)
  np.testing.assert_array_equal(shared["example_id"][:, 0], unshared["example_id"])
  assert (unshared["shared_len"] > 0).all()
  f = jax.jit(lambda b: logps.pair_logps(model, b, vocab_size=len(tokenizer), chunk_size=128))
  ref = jax.device_get(f({k: unshared[k] for k in logps.PAIR_KEYS}))
  max_logit = float(jax.jit(lambda t, p, s: jnp.max(jnp.abs(model(t, p, s))))(
      unshared["chosen_tokens"], unshared["chosen_positions"], unshared["chosen_segment_ids"]))
  return dict(tokenizer=tokenizer, source=source, model=model, unshared=unshared, shared=shared,
              ref=ref, max_logit=max_logit)


def bound_for(setup, side: str):
  ref = setup["ref"]
  return logp_sum_bound(ref[f"{side}_logps"], ref[f"{side}_lengths"], layers=LAYERS,
                        row_length=MAX_LENGTH, max_logit=setup["max_logit"])


def shared_logps(setup, batch=None):
  model, vocab = setup["model"], len(setup["tokenizer"])
  batch = setup["shared"] if batch is None else batch
  f = jax.jit(lambda b: logps.pair_logps(model, b, vocab_size=vocab, chunk_size=128))
  return jax.device_get(f({k: batch[k] for k in logps.TREE_KEYS}))


# ----------------------------------------------------------------------------------------------
# Layout pieces


def pair(pid: str, shared, chosen, rejected) -> dict:
  s = len(shared)
  mk = lambda rest: np.asarray([0] * s + [1] * len(rest), np.int32)
  return {"id": pid, "shared_len": s,
          "chosen_tokens": np.asarray(shared + chosen, np.int32), "chosen_loss_mask": mk(chosen),
          "rejected_tokens": np.asarray(shared + rejected, np.int32),
          "rejected_loss_mask": mk(rejected)}


def test_tree_rows_layout():
  p = pair("a", [5, 6, 7], [10, 11], [20, 21, 22])
  b = batching.tree_rows([[batching.prompt_tree([p])], []], length=10, pad_id=99)
  np.testing.assert_array_equal(b["tokens"][0], [5, 6, 7, 10, 11, 20, 21, 22, 99, 99])
  # Positions restart at the branch: rejected's first token is at position shared_len.
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 3, 4, 5, 0, 0])
  # The trunk is seen by the whole tree, chosen's tokens only up to its end; padding by padding.
  np.testing.assert_array_equal(b["subtree_end"][0], [8, 8, 8, 5, 5, 8, 8, 8, 10, 10])
  # Each token is predicted by its parent: rejected's first (20) by the trunk's last (7).
  np.testing.assert_array_equal(b["source"][0], [0, 0, 1, 2, 3, 2, 5, 6, 8, 9])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * 8 + [0, 0])
  assert [b[k][0, 0] for k in batching.SPAN_KEYS] == [3, 4, 5, 7]
  assert [b[k][1, 0] for k in batching.SPAN_KEYS] == [0, -1, 0, -1]  # an empty slot
  assert b["shared_len"].tolist() == [[3], [0]]
  assert b["example_id"][0, 0] == batching.example_id("a") and b["example_id"][1, 0] == -1
  assert not b["segment_ids"][1].any()
  bad = dict(p, rejected_tokens=np.asarray([5, 6, 8, 20], np.int32))
  with pytest.raises(ValueError, match="shared_len=3"):
    batching.prompt_tree([bad])
  gap = dict(p, chosen_tokens=np.asarray([5, 6, 7, 10, 11, 12], np.int32),
             chosen_loss_mask=np.asarray([0, 0, 0, 1, 0, 1], np.int32))
  with pytest.raises(ValueError, match="pair a: chosen's scored tokens are not one contiguous"):
    batching.prompt_tree([gap])


def process_pairs():
  """Three process pairs of one prompt [9], SaRO-style: pair k shares the first k steps of one
  rejected trajectory R, then chosen corrects ([50 + k, 60]) and rejected continues R."""
  trajectory = [1, 2, 3, 4, 5]
  return [pair(f"p{k}", [9] + trajectory[:k], [50 + k, 60], trajectory[k:]) for k in (1, 2, 3)]


def test_prompt_tree_shares_every_common_prefix():
  tree = batching.prompt_tree(process_pairs())
  # One trie: prompt, the trajectory once, three corrections (12 slots; 24 as three pair trees).
  np.testing.assert_array_equal(tree["tokens"], [9, 1, 51, 60, 2, 3, 4, 5, 53, 60, 52, 60])
  np.testing.assert_array_equal(tree["positions"], [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 3, 4])
  np.testing.assert_array_equal(tree["subtree_end"], [12, 12, 4, 4, 12, 10, 8, 8, 10, 10, 12, 12])
  np.testing.assert_array_equal(tree["source"], [0, 0, 1, 2, 1, 4, 5, 6, 5, 8, 4, 10])
  spans = [[p[k] for k in batching.SPAN_KEYS] for p in tree["pairs"]]
  assert spans == [[2, 3, 4, 7], [10, 11, 5, 7], [8, 9, 6, 7]]
  # Every pair's rejected sums the trajectory from its own branch point on (a token may count for
  # several pairs); each chosen its own correction, not the tokens between first and last that
  # lie on other branches (pair p1's span 4..7 holds none; a span over slots 2..11 would).
  b = batching.tree_rows([[tree]], 12, pairs_per_row=3)
  values = jnp.asarray(2.0 ** np.arange(12, dtype=np.float32))[None]
  for side, want in (("chosen", [[2, 3], [10, 11], [8, 9]]),
                     ("rejected", [[4, 5, 6, 7], [5, 6, 7], [6, 7]])):
    sums, counts = losses.span_sums(values, jnp.asarray(b["subtree_end"]),
                                    jnp.asarray(b[f"{side}_first"]), jnp.asarray(b[f"{side}_last"]))
    assert np.asarray(sums)[0].tolist() == [float(sum(2 ** s for s in w)) for w in want], side
    assert np.asarray(counts)[0].tolist() == [len(w) for w in want]
  with_gap = batching.prompt_tree([pair("x", [9], [5, 6], [7]), pair("y", [9], [5, 8], [7])])
  np.testing.assert_array_equal(with_gap["tokens"], [9, 5, 6, 8, 7])  # chosen [5, 6] / [5, 8]
  spans = [[p[k] for k in batching.SPAN_KEYS] for p in with_gap["pairs"]]
  assert spans == [[1, 2, 4, 4], [1, 3, 4, 4]]
  b = batching.tree_rows([[with_gap]], 5, pairs_per_row=2)
  sums, counts = losses.span_sums(jnp.asarray(2.0 ** np.arange(5, dtype=np.float32))[None],
                                  jnp.asarray(b["subtree_end"]), jnp.asarray(b["chosen_first"]),
                                  jnp.asarray(b["chosen_last"]))
  assert np.asarray(sums)[0].tolist() == [2 + 4, 2 + 8]  # y's span 1..3 skips x's token at 2
  assert np.asarray(counts)[0].tolist() == [2, 2]


def test_prompt_trees_split_at_length_and_slots():
  pairs = process_pairs()  # 8 slots each alone; 10 for the first two, 12 for all three
  trees, events = batching.prompt_trees(pairs, max_length=11, max_pairs=8)
  assert [len(t["tokens"]) for t in trees] == [10, 8] and events == []
  assert [[p["id"] for p in t["pairs"]] for t in trees] == [["p1", "p2"], ["p3"]]
  trees, _ = batching.prompt_trees(pairs, max_length=64, max_pairs=2)
  assert [len(t["pairs"]) for t in trees] == [2, 1]
  trees, events = batching.prompt_trees(pairs, max_length=6, max_pairs=8, truncation="drop")
  assert trees == [] and events == ["dropped/tree_too_long"] * 3


def test_fit_tree_cuts_or_drops():
  p = pair("a", [1] * 4, [2] * 6, [3] * 3)  # tree 13
  assert len(batching.prompt_tree([batching.fit_tree(p, 13)])["tokens"]) == 13
  cut = batching.fit_tree(p, 10)  # room 6: rejected keeps 3, chosen 3
  assert len(cut["chosen_tokens"]) == 7 and len(cut["rejected_tokens"]) == 7
  assert cut["events"] == ["truncated/tree"]
  assert batching.fit_tree(p, 10, "drop")["dropped"] == "dropped/tree_too_long"
  assert batching.fit_tree(p, 5)["dropped"] == "dropped/tree_too_long"


def test_attention_mask_subtrees():
  subtree_end = jnp.asarray([[6, 6, 4, 4, 6, 6]])  # [0 1 | chosen 2 3 | rejected 4 5]
  positions = jnp.asarray([[0, 1, 2, 3, 2, 3]])
  seg = jnp.ones((1, 6), jnp.int32)
  slots = jnp.arange(6)[None]
  m = np.asarray(transformer.attention_mask(slots, seg, seg, None, subtree_end, positions))[0, 0]
  assert m[5].tolist() == [True, True, False, False, True, True]  # rejected: trunk + itself
  assert m[3].tolist() == [True, True, True, True, False, False]  # chosen: trunk + itself
  assert m[1].tolist() == [True, True, False, False, False, False]
  # The sliding window counts positions: rejected's pos 3 is 2 away from trunk pos 1.
  w = np.asarray(transformer.attention_mask(slots, seg, seg, 3, subtree_end, positions))[0, 0]
  assert w[5].tolist() == [False, True, False, False, True, True]


# ----------------------------------------------------------------------------------------------
# Exactness: shared == unshared


def test_shared_equals_unshared_logps(setup):
  out, ref = shared_logps(setup), setup["ref"]
  for side in ("chosen", "rejected"):
    np.testing.assert_array_equal(out[f"{side}_lengths"], ref[f"{side}_lengths"])
    assert (ref[f"{side}_lengths"] > 0).all()
    err = np.abs(out[f"{side}_logps"] - ref[f"{side}_logps"])
    bound = bound_for(setup, side)
    assert (err <= bound).all(), (side, err, bound)
    np.testing.assert_allclose(out[f"{side}_logit_sums"], ref[f"{side}_logit_sums"],
                               atol=float(bound.max()))


def test_tree_rows_run_tiles_of_64(setup, monkeypatch):
  # The tree rows (512 slots) take tiles of 64 (``attention_tile(L, trees=True)``); the same
  # length unshared keeps the causal rows' tile. The parity test above runs the tree tiles.
  tiles = []
  original = tiled_attention.tiled_attention

  def spy(q, k, v, mask, scale, tile, *args, **kwargs):
    tiles.append((q.shape[1], tile))
    return original(q, k, v, mask, scale, tile, *args, **kwargs)

  monkeypatch.setattr(tiled_attention, "tiled_attention", spy)
  shared_logps(setup)
  assert {t for _, t in tiles} == {64} and {n for n, _ in tiles} == {MAX_LENGTH}
  tiles.clear()
  model, vocab = setup["model"], len(setup["tokenizer"])
  jax.jit(lambda b: logps.pair_logps(model, b, vocab_size=vocab, chunk_size=128))(
      {k: setup["unshared"][k] for k in logps.PAIR_KEYS})
  length = setup["unshared"]["chosen_tokens"].shape[1]
  assert {t for _, t in tiles} == {transformer.attention_tile(length)} - {0}  # 0: query blocks


def _rejected_sees_chosen(monkeypatch):
  original = transformer.attention_mask

  def leaky(q_slot, q_seg, k_seg, window, subtree_end=None, positions=None):
    if subtree_end is not None:  # every key seen by all later slots: rejected sees chosen
      subtree_end = jnp.full_like(subtree_end, subtree_end.shape[1])
    return original(q_slot, q_seg, k_seg, window, subtree_end, positions)

  monkeypatch.setattr(transformer, "attention_mask", leaky)


@pytest.mark.parametrize("bug", ["rejected_sees_chosen", "positions_not_restarted",
                                 "rejected_first_from_chosen"])
def test_bound_catches_real_bugs(setup, bug, monkeypatch):
  batch = dict(setup["shared"])
  if bug == "rejected_sees_chosen":
    _rejected_sees_chosen(monkeypatch)
  elif bug == "positions_not_restarted":
    seg = batch["segment_ids"]
    batch["positions"] = np.where(seg > 0, np.arange(seg.shape[1])[None, :], 0).astype(np.int32)
  else:  # a plain shift: rejected's first token predicted by chosen's last
    slots = np.arange(batch["source"].shape[1], dtype=np.int32)
    batch["source"] = np.broadcast_to(np.maximum(slots - 1, 0), batch["source"].shape).copy()
  out, ref = shared_logps(setup, batch), setup["ref"]
  err = np.abs(out["rejected_logps"] - ref["rejected_logps"])
  # The bug breaks the exactness test: rejected sums leave the roundoff bound (chosen is
  # untouched by these bugs). A wrong source moves one token per pair, so only most pairs show it.
  outside = err > bound_for(setup, "rejected")
  assert outside.sum() >= (6 if bug == "rejected_first_from_chosen" else 8), (bug, err)


def test_dpo_loss_and_gradients_equal(setup):
  model, vocab, ref = setup["model"], len(setup["tokenizer"]), setup["ref"]
  beta = 0.1
  # Reference log-probs away from the policy's, so the per-pair weights sigma(-beta z) vary.
  ref_c = jnp.asarray(ref["chosen_logps"]) * 0.99
  ref_r = jnp.asarray(ref["rejected_logps"]) * 1.01

  def loss_fn(m, b, keep_logits=False):
    o = logps.pair_logps(m, b, vocab_size=vocab, chunk_size=128, keep_logits=keep_logits)
    return losses.dpo_loss(o["chosen_logps"], o["rejected_logps"], ref_c, ref_r,
                           chosen_lengths=o["chosen_lengths"],
                           rejected_lengths=o["rejected_lengths"], beta=beta)[0]

  grad = jax.jit(nnx.value_and_grad(loss_fn), static_argnums=2)
  unshared = {k: setup["unshared"][k] for k in logps.PAIR_KEYS}
  shared = {k: setup["shared"][k] for k in logps.TREE_KEYS}
  loss_u, g_u = grad(model, unshared)
  loss_s, g_s = grad(model, shared)
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  # The policy's backward reading the forward's logits (train.logps_keep_logits) instead of
  # recomputing them: the same products of the same operands, so the same loss, and gradients
  # that differ by at most the lm head's roundoff (well inside the layouts' bound below), in
  # both layouts.
  eps_h = (LAYERS + 1) * U * math.sqrt(MAX_LENGTH)
  for batch, loss, g in ((unshared, loss_u, g_u), (shared, loss_s, g_s)):
    loss_k, g_k = grad(model, batch, True)
    assert float(loss_k) == float(loss)
    assert np.linalg.norm(flat(g_k) - flat(g)) <= eps_h * np.linalg.norm(flat(g))
  g_u, g_s = flat(g_u), flat(g_s)
  # The loss is a mean over pairs of -log sigmoid(beta * z), |d/dz| <= beta, and z moves by at
  # most the chosen + rejected bounds.
  dz = bound_for(setup, "chosen") + bound_for(setup, "rejected")
  assert abs(float(loss_u) - float(loss_s)) <= beta * dz.max()
  # Gradients: forward and backward each carry the hidden-state error eps_h (same depth, same
  # reductions), and each pair's weight sigma(-beta z) moves by at most beta * dz relative.
  rel = np.linalg.norm(g_s - g_u) / np.linalg.norm(g_u)
  assert rel <= 2 * eps_h + beta * dz.max(), rel
  assert np.linalg.norm(g_u) > 0


# ----------------------------------------------------------------------------------------------
# The SRPO stage with dpo.prefix_sharing


@pytest.mark.heavy  # two short SRPO runs (the precomputed mode runs in test_packed_dpo.py)
def test_srpo_stage_prefix_sharing_matches_unshared(setup, tmp_path):
  mode = "live"
  import json
  import os
  from saro_jax.stages import srpo
  from test_stages_srpo import tiny_srpo_config

  def run(prefix_sharing: bool):
    cfg = tiny_srpo_config(mode, setup["source"], steps=2)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, max_length=MAX_LENGTH),
        dpo=dataclasses.replace(cfg.dpo, prefix_sharing=prefix_sharing))
    workdir = str(tmp_path / f"run_{prefix_sharing}")
    engine.run_stage(cfg, workdir, srpo.STAGE)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  unshared, shared = run(False), run(True)
  assert shared[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
  # Step 1 (same weights, same 8 pairs): pair means of sums over <= MAX_LENGTH tokens, bounded by
  # logp_sum_bound with the tiny config's 1 layer and a generous max|logit| of 10 (its std-0.02
  # weights give logits of O(0.1)). Later steps are not compared: Adam's first update is
  # ~lr * sign(g), so a roundoff-sized gradient entry near 0 may flip sign.
  a, b = unshared[0], shared[0]
  dz = 0.0
  for k in ("logps/chosen", "logps/rejected"):
    bound = float(logp_sum_bound(abs(a[k]), MAX_LENGTH, layers=1, row_length=MAX_LENGTH,
                                 max_logit=10.0))
    assert abs(a[k] - b[k]) <= bound, (k, a[k], b[k], bound)
    dz += bound
  assert abs(a["loss"] - b["loss"]) <= 0.1 * dz  # beta = 0.1
  assert all(math.isfinite(m["loss"]) for m in shared) and len(shared) == 2
