"""KV-cache generation: chat prompts in, decoded completions out.

Prompts are rendered through the tokenizer's chat template, sorted by length and grouped into
batches. A batch's prompts go through the model in one prefill pass PACKED (``pack_prompts``):
rows of the prefix every prompt starts with, then several prompts' remaining tokens one after
another as token trees (each sees the prefix and itself), so the pass computes about the prompts'
own tokens, not batch x longest prompt (a batch of 10 jailbreak-wrapped prompts of 112-429 tokens
beside 20 of ~50: 8 x 536 slots against 30 x 536). Their keys and values are then unpacked into
the decode cache LEFT-padded (padding is segment 0; real tokens count positions from 0), so that
every row's last prompt token sits in the same column and one decode step serves the whole batch.
Prompt lengths, packed rows and batch sizes are rounded up to a few buckets, so prefill and decode
compile once per bucket. Decoding is a ``lax.while_loop`` that stops when every row has emitted an EOS id or the
step budget is spent; stop strings are matched on the host between decode chunks (a stop string can
span token boundaries, so only detokenized text can say whether it appeared).

Sampling noise depends only on (seed, prompt index, step), never on which batch a prompt landed in.

A decode step's products have few rows (M = the batch), and on CPU their layout decides the step's
speed (``decode_plan``): in fp32 the step runs feature-major (``decode_columns``: activations
[D, B], weights from a copy stored [out, in], ``transformer.to_out_in``); with bf16 compute it keeps
row-major activations over the same copy. The copy is made once per ``generate`` call and dropped
when it returns. The prefill (many rows per product) always reads the model's own weights with
the backend's default dots.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from saro_jax import host_memory, sharding, xla_options
from saro_jax.config import DECODE_LAYOUTS
from saro_jax.data.formats import DEFAULT_TAGS as REASONING_TAGS
from saro_jax.models import decode_columns, transformer

logger = logging.getLogger(__name__)

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
PREFIX_ALIGN = 8  # a batch's shared prompt prefix is rounded down to a multiple of this


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked. temperature 0 = greedy; top_k 0 / top_p 1.0 = off.

  The values are traced (a pytree of scalars), so one compiled decode serves every setting.
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def of(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampling:
    if temperature < 0:
      raise ValueError(f"sampling temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
      raise ValueError(f"sampling top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"sampling top_p={top_p} must be in (0, 1] (1 = off)")
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


@dataclasses.dataclass
class Generation:
  prompt: Prompt  # as given
  prompt_text: str  # as rendered through the chat template
  text: str  # the completion, cut before the stop string / EOS
  tokens: list[int]  # the completion's token ids (no EOS)
  finish_reason: str  # "eos" | "stop" | "length"
  num_prompt_tokens: int


# top-k alone (top_p = 1) with k at most this many: the k-th largest logit comes from a top-k of
# this width instead of a sort of the whole vocabulary.
TOP_K_SHORTLIST = 256
# top-p: the nucleus is looked for among the top tokens of these widths in turn (a top-k each); a
# batch goes on to the next width only if some row's nucleus (or top-k set) reaches past this one,
# and to the whole vocabulary sorted past the last.
NUCLEUS_WIDTHS = (256, 4096)


def sample_token(logits_BxV: jax.Array, keys_B: jax.Array, step: jax.Array, sampling: Sampling) -> jax.Array:
  """Picks one token per row. keys_B: one typed PRNG key per row, folded with ``step``.

  Sampling follows HF's order: temperature, then top-k, then top-p over the top-k survivors.
  Each filter is a cut: logits below the row's cut value are dropped, and the categorical draw's
  noise depends only on the key and the shape, so the drawn token depends on the cut and the kept
  logits alone. None of the settings sorts the whole vocabulary unless it must (XLA:CPU takes
  ~0.9 s for that at 64 x 49152, against ~0.2 s for the SmolLM2 decode step itself):
  no filter cuts at -inf (nothing dropped); top-k alone (k <= TOP_K_SHORTLIST) cuts at the k-th
  value of a short top-k; top-p finds its cut among the top NUCLEUS_WIDTHS tokens
  (``_nucleus_cut``). The first two are bit-identical to the sorted path's tokens; the nucleus's
  probabilities are normalised over the vocabulary in its own order instead of sorted order, so
  its cut can differ from the sorted path's only where a row's mass sits within a few float32
  roundings of top_p (tests/test_sample.py).
  """

  def greedy():
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw():
    vocab = logits_BxV.shape[-1]
    logits = logits_BxV.astype(jnp.float32) / jnp.maximum(sampling.temperature, 1e-6)
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)

    def top_k_cut():
      top_BxC = jax.lax.top_k(logits, min(TOP_K_SHORTLIST, vocab))[0]
      return jax.lax.dynamic_slice_in_dim(top_BxC, jnp.minimum(k, top_BxC.shape[-1]) - 1, 1, axis=-1)

    def no_cut():
      return jnp.full((logits.shape[0], 1), -jnp.inf, logits.dtype)

    which = jnp.where(sampling.top_p < 1.0, 0, jnp.where(k >= vocab, 2,
                                                         jnp.where(k <= TOP_K_SHORTLIST, 1, 0)))
    cut_Bx1 = jax.lax.switch(which, (lambda: _nucleus_cut(logits, k, sampling.top_p), top_k_cut,
                                     no_cut))
    logits = jnp.where(logits < cut_Bx1, -jnp.inf, logits)
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(step_keys_B, logits).astype(jnp.int32)

  return jax.lax.cond(sampling.temperature == 0.0, greedy, draw)


def _nucleus_cut(logits_BxV: jax.Array, k: jax.Array, top_p: jax.Array,
                 widths: tuple[int, ...] = NUCLEUS_WIDTHS) -> jax.Array:
  """[B, 1]: each row's smallest kept logit under top-k ``k`` then top-p ``top_p`` (< 1).

  The nucleus: the top tokens in descending order, each kept while the probability mass strictly
  before it (softmax over the top-k survivors) is below top_p, at least one. Its cut is read off
  a top-k of ``widths[0]`` tokens when every row's nucleus ends inside it (the mass reaches top_p
  there) and the normaliser is known: the sum over the whole vocabulary (no top-k), or over the
  shortlist's first k (k <= width); otherwise the next width is tried (a ``lax.cond``: a batch
  pays for a wider top-k only when some row needs it), and past the last the whole vocabulary
  is sorted. SmolLM2 over 3035 positions of the recipe's synthesized traces, top_p 0.9: at
  temperature 0.5 every nucleus held <= 147 tokens; at temperature 1, 14 % held more than 256
  (at most 2706), so such batches mostly take the 4096 rung (benchmarks/README.md "Session 61").
  """
  vocab = logits_BxV.shape[-1]
  width = widths[0] if widths else vocab
  if width >= vocab:  # the whole vocabulary, sorted (descending: the values of a full sort)
    sorted_BxV = jax.lax.top_k(logits_BxV, vocab)[0]
    in_top_k_V = jnp.arange(vocab) < k
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B = jnp.clip(jnp.sum((before_BxV < top_p) & in_top_k_V, axis=-1), 1, k)
    return jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
  # The barrier keeps the top-k a top-k: with its values sliced twice (the max, below) XLA:CPU
  # rewrote it as a sort of the whole row (0.6 s at 40 x 49152 against 13 ms).
  top_BxC = jax.lax.optimization_barrier(jax.lax.top_k(logits_BxV, width)[0])
  max_Bx1 = top_BxC[:, :1]
  in_top_k_C = jnp.arange(width) < k
  exp_BxC = jnp.where(in_top_k_C, jnp.exp(top_BxC - max_Bx1), 0.0)
  # The softmax's normaliser over the top-k survivors: the whole row, or the shortlist's first k.
  total_Bx1 = jnp.where(k >= vocab, jnp.sum(jnp.exp(logits_BxV - max_Bx1), axis=-1, keepdims=True),
                        jnp.sum(exp_BxC, axis=-1, keepdims=True))
  probs_BxC = exp_BxC / total_Bx1
  before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
  kept_B = jnp.sum((before_BxC < top_p) & in_top_k_C, axis=-1)
  # The mass before a token never falls along the order, so a token outside the nucleus inside the
  # shortlist puts every later one outside too; with k between the width and the vocabulary the
  # normaliser needs the k-th value, which only a wider top-k has.
  fits = jnp.all((k <= width) | ((k >= vocab) & (kept_B < width)))
  cut_Bx1 = jnp.take_along_axis(top_BxC, jnp.clip(kept_B, 1, k)[:, None] - 1, axis=-1)
  return jax.lax.cond(fits, lambda: cut_Bx1, lambda: _nucleus_cut(logits_BxV, k, top_p, widths[1:]))


def _forward(model, cache, tokens_BxT, positions_BxT, segment_ids_BxT, cache_index, windows=None):
  """Logits of the last column [B, 1, V] and the updated cache."""
  logits_BxTxV, cache = model(tokens_BxT, positions_BxT, segment_ids_BxT, cache=cache,
                              cache_index=cache_index, last_only=True, cache_windows=windows)
  return logits_BxTxV[..., :model.config.vocab_size], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "mesh", "windows"))
def _prefill(graphdef, state, tokens_RxL, positions_RxL, segment_ids_RxL, subtree_end_RxL, row_B,
             last_B, slot_BxP, length_B, prompt_index_B, done_B, seed, eos_E, sampling: Sampling, *,
             cache_len: int, mesh: Mesh | None, windows: tuple[tuple[int, int], ...] | None = None):
  """Runs a batch's prompts, packed into R rows (``pack_prompts``), through the model in one pass,
  unpacks their keys and values into a fresh decode cache of ``cache_len`` slots per batch row
  (each prompt right-aligned in the first P = slot_BxP.shape[1] slots; with ``windows``
  (``decode_windows``) a grouped cache, each group's rows from its first slot on) and samples the
  first new token from the hidden state at each prompt's last token (no R x L x V logits)."""
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), prompt_index_B)
  with sharding.use(mesh):
    model = nnx.merge(graphdef, state)
    batch, plen = slot_BxP.shape
    hidden_RxLxD, packed = model.prefill(tokens_RxL, positions_RxL, segment_ids_RxL,
                                         subtree_end_RxL)
    last_Bx1xD = hidden_RxLxD[row_B, last_B][:, None]
    first_B = sample_token(model.logits(last_Bx1xD)[:, 0], keys_B, jnp.int32(0), sampling)
    if windows is None:
      cache = transformer.unpack_cache(packed, row_B, slot_BxP, cache_len)
    else:
      cache = tuple(transformer.unpack_cache(packed, row_B[r:e], slot_BxP[r:e, s:], cache_len - s)
                    for (r, s), e in zip(windows, transformer.group_ends(windows, batch)))
    out_BxN = jnp.zeros((batch, cache_len - plen), jnp.int32).at[:, 0].set(first_B)
    done_B = done_B | jnp.isin(first_B, eos_E)
    return dict(cache=cache, out=out_BxN, done=done_B, pos=length_B, keys=keys_B, step=jnp.int32(1))


