r"""Safety-oriented Reasoning Process Optimization (SRPO): DPO on outcome- and process-level pairs.

  python -m saro_jax.main --config configs/srpo.py --config.model.init_from=runs/rw-tiny/checkpoints

Starts from ``model.init_from`` (an RW checkpoint dir, HF dir, hub id or .gguf) and uses the same
weights as the frozen reference (``dpo.reference``: live | precomputed | none). On the tiny preset
(40 steps at lr 5e-5) rewards/accuracies reaches ~1.0 on the training pairs within 10 steps. Default workdir runs/srpo-<preset>.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("saro_configs_common",
                                               os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg: str | None = None):
  preset = common.parse_preset(arg, "srpo")
  config = common.base("srpo", "srpo", preset)
  config.update(common.srpo_recipe(preset))
  return config
