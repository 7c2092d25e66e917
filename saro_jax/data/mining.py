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

Branch pairs (``decision``: the traces' decision question, synthesis.DECISION, whose next word
" Yes" / " No" is the decision; the smollm2_135m recipe sets it). A sample that asks the question
is paired where it went wrong, and only there (no outcome or k-step pairs for it):

  (``branches`` names the kinds written; a sample whose pair is of another kind is not paired.)
  wrong_decision  " Yes" on a harmful prompt or " No" on a benign one, whatever its answer says:
                  prefix = the sample through the question, chosen = the chosen text after its
                  question (the right word, the rest of that reasoning, its answer), rejected = the
                  sample after the question. The two sides differ from the decision token on.
  unsafe/refused  the right word, a bad answer: prefix = the sample through its reasoning block,
  (right word)    chosen = the chosen text's answer, rejected = the sample's answer (the answer
                  must follow the decision).

Probes: the mine stage can also sample the policy from forced prefixes (``probe_prefixes``): the
chosen text through the question + the WRONG word (a "decision" probe: what the policy writes after
that word, always a wrong_decision pair), and the chosen text's whole reasoning block (an "answer"
probe: whether the policy's answer follows the right decision). Decision probes give every prompt
a pair at its decision, so the pairs that push " No" on harmful prompts and " Yes" on benign ones
come in the proportion of the prompts' labels, not of the policy's mistakes (with the free samples
only, the decision word drifts toward the label the policy errs on most).

The rejected side is the policy's text, never a placeholder: SRPO learns from real negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from saro_jax.data import formats, public_sets, synthesis

HARMFUL_LABELS = synthesis.HARMFUL_LABELS
BENIGN_LABELS = synthesis.BENIGN_LABELS
OUTCOMES = ("wrong_decision", "unsafe", "refused", "no_reasoning", "fine", "truncated", "unjudged")
BRANCHES = ("decision", "answer")  # where a branch pair branches; also the probe kinds
PROBES = BRANCHES


@dataclasses.dataclass(frozen=True)
class Options:
  max_prefix_steps: int = 1
  format_pairs: bool = False
  use_truncated: bool = True
  pairs_per_prompt: int = 0  # 0 = every distinct bad sample
  teacher: str = "template"  # chosen without a trace: "template" | "http" | "sampler" | "none"
  fallback: bool = True  # a harmful prompt whose teacher text failed gets the template's
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS
  decision: str = ""  # the decision question (synthesis.DECISION): branch pairs; "" = off
  branches: tuple[str, ...] = BRANCHES  # the branch pairs written (the others' samples: "branch_off")


def prompt_key(text: str) -> str:
  """A prompt's identity for the trace lookup (public_sets.normalise: case, spacing, punctuation)."""
  return public_sets.normalise(text)


def has_reasoning(text: str, tags: Sequence[str]) -> bool:
  """A closed, non-empty reasoning block before an answer (the open tag may be the template's)."""
  return (formats.has_reasoning_block(text, tags)
          and bool(text[text.find(tags[1]) + len(tags[1]):].strip()))


def decision_cut(text: str, question: str) -> int:
  """The offset just after ``question`` in ``text`` (-1 if it is absent or ``question`` is "")."""
  at = text.find(question) if question else -1
  return at + len(question) if at >= 0 else -1


def decision_of(text: str, question: str) -> str | None:
  """The decision word after the question, lower case ("yes" / "no"), or None (no question, or
  another word)."""
  cut = decision_cut(text, question)
  word = re.match(r"\s*([A-Za-z]+)", text[cut:]) if cut >= 0 else None
  return word.group(1).lower() if word and word.group(1).lower() in ("yes", "no") else None


def right_decision(label: str) -> str:
  return "no" if label in HARMFUL_LABELS else "yes"


def outcome(sample: Mapping[str, Any], label: str, opts: Options) -> str:
  """One of OUTCOMES for a judged sample {"text", "finish_reason", "unsafe", "refused"}."""
  said = decision_of(sample["text"], opts.decision)
  if said is not None and said != right_decision(label):
    return "wrong_decision"  # the word is the decision, cut or not, whatever the answer says
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
  return frozenset({"wrong_decision", "unsafe", "refused"}
                   | ({"no_reasoning"} if opts.format_pairs else set()))


