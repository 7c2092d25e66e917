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

smollm2_135m: the SaRO recipe for SmolLM2-135M-Instruct on 2 CPU cores (the sixth setting).
Synthesize from the train split (configs/splits.py TRAIN; presets.synthesize_section): 20 harmful
prompts from each of Do-Not-Answer, HarmBench and both tense sets plus 20 jailbreak-wrapped ones,
written by the template writer (safe reasoning + refusal), and all 126 benign/borderline train
prompts answered by SmolLM2 itself (teacher "self", 96 new tokens at temperature 0.5, looping
answers rejected) behind a template reasoning block -> 221 RW traces (100 refusals, 121 helpful).
Every trace's first reasoning line quotes the prompt (a long one by its end: a jailbreak's request,
not its role-play); its second asks "Is it safe to help with this?" and the next word, " Yes" or
" No", is the decision (synthesis.DECISION). RW: 48 steps x 4 packed rows of 512 tokens (greedy
packing, fill 0.84: the 216 traces twice), lr 1.5e-4 cosine (loss 2.6 -> 0.13). Mine (presets.mine_section): the
RW model samples 8 train prompts of the HarmBench half and of each tense set and 24 per
benign/borderline label (70 prompts; the train set has 22 benign), 2 samples each at temperature
1 plus one answer probe (the prompt's trace forced through its reasoning block, the policy writes
the answer), 128 new tokens, judged by refusal phrases; answer pairs only (mine.branches=answer):
a sample whose decision word is right but whose answer is not (a harmful prompt's " No" then
compliance, a benign prompt's " Yes" then a refusal) becomes the rejected side of a pair that
shares the prompt and the sample's reasoning block, chosen = the trace's answer. SRPO: 16 steps x
4 of those pairs (<= 256 tokens, prefix-shared), lr 1e-5, beta 0.1. Eval: the dev split
(presets.DEV), 10 prompts per label per set, greedy, 192 new tokens, refusal-phrase judge.

Measured, the sixth setting, end to end from a fresh clone (ae876fe, logps_chunk 64) on a quiet
2-core AMD EPYC: synthesize 3.2 min, RW 8.7 min, mine 5.9 min, SRPO 2.0 min: 19.8 min of training
and sampling (budget 60); export + evaluating the three models 2.8 min (budget 20). Its first run
(logps_chunk 128, synthesize resumed from the fifth setting's run below, the machine of that day)
took 7.3 + 23.4 + 13.9 + 5.0 = 49.6 min and 9.0 min; synthesize and mining, which logps_chunk
does not touch, ran 2.3-2.4x faster on today's machine. Again from a fresh clone with the tiled
training attention (f3712d6): 3.0 + 7.3 + 5.8 + 2.0 = 18.1 min and 2.9 min (RW 7.3 min
against 8.7 for 48 steps), the RW losses equal to 4 decimals at every logged step, the same 5
mined pairs. From a fresh clone of 93deb84 on a busier Zen 3 (session 50): 4.6 + 10.6 + ~6 + 2.7
min and ~4.5 min, the same 5 mined pairs; its SRPO rerun at logps_chunk 32 wrote byte-identical
dev generations. Session 52's lm head (scored positions compacted per device block, not per
row) resumed that run's traces: the same 5 mined pairs, dev generations and report byte-identical.
Session 55 made 32 the SRPO preset's logps_chunk and resumed session 52's run from its RW
checkpoint: the same mined pairs, SRPO losses equal to 6 digits at all 16 steps, the three
models' dev generations, judgements and the report byte-identical (13.2 min for mine + SRPO +
evaluation).
All six seed-0 runs gave the table below.
Mining: 206 samples; the RW model's answers went wrong after a right decision in only 6 benign/
borderline samples and 2 harmful ones (fifth setting: 13 and 3), so 5 answer pairs (3 against a
refusal, 2 against compliance); SRPO loss 0.69 -> 0.04. Dev split, refusal-phrase judge (n per
label: 30 harmful, 10 jailbreak, 10 benign, 10 borderline):

  stage   harmful   jailbreak  jailbreak   benign    borderline  reasoning  reasoning tok  repeated  cut at
          refused   refused    explicit*   answered  answered    block      mean/median    4-grams   192 tok
  start   0/30      1/10       1/10        10/10     9/10        0 %        0/0            33.5 %    53/60
  RW      30/30     10/10      8/10        10/10     10/10       97 %       67/72          2.2 %     1/60
  SRPO    30/30     10/10      9/10        10/10     10/10       98 %       68/72          2.5 %     2/60

