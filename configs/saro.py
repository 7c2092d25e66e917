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
split (configs/splits.py TRAIN; synthesize section in presets.synthesize_section): 20 harmful
prompts from each of Do-Not-Answer, HarmBench and both tense sets plus 20 jailbreak-wrapped ones,
written by the template writer (safe reasoning + refusal, process/outcome pairs), and all 126
benign/borderline train prompts answered by SmolLM2 itself (teacher "self", 96 new tokens at
temperature 0.5 in batches of 64, looping answers rejected) behind a template reasoning block ->
221 RW traces (100 refusals, 121 helpful; 5 benign prompts without an accepted answer). Every
trace's second reasoning line opens with the same question, "Is it safe to help with this?", and
the next word, " Yes" or " No", is the decision (synthesis.DECISION). RW: 24 steps x 4 packed rows
of 512 tokens (fill 0.84, 216 traces: one epoch), lr 1.5e-4 cosine (loss 2.55 -> 0.38). Mine
(presets.mine_section): the RW model samples 12 train prompts per label of the HarmBench half,
both tense sets and the benign/borderline set (60 prompts), 2 samples each at temperature 1, 128
new tokens; judged by refusal phrases, unsafe harmful samples become rejected against the
synthesized trace of the prompt (or the template writer's), refusals of benign/borderline prompts
rejected against the synthesized helpful answer. Measured: harmful 62/72 samples refused; benign
9/24 and borderline 10/24 samples refused -> 34 pairs (16 against unsafe answers, 18 against
refusals; 26 outcome, 8 process). SRPO: 12 steps x 4 mined pairs of <= 256 tokens, lr 1e-5, beta
0.1 (loss 0.69 -> 0.17). Eval: the dev split (presets.DEV), 10 prompts per label per set, greedy,
192 new tokens, batches of 30, refusal-phrase judge.

Measured (the third setting, one run, 2 CPU cores shared with 3 other jobs; 1-minute load
average 3.9-15.9, mean 7.6): synthesize 19.4 min, RW 18.8 min, mine 8.1 min, SRPO 9 min: 55 min
of training and sampling (budget 60); export + the report's evaluation of all three models 12.3
min (budget 20). The run was first made with SRPO at 3e-5: the process was killed by the kernel's
OOM killer (other jobs' memory) at its first SRPO step and resumed (SRPO 11 min at 3e-5); after
its dev result SRPO was rerun at 1e-5 on the same RW model and mined pairs (the figures above;
both rows below). Dev split, refusal-phrase judge (n per label: 30 harmful, 10 jailbreak, 10
benign, 10 borderline):

  stage         harmful   jailbreak  benign    borderline  reasoning  reasoning tok  repeated  cut at
                refused   refused    answered  answered    block      mean/median    4-grams   192 tok
  start         0/30      1/10       10/10     9/10        0 %        0/0            33.5 %    53/60
  RW            30/30     10/10      7/10      8/10        93 %       81/72          2.7 %     8/60
  SRPO (1e-5)   12/30     10/10      8/10      9/10        93 %       70/58          6.6 %     14/60
  SRPO (3e-5)   6/30      10/10      10/10     10/10       93 %       69/56          8.5 %     12/60

(harmful per set, HarmBench / past tense / future tense: RW 10/10, 10/10, 10/10; SRPO at 1e-5
4/10, 2/10, 6/10.) The RW model meets the harmful (>= 90 %), jailbreak (>= 80 %), borderline
(>= 80 %) and reasoning-block (>= 90 %) targets and misses benign (70 %, target 90 %); its
decision word is right on 30/30 harmful, 10/10 benign and 9/10 borderline prompts, and the three
benign misses say " Yes" and then answer with the template refusal (the answer's first token
follows the refusals' frequency, not the decision). SRPO on the mined pairs makes the model
less safe: it says " Yes" to every dev prompt, harmful ones included. The mined pairs push the
decision one way: 15 of the 18 pairs against refusals have " No" on the rejected side and " Yes"
on the chosen, while the 16 pairs against unsafe answers come from 8 samples of which only 4
said " Yes"; the other 4 said " No" (so their decision tokens are shared with the chosen side and
cancel in the DPO margin), and only one of those complied: the phrase judge also counted a hedged
refusal (its phrase since added to the list), a deflection and a rebuttal as unsafe. DPO moves
that shared decision token for every prompt. The next setting should give
SRPO as many pairs that push " No" on harmful prompts as pairs that push " Yes" on benign ones
(e.g. synthesized harmful pairs whose unsafe side says " Yes", mixed with the mined ones through
mine.mix_with) and make the answer follow the decision. Until then, the safer model of this
recipe is the RW checkpoint (<workdir>/rw). A one-off check of that diagnosis (not the recipe;
its 15 pairs were built by hand at the end of the session): SRPO at 1e-5 on the same RW model with
the mined pairs plus 15 harmful train prompts' pairs whose rejected side says " Yes" and complies
(--config.mine.mix_with) gave harmful 28/30, jailbreak 10/10, benign 7/10, borderline 8/10: the
collapse to " Yes" is gone, but SRPO no longer improves on RW either.

Earlier settings (the changes between them follow each one's failure on dev, not a search over
dev runs): the first (RW 16 steps, SRPO 6 steps at 1e-5 on the synthesized pairs, no mining, 5
prompts per label) gave for the SRPO model harmful 10/15, jailbreak 5/5, benign 4/5, borderline
4/5. The second (30 harmful prompts per set, label-specific wordings of the decision line, RW 24
steps on rows of 256 tokens, which held one trace each and saw 98 of 266 traces; mining as now;
SRPO 8 steps x 2 pairs at 3e-5) gave RW 30/30, 10/10, 3/10, 1/10 and SRPO 30/30, 10/10, 2/10,
2/10: the RW model wrote the harmful template's decision line, the most frequent one, for every
prompt. The third setting's changes answer that: one decision question for every label, refusals
and helpful traces about half and half, rows of 512 (the whole data once), SRPO about one epoch
of the mined pairs.

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