def _decode_loop(graphdef, state, carry: dict, until, eos_E, sampling: Sampling, *, prompt_len: int,
                 mesh: Mesh | None, columns: bool = False,
                 windows: tuple[tuple[int, int], ...] | None = None):
  """Decodes until step ``until`` (exclusive) or until every row is done. ``columns``: each step
  runs feature-major (``decode_columns.decode_step``; the model must be the [out, in] copy).
  ``windows``: the carry holds a grouped cache (``decode_windows``)."""

  def cond(c):
    return (c["step"] < until) & ~jnp.all(c["done"])

  def body(c):
    step = c["step"]
    last_B = jax.lax.dynamic_index_in_dim(c["out"], step - 1, axis=1, keepdims=False)
    batch = last_B.shape[0]
    model = nnx.merge(graphdef, state)  # merged per trace of the body: no outer-trace mutation
    if columns:
      logits_BxV, cache = decode_columns.decode_step(model, c["cache"], last_B, c["pos"],
                                                     prompt_len + step - 1, windows)
    else:
      logits_Bx1xV, cache = _forward(model, c["cache"], last_B[:, None], c["pos"][:, None],
                                     jnp.ones((batch, 1), jnp.int32), prompt_len + step - 1,
                                     windows)
      logits_BxV = logits_Bx1xV[:, 0]
    new_B = sample_token(logits_BxV, c["keys"], step, sampling)
    new_B = jnp.where(c["done"], 0, new_B)  # finished rows idle; their tokens are never read
    out = jax.lax.dynamic_update_index_in_dim(c["out"], new_B, step, axis=1)
    done = c["done"] | jnp.isin(new_B, eos_E)
    return dict(cache=cache, out=out, done=done, pos=c["pos"] + 1, keys=c["keys"], step=step + 1)

  with sharding.use(mesh):
    return jax.lax.while_loop(cond, body, carry)


