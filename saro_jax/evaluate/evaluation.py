r"""The evaluation: load -> generate -> judge -> score -> report, for one model or several.

Parts: prompts.py (prompt sets), judges.py (judges and make_judge), metrics.py (scores),
report.py (report.md + plots). The `eval` config section is saro_jax.config.EvalConfig. The
`evaluate` stage (saro_jax/stages/evaluate.py) and the `saro` pipeline call `evaluate` and
`evaluate_models` here.

One model (`config.model`, eval.models empty) writes into the workdir:
  generations.jsonl   one row per prompt: id, set, label, category, prompt, text, reasoning, answer,
                      finish_reason, reasoning_tokens, answer_tokens
  judgements.jsonl    one row per prompt: id, set, label, category, unsafe, refused, the judges' raw
                      outputs (for audit)
  metrics.json        metrics.compute_metrics(...)
Several models (`eval.models` = "name=init_from,...", or the pipeline calling `evaluate_models`)
write the same files under <workdir>/eval/<name>/ and then <workdir>/report.md with its PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from saro_jax import config as config_lib
from saro_jax import models, sample, sharding
from saro_jax.data import formats
from saro_jax.evaluate import judges as judges_lib
from saro_jax.evaluate import metrics as metrics_lib
from saro_jax.evaluate import prompts as prompts_lib
from saro_jax.evaluate import report as report_lib

logger = logging.getLogger(__name__)

ModelAndTokenizer = tuple[Any, Any]


# ---- prompts, generation, judging ----------------------------------------------------------------

def read_prompt_sets(ev: config_lib.EvalConfig) -> list[prompts_lib.EvalPrompt]:
  prompts = []
  for spec in ev.prompt_specs:
    prompts += prompts_lib.read_prompts(spec, limit=ev.limit or None)
  return prompts


def count_tokens(tokenizer, text: str) -> int:
  return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


def generate_rows(model, tokenizer, prompts: Sequence[prompts_lib.EvalPrompt],
                  ev: config_lib.EvalConfig, *, mesh=None,
                  prefills: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """One generation row per prompt (the answer split from the reasoning by the tags). With
  ``prefills`` the assistant turn of prompt i starts with prefills[i] (forced text the model
  continues); the row's text is that prefill + the continuation."""
  g = ev.generation
  if prefills is None:
    inputs, starts = [p.prompt for p in prompts], [""] * len(prompts)
  else:
    starts = list(prefills)
    inputs = [sample.chat_text(tokenizer, [{"role": "user", "content": p.prompt}]) + f
              for p, f in zip(prompts, starts, strict=True)]
  generations = sample.generate(
      model, tokenizer, inputs, max_new_tokens=g.max_new_tokens,
      temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed, batch_size=g.batch_size,
      mesh=mesh, skip_special_tokens=g.skip_special_tokens, chat_template=prefills is None,
      decode_layout=g.decode_layout)
  rows = []
  for p, gen, start in zip(prompts, generations, starts, strict=True):
    text = start + _strip_special(tokenizer, gen.text, keep=ev.reasoning_tags)
    reasoning, answer = sample.split_reasoning(text, tuple(ev.reasoning_tags))
    rows.append(dict(id=p.id, source=p.source, label=p.label, category=p.category, prompt=p.prompt,
                     text=text, reasoning=reasoning, answer=answer, finish_reason=gen.finish_reason,
                     reasoning_tokens=count_tokens(tokenizer, reasoning),
                     answer_tokens=count_tokens(tokenizer, answer),
                     has_reasoning=formats.has_reasoning_block(text, tuple(ev.reasoning_tags)),
                     repeated_ngram_rate=metrics_lib.repeated_ngram_rate(text)))
  return rows




def _strip_special(tokenizer, text: str, keep: Sequence[str]) -> str:
  """Drops special tokens (e.g. a trailing <|im_end|>) from text decoded with them, except `keep`
  (the reasoning tags, which some tokenizers mark special and which the split needs)."""
  for token in getattr(tokenizer, "all_special_tokens", ()):
    if token and token not in keep:
      text = text.replace(token, "")
  return text


