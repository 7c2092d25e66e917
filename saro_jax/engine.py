"""One engine for every training stage: setup -> resume -> loop -> finish.

A stage (``stages/rw.py``, ``stages/srpo.py``) is a ``Stage``: its pure loss, the batch keys its
step takes, and how a host batch reaches the devices. ``run_stage`` does the rest, in this order:

  1. mesh from ``cfg.mesh``;
  2. resume order: ``<workdir>/checkpoints`` has a step -> params, optimizer, step, RNG and data
     position from it (the tokenizer and ModelConfig it recorded); else ``cfg.model`` through
     ``models.load`` (every ``init_from`` form, see models/load.py) and a fresh optimizer;
     with LoRA (``cfg.lora.rank > 0``) the loaded weights become the frozen ``base`` and the
     trained params (optimizer state, checkpoints) are the adapters only (models/lora.py);
  3. the step: ``train.make_train_step`` around the stage's loss, jitted once (``train.jit_step``;
     LoRA: the base is the step's third, non-donated argument);
  4. the loop: ``train.run_loop`` (logging, checkpoints, stop_at);
  5. finish: data stats, and the HF export when the stage reached its last step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from saro_jax import checkpoint as ckpt_lib
from saro_jax import models, sharding, train
from saro_jax import optimizer as opt_lib
from saro_jax.config import ConfigError, StageConfig, training_config
from saro_jax.data import pipeline
from saro_jax.models import lora
from saro_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
  """What a stage's pieces are built from: the resumed or started state and its surroundings."""
  cfg: StageConfig
  workdir: str
  mesh: Mesh
  tokenizer: Any
  tokenizer_dir: str
  model_config: ModelConfig
  graphdef: nnx.GraphDef
  state: train.TrainState
  optimizer: optax.GradientTransformation
  learning_rate_fn: Any
  checkpointer: ckpt_lib.Checkpointer
  data_state: Any  # the data iterator's saved state when resuming, else None
  # LoRA: the frozen base params (``state.params`` are then the adapters); None = full training.
  base: nnx.State | None = None

  @property
  def model(self) -> nnx.Module:
    """The trained model (LoRA: the base with the adapters merged in)."""
    if self.base is None:
      return models.merge(self.graphdef, self.state.params)
    return models.merge(self.graphdef, lora.merged_params(self.base, self.state.params, self.cfg.lora))

  @property
  def resumed(self) -> bool:
    return self.data_state is not None or int(jax.device_get(self.state.step)) > 0


