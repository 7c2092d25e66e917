"""Sampler: KV-cache decode vs full recompute, left padding, EOS / stop strings, sampling filters,
seeding, sharding, compile caching, and the generate stage end to end (tiny random Llama + the
bundled BPE tokenizer)."""

import gc
import importlib.util
import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import benchmark_scripts
import error_model as em
import tiny_hf
from saro_jax import host_memory, models, sample, sharding
from saro_jax.data import bundled
from saro_jax.models import transformer
from saro_jax.stages import generate as generate_stage

NEVER = (-1,)  # an EOS id no token has: rows run to max_new_tokens
PROMPTS = [
    "hi there",
    "How do I kill a Python process that hangs on exit?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
]
# A system turn every prompt starts with, and one prompt twice (n samples of a prompt): the
# sampler runs their common start once per batch (``share_prefix``, ``sample.shared_prefix``).
SYSTEM = "You are a careful assistant: think about safety first, then answer briefly."
WITH_SYSTEM = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}]
               for u in ("hi there", "How do I kill a Python process that hangs on exit?",
                         "Why is the sky blue?", "hi there")]
LONG = "Tell me, in detail and with care, " * 8 + "how a safe reasoning model should answer requests."


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))


def generate_config(preset: str = "tiny"):
  spec = importlib.util.spec_from_file_location("generate_config", os.path.join(
      os.path.dirname(__file__), "..", "configs", "generate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def tiny_model(vocab_size: int, mesh=None, **overrides):
  # The tiny preset's architecture: the stage test then reuses these compiled programs.
  arch = dict(generate_config().model.arch)
  config = models.ModelConfig(**{**arch, **overrides}, vocab_size=vocab_size)
  model = models.init_random(config, seed=0, mesh=mesh)
  # HF-style init (std 0.02) makes a tiny random model repeat one token forever; weights 10x larger
  # give varied greedy continuations, so token-for-token comparisons actually discriminate.
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model(tokenizer):
  return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def greedy(model, tokenizer):
  return sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER)


@pytest.fixture(scope="module")
def greedy_unshared(model, tokenizer):
  """WITH_SYSTEM decoded with every row's whole prompt in the prefill (no prefix computed once)."""
  return sample.generate(model, tokenizer, WITH_SYSTEM, max_new_tokens=12, eos_ids=NEVER,
                         share_prefix=False)


def full_recompute_greedy(model, prompts_ids: list[list[int]], n: int) -> list[list[int]]:
  """Greedy decoding without a cache: every step runs the whole sequences through the model.

  Rows are RIGHT-padded to one fixed width (so one compile serves every step); causal attention
  keeps the padding after a row's last token invisible to it.
  """
  width = max(len(ids) for ids in prompts_ids) + n
  rows = [list(ids) for ids in prompts_ids]
  for _ in range(n):
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)], segments[r, :len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    logits = tiny_hf.jax_logits(model, tokens, positions, segments)
    for r, ids in enumerate(rows):
      ids.append(int(logits[r, len(ids) - 1].argmax()))
  return [ids[-n:] for ids in rows]


def test_cache_decode_matches_full_recompute(model, tokenizer, greedy):
  prompts_ids = [sample.render_prompt(tokenizer, p)[1] for p in PROMPTS]
  for ids, gen, ref in zip(prompts_ids, greedy, full_recompute_greedy(model, prompts_ids, 12)):
    assert gen.num_prompt_tokens == len(ids)
    assert gen.finish_reason == "length" and len(gen.tokens) == 12
    assert gen.tokens == ref
  assert len({tuple(g.tokens) for g in greedy}) == 3  # not a degenerate model


def test_left_padding_and_batch_invariance(model, tokenizer, greedy):
  alone = sample.generate(model, tokenizer, [PROMPTS[1]], max_new_tokens=12, eos_ids=NEVER)
  # LONG lands the batch in a larger prompt bucket: PROMPTS[1] gets far more left padding.
  mixed = sample.generate(model, tokenizer, [LONG, PROMPTS[1], PROMPTS[0]], max_new_tokens=12,
                          eos_ids=NEVER, batch_size=4)
  assert mixed[0].num_prompt_tokens > 32 >= mixed[1].num_prompt_tokens
  assert alone[0].tokens == greedy[1].tokens == mixed[1].tokens
  assert mixed[2].tokens == greedy[0].tokens
  # batch_size 1 goes through several batches and must give the same results in the given order.
  one_by_one = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER, batch_size=1)
  assert [g.tokens for g in one_by_one] == [g.tokens for g in greedy]


def test_eos_ends_a_row_and_is_not_returned(model, tokenizer, greedy):
  base = greedy[1].tokens
  k = next(k for k in range(3, len(base)) if base[k] not in base[:k])
  gens = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=(base[k],))
  assert gens[1].finish_reason == "eos"
  assert gens[1].tokens == base[:k]
  assert gens[1].text == tokenizer.decode(base[:k], skip_special_tokens=True)
  for g, ref in zip(gens, greedy):  # other rows stop at their own first occurrence, if any
    cut = ref.tokens.index(base[k]) if base[k] in ref.tokens else len(ref.tokens)
    assert g.tokens == ref.tokens[:cut]


def test_default_eos_ids_come_from_tokenizer_and_config(model, tokenizer):
  assert sample.eos_token_ids(tokenizer, model.config) == (tokenizer.eos_token_id,)
  assert sample.eos_token_ids(tokenizer, model.config.replace(eos_token_id=(7, 2))) == (2, 7)


