r"""AOT memory planner: will this config's RW and SRPO steps fit a slice, before paying for it?

  python -m saro_jax.plan --config configs/saro.py:qwen2_5_7b --devices 16 --hbm_gib 16
  python -m saro_jax.plan --config configs/saro.py:llama3_8b --mesh data=1,fsdp=16,tensor=1 \
      --hbm_gib 16 --target tpu:v5e:4x4

Nothing is downloaded or allocated. The weights are ShapeDtypeStructs carrying the shardings the
training run would give them (``sharding.state_shardings``, the project's logical-axis rules);
the architecture comes from the HF ``config.json`` (written below for the presets' backbones,
read from a local HF dir, or fetched from the hub when online). The REAL steps are lowered and
compiled ahead of time -- the RW step and the SRPO step (``train.make_train_step`` over the
stages' loss functions, jitted by ``train.jit_step``) and the DPO reference forward
(``reference.make_reference_fn``) -- and every figure printed as "XLA" is the compiler's own
``compiled.memory_analysis()`` per device: arguments, outputs, aliased (donated) bytes,
temporaries, generated code. The split of the arguments into weights / optimizer state / batch
comes from the same shardings; a hand formula is printed beside it as a cross-check.

Targets (``--target``):
  cpu             ``--devices`` virtual CPU devices (default). CPU XLA plans buffers for CPU: no
                  HBM-specific fusion, layout or rematerialisation decisions, so temporaries can
                  differ from a TPU/GPU compile (they are usually larger: fewer fusions).
  tpu:<topology>  compile for a TPU slice from this CPU host, e.g. ``tpu:v5e:4x4`` (16 v5e chips)
                  or ``tpu:v4:2x2x2`` (8 v4 chips = "v4-16"), through
                  ``jax.experimental.topologies`` -- needs libtpu (``pip install libtpu`` or
                  ``TPU_LIBRARY_PATH=/path/to/libtpu.so``), no TPU. The TPU compiler's own figures.
  local           the devices jax sees (a real GPU/TPU host).

LoRA (``config.lora.rank > 0``): the engine's own LoRA step (``engine.make_step``): the state is
the adapters (replicated) and their AdamW moments, the base weights a frozen, non-donated step
argument, and the SRPO reference the base itself (adapters off: no second copy of the weights).

Peak per device, per phase (the arrays that live across a phase count in it):
  RW                 the step: arguments + outputs - aliased + temporaries + code
  SRPO, live ref     max(step + reference weights, state + reference forward)
  SRPO, precomputed  max(step, state + reference forward)   (the one pass before training)
  SRPO, no ref       the step
The last printed line is a one-line summary with the verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

GIB = 1 << 30

# HF config.json of the presets' backbones (the published files, abridged to what ModelConfig
# reads), so a plan needs no download and no hub token.
KNOWN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
        "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"},
}


def hf_config_for(init_from: str) -> dict[str, Any]:
  """The HF config.json of ``init_from``: built in, a local HF dir, or the hub (when online)."""
  if init_from in KNOWN_HF_CONFIGS:
    return dict(KNOWN_HF_CONFIGS[init_from])
  path = os.path.join(init_from, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
    raise ValueError(f"plan: no config.json for model.init_from={init_from!r} (not built in, not a"
                     " local HF dir, and HF_HUB_OFFLINE is set)")
  from huggingface_hub import hf_hub_download
  with open(hf_hub_download(init_from, "config.json")) as f:
    return json.load(f)


def model_config_for(cfg):
  """The ModelConfig the training stage would build, from config files only (no weights)."""
  from saro_jax import checkpoint as ckpt_lib
  from saro_jax import models
  from saro_jax.config import RANDOM_INIT
  from saro_jax.models import families
  from saro_jax.models.config import ModelConfig

  spec = cfg.model
  if spec.init_from == RANDOM_INIT:
    return models.random_model_config(spec)
  stage_dir = ckpt_lib.find_stage_checkpoint(spec.init_from)
  if stage_dir is not None:
    config = ModelConfig.from_dict(ckpt_lib.read_model_meta(stage_dir)["model_config"])
    return config.replace(**models.spec_changes(spec))
  init_from = models.weights_path(spec.init_from)
  if str(init_from).endswith(".gguf"):
    raise ValueError(f"plan: model.init_from={init_from!r} is a GGUF file; plan from its HF config"
                     " (an HF dir) instead")
  return families.config_from_hf(hf_config_for(init_from), source=f"{init_from}/config.json",
                                 **models.spec_changes(spec))


# ---------------------------------------------------------------------------------------------
# Devices


def target_devices(target: str, n: int | None) -> list:
  """``n`` devices of ``target`` (cpu | tpu:<topology> | local) to compile for."""
  import jax
  if target == "cpu":
    devices = jax.devices("cpu")
    if n is not None and len(devices) < n:
      raise ValueError(f"plan: {len(devices)} CPU devices present, {n} wanted; run through"
                       " `python -m saro_jax.plan` (it sets jax_num_cpu_devices before jax starts)"
                       f" or set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return devices[:n] if n else devices
  if target.startswith("tpu:"):
    from jax.experimental import topologies
    devices = list(topologies.get_topology_desc(target[len("tpu:"):], "tpu").devices)
  elif target == "local":
    devices = jax.devices()
  else:
    raise ValueError(f"plan: --target={target!r}; use cpu, tpu:<topology> (e.g. tpu:v5e:4x4) or local")
  if n is not None and n != len(devices):
    raise ValueError(f"plan: --target={target} has {len(devices)} devices but --devices={n}")
  return devices


# ---------------------------------------------------------------------------------------------
# Memory figures


class CompilerOOM(Exception):
  """The target's compiler refused the program: it does not fit the device memory (TPU compiles
  know the chip's HBM). ``used`` = the bytes it reported needing, when it says."""

  def __init__(self, message: str):
    super().__init__(message)
    import re
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    size = lambda value, unit: int(float(value) * scale[unit])
    self.used = self.capacity = self.temporaries = None
    m = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    if m:
      self.used, self.capacity = size(*m.group(1, 2)), size(*m.group(3, 4))
    # "the total memory required for HLO temporaries (16.04G) exceeds available HBM (15.75G)":
    # temporaries alone; the arguments (state, batch) come on top (``plan_stage`` adds them).
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)",
                  message)
    if m:
      self.temporaries, self.capacity = size(*m.group(1, 2)), size(*m.group(3, 4))
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    self.headline = next((line for line in lines if "Used" in line or "memory" in line),
                         lines[0] if lines else "")[:300]