HostBatch = Mapping[str, Any]
ToDevice = Callable[[HostBatch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """What makes one training stage different from another; everything else is ``run_stage``.

  ``loss_fn(setup) -> loss(params, micro_batch, divisor) -> (loss, metrics)``: the loss and
  metrics of one micro-batch as its *share* of the step's value (the shares of one step add up).
  ``divisor(setup) -> fn(global_batch) -> scalar``: the number each micro-batch's value is
  divided by to make it a share (RW: the global batch's target tokens; SRPO: grad_accum).
  ``batch_ndims(cfg)``: the device batch's keys and their ranks (the jitted step's input).
  ``to_device(setup)``: host batch -> device batch, or None for "put the ``batch_ndims`` keys".
  ``batch_options(cfg)``: extra keyword arguments of the data pipeline (SRPO: the row layout).
  """
  name: str  # "rw" | "srpo": logs, progress bar, messages
  data: str  # the data pipeline's kind: "sft" | "dpo"
  loss_fn: Callable[[Setup], train.LossFn]
  divisor: Callable[[Setup], Callable[[train.Batch], jax.Array]]
  batch_ndims: Callable[[StageConfig], Mapping[str, int]]
  to_device: Callable[[Setup], ToDevice] | None = None
  batch_options: Callable[[StageConfig], Mapping[str, Any]] = lambda cfg: {}


# ---- setup --------------------------------------------------------------------------------------

def make_optimizer(cfg: StageConfig) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, learning-rate schedule) of ``cfg.opt`` over ``cfg.train.steps``."""
  o = cfg.opt
  kw = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps,
            schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
  tx = opt_lib.make_optimizer(**kw, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                              max_grad_norm=o.max_grad_norm)
  return tx, opt_lib.make_schedule(**kw)


def save_tokenizer(tokenizer, workdir: str) -> str:
  """Saves the tokenizer into ``<workdir>/tokenizer`` (later stages and the export read it)."""
  saved = os.path.join(workdir, "tokenizer")
  if jax.process_index() == 0 and not os.path.isdir(saved):
    tokenizer.save_pretrained(saved)
  return saved


def setup(cfg: StageConfig, workdir: str) -> Setup:
  """Resumes from ``<workdir>/checkpoints`` if it has a step, else starts from ``cfg.model``."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  ckpt_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, every=cfg.checkpoint.every,
                                       keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  latest = checkpointer.latest_step()
  data_state = base = None
  lora_cfg = lora_of(cfg)
  optimizer, lr_fn = make_optimizer(cfg)
  with sharding.use(mesh):
    if latest is not None:
      meta = ckpt_lib.read_model_meta(ckpt_dir)
      tokenizer_dir = meta["tokenizer"]
      tokenizer = models.load_tokenizer(tokenizer_dir)
      model_config = ModelConfig.from_dict(meta["model_config"])
      _check_same_lora(cfg, meta.get("lora"), ckpt_dir)
      if lora_cfg is None:
        trainable_like = models.abstract_params(model_config, mesh)
      else:  # the base is rebuilt as recorded (and verified); the adapters come from the step
        base = models.lora_base(meta["lora"], model_config, stage_dir=ckpt_dir,
                                tokenizer=tokenizer, mesh=mesh)
        trainable_like = ckpt_lib.abstract(lora.init_adapters(base, lora_cfg, cfg.seed))
      like = train.abstract_state(trainable_like, optimizer, cfg.seed)
      state, data_state = checkpointer.restore_latest(like)  # falls back past damaged steps
      graphdef, _ = nnx.split(models.abstract_model(model_config), nnx.Param)
      log.info("resumed %s at step %d", ckpt_dir, int(jax.device_get(state.step)))
    else:
      tokenizer = models.load_tokenizer(cfg.model)
      tokenizer_dir = save_tokenizer(tokenizer, workdir)
      model = models.load(cfg.model, tokenizer=tokenizer, mesh=mesh, seed=cfg.seed)
      model_config = model.config
      graphdef, params = models.split(model)
      del model
      record = None
      if lora_cfg is not None:
        base, params = params, lora.init_adapters(params, lora_cfg, cfg.seed)
        record = models.lora_record(cfg.model, lora_cfg, base, seed=cfg.seed, stage_dir=ckpt_dir)
      state = train.init_state(params, optimizer, cfg.seed)
      ckpt_lib.write_model_meta(ckpt_dir, model_config.to_dict(), tokenizer_dir, lora=record)
      log.info("started from %s", cfg.model.init_from)
  n_params = lora.count(state.params)
  if base is None:
    log.info("model %s: %.2fM params; mesh %s", model_config.family, n_params / 1e6, dict(mesh.shape))
  else:
    log.info("model %s: %.2fM frozen base params, %.3fM LoRA adapter params (rank %d on %s); mesh %s",
             model_config.family, lora.count(base) / 1e6, n_params / 1e6, lora_cfg.rank,
             ",".join(lora_cfg.targets), dict(mesh.shape))
  return Setup(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
               model_config=model_config, graphdef=graphdef, state=state, optimizer=optimizer,
               learning_rate_fn=lr_fn, checkpointer=checkpointer, data_state=data_state, base=base)


def _check_same_lora(cfg: StageConfig, record: Mapping[str, Any] | None, ckpt_dir: str) -> None:
  """A resumed stage trains what its checkpoint holds: full weights, or these same adapters."""
  want = cfg.lora if cfg.lora is not None and cfg.lora.enabled else None
  have = models.lora_config(record) if record else None
  if want != have:
    raise ConfigError(
        f"config.lora ({want or 'off'}) differs from what the checkpoints in {ckpt_dir} hold"
        f" ({have or 'full weights, no LoRA'}); use the same lora section to resume, or a new"
        " workdir")


def batches(kind: str, cfg: StageConfig, tokenizer, data_state: Any = None,
            **overrides) -> pipeline.BatchIterator:
  """This process's batch iterator of ``cfg.data`` (restored to ``data_state`` if given)."""
  it = pipeline.batches_from_config(kind, cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                                    seed=cfg.seed, **overrides)
  if data_state is not None:
    it.set_state(data_state)
  return it


def log_stats(it: pipeline.BatchIterator, workdir: str) -> dict:
  """Logs the data counts (dropped / truncated / packing fill) and writes data_stats.json."""
  stats = it.stats.as_dict()
  if stats.get("dropped"):
    log.warning("data: dropped %d examples: %s", stats["dropped"],
                {k: v for k, v in stats.items() if k.startswith("dropped/")})
  skipped = {k: v for k, v in stats.items() if k.startswith("source/skipped")}
  if skipped:
    log.warning("data: skipped bad records %s", skipped)
  log.info("data stats: %s", stats)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump(stats, f, indent=2, sort_keys=True)
  return stats


# ---- the stage ----------------------------------------------------------------------------------

def lora_of(cfg: StageConfig) -> lora.LoraConfig | None:
  """The stage's LoRA config, or None for full fine-tuning."""
  return cfg.lora if cfg.lora is not None and cfg.lora.enabled else None


def make_step(cfg: StageConfig, loss_fn: train.LossFn, optimizer: optax.GradientTransformation, *,
              normalizer_fn: Callable, mesh: Mesh, learning_rate_fn: Callable | None = None):
  """The stage's pure train step (``train.make_train_step``); with LoRA it is
  ``(state, batch, base)``: ``state.params`` are the adapters, the loss sees the base with them
  applied. ``saro_jax.plan`` compiles this same step."""
  lora_cfg = lora_of(cfg)
  adapt = None if lora_cfg is None else (
      lambda adapters, base: lora.adapted_params(base, adapters, lora_cfg))
  return train.make_train_step(loss_fn, optimizer, grad_accum=cfg.train.grad_accum,
                               normalizer_fn=normalizer_fn, mesh=mesh,
                               learning_rate_fn=learning_rate_fn, adapt=adapt)


def run_stage(cfg: StageConfig, workdir: str, stage: Stage) -> tuple[Setup, train.LoopResult]:
  """Runs (or resumes, or skips if finished) ``stage`` in ``workdir``."""
  s = setup(cfg, workdir)
  step = make_step(cfg, stage.loss_fn(s), s.optimizer, normalizer_fn=stage.divisor(s), mesh=s.mesh,
                   learning_rate_fn=s.learning_rate_fn)
  ndims = dict(stage.batch_ndims(cfg))
  done = int(jax.device_get(s.state.step)) >= cfg.train.steps
  if stage.to_device is not None and not done:  # e.g. SRPO's reference pass: not when finished
    to_device = stage.to_device(s)
  else:
    to_device = lambda host: train.put_batch({k: host[k] for k in ndims}, s.mesh)
  it = batches(stage.data, cfg, s.tokenizer, s.data_state, **stage.batch_options(cfg))
  with sharding.use(s.mesh):
    jitted = train.jit_step(step, s.state, ndims, s.mesh, frozen=s.base)
    step_fn = jitted if s.base is None else (lambda state, batch: jitted(state, batch, s.base))
    result = train.run_loop(
        step_fn=step_fn, state=s.state, batches=it, mesh=s.mesh, steps=cfg.train.steps,
        workdir=workdir, log_every=cfg.train.log_every, checkpointer=s.checkpointer,
        data_state_fn=it.get_state, progress_bar=cfg.train.progress_bar, to_device=to_device,
        stop_at=cfg.train.stop_at, desc=stage.name,
        nonfinite=cfg.train.nonfinite, max_skipped_steps=cfg.train.max_skipped_steps)
  s.state = result.state
  log_stats(it, workdir)
  s.checkpointer.close()
  return s, result


def stopped_note(name: str, result: train.LoopResult, steps: int, key: str = "train.stop_at") -> str:
  """The one message for a stage that ended early at ``stop_at`` (resumable)."""
  return (f"{name} stopped at step {int(result.state.step)} of {steps} ({key}); re-run the same"
          " command to resume")


def export(s: Setup, out_dir: str) -> str:
  """Writes the current weights as an HF dir (config, safetensors, tokenizer); returns its path."""
  return str(models.export(s.model, s.tokenizer, out_dir, dtype=s.cfg.export.dtype or None))


def finish(s: Setup, result: train.LoopResult, name: str) -> train.LoopResult:
  """A training stage's ending: say where things went, export if the stage reached its end."""
  log.info("%s: final metrics %s", name, result.last_metrics)
  print(f"{name} done: checkpoints in {os.path.join(s.workdir, 'checkpoints')}")
  if not result.finished:
    print(stopped_note(name, result, s.cfg.train.steps))
    return result
  if s.cfg.export.enabled:
    out = export(s, s.cfg.export.dir or os.path.join(s.workdir, "hf"))
    print(f"exported HF model to {out}")
  return result


def run(config: ml_collections.ConfigDict, workdir: str, stage: Stage) -> train.LoopResult:
  """A single training stage from a config: validate, run, finish."""
  s, result = run_stage(training_config(config, stage.name), workdir, stage)
  return finish(s, result, stage.name.upper())