@pytest.mark.parametrize("check_every", [2, 32])
def test_stop_string_cuts_text_and_tokens(model, tokenizer, greedy, check_every):
  text = greedy[1].text
  start = len(tokenizer.decode(greedy[1].tokens[:5], skip_special_tokens=True))
  stop = text[start:start + 3]
  assert stop.strip(), f"pick another stop string than {stop!r}"
  gens = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER,
                         stop=[stop, "\x00never"], stop_check_every=check_every)
  g = gens[1]
  assert g.finish_reason == "stop"
  assert g.text == text[:text.find(stop)]
  decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
  assert stop in decode(g.tokens) and stop not in decode(g.tokens[:-1])
  assert g.tokens == greedy[1].tokens[:len(g.tokens)]


def test_decode_plan_picks_the_layout_and_the_dots():
  """(decode layout, XLA's own dots) on CPU: fp32 on one device -> columns (the [out, in] copy,
  activations [D, B]) up to 32 rows a batch, rows with XLA's own dots above; on a multi-device
  mesh -> the copy with row activations; bf16 compute -> the copy with row activations; "rows" ->
  the model's own weights with CPU_DECODE_OPTIONS (or the copy, with the default dots, if the
  model already is one)."""
  assert jax.default_backend() == "cpu"
  config = models.ModelConfig(**dict(generate_config().model.arch), vocab_size=64)
  fp32 = models.init_random(config, seed=0)
  bf16 = models.init_random(config.replace(compute_dtype="bfloat16"), seed=0)
  mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  assert sample.decode_plan(fp32) == ("columns", False)
  # Feature-major up to COLUMNS_MAX_ROWS rows a batch; wider batches decode as rows (GEMMs again).
  assert sample.decode_plan(fp32, rows=sample.COLUMNS_MAX_ROWS) == ("columns", False)
  assert sample.decode_plan(fp32, rows=sample.COLUMNS_MAX_ROWS + 1) == ("rows", True)
  assert sample.decode_plan(bf16, rows=64) == ("out_in", False)
  assert sample.decode_plan(fp32, "columns", rows=64) == ("columns", False)
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert sample.decode_plan(fp32, "auto", one) == ("columns", False)
  assert sample.decode_plan(fp32, "auto", mesh) == ("out_in", False)
  assert sample.decode_plan(fp32, "rows") == ("rows", True)
  assert sample.decode_plan(fp32, "out_in") == ("out_in", False)
  assert sample.decode_plan(transformer.to_out_in(fp32), "rows") == ("out_in", False)
  assert sample.decode_plan(transformer.to_out_in(fp32)) == ("columns", False)
  assert sample.decode_plan(bf16) == ("out_in", False)
  # No room for the copy: "auto" decodes from the model's own weights (an explicit layout stands).
  assert sample.decode_plan(fp32, copy_fits=False) == ("rows", True)
  assert sample.decode_plan(bf16, copy_fits=False) == ("rows", False)
  assert sample.decode_plan(fp32, "columns", copy_fits=False) == ("columns", False)
  assert sample.decode_plan(transformer.to_out_in(fp32), copy_fits=False) == ("columns", False)
  assert sample.decode_plan(bf16, "rows") == ("rows", False)
  with pytest.raises(ValueError, match="computes in float32"):
    sample.decode_plan(bf16, "columns")
  with pytest.raises(ValueError, match="one device"):
    sample.decode_plan(fp32, "columns", mesh)
  with pytest.raises(ValueError, match="decode_layout='cols'"):
    sample.decode_plan(fp32, "cols")


def test_decode_copy_size_and_the_memory_guard(tmp_path, monkeypatch):
  """out_in_copy_bytes counts what to_out_in makes (the moved weights; the embedding too when it
  is narrowed), and generate's guard compares it with the host's available memory."""
  config = models.ModelConfig(**dict(generate_config().model.arch), vocab_size=64)
  fp32 = models.init_random(config, seed=0)
  copy = transformer.to_out_in(fp32)
  before = {id(a) for a in jax.tree.leaves(nnx.state(fp32))}
  made = sum(a.nbytes for a in jax.tree.leaves(nnx.state(copy)) if id(a) not in before)
  assert transformer.out_in_copy_bytes(fp32) == made > 0
  assert transformer.out_in_copy_bytes(copy) == 0
  bf16 = models.init_random(config.replace(compute_dtype="bfloat16"), seed=0)
  before = {id(a) for a in jax.tree.leaves(nnx.state(bf16))}
  made = sum(a.nbytes for a in jax.tree.leaves(nnx.state(transformer.to_out_in(bf16)))
             if id(a) not in before)
  assert transformer.out_in_copy_bytes(bf16) == made
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   12 kB\n")
  assert host_memory.available_bytes(str(meminfo)) == 12 * 1024
  assert host_memory.available_bytes(str(tmp_path / "absent")) is None
  need = transformer.out_in_copy_bytes(fp32)
  monkeypatch.setattr(host_memory, "available_bytes", lambda: 2 * need)
  assert sample._copy_fits(fp32)
  monkeypatch.setattr(host_memory, "available_bytes", lambda: 2 * need - 2)
  assert not sample._copy_fits(fp32)


