"""Stages: ``config.stage`` names a module here whose ``run(config, workdir)`` does the work.

A new stage is one new module ``saro_jax/stages/<name>.py`` with
``run(config: ml_collections.ConfigDict, workdir: str) -> object``; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections


def available() -> list[str]:
  """Modules of this package that are stages (define ``run``); imports them, so only for errors."""
  names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
  return sorted(n for n in names if callable(getattr(_import(n), "run", None)))


def _import(name: str):
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ImportError:
    return None


def run(config: ml_collections.ConfigDict, workdir: str):
  name = config.get("stage")
  known = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
  module = importlib.import_module(f"{__name__}.{name}") if name in known else None
  if module is None or not callable(getattr(module, "run", None)):
    raise ValueError(f"config.stage={name!r} is not a stage; available: {available()}"
                     " (a stage is a module saro_jax/stages/<name>.py with run(config, workdir))")
  return module.run(config, workdir)