_DECODE_JIT = dict(static_argnames=("graphdef", "prompt_len", "mesh", "columns", "windows"),
                   donate_argnames=("carry",))
_decode = jax.jit(_decode_loop, **_DECODE_JIT)


@functools.cache
def _decode_cpu_dots():
  """``_decode`` compiled with ``xla_options.CPU_DECODE_OPTIONS``; plain ``_decode`` if this
  jaxlib's CPU compiler no longer takes them (the option is experimental)."""
  if not xla_options.cpu_takes(xla_options.CPU_DECODE_OPTIONS):
    return _decode
  return jax.jit(_decode_loop, compiler_options=xla_options.CPU_DECODE_OPTIONS, **_DECODE_JIT)


# "auto" decodes feature-major up to this many rows. Above it a step's products have enough rows
# to run as GEMMs again: at batch 64 (SmolLM2, fp32, two runs) "columns" took 255 ms a step and
# "rows" with XLA's own dots 255 and 223 (benchmarks/README.md, session 35).
COLUMNS_MAX_ROWS = 32


def decode_plan(model, layout: str = "auto", mesh: Mesh | None = None,
                copy_fits: bool = True, rows: int = 1) -> tuple[str, bool]:
  """(the decode layout, compile the decode with ``xla_options.CPU_DECODE_OPTIONS``) for
  ``generate``'s ``decode_layout``:

  - "rows": the model's own weights, activations [B, D]; on CPU in fp32 with XLA's own dots.
  - "out_in": a copy of the weights stored [out, in] (``transformer.to_out_in``), activations
    [B, D], the backend's default dots.
  - "columns": the same copy, activations [D, B] (``decode_columns``), default dots; fp32
    compute on one device only (the step declares no shardings).
  - "auto": on CPU, "columns" in fp32 on one device for batches of up to ``COLUMNS_MAX_ROWS``
    ``rows`` (SmolLM2, batch 32: 100 ms per step against 130 for "rows" with XLA's own dots;
    batch 16: 63 against 73; benchmarks/README.md, session 35), "rows" for larger batches, and
    "out_in" with a narrower compute dtype (bf16 products go through ``cpu_bf16``'s YNNPACK
    path); elsewhere "rows" with the backend's defaults. Also "rows" when the copy would not fit
    (``copy_fits`` False: ``generate`` passes whether the copy takes at most half of the host's
    available memory).

  A model that already is the copy decodes from it ("rows" then means "out_in")."""
  if layout not in DECODE_LAYOUTS:
    raise ValueError(f"decode_layout={layout!r}: one of {', '.join(DECODE_LAYOUTS)}")
  cpu = jax.default_backend() == "cpu"
  fp32 = jnp.dtype(model.config.compute_dtype) == jnp.float32
  one_device = mesh is None or mesh.size == 1
  if layout == "columns" and not one_device:
    raise ValueError(f"decode_layout='columns' runs on one device; this mesh has {mesh.size}"
                     " (use 'auto', 'rows' or 'out_in')")
  if layout == "columns" and not fp32:
    raise ValueError(f"decode_layout='columns' computes in float32; this model's compute_dtype is"
                     f" {model.config.compute_dtype} (use 'auto', 'rows' or 'out_in')")
  if layout == "auto":
    copy = cpu and (copy_fits or model.out_in)
    if copy and fp32 and one_device:
      layout = "columns" if rows <= COLUMNS_MAX_ROWS else "rows"
    else:
      layout = "out_in" if copy else "rows"
  if layout == "rows" and model.out_in:
    layout = "out_in"
  return layout, cpu and fp32 and layout == "rows"


