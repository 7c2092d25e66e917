r"""Evaluate: generate on labelled prompt sets, judge, score; several models -> the run report.

  python -m saro_jax.main --config configs/eval.py --config.model.init_from=runs/saro-tiny/hf \
      --config.model.tokenizer=
  python -m saro_jax.main --config configs/eval.py \
      --config.eval.models=start=random,srpo=runs/saro-tiny/hf --config.eval.run_dir=runs/saro-tiny

One model writes generations.jsonl, judgements.jsonl and metrics.json into the workdir; several
(eval.models) write them under <workdir>/eval/<name>/ plus report.md. The work is
saro_jax/evaluate/evaluation.py.
"""

from __future__ import annotations

import pathlib

import ml_collections

from saro_jax.evaluate import evaluation


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The `evaluate` stage: one model (config.model) or, with eval.models, several plus the report.
  The work is saro_jax/evaluate/evaluation.py."""
  return evaluation.evaluate(config, workdir)
