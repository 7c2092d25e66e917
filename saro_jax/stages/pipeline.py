"""The SaRO pipeline: [synthesize ->] RW (SFT) -> [mine ->] SRPO (DPO from the RW model, RW model as
reference) [-> mine -> SRPO ... for ``pipeline.rounds``] -> HF export -> (``config.evaluate``) safety
evaluation of start / RW / final SRPO models and ``<workdir>/report.md``.

Optional steps (the ``pipeline`` section, config.PipelineConfig; off by default):
  pipeline.synthesize  runs the ``synthesize`` section (stages/synthesize.py) into
                       ``<workdir>/synthesize`` first. Its outputs are named in data specs by the
                       placeholders ``synthesized:rw``, ``synthesized:pairs``,
                       ``synthesized:trajectories`` (in rw/srpo ``data.sources``, ``mine.traces``,
                       ``mine.mix_with``, ``mine.prompts``), resolved to the files here.
  pipeline.mine        mines on-policy pairs (the ``mine`` section, stages/mine.py) with the RW model
                       into ``<workdir>/mine``; SRPO reads them where ``srpo.data.sources`` says
                       ``mined:pairs`` (required: mined pairs nobody reads are a config mistake).
  pipeline.rounds      k > 1 repeats mine -> SRPO: round k mines with round k-1's SRPO model into
                       ``<workdir>/mine_r<k>``, and SRPO round k (``<workdir>/srpo_r<k>``) starts
                       from that model, which is also its reference unless ``dpo.reference_from``
                       says otherwise. ``srpo.train.steps`` is per round.

All configs (stages, eval, synthesize, mine) are validated before anything is built. Outputs:
``<workdir>/rw``, ``<workdir>/srpo`` (+ ``srpo_r<k>``; each: checkpoints/, metrics.jsonl,
tensorboard/, data_stats.json), ``<workdir>/synthesize``, ``<workdir>/mine`` (+ ``mine_r<k>``), the
final HF directory (``export.dir`` or ``<workdir>/hf``) and summary.json. Re-running resumes: a
finished training stage is only restored, an interrupted one continues from its last checkpoint;
synthesize and mine skip the prompts they already hold.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import jax
import ml_collections

from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine
from saro_jax.config import (ConfigError, eval_config, mine_config, pipeline_config, synthesize_config,
                             training_config)
from saro_jax.evaluate import evaluation
from saro_jax.stages import mine as mine_stage
from saro_jax.stages import rw, srpo
from saro_jax.stages import synthesize as synthesize_stage

log = logging.getLogger(__name__)

SYNTHESIZED = ("rw", "pairs", "trajectories")  # synthesized:<name> -> <synthesize dir>/<name>.jsonl
MINED = "mined:pairs"


def round_dirs(workdir: str, k: int) -> tuple[str, str]:
  """(mine dir, srpo dir) of round k (1-based): round 1 keeps the plain names."""
  suffix = "" if k == 1 else f"_r{k}"
  return os.path.join(workdir, f"mine{suffix}"), os.path.join(workdir, f"srpo{suffix}")


def resolve(specs: str, table: dict[str, str], where: str) -> str:
  """Replaces placeholders (``synthesized:*``, ``mined:pairs``) in a comma-separated spec list."""
  out = []
  for spec in (s.strip() for s in specs.split(",") if s.strip()):
    if spec.startswith(("synthesized:", "mined:")):
      if spec not in table:
        step = "pipeline.synthesize" if spec.startswith("synthesized:") else "pipeline.mine"
        known = [f"synthesized:{n}" for n in SYNTHESIZED] + [MINED]
        raise ConfigError(f"config.{where}: {spec!r} names an output of an optional step that is not"
                          f" on; set {step}=True (placeholders: {known})" if spec in known else
                          f"config.{where}: unknown placeholder {spec!r}; expected one of {known}")
      spec = table[spec]
    out.append(spec)
  return ",".join(out)


def _resolved_config(config: ml_collections.ConfigDict, table: dict[str, str]) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose data specs name files instead of placeholders."""
  cfg = copy.deepcopy(config)
  for stage in ("rw", "srpo"):
    if stage in cfg and "data" in cfg[stage]:
      cfg[stage].data.sources = resolve(cfg[stage].data.sources, table, f"{stage}.data.sources")
  if "mine" in cfg:
    for key in ("traces", "mix_with"):
      cfg.mine[key] = resolve(cfg.mine.get(key, ""), table, f"mine.{key}")
    # Prompt specs carry a format: a synthesized jsonl is read as labelled prompt rows.
    prompts_table = {k: f"jsonl:{v}" for k, v in table.items()}
    cfg.mine.prompts = resolve(cfg.mine.get("prompts", ""), prompts_table, "mine.prompts")
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  p = pipeline_config(config.get("pipeline"))
  table: dict[str, str] = {}
  syn_dir = os.path.join(workdir, "synthesize")
  if p.synthesize:
    syn, _, _ = synthesize_config(config.get("synthesize"))
    out = syn.output or syn_dir
    table.update({f"synthesized:{n}": os.path.join(out, f"{n}.jsonl") for n in SYNTHESIZED})
  srpo_sources = [s.strip() for s in config.srpo.data.sources.split(",")]
  if p.mine and MINED not in srpo_sources:
    raise ConfigError(f"config.pipeline.mine=True but config.srpo.data.sources="
                      f"{config.srpo.data.sources!r} does not read the mined pairs; add {MINED!r}"
                      f" (e.g. --config.srpo.data.sources={MINED})")
  if p.mine:
    table[MINED] = os.path.join(round_dirs(workdir, 1)[0], "pairs.jsonl")
  cfg = _resolved_config(config, table)
  rw_cfg = training_config(cfg, "rw")
  srpo_cfg = training_config(cfg, "srpo")
  if p.mine:
    mine_config(cfg.get("mine"))
  evaluate = bool(config.get("evaluate", False))
  if evaluate:
    eval_config(config.get("eval"))  # fail now, not after training
  rw_dir = os.path.join(workdir, "rw")

  if p.synthesize:
    syn_cfg = copy.deepcopy(cfg)
    synthesize_stage.run(syn_cfg, syn_dir)
    print(f"synthesize done: {os.path.abspath(syn_dir)}")

  _, rw_result = engine.run_stage(rw_cfg, rw_dir, rw.STAGE)
  if not rw_result.finished:
    print(engine.stopped_note("RW", rw_result, rw_cfg.train.steps, "rw.train.stop_at"))
    return {"rw": rw_result.last_metrics, "finished": False}
  print(f"RW done ({rw_cfg.train.steps} steps): {os.path.abspath(rw_dir)}")

  # Each SRPO round starts from the previous model (RW for round 1; it also names the tokenizer)
  # and, unless dpo.reference_from says otherwise, uses it as the reference.
  policy = os.path.join(rw_dir, ckpt_lib.CHECKPOINT_SUBDIR)
  summary: dict = {"rw": rw_result.last_metrics, "rw_dir": os.path.abspath(rw_dir), "rounds": []}
  s = None
  for k in range(1, p.rounds + 1):
    mine_dir, srpo_dir = round_dirs(workdir, k)
    round_cfg = srpo_cfg
    if p.mine:
      stats = mine_stage.mine(cfg, mine_dir, policy=policy)
      if not stats["pairs"]["total"]:
        raise RuntimeError(f"mine round {k}: no pairs in {mine_dir}/pairs.jsonl (every sample was"
                           f" judged fine, truncated or had no chosen answer; see {mine_dir}/stats.json);"
                           " raise mine.n / mine.limit or add offline pairs with mine.mix_with")
      print(f"mine round {k}: {stats['pairs']['mined']} mined + {stats['pairs']['mixed']} mixed pairs"
            f" -> {os.path.abspath(mine_dir)}")
      sources = resolve(config.srpo.data.sources, {**table, MINED: os.path.join(mine_dir, "pairs.jsonl")},
                        "srpo.data.sources")
      round_cfg = dataclasses.replace(round_cfg, data=dataclasses.replace(round_cfg.data, sources=sources))
    round_cfg = dataclasses.replace(round_cfg, model=dataclasses.replace(round_cfg.model, init_from=policy,
                                                                         tokenizer=""))
    s, srpo_result = engine.run_stage(round_cfg, srpo_dir, srpo.STAGE)
    name = "SRPO" if p.rounds == 1 else f"SRPO round {k}"
    if not srpo_result.finished:
      print(engine.stopped_note(name, srpo_result, round_cfg.train.steps, "srpo.train.stop_at"))
      return {**summary, "srpo": srpo_result.last_metrics, "finished": False}
    print(f"{name} done ({round_cfg.train.steps} steps): {os.path.abspath(srpo_dir)}")
    summary["rounds"].append({"round": k, "srpo_dir": os.path.abspath(srpo_dir), "srpo": srpo_result.last_metrics,
                              **({"mine_dir": os.path.abspath(mine_dir), "mined": stats["pairs"]}
                                 if p.mine else {})})
    policy = os.path.join(srpo_dir, ckpt_lib.CHECKPOINT_SUBDIR)
    if k < p.rounds:
      del s  # free this round's training state before the next round samples
      s = None

  srpo_dir = round_dirs(workdir, p.rounds)[1]
  summary.update(srpo=summary["rounds"][-1]["srpo"], srpo_dir=os.path.abspath(srpo_dir))
  if srpo_cfg.export.enabled:
    summary["hf_dir"] = os.path.abspath(
        engine.export(s, srpo_cfg.export.dir or os.path.join(workdir, "hf")))
    print(f"exported the SaRO model (HF format) to {summary['hf_dir']}")
  mesh = s.mesh
  del s  # free the training state before the evaluation loads models
  if evaluate:
    models = {"start": config.model.init_from,
              "rw": os.path.join(rw_dir, ckpt_lib.CHECKPOINT_SUBDIR),
              "srpo": summary.get("hf_dir") or os.path.join(srpo_dir, ckpt_lib.CHECKPOINT_SUBDIR)}
    logs = {name: os.path.join(d, "metrics.jsonl") for name, d in (("rw", rw_dir), ("srpo", srpo_dir))}
    summary["report"] = str(evaluation.evaluate_models(config, workdir, models,
                                                       training_logs=logs, mesh=mesh))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  log.info("saro: %s", summary)
  return summary