def needs_pair(record: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], opts: Options) -> bool:
  return any(outcome(s, record["label"], opts) in wanted(opts) for s in samples)


def trace_of(content: str, tags: Sequence[str]) -> synthesis.Trace | None:
  """A trace's rendered assistant text -> Trace (steps + answer), or None if it has no block."""
  try:
    return synthesis.parse_trace(content, tags, min_steps=1, max_words=10**6)
  except synthesis.TraceError:
    return None


def answer_cut(text: str, tags: Sequence[str]) -> int:
  """The offset where the answer starts (after the close tag and the blank line), or -1."""
  end = text.find(tags[1])
  if end < 0:
    return -1
  end += len(tags[1])
  return end + len(text[end:]) - len(text[end:].lstrip())


def probe_prefixes(chosen: str, label: str, opts: Options) -> dict[str, str]:
  """The forced assistant prefixes of the probes (``PROBES``) for a prompt whose chosen text is
  ``chosen``: "decision" = the chosen text through the question + the wrong word (and the mark
  after it, e.g. " Yes:"), "answer" = the
  chosen text through its reasoning block. Empty if ``chosen`` does not ask the question or has no
  closed block."""
  cut, start = decision_cut(chosen, opts.decision), answer_cut(chosen, opts.reasoning_tags)
  if cut < 0 or start < 0 or decision_of(chosen, opts.decision) != right_decision(label):
    return {}
  # The wrong word with the chosen text's own spacing and the mark after its word (" No:" ->
  # " Yes:"): a bare word would let the model glue a token onto it ("Yes" + "lary").
  said = re.match(r"(\s*)[A-Za-z]+(\W?)", chosen[cut:])
  wrong = "Yes" if right_decision(label) == "no" else "No"
  return {"decision": chosen[:cut] + said.group(1) + wrong + said.group(2).strip(), "answer": chosen[:start]}


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
  {outcome: n, "no_chosen": n, "duplicate": n, "invalid": n, "branch_off": n}. ``chosen``: the safe / helpful
  rendered assistant text for this prompt (trace or teacher), None if there is none."""
  counts = dict.fromkeys(OUTCOMES, 0) | {"no_chosen": 0, "duplicate": 0, "invalid": 0, "branch_off": 0}
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
    mine = _branch_pairs(sid, base, text, kind, chosen, safe, opts)
    if mine is not None and mine[0]["branch"] not in opts.branches:
      counts["branch_off"] += 1
      continue
    if mine is None:
      mine = [{"id": f"{sid}:outcome", "kind": "outcome", **base, "prefix": "", "chosen": chosen,
               "rejected": text, "outcome": kind}]
    if mine[0]["kind"] == "outcome" and harmful and kind == "unsafe" and safe is not None:
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


def _branch_pairs(sid: str, base: Mapping[str, Any], text: str, kind: str, chosen: str,
                  safe: synthesis.Trace | None, opts: Options) -> list[dict[str, Any]] | None:
  """The one branch pair of a sample (module docstring), or None where the branch rules do not
  apply (no ``decision``; the sample or the chosen text lacks the question or the block)."""
  tags, cut = opts.reasoning_tags, decision_cut(text, opts.decision)
  if cut < 0:
    return None
  if kind == "wrong_decision":
    chosen_cut = decision_cut(chosen, opts.decision)
    if chosen_cut < 0:
      return None
    return [{"id": f"{sid}:decision", "kind": "process", **base, "prefix": text[:cut],
             "chosen": chosen[chosen_cut:], "rejected": text[cut:], "outcome": kind,
             "branch": "decision"}]
  start = answer_cut(text, tags)
  if start < 0 or safe is None:
    return None
  return [{"id": f"{sid}:answer", "kind": "process", **base, "prefix": text[:start],
           "chosen": safe.answer, "rejected": text[start:], "outcome": kind, "branch": "answer"}]


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
