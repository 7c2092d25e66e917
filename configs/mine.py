r"""Mine on-policy SRPO pairs: sample the policy on the training prompts, judge, pair the bad samples.

  python -m saro_jax.main --config configs/mine.py:tiny --config.model.init_from=runs/saro-tiny/rw
  python -m saro_jax.main --config configs/mine.py:smollm2_135m --config.mine.n=4 \
      --config.mine.traces=runs/synthesize-smollm2_135m/rw.jsonl

The policy is config.model (any init_from: an RW/SRPO workdir, an HF dir, a .gguf). The prompts are
mine.prompts (evaluate/prompts specs, e.g. presets.TRAIN) or, when empty, the labelled records of
mine.traces (default: the bundled RW traces), which also give the chosen answers by prompt text;
prompts without a trace get mine.teacher's chosen side (template: harmful only; http: an
OpenAI-compatible endpoint, mine.http.*; sampler: the policy under the written safety policy). The judge is
mine.judge (the eval section's judges: refusal phrases by default). Writes <workdir>/pairs.jsonl
(+ mine.mix_with pairs), samples.jsonl (progress: a rerun resumes) and stats.json. Rules:
saro_jax/data/mining.py; the stage: saro_jax/stages/mine.py.
"""

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "mine")
  config = presets.header("mine", "mine", preset)
  config.mine = presets.mine_section(preset)  # keys and defaults: config.MineConfig
  return config