@dataclasses.dataclass(frozen=True)
class XlaMemory:
  """``compiled.memory_analysis()`` of one program, bytes per device."""
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  compile_s: float

  @property
  def peak(self) -> int:
    """Live at once while the program runs: inputs, outputs not written over donated inputs,
    temporaries (XLA's heap-simulated peak) and the executable."""
    return self.argument + self.output - self.alias + self.temp + self.code

  @classmethod
  def of(cls, lowered) -> XlaMemory:
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # TPU compiles fail when the program cannot fit the chip's HBM
      if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
        raise CompilerOOM(str(e)) from e
      raise
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return cls(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
               alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
               code=int(m.generated_code_size_in_bytes), compile_s=seconds)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage's per-device memory: resident pieces from the shardings, programs from XLA."""
  stage: str
  settings: dict[str, Any]
  params: int  # parameter count (of the model; LoRA: of the frozen base)
  weights: int  # per device (LoRA: the frozen base, a non-donated step argument)
  opt_state: int
  ref_weights: int  # a second resident copy during the step (full FT, live reference), else 0
  batch: int  # the step's batch arguments
  step: XlaMemory
  reference: XlaMemory | None  # the DPO reference forward (live or precomputed pass)
  reference_mode: str
  hand: dict[str, int]
  lora_rank: int = 0  # 0 = full fine-tuning
  adapters: int = 0  # LoRA: the trained adapters per device (replicated), else 0
  adapter_params: int = 0

  @property
  def state(self) -> int:
    """Resident between steps: the step's arguments but the batch (LoRA: adapters, their AdamW
    and the frozen base)."""
    return self.step.argument - self.batch

  @property
  def phases(self) -> dict[str, int]:
    out = {"step": self.step.peak + self.ref_weights}
    if self.reference is not None:
      # The reference program's arguments hold its weights; with LoRA those are the frozen base,
      # the same buffers as the state's, so they count once.
      shared = self.weights if self.lora_rank else 0
      out["reference forward"] = self.state - shared + self.reference.peak
    return out

  @property
  def peak(self) -> int:
    return max(self.phases.values())