def eos_token_ids(tokenizer, model_config=None, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """Every id that ends a turn: the tokenizer's EOS, the model config's EOS id(s), and ``extra``
  (e.g. a generation_config.json's list)."""
  ids = set(int(i) for i in extra)
  if getattr(tokenizer, "eos_token_id", None) is not None:
    ids.add(int(tokenizer.eos_token_id))
  model_eos = getattr(model_config, "eos_token_id", None)
  if isinstance(model_eos, int):
    ids.add(model_eos)
  elif model_eos is not None:
    ids.update(int(i) for i in model_eos)
  if not ids:
    raise ValueError("no EOS token id: the tokenizer and model config define none; pass eos_ids")
  return tuple(sorted(ids))


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool = True) -> tuple[str, list[int]]:
  """Prompt -> (text, ids). A string is one user turn; with ``chat_template=False`` it is raw text."""
  if not chat_template:
    if not isinstance(prompt, str):
      raise ValueError("chat_template=False needs plain string prompts, got a message list")
    return prompt, list(tokenizer.encode(prompt, add_special_tokens=True))
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template;"
                     " give one or generate with chat_template=False")
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  # The template already holds BOS and friends: adding special tokens again would double them.
  return text, list(tokenizer.encode(text, add_special_tokens=False))


def chat_text(tokenizer, messages: Sequence[Message]) -> str:
  """The chat-templated conversation up to the assistant turn, as raw text for
  ``generate(..., chat_template=False)``: text appended to it continues the assistant turn (a
  prefill). A leading BOS is dropped when raw-text encoding adds it back, so there is one."""
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  bos = getattr(tokenizer, "bos_token", None)
  if bos and text.startswith(bos) and tokenizer.encode("", add_special_tokens=True):
    text = text[len(bos):]
  return text