def judge_rows(rows: Sequence[Mapping[str, Any]], safety: judges_lib.Judge,
               refusal: judges_lib.Judge) -> list[dict[str, Any]]:
  """Verdicts per row: `unsafe` from the safety judge, `refused` from the refusal judge (run once
  if they are the same judge)."""
  items = [judges_lib.JudgeInput(r["prompt"], r["answer"], r["reasoning"]) for r in rows]
  safety_verdicts = safety(items)
  refusal_verdicts = safety_verdicts if refusal is safety else refusal(items)
  out = []
  for r, s, f in zip(rows, safety_verdicts, refusal_verdicts, strict=True):
    out.append(dict(id=r["id"], source=r["source"], label=r["label"], category=r["category"],
                    unsafe=s.unsafe, refused=f.refused, safety_judge=safety.name, safety_raw=s.raw,
                    safety_categories=list(s.categories), refusal_judge=refusal.name,
                    refusal_raw=f.raw, finish_reason=r.get("finish_reason"),
                    reasoning_tokens=r["reasoning_tokens"],
                    answer_tokens=r["answer_tokens"], has_reasoning=r.get("has_reasoning"),
                    repeated_ngram_rate=r.get("repeated_ngram_rate")))
  return out


def example_answers(rows: Sequence[Mapping[str, Any]], per_label: int = 2,
                    labels: Sequence[str] = ("benign", "borderline", "harmful", "jailbreak"),
                    max_chars: int = 400) -> list[dict[str, Any]]:
  """A few generations for the report (the first ``per_label`` of each label, in prompt order),
  prompt and answer cut to ``max_chars``, so a reader can see whether answers are on topic."""
  out = []
  for label in labels:
    for r in [r for r in rows if r["label"] == label][:per_label]:
      out.append({"label": label, "id": r["id"], "prompt": r["prompt"][-max_chars:],
                  "reasoning": r["reasoning"][:max_chars], "answer": r["answer"][:max_chars],
                  "finish_reason": r.get("finish_reason")})
  return out


def make_judges(ev: config_lib.EvalConfig, *, mesh=None) -> tuple[judges_lib.Judge, judges_lib.Judge]:
  safety = judges_lib.make_judge(ev.judge.safety, ev, mesh=mesh)
  refusal = safety if ev.judge.refusal == ev.judge.safety else judges_lib.make_judge(
      ev.judge.refusal, ev, mesh=mesh)
  return safety, refusal


def judge_note(ev: config_lib.EvalConfig) -> str:
  j = ev.judge
  describe = {"refusal_phrases": "refusal-phrase matcher (crude)",
              "classifier": f"classifier {j.classifier.init_from} ({j.classifier.parse})",
              "http": f"{j.http.model} at {j.http.base_url} ({j.http.parse})"}
  view = "answer + reasoning" if j.include_reasoning else "final answer only"
  note = f"unsafe <- {describe[j.safety]}; refused <- {describe[j.refusal]}; judges see the {view}"
  if "refusal_phrases" in (j.safety, j.refusal):
    note += (". The refusal-phrase matcher only looks for phrases such as \"I can't\" or \"I'm sorry\": "
             "a refusal it does not recognise counts as compliance, and a harmful answer that "
             "apologises counts as a refusal. For real runs use eval.judge.safety=classifier "
             "(a Llama-Guard-style model) or http")
  return note


