"""Record schemas: raw JSON-like records -> the normalized RW / preference / trajectory dicts.

Every parser is a pure function of one raw record and its location (``where`` = "path:line").
Anything wrong raises :class:`RecordError` naming the location and the field, so a bad line in a
100k-line file is found without a debugger. The normalized forms are the contract with
``tokenize.py`` (see README "Data formats"):

  RW:   {"id", "category", "messages": [{"role", "content"}, ...]}   last message = assistant
  PREF: {"id", "kind", "category", "prompt": [messages], "prefix", "chosen", "rejected"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from saro_jax.data import jsonl

ROLES = ("system", "user", "assistant")
KINDS = ("outcome", "process")
DEFAULT_TAGS = ("<think>", "</think>")


class RecordError(jsonl.InputError):
  """A record that does not match its schema; the message names ``where`` and ``field``."""

  def __init__(self, where: str, field: str, problem: str):
    self.field, self.problem = field, problem
    super().__init__(where, f"field '{field}': {problem}", reason=f"invalid:{field}")


def render_reasoning(reasoning: str, response: str, tags: Sequence[str] = DEFAULT_TAGS) -> str:
  """The assistant text of a reasoning trace: tagged reasoning, blank line, final answer."""
  open_tag, close_tag = tags
  return f"{open_tag}\n{reasoning}\n{close_tag}\n\n{response}"


def _no_tags(text: str, where: str, field: str, tags: Sequence[str]) -> str:
  """A text rendered inside (or right after) the tagged reasoning must not carry a tag itself.

  A reasoning with "</think>" in it would render two close tags and train the model to end its
  reasoning early; such records are refused (not escaped: an escaped tag is text the model
  never sees at inference, so there is no faithful way to keep it).
  """
  for tag in tags:
    if tag in text:
      raise RecordError(where, field, f"contains the reasoning tag {tag!r}; the rendered turn would "
                        "hold a second tag (remove it, or choose other data.reasoning_tags)")
  return text


def _one_block(text: str, where: str, field: str, tags: Sequence[str]) -> str:
  """An assistant text that carries its own reasoning: at most one open..close block, in order.

  An open tag without its close is allowed (a step-level process pair may end mid-reasoning).
  """
  open_tag, close_tag = tags
  n_open, n_close = text.count(open_tag), text.count(close_tag)
  if n_open > 1 or n_close > n_open or (n_close and text.index(open_tag) > text.index(close_tag)):
    raise RecordError(where, field, f"has {n_open} {open_tag!r} and {n_close} {close_tag!r}; an "
                      f"assistant turn holds at most one {open_tag}...{close_tag} block, in that order")
  return text


def record_id(raw: Mapping[str, Any], where: str) -> str:
  """The record's own "id" if it has one, else "<file basename>:<line>" from ``where``."""
  rid = raw.get("id")
  if rid is None:
    return os.path.basename(where)
  if isinstance(rid, bool) or not isinstance(rid, (str, int)):
    raise RecordError(where, "id", f"expected a string or integer, got {type(rid).__name__}")
  if str(rid) == "":
    raise RecordError(where, "id", "is empty")
  return str(rid)