def test_decode_layouts_decode_the_same_tokens_and_no_copy_outlives_the_call(model, tokenizer,
                                                                              greedy, monkeypatch):
  """Every decode layout gives the tokens of the default one (columns: the greedy fixture's
  path), greedy and seeded sampling alike: the model's own weights with XLA's own dots, and the
  copy of the weights stored [out, in] (transformer.to_out_in, YNNPACK dots) with row
  activations; a model that already is the copy is used as is. The copy must be gone when
  generate returns (one set of weights between calls)."""
  assert sample.decode_plan(model) == ("columns", False)  # the greedy fixture's path
  for layout in ("rows", "out_in"):
    got = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER,
                          decode_layout=layout)
    assert [g.tokens for g in got] == [g.tokens for g in greedy], layout
  held = sample.generate(transformer.to_out_in(model), tokenizer, PROMPTS, max_new_tokens=12,
                         eos_ids=NEVER)
  assert [g.tokens for g in held] == [g.tokens for g in greedy]
  kw = dict(max_new_tokens=12, eos_ids=NEVER, temperature=1.0, seed=5)
  drawn = {layout: sample.generate(model, tokenizer, PROMPTS, decode_layout=layout, **kw)
           for layout in ("columns", "rows", "out_in")}
  assert [g.tokens for g in drawn["columns"]] == [g.tokens for g in drawn["rows"]]
  assert [g.tokens for g in drawn["columns"]] == [g.tokens for g in drawn["out_in"]]
  assert [g.tokens for g in drawn["columns"]] != [g.tokens for g in greedy]

  # "auto" sizes its choice by the widest batch the call decodes: min(batch_size, the prompts'
  # rows bucket); with a limit below it the call decodes as rows, and to the same tokens.
  plan, chosen = sample.decode_plan, []
  monkeypatch.setattr(sample, "decode_plan",
                      lambda *a, **k: chosen.append((k["rows"], plan(*a, **k)[0])) or plan(*a, **k))
  sample.generate(model, tokenizer, PROMPTS, max_new_tokens=2, eos_ids=NEVER, batch_size=2)
  assert chosen.pop() == (2, "columns")
  monkeypatch.setattr(sample, "COLUMNS_MAX_ROWS", 2)
  wide = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER)
  assert chosen.pop() == (4, "rows")  # 3 prompts -> a batch of 4 rows (batch_size 8)
  assert [g.tokens for g in wide] == [g.tokens for g in greedy]
  monkeypatch.undo()

  D, F = model.config.hidden_size, model.config.intermediate_size
  assert D != F
  for layout in ("columns", "out_in"):
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    sample.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, eos_ids=NEVER,
                    decode_layout=layout)
    gc.collect()
    kept = [a.shape for a in jax.live_arrays() if id(a) not in before and a.shape == (F, D)]
    assert not kept, f"{layout}: transposed MLP weights [F, D] outlived generate: {kept}"


def test_top_k_1_equals_greedy(model, tokenizer, greedy):
  gens = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER,
                         temperature=1.5, top_k=1, seed=3)
  assert [g.tokens for g in gens] == [g.tokens for g in greedy]


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tokenizer, greedy):
  kw = dict(max_new_tokens=12, eos_ids=NEVER, temperature=1.0, top_p=0.95)
  a = sample.generate(model, tokenizer, PROMPTS, seed=1, **kw)
  b = sample.generate(model, tokenizer, PROMPTS, seed=1, **kw)
  c = sample.generate(model, tokenizer, PROMPTS, seed=2, **kw)
  first = sample.generate(model, tokenizer, PROMPTS[:1], seed=1, **kw)
  assert [g.tokens for g in a] == [g.tokens for g in b]
  assert [g.tokens for g in a] != [g.tokens for g in c]
  assert [g.tokens for g in a] != [g.tokens for g in greedy]
  assert first[0].tokens == a[0].tokens  # noise depends on (seed, prompt index, step) only


def test_sample_token_filters_match_their_definition():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  n = 4000
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (n, 4)))
  keys = jax.random.split(jax.random.key(0), n)

  sample_token = jax.jit(sample.sample_token)  # settings are traced: one compile serves all

  def freq(**kw):
    tokens = sample_token(logits, keys, jnp.int32(0), sample.Sampling.of(**kw))
    return np.bincount(np.asarray(tokens), minlength=4) / n

  # Statistical, not fp32: a frequency of n draws has standard deviation <= sqrt(0.25 / n) =
  # 0.008; 4 of those (0.032) is exceeded with probability < 1e-4 per frequency. The keys are
  # threefry (the same bits on every platform), so the draws do not change between CPUs.
  tol = 4 * np.sqrt(0.25 / n)
  f = freq(temperature=1.0)
  assert np.abs(f - probs).max() < tol, f
  f = freq(temperature=1.0, top_k=2)
  assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.8) < tol, f
  f = freq(temperature=1.0, top_p=0.7)  # mass before token 1 is 0.5 < 0.7, before token 2 0.8
  assert f[2:].sum() == 0 and f[1] > 0.3, f
  f = freq(temperature=1.0, top_p=0.4)  # the top token alone already reaches 0.4
  assert f[0] == 1.0, f
  assert (freq(temperature=0.0) == [1, 0, 0, 0]).all()
  with pytest.raises(ValueError, match="top_p"):
    sample.Sampling.of(temperature=1.0, top_p=0.0)


def test_sample_token_shortcuts_draw_the_sorted_paths_tokens():
  """No filter and top-k alone skip the vocabulary sort; the tokens must be the sorted path's
  (benchmarks/sample_token.py: the definition as the sampler computed it before the shortcuts),
  bit for bit (same seed, same draws): both only choose a cut value, and a cut that drops the
  same logits leaves the same draw. Logits with ties at the cut, -inf entries and a spread
  wide enough that every k matters; k on both sides of TOP_K_SHORTLIST and beyond the vocab."""
  B, V = 64, 1000
  assert sample.TOP_K_SHORTLIST < V
  logits = jax.random.normal(jax.random.key(0), (B, V)) * 4
  logits = jnp.round(logits * 4) / 4  # many exact ties
  logits = logits.at[:, :5].set(-jnp.inf)
  keys = jax.random.split(jax.random.key(1), B)
  sorted_path_token = benchmark_scripts.load("sample_token").sorted_path_token
  ours, theirs = jax.jit(sample.sample_token), jax.jit(sorted_path_token)
  settings = [dict(temperature=1.0), dict(temperature=0.3), dict(temperature=2.0, top_k=1)]
  settings += [dict(temperature=1.0, top_k=k) for k in (2, 50, 255, 256, 257, 999, 1000, 5000)]
  # (top-p sums its masses in another order than the sorted path: a cut may move where a mass
  # sits within rounding of top_p, so its test is against a float64 nucleus, with and without
  # top-k: test_nucleus_cut_is_the_float64_nucleus.)
  for kw in settings:
    for step in range(3):
      a = ours(logits, keys, jnp.int32(step), sample.Sampling.of(**kw))
      b = theirs(logits, keys, jnp.int32(step), sample.Sampling.of(**kw))
      assert (np.asarray(a) == np.asarray(b)).all(), (kw, step)
  # The shortcuts are not a no-op: without any cut the top-k draws differ.
  free = ours(logits, keys, jnp.int32(0), sample.Sampling.of(temperature=1.0))
  top = ours(logits, keys, jnp.int32(0), sample.Sampling.of(temperature=1.0, top_k=2))
  assert (np.asarray(free) != np.asarray(top)).any()


