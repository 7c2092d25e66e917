r"""Safety-oriented Reasoning Process Optimization (SRPO): DPO on outcome- and process-level pairs.

  python -m saro_jax.main --config configs/srpo.py --config.model.init_from=runs/rw-tiny/checkpoints

Starts from ``model.init_from`` (an RW checkpoint dir, HF dir, hub id or .gguf) and uses the same
weights as the frozen reference (``dpo.reference``: live | precomputed | none). On the tiny preset
(40 steps at lr 5e-5) rewards/accuracies reaches ~1.0 on the training pairs within 10 steps. Default workdir runs/srpo-<preset>.
"""

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "srpo")
  config = presets.base("srpo", "srpo", preset)
  config.update(presets.srpo_recipe(preset))
  return config
