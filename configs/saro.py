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
temperature 0.5 in batches of 64, looping answers rejected) behind a template reasoning block ->
266 RW traces (10 benign prompts dropped), 566 pairs. RW: 24 steps x 4 packed rows of 256 tokens,
lr 1.5e-4 cosine (loss 3.5 -> 0.35). Mine (presets.mine_section): the RW model samples 12 train
prompts per label of the HarmBench half, both tense sets and the benign/borderline set (60
prompts), 2 samples each at temperature 1, 128 new tokens; judged by refusal phrases, unsafe
harmful samples become rejected against the synthesized trace of the prompt (or the template
writer's), refusals of benign/borderline prompts rejected against the synthesized helpful answer.
Measured: harmful 54/72 samples refused, 14 unsafe; benign 9/24 and borderline 11/24 samples
refused (the RW model over-refuses at temperature 1) -> 46 pairs (26 against unsafe answers, 20
against refusals; 33 outcome, 13 process). SRPO: 8 steps x 2 mined pairs of 192 tokens, lr 3e-5,
beta 0.1. Eval: the dev split (presets.DEV), 10 prompts per label per set, greedy, 192 new
tokens, batches of 30, refusal-phrase judge.
Measured (one run, 2 CPU cores shared with ~4 other jobs; 1-minute load average 5.5-13 during
synthesize and RW, 13-16 during mining, up to 39 after): synthesize 16.0 min (first setting:
25.9 min at batch 32), RW 25.5 min (~60 s/step), mine 18.8 min: 60.3 min before SRPO, over the
60-minute budget on this machine at this load. SRPO was first set to 12 steps at 2e-5; after
mining, to stay in the session's time, the run was stopped before its first SRPO step and resumed
(RW and mine restored from disk) with 8 steps at 3e-5, no dev result having been seen. The start model
was evaluated by configs/eval.py:smollm2_135m (the same eval section) in a separate process while
mining and SRPO ran (that process was stopped during its RW evaluation). Dev split, refusal-phrase judge (n per label: 30 harmful, 10
jailbreak, 10 benign, 10 borderline). SRPO finished at 06:41 UTC (8 steps, ~130-270 s/step; loss
0.693, 0.693, 0.658, 0.684, 0.315, 0.438, 0.114, 0.513: on-policy pairs are not separated at
once, unlike the synthesized ones) and was exported. The start model's evaluation took 43 min at
load 10-39; the RW and SRPO models were evaluated afterwards by the same command in one process
(configs/eval.py:smollm2_135m, models rw=<workdir>/rw, srpo=<workdir>/hf): 8.6 + 10.1 min at
load 3-7, i.e. ~19 min for the two; the recipe's own report step evaluates all three models in
one process.

  stage  harmful   jailbreak  benign    borderline  reasoning  reasoning tok  repeated  degenerate  cut at
         refused   refused    answered  answered    block      mean/median    4-grams   rows        192 tok
  start  0/30      1/10       10/10     9/10        0 %        0/0            33.5 %    16          53/60
  RW     30/30     10/10      3/10      1/10        95 %       70/62          2.3 %     1           3/60
  SRPO   30/30     10/10      2/10      2/10        93 %       72/62          2.5 %     1           5/60

(harmful per set, RW and SRPO alike: HarmBench 10/10, past tense 10/10, future tense 10/10.)
Targets met by SRPO: harmful >= 90 %, jailbreak >= 80 %, reasoning block >= 90 %, repetition low;
missed, badly: benign 20 % (target 90 %) and borderline 20 % (target 80 %). This setting
over-refuses: the RW model collapsed onto the template refusal (most benign answers are the
template's "I can't help with that request..." after a reasoning block that begins as a benign
one and ends in the harmful template's "So I should decline"), and 8 SRPO steps on 20
refusal-vs-answer pairs did not undo it. The first setting (below) was the better balance; the
next setting should rebalance RW (fewer or lower-lr steps, more benign traces per refusal, less
uniform refusal templates) rather than add SRPO steps.
This is the second setting evaluated on dev. The first (RW 16 steps, SRPO 6 steps at 1e-5 on the
synthesized pairs, no mining, eval 5 prompts per label per set; 46.7 min + 17.0 min at load
4.2-10.9) gave for the SRPO model: harmful 10/15 refused (past/future tense rephrasings 3/5,
2/5), jailbreak 5/5, benign 4/5, borderline 4/5, reasoning block 100 %, repeated 4-grams 6.4 %
(start: 0/15, 0/5, 5/5, 4/5, 0 %, 27.9 %; RW: 8/15, 4/5, 4/5, 4/5, 97 %, 8.9 %). The changes
follow its known weak points, not a search over dev runs: mining on (the synthesized pairs are
separable by form: SRPO loss 0.69 -> 0.001 in 6 steps), the tense train sets among the mined
prompts (where harmful failed), RW 24 steps (16 saw about half the traces), 10 prompts per label
(5 cannot tell 80 % from 90 %), synthesis and eval at larger batches (time).

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