def bucket(n: int, minimum: int) -> int:
  """Smallest power of two >= max(n, minimum): few distinct shapes, at most 2x padding."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def shared_prefix(prompts_ids: Sequence[Sequence[int]], align: int = PREFIX_ALIGN) -> int:
  """How many leading tokens the prefill computes once per packed row, not once per prompt: the
  tokens every prompt starts with (a chat template's system turn; all of it for n samples of one
  prompt), rounded down to a multiple of ``align`` so that batches share compiled shapes; 0 for a
  single prompt."""
  if len(prompts_ids) < 2:
    return 0
  first, common = prompts_ids[0], min(len(ids) for ids in prompts_ids)
  for ids in prompts_ids[1:]:
    common = next((i for i in range(common) if ids[i] != first[i]), common)
  return common // align * align


def _batch_axis_size(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  spec = sharding.logical_to_spec(("batch",))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def split_reasoning(text: str, tags: tuple[str, str] = REASONING_TAGS) -> tuple[str, str]:
  """(reasoning, answer). Without a close tag (cut off mid-thought) everything after the open tag
  is reasoning; without any tag everything is answer. The template may have opened the tag itself,
  so a lone close tag also splits."""
  open_tag, close_tag = tags
  start = text.find(open_tag)
  body = text[start + len(open_tag):] if start >= 0 else text
  end = body.find(close_tag)
  if end >= 0:
    return body[:end].strip(), body[end + len(close_tag):].strip()
  if start >= 0:
    return body.strip(), ""
  return "", text.strip()


def _cut_at_stop(tokenizer, tokens: list[int], stop: Sequence[str], skip_special: bool):
  """(text, tokens, hit): text before the earliest stop string and the shortest token prefix that
  produces it (binary search: once a prefix contains a stop string, longer ones do too)."""
  text = tokenizer.decode(tokens, skip_special_tokens=skip_special)
  hits = [i for i in (text.find(s) for s in stop) if i >= 0]
  if not hits:
    return text, tokens, False

  def contains(k):
    t = tokenizer.decode(tokens[:k], skip_special_tokens=skip_special)
    return any(s in t for s in stop)

  lo, hi = 1, len(tokens)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if contains(mid) else (mid + 1, hi)
  return text[:min(hits)], tokens[:lo], True


def _copy_fits(model) -> bool:
  """Whether the decode copy (``transformer.to_out_in``) takes at most half of the host memory
  available now (True where that cannot be read). Checked only on CPU, where "auto" makes one."""
  if jax.default_backend() != "cpu":
    return True
  available = host_memory.available_bytes()
  need = transformer.out_in_copy_bytes(model)
  if available is None or need <= available // 2:
    return True
  logger.info("decoding from the model's own weights: the transposed decode copy (%.2f GB)"
              " would take over half of the %.2f GB available", need / 1e9, available / 1e9)
  return False


def generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] = (), batch_size: int = 8, mesh: Mesh | None = None,
             eos_ids: Sequence[int] | None = None, chat_template: bool = True,
             skip_special_tokens: bool = True, min_prompt_bucket: int = 32,
             stop_check_every: int = 32, decode_layout: str = "auto",
             share_prefix: bool = True) -> list[Generation]:
  """Generates one completion per prompt (in the order given).

  ``batch_size`` rows decode together (rounded up to a multiple of the mesh's data x fsdp size);
  with ``stop`` strings the host checks the text every ``stop_check_every`` tokens and retires
  rows that hit one. ``decode_layout`` (``decode_plan``; default "auto": "columns" on CPU in
  fp32 on one device up to 32 rows a batch, "out_in" on CPU with bf16 compute, "rows"
  elsewhere): "out_in" and "columns" decode from a copy of the weights stored [out, in]
  (``transformer.to_out_in``) that lives for this call only, at the cost of one more copy of the
  projection weights in memory meanwhile (SmolLM2-135M fp32: 425 MB); "rows" decodes from the
  model's own weights (no copy).
  ``share_prefix`` (default on): the prompt tokens every prompt of a batch starts with (the chat
  template's system turn, or all of a prompt sampled several times; ``shared_prefix``) are run
  through the model once per packed prefill row, not once per prompt, and the prompt bucket
  covers only the rest (SmolLM2's template: 24 shared tokens, benchmarks/README.md).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  sampling = Sampling.of(float(temperature), int(top_k), float(top_p))
  mesh = mesh if mesh is not None else sharding.current_mesh()
  eos = tuple(sorted(set(eos_ids))) if eos_ids else eos_token_ids(tokenizer, model.config)
  stop = tuple(s for s in stop if s)
  rendered = [render_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
  limit = model.config.max_position_embeddings
  for i, (_, ids) in enumerate(rendered):
    if not ids:
      raise ValueError(f"prompt {i} renders to no tokens")
    if len(ids) + max_new_tokens > limit:
      logger.warning("prompt %d: %d tokens + max_new_tokens=%d exceed the model's"
                     " max_position_embeddings=%d; positions beyond it are untrained", i, len(ids),
                     max_new_tokens, limit)
  row_div = _batch_axis_size(mesh)
  max_rows = -(-batch_size // row_div) * row_div
  # A batch of n prompts decodes this many rows (a bucket, a multiple of the mesh's row split).
  batch_rows = lambda n: min(max_rows, -(-bucket(n, 1) // row_div) * row_div)
  layout, cpu_dots = decode_plan(model, decode_layout, mesh, rows=batch_rows(len(prompts)),
                                 copy_fits=decode_layout != "auto" or _copy_fits(model))
  # The decode copy is local to this call: no second set of weights outlives it.
  prefill_model = nnx.split(model)
  decode_model = prefill_model if layout == "rows" else nnx.split(transformer.to_out_in(model))
  token_flops, attention_flops = prefill_flops(model.config)
  packing = functools.partial(pack_prompts, min_width=min_prompt_bucket, row_multiple=row_div,
                              token_flops=token_flops, attention_flops=attention_flops)
  run = functools.partial(_generate_batch, prefill_model, decode_model, tokenizer,
                          sampling=sampling, packing=packing, seed=seed,
                          eos=eos, stop=stop, max_new_tokens=max_new_tokens, mesh=mesh,
                          skip_special=skip_special_tokens, stop_check_every=stop_check_every,
                          decoder=functools.partial(_decode_cpu_dots() if cpu_dots else _decode,
                                                    columns=layout == "columns"))
  # Longest first: batches of similar lengths waste less padding.
  order = sorted(range(len(prompts)), key=lambda i: -len(rendered[i][1]))
  results: dict[int, Generation] = {}
  for start in range(0, len(order), max_rows):
    idx = order[start:start + max_rows]
    rows = batch_rows(len(idx))
    ids = [rendered[i][1] for i in idx]
    prefix = shared_prefix(ids) if share_prefix else 0
    plen = prefix + bucket(max(len(x) for x in ids) - prefix, min_prompt_bucket)
    for i, (text, tokens, reason) in zip(idx, run(ids, idx, rows, plen, prefix)):
      results[i] = Generation(prompt=prompts[i], prompt_text=rendered[i][0], text=text,
                              tokens=tokens, finish_reason=reason,
                              num_prompt_tokens=len(rendered[i][1]))
    host_memory.release_if_grown()
  return [results[i] for i in range(len(prompts))]


def _to_device(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """Every process holds the whole host batch; each device takes its rows (multi-host safe)."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh, x.ndim),
                                      lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:  # e.g. the step counter: any local copy is the whole value
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class PackedPrompts:
  """A batch's prompts packed for one prefill pass (``pack_prompts``); numpy, host side.

  R rows of L slots: each row is the P prefix tokens every prompt starts with, then the rest of
  some prompts one after another (a token tree: each prompt sees the prefix and itself), then
  padding (segment 0). ``row_B`` / ``last_B``: the packed row holding batch row b's prompt and the
  slot of its last token there; ``slot_BxP``: the packed slot that batch row b's cache slot s of
  its P = plen prompt slots takes (right-aligned, -1 = empty); ``length_B``: prompt lengths."""
  tokens_RxL: np.ndarray
  positions_RxL: np.ndarray
  segment_ids_RxL: np.ndarray
  subtree_end_RxL: np.ndarray
  row_B: np.ndarray
  last_B: np.ndarray
  slot_BxP: np.ndarray
  length_B: np.ndarray

  def arrays(self) -> tuple[np.ndarray, ...]:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """First-fit decreasing: the indices of the nonzero ``lengths``, in bins of at most ``capacity``."""
  bins, room = [], []
  for i in sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i]):
    j = next((j for j, r in enumerate(room) if r >= lengths[i]), len(bins))
    if j == len(bins):
      bins.append([])
      room.append(capacity)
    bins[j].append(i)
    room[j] -= lengths[i]
  return bins


def pack_rows_plan(lengths: Sequence[int], prefix: int, *, min_width: int, row_multiple: int,
                   token_flops: float, attention_flops: float) -> tuple[int, int, list[list[int]]]:
  """(R, L, bins): how a batch's prompt suffixes of ``lengths`` tokens (past the ``prefix``)
  pack into R rows of L = prefix + W slots. W is a power of two from the longest suffix's bucket
  up; R is a power of two times ``row_multiple`` (few compiled shapes); of those, the plan with
  the least estimated work R * L * (token_flops + attention_flops * L) (projections per slot,
  plus a causal attention over the row: a bound, as the tiles skip between prompts)."""
  width = bucket(max(max(lengths), 1), min_width)
  plans = []
  while True:
    bins = _bins(lengths, width)
    rows = row_multiple * bucket(-(-max(len(bins), 1) // row_multiple), 1)
    L = prefix + width
    plans.append((rows * L * (token_flops + attention_flops * L), rows, L, bins))
    if len(bins) <= 1:
      break
    width *= 2
  _, rows, L, bins = min(plans, key=lambda p: p[0])
  return rows, L, bins


def pack_prompts(prompts_ids: Sequence[Sequence[int]], rows: int, plen: int, prefix: int, *,
                 min_width: int = 32, row_multiple: int = 1, token_flops: float = 1.0,
                 attention_flops: float = 0.0) -> PackedPrompts:
  """The prefill's packed rows for a batch of ``rows`` cache rows (filler rows beyond the prompts
  repeat the first prompt: its cache, its length) and ``plen`` prompt slots. Every prompt starts
  with the same ``prefix`` tokens (``shared_prefix``), kept once per packed row; the rest of each
  prompt is packed by ``pack_rows_plan``."""
  n = len(prompts_ids)
  lengths = [len(ids) - prefix for ids in prompts_ids]
  if min(lengths) < 0 or max(len(ids) for ids in prompts_ids) > plen:
    raise ValueError(f"pack_prompts: prompts of {min(map(len, prompts_ids))}.."
                     f"{max(map(len, prompts_ids))} tokens, prefix {prefix}, plen {plen}")
  R, L, bins = pack_rows_plan(lengths, prefix, min_width=min_width, row_multiple=row_multiple,
                              token_flops=token_flops, attention_flops=attention_flops)
  tokens = np.zeros((R, L), np.int32)
  positions = np.zeros((R, L), np.int32)
  segments = np.zeros((R, L), np.int32)
  subtree_end = np.full((R, L), L, np.int32)
  tokens[:, :prefix] = np.asarray(prompts_ids[0][:prefix], np.int32)
  positions[:, :prefix] = np.arange(prefix)
  segments[:, :prefix] = 1
  row, start = np.zeros(n, np.int32), np.full(n, prefix, np.int32)  # empty suffix: the prefix
  for r, members in enumerate(bins):
    at = prefix
    for i in members:
      end = at + lengths[i]
      tokens[r, at:end] = prompts_ids[i][prefix:]
      positions[r, at:end] = np.arange(prefix, len(prompts_ids[i]))
      segments[r, at:end] = 1
      subtree_end[r, at:end] = end
      row[i], start[i] = r, at
      at = end
  source_B = np.where(np.arange(rows) < n, np.arange(rows), 0)  # fillers: the first prompt
  suffix_B = np.asarray(lengths, np.int32)[source_B]
  length_B = prefix + suffix_B
  slot_BxP = np.full((rows, plen), -1, np.int32)
  for b, i in enumerate(source_B):
    own = np.arange(suffix_B[b]) + start[i]
    slot_BxP[b, plen - length_B[b]:] = np.concatenate([np.arange(prefix), own])
  return PackedPrompts(tokens, positions, segments, subtree_end, row[source_B],
                       start[source_B] + suffix_B - 1, slot_BxP, length_B)


def prefill_flops(config) -> tuple[float, float]:
  """(per slot and layer: the projections' FLOPs, the attention's FLOPs per slot of row width):
  ``pack_rows_plan``'s work model (a causal row of L slots attends L / 2 keys on average, two
  products of N x H)."""
  D, N, K, H, F = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.intermediate_size)
  return 2.0 * (D * (N + 2 * K) * H + N * H * D + 3 * D * F), 2.0 * N * H


# ``decode_windows``: windows start on multiples of WINDOW_SLOTS slots, groups of rows on multiples
# of WINDOW_ROWS rows, at most WINDOW_GROUPS groups, and a plan is kept only if it reads at most
# WINDOW_SHARE of the cache: each plan is a compiled decode, so batches of similar lengths keep
# the one window (and compile nothing new).
WINDOW_SLOTS = 32
WINDOW_ROWS = 4
WINDOW_GROUPS = 3
WINDOW_SHARE = 0.8


def decode_windows(length_B: Sequence[int], plen: int, cache_len: int, *,
                   row_multiple: int = 1) -> tuple[tuple[int, int], ...]:
  """The groups of a batch's decode cache: ((first row, first slot), ...), the fewest cache slots
  in all (``transformer.write_and_attend``: each group's rows hold their slots from its first
  on, and a decode step reads them all once per layer). Batch row b's prompt of length_B[b]
  tokens sits right-aligned in the first ``plen`` slots (``unpack_cache``) and its new tokens
  after them, so a group of rows sees nothing before slot plen - (its longest prompt): the left
  padding of a batch whose prompts differ in length (the evaluation's jailbreak-wrapped prompts
  of ~430 tokens beside plain ones of ~50) is neither kept nor read at every step.
  ``row_multiple`` > 1 (rows split over devices): one group, so no group cuts across the split.
  ((0, 0),): the whole cache, ungrouped."""
  B = len(length_B)
  lengths = [int(n) for n in length_B]
  quantum = WINDOW_ROWS if row_multiple == 1 else B
  bounds = list(range(0, B, quantum)) + [B]
  first_slot = lambda a, e: max(0, plen - max(lengths[a:e])) // WINDOW_SLOTS * WINDOW_SLOTS

  @functools.cache
  def best(i: int, groups: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(slots read, windows) for the rows from bounds[i] on, in at most ``groups`` groups."""
    a, plans = bounds[i], []
    for j in range(i + 1, len(bounds)) if groups > 1 else [len(bounds) - 1]:
      e, s = bounds[j], first_slot(a, bounds[j])
      rest = best(j, groups - 1) if e < B else (0, ())
      plans.append(((e - a) * (cache_len - s) + rest[0], ((a, s),) + rest[1]))
    return min(plans)

  slots, windows = best(0, WINDOW_GROUPS)
  return windows if slots <= WINDOW_SHARE * B * cache_len else ((0, 0),)


def _generate_batch(prefill_model, decode_model, tokenizer, prompts_ids: Sequence[list[int]],
                    prompt_index: Sequence[int], rows: int, plen: int, prefix: int, *,
                    sampling: Sampling, packing,
                    seed: int, eos: tuple[int, ...], stop: tuple[str, ...], max_new_tokens: int,
                    mesh: Mesh | None, skip_special: bool, stop_check_every: int,
                    decoder=_decode) -> list[tuple[str, list[int], str]]:
  """(text, tokens, finish_reason) for each prompt of one batch. ``prefill_model`` and
  ``decode_model``: (graphdef, state) of the same weights, possibly in two layouts. ``prefix``:
  how many leading tokens all prompts share (``shared_prefix``; 0: none kept once per packed
  row); ``packing``: ``pack_prompts`` with the model's work model bound."""
  n = len(prompts_ids)
  done = np.arange(rows) >= n  # filler rows start finished: they never hold the loop open
  index = np.asarray([prompt_index[r] if r < n else 0 for r in range(rows)], np.uint32)
  put = functools.partial(_to_device, mesh=mesh)
  eos_E = jnp.asarray(eos, jnp.int32)
  packed = packing(prompts_ids, rows, plen, prefix)
  windows = decode_windows([len(ids) for ids in prompts_ids] + [0] * (rows - n), plen,
                           plen + max_new_tokens, row_multiple=_batch_axis_size(mesh))
  windows = None if windows == ((0, 0),) else windows  # the whole cache: one ungrouped Cache
  carry = _prefill(*prefill_model, *map(put, packed.arrays()), put(index), put(done),
                   jnp.uint32(seed % 2**32), eos_E, sampling, cache_len=plen + max_new_tokens,
                   mesh=mesh, windows=windows)
  step = 1
  every = stop_check_every if stop else max_new_tokens
  while step < max_new_tokens:
    until = min(max_new_tokens, step + every)
    carry = decoder(*decode_model, carry, jnp.int32(until), eos_E, sampling, prompt_len=plen,
                    mesh=mesh, windows=windows)
    step = int(_to_host(carry["step"]))
    done_now = _to_host(carry["done"]).copy()
    if stop and not done_now.all():
      out = _to_host(carry["out"])
      for r in np.flatnonzero(~done_now):
        text = tokenizer.decode(out[r, :step].tolist(), skip_special_tokens=skip_special)
        done_now[r] = any(s in text for s in stop)
      carry["done"] = put(done_now)
    if done_now.all():
      break
  out = _to_host(carry["out"])[:n, :step]
  results = []
  for gen in out.tolist():
    reason = FINISH_LENGTH
    eos_at = next((k for k, t in enumerate(gen) if t in eos), None)
    if eos_at is not None:
      gen, reason = gen[:eos_at], FINISH_EOS
    text, gen, hit = _cut_at_stop(tokenizer, gen, stop, skip_special)
    results.append((text, gen, FINISH_STOP if hit else reason))
  return results
