"""The SaRO pipeline: RW (SFT) -> SRPO (DPO from the RW model, RW model as reference) -> HF export
-> (``config.evaluate``) safety evaluation of start / RW / SRPO models and ``<workdir>/report.md``.

Both stage configs (and the eval section) are validated before anything is built. Outputs: ``<workdir>/rw``,
``<workdir>/srpo`` (each: checkpoints/, metrics.jsonl, tensorboard/, data_stats.json) and the final
HF directory (``export.dir`` or ``<workdir>/hf``). Re-running resumes: a finished stage is only
restored, an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections

from saro_jax import checkpoint as ckpt_lib
from saro_jax import engine
from saro_jax.config import eval_config, training_config
from saro_jax.evaluate import evaluation
from saro_jax.stages import rw, srpo

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  rw_cfg = training_config(config, "rw")
  srpo_cfg = training_config(config, "srpo")
  evaluate = bool(config.get("evaluate", False))
  if evaluate:
    eval_config(config.get("eval"))  # fail now, not after training
  rw_dir, srpo_dir = os.path.join(workdir, "rw"), os.path.join(workdir, "srpo")

  _, rw_result = engine.run_stage(rw_cfg, rw_dir, rw.STAGE)
  if not rw_result.finished:
    print(engine.stopped_note("RW", rw_result, rw_cfg.train.steps, "rw.train.stop_at"))
    return {"rw": rw_result.last_metrics, "finished": False}
  print(f"RW done ({rw_cfg.train.steps} steps): {os.path.abspath(rw_dir)}")

  # SRPO starts from the RW checkpoint (which also names the tokenizer) and, unless
  # dpo.reference_from says otherwise, uses it as the reference.
  start = dataclasses.replace(srpo_cfg.model, init_from=os.path.join(rw_dir, ckpt_lib.CHECKPOINT_SUBDIR),
                              tokenizer="")
  srpo_cfg = dataclasses.replace(srpo_cfg, model=start)
  s, srpo_result = engine.run_stage(srpo_cfg, srpo_dir, srpo.STAGE)
  if not srpo_result.finished:
    print(engine.stopped_note("SRPO", srpo_result, srpo_cfg.train.steps, "srpo.train.stop_at"))
    return {"srpo": srpo_result.last_metrics, "finished": False}
  print(f"SRPO done ({srpo_cfg.train.steps} steps): {os.path.abspath(srpo_dir)}")

  summary = {"rw": rw_result.last_metrics, "srpo": srpo_result.last_metrics,
             "rw_dir": os.path.abspath(rw_dir), "srpo_dir": os.path.abspath(srpo_dir)}
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
