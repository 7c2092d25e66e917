r"""Mine: on-policy SRPO pairs from the policy's own judged samples.

  python -m saro_jax.main --config configs/mine.py:tiny --config.model.init_from=runs/rw-tiny
  python -m saro_jax.main --config configs/mine.py:smollm2_135m --config.mine.n=4

Samples ``mine.n`` completions per training prompt with saro_jax.sample (batched, through
evaluate/evaluation.generate_rows), plus ``mine.decision_probes`` / ``mine.answer_probes`` samples
continued from forced prefixes (the prompt's chosen text through its decision question + the wrong
word / through its reasoning block; mining.probe_prefixes), judges each with ``mine.judge`` (the eval section's judges:
refusal phrases by default, a classifier model or an HTTP endpoint), and turns the bad ones into
preference pairs by the rules of saro_jax/data/mining.py. Writes <workdir> (or ``mine.output``):
  samples.jsonl  progress: one row per prompt (its samples, verdicts and outcomes); a rerun skips
                 the prompts it holds for the same policy and sampling settings (resume)
  pairs.jsonl    the mined pairs (sources.py kind preference, ids "mined:...") + ``mine.mix_with``
  chosen.jsonl   (mine.teacher http / sampler) the teacher's validated chosen text per prompt that
                 needed one (no trace, a bad sample); a rerun asks only for the missing ones
  stats.json     prompts, samples and outcomes per label, pairs written (by kind and outcome),
                 the teacher's texts asked / accepted
The SaRO pipeline (stages/pipeline.py) runs this with the RW model (round 1) or the previous
SRPO round's model and gives pairs.jsonl to SRPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from saro_jax import config as config_lib
from saro_jax import sharding
from saro_jax.data import build_pairs, jsonl, mining, sources
from saro_jax.evaluate import evaluation
from saro_jax.evaluate import prompts as prompts_lib

logger = logging.getLogger(__name__)


def read_records(m: config_lib.MineConfig) -> list[dict[str, Any]]:
  """The labelled training prompts: ``mine.prompts``, or the labelled records of ``mine.traces``;
  per spec the first ``limit`` of each label (``limit_benign`` for benign/borderline)."""
  specs = m.prompts if m.prompts.strip() else ",".join(f"jsonl:{s}" for s in _specs(m.traces))
  benign_limit = m.limit if m.limit_benign < 0 else m.limit_benign
  records = []
  for spec in _specs(specs):
    seen: dict[str, int] = {}
    for p in prompts_lib.read_prompts(spec):  # every row is parsed (and checked) with a limit too
      cap = benign_limit if p.label in mining.BENIGN_LABELS else m.limit
      seen[p.label] = seen.get(p.label, 0) + 1
      if not cap or seen[p.label] <= cap:
        records.append({"id": p.id, "prompt": p.prompt, "label": p.label, "category": p.category})
  ids = [r["id"] for r in records]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise config_lib.ConfigError(f"config.mine.prompts: prompt id {dup!r} appears in more than one"
                                 " set; ids must be unique across the specs")
  return records


def _specs(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def fingerprint(policy: str, m: config_lib.MineConfig) -> str:
  """What makes a prompt's samples reusable: the policy and every sampling / judging setting."""
  blob = json.dumps([policy, m.n, dataclasses.asdict(m.generation), dataclasses.asdict(m.judge),
                     list(m.reasoning_tags)], sort_keys=True, default=str)
  if m.decision_probes or m.answer_probes:  # (kept out when off: older progress files stay valid)
    blob += json.dumps([m.decision, m.decision_probes, m.answer_probes])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]



