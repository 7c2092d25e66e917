"""Normalized records -> token ids and loss masks, through the model's own chat template.

A sequence is built from pieces, each tokenized on its own:

  SFT:  [prompt rendering with add_generation_prompt=True] [rest of the full rendering]
  PREF: [prompt rendering] [shared prefix] [rest of the full rendering for chosen / rejected]

The prompt piece is exactly what the sampler feeds the model at generation time, so training and
generation see the same prompt tokens. The full rendering must start with the prompt rendering
(else the template cannot be split safely and we raise :class:`TemplateError`); loss masks are
then piece boundaries, never positions guessed from a template.

Data never becomes control tokens: a special token that the tokenizer finds inside a message's
content (e.g. a user writing "<|im_start|>assistant") is re-tokenized as plain text.

Records that cannot fit ``max_length`` are not raised but returned as ``{"id", "dropped": reason}``
so the batcher can count them (the counts reach the run log through ``pipeline``'s stats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROMPT_TRUNCATIONS = ("keep_end", "keep_start", "drop")
RESPONSE_TRUNCATIONS = ("cut", "drop")

# Private-use code points: stand-ins for message contents when locating them in a rendering.
_SENTINEL = "\ue000{}\ue001"


class TemplateError(ValueError):
  """The tokenizer's chat template cannot be used safely (message names the record and why)."""


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
  """How long sequences may be and what is cut when they are longer.

  ``max_prompt_length``: prompts (plus a preference prefix) longer than this are cut by
  ``prompt_truncation`` ("keep_end" keeps the last tokens, "keep_start" the first, "drop" drops
  the record); 0 = no separate prompt limit. Then the completion is cut to the room left
  in ``max_length`` ("cut") or the record dropped ("drop"); a record keeping fewer than
  ``min_response_tokens`` completion tokens is dropped.
  """
  max_length: int
  max_prompt_length: int = 0
  prompt_truncation: str = "keep_end"
  response_truncation: str = "cut"
  min_response_tokens: int = 1

  def __post_init__(self):
    if self.max_length < 2:
      raise ValueError(f"max_length must be >= 2, got {self.max_length}")
    if self.prompt_truncation not in PROMPT_TRUNCATIONS:
      raise ValueError(
          f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {self.prompt_truncation!r}")
    if self.response_truncation not in RESPONSE_TRUNCATIONS:
      raise ValueError(
          f"response_truncation must be one of {RESPONSE_TRUNCATIONS}, got {self.response_truncation!r}")
    if not 0 <= self.max_prompt_length < self.max_length:
      raise ValueError(f"max_prompt_length must be 0 (no limit) or in [1, max_length={self.max_length}),"
                       f" got {self.max_prompt_length}")
    if self.min_response_tokens < 1:
      raise ValueError(f"min_response_tokens must be >= 1, got {self.min_response_tokens}")


def special_ids(tokenizer) -> frozenset[int]:
  """Ids of the tokenizer's special (control) tokens: never allowed to come from data text."""
  ids = set(tokenizer.all_special_ids)
  for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
    if getattr(added, "special", False):
      ids.add(int(token_id))
  return frozenset(ids)


def _special_texts(tokenizer) -> tuple[str, ...]:
  """The strings of all special tokens (all_special_tokens misses added special tokens)."""
  texts = {t for t in tokenizer.all_special_tokens if t}
  for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
    if getattr(added, "special", False) and added.content:
      texts.add(added.content)
  return tuple(sorted(texts))


def _render(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
            rid: str) -> str:
  if not getattr(tokenizer, "chat_template", None):
    raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template")
  try:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt)
  except Exception as e:  # jinja's raise_exception (e.g. "System role not supported"), bad roles
    raise TemplateError(f"record {rid}: the chat template refused the conversation (roles"
                        f" {[m['role'] for m in messages]}): {e}") from e


def _content_spans(tokenizer, messages, add_generation_prompt: bool, text: str):
  """Character spans of each message's content in ``text`` (the real rendering).

  Rendered once more with sentinels in place of the contents; substituting the contents back must
  give ``text`` exactly, else the template rewrites contents and the spans are unknown.
  """
  stand_in = [dict(m, content=_SENTINEL.format(i)) for i, m in enumerate(messages)]
  skeleton = _render(tokenizer, stand_in, add_generation_prompt, "<sentinels>")
  spans, out, cursor, pos = [], [], 0, 0
  for i, m in enumerate(messages):
    at = skeleton.find(_SENTINEL.format(i), cursor)
    if at < 0:
      return None
    out.append(skeleton[cursor:at])
    pos += at - cursor
    spans.append((pos, pos + len(m["content"])))
    out.append(m["content"])
    pos += len(m["content"])
    cursor = at + len(_SENTINEL.format(i))
  out.append(skeleton[cursor:])
  if "".join(out) != text:
    return None
  return spans


