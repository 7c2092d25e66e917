"""Load a script of benchmarks/ (not a package) as a module, for the tests that run it small."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load(name: str):
  """benchmarks/<name>.py as the module ``saro_benchmarks_<name>``, registered in sys.modules
  (the scripts' dataclasses look their module up by name)."""
  spec = importlib.util.spec_from_file_location(f"saro_benchmarks_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module