def _sample_rows(model, tokenizer, chunk: Sequence[Mapping[str, Any]], m: config_lib.MineConfig,
                 judges, seed: int, mesh, forced: Mapping[str, Mapping[str, str]]
                 ) -> list[list[dict[str, Any]]]:
  """n judged samples per prompt of ``chunk`` (one batched generate call for all of them), then
  its probes: ``forced`` {prompt id: {probe kind: forced prefix}}."""
  ev = m.eval_view()
  ev = dataclasses.replace(ev, generation=dataclasses.replace(ev.generation, seed=seed))
  asks = [prompts_lib.EvalPrompt(f"{r['id']}#{i}", r["prompt"], r["label"], r.get("category"), "mine")
          for r in chunk for i in range(m.n)]
  rows = evaluation.generate_rows(model, tokenizer, asks, ev, mesh=mesh)
  judged = evaluation.judge_rows(rows, *judges)
  out: list[list[dict[str, Any]]] = [[] for _ in chunk]
  for j, (row, verdict) in enumerate(zip(rows, judged, strict=True)):
    out[j // m.n].append(_sample(row, verdict))
  # Probes: the policy continues forced prefixes (mining.probe_prefixes), a seed of their own.
  probes = [(j, kind, prefix) for j, r in enumerate(chunk)
            for kind, prefix in forced.get(r["id"], {}).items()
            for _ in range(m.decision_probes if kind == "decision" else m.answer_probes)]
  if probes:
    ev = dataclasses.replace(ev, generation=dataclasses.replace(ev.generation, seed=seed + 100_003))
    asks = [prompts_lib.EvalPrompt(f"{chunk[j]['id']}#{kind}{i}", chunk[j]["prompt"], chunk[j]["label"],
                                   chunk[j].get("category"), "mine") for i, (j, kind, _) in enumerate(probes)]
    rows = evaluation.generate_rows(model, tokenizer, asks, ev, mesh=mesh,
                                    prefills=[prefix for _, _, prefix in probes])
    judged = evaluation.judge_rows(rows, *judges)
    for (j, kind, _), row, verdict in zip(probes, rows, judged, strict=True):
      out[j].append(_sample(row, verdict) | {"probe": kind})
  return out


def _sample(row: Mapping[str, Any], verdict: Mapping[str, Any]) -> dict[str, Any]:
  return {"text": row["text"], "answer": row["answer"], "finish_reason": row["finish_reason"],
          "unsafe": verdict["unsafe"], "refused": verdict["refused"],
          "safety_raw": verdict["safety_raw"], "refusal_raw": verdict["refusal_raw"],
          "reasoning_tokens": row["reasoning_tokens"], "answer_tokens": row["answer_tokens"]}


def mine(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, policy: str | None = None,
         mesh=None) -> dict[str, Any]:
  """Runs the mining into ``mine.output`` or ``workdir``; returns the stats. ``policy``: an
  init_from that replaces ``config.model.init_from`` (the pipeline's RW / SRPO checkpoint)."""
  m = config_lib.mine_config(config.get("mine"))
  spec = config_lib.section(config_lib.ModelSpec, config.get("model"), "model")
  if policy is not None:
    spec = dataclasses.replace(spec, init_from=policy, tokenizer=spec.tokenizer if policy == "random" else "")
  spec.validate()
  opts = mining.Options(max_prefix_steps=m.max_prefix_steps, format_pairs=m.format_pairs,
                        use_truncated=m.use_truncated, pairs_per_prompt=m.pairs_per_prompt,
                        teacher=m.teacher, fallback=m.fallback, reasoning_tags=tuple(m.reasoning_tags),
                        decision=m.decision, branches=tuple(m.branches))
  # Everything read from files is read (and fails) before a model loads.
  records = read_records(m)
  traces: dict[str, str] = {}
  if m.traces.strip():
    rw, _ = sources.load_records(_specs(m.traces), kind="rw", reasoning_tags=opts.reasoning_tags)
    traces = mining.traces_by_prompt(rw)
  mixed: list[dict[str, Any]] = []
  if m.mix_with.strip():
    mixed, _ = sources.load_records(_specs(m.mix_with), kind="preference",
                                    reasoning_tags=opts.reasoning_tags)
  forced = probes_of(records, traces, m, opts)
  out = pathlib.Path(m.output or workdir)
  out.mkdir(parents=True, exist_ok=True)
  fp = fingerprint(spec.init_from, m)
  progress, chosen_progress = out / "samples.jsonl", out / "chosen.jsonl"
  done = _done(progress, records, fp)
  todo = [r for r in records if r["id"] not in done]
  logger.info("mine: %d prompts x %d samples, %d already done in %s", len(records), m.n,
              len(records) - len(todo), progress)
  mesh = mesh if mesh is not None else evaluation.make_mesh(config)
  loaded: dict[str, Any] = {}

  def policy_model():  # loaded once, and only if something is left to sample
    if not loaded:
      loaded["judges"] = evaluation.make_judges(m.eval_view(), mesh=mesh)
      loaded["model"], loaded["tokenizer"] = evaluation.load_model(spec, seed=config.get("seed", 0), mesh=mesh)
    return loaded["model"], loaded["tokenizer"], loaded["judges"]

  with sharding.use(mesh):
    for c, chunk in enumerate(_chunks(todo, m.chunk_size)):
      model, tokenizer, judges = policy_model()
      # A seed per chunk: sampling noise depends on (seed, index in the call), so chunks differ.
      samples = _sample_rows(model, tokenizer, chunk, m, judges, m.generation.seed + c, mesh, forced)
      rows = [{"id": r["id"], "key": mining.record_key(r, fp), "policy": spec.init_from,
               "label": r["label"], "samples": s} for r, s in zip(chunk, samples, strict=True)]
      _append(progress, rows)
      done.update((row["id"], row) for row in rows)
    # A model teacher writes the chosen side of the prompts that need one and have no trace.
    teacher_fp = _teacher_fingerprint(m, spec.init_from)
    chosen = _done(chosen_progress, records, teacher_fp) if m.teacher in ("http", "sampler") else {}
    need = [r for r in records if m.teacher in ("http", "sampler") and r["id"] not in chosen
            and mining.prompt_key(r["prompt"]) not in traces
            and mining.needs_pair(r, done[r["id"]]["samples"], opts)]
    if need:
      teacher = _teacher(m, out, policy_model, mesh)
      refusal_judge = policy_model()[2][1] if m.teacher == "sampler" else evaluation.make_judges(
          m.eval_view(), mesh=mesh)[1]
      for c, chunk in enumerate(_chunks(need, m.chunk_size)):
        rows = _teacher_rows(teacher, chunk, refusal_judge, m, seed=m.generation.seed + c)
        for row, r in zip(rows, chunk, strict=True):
          row["key"] = mining.record_key(r, teacher_fp)
        _append(chosen_progress, rows)
        chosen.update((row["id"], row) for row in rows)
    loaded.clear()
  teacher_texts = {i: row.get("text") for i, row in chosen.items()}
  stats = write_outputs(records, done, traces, mixed, opts, out, policy=spec.init_from,
                        teacher_texts=teacher_texts)
  logger.info("mine: %s", json.dumps(stats))
  return stats


def probes_of(records: Sequence[Mapping[str, Any]], traces: Mapping[str, str],
              m: config_lib.MineConfig, opts: mining.Options) -> dict[str, dict[str, str]]:
  """{prompt id: {probe kind: forced prefix}} for the probes the config asks for, from each
  prompt's chosen text (its trace, or the template's for a harmful prompt without one)."""
  counts = {"decision": m.decision_probes, "answer": m.answer_probes}
  if not any(counts.values()):
    return {}
  out = {}
  for r in records:
    chosen = mining.chosen_text(r, traces, opts)
    prefixes = mining.probe_prefixes(chosen, r["label"], opts) if chosen else {}
    out[r["id"]] = {k: v for k, v in prefixes.items() if counts[k]}
  return out


def _chunks(items: Sequence[Any], size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _done(path: pathlib.Path, records: Sequence[Mapping[str, Any]], fp: str) -> dict[str, dict[str, Any]]:
  """The progress rows of ``path`` still valid for these records and this fingerprint."""
  done = jsonl.read_progress(path)
  return {r["id"]: done[r["id"]] for r in records
          if r["id"] in done and done[r["id"]].get("key") == mining.record_key(r, fp)}


def _append(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> None:
  """Appends progress rows (process 0), flushed and synced: a crash loses at most this chunk."""
  if jax.process_index() != 0:
    return
  _end_last_line(path)
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _teacher_fingerprint(m: config_lib.MineConfig, policy: str) -> str:
  settings = dataclasses.asdict(m.http) if m.teacher == "http" else [policy, dataclasses.asdict(m.sampler)]
  blob = json.dumps([m.teacher, settings, list(m.reasoning_tags)], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _teacher(m: config_lib.MineConfig, out: pathlib.Path, policy_model, mesh):
  """The model teacher of data/synthesis.py: an HTTP endpoint, or the policy itself with the
  written safety policy in its context (context distillation)."""
  from saro_jax.data import synthesis
  if m.teacher == "http":
    h = m.http
    return synthesis.HttpTeacher(
        h.base_url, h.model, api_key_env=h.api_key_env,
        cache_path=str(out / "http_cache.jsonl") if h.cache else None, temperature=h.temperature,
        max_tokens=h.max_tokens, timeout_s=h.timeout_s, max_retries=h.max_retries,
        backoff_s=h.backoff_s, min_interval_s=h.min_interval_s, max_workers=h.max_workers)
  model, tokenizer, _ = policy_model()
  s = m.sampler
  return synthesis.SamplerTeacher(model, tokenizer, max_new_tokens=s.max_new_tokens,
                                  temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size,
                                  mesh=mesh, prefill_reasoning=s.prefill_reasoning,
                                  reasoning_tags=tuple(m.reasoning_tags),
                                  decode_layout=s.decode_layout)


def _teacher_rows(teacher, chunk: Sequence[Mapping[str, Any]], refusal_judge, m: config_lib.MineConfig,
                  *, seed: int) -> list[dict[str, Any]]:
  """One safe-role text per prompt, validated as synthesis does (reasoning block, steps, and the
  configured refusal judge: harmful answers must refuse, benign ones must not)."""
  from saro_jax.data import formats, synthesis
  from saro_jax.evaluate import judges as judges_lib

  def refuses(prompt: str, answer: str) -> bool:
    return bool(refusal_judge([judges_lib.JudgeInput(prompt, answer)])[0].refused)

  texts = teacher.complete([teacher.messages("safe", r) for r in chunk], [1] * len(chunk), seed)
  syn_opts = synthesis.Options(reasoning_tags=tuple(m.reasoning_tags))
  rows = []
  for r, t in zip(chunk, texts, strict=True):
    trace, rejected = synthesis.accepted_safe_trace(t, r, refuses, syn_opts)
    text = formats.render_reasoning(trace.reasoning, trace.answer, m.reasoning_tags) if trace else None
    rows.append({"id": r["id"], "teacher": teacher.name, "text": text, "rejected": rejected})
  return rows


def _end_last_line(path: pathlib.Path) -> None:
  """A crash may have cut the last line: end it before appending."""
  if jax.process_index() == 0 and path.exists() and path.stat().st_size:
    with open(path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")


def write_outputs(records: Sequence[Mapping[str, Any]], done: Mapping[str, Mapping[str, Any]],
                  traces: Mapping[str, str], mixed: Sequence[Mapping[str, Any]], opts: mining.Options,
                  out: pathlib.Path, *, policy: str,
                  teacher_texts: Mapping[str, str | None] | None = None) -> dict[str, Any]:
  """pairs.jsonl (mined + mixed) and stats.json from every prompt's judged samples."""
  pairs: list[dict[str, Any]] = []
  per_label: dict[str, dict[str, int]] = {}
  teacher_texts = teacher_texts or {}
  for r in records:
    chosen = mining.chosen_text(r, traces, opts, teacher_texts.get(r["id"]))
    got, counts = mining.pairs_for(r, done[r["id"]]["samples"], chosen, opts)
    pairs += got
    label = per_label.setdefault(r["label"], {"prompts": 0, "samples": 0, "judged_unsafe": 0,
                                              "judged_refused": 0, "prompts_with_pairs": 0, "pairs": 0})
    samples = done[r["id"]]["samples"]
    label["prompts"] += 1
    label["samples"] += len(samples)
    label["probe_samples"] = label.get("probe_samples", 0) + sum("probe" in s for s in samples)
    label["judged_unsafe"] += sum(s["unsafe"] is True for s in samples)
    label["judged_refused"] += sum(s["refused"] is True for s in samples)
    label["prompts_with_pairs"] += bool(got)
    label["pairs"] += len(got)
    for k, v in counts.items():
      label[k] = label.get(k, 0) + v
  mined_ids = {p["id"] for p in pairs}
  clash = next((p["id"] for p in mixed if p["id"] in mined_ids), None)
  if clash is not None:
    raise ValueError(f"mine.mix_with: pair id {clash!r} is also a mined pair's id; rename it")
  if jax.process_index() == 0:
    build_pairs.write_jsonl([*pairs, *mixed], str(out / "pairs.jsonl"))
  stats = {
      "policy": policy, "prompts": len(records), "samples": sum(v["samples"] for v in per_label.values()),
      "by_label": dict(sorted(per_label.items())),
      "pairs": {"mined": len(pairs), "mixed": len(mixed), "total": len(pairs) + len(mixed),
                "mined_by_kind": _count(p["kind"] for p in pairs),
                "mined_by_outcome": _count(p["outcome"] for p in pairs),
                "mined_by_branch": _count(p.get("branch", "whole") for p in pairs)},
      "traces": len(traces),
      "teacher": {"name": opts.teacher, "asked": len(teacher_texts),
                  "accepted": sum(t is not None for t in teacher_texts.values())},
  }
  if jax.process_index() == 0:
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
  return stats


def _count(keys) -> dict[str, int]:
  counts: dict[str, int] = {}
  for k in keys:
    counts[k] = counts.get(k, 0) + 1
  return dict(sorted(counts.items()))


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  m = config_lib.mine_config(config.get("mine"))
  mine(config, workdir)
  out = pathlib.Path(m.output or workdir)
  print(os.fspath(out / "pairs.jsonl"))
  return out
