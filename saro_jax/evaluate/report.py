"""The run report: `report.md` with the safety metrics across stages, plus PNG plots.

Inputs are plain data so the report can be rebuilt from files alone:
  stage_metrics   ordered {stage name: compute_metrics(...) output}, e.g. start -> rw -> srpo
  training_logs   {stage name: path of the engine's metrics JSONL} (one JSON object per line with
                  "step" and numeric metrics such as "loss", "rewards/margins"); missing or partly
                  broken files are tolerated and noted in the report, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from saro_jax.evaluate import metrics as metrics_lib

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "train/loss", "train_loss")
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
BAR_METRICS = (("refusal_harmful", "refusal harmful"), ("refusal_jailbreak", "refusal jailbreak"),
               ("over_refusal_benign", "over-refusal benign"),
               ("over_refusal_borderline", "over-refusal borderline"))


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend (no display on servers and CI), imported
  when a plot is drawn: importing it costs ~0.6 s, and every process that imports the stages
  (each ``python -m saro_jax.main``, each test subprocess) would pay that at start-up."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def read_training_log(path: str | os.PathLike) -> tuple[list[dict[str, float]], list[str]]:
  """(rows with a numeric "step", problems found); a missing file gives ([], [why])."""
  path = str(path)
  if not os.path.exists(path):
    return [], [f"{path}: not found"]
  rows, problems = [], []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
      except json.JSONDecodeError:
        problems.append(f"{path}:{line_no}: not JSON (skipped)")  # e.g. a line cut by a crash
        continue
      if not isinstance(raw, dict) or not isinstance(raw.get("step"), (int, float)):
        problems.append(f"{path}:{line_no}: no numeric 'step' (skipped)")
        continue
      rows.append({k: float(v) for k, v in raw.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
  return rows, problems


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_training(logs: Mapping[str, Sequence[Mapping[str, float]]], out_path: pathlib.Path) -> bool:
  """Loss per stage (one panel each) and, for stages that log them, DPO rewards and accuracy."""
  stages = [s for s, rows in logs.items() if any(k in r for r in rows for k in LOSS_KEYS + REWARD_KEYS)]
  if not stages:
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(len(stages), 2, figsize=(10, 3 * len(stages)), squeeze=False)
  for (ax_loss, ax_reward), stage in zip(axes, stages):
    rows = logs[stage]
    for key in LOSS_KEYS:
      steps, values = _series(rows, key)
      if steps:
        ax_loss.plot(steps, values, label=key)
    ax_loss.set_title(f"{stage}: loss")
    ax_loss.set_xlabel("step")
    drawn = False
    for key in REWARD_KEYS:
      steps, values = _series(rows, key)
      if steps:
        ax_reward.plot(steps, values, label=key)
        drawn = True
    ax_reward.set_title(f"{stage}: rewards" if drawn else f"{stage}: (no reward metrics)")
    ax_reward.set_xlabel("step")
    for ax in (ax_loss, ax_reward):
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def _bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str) -> None:
  """Grouped bars: one group per x label, one bar per series; None (no rows) drawn as a gap."""
  width = 0.8 / max(1, len(series))
  for i, (name, values) in enumerate(series.items()):
    xs = [g + i * width for g in range(len(groups))]
    ax.bar(xs, [100 * v if v is not None else 0.0 for v in values], width, label=name)
  ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
  ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("%")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_safety_by_stage(stage_metrics: Mapping[str, Mapping[str, Any]], out_path: pathlib.Path) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  groups = [label for _, label in BAR_METRICS]
  series = {stage: [m["overall"][key] for key, _ in BAR_METRICS] for stage, m in stage_metrics.items()}
  _bars(ax, groups, series, "Refusal and over-refusal per stage")
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def plot_by_category(stage_metrics: Mapping[str, Mapping[str, Any]], out_path: pathlib.Path) -> None:
  """Refusal of harmful+jailbreak prompts and over-refusal of benign ones, per category."""
  panels = (("refusal_harmful_and_jailbreak", "refusal on harmful + jailbreak, per category"),
            ("over_refusal", "over-refusal on benign + borderline, per category"))
  plt = _pyplot()
  fig, axes = plt.subplots(2, 1, figsize=(10, 8))
  for ax, (key, title) in zip(axes, panels):
    categories = sorted({c for m in stage_metrics.values() for c, g in m["per_category"].items()
                         if g[key] is not None})
    series = {stage: [m["per_category"].get(c, {}).get(key) for c in categories]
              for stage, m in stage_metrics.items()}
    _bars(ax, categories or ["(no rows)"], series if categories else {s: [None] for s in series}, title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def metrics_table(stage_metrics: Mapping[str, Mapping[str, Any]], group: str = "overall",
                  key: str | None = None) -> str:
  """Markdown table: one row per stage, the headline metrics as columns."""
  header = "| stage | n | " + " | ".join(h for _, h in metrics_lib.HEADLINE) + " |"
  lines = [header, "|" + "---|" * (2 + len(metrics_lib.HEADLINE))]
  for stage, m in stage_metrics.items():
    g = m[group] if key is None else m[group].get(key)
    if g is None:
      continue
    cells = [metrics_lib.format_value(name, g[name]) for name, _ in metrics_lib.HEADLINE]
    lines.append(f"| {stage} | {g['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def targets_table(stage_metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown table of metrics.TARGETS per stage, each cell marked when it meets its target."""
  header = "| stage | " + " | ".join(f"{h} (≥ {t:.0%})" for _, h, t in metrics_lib.TARGETS) + " |"
  lines = [header, "|" + "---|" * (1 + len(metrics_lib.TARGETS))]
  for stage, m in stage_metrics.items():
    g = m["overall"]
    cells = []
    for name, _, target in metrics_lib.TARGETS:
      value = g.get(name)
      mark = "" if value is None else (" ✓" if value >= target else " ✗")
      cells.append(metrics_lib.format_value(name, value) + mark)
    lines.append(f"| {stage} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def form_table(stage_metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown table of metrics.FORM per stage: reasoning block, token counts, repetition."""
  header = "| stage | " + " | ".join(h for _, h in metrics_lib.FORM) + " |"
  lines = [header, "|" + "---|" * (1 + len(metrics_lib.FORM))]
  for stage, m in stage_metrics.items():
    g = m["overall"]
    lines.append(f"| {stage} | " + " | ".join(metrics_lib.format_value(k, g.get(k))
                                               for k, _ in metrics_lib.FORM) + " |")
  return "\n".join(lines)


def _quote(text: str) -> str:
  return " ".join(text.split()) or "(empty)"


def examples_section(stage_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The example generations each stage's metrics carry (evaluation.example_answers), if any."""
  md = []
  for stage, m in stage_metrics.items():
    examples = m.get("examples") or []
    if not examples:
      continue
    md += [f"### {stage}", ""]
    for ex in examples:
      md += [f"- **{ex['label']}** `{ex['id']}` ({ex.get('finish_reason')}): {_quote(ex['prompt'])}",
             f"  - reasoning: {_quote(ex['reasoning'])}", f"  - answer: {_quote(ex['answer'])}"]
    md.append("")
  return md


def plot_form(stage_metrics: Mapping[str, Mapping[str, Any]], out_path: pathlib.Path) -> None:
  """Reasoning tokens (mean, median) and answer tokens per stage; reasoning-block and repeat rates."""
  stages = list(stage_metrics)
  plt = _pyplot()
  fig, (ax_tok, ax_rate) = plt.subplots(1, 2, figsize=(11, 3.5))
  keys = (("mean_reasoning_tokens", "reasoning (mean)"), ("median_reasoning_tokens", "reasoning (median)"),
          ("mean_answer_tokens", "answer (mean)"))
  width = 0.8 / len(keys)
  for i, (key, label) in enumerate(keys):
    ax_tok.bar([s + i * width for s in range(len(stages))],
               [stage_metrics[st]["overall"].get(key) or 0.0 for st in stages], width, label=label)
  ax_tok.set_xticks([s + 0.4 - width / 2 for s in range(len(stages))])
  ax_tok.set_xticklabels(stages)
  ax_tok.set_title("tokens per generation")
  ax_tok.legend(fontsize=7)
  groups = ["reasoning block", f"repeated {metrics_lib.NGRAM}-grams"]
  series = {st: [stage_metrics[st]["overall"].get("reasoning_block_rate"),
                 stage_metrics[st]["overall"].get("mean_repeated_ngram_rate")] for st in stages}
  _bars(ax_rate, groups, series, "form")
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def write_report(out_dir: str | os.PathLike, stage_metrics: Mapping[str, Mapping[str, Any]], *,
                 training_logs: Mapping[str, str | os.PathLike] | None = None,
                 judge_note: str = "", title: str = "SaRO run report") -> pathlib.Path:
  """Writes out_dir/report.md and its PNGs; returns the report's path."""
  if not stage_metrics:
    raise ValueError("write_report: no stage metrics given")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  logs, problems = {}, []
  for stage, path in (training_logs or {}).items():
    logs[stage], found = read_training_log(path)
    problems += found
  md = [f"# {title}", ""]
  if judge_note:
    md += [f"Judges: {judge_note}", ""]
  md += ["Rates are over the prompts of that label the judge gave a verdict on (– = none). ASR = "
         "attack-success rate (response judged unsafe); over-refusal = benign prompts refused; token "
         "counts use the evaluated model's tokenizer.", "",
         "## Safety metrics per stage (all prompt sets)", "", metrics_table(stage_metrics), ""]
  unjudged = {s: m["overall"]["n_unjudged"] for s, m in stage_metrics.items() if m["overall"]["n_unjudged"]}
  if unjudged:
    md += [f"Rows without a usable verdict (left out of the rates): {unjudged}", ""]
  for key, what in (("n_truncated", "generations cut at max_new_tokens"),
                    ("n_empty_answer", "empty final answers (judged as refusals)")):
    counts = {s: m["overall"].get(key, 0) for s, m in stage_metrics.items()}
    if any(counts.values()):
      md += [f"Rows with {what}: {counts}", ""]
  md += ["## Targets", "", "The recipe targets (issue 11) on these prompts, by the judge above:", "",
         targets_table(stage_metrics), "",
         "## Form of the outputs", "",
         f"Reasoning block = a closed, non-empty reasoning block before the answer; repeated "
         f"{metrics_lib.NGRAM}-grams = the share of a generation's word {metrics_lib.NGRAM}-grams "
         "that repeat an earlier one (mean over rows); token counts by the evaluated model's "
         "tokenizer.", "", form_table(stage_metrics), ""]
  plot_form(stage_metrics, out / "form_by_stage.png")
  md += ["![tokens and form per stage](form_by_stage.png)", ""]
  if any("per_label" in m for m in stage_metrics.values()):
    md += ["## Per label", ""]
    for label in sorted({lb for m in stage_metrics.values() for lb in m.get("per_label", {})}):
      md += [f"### {label}", "",
             metrics_table({s: m for s, m in stage_metrics.items() if "per_label" in m}, "per_label", label), ""]
  plot_safety_by_stage(stage_metrics, out / "safety_by_stage.png")
  plot_by_category(stage_metrics, out / "safety_by_category.png")
  md += ["![refusal and over-refusal per stage](safety_by_stage.png)", "",
         "![per category](safety_by_category.png)", ""]
  sets = sorted({s for m in stage_metrics.values() for s in m["per_set"]})
  for name in sets:
    md += [f"### Prompt set `{name}`", "", metrics_table(stage_metrics, "per_set", name), ""]
  md += ["## Per category", ""]
  for category in sorted({c for m in stage_metrics.values() for c in m["per_category"]}):
    md += [f"### {category}", "", metrics_table(stage_metrics, "per_category", category), ""]
  examples = examples_section(stage_metrics)
  if examples:
    md += ["## Example generations (the first two of each label, cut to 400 characters)", ""] + examples
  md += ["## Training curves", ""]
  if plot_training(logs, out / "training_curves.png"):
    md += ["![loss and rewards per stage](training_curves.png)", ""]
    for stage, rows in logs.items():
      if rows:
        last = rows[-1]
        shown = {k: round(v, 4) for k, v in last.items() if k in ("step",) + LOSS_KEYS + REWARD_KEYS}
        md.append(f"- {stage}: last logged {shown}")
    md.append("")
  else:
    md += ["(no training metrics found)", ""]
  if problems:
    md += ["Notes on the training logs:", ""] + [f"- {p}" for p in problems] + [""]
  path = out / "report.md"
  path.write_text("\n".join(md), encoding="utf-8")
  logger.info("report written to %s", path)
  return path