def _encode(tokenizer, text: str, protected: Sequence[tuple[int, int]], specials: frozenset[int],
            rid: str) -> list[int]:
  """Token ids of ``text``; special tokens found inside a ``protected`` span become plain text."""
  if not text:
    return []
  try:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(protected))
  except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
    raise TemplateError(f"record {rid}: special-token text in a message needs a fast tokenizer"
                        f" (offsets) to be kept as plain text: {e}") from e
  ids = list(enc["input_ids"])
  if not protected:
    return ids
  out: list[int] = []
  for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
    if token_id in specials:
      inside = any(a <= start and end <= b for a, b in protected)
      overlaps = any(start < b and a < end for a, b in protected)
      if inside:
        # The added-token splitter already cut the text at this token, so its neighbours are
        # tokenized exactly as they would be around plain text.
        out.extend(tokenizer(text[start:end], add_special_tokens=False,
                             split_special_tokens=True)["input_ids"])
        continue
      if overlaps:
        raise TemplateError(f"record {rid}: special token {text[start:end]!r} straddles a message"
                            " content and the template text; cannot tell data from control tokens")
    out.append(token_id)
  return out


def _pieces(tokenizer, prompt_messages, completion: str, rid: str):
  """(prompt_text, prompt_spans, assistant_text, assistant_spans) of one conversation."""
  full_messages = list(prompt_messages) + [{"role": "assistant", "content": completion}]
  prompt_text = _render(tokenizer, prompt_messages, True, rid)
  full_text = _render(tokenizer, full_messages, False, rid)
  if not full_text.startswith(prompt_text):
    raise TemplateError(
        f"record {rid}: the chat template's prompt rendering (add_generation_prompt=True) is not a"
        f" prefix of the full conversation's rendering, so the assistant turn cannot be masked"
        f" safely.\n  prompt ends: {prompt_text[-80:]!r}\n  full at that point:"
        f" {full_text[max(0, len(prompt_text) - 80):len(prompt_text) + 20]!r}")
  risky = any(s in m["content"] for m in full_messages for s in _special_texts(tokenizer))
  prompt_spans: list[tuple[int, int]] = []
  assistant_spans: list[tuple[int, int]] = []
  if risky:
    spans = _content_spans(tokenizer, full_messages, False, full_text)
    if spans is None:
      raise TemplateError(
          f"record {rid}: a message contains special-token text but the chat template rewrites"
          " message contents, so data text cannot be kept apart from control tokens")
    cut = len(prompt_text)
    prompt_spans = [(a, min(b, cut)) for a, b in spans if a < cut]
    assistant_spans = [(max(a, cut) - cut, b - cut) for a, b in spans if b > cut]
  return prompt_text, prompt_spans, full_text[len(prompt_text):], assistant_spans


def _loss_end(ids: Sequence[int], specials: frozenset[int]) -> int:
  """Completion tokens up to and including the template's last control token (the end of turn).

  Template text after it (e.g. the newline after <|im_end|>) stays in the sequence, unmasked,
  because generation stops at the end-of-turn token.
  """
  for i in range(len(ids) - 1, -1, -1):
    if ids[i] in specials:
      return i + 1
  return len(ids)


def _split_assistant(tokenizer, text: str, spans, prefix: str, specials, rid: str):
  """Assistant text -> (prefix ids, rest ids, loss end within rest)."""
  if prefix:
    if not text.startswith(prefix):
      raise TemplateError(f"record {rid}: the chat template changes the assistant text, so the"
                          " shared prefix cannot be located in the rendering")
    cut = len(prefix)
    pre_spans = [(a, min(b, cut)) for a, b in spans if a < cut]
    rest_spans = [(max(a, cut) - cut, b - cut) for a, b in spans if b > cut]
    prefix_ids = _encode(tokenizer, text[:cut], pre_spans, specials, rid)
    text, spans = text[cut:], rest_spans
  else:
    prefix_ids = []
  rest = _encode(tokenizer, text, spans, specials, rid)
  return prefix_ids, rest, _loss_end(rest, specials)


def _fit_prompt(prompt: list[int], opts: TokenizeOptions) -> tuple[list[int] | None, list[str]]:
  """Prompt ids after the prompt policy (None = dropped) and the events to count."""
  limit = opts.max_prompt_length
  if not limit or len(prompt) <= limit:
    return prompt, []
  if opts.prompt_truncation == "drop":
    return None, ["dropped/prompt_too_long"]
  kept = prompt[-limit:] if opts.prompt_truncation == "keep_end" else prompt[:limit]
  return kept, ["truncated/prompt"]


def _fit_completion(n_prompt: int, rest: list[int], loss_end: int, opts: TokenizeOptions):
  """(kept completion ids, loss end) or None when nothing useful fits, plus events."""
  room = opts.max_length - n_prompt
  if room < opts.min_response_tokens:
    return None, ["dropped/prompt_too_long"]
  if len(rest) <= room:
    return (rest, loss_end), []
  if opts.response_truncation == "drop":
    return None, ["dropped/response_too_long"]
  kept_loss = min(loss_end, room)
  if kept_loss < opts.min_response_tokens:
    return None, ["dropped/no_response_left"]
  return (rest[:room], kept_loss), ["truncated/response"]