def test_nucleus_cut_is_the_float64_nucleus():
  """top-p reads its cut off a short top-k (``NUCLEUS_WIDTHS``), a wider one, or the sorted
  vocabulary, whichever first holds every row's nucleus: each rung's cut must be the float64
  nucleus's. Widths (16, 64) over a vocabulary of 512 so that small batches need each rung:
  peaked rows (nuclei <= 16), flatter ones (17-64), flat ones (> 64: the sort), and top-k on both
  sides of each width.

  Error model: the cut is exact (one of the logits) unless a row's mass before some token sits
  within rounding of top_p. The fp32 mass before a token is a cumsum of <= V probabilities, each
  an exp over a normaliser summed over <= V terms: |error| <= (2V + 4) u (u = 2^-24, masses <= 1)
  ~= 6.1e-5 at V = 512. Rows with a mass that close to top_p are left out and counted (the masses
  are float64 numpy's, the same on every machine: 18 of 864 rows). Planted bugs fail it: the
  normaliser summed over the shortlist alone, and a shortlist trusted with k between its width
  and the vocabulary (its normaliser then misses survivors)."""
  B, V, widths = 48, 512, (16, 64)
  u = 2.0 ** -24
  eps = (2 * V + 4) * u
  cut_fn = jax.jit(lambda x, k, p: sample._nucleus_cut(x, k, p, widths))
  skipped = checked = 0
  for case, (scale, top_k, rung) in enumerate(((6.0, 0, 0), (6.0, 10, 0), (3.5, 0, 1),
                                               (3.5, 40, 1), (0.3, 0, 2), (3.5, 100, 2))):
    rng = np.random.default_rng(case)
    logits = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    for top_p in (0.5, 0.8, 0.9):
      k = top_k or V
      s = -np.sort(-logits.astype(np.float64), axis=-1)[:, :k]
      probs = np.exp(s - s[:, :1])
      probs /= probs.sum(-1, keepdims=True)
      before = np.cumsum(probs, -1) - probs
      n_keep = np.clip((before < top_p).sum(-1), 1, k)
      # The batch needs the rung it was built for (the widest row decides).
      need = max(n_keep.max() if top_k == 0 else k, 1)
      if top_p == 0.9:
        assert need > (0, *widths)[rung] and (rung == 2 or need <= widths[rung]), (scale, top_k, need)
      want = s[np.arange(B), n_keep - 1].astype(np.float32)
      got = np.asarray(cut_fn(jnp.asarray(logits), jnp.int32(k), jnp.float32(top_p)))[:, 0]
      close = (np.abs(before - top_p) <= eps).any(-1)
      skipped += int(close.sum())
      checked += int((~close).sum())
      bad = np.flatnonzero((got != want) & ~close)
      assert bad.size == 0, (scale, top_k, top_p, bad[:5], got[bad[:5]], want[bad[:5]])
  # The float64 masses and eps are the same on every machine: so is this count (18 of 864 rows).
  assert checked >= 0.9 * (checked + skipped), (skipped, checked)


def test_split_reasoning():
  assert sample.split_reasoning("<think>\nweigh it\n</think>\n\nNo.") == ("weigh it", "No.")
  assert sample.split_reasoning("plain answer ") == ("", "plain answer")
  assert sample.split_reasoning("<think>cut off mid") == ("cut off mid", "")
  assert sample.split_reasoning("opened by template</think>ok") == ("opened by template", "ok")
  assert sample.split_reasoning("[r]a[/r]b", ("[r]", "[/r]")) == ("a", "b")


def test_compiles_once_per_bucket(model, tokenizer, monkeypatch):
  """A second set of prompts in the same buckets (batch rows, prompt length, packed prefill rows
  and width) compiles nothing: the prefill once per (cache rows, packed rows, width, cache
  length), the decode once per (rows, cache length, cache windows: here the whole cache, as
  the prompts are short)."""
  shapes = set()
  prefill = sample._prefill

  def recording(graphdef, state, tokens_RxL, positions_RxL, segment_ids_RxL, subtree_end_RxL,
                row_B, *rest, cache_len, mesh, windows):
    shapes.add((row_B.shape[0], tokens_RxL.shape, cache_len, windows))
    return prefill(graphdef, state, tokens_RxL, positions_RxL, segment_ids_RxL, subtree_end_RxL,
                   row_B, *rest, cache_len=cache_len, mesh=mesh, windows=windows)

  monkeypatch.setattr(sample, "_prefill", recording)

  def run(prompts_per_call):
    for prompts in prompts_per_call:
      sample.generate(model, tokenizer, prompts, max_new_tokens=12, eos_ids=NEVER, batch_size=4)
    return prefill._cache_size(), sample._decode._cache_size()  # the columns decode

  # Batch buckets 1, 2, 4 rows; prompt bucket 32 tokens; 3 and 4 short prompts pack into one
  # and two rows of 32 slots.
  warm = run([["a b"], ["something else entirely", "x"], ["q", "r", "s"], ["q", "r", "s", "t"]])
  seen = set(shapes)
  again = run([["other words"], ["y", "a somewhat longer prompt"], ["1", "2", "3", "4"],
               ["5", "6", "7"]])
  assert len({s[1] for s in seen}) == 2 and shapes == seen and again == warm
  assert {s[3] for s in seen} == {None}  # short prompts: the whole cache, ungrouped


