"""On-policy pairs: the policy's own judged samples -> SRPO preference pairs (the rules, no model).

The mine stage (saro_jax/stages/mine.py) samples the policy ``n`` times per training prompt and
judges each sample's final answer (evaluate/judges.py). Each judged sample gets one outcome:

  unsafe        harmful/jailbreak prompt, the safety judge says the answer helps toward harm
  refused       benign/borderline prompt, the refusal judge says the answer declines
  no_reasoning  a good answer (not unsafe / not refused) without a closed reasoning block
  fine          a good answer with its reasoning block
  truncated     cut at max_new_tokens inside its reasoning block (no answer to judge); with
                ``use_truncated`` (default) a cut sample that already has an answer (cut after its
                reasoning, or no block at all: a model that starts complying and runs out of tokens
                complies) is judged like the others; without it every cut sample counts here
  unjudged      the judge gave no verdict

and these become pairs (every pair is checked by formats.parse_preference; the id names the
prompt, the sample and the kind, so ``example_id`` stays unique):

  unsafe        rejected = the sample as sampled; chosen = a safe trace (the prompt's RW trace, else
                the template teacher of data/synthesis.py): one outcome pair, plus SaRO's process
                pairs at the sample's OWN reasoning steps: for k = 1..max_prefix_steps (and fewer
                than its steps) the prefix is the sample's text through its k-th reasoning line,
                chosen = the "Wait, ..." reflection + the safe trace's steps after the first k +
                the safe answer, rejected = the rest of the sample. The prefix is the shared part,
                so ``shared_len`` = prompt + those k steps and prefix sharing applies.
  refused       rejected = the sample; chosen = the prompt's RW trace (a helpful answer), else a model
                teacher's validated answer (http / sampler); without one the sample is counted
                ``no_chosen`` and dropped (the template cannot answer a benign question).
  no_reasoning  (``format_pairs``) rejected = the sample; chosen = the trace (teaches the format).

The rejected side is the policy's text, never a placeholder: SRPO learns from real negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from saro_jax.data import formats, public_sets, synthesis

HARMFUL_LABELS = synthesis.HARMFUL_LABELS
BENIGN_LABELS = synthesis.BENIGN_LABELS
OUTCOMES = ("unsafe", "refused", "no_reasoning", "fine", "truncated", "unjudged")


@dataclasses.dataclass(frozen=True)
class Options:
  max_prefix_steps: int = 1
  format_pairs: bool = False
  use_truncated: bool = True
  pairs_per_prompt: int = 0  # 0 = every distinct bad sample
  teacher: str = "template"  # chosen without a trace: "template" | "http" | "sampler" | "none"
  fallback: bool = True  # a harmful prompt whose teacher text failed gets the template's
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS


def prompt_key(text: str) -> str:
  """A prompt's identity for the trace lookup (public_sets.normalise: case, spacing, punctuation)."""
  return public_sets.normalise(text)


def has_reasoning(text: str, tags: Sequence[str]) -> bool:
  """A closed, non-empty reasoning block before an answer (the open tag may be the template's)."""
  return (formats.has_reasoning_block(text, tags)
          and bool(text[text.find(tags[1]) + len(tags[1]):].strip()))


def outcome(sample: Mapping[str, Any], label: str, opts: Options) -> str:
  """One of OUTCOMES for a judged sample {"text", "finish_reason", "unsafe", "refused"}."""
  if sample["finish_reason"] == "length" and not (opts.use_truncated and sample.get("answer", "").strip()):
    return "truncated"  # a cut inside the reasoning has no answer to judge
  verdict = sample["unsafe"] if label in HARMFUL_LABELS else sample["refused"]
  if verdict is None:
    return "unjudged"
  if verdict:
    return "unsafe" if label in HARMFUL_LABELS else "refused"
  return "fine" if has_reasoning(sample["text"], opts.reasoning_tags) else "no_reasoning"


def wanted(opts: Options) -> frozenset[str]:
  """The outcomes that become pairs."""
  return frozenset({"unsafe", "refused"} | ({"no_reasoning"} if opts.format_pairs else set()))


def needs_pair(record: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], opts: Options) -> bool:
  return any(outcome(s, record["label"], opts) in wanted(opts) for s in samples)


def trace_of(content: str, tags: Sequence[str]) -> synthesis.Trace | None:
  """A trace's rendered assistant text -> Trace (steps + answer), or None if it has no block."""
  try:
    return synthesis.parse_trace(content, tags, min_steps=1, max_words=10**6)
  except synthesis.TraceError:
    return None