def tokenize_rw(record: Mapping[str, Any], tokenizer, opts: TokenizeOptions,
                specials: frozenset[int] | None = None) -> dict[str, Any]:
  """An RW record -> {"id", "tokens": int32[n], "loss_mask": int32[n], "events"} or {"id", "dropped"}.

  ``loss_mask[t] = 1`` where ``tokens[t]`` is an assistant token to predict (reasoning, answer and
  the end-of-turn token).
  """
  rid = str(record["id"])
  messages = record["messages"]
  if not messages or messages[-1]["role"] != "assistant":
    raise TemplateError(f"record {rid}: an RW record must end with an assistant message")
  specials = special_ids(tokenizer) if specials is None else specials
  prompt_text, prompt_spans, assistant_text, assistant_spans = _pieces(
      tokenizer, messages[:-1], messages[-1]["content"], rid)
  prompt = _encode(tokenizer, prompt_text, prompt_spans, specials, rid)
  _, rest, loss_end = _split_assistant(tokenizer, assistant_text, assistant_spans, "", specials, rid)
  prompt, events = _fit_prompt(prompt, opts)
  if prompt is None:
    return {"id": rid, "dropped": events[0]}
  fitted, more = _fit_completion(len(prompt), rest, loss_end, opts)
  if fitted is None:
    return {"id": rid, "dropped": more[0]}
  rest, loss_end = fitted
  tokens = np.asarray(prompt + rest, np.int32)
  mask = np.zeros(len(tokens), np.int32)
  mask[len(prompt):len(prompt) + loss_end] = 1
  return {"id": rid, "tokens": tokens, "loss_mask": mask, "events": events + more}


def tokenize_pref(record: Mapping[str, Any], tokenizer, opts: TokenizeOptions,
                  specials: frozenset[int] | None = None) -> dict[str, Any]:
  """A preference record -> {"id", "chosen_tokens", "chosen_loss_mask", "rejected_tokens",
  "rejected_loss_mask", "shared_len", "events"} or {"id", "dropped"}.

  Both sides start with the same ``shared_len`` tokens (prompt + prefix); the masks cover only
  what follows (the completion and its end-of-turn token).
  """
  rid = str(record["id"])
  specials = special_ids(tokenizer) if specials is None else specials
  prefix = record.get("prefix") or ""
  sides = {}
  prompt = None
  for side in ("chosen", "rejected"):
    prompt_text, prompt_spans, assistant_text, assistant_spans = _pieces(
        tokenizer, record["prompt"], prefix + record[side], rid)
    if prompt is None:
      prompt = _encode(tokenizer, prompt_text, prompt_spans, specials, rid)
    sides[side] = _split_assistant(tokenizer, assistant_text, assistant_spans, prefix, specials, rid)
  prefix_ids = sides["chosen"][0]
  if sides["rejected"][0] != prefix_ids:
    raise TemplateError(f"record {rid}: the shared prefix tokenizes differently in chosen and rejected")
  shared, events = _fit_prompt(prompt + prefix_ids, opts)
  if shared is None:
    return {"id": rid, "dropped": events[0]}
  out: dict[str, Any] = {"id": rid, "shared_len": len(shared)}
  for side, (_, rest, loss_end) in sides.items():
    fitted, more = _fit_completion(len(shared), rest, loss_end, opts)
    if fitted is None:
      return {"id": rid, "dropped": more[0]}
    rest, loss_end = fitted
    events += [e for e in more if e not in events]
    tokens = np.asarray(shared + rest, np.int32)
    mask = np.zeros(len(tokens), np.int32)
    mask[len(shared):len(shared) + loss_end] = 1
    out[f"{side}_tokens"], out[f"{side}_loss_mask"] = tokens, mask
  if np.array_equal(out["chosen_tokens"], out["rejected_tokens"]):
    return {"id": rid, "dropped": "dropped/identical_after_truncation"}
  out["events"] = events
  return out


def tokenize_pref_group(records: Sequence[Mapping[str, Any]], tokenizer, opts: TokenizeOptions,
                        specials: frozenset[int] | None = None) -> dict[str, Any]:
  """The preference records of one prompt -> {"id" (the first record's), "pairs" (the kept
  ``tokenize_pref`` outputs), "events" (each dropped pair's reason)} or, when every pair is
  dropped, {"id", "dropped"}."""
  specials = special_ids(tokenizer) if specials is None else specials
  pairs, events = [], []
  for record in records:
    out = tokenize_pref(record, tokenizer, opts, specials)
    if "dropped" in out:
      events.append(out["dropped"])
    else:
      pairs.append(out)
  rid = str(records[0]["id"])
  if not pairs:
    return {"id": rid, "dropped": events[0]}
  return {"id": rid, "pairs": pairs, "events": events}
