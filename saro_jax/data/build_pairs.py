"""Trajectories -> SRPO preference pairs (process-level for several prefix lengths + outcome-level).

  python -m saro_jax.data.build_pairs IN OUT.jsonl [--min-prefix-steps 0] [--max-prefix-steps N]
      [--no-outcome] [--open-tag "<think>"] [--close-tag "</think>"] [--on-error raise|skip]

A trajectory (formats.parse_trajectory) is a reasoning chain whose step ``first_unsafe_step`` is
the first one that goes along with a harmful request. For every prefix length k in
[min_prefix_steps, first_unsafe_step] (the first k steps, all safe) one process pair shares that
prefix: chosen = the safety reflection ("Wait — ...") + the safe continuation + the safe answer,
rejected = the original chain from step k on (into the unsafe steps) + the unsafe answer. The
outcome pair has no shared prefix: the full safe trace vs. the full unsafe trace. For every pair
``prefix + chosen`` and ``prefix + rejected`` are complete rendered assistant turns.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from saro_jax.data import formats, sources


def _close(tags: Sequence[str], answer: str) -> str:
  return f"\n{tags[1]}\n\n{answer}"


def pairs_from_trajectory(traj: dict[str, Any], *, min_prefix_steps: int = 0,
                          max_prefix_steps: int | None = None, outcome: bool = True,
                          reasoning_tags: Sequence[str] = formats.DEFAULT_TAGS) -> list[dict[str, Any]]:
  """Raw preference records (parse_preference input) from one parsed trajectory."""
  steps, first = traj["steps"], traj["first_unsafe_step"]
  safe_tail = [traj["reflection"], *traj["safe_continuation"]]
  base = {"category": traj["category"], "prompt": traj["prompt"]}
  pairs = []
  last = first if max_prefix_steps is None else min(first, max_prefix_steps)
  for k in range(min_prefix_steps, last + 1):
    prefix = reasoning_tags[0] + "\n" + "".join(step + "\n" for step in steps[:k])
    pairs.append({"id": f"{traj['id']}:k{k}", "kind": "process", **base, "prefix": prefix,
                  "chosen": "\n".join(safe_tail) + _close(reasoning_tags, traj["safe_answer"]),
                  "rejected": "\n".join(steps[k:]) + _close(reasoning_tags, traj["unsafe_answer"])})
  if outcome:
    safe_reasoning = "\n".join([*steps[:first], *safe_tail])
    pairs.append({"id": f"{traj['id']}:outcome", "kind": "outcome", **base, "prefix": "",
                  "chosen": formats.render_reasoning(safe_reasoning, traj["safe_answer"], reasoning_tags),
                  "rejected": formats.render_reasoning("\n".join(steps), traj["unsafe_answer"],
                                                       reasoning_tags)})
  return pairs


def build_pairs(spec: str, *, min_prefix_steps: int = 0, max_prefix_steps: int | None = None,
                outcome: bool = True, reasoning_tags: Sequence[str] = formats.DEFAULT_TAGS,
                on_error: str = "raise") -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """All pairs of all trajectories in ``spec`` (any sources.py spec) and the source stats."""
  if min_prefix_steps < 0:
    raise ValueError(f"--min-prefix-steps must be >= 0, got {min_prefix_steps}")
  if max_prefix_steps is not None and max_prefix_steps < min_prefix_steps:
    raise ValueError(f"--max-prefix-steps ({max_prefix_steps}) < --min-prefix-steps ({min_prefix_steps})")
  trajectories, stats = sources.load_records(spec, kind="trajectory", on_error=on_error,
                                             reasoning_tags=reasoning_tags)
  pairs = []
  for traj in trajectories:
    pairs.extend(pairs_from_trajectory(traj, min_prefix_steps=min_prefix_steps,
                                       max_prefix_steps=max_prefix_steps, outcome=outcome,
                                       reasoning_tags=reasoning_tags))
  return pairs, stats


def write_jsonl(records: Sequence[dict[str, Any]], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m saro_jax.data.build_pairs", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("input", help="trajectories: a sources.py spec (JSONL/JSON/Parquet path or glob, hf:, ...)")
  parser.add_argument("output", help="output JSONL of preference pairs")
  parser.add_argument("--min-prefix-steps", type=int, default=0)
  parser.add_argument("--max-prefix-steps", type=int, default=None)
  parser.add_argument("--no-outcome", action="store_true", help="emit process-level pairs only")
  parser.add_argument("--open-tag", default=formats.DEFAULT_TAGS[0])
  parser.add_argument("--close-tag", default=formats.DEFAULT_TAGS[1])
  parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
  args = parser.parse_args(argv)
  try:
    pairs, stats = build_pairs(args.input, min_prefix_steps=args.min_prefix_steps,
                               max_prefix_steps=args.max_prefix_steps, outcome=not args.no_outcome,
                               reasoning_tags=(args.open_tag, args.close_tag), on_error=args.on_error)
  except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, not a traceback
    print(f"build_pairs: error: {e}", file=sys.stderr)
    return 2
  write_jsonl(pairs, args.output)
  n_process = sum(p["kind"] == "process" for p in pairs)
  print(f"build_pairs: {stats['kept']} trajectories -> {n_process} process + "
        f"{len(pairs) - n_process} outcome pairs -> {args.output} (skipped {stats['skipped']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