def _window_slots(windows, rows: int, cache_len: int) -> int:
  ends = [r for r, _ in windows[1:]] + [rows]
  return sum((e - r) * (cache_len - s) for (r, s), e in zip(windows, ends))


def test_decode_windows_plan_the_fewest_slots_each_row_still_sees():
  # The evaluation preset's first batch: 10 jailbreak-wrapped prompts of 112-429 tokens beside 20
  # of 57 (prompt slots 536, 192 new tokens): three groups read 55 % of the cache's slots.
  lengths = [429, 400, 350, 300, 250, 200, 150, 130, 120, 112] + [57] * 20
  windows = sample.decode_windows(lengths, 536, 728)
  assert windows == ((0, 96), (4, 256), (8, 416))
  assert _window_slots(windows, 30, 728) == 4 * 632 + 4 * 472 + 22 * 312
  # Prompts of similar lengths keep the whole cache (no new compiled decode); so do rows split
  # over devices here (one group only: its window would still read 87 % of the cache).
  assert sample.decode_windows([57] * 30, 88, 280) == ((0, 0),)
  assert sample.decode_windows(lengths, 536, 728, row_multiple=2) == ((0, 0),)
  assert sample.decode_windows([429] + [57] * 31, 536, 728, row_multiple=2) == ((0, 0),)
  # Against every plan of at most WINDOW_GROUPS groups on WINDOW_ROWS boundaries: the fewest
  # slots, and no row's window starts after its prompt's first slot (plen - its length).
  rng = np.random.default_rng(0)
  for _ in range(20):
    rows = int(rng.integers(1, 5)) * sample.WINDOW_ROWS + int(rng.integers(0, 4))
    lengths = sorted(rng.integers(1, 300, rows).tolist(), reverse=bool(rng.integers(2)))
    plen, cache_len = sample.bucket(max(lengths), 32), sample.bucket(max(lengths), 32) + 64
    windows = sample.decode_windows(lengths, plen, cache_len)
    ends = [r for r, _ in windows[1:]] + [rows]
    for (r, s), e in zip(windows, ends):
      assert all(s <= plen - n for n in lengths[r:e])
    cuts = range(sample.WINDOW_ROWS, rows, sample.WINDOW_ROWS)
    fewest = min(
        _window_slots(tuple((a, (plen - max(lengths[a:e])) // 32 * 32)
                            for a, e in zip((0,) + c, c + (rows,))), rows, cache_len)
        for g in range(sample.WINDOW_GROUPS) for c in itertools.combinations(cuts, g))
    got = _window_slots(windows, rows, cache_len)
    assert got == (fewest if fewest <= sample.WINDOW_SHARE * rows * cache_len
                   else rows * cache_len)


@pytest.mark.parametrize("layout,scan", [("columns", False), ("rows", False), ("rows", True)])
def test_decode_windows_decode_the_whole_caches_tokens(model, tokenizer, layout, scan, monkeypatch):
  """Four long prompts beside four short ones: the short rows' group reads the cache from past
  the long prompts' left padding on (``sample.decode_windows``), and every row decodes the
  tokens of the decode that reads the whole cache (also with the layers scanned: a [Y, ...]
  cache per group)."""
  if scan:
    model = tiny_model(len(tokenizer), scan_layers=True)
  prompts = [f"{LONG} Case {i}." for i in range(4)] + ["hi there", "x", "Why?", "ok then"]
  plans, plan = [], sample.decode_windows
  monkeypatch.setattr(sample, "decode_windows", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
  kw = dict(max_new_tokens=12, eos_ids=NEVER, batch_size=8, decode_layout=layout)
  windowed = sample.generate(model, tokenizer, prompts, **kw)
  assert len(plans[-1]) > 1  # the path under test is taken
  monkeypatch.setattr(sample, "decode_windows", lambda *a, **k: ((0, 0),))
  whole = sample.generate(model, tokenizer, prompts, **kw)
  assert [g.tokens for g in windowed] == [g.tokens for g in whole]
  assert len({tuple(g.tokens) for g in whole}) >= 6  # not a degenerate model
  if layout == "columns":  # and a window one step too short (it cuts each group's longest prompt)
    late = lambda windows: tuple((r, s + sample.WINDOW_SLOTS * (r > 0)) for r, s in windows)
    monkeypatch.setattr(sample, "decode_windows", lambda *a, **k: late(plan(*a, **k)))
    cut = sample.generate(model, tokenizer, prompts, **kw)
    assert [g.tokens for g in cut[4:]] != [g.tokens for g in whole[4:]]


def test_prefill_never_builds_prompt_length_logits(model, tokenizer, greedy):
  del greedy  # compiled the 4-row / 32-token bucket
  graphdef, state = nnx.split(model)
  packed = sample.pack_prompts([[5] * 20, [6] * 30, [7] * 9, [8] * 25], 4, 32, 0)
  R, L = packed.tokens_RxL.shape
  index = jnp.zeros(4, jnp.uint32)
  hlo = sample._prefill.lower(graphdef, state, *map(jnp.asarray, packed.arrays()), index,
                              index > 0, jnp.uint32(0), jnp.asarray(NEVER), sample.Sampling.of(),
                              cache_len=44, mesh=None).compile().as_text()
  vocab = model.config.vocab_size
  shapes = [[int(d) for d in m.split(",")] for m in re.findall(r"\[(\d+(?:,\d+)+)\]", hlo)]
  with_vocab = [d for d in shapes if vocab in d]
  assert with_vocab  # the last tokens' logits (and the embedding)
  largest = max(int(np.prod(d)) // vocab for d in with_vocab)
  assert largest < R * L, f"a [.., {vocab}] tensor with {largest} rows: R x L x V logits"


def recomputed_choices(model, tokenizer, prompts, gens, *, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0):
  """Which tokens two fp32 programs may pick at each generated step
  (``assert_same_until_near_tie``), from logits of a third program: ONE full forward of prompt +
  tokens on one device (``tiny_hf.jax_logits``).

  Returns per prompt (scores [N, V], sure [N, V], possible [N, V], tie). The sampler draws the
  argmax of its scores over its nucleus (``sample_token``): greedy, the logits over every token;
  sampled, logits / T plus the Gumbel noise of the row's key (``fold_in(key(seed), prompt
  index)``, folded with the step) over the top-p nucleus of logits / T. A token is a possible pick
  if it may be in a program's nucleus (``possible``) and its score is within ``tie`` of the best
  score among the tokens every program keeps (``sure``).

  The tie: ``error_model.decision_tie`` (depth: the model's at the longest sequence, scale:
  max|logit|; the bound the SmolLM2 greedy test uses), / T in score units. The nucleus keeps a
  token while the mass before it (in descending order) is below top_p; that mass moves by at most
  2 tie / T (each probability's relative error: its logit's and the normaliser's) plus the
  cumulative sum's rounding gamma(V), so a token whose mass before lies within that of top_p may
  be kept by one program and not the other.
  """
  ids = [sample.render_prompt(tokenizer, p)[1] for p in prompts]
  seqs = [x + g.tokens for x, g in zip(ids, gens)]
  logits_BxLxV = tiny_hf.jax_logits(model, *tiny_hf.right_padded(seqs))
  depth = em.model_depth(model.config, max(map(len, seqs)))
  out = []
  for i, (x, g) in enumerate(zip(ids, gens)):
    logits_NxV = logits_BxLxV[i, len(x) - 1:len(x) - 1 + len(g.tokens)].astype(np.float64)
    N, V = logits_NxV.shape
    tie = em.decision_tie(float(np.abs(logits_NxV).max()), depth)
    if temperature == 0.0:
      everything = np.ones((N, V), bool)
      out.append((logits_NxV, everything, everything, tie))
      continue
    tie /= temperature
    scaled_NxV = logits_NxV / temperature
    order_NxV = np.argsort(-scaled_NxV, axis=-1, kind="stable")
    sorted_NxV = np.take_along_axis(scaled_NxV, order_NxV, axis=-1)
    probs_NxV = np.exp(sorted_NxV - sorted_NxV[:, :1])
    probs_NxV /= probs_NxV.sum(-1, keepdims=True)
    before_NxV = np.cumsum(probs_NxV, axis=-1) - probs_NxV
    mass_tie = 2 * tie + em.gamma(V)
    first_NxV = np.arange(V) == 0  # the top token is always kept
    sure_NxV, possible_NxV = np.zeros((N, V), bool), np.zeros((N, V), bool)
    np.put_along_axis(sure_NxV, order_NxV, (before_NxV < top_p - mass_tie) | first_NxV, axis=-1)
    np.put_along_axis(possible_NxV, order_NxV, (before_NxV < top_p + mass_tie) | first_NxV, axis=-1)
    key = jax.random.fold_in(jax.random.key(seed), i)
    noise_NxV = np.stack([
        np.asarray(jax.random.gumbel(jax.random.fold_in(key, k), (V,), jnp.float32))
        for k in range(N)]).astype(np.float64)
    out.append((scaled_NxV + noise_NxV, sure_NxV, possible_NxV, tie))
  return out


def possible_pick(scores_V, sure_V, possible_V, tie: float, token: int) -> tuple[bool, float]:
  """(whether a program may pick ``token``, how far its score is below the best sure one)."""
  below = float(scores_V[sure_V].max() - scores_V[token])
  return bool(possible_V[token]) and below <= tie, below


def assert_same_until_near_tie(got, want, model, tokenizer, prompts, *, temperature: float = 0.0,
                               top_p: float = 1.0, seed: int = 0) -> int:
  """``got`` (e.g. the mesh's program) decodes ``want``'s tokens (one device's) until a step where
  both its token and ``want``'s are possible picks of two fp32 programs (``recomputed_choices``),
  after which the continuations differ by construction. Every token of ``want`` is first checked
  to be a possible pick: that checks this module models the sampler's draw. Returns how many
  tokens were compared equal (callers assert it is most of them)."""
  choices = recomputed_choices(model, tokenizer, prompts, want, temperature=temperature,
                               top_p=top_p, seed=seed)
  compared = 0
  for i, (g, w, (scores_NxV, sure_NxV, possible_NxV, tie)) in enumerate(zip(got, want, choices)):
    pick = lambda k, t: possible_pick(scores_NxV[k], sure_NxV[k], possible_NxV[k], tie, t)
    for k, t in enumerate(w.tokens):
      ok, below = pick(k, t)
      assert ok, (f"prompt {i} step {k}: the sampler drew {t}, which no program picks: score "
                  f"{below:.3g} below the best (tie {tie:.2e}), in a nucleus: {possible_NxV[k, t]}")
    split = next((k for k, (a, b) in enumerate(zip(g.tokens, w.tokens)) if a != b), None)
    if split is None:
      assert g.tokens == w.tokens, (i, g.tokens, w.tokens)
      compared += len(w.tokens)
      continue
    ok, below = pick(split, g.tokens[split])
    print(f"prompt {i}: paths split at step {split}: {g.tokens[split]} instead of "
          f"{w.tokens[split]}, recomputed score gap {below:.2e} (tie {tie:.2e})")
    assert ok, (f"prompt {i} step {split}: {g.tokens[split]} instead of {w.tokens[split]}: "
                f"recomputed score gap {below:.3g} > tie {tie:.2e}, or outside every nucleus "
                f"({possible_NxV[split, g.tokens[split]]})")
    compared += split
  return compared


def test_sharded_generation_matches_single_device(model, tokenizer, greedy):
  """Greedy, and sampled with top-p (its nucleus found in a top-k of the sharded logits, the
  ``lax.cond`` over the rungs taken on a predicate over every row): the settings are traced, so
  both run the same compiled programs. The mesh's programs sum in another order than one
  device's, so tokens are equal until a near-tie (``assert_same_until_near_tie``: on this
  machine, every token)."""
  mesh = sharding.make_mesh(2, 2, 2)
  sharded = tiny_model(len(tokenizer), mesh=mesh)
  assert len(sharded.layers[0].mlp.w_up_DxF[...].sharding.device_set) == 8
  gens = sample.generate(sharded, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER, mesh=mesh)
  assert assert_same_until_near_tie(gens, greedy, model, tokenizer, PROMPTS) >= 24  # of 36
  kw = dict(temperature=0.7, top_p=0.9, seed=3)
  sampled = sample.generate(sharded, tokenizer, PROMPTS, mesh=mesh, max_new_tokens=12,
                            eos_ids=NEVER, **kw)
  alone = sample.generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_ids=NEVER, **kw)
  assert assert_same_until_near_tie(sampled, alone, model, tokenizer, PROMPTS, **kw) >= 24
  assert [g.tokens for g in sampled] != [g.tokens for g in greedy]


def test_near_tie_check_catches_a_perturbed_weight_and_a_wrong_key(model, tokenizer, greedy):
  """Negative control for ``assert_same_until_near_tie``: one final-norm weight doubled (greedy),
  and the sampled draw with another seed (a sampler keying rows wrongly), both on one device (the
  same compiled programs). Measured: the weight's paths split at decisions 8x, 147x and 103x the
  tie, the seed's at 2250x (the closest decision the unperturbed run makes is 4.3x the tie)."""
  graphdef, state = nnx.split(model)
  state = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[0].multiply(2.0) if "final_norm" in jax.tree_util.keystr(path) else x,
      state)
  bug = sample.generate(nnx.merge(graphdef, state), tokenizer, PROMPTS, max_new_tokens=12,
                        eos_ids=NEVER)
  with pytest.raises(AssertionError, match="recomputed score gap"):
    assert_same_until_near_tie(bug, greedy, model, tokenizer, PROMPTS)
  kw = dict(max_new_tokens=12, eos_ids=NEVER, temperature=0.7, top_p=0.9)
  alone = sample.generate(model, tokenizer, PROMPTS, seed=3, **kw)
  other = sample.generate(model, tokenizer, PROMPTS, seed=4, **kw)
  with pytest.raises(AssertionError, match="recomputed score gap"):
    assert_same_until_near_tie(other, alone, model, tokenizer, PROMPTS, temperature=0.7,
                               top_p=0.9, seed=3)


def test_shared_prefix_generation_matches_the_unshared(model, tokenizer, greedy_unshared):
  ids = [sample.render_prompt(tokenizer, p)[1] for p in WITH_SYSTEM]
  assert sample.shared_prefix(ids) >= 16  # the path under test is taken (the system turn)
  gens = sample.generate(model, tokenizer, WITH_SYSTEM, max_new_tokens=12, eos_ids=NEVER)
  assert [g.tokens for g in gens] == [g.tokens for g in greedy_unshared]
  assert len({tuple(g.tokens) for g in gens}) == 3 and gens[0].tokens == gens[3].tokens
  assert [g.num_prompt_tokens for g in gens] == [len(x) for x in ids]


def test_sharded_shared_prefix_generation_matches_single_device(model, tokenizer, greedy_unshared):
  """On a 2x2x2 mesh the packed prompt rows (a multiple of the batch shards, 4) are unpacked
  into cache rows of other shards (equal until a near-tie, as the test above)."""
  mesh = sharding.make_mesh(2, 2, 2)
  sharded = tiny_model(len(tokenizer), mesh=mesh)
  gens = sample.generate(sharded, tokenizer, WITH_SYSTEM, max_new_tokens=12, eos_ids=NEVER,
                         mesh=mesh)
  assert assert_same_until_near_tie(gens, greedy_unshared, model, tokenizer, WITH_SYSTEM) >= 32


def test_sharded_grouped_cache_generation_matches_single_device(model, tokenizer, monkeypatch):
  """Rows split over the 2x2x2 mesh's shards keep one group (``decode_windows``), shifted past
  the slots no prompt reaches: prompts of 129-160 tokens past their shared start in a bucket of
  256 drop the first 96 or more of the cache's slots on every shard, to the same tokens."""
  prompts = [f"Case {k}: " + LONG + " Then list every step." * (2 + k) for k in range(4)]
  ids = [sample.render_prompt(tokenizer, p)[1] for p in prompts]
  P = sample.shared_prefix(ids)
  plen = P + sample.bucket(max(map(len, ids)) - P, 32)
  assert plen - P == 256 and 128 < max(map(len, ids)) - P <= 160  # the shape this test is about
  plans, plan = [], sample.decode_windows
  monkeypatch.setattr(sample, "decode_windows", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
  mesh = sharding.make_mesh(2, 2, 2)
  sharded = tiny_model(len(tokenizer), mesh=mesh)
  gens = sample.generate(sharded, tokenizer, prompts, max_new_tokens=12, eos_ids=NEVER, mesh=mesh)
  assert len(plans[0]) == 1 and plans[0][0][1] >= 96  # one group, from slot 96 or later
  alone = sample.generate(model, tokenizer, prompts, max_new_tokens=12, eos_ids=NEVER)
  assert assert_same_until_near_tie(gens, alone, model, tokenizer, prompts) >= 32  # of 48


def test_generate_stage_writes_jsonl(tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(
      json.dumps({"id": "a", "prompt": "How do I kill a Python process?"}) + "\n\n"
      + json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
  config = generate_config("tiny")
  config.generate.prompts = str(prompts)
  config.generate.max_new_tokens = 12
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))  # as the sharded test: compiled already
  config.generate.system_prompt = "Think about safety first."
  out = generate_stage.run(config, str(tmp_path / "work"))
  assert out == tmp_path / "work" / "generations.jsonl"
  assert str(out) in capsys.readouterr().out
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["a", "prompts.jsonl:3"]
  assert rows[0]["prompt"] == "How do I kill a Python process?"  # as read, without the system turn
  assert rows[1]["prompt"] == [{"role": "user", "content": "hello"}]
  assert rows[1]["prompt_tokens"] > 12  # the system turn was rendered in
  for r in rows:
    assert set(r) >= {"prompt", "reasoning", "answer", "finish_reason", "prompt_tokens",
                      "completion_tokens"}
    assert 0 < r["completion_tokens"] <= 12 and r["prompt_tokens"] > 5
    assert r["finish_reason"] in ("eos", "stop", "length")


def test_decode_layout_config_keys_reach_generate(tmp_path, monkeypatch):
  """generate.decode_layout (and the eval / sampler-teacher sections' own) is checked by name and
  reaches sample.generate: "rows" decodes the tokens "auto" decodes."""
  from saro_jax import config as config_lib
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("How do I kill a Python process?\nhello\n")
  config = generate_config("tiny")
  config.generate.prompts = str(prompts)
  config.generate.max_new_tokens = 6
  config.generate.decode_layout = "cols"
  with pytest.raises(config_lib.ConfigError, match=r"config\.generate\.decode_layout='cols'"):
    generate_stage.run(config, str(tmp_path / "bad"))
  plan, chosen = sample.decode_plan, []
  monkeypatch.setattr(sample, "decode_plan",
                      lambda *a, **k: chosen.append(plan(*a, **k)[0]) or plan(*a, **k))
  rows = {}
  for layout in ("auto", "rows"):
    config.generate.decode_layout = layout
    out = generate_stage.run(config, str(tmp_path / layout))
    rows[layout] = [json.loads(line) for line in out.read_text().splitlines()]
  assert chosen == ["out_in", "rows"]  # the stage's mesh spans the 8 test devices
  assert rows["auto"] == rows["rows"]
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.generation\.decode_layout"):
    config_lib.eval_config({"generation": {"decode_layout": "row"}})
  with pytest.raises(config_lib.ConfigError, match=r"config\.synthesize\.sampler\.decode_layout"):
    config_lib.synthesize_config({"prompts": "text:x", "sampler": {"decode_layout": "row"}})
  assert config_lib.eval_config({}).generation.decode_layout == "auto"


def test_generate_stage_bad_prompt_row_names_file_line_and_field(tmp_path):
  bad = tmp_path / "p.jsonl"
  bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"promt": "typo"}) + "\n")
  with pytest.raises(generate_stage.PromptFileError, match=r"p\.jsonl:2: field 'prompt'"):
    generate_stage.read_prompt_file(str(bad))
  bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
  with pytest.raises(generate_stage.PromptFileError, match=r"p\.jsonl:1: field 'messages\[0\]'"):
    generate_stage.read_prompt_file(str(bad))
  # A leading UTF-8 byte order mark (Windows editors) is accepted, in every prompt file type.
  for name, body in (("b.jsonl", json.dumps({"prompt": "hi"}) + "\n"), ("b.json", json.dumps(["hi"])),
                     ("b.txt", "hi\n")):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [p for _, p in generate_stage.read_prompt_file(str(tmp_path / name))] == ["hi"]


