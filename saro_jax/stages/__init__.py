"""Stages: ``config.stage`` names a module here whose ``run(config, workdir)`` does the work.

A new stage is one new module ``saro_jax/stages/<name>.py`` with
``run(config: ml_collections.ConfigDict, workdir: str) -> object``; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run(config: ml_collections.ConfigDict, workdir: str):
  name = config.get("stage")
  module = importlib.import_module(f"{__name__}.{name}") if name in available() else None
  if module is None or not callable(getattr(module, "run", None)):
    raise ValueError(f"config.stage={name!r} is not a stage; available: {available()}"
                     " (a stage is a module saro_jax/stages/<name>.py with run(config, workdir))")
  return module.run(config, workdir)