def hand_formula(mc, cfg, *, mesh_shape: Mapping[str, int], params: int, rows: int,
                 reference_mode: str | None, adapter_params: int = 0) -> dict[str, int]:
  """Back-of-envelope bytes per device, to cross-check XLA (resident state exact up to padding;
  activations rough). ``rows`` = sequences in one micro-batch (SRPO: 2 per pair).
  ``adapter_params`` > 0: LoRA (replicated adapters are trained, the base is frozen and serves
  as the reference)."""
  import numpy as np
  shards = mesh_shape["fsdp"] * mesh_shape["tensor"]
  tensor = mesh_shape["tensor"]
  pb = np.dtype(mc.param_dtype).itemsize
  cb = np.dtype(mc.compute_dtype).itemsize
  L, D, F = cfg.data.max_length, mc.hidden_size, mc.intermediate_size
  rows_dev = max(rows // (mesh_shape["data"] * mesh_shape["fsdp"]), 1)
  heads_dev = max(mc.num_heads // tensor, 1) if mc.num_heads % tensor == 0 else mc.num_heads
  weights = params * pb // shards
  grads = weights
  # Saved for the backward pass, per layer: the block input (remat block); plus the projections'
  # outputs (remat dots); plus attention probabilities and MLP activations (no remat).
  per_layer = rows_dev * L * D * cb
  if mc.remat in ("dots", "none"):
    per_layer += rows_dev * L * ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim + D
                                 + 2 * F // tensor) * cb
  if mc.remat == "none":
    per_layer += rows_dev * heads_dev * L * L * 4
  saved = mc.num_layers * per_layer
  # One block recomputed / differentiated at a time: fp32 attention scores + MLP intermediates.
  block = rows_dev * heads_dev * L * L * 4 * 2 + rows_dev * L * 3 * F // tensor * cb
  vocab = mc.padded_vocab_size // tensor
  logits = rows_dev * min(cfg.train.logps_chunk, L) * vocab * 4 * 3
  if reference_mode is not None and cfg.train.logps_keep_logits:  # SRPO: every chunk's, kept
    chunk = min(cfg.train.logps_chunk, L)
    logits += rows_dev * -(-L // chunk) * chunk * vocab * 4
  # A layer's weights gathered over fsdp (in the compute dtype) for its forward and backward.
  per_layer_params = (params - 2 * mc.padded_vocab_size * D) // max(mc.num_layers, 1)
  gathered = 2 * per_layer_params * cb // tensor + mc.padded_vocab_size * D * cb // tensor
  adapters = adapter_params * pb  # replicated on every device
  if adapter_params:
    grads = adapters
  temp = grads + saved + block + logits + gathered
  trained = adapters if adapter_params else weights
  out = {"weights": weights, "opt_state": 2 * trained, "gradients": grads,
         "saved_activations": saved, "block_recompute": block, "logits_chunk": logits,
         "gathered_weights": gathered, "temporaries": temp, "adapters": adapters,
         "ref_weights": weights if reference_mode == "live" and not adapter_params else 0}
  out["peak"] = weights + adapters + out["opt_state"] + temp + out["ref_weights"]
  return out


# ---------------------------------------------------------------------------------------------
# Lowering the real steps


def _abstract_batch(keys_ndims: Mapping[str, int], rows: int, length: int, mesh) -> dict:
  import jax
  import jax.numpy as jnp
  from saro_jax import sharding
  out = {}
  for key, ndim in keys_ndims.items():
    shape = (rows, length) if ndim == 2 else (rows,)
    dtype = jnp.int32 if ndim == 2 else jnp.float32
    out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, ndim))
  return out


def abstract_adapters(params_like, lora_cfg, seed: int, mesh):
  """The LoRA adapters ``lora.init_adapters`` makes for these weights, as ShapeDtypeStructs,
  replicated as it places them."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from saro_jax.models import lora
  shapes = jax.eval_shape(functools.partial(lora.init_adapters, cfg=lora_cfg, seed=seed),
                          params_like)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def plan_stage(stage: str, cfg, mc, devices: Sequence) -> StagePlan:
  """Lowers and compiles the stage's real jitted step (and reference forward) on ``devices``.

  With LoRA (``cfg.lora.rank > 0``) the step is the engine's (``engine.make_step``): the state
  holds the adapters and their optimizer state, the base weights are its frozen third argument
  and the DPO reference runs on that base (no second copy)."""
  import jax
  from flax import nnx

  from saro_jax import models, sharding, train
  from saro_jax import engine, logps
  from saro_jax.stages import reference, rw, srpo

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
  with sharding.use(mesh):
    params_like = models.abstract_params(mc, mesh)
    graphdef, _ = nnx.split(models.abstract_model(mc), nnx.Param)
    optimizer, lr_fn = engine.make_optimizer(cfg)
    lora_cfg = engine.lora_of(cfg)
    # LoRA: the trained params are the adapters; the base is frozen (engine.setup's split).
    base_like = None if lora_cfg is None else params_like
    trainable_like = (params_like if lora_cfg is None
                      else abstract_adapters(params_like, lora_cfg, cfg.seed, mesh))
    state_like = train.abstract_state(trainable_like, optimizer, cfg.seed)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params_like))
    B, A, L = cfg.train.batch_size, cfg.train.grad_accum, cfg.data.max_length
    ref_mem, ref_mode = None, "none"
    if stage == "rw":
      loss_fn = rw.make_loss_fn(graphdef, vocab_size=mc.vocab_size, chunk_size=cfg.train.logps_chunk)
      step = engine.make_step(cfg, loss_fn, optimizer, normalizer_fn=rw.target_token_count,
                              mesh=mesh, learning_rate_fn=lr_fn)
      ndims = {k: 2 for k in rw.SFT_KEYS}
      rows = B // A
    else:
      ref_mode = cfg.dpo.reference
      loss_fn = srpo.make_loss_fn(graphdef, cfg, vocab_size=mc.vocab_size)
      step = engine.make_step(cfg, loss_fn, optimizer,
                              normalizer_fn=lambda _: jax.numpy.float32(A), mesh=mesh,
                              learning_rate_fn=lr_fn)
      ndims = srpo.batch_ndims(cfg)
      rows = 2 * (B // A)
      if ref_mode != "none":
        ref_fn = reference.make_reference_fn(graphdef, vocab_size=mc.vocab_size,
                                             chunk_size=cfg.train.logps_chunk, micro_batches=A,
                                             mesh=mesh)
        pairs = _abstract_batch({k: 2 for k in logps.PAIR_KEYS}, B, L, mesh)
        # The reference weights: the start weights (full FT), the frozen base (LoRA).
        ref_mem = XlaMemory.of(ref_fn.lower(params_like, pairs))
    batch_like = _abstract_batch(ndims, B, L, mesh)
    jitted = train.jit_step(step, state_like, ndims, mesh, frozen=base_like)
    frozen_args = () if base_like is None else (base_like,)
    try:
      step_mem = XlaMemory.of(jitted.lower(state_like, batch_like, *frozen_args))
    except CompilerOOM as e:
      if e.used is None and e.temporaries is not None:  # at least: temporaries + arguments
        resident = device_bytes(state_like) + device_bytes(batch_like) + device_bytes(frozen_args)
        e.used = e.temporaries + resident + (device_bytes(params_like)
                                             if ref_mode == "live" and lora_cfg is None else 0)
        e.headline += (f" -> needs >= {e.used / GIB:.2f} GiB with the step's arguments"
                       f" ({resident / GIB:.2f} GiB)" + (" and the live reference weights"
                                                         if ref_mode == "live" else ""))
      raise
  weights = device_bytes(params_like)
  adapter_params = 0 if lora_cfg is None else sum(math.prod(x.shape)
                                                  for x in jax.tree.leaves(trainable_like))
  mesh_shape = dict(mesh.shape)
  settings = dict(mesh=mesh_shape, batch_size=B, grad_accum=A, max_length=L, remat=mc.remat,
                  scan_layers=mc.scan_layers,
                  param_dtype=mc.param_dtype, compute_dtype=mc.compute_dtype,
                  logps_chunk=cfg.train.logps_chunk)
  if stage == "srpo":
    settings["reference"] = ref_mode
  if lora_cfg is not None:
    settings["lora"] = dict(rank=lora_cfg.rank, targets=",".join(lora_cfg.targets))
  return StagePlan(
      stage=stage, settings=settings, params=n_params, weights=weights,
      opt_state=device_bytes(state_like.opt_state),
      ref_weights=weights if ref_mode == "live" and lora_cfg is None else 0,
      batch=device_bytes(batch_like), step=step_mem, reference=ref_mem, reference_mode=ref_mode,
      hand=hand_formula(mc, cfg, mesh_shape=mesh_shape, params=n_params, rows=rows,
                        reference_mode=ref_mode if stage == "srpo" else None,
                        adapter_params=adapter_params),
      lora_rank=0 if lora_cfg is None else lora_cfg.rank,
      adapters=0 if lora_cfg is None else device_bytes(trainable_like),
      adapter_params=adapter_params)


# ---------------------------------------------------------------------------------------------
# Knobs: each one change to the stage config, re-planned


Knob = tuple[str, Callable]  # (label, (StageConfig, ModelConfig) -> (StageConfig, ModelConfig) | None)


def knobs(stage: str) -> list[Knob]:
  """Changes that lower the peak, each as a function of the current settings (None: n/a)."""

  def accum(factor):
    def apply(cfg, mc):
      a = cfg.train.grad_accum * factor
      data, fsdp, _ = cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor
      if cfg.train.batch_size % (a * data * fsdp):
        return None
      return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=a)), mc
    return (f"train.grad_accum x{factor}", apply)

  def remat(cfg, mc):
    if mc.remat == "block":
      return None
    return cfg, mc.replace(remat="block")

  def precomputed(cfg, mc):
    if cfg.dpo is None or cfg.dpo.reference != "live":
      return None
    return dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, reference="precomputed")), mc

  def tensor(t):
    def apply(cfg, mc):
      m = cfg.mesh
      if m.fsdp % t or m.fsdp // t < 1 or mc.num_kv_heads % (m.tensor * t):
        return None
      mesh = dataclasses.replace(m, fsdp=m.fsdp // t, tensor=m.tensor * t)
      if cfg.train.batch_size % (cfg.train.grad_accum * mesh.data * mesh.fsdp):
        return None
      return dataclasses.replace(cfg, mesh=mesh), mc
    return (f"mesh.tensor x{t} (from fsdp)", apply)

  out = [accum(2), accum(4), ("model.remat=block", remat)]
  if stage == "srpo":
    out.append(("dpo.reference=precomputed", precomputed))
  out += [tensor(2), tensor(4)]
  return out


LORA_NOTE = ("LoRA: re-run with --config.lora.rank=16 (say) to plan it: adapters + their AdamW"
             " state + the frozen base, which is also the SRPO reference")


# ---------------------------------------------------------------------------------------------
# Report


def unit_for(n: int) -> str:
  return "GiB" if n >= GIB else "MiB"


def fmt_bytes(n: int, unit: str = "GiB") -> str:
  return f"{n / GIB:8.2f} GiB" if unit == "GiB" else f"{n / (1 << 20):8.2f} MiB"


def verdict(peak: int, hbm_bytes: int) -> str:
  if peak <= hbm_bytes:
    return f"fits ({(hbm_bytes - peak) / GIB:.2f} GiB free)"
  return f"does not fit by {(peak - hbm_bytes) / GIB:.2f} GiB"


def format_stage(p: StagePlan, hbm_bytes: int) -> str:
  s = p.settings
  m = s["mesh"]
  head = (f"stage {p.stage}: {p.params / 1e9:.3f}B params; mesh data={m['data']} fsdp={m['fsdp']}"
          f" tensor={m['tensor']}; batch {s['batch_size']} x {s['max_length']} tokens, grad_accum"
          f" {s['grad_accum']}; remat {s['remat']}"
          + ("; scanned layers" if s.get("scan_layers") else "")
          + (f"; LoRA rank {s['lora']['rank']} on {s['lora']['targets']} ({p.adapter_params / 1e6:.2f}M"
             " adapter params, base frozen)" if "lora" in s else "")
          + f"; params {s['param_dtype']}, compute"
          f" {s['compute_dtype']}" + (f"; reference {s['reference']}" if "reference" in s else ""))
  h = p.hand
  unit = unit_for(p.peak)
  gib = functools.partial(fmt_bytes, unit=unit)  # small models print MiB
  scale = GIB if unit == "GiB" else 1 << 20
  rows = [
      ("weights" + (" (frozen base)" if p.lora_rank else ""), gib(p.weights), gib(h["weights"])),
      *([("LoRA adapters", gib(p.adapters), gib(h["adapters"]))] if p.lora_rank else []),
      ("optimizer state", gib(p.opt_state), gib(h["opt_state"])),
      ("reference weights", gib(p.ref_weights), gib(h["ref_weights"])),
      ("batch (step arguments)", gib(p.batch), ""),
      ("step arguments, XLA", gib(p.step.argument), ""),
      ("step outputs / aliased", f"{p.step.output / scale:.2f} / {gib(p.step.alias)}", ""),
      ("step temporaries, XLA", gib(p.step.temp), gib(h["temporaries"])),
      ("  of which gradients", "", gib(h["gradients"])),
      ("  saved activations", "", gib(h["saved_activations"])),
      ("  block / logits / gathered", "",
       f"{h['block_recompute'] / scale:.2f} / {h['logits_chunk'] / scale:.2f} /"
       f" {h['gathered_weights'] / scale:.2f}"),
      ("generated code", gib(p.step.code), ""),
      ("step peak", gib(p.step.peak + p.ref_weights), ""),
  ]
  if p.reference is not None:
    rows.append(("reference fwd peak", gib(p.state + p.reference.peak), ""))
  rows.append(("PEAK", gib(p.peak), gib(h["peak"])))
  lines = [head, f"  {'per device':28s} {'XLA':>16s}   {'hand formula':>14s}"]
  lines += [f"  {a:28s} {b:>16s}   {c:>14s}" for a, b, c in rows]
  compile_s = p.step.compile_s + (p.reference.compile_s if p.reference else 0.0)
  lines.append(f"  compile {compile_s:.1f} s; verdict vs {hbm_bytes / GIB:.4g} GiB: "
               f"{verdict(p.peak, hbm_bytes)}")
  if p.step.temp > 3 * h["temporaries"]:
    lines.append(f"  note: XLA's temporaries are {p.step.temp / h['temporaries']:.0f}x the hand"
                 " formula; a CPU compile keeps activations a TPU/GPU schedule frees (BUILD.md"
                 " 'Memory planner'): check with --target tpu:<topology> or on the accelerator")
  return "\n".join(lines)


@dataclasses.dataclass
class Plan:
  name: str
  target: str
  devices: int
  hbm_bytes: int
  stages: dict[str, StagePlan]
  suggestions: dict[str, list[tuple[str, int | None]]]  # stage -> [(knob, peak or None)]
  ooms: dict[str, CompilerOOM] = dataclasses.field(default_factory=dict)

  def stage_peak(self, stage: str) -> int:
    if stage in self.ooms:  # what the compiler said it needed, else "more than there is"
      return self.ooms[stage].used or self.hbm_bytes + 1
    return self.stages[stage].peak

  @property
  def peak(self) -> int:
    return max(self.stage_peak(s) for s in [*self.stages, *self.ooms])

  @property
  def fits(self) -> bool:
    return self.peak <= self.hbm_bytes

  def summary(self) -> str:
    parts = []
    for s in [*self.stages, *self.ooms]:
      if s not in self.ooms:
        parts.append(f"{s.upper()} {self.stage_peak(s) / GIB:.2f} GiB")
      elif self.ooms[s].used:
        parts.append(f"{s.upper()} >= {self.ooms[s].used / GIB:.2f} GiB (compiler OOM)")
      else:
        parts.append(f"{s.upper()} compiler OOM")
    outcome = verdict(self.peak, self.hbm_bytes)
    if self.ooms:  # the compiler's figure is a lower bound, or there is none
      worst = max(self.ooms.values(), key=lambda e: e.used or 0)
      outcome = (f"does not fit by >= {(worst.used - self.hbm_bytes) / GIB:.2f} GiB" if worst.used
                 and worst.used > self.hbm_bytes else "does not fit (the compiler ran out of memory)")
    line = (f"PLAN {self.name} on {self.devices} x {self.hbm_bytes / GIB:.4g} GiB ({self.target}):"
            f" peak/device {', '.join(parts)} -> {outcome}")
    fixes = []
    for stage, tried in self.suggestions.items():
      good = [f"{k} ({v / GIB:.2f} GiB)" for k, v in tried if v is not None and v <= self.hbm_bytes]
      fixes.append(f"{stage.upper()} fits with " + (" or ".join(good) if good else "no single knob"))
    return line + ("; " + "; ".join(fixes) if fixes else "")


def stage_names(config) -> list[str]:
  """The training stages of a training or pipeline config."""
  names = ["rw", "srpo"] if config.stage == "saro" else [config.stage]
  bad = [n for n in names if n not in ("rw", "srpo")]
  if bad:
    raise ValueError(f"plan: config.stage={config.stage!r} is not a training stage (rw, srpo, saro)")
  return names


def with_mesh(config, mesh: Mapping[str, int]):
  """A copy of ``config`` whose mesh (top level and any stage section's) is ``mesh``; axes not
  named take MeshConfig's defaults, as ``--mesh`` documents."""
  from saro_jax.config import MeshConfig
  full = dataclasses.asdict(MeshConfig(**mesh))
  out = ml_collections.ConfigDict(config.copy_and_resolve_references().to_dict())
  out.mesh = ml_collections.ConfigDict(full)
  for key in ("rw", "srpo"):
    if key in out and isinstance(out[key], ml_collections.ConfigDict) and "mesh" in out[key]:
      out[key].mesh = ml_collections.ConfigDict(full)
  return out


def make_plan(config, *, devices: Sequence, hbm_gib: float, target: str = "cpu",
              mesh: Mapping[str, int] | None = None, try_knobs: bool = True,
              stages: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> Plan:
  """Plans every training stage of ``config`` on ``devices``; prints as it goes via ``echo``."""
  from saro_jax.config import MeshConfig, training_config
  n = len(devices)
  hbm_bytes = int(hbm_gib * GIB)
  names = list(stages or stage_names(config))
  if mesh is not None:
    config = with_mesh(config, mesh)
  plans, suggestions, ooms = {}, {}, {}
  for stage in names:
    # The mesh is in the config before it is validated, so the batch-divisibility checks see
    # the mesh that is planned.
    cfg = training_config(config, stage if config.stage == "saro" else None, device_count=n,
                          process_count=1, dpo=stage == "srpo")
    # Concrete axes (no -1), so the knobs' divisibility checks see the real mesh.
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(*cfg.mesh.resolved(n)))
    mc = model_config_for(cfg)
    try:
      p = plan_stage(stage, cfg, mc, devices)
    except CompilerOOM as e:
      ooms[stage] = e
      used = f"needs {e.used / GIB:.2f} GiB of {e.capacity / GIB:.2f}" if e.used else "no figure"
      echo(f"stage {stage}: the {target} compiler ran out of device memory ({used}): {e.headline}")
    else:
      plans[stage] = p
      echo(format_stage(p, hbm_bytes))
    if (stage in ooms or p.peak > hbm_bytes) and try_knobs:
      tried = []
      echo(f"  {stage.upper()} does not fit; re-planning with one change at a time:")
      for label, apply in knobs(stage):
        changed = apply(cfg, mc)
        if changed is None:
          continue
        cfg2, mc2 = changed
        try:
          peak = plan_stage(stage, cfg2, mc2, devices).peak
        except CompilerOOM as e:
          echo(f"    {label:34s} compiler OOM"
               + (f" (needs {e.used / GIB:.2f} GiB)" if e.used else ""))
          tried.append((label, e.used or hbm_bytes + 1))
          continue
        except Exception as e:  # a knob that cannot compile is reported, not fatal
          echo(f"    {label:34s} failed: {type(e).__name__}: {str(e)[:200]}")
          tried.append((label, None))
          continue
        tried.append((label, peak))
        echo(f"    {label:34s} peak {fmt_bytes(peak, unit_for(p.peak))}  {verdict(peak, hbm_bytes)}")
      if cfg.lora is None or not cfg.lora.enabled:
        echo(f"    {LORA_NOTE}")
      suggestions[stage] = tried
  return Plan(name=str(config.get("name", "")), target=target, devices=n, hbm_bytes=hbm_bytes,
              stages=plans, suggestions=suggestions, ooms=ooms)


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in text.split(","):
    key, _, value = part.partition("=")
    if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected data=D,fsdp=F,tensor=T")
    out[key.strip()] = int(value)
  return out


def main(argv: Sequence[str] | None = None) -> Plan:
  from absl import flags
  from ml_collections import config_flags
  import sys
  argv = list(argv) if argv is not None else sys.argv
  fv = flags.FlagValues()
  # sys_argv: the --config.* overrides are read from the argv given, not always sys.argv.
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "configs/*.py[:preset], as for saro_jax.main", flag_values=fv,
      lock_config=True, sys_argv=argv)
  devices_f = flags.DEFINE_integer("devices", None, "device count (default: from --mesh or the"
                                   " target)", flag_values=fv)
  hbm_f = flags.DEFINE_float("hbm_gib", 16.0, "memory per device, GiB", flag_values=fv)
  mesh_f = flags.DEFINE_string("mesh", "", "data=D,fsdp=F,tensor=T (default: config.mesh)",
                               flag_values=fv)
  target_f = flags.DEFINE_string("target", "cpu", "cpu | tpu:<topology> | local", flag_values=fv)
  knobs_f = flags.DEFINE_bool("knobs", True, "re-plan with each knob when it does not fit",
                              flag_values=fv)
  stages_f = flags.DEFINE_list("stages", None, "subset of rw,srpo (default: the config's)",
                               flag_values=fv)
  fv(argv)
  if fv["config"].value is None:
    raise SystemExit("plan: --config is required, e.g. --config configs/saro.py:qwen2_5_7b")
  mesh = parse_mesh(mesh_f.value) if mesh_f.value else None
  n = devices_f.value
  if n is None and mesh is not None and -1 not in mesh.values():
    n = math.prod(mesh.values())
  import jax
  if target_f.value == "cpu" and n is not None:
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_num_cpu_devices", n)
  devices = target_devices(target_f.value, n)
  plan = make_plan(config_flag.value, devices=devices, hbm_gib=hbm_f.value, target=target_f.value,
                   mesh=mesh, try_knobs=knobs_f.value, stages=stages_f.value)
  if target_f.value == "cpu":
    print("note: CPU XLA memory analysis (virtual devices): no TPU/GPU-specific fusion or"
          " rematerialisation; treat temporaries as an estimate for the accelerator")
  print(plan.summary())
  return plan


if __name__ == "__main__":
  main()
