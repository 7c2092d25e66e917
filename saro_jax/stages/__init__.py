"""Stages: ``config.stage`` names one entry of ``STAGES``, whose ``run(config, workdir)`` works.

A new stage is a module here with ``run(config: ml_collections.ConfigDict, workdir: str)`` and
one line in ``STAGES``.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from saro_jax.stages import evaluate, generate, mine, pipeline, rw, srpo, synthesize

STAGES: dict[str, Callable[[ml_collections.ConfigDict, str], object]] = {
    "rw": rw.run,  # Reasoning-style Warmup (SFT)
    "srpo": srpo.run,  # Safety-oriented Reasoning Process Optimization (DPO)
    "saro": pipeline.run,  # RW -> SRPO -> export -> evaluation report
    "evaluate": evaluate.run,  # generate, judge, score; several models -> report.md
    "generate": generate.run,  # completions for a prompt set
    "synthesize": synthesize.run,  # SaRO data construction: RW traces, outcome + process pairs
    "mine": mine.run,  # on-policy pairs: sample the policy, judge, pair its bad samples
}


def available() -> list[str]:
  return sorted(STAGES)


def run(config: ml_collections.ConfigDict, workdir: str):
  name = config.get("stage")
  if name not in STAGES:
    raise ValueError(f"config.stage={name!r} is not a stage; available: {available()}"
                     " (saro_jax/stages/__init__.py STAGES)")
  return STAGES[name](config, workdir)