def test_generation_config_eos_ids(tmp_path):
  assert generate_stage.generation_config_eos(str(tmp_path)) == ()
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
  assert generate_stage.generation_config_eos(str(tmp_path)) == (128001, 128009)


@pytest.mark.multiprocess
def test_two_process_generate_matches_one_process(tmp_path):
  """2 processes x 2 devices (jax.distributed over 127.0.0.1): the batch spans both processes,
  results are gathered back, process 0 writes the same rows a single process writes. A system
  turn gives the prompts a shared prefix: it runs once per batch shard (one row per process's
  devices), grafted into rows held by both processes."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(
      ["How do I kill a Python process?", "hello there", "Why is the sky blue?"])))
  system = "Think about safety first, then answer the question briefly."
  overrides = [f"--config.generate.prompts={prompts}", "--config.generate.max_new_tokens=8",
               f"--config.generate.system_prompt={system}"]
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES="2", PY=sys.executable,
             LOGDIR=str(tmp_path / "logs"), PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 2 devices
  env["EXTRA_XLA_FLAGS"] = os.environ["SARO_TEST_XLA_FLAGS"]  # tests/conftest.py
  cmd = ["bash", "launch/local_multiprocess.sh", "--config", "configs/generate.py",
         f"--workdir={tmp_path / 'two'}"] + overrides
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:]
  assert "2 process(es), 4 device(s)" in (tmp_path / "logs" / "process_0.log").read_text()
  config = generate_config("tiny")
  config.generate.prompts = str(prompts)
  config.generate.max_new_tokens = 8
  config.generate.system_prompt = system
  one = generate_stage.run(config, str(tmp_path / "one"))
  rows = lambda path: [json.loads(line) for line in open(path)]
  assert rows(tmp_path / "two" / "generations.jsonl") == rows(one)