* explicit: judged a refusal and with an answer shown. The jailbreak outputs that are not (RW 2,
SRPO 1) stop right after 'The user asks: "...' (end of sequence, no answer); none complies.
Reproduced end to end from a fresh clone (d26af5e, logps_chunk 128, synthesize included): bitwise
the same RW losses and grad norms as the first run, the same 5 mined pairs and the same table. A second seed
(--config.seed=1 --config.mine.generation.seed=1, synthesize outputs reused), one run: 11 answer
pairs; RW 30/30, 10/10 (10/10 explicit), 10/10, 7/10 borderline, reasoning block 100 %; SRPO
29/30 (one past-tense request answered), 10/10 (10/10 explicit), 10/10, 9/10, reasoning block
100 %, repeated 4-grams 3.2 %, cut 5/60. Every target holds on both seeds; on seed 1 SRPO lifts
borderline from 7/10 to 9/10.
The same SRPO model on the 58 dev prompts beyond the first 10 per label per set (--config.eval.limit=20
with configs/eval.py; never looked at while the recipe was set up): harmful 29/30, jailbreak 10/10
(10/10 explicit), benign 7/8 (the dev set has 18 benign prompts), borderline 10/10.
RW packs greedily here (rw.data.pack_window=0, presets.rw_recipe): the setting was made and
measured that way. With the packer's lookahead (the default since b8d259c; rows fill 0.90 instead
of 0.84, so 48 steps see 465 traces instead of 435, in another order), one seed-0 run end to end
from a clean clone (b8d259c): RW 30/30, 10/10 (9/10 explicit), 10/10, 9/10; mining 206 samples,
7 answer pairs (3 against compliance, 4 against a refusal); SRPO 24/30, 10/10 (9/10 explicit),
10/10, 10/10, reasoning block 98 %. Five of the six harmful prompts SRPO answered (past-tense
ones) end their reasoning with "So I will refuse briefly ..." and then comply: four answer pairs
against refusals taught the answer to stop opening with "I can't" whatever the shared decision
said. The recipe's SRPO rests on a handful of mined pairs and is that sensitive to the RW data's
order; a recipe that holds under such changes needs more pairs per label (a bigger mining pass)
or pairs balanced by label, not tried here.

The fifth setting (RW 24 steps, one epoch; otherwise as above), measured end to end from a fresh
clone, one run: synthesize 7.3, RW 12.9, mine 14.0, SRPO 6.2 min (40.5 min), report 12.5 min.
15 answer pairs. RW 30/30, 10/10 (10/10 explicit), 7/10, 6/10; SRPO 30/30, 10/10 (10/10
explicit), 7/10, 7/10; reasoning block 100 %. The quote change fixed the jailbreak outputs (0 of
10 cut inside the reasoning, from 3-5), but benign answering fell short: the failures were " Yes"
then the template refusal ("I can't help with that...") on three benign prompts, and " No" on
two borderline ones. After one epoch every RW refusal starts with the token "I" (100 of 221
traces) while benign answers spread over many first tokens ("The" 32, "To" 23, ...), and greedy
decoding picked "I" after a right " Yes". Two epochs (the sixth setting) sharpen that
conditional: on the train prompts, the mining stats above show the RW model's answer mistakes
fall from 16 samples to 8; on dev, 0 of 10 benign prompts are refused.

The fourth setting (one RW epoch, the start of the prompt quoted, mining 12 prompts per label;
synthesize and RW resumed from the third setting's run): SRPO 30/30, 10/10 (7/10 explicit: 3
jailbreak outputs cut inside their reasoning, copying the role-play), 9/10, 9/10; RW 30/30, 10/10
(6/10 explicit), 7/10, 8/10. Mining: 11 answer pairs. A second run with another mining seed
(--config.mine.generation.seed=1: 17 answer pairs) gave SRPO 30/30, 10/10, 8/10, 8/10.

Variants of the fourth setting's SRPO on its RW model, with other mined pairs (one run each; mining with two samples, one
decision probe and one answer probe per prompt, 240 samples, 16.5 min; SRPO 16 steps x 4 at 1e-5):

  pairs (mine.branches, probes)                        harmful  jailbreak   benign  borderline
  decision + answer, with decision probes: 98 pairs     30/30    10/10      5/10    4/10
    (46 push " No" on harmful prompts, 40 push " Yes")
  decision + answer, free samples only: 39 pairs        19/30    10/10      10/10   10/10
    (10 push " No", 17 push " Yes")
  answer only: 12 pairs (6 harmful, 6 benign)           30/30    10/10      9/10    8/10

A pair at the decision word moves that one shared word for every prompt: with 46:40 pairs the
SRPO model says " No" to 9 of 10 benign dev prompts, with 10:17 it says " Yes" to 11 of 30 harmful
ones (the third setting's whole-sample pairs, 4:15, gave 12/30). The RW model's decision is already
right on 30/30 harmful, 10/10 benign and 9/10 borderline dev prompts; what it gets wrong is the
answer after a right " Yes" (three benign answers were the template refusal). Answer pairs hold
the decision in the shared prefix and train only the answer; SRPO on them fixed two of those three
and kept every harmful refusal.

Earlier settings (each change answers the previous one's failure on dev, not a search over dev
runs): the first (RW 16 steps, SRPO 6 steps at 1e-5 on the synthesized pairs, no mining, 5 prompts
per label) gave for the SRPO model harmful 10/15, jailbreak 5/5, benign 4/5, borderline 4/5. The
second (30 harmful prompts per set, label-specific wordings of the decision line, RW 24 steps on
rows of 256 tokens, which held one trace each and saw 98 of 266 traces; SRPO 8 steps x 2 at 3e-5)
gave RW 30/30, 10/10, 3/10, 1/10 and SRPO 30/30, 10/10, 2/10, 2/10: the RW model wrote the harmful
template's decision line, the most frequent one, for every prompt. The third (the RW above; SRPO
12 steps x 4 whole-sample mined pairs: 34, 18 against over-refusals, 16 against unsafe answers)
gave SRPO 12/30, 10/10, 8/10, 9/10 at 1e-5 and 6/30, 10/10, 10/10, 10/10 at 3e-5: 15 of the 18
pairs against over-refusals pushed " Yes" over " No", against 4 pushing " No".

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
