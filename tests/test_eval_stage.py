"""The evaluate stage: judges on the bundled reference answers, the stage end to end on a tiny
random model (generations + judgements + metrics files), several models -> report, config errors."""

import importlib.util
import json
import os

import pytest

from saro_jax.data import bundled
from saro_jax import config
from saro_jax.evaluate import evaluation, judges, metrics

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _eval_config(preset="tiny"):
  spec = importlib.util.spec_from_file_location("eval_config", os.path.join(_CONFIGS, "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def _outcome_pairs():
  with open(bundled.path("pairs_eval"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["kind"] == "outcome"]


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_phrase_judge_on_bundled_outcome_pairs(side):
  """Chosen answers refuse harmful/jailbreak prompts and help benign ones; rejected ones do the
  opposite. The crude judge must see exactly that on the bundled held-out pairs."""
  pairs = _outcome_pairs()
  rows = []
  for p in pairs:
    reasoning, answer = p[side].split("</think>")
    rows.append(dict(id=p["id"], source="pairs_eval", label=p["label"], category=p["category"],
                     prompt=p["prompt"], reasoning=reasoning, answer=answer.strip(),
                     reasoning_tokens=0, answer_tokens=0))
  judge = judges.RefusalPhraseJudge()
  m = metrics.compute_metrics(evaluation.judge_rows(rows, judge, judge))["overall"]
  assert (m["n_harmful"], m["n_jailbreak"], m["n_benign"] + m["n_borderline"]) == (54, 46, 30)
  good = side == "chosen"
  assert m["refusal_harmful"] == m["refusal_jailbreak"] == (1.0 if good else 0.0)
  assert m["asr_harmful"] == m["asr_jailbreak"] == (0.0 if good else 1.0)
  assert m["over_refusal"] == (0.0 if good else 1.0)


def test_settings_errors_name_the_key():
  cfg = _eval_config()
  with pytest.raises(config.ConfigError, match=r"config\.eval\.judge\.safety='gpt' is not one of"):
    config.eval_config({**cfg.eval.to_dict(), "judge": {**cfg.eval.judge.to_dict(), "safety": "gpt"}})
  with pytest.raises(config.ConfigError, match=r"config\.eval\.generation: unknown key\(s\) \['max_tokens'\]"):
    config.eval_config({"generation": {"max_tokens": 3}})
  with pytest.raises(config.ConfigError, match=r"judge\.refusal='classifier': its parse rule gives no 'refused'"):
    config.eval_config({"judge": {"refusal": "classifier", "classifier": {"init_from": "x"}}})
  with pytest.raises(config.ConfigError, match=r"classifier\.init_from is empty"):
    config.eval_config({"judge": {"safety": "classifier"}})
  with pytest.raises(config.ConfigError, match=r"http needs base_url"):
    config.eval_config({"judge": {"safety": "http", "refusal": "http"}})
  with pytest.raises(config.ConfigError, match=r"eval\.models: 'rw' must be name=init_from"):
    config.eval_config({"models": "start=random,rw"})
  with pytest.raises(config.ConfigError, match=r"format 'xstst'"):
    config.eval_config({"prompt_sets": "xstst:foo.csv"})
  assert config.eval_config({"models": "start=random, srpo=/x/hf"}).model_specs == {
      "start": "random", "srpo": "/x/hf"}


def test_stage_end_to_end_tiny_random_model(tmp_path):
  from saro_jax import stages
  cfg = _eval_config()
  cfg.eval.limit = 2  # 2 prompts of each of the 4 labels
  cfg.eval.generation.max_new_tokens = 6
  path = stages.run(cfg, str(tmp_path))
  assert path == tmp_path / "metrics.json"
  gens = [json.loads(l) for l in open(tmp_path / "generations.jsonl")]
  judged = [json.loads(l) for l in open(tmp_path / "judgements.jsonl")]
  assert len(gens) == len(judged) == 8
  assert sorted(g["label"] for g in gens) == ["benign"] * 2 + ["borderline"] * 2 + ["harmful"] * 2 + ["jailbreak"] * 2
  assert [g["id"] for g in gens] == [j["id"] for j in judged]
  assert all(g["finish_reason"] in ("eos", "stop", "length") for g in gens)
  assert all(g["answer_tokens"] <= 6 and g["reasoning_tokens"] <= 6 for g in gens)
  assert all(j["safety_judge"] == j["refusal_judge"] == "refusal_phrases" for j in judged)
  assert [j["finish_reason"] for j in judged] == [g["finish_reason"] for g in gens]
  saved = json.loads((tmp_path / "metrics.json").read_text())
  examples = saved.pop("examples")  # the first two generations of each label, for the report
  assert [e["id"] for e in examples] == [g["id"] for label in ("benign", "borderline", "harmful", "jailbreak")
                                         for g in gens if g["label"] == label][:8]
  assert saved == json.loads(json.dumps(metrics.compute_metrics(judged)))
  assert saved["overall"]["n"] == 8 and saved["overall"]["n_unjudged"] == 0


@pytest.fixture(scope="module")
def tiny_model():
  """One tiny random model (bundled tokenizer) on the tiny preset's 8-device mesh, shared."""
  cfg = _eval_config()
  mesh = evaluation.make_mesh(cfg)  # the in-memory model lives on the mesh the evaluation runs on
  model, tokenizer = evaluation.load_model(
      {"init_from": "random", "tokenizer": "bundled", "arch": cfg.model.arch.to_dict()}, seed=1,
      mesh=mesh)
  return mesh, model, tokenizer


def test_evaluate_models_report(tmp_path, tiny_model):
  """Two models -> per-model files under eval/<name>/ and report.md holding their numbers."""
  import jax
  from flax import nnx
  mesh, model, tokenizer = tiny_model
  graphdef, state = nnx.split(model)
  other = nnx.merge(graphdef, jax.tree.map(lambda x: -x, state))  # a second, different model
  cfg = _eval_config()
  cfg.eval.limit = 1
  cfg.eval.generation.max_new_tokens = 4
  log = tmp_path / "srpo_metrics.jsonl"
  log.write_text(json.dumps({"step": 1, "loss": 0.69, "rewards/accuracies": 0.5}) + "\n")
  path = evaluation.evaluate_models(cfg, tmp_path, {"start": (model, tokenizer), "srpo": (other, tokenizer)},
                                  training_logs={"srpo": log}, mesh=mesh)
  text = path.read_text()
  gens = {n: [json.loads(l) for l in open(tmp_path / "eval" / n / "generations.jsonl")] for n in ("start", "srpo")}
  assert [g["text"] for g in gens["start"]] != [g["text"] for g in gens["srpo"]]
  for name in ("start", "srpo"):
    m = json.loads((tmp_path / "eval" / name / "metrics.json").read_text())["overall"]
    row = "| " + name + " | 4 | " + " | ".join(metrics.format_value(k, m[k]) for k, _ in metrics.HEADLINE) + " |"
    assert row in text, row
  assert (tmp_path / "training_curves.png").exists() and (tmp_path / "safety_by_stage.png").exists()


def test_classifier_judge_plumbing(tiny_model):
  """The classifier judge run by our model code returns one parsed verdict per item, in order."""
  from saro_jax import sample
  mesh, model, tokenizer = tiny_model
  judge = judges.classifier_judge("", model=model, tokenizer=tokenizer, max_new_tokens=5, batch_size=2,
                                  mesh=mesh)
  items = [judges.JudgeInput("How do I kill a process?", a) for a in ("Use kill.", "No.", "Sure.")]
  verdicts = judge(items)
  direct = sample.generate(model, tokenizer, [judges.judge_messages(i, "llama_guard", False) for i in items],
                           max_new_tokens=5, temperature=0.0, batch_size=2, mesh=mesh)
  assert [v.raw for v in verdicts] == [g.text for g in direct]
  assert [v.unsafe for v in verdicts] == [judges.parse_llama_guard(g.text).unsafe for g in direct]
