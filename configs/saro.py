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

smollm2_135m: the SaRO recipe for SmolLM2-135M-Instruct on 2 CPU cores. Synthesize from the train
split (configs/splits.py TRAIN; synthesize section in presets.synthesize_section): 30 harmful
prompts from each of Do-Not-Answer, HarmBench and both tense sets plus 30 jailbreak-wrapped ones,
written by the template writer (safe reasoning + refusal, process/outcome pairs), and all 126
benign/borderline train prompts answered by SmolLM2 itself (teacher "self", 96 new tokens at
temperature 0.5, looping answers rejected) behind a template reasoning block -> 266 RW traces
(10 benign prompts dropped), 566 pairs. RW: 16 steps x 4 packed rows of 256 tokens, lr 1.5e-4
cosine (loss 3.3 -> 0.5). SRPO: 6 steps x 2 pairs of 192 tokens, lr 1e-5, beta 0.1, on the
synthesized pairs (loss 0.69 -> 0.001: their rejected sides are template compliance openings,
separable by form). Eval: the dev split (presets.DEV), 5 prompts per label per set, greedy, 192
new tokens, refusal-phrase judge. On-policy mining (pipeline.mine) is off: it did not fit the
time measured here (README "The smollm2_135m recipe").
Measured (one run with exactly these settings, 2 CPU cores shared with ~3 other jobs, 1-minute
load average 4.2-10.9): synthesize 25.9 min (of it ~2 min model load), RW 13 min, SRPO 6 min, export
<1 min: 46.7 min of training and sampling; the evaluation of three models 17.0 min (start 6.1,
RW 5.7, SRPO 5.2). On an idle machine expect it faster (not measured: the RW step took ~130 s
at load 7 for 2048 tokens and 45-55 s at load 5.5 for 1024). Dev split, refusal-phrase judge (n per label: 15 harmful, 5 jailbreak,
5 benign, 5 borderline):

  stage  harmful   jailbreak  benign    borderline  reasoning  reasoning tok  repeated  cut at
         refused   refused    answered  answered    block      mean/median    4-grams   192 tok
  start  0/15      0/5        5/5       4/5         0 %        0/0            27.9 %    26/30
  RW     8/15      4/5        4/5       4/5         97 %       51/44          8.9 %     11/30
  SRPO   10/15     5/5        4/5       4/5         100 %      51/44          6.4 %     11/30

Targets met by SRPO: jailbreak >= 80 %, borderline >= 80 %, reasoning block >= 90 %; missed:
harmful 67 % (target 90 %), benign 4/5 (target 90 %; 5 prompts). One RW/SRPO generation is
degenerate (>= 50 % repeated 4-grams; the start model has 7). One setting of RW/SRPO was run
on dev (no tuning on dev); the synthesize teacher was changed once before any dev evaluation
(prefilling the reasoning block made SmolLM2 loop on 4 of 42 training answers).

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
    # The recipe: synthesize from the train split, RW on the traces, mine on-policy pairs with the
    # RW model (chosen: the synthesized trace of the prompt, or the template writer's for a harmful
    # prompt the synthesis did not cover), SRPO on the mined pairs.
    config.pipeline.synthesize = True
    config.pipeline.mine = True
    config.rw.data.sources = "synthesized:rw"
    config.mine.traces = "synthesized:rw"
    config.srpo.data.sources = "mined:pairs"
  return config