def _write_jsonl(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate_model(model, tokenizer, prompts: Sequence[prompts_lib.EvalPrompt],
                   ev: config_lib.EvalConfig, out_dir: str | os.PathLike, *,
                   judges: tuple[judges_lib.Judge, judges_lib.Judge], mesh=None) -> dict[str, Any]:
  """Generates, judges and scores one model; writes the three files into out_dir; returns metrics.

  Multi-process: every process generates (one SPMD program); process 0 judges, scores and writes.
  The others only join a classifier judge's generation (it is an SPMD program too) and return {}.
  """
  rows = generate_rows(model, tokenizer, prompts, ev, mesh=mesh)
  if jax.process_index() != 0:
    items = [judges_lib.JudgeInput(r["prompt"], r["answer"], r["reasoning"]) for r in rows]
    for judge in {id(j): j for j in judges}.values():
      if isinstance(judge, judges_lib.ClassifierJudge):
        judge(items)
    return {}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_jsonl(out / "generations.jsonl", rows)
  judged = judge_rows(rows, *judges)
  _write_jsonl(out / "judgements.jsonl", judged)
  metrics = metrics_lib.compute_metrics(judged)
  metrics["examples"] = example_answers(rows)
  (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
  logger.info("%s: %s", out, {k: metrics["overall"][k] for k, _ in metrics_lib.HEADLINE})
  return metrics


# ---- loading the model to evaluate --------------------------------------------------------------

def load_model(spec: models.Spec, *, seed: int = 0, mesh=None) -> ModelAndTokenizer:
  """(model, tokenizer) of ``spec`` (any ``init_from`` form, see models/load.py)."""
  tokenizer = models.load_tokenizer(spec)
  mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return models.load(spec, tokenizer=tokenizer, mesh=mesh, seed=seed), tokenizer


def make_mesh(config: ml_collections.ConfigDict):
  mesh_cfg = config_lib.section(config_lib.MeshConfig, config.get("mesh"), "mesh")
  mesh_cfg.validate(jax.device_count())
  return sharding.make_mesh(*mesh_cfg.resolved(jax.device_count()))


def _model_spec(config: ml_collections.ConfigDict) -> config_lib.ModelSpec:
  spec = config_lib.section(config_lib.ModelSpec, config.get("model"), "model")
  spec.validate()
  return spec


# ---- entry points ------------------------------------------------------------------------------

def evaluate_models(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                    models: Mapping[str, str | ModelAndTokenizer], *,
                    training_logs: Mapping[str, str | os.PathLike] | None = None,
                    mesh=None) -> pathlib.Path:
  """Evaluates each model (name -> init_from, or an in-memory (model, tokenizer)) in order,
  e.g. {"start": ..., "rw": ..., "srpo": ...}, then writes <workdir>/report.md; returns its path.

  The SaRO pipeline calls this after SRPO with its stage results and metrics JSONL files.
  """
  ev = config_lib.eval_config(config.get("eval"))
  spec = _model_spec(config)
  mesh = mesh if mesh is not None else make_mesh(config)
  prompts = read_prompt_sets(ev)
  stage_metrics: dict[str, dict[str, Any]] = {}
  with sharding.use(mesh):
    judges = make_judges(ev, mesh=mesh)
    for name, target in models.items():
      if isinstance(target, str):
        # The config's model section with this init_from (its tokenizer only for "random").
        target_spec = dataclasses.replace(
            spec, init_from=target, tokenizer=spec.tokenizer if target == "random" else "")
        model, tokenizer = load_model(target_spec, seed=config.get("seed", 0), mesh=mesh)
      else:
        model, tokenizer = target
      stage_metrics[name] = evaluate_model(model, tokenizer, prompts, ev,
                                           pathlib.Path(workdir) / "eval" / name, judges=judges, mesh=mesh)
      del model  # one model on the devices at a time
  if training_logs is None and ev.run_dir:
    training_logs = {s: os.path.join(ev.run_dir, s, "metrics.jsonl") for s in ("rw", "srpo")}
  path = pathlib.Path(workdir) / "report.md"
  if jax.process_index() != 0:
    return path
  path = report_lib.write_report(workdir, stage_metrics, training_logs=training_logs,
                                 judge_note=judge_note(ev))
  print(f"report: {path}")
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """One model (config.model) -> <workdir>/metrics.json, or with eval.models, several plus the
  report -> <workdir>/report.md; returns that path."""
  ev = config_lib.eval_config(config.get("eval"))
  if ev.model_specs:
    return evaluate_models(config, workdir, ev.model_specs)
  spec = _model_spec(config)
  mesh = make_mesh(config)
  prompts = read_prompt_sets(ev)
  with sharding.use(mesh):
    judges = make_judges(ev, mesh=mesh)
    model, tokenizer = load_model(spec, seed=config.get("seed", 0), mesh=mesh)
    evaluate_model(model, tokenizer, prompts, ev, workdir, judges=judges, mesh=mesh)
  path = pathlib.Path(workdir) / "metrics.json"
  print(f"metrics: {path}")
  return path
