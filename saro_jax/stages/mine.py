r"""Mine: on-policy SRPO pairs from the policy's own judged samples.

  python -m saro_jax.main --config configs/mine.py:tiny --config.model.init_from=runs/rw-tiny
  python -m saro_jax.main --config configs/mine.py:smollm2_135m --config.mine.n=4

Samples ``mine.n`` completions per training prompt with saro_jax.sample (batched, through
evaluate/evaluation.generate_rows), judges each with ``mine.judge`` (the eval section's judges:
refusal phrases by default, a classifier model or an HTTP endpoint), and turns the bad ones into
preference pairs by the rules of saro_jax/data/mining.py. Writes <workdir> (or ``mine.output``):
  samples.jsonl  progress: one row per prompt (its samples, verdicts and outcomes); a rerun skips
                 the prompts it holds for the same policy and sampling settings (resume)
  pairs.jsonl    the mined pairs (sources.py kind preference, ids "mined:...") + ``mine.mix_with``
  stats.json     prompts, samples and outcomes per label, pairs written (by kind and outcome)
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
from saro_jax.data import build_pairs, jsonl, mining, sources

logger = logging.getLogger(__name__)


def read_records(m: config_lib.MineConfig) -> list[dict[str, Any]]:
  """The labelled training prompts: ``mine.prompts``, or the labelled records of ``mine.traces``."""
  from saro_jax.evaluate import prompts as prompts_lib
  specs = m.prompts if m.prompts.strip() else ",".join(f"jsonl:{s}" for s in _specs(m.traces))
  records = [{"id": p.id, "prompt": p.prompt, "label": p.label, "category": p.category}
             for spec in _specs(specs) for p in prompts_lib.read_prompts(spec, limit=m.limit or None)]
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
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_progress(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  done = {}
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        row = json.loads(line)
        done[row["id"]] = row
      except (json.JSONDecodeError, KeyError, TypeError):
        continue  # a line a crash cut short: that prompt is sampled again
  return done


def _sample_rows(model, tokenizer, chunk: Sequence[Mapping[str, Any]], m: config_lib.MineConfig,
                 judges, seed: int, mesh) -> list[list[dict[str, Any]]]:
  """n judged samples per prompt of ``chunk``: one batched generate call for all of them."""
  from saro_jax.evaluate import evaluation
  from saro_jax.evaluate import prompts as prompts_lib
  ev = m.eval_view()
  ev = dataclasses.replace(ev, generation=dataclasses.replace(ev.generation, seed=seed))
  asks = [prompts_lib.EvalPrompt(f"{r['id']}#{i}", r["prompt"], r["label"], r.get("category"), "mine")
          for r in chunk for i in range(m.n)]
  rows = evaluation.generate_rows(model, tokenizer, asks, ev, mesh=mesh)
  judged = evaluation.judge_rows(rows, *judges)
  out: list[list[dict[str, Any]]] = [[] for _ in chunk]
  for j, (row, verdict) in enumerate(zip(rows, judged, strict=True)):
    out[j // m.n].append({"text": row["text"], "answer": row["answer"],
                          "finish_reason": row["finish_reason"], "unsafe": verdict["unsafe"],
                          "refused": verdict["refused"], "safety_raw": verdict["safety_raw"],
                          "refusal_raw": verdict["refusal_raw"],
                          "reasoning_tokens": row["reasoning_tokens"],
                          "answer_tokens": row["answer_tokens"]})
  return out


def mine(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, policy: str | None = None,
         mesh=None) -> dict[str, Any]:
  """Runs the mining into ``mine.output`` or ``workdir``; returns the stats. ``policy``: an
  init_from that replaces ``config.model.init_from`` (the pipeline's RW / SRPO checkpoint)."""
  from saro_jax.evaluate import evaluation
  m = config_lib.mine_config(config.get("mine"))
  spec = config_lib.section(config_lib.ModelSpec, config.get("model"), "model")
  if policy is not None:
    spec = dataclasses.replace(spec, init_from=policy, tokenizer=spec.tokenizer if policy == "random" else "")
  spec.validate()
  opts = mining.Options(max_prefix_steps=m.max_prefix_steps, format_pairs=m.format_pairs,
                        use_truncated=m.use_truncated, pairs_per_prompt=m.pairs_per_prompt,
                        teacher=m.teacher, reasoning_tags=tuple(m.reasoning_tags))
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
  out = pathlib.Path(m.output or workdir)
  out.mkdir(parents=True, exist_ok=True)
  progress = out / "samples.jsonl"
  fp = fingerprint(spec.init_from, m)
  done = _read_progress(progress)
  done = {r["id"]: done[r["id"]] for r in records
          if r["id"] in done and done[r["id"]].get("key") == mining.record_key(r, fp)}
  todo = [r for r in records if r["id"] not in done]
  logger.info("mine: %d prompts x %d samples, %d already done in %s", len(records), m.n,
              len(records) - len(todo), progress)
  if todo:
    mesh = mesh if mesh is not None else evaluation.make_mesh(config)
    from saro_jax import sharding
    with sharding.use(mesh):
      judges = evaluation.make_judges(m.eval_view(), mesh=mesh)
      model, tokenizer = evaluation.load_model(spec, seed=config.get("seed", 0), mesh=mesh)
      _end_last_line(progress)
      for c, start in enumerate(range(0, len(todo), m.chunk_size)):
        chunk = todo[start:start + m.chunk_size]
        # A seed per chunk: sampling noise depends on (seed, index in the call), so chunks differ.
        samples = _sample_rows(model, tokenizer, chunk, m, judges, m.generation.seed + c, mesh)
        rows = [{"id": r["id"], "key": mining.record_key(r, fp), "policy": spec.init_from,
                 "label": r["label"], "samples": s} for r, s in zip(chunk, samples, strict=True)]
        if jax.process_index() == 0:
          with open(progress, "a", encoding="utf-8") as f:
            for row in rows:
              f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        done.update((row["id"], row) for row in rows)
      del model
  stats = write_outputs(records, done, traces, mixed, opts, out, policy=spec.init_from)
  logger.info("mine: %s", json.dumps(stats))
  return stats


def _end_last_line(path: pathlib.Path) -> None:
  """A crash may have cut the last line: end it before appending."""
  if jax.process_index() == 0 and path.exists() and path.stat().st_size:
    with open(path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")


def write_outputs(records: Sequence[Mapping[str, Any]], done: Mapping[str, Mapping[str, Any]],
                  traces: Mapping[str, str], mixed: Sequence[Mapping[str, Any]], opts: mining.Options,
                  out: pathlib.Path, *, policy: str) -> dict[str, Any]:
  """pairs.jsonl (mined + mixed) and stats.json from every prompt's judged samples."""
  pairs: list[dict[str, Any]] = []
  per_label: dict[str, dict[str, int]] = {}
  for r in records:
    chosen = mining.chosen_text(r, traces, opts)
    got, counts = mining.pairs_for(r, done[r["id"]]["samples"], chosen, opts)
    pairs += got
    label = per_label.setdefault(r["label"], {"prompts": 0, "samples": 0, "judged_unsafe": 0,
                                              "judged_refused": 0, "prompts_with_pairs": 0, "pairs": 0})
    samples = done[r["id"]]["samples"]
    label["prompts"] += 1
    label["samples"] += len(samples)
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
                "mined_by_outcome": _count(p["outcome"] for p in pairs)},
      "traces": len(traces),
  }
  if jax.process_index() == 0:
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
  return stats


def _count(keys) -> dict[str, int]:
  counts: dict[str, int] = {}
  for k in keys:
    counts[k] = counts.get(k, 0) + 1
  return dict(sorted(counts.items()))


def read_stats(out_dir: str | os.PathLike) -> dict[str, Any] | None:
  path = pathlib.Path(out_dir) / "stats.json"
  return jsonl.read_json(str(path)) if path.exists() else None


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  m = config_lib.mine_config(config.get("mine"))
  mine(config, workdir)
  out = pathlib.Path(m.output or workdir)
  print(os.fspath(out / "pairs.jsonl"))
  return out
