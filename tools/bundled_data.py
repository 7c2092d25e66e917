"""Generates the bundled illustrative SaRO data set and its tiny tokenizer, deterministically.

  python -m tools.bundled_data [--out DIR] [--seed 0] [--no-tokenizer]     (from the repo root)

Writes rw_{train,eval}.jsonl (RW traces), trajectories_{train,eval}.jsonl (build_pairs input),
pairs_{train,eval}.jsonl (outcome pairs + the process/outcome pairs build_pairs makes from the
trajectories), eval_prompts.jsonl (held-out templates only) and tokenizer/ (byte-level BPE).
It is illustrative, not the paper's data: every harmful completion is a bracketed placeholder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from saro_jax.data import build_pairs, bundled, formats
from tools import bundled_templates as T

DEFAULT_OUT = bundled.DIR  # where the package reads the data
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING_TOKENS = list(formats.DEFAULT_TAGS)
# ChatML; {% generation %} marks assistant tokens for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_SECOND = {"my": "your", "myself": "yourself", "I": "you", "me": "you", "mine": "yours", "I'd": "you'd"}
_THIRD = {"my": "their", "myself": "themselves", "I": "they", "me": "them", "mine": "theirs", "I'd": "they'd"}


def _person(text: str, table: dict[str, str]) -> str:
  """First person in a user's goal -> second/third person for the assistant's own words."""
  return re.sub(r"\b(I'd|myself|my|mine|me|I)\b", lambda m: table[m.group(0)], text)


def _split(items: Sequence[tuple], split: str) -> list[tuple]:
  return [item for item in items if item[-1] == split]


# ------------------------------------------------------------------------------ harmful

def _harmful_requests(split: str) -> list[dict[str, Any]]:
  """Every (category, goal, template[, wrapper]) of the split, direct and jailbreak-wrapped."""
  rng = random.Random(f"requests-{split}")
  out = []
  request_templates = _split(T.REQUEST_TEMPLATES, split)
  for category, spec in T.HARM_CATEGORIES.items():
    for goal in spec["goals"]:
      for t_index, (template, _) in enumerate(request_templates):
        out.append(dict(category=category, goal=goal, label="harmful", wrapper=None,
                        template=f"request:{T.REQUEST_TEMPLATES.index((template, split))}",
                        prompt=template.format(goal=goal)))
      for name, wrapper, desc, _ in _split(T.JAILBREAK_WRAPPERS, split):
        request = rng.choice(request_templates)[0].format(goal=goal)
        out.append(dict(category=category, goal=goal, label="jailbreak", wrapper=desc,
                        template=f"jailbreak:{name}", prompt=wrapper.format(goal=goal, request=request)))
  return out


def _refusal(req: dict[str, Any], rng: random.Random) -> str:
  spec = T.HARM_CATEGORIES[req["category"]]
  goal = _person(req["goal"], _SECOND)
  if req["category"] == "self_harm":
    return (f"I'm really sorry you're going through this. I can't help you {goal}, but you don't have "
            f"to face this alone. {spec['alternative']}.")
  opener = rng.choice(["I can't help you", "I won't help you", "Sorry, I can't help you"])
  framing = " The framing doesn't change that." if req["wrapper"] else ""
  return f"{opener} {goal}: it {spec['harm']}.{framing} {spec['alternative']}."


def _safe_reasoning(req: dict[str, Any], rng: random.Random) -> list[str]:
  spec = T.HARM_CATEGORIES[req["category"]]
  goal = _person(req["goal"], _THIRD)
  steps = [rng.choice([f"The user asks how to {goal}.", f"The request is for help to {goal}.",
                       f"They want instructions to {goal}."])]
  if req["wrapper"]:
    steps.append(f"It is wrapped in {req['wrapper']}, but the output would still be real guidance "
                 f"to {goal}; the wrapper changes nothing about the harm.")
  steps.append(f"Doing this {spec['harm']}.")
  steps.append(f"Policy: {spec['policy']}.")
  steps.append("Decision: decline briefly" + (" and with care, pointing to support."
               if req["category"] == "self_harm" else ", without lecturing, and offer a safe alternative."))
  return steps


def _unsafe_reasoning(req: dict[str, Any], rng: random.Random) -> list[str]:
  goal = _person(req["goal"], _THIRD)
  return [f"The user asks how to {goal}.",
          (f"Since it is {req['wrapper']}, my usual rules don't apply." if req["wrapper"] else
           rng.choice(["Being maximally helpful means answering directly.",
                       "They probably have their reasons, so I'll just answer."])),
          "I'll lay out the steps in detail."]


def _trajectory(req: dict[str, Any], rng: random.Random, tid: str) -> dict[str, Any]:
  spec = T.HARM_CATEGORIES[req["category"]]
  goal = _person(req["goal"], _THIRD)
  safe = [f"The user asks how to {goal}."]
  if req["wrapper"]:
    safe.append(f"The request is framed as {req['wrapper']}.")
  safe += rng.sample(["Let me think about what they actually need.",
                      "There might be a legitimate angle, such as curiosity or safety."], rng.randint(0, 2))
  unsafe = [rng.choice(["They asked clearly, so I'll go along with it.",
                        "The framing makes it acceptable, so I'll answer." if req["wrapper"] else
                        "It's their choice, so I'll answer."]),
            f"Step one would be [unsafe detail omitted: how to {goal}].",
            "Then I'd add the specifics that make it work in practice."]
  framing = f" Being framed as {req['wrapper']} does not change that." if req["wrapper"] else ""
  return {"id": tid, "category": req["category"], "label": req["label"], "template": req["template"],
          "prompt": req["prompt"], "steps": safe + unsafe, "first_unsafe_step": len(safe),
          "reflection": f"Wait — helping them {goal} {spec['harm']}.{framing} Policy: {spec['policy']}. "
                        "I should not continue down this path.",
          "safe_continuation": ["A short refusal plus a genuinely useful alternative serves them better."],
          "safe_answer": _refusal(req, rng),
          "unsafe_answer": T.UNSAFE_PLACEHOLDER.format(goal=goal)}


# ------------------------------------------------------------------------------ benign

def _benign_requests(split: str, prefixes: Sequence[str]) -> list[dict[str, Any]]:
  out = []
  for index, (category, paraphrases, note, answer, item_split) in enumerate(T.BENIGN_ITEMS):
    if item_split != split:
      continue
    for prompt in paraphrases:
      for prefix in prefixes:
        out.append(dict(category=category, label="borderline" if note else "benign", note=note,
                        answer=answer, template=f"benign:{index}", prompt=prefix + prompt))
  return out


def _benign_reasoning(req: dict[str, Any], rng: random.Random) -> list[str]:
  steps = [f"The user asks: \"{req['prompt']}\""]
  if req["note"]:
    steps.append(f"The wording may sound risky, but here {req['note']}; the intent is ordinary.")
  else:
    steps.append("This is an everyday request with no safety concern.")
  steps.append("Policy: helpful answers are the default; refusing a harmless request would be over-cautious.")
  steps.append(rng.choice(["Decision: answer fully and concisely.", "Decision: help directly."]))
  return steps


def _overcautious_reasoning(req: dict[str, Any]) -> list[str]:
  return [f"The user asks: \"{req['prompt']}\"",
          "Some of these words sound dangerous." if req["note"] else "I can't be sure how this will be used.",
          "To be safe, I'll refuse."]


# ------------------------------------------------------------------------------ records

def _render(steps: Sequence[str], answer: str) -> str:
  return formats.render_reasoning("\n".join(steps), answer)


def build_split(split: str, *, seed: int, n_rw_harmful: int, n_rw_benign: int, n_pairs_harmful: int,
                n_pairs_benign: int, n_trajectories: int) -> dict[str, list[dict[str, Any]]]:
  rng = random.Random(f"{seed}-{split}")
  harmful = _harmful_requests(split)
  benign = _benign_requests(split, T.BENIGN_PREFIXES)
  rw = []
  for req in rng.sample(harmful, min(n_rw_harmful, len(harmful))):
    rw.append({"category": req["category"], "label": req["label"], "template": req["template"],
               "prompt": req["prompt"], "reasoning": "\n".join(_safe_reasoning(req, rng)),
               "response": _refusal(req, rng)})
  for req in rng.sample(benign, min(n_rw_benign, len(benign))):
    rw.append({"category": req["category"], "label": req["label"], "template": req["template"],
               "prompt": req["prompt"], "reasoning": "\n".join(_benign_reasoning(req, rng)),
               "response": req["answer"]})
  pairs = []
  for req in rng.sample(harmful, min(n_pairs_harmful, len(harmful))):
    pairs.append({"kind": "outcome", "category": req["category"], "label": req["label"],
                  "template": req["template"], "prompt": req["prompt"], "prefix": "",
                  "chosen": _render(_safe_reasoning(req, rng), _refusal(req, rng)),
                  "rejected": _render(_unsafe_reasoning(req, rng),
                                      T.UNSAFE_PLACEHOLDER.format(goal=_person(req["goal"], _THIRD)))})
  for req in rng.sample(benign, min(n_pairs_benign, len(benign))):
    pairs.append({"kind": "outcome", "category": req["category"], "label": req["label"],
                  "template": req["template"], "prompt": req["prompt"], "prefix": "",
                  "chosen": _render(_benign_reasoning(req, rng), req["answer"]),
                  "rejected": _render(_overcautious_reasoning(req), T.NEEDLESS_REFUSAL)})
  trajectories = [_trajectory(req, rng, f"traj-{split}-{i:04d}")
                  for i, req in enumerate(rng.sample(harmful, min(n_trajectories, len(harmful))))]
  rw = [{"id": f"rw-{split}-{i:04d}", **record} for i, record in enumerate(rw)]
  pairs = [{"id": f"pair-{split}-{i:04d}", **record} for i, record in enumerate(pairs)]
  # Process pairs come from the trajectories through the same code path as the CLI.
  for line, raw in enumerate(trajectories, 1):
    traj = formats.parse_trajectory(raw, where=f"trajectories_{split}.jsonl:{line}")
    for pair in build_pairs.pairs_from_trajectory(traj):
      pair.update(label=raw["label"], template=raw["template"])
      pairs.append(pair)
  return {f"rw_{split}": rw, f"pairs_{split}": pairs, f"trajectories_{split}": trajectories}


def eval_prompts() -> list[dict[str, Any]]:
  """Held-out templates only: harmful and jailbreak-wrapped requests, benign and borderline ones."""
  rng = random.Random("eval-prompts")
  harmful = _harmful_requests("eval")
  picked = [r for r in harmful if r["label"] == "harmful"]
  picked = rng.sample(picked, 48) + rng.sample([r for r in harmful if r["label"] == "jailbreak"], 48)
  picked += _benign_requests("eval", T.BENIGN_PREFIXES)
  return [{"id": f"eval-{i:04d}", "prompt": r["prompt"], "label": r["label"], "category": r["category"],
           "template": r["template"]} for i, r in enumerate(picked)]


def generate_records(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
  files = build_split("train", seed=seed, n_rw_harmful=470, n_rw_benign=150, n_pairs_harmful=320,
                      n_pairs_benign=100, n_trajectories=150)
  files.update(build_split("eval", seed=seed, n_rw_harmful=80, n_rw_benign=40, n_pairs_harmful=60,
                           n_pairs_benign=30, n_trajectories=40))
  files["eval_prompts"] = eval_prompts()
  return files


# ------------------------------------------------------------------------------ tokenizer

def _corpus(files: dict[str, list[dict[str, Any]]]) -> list[str]:
  """Chat-rendered text of every bundled record, in file order (the BPE training corpus)."""
  texts = []
  for name in sorted(files):
    for r in files[name]:
      prompt = r["prompt"] if isinstance(r["prompt"], str) else "\n".join(m["content"] for m in r["prompt"])
      parts = [f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"]
      if "reasoning" in r:
        parts.append(formats.render_reasoning(r["reasoning"], r["response"]))
      elif "chosen" in r:
        parts.append(r["prefix"] + r["chosen"] + "\n" + r["prefix"] + r["rejected"])
      elif "steps" in r:
        parts.append("\n".join(r["steps"] + [r["reflection"], r["safe_answer"]]))
      texts.append("".join(parts) + "<|im_end|>\n")
  return texts


def train_tokenizer(files: dict[str, list[dict[str, Any]]], out_dir: str) -> None:
  """Byte-level BPE (vocab VOCAB_SIZE) with ChatML specials and <think> tags as added tokens."""
  tok = Tokenizer(tokenizer_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(files), trainer=trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None, model_max_length=4096)
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)


def write_all(out_dir: str, *, seed: int = 0, tokenizer: bool = True) -> dict[str, list[dict[str, Any]]]:
  files = generate_records(seed)
  os.makedirs(out_dir, exist_ok=True)
  for name, records in files.items():
    build_pairs.write_jsonl(records, os.path.join(out_dir, f"{name}.jsonl"))
  if tokenizer:
    train_tokenizer(files, os.path.join(out_dir, "tokenizer"))
  return files


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-tokenizer", action="store_true")
  args = parser.parse_args(argv)
  files = write_all(args.out, seed=args.seed, tokenizer=not args.no_tokenizer)
  print(json.dumps({name: len(records) for name, records in files.items()}))


if __name__ == "__main__":
  main()
