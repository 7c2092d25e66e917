r"""The SaRO pipeline: RW (SFT) -> SRPO (DPO, RW model as start and reference) -> HF export.

  python -m saro_jax.main --config configs/saro.py          # preset tiny (default): CPU, < 3 min
  python -m saro_jax.main --config configs/saro.py:smollm2_135m
  python -m saro_jax.main --config configs/saro.py:qwen2_5_7b --workdir /shared/runs/qwen

Shared sections (model, mesh, checkpoint, export, seed) apply to both stages; per-stage settings
live in config.rw.{data,opt,train} and config.srpo.{data,opt,train,dpo}, e.g.
--config.rw.train.steps=100 --config.srpo.dpo.beta=0.2. Outputs: <workdir>/rw, <workdir>/srpo
(checkpoints, metrics.jsonl, TensorBoard), <workdir>/hf (the final model, printed at the end) and,
with config.evaluate (default on), <workdir>/report.md: safety metrics of the start, RW and SRPO
models on the bundled held-out prompts (config.eval, see configs/eval.py) plus training curves.
Tiny preset (~2.5 min on 2 CPU cores): RW 300 steps, loss ~7.6 -> ~0.9; SRPO 40 steps,
rewards/accuracies ~1.0; the report shows the RW model refusing the harmful prompts and answering
the benign ones (4 prompts per label: a smoke test, not a safety measurement).
Re-running the same command resumes (finished stages are skipped).

Optional steps (config.pipeline, off by default): synthesize=True runs config.synthesize into
<workdir>/synthesize first (data specs may name synthesized:rw / synthesized:pairs /
synthesized:trajectories); mine=True mines on-policy pairs with the RW model (config.mine) and SRPO
reads them via srpo.data.sources=mined:pairs; rounds=k repeats mine -> SRPO k times, e.g.
  python -m saro_jax.main --config configs/saro.py --config.pipeline.synthesize=true \
      --config.pipeline.mine=true --config.pipeline.rounds=2 \
      --config.srpo.data.sources=mined:pairs --config.mine.mix_with=synthesized:pairs
"""

import ml_collections

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "saro")
  config = presets.base("saro", "saro", preset)
  config.rw = ml_collections.ConfigDict(presets.rw_recipe(preset))
  config.srpo = ml_collections.ConfigDict(presets.srpo_recipe(preset))
  # After export: evaluate start / RW / SRPO on the held-out prompts and write report.md.
  config.evaluate = True
  config.eval = presets.eval_section(preset)
  if preset == "tiny":
    config.eval.limit = 4  # prompts per label: the tiny run checks the plumbing, not safety
  # Optional steps (all off here): synthesize first, mine on-policy pairs, several mine -> SRPO
  # rounds. Sections as in configs/synthesize.py and configs/mine.py; see stages/pipeline.py.
  config.pipeline = presets.pipeline_section(preset)
  config.synthesize = presets.synthesize_section(preset)
  config.mine = presets.mine_section(preset)
  if preset == "smollm2_135m":
    # The recipe: synthesize from the train split, RW on the traces, SRPO on the synthesized pairs.
    config.pipeline.synthesize = True
    config.rw.data.sources = "synthesized:rw"
    config.srpo.data.sources = "synthesized:pairs"
  return config