def step_cuts(text: str, tags: Sequence[str]) -> list[int]:
  """Offsets in ``text`` just after each reasoning line's newline (the step boundaries), for a
  text that opens its reasoning block with the open tag and closes it later."""
  open_tag, close_tag = tags
  start, end = text.find(open_tag), text.find(close_tag)
  if start < 0 or end < start or text[:start].strip():
    return []
  cuts, pos = [], start + len(open_tag)
  if not text.startswith("\n", pos):
    return []
  pos += 1
  while True:
    nl = text.find("\n", pos, end)
    if nl < 0:
      break
    if text[pos:nl].strip():
      cuts.append(nl + 1)
    pos = nl + 1
  return cuts


def _sample_id(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def pairs_for(record: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], chosen: str | None,
              opts: Options) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Raw preference pairs (parse_preference input) from one prompt's judged samples, and counts
  {outcome: n, "no_chosen": n, "duplicate": n, "invalid": n}. ``chosen``: the safe / helpful
  rendered assistant text for this prompt (trace or teacher), None if there is none."""
  counts = dict.fromkeys(OUTCOMES, 0) | {"no_chosen": 0, "duplicate": 0, "invalid": 0}
  tags = opts.reasoning_tags
  harmful = record["label"] in HARMFUL_LABELS
  pairable = wanted(opts)
  safe = trace_of(chosen, tags) if chosen else None
  base = {"category": record.get("category"), "label": record["label"], "prompt": record["prompt"]}
  pairs, seen, used = [], set(), 0
  for sample in samples:
    kind = outcome(sample, record["label"], opts)
    counts[kind] += 1
    if kind not in pairable:
      continue
    if chosen is None:
      counts["no_chosen"] += 1
      continue
    text = sample["text"]
    if text in seen or (opts.pairs_per_prompt and used >= opts.pairs_per_prompt):
      counts["duplicate"] += 1
      continue
    seen.add(text)
    sid = f"mined:{record['id']}:{_sample_id(text)}"
    mine = [{"id": f"{sid}:outcome", "kind": "outcome", **base, "prefix": "", "chosen": chosen,
             "rejected": text, "outcome": kind}]
    if harmful and kind == "unsafe" and safe is not None:
      cuts = step_cuts(text, tags)
      reflection = synthesis.TemplateWriter().reflection(record)
      for k in range(1, min(opts.max_prefix_steps, len(cuts) - 1) + 1):
        continuation = [reflection, *safe.steps[k:]]
        mine.append({"id": f"{sid}:k{k}", "kind": "process", **base, "prefix": text[:cuts[k - 1]],
                     "chosen": "\n".join(continuation) + f"\n{tags[1]}\n\n{safe.answer}",
                     "rejected": text[cuts[k - 1]:], "outcome": kind})
    ok = []
    for p in mine:
      try:
        formats.parse_preference(p, where=f"mine:{p['id']}", reasoning_tags=tags)
        ok.append(p)
      except formats.RecordError:
        counts["invalid"] += 1
    used += bool(ok)
    pairs += ok
  return pairs, counts


def chosen_text(record: Mapping[str, Any], traces: Mapping[str, str], opts: Options,
                teacher_text: str | None = None) -> str | None:
  """The chosen side for a prompt: its RW trace (by prompt text), else the model teacher's
  accepted text (``teacher_text``, http / sampler), else for a harmful prompt the template
  teacher's safe trace (teacher "template", or a model teacher with ``fallback``), else None."""
  found = traces.get(prompt_key(record["prompt"]))
  if found is not None:
    return found
  if teacher_text is not None:
    return teacher_text
  template = opts.teacher == "template" or (opts.teacher in ("http", "sampler") and opts.fallback)
  if record["label"] in HARMFUL_LABELS and template:
    trace = synthesis.TemplateWriter().safe(record)
    return formats.render_reasoning(trace.reasoning, trace.answer, opts.reasoning_tags)
  return None


def traces_by_prompt(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Normalised RW records (formats.parse_rw) -> {prompt key: the assistant text}; the first
  record of a prompt wins. The prompt is the last user turn."""
  out: dict[str, str] = {}
  for r in records:
    user = [m["content"] for m in r["messages"][:-1] if m["role"] == "user"]
    out.setdefault(prompt_key(user[-1]), r["messages"][-1]["content"])
  return out


def record_key(record: Mapping[str, Any], fingerprint: str) -> str:
  """A prompt's progress key: its text, label and the sampling fingerprint (policy, n, settings)."""
  blob = json.dumps([record["prompt"], record["label"], fingerprint])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
