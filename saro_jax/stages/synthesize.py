r"""Synthesize: labelled prompt sets -> SaRO training data (RW traces, trajectories, outcome/process pairs).

  python -m saro_jax.main --config configs/synthesize.py:tiny            # template writer, seconds
  python -m saro_jax.main --config configs/synthesize.py \
      --config.synthesize.teacher=http --config.synthesize.http.base_url=http://127.0.0.1:8000/v1 \
      --config.synthesize.http.model=gpt-4o --config.synthesize.http.api_key_env=OPENAI_API_KEY
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=sampler                                # context distillation
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=self      # benign answers by the model itself, harmful: template

Writes <workdir>/{rw,trajectories,pairs}.jsonl, stats.json and records.jsonl (progress: a rerun
with the same workdir resumes). The logic is saro_jax/data/synthesis.py.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import ml_collections

from saro_jax import config as config_lib

logger = logging.getLogger(__name__)

def read_records(syn: config_lib.SynthesizeConfig) -> list[dict]:
  """The prompts of ``syn.prompts``; with ``limit`` (``limit_benign`` for benign/borderline), that
  many per label per spec, spread evenly over the set (sets are often ordered by category: the
  first N would all share one)."""
  from saro_jax.evaluate import prompts as prompts_lib
  records = []
  for spec in (s.strip() for s in syn.prompts.split(",") if s.strip()):
    by_label: dict[str, list] = {}
    for p in prompts_lib.read_prompts(spec):
      by_label.setdefault(p.label, []).append(p)
    for label, prompts in by_label.items():
      limit = syn.limit if label in ("harmful", "jailbreak") or syn.limit_benign < 0 else syn.limit_benign
      if limit and len(prompts) > limit:
        prompts = [prompts[i * len(prompts) // limit] for i in range(limit)]
      for p in prompts:
        records.append({"id": p.id, "prompt": p.prompt, "label": p.label, "category": p.category,
                        "source": p.source})
  return records


def _sampler_teacher(config, sampler: config_lib.SynthesizeSamplerConfig, kind: str = "sampler"):
  import jax

  from saro_jax import models, sample, sharding
  from saro_jax.data import synthesis
  from saro_jax.stages import generate
  spec = config_lib.section(config_lib.ModelSpec, config.get("model"), "model")
  spec.validate()
  mesh_cfg = config_lib.section(config_lib.MeshConfig, config.get("mesh"), "mesh")
  mesh_cfg.validate(jax.device_count())
  mesh = sharding.make_mesh(*mesh_cfg.resolved(jax.device_count()))
  tokenizer = models.load_tokenizer(spec)
  model = models.load(spec, tokenizer=tokenizer, mesh=mesh, seed=config.get("seed", 0))
  eos = sample.eos_token_ids(tokenizer, model.config, generate.generation_config_eos(spec.init_from))
  cls = synthesis.SelfTeacher if kind == "self" else synthesis.SamplerTeacher
  return cls(model, tokenizer, eos_ids=eos, max_new_tokens=sampler.max_new_tokens,
                                  temperature=sampler.temperature, top_p=sampler.top_p,
                                  batch_size=sampler.batch_size, mesh=mesh,
                                  prefill_reasoning=sampler.prefill_reasoning,
                                  decode_layout=sampler.decode_layout)


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  from saro_jax.data import synthesis

  syn, http, sampler = config_lib.synthesize_config(config.get("synthesize"))
  records = read_records(syn)  # bad prompt sets fail before any model loads
  out = pathlib.Path(syn.output or workdir)
  out.mkdir(parents=True, exist_ok=True)
  if syn.teacher == "http":
    teacher = synthesis.HttpTeacher(
        http.base_url, http.model, api_key_env=http.api_key_env,
        cache_path=str(out / "http_cache.jsonl") if http.cache else None, temperature=http.temperature,
        max_tokens=http.max_tokens, timeout_s=http.timeout_s, max_retries=http.max_retries,
        backoff_s=http.backoff_s, min_interval_s=http.min_interval_s, max_workers=http.max_workers)
  elif syn.teacher in ("sampler", "self"):
    teacher = _sampler_teacher(config, sampler, syn.teacher)
  else:
    teacher = None  # the template writer alone
  opts = synthesis.Options(shortest_of=syn.shortest_of, shared_steps=syn.shared_steps,
                           fallback=syn.fallback or teacher is None, chunk_size=syn.chunk_size,
                           seed=config.get("seed", 0), reasoning_tags=tuple(syn.reasoning_tags))
  stats = synthesis.synthesize(records, teacher, out, opts)
  logger.info("synthesize: %s", json.dumps(stats))
  print(os.fspath(out))
  return out
