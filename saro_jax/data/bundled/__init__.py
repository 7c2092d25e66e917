"""The bundled illustrative SaRO data set (written by ``tools/bundled_data.py``; see README "Data formats").

Files: rw_train / rw_eval (RW traces), pairs_train / pairs_eval (outcome + process pairs),
trajectories_train / trajectories_eval (build_pairs input), eval_prompts, and ``tokenizer/``.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Absolute path of bundled item ``name`` ("rw_train", "pairs_train.jsonl", "tokenizer", ...)."""
  for candidate in (name, f"{name}.jsonl"):
    full = os.path.join(DIR, candidate)
    if os.path.exists(full) and not candidate.endswith(".py"):
      return full
  names = sorted(n.removesuffix(".jsonl") for n in os.listdir(DIR)
                 if n.endswith(".jsonl") or n == "tokenizer")
  raise FileNotFoundError(f"no bundled data named {name!r} (have {names})")