def _text(raw: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False,
          label: str | None = None) -> str:
  label = label or key
  if key not in raw or raw[key] is None:
    raise RecordError(where, label, "is missing")
  value = raw[key]
  if not isinstance(value, str):
    raise RecordError(where, label, f"expected a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise RecordError(where, label, "is empty")
  return value


def _optional_text(raw: Mapping[str, Any], key: str, where: str) -> str | None:
  value = raw.get(key)
  if value is None:
    return None
  if not isinstance(value, str):
    raise RecordError(where, key, f"expected a string or null, got {type(value).__name__}")
  return value


def _messages(value: Any, where: str, field: str, *, string_ok: bool = False) -> list[dict[str, str]]:
  """Validates a TRL conversational message list; keeps only role and content.

  ``string_ok``: the field also accepts a plain string (handled by the caller), so the error
  names both forms.
  """
  if not isinstance(value, (list, tuple)):
    expected = "a string or a list of messages" if string_ok else "a list of messages"
    raise RecordError(where, field, f"expected {expected}, got {type(value).__name__}")
  if not value:
    raise RecordError(where, field, "is an empty message list")
  out = []
  for i, message in enumerate(value):
    label = f"{field}[{i}]"
    if not isinstance(message, Mapping):
      raise RecordError(where, label, f"expected an object with role/content, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
      raise RecordError(where, f"{label}.role", f"must be one of {ROLES}, got {role!r}")
    content = _text(message, "content", where, allow_empty=role != "assistant",
                    label=f"{label}.content")
    out.append({"role": role, "content": content})
  return out


def _prompt(raw: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """"prompt" as a string (plus optional "system") or a message list ending in a user turn."""
  value = raw.get("prompt")
  if value is None:
    raise RecordError(where, "prompt", "is missing")
  if isinstance(value, str):
    messages = [{"role": "user", "content": _text(raw, "prompt", where)}]
  else:
    messages = _messages(value, where, "prompt", string_ok=True)
  system = _optional_text(raw, "system", where)
  if system is not None:
    if messages[0]["role"] == "system":
      raise RecordError(where, "system", "given both as a field and as prompt[0]")
    messages = [{"role": "system", "content": system}] + messages
  return _check_prompt_turns(messages, where, "prompt")


def _check_prompt_turns(messages: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
  for i, m in enumerate(messages):
    if m["role"] == "system" and i != 0:
      raise RecordError(where, f"{field}[{i}].role", "a system message may only come first")
  if messages[-1]["role"] != "user":
    raise RecordError(where, f"{field}[{len(messages) - 1}].role",
                      f"the turn before the answer must be 'user', got {messages[-1]['role']!r}")
  return messages


def _category(raw: Mapping[str, Any], where: str) -> str | None:
  return _optional_text(raw, "category", where)


def parse_rw(raw: Mapping[str, Any], *, where: str,
             reasoning_tags: Sequence[str] = DEFAULT_TAGS) -> dict[str, Any]:
  """A Reasoning-style Warmup trace: {"messages": [...]} or {"prompt", "reasoning", "response"}.

  With "messages", the assistant turn is taken as is (reasoning already inside); an optional
  "reasoning" field is then rendered in front of the last assistant message.
  """
  if not isinstance(raw, Mapping):
    raise RecordError(where, "<record>", f"expected a JSON object, got {type(raw).__name__}")
  rid = record_id(raw, where)
  if "messages" in raw:
    messages = _messages(raw["messages"], where, "messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
      raise RecordError(where, f"messages[{last}].role",
                        f"the last turn must be 'assistant', got {messages[last]['role']!r}")
    if last == 0:
      raise RecordError(where, "messages", "has no user turn before the assistant turn")
    _check_prompt_turns(messages[:last], where, "messages")
    reasoning = _optional_text(raw, "reasoning", where)
    content_field = f"messages[{last}].content"
    if reasoning:
      _no_tags(reasoning, where, "reasoning", reasoning_tags)
      _no_tags(messages[last]["content"], where, content_field, reasoning_tags)
      messages[last]["content"] = render_reasoning(reasoning, messages[last]["content"], reasoning_tags)
    else:
      _one_block(messages[last]["content"], where, content_field, reasoning_tags)
  elif "prompt" in raw or "response" in raw:
    prompt = _prompt(raw, where)
    reasoning = _no_tags(_text(raw, "reasoning", where, allow_empty=True), where, "reasoning",
                         reasoning_tags)
    response = _no_tags(_text(raw, "response", where), where, "response", reasoning_tags)
    content = render_reasoning(reasoning, response, reasoning_tags) if reasoning.strip() else response
    messages = prompt + [{"role": "assistant", "content": content}]
  else:
    raise RecordError(where, "messages", "is missing (an RW record needs 'messages', or "
                      "'prompt' + 'reasoning' + 'response')")
  return {"id": rid, "category": _category(raw, where), "messages": messages}


def _completion(raw: Mapping[str, Any], key: str, where: str, n_prompt: int,
                tags: Sequence[str], prefix: str) -> tuple[list[dict[str, str]] | None, str]:
  """One side of a pair: a string, or messages (the full conversation if the prompt is implicit).

  ``prefix + side`` is one rendered assistant turn: it holds at most one reasoning block.
  """
  value = raw.get(key)
  if value is None:
    raise RecordError(where, key, "is missing")
  if isinstance(value, str):
    text = value
    conversation = None
  else:
    conversation = _messages(value, where, key, string_ok=True)
    tail = conversation[n_prompt:]
    if len(tail) != 1 or tail[0]["role"] != "assistant":
      raise RecordError(where, key, f"must end in exactly one assistant message after the prompt, "
                        f"got roles {[m['role'] for m in tail]}")
    text = tail[0]["content"]
  reasoning = _optional_text(raw, f"{key}_reasoning", where)
  if reasoning:
    _no_tags(reasoning, where, f"{key}_reasoning", tags)
    _no_tags(text, where, key, tags)
    text = render_reasoning(reasoning, text, tags)
  if not text.strip():
    raise RecordError(where, key, "is empty")
  _one_block(prefix + text, where, key if not prefix else f"prefix+{key}", tags)
  return conversation, text


def _implicit_prompt(raw: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """TRL's implicit prompt: the longest common message prefix of "chosen" and "rejected"."""
  for key in ("chosen", "rejected"):
    if not isinstance(raw.get(key), (list, tuple)):
      raise RecordError(where, "prompt", f"is missing (and '{key}' is not a message list, so the "
                        "prompt cannot be implicit)")
  chosen = _messages(raw["chosen"], where, "chosen")
  rejected = _messages(raw["rejected"], where, "rejected")
  n = 0
  while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
    n += 1
  if n == 0:
    raise RecordError(where, "prompt", "is missing and 'chosen'/'rejected' share no leading turns")
  return _check_prompt_turns(chosen[:n], where, "chosen")


def parse_preference(raw: Mapping[str, Any], *, where: str,
                     reasoning_tags: Sequence[str] = DEFAULT_TAGS) -> dict[str, Any]:
  """An outcome- or process-level preference pair (TRL standard / conversational / implicit prompt)."""
  if not isinstance(raw, Mapping):
    raise RecordError(where, "<record>", f"expected a JSON object, got {type(raw).__name__}")
  rid = record_id(raw, where)
  prompt = _prompt(raw, where) if raw.get("prompt") is not None else _implicit_prompt(raw, where)
  # An explicit prompt string becomes one message; conversation sides then repeat no prompt turns.
  explicit = raw.get("prompt") is not None
  n_prompt = 0 if explicit else len(prompt)
  prefix = raw.get("prefix")
  if prefix is None:
    prefix = ""
  if not isinstance(prefix, str):
    raise RecordError(where, "prefix", f"expected a string, got {type(prefix).__name__}")
  _, chosen = _completion(raw, "chosen", where, n_prompt, reasoning_tags, prefix)
  _, rejected = _completion(raw, "rejected", where, n_prompt, reasoning_tags, prefix)
  kind = raw.get("kind")
  if kind is None:
    kind = "process" if prefix else "outcome"
  if kind not in KINDS:
    raise RecordError(where, "kind", f"must be one of {KINDS}, got {kind!r}")
  if kind == "outcome" and prefix:
    raise RecordError(where, "prefix", "an outcome-level pair has no shared prefix")
  if chosen == rejected:
    raise RecordError(where, "rejected", "is identical to 'chosen'")
  return {"id": rid, "kind": kind, "category": _category(raw, where), "prompt": prompt,
          "prefix": prefix, "chosen": chosen, "rejected": rejected}


def _steps(raw: Mapping[str, Any], key: str, where: str, *, allow_empty_list: bool,
           tags: Sequence[str]) -> list[str]:
  value = raw.get(key)
  if value is None:
    raise RecordError(where, key, "is missing")
  if not isinstance(value, (list, tuple)):
    raise RecordError(where, key, f"expected a list of strings, got {type(value).__name__}")
  if not value and not allow_empty_list:
    raise RecordError(where, key, "is an empty list")
  for i, step in enumerate(value):
    if not isinstance(step, str) or not step.strip():
      raise RecordError(where, f"{key}[{i}]", "expected a non-empty string")
    _no_tags(step, where, f"{key}[{i}]", tags)
  return list(value)


def parse_trajectory(raw: Mapping[str, Any], *, where: str,
                     reasoning_tags: Sequence[str] = DEFAULT_TAGS) -> dict[str, Any]:
  """A reasoning trajectory that turns unsafe at ``first_unsafe_step`` (input of build_pairs).

  {"id"?, "prompt", "category"?, "steps": [str], "first_unsafe_step": int (0-based index into
   steps), "reflection": str, "safe_continuation": [str], "safe_answer": str, "unsafe_answer": str}
  Steps before ``first_unsafe_step`` are safe and shared; steps from it on are the unsafe line.
  build_pairs renders steps, reflection and answers inside / after ``reasoning_tags``, so none of
  them may contain a tag.
  """
  tags = reasoning_tags
  if not isinstance(raw, Mapping):
    raise RecordError(where, "<record>", f"expected a JSON object, got {type(raw).__name__}")
  rid = record_id(raw, where)
  prompt = _prompt(raw, where)
  steps = _steps(raw, "steps", where, allow_empty_list=False, tags=tags)
  first = raw.get("first_unsafe_step")
  if first is None:
    raise RecordError(where, "first_unsafe_step", "is missing")
  if isinstance(first, bool) or not isinstance(first, int):
    raise RecordError(where, "first_unsafe_step", f"expected an integer, got {type(first).__name__}")
  if not 0 <= first < len(steps):
    raise RecordError(where, "first_unsafe_step", f"must index into steps (0..{len(steps) - 1}), got {first}")
  safe_answer = _no_tags(_text(raw, "safe_answer", where), where, "safe_answer", tags)
  unsafe_answer = _no_tags(_text(raw, "unsafe_answer", where), where, "unsafe_answer", tags)
  if safe_answer == unsafe_answer:
    raise RecordError(where, "unsafe_answer", "is identical to 'safe_answer'")
  return {"id": rid, "category": _category(raw, where), "prompt": prompt, "steps": steps,
          "first_unsafe_step": first,
          "reflection": _no_tags(_text(raw, "reflection", where), where, "reflection", tags),
          "safe_continuation": _steps(raw, "safe_continuation", where, allow_empty_list=True,
                                      tags=tags),
          "safe_answer": safe_answer, "unsafe_answer": unsafe_answer}


def has_reasoning_block(text: str, tags: Sequence[str]) -> bool:
  """A closed, non-empty reasoning block: the close tag is there (the chat template may have
  opened the block) and something other than whitespace stands before it."""
  open_tag, close_tag = tags
  end = text.find(close_tag)
  if end < 0:
    return False
  start = text.find(open_tag)
  body = text[start + len(open_tag):end] if 0 <= start < end else text[:end]
  return bool(body.strip())
