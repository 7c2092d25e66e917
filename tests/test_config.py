"""Config layout and validation: every bad config fails before anything is built or compiled."""

import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from saro_jax import config as config_lib
from saro_jax.config import ConfigError, training_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("preset", ["tiny", "smollm2_135m", "qwen2_5_7b", "llama3_8b"])
def test_every_preset_validates(preset):
  saro = load_config("saro", preset)
  assert saro.stage == "saro" and saro.name == f"saro-{preset}"
  # smollm2_135m is the 2-CPU-core recipe (one device; batches of 4 and 2 rows); the others are
  # checked on an 8-device mesh.
  devices = 1 if preset == "smollm2_135m" else 8
  for stage in ("rw", "srpo"):
    cfg = training_config(saro, stage, device_count=devices)
    assert cfg.stage == stage
    assert (cfg.dpo is not None) == (stage == "srpo")
  assert training_config(load_config("rw", preset), device_count=devices).dpo is None
  assert training_config(load_config("srpo", preset), device_count=devices).dpo.reference == "live"


def test_default_preset_is_tiny_and_random():
  cfg = training_config(load_config("saro"), "rw", device_count=1)
  assert cfg.model.init_from == "random" and cfg.model.tokenizer == "bundled"
  assert cfg.data.source_list == ("bundled:rw_train",)
  assert config_lib.default_workdir(load_config("saro")) == "runs/saro-tiny"


def test_pipeline_stage_sections_overlay_top_level():
  saro = load_config("saro")
  saro.srpo.dpo.beta = 0.25
  saro.rw.train.steps = 7
  assert training_config(saro, "srpo", device_count=1).dpo.beta == 0.25
  assert training_config(saro, "rw", device_count=1).train.steps == 7


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
    load_config("saro", "huge")


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.mesh, "tensor", 3), r"config.mesh data\*fsdp\*tensor = 1\*-1\*3 does not fit the 8"),
    (lambda c: c.mesh.update(data=2, fsdp=2, tensor=1), r"does not fit the 8 devices"),
    (lambda c: setattr(c.rw.train, "batch_size", 12), r"config.rw.train.batch_size=12 is not divisible"),
    (lambda c: setattr(c.rw.train, "grad_accum", 3), r"grad_accum \(3\)"),
    (lambda c: setattr(c.srpo.dpo, "reference", "frozen"), r"config.srpo.dpo.reference='frozen' is not one of"),
    (lambda c: setattr(c.rw.opt, "schedule", "step"), r"config.rw.opt.schedule='step'"),
    (lambda c: setattr(c.srpo.dpo, "loss_type", "kto"), r"config.srpo.dpo.loss_type='kto' is not one of"),
    (lambda c: c.srpo.dpo.update(loss_type="ipo", label_smoothing=0.1), r"config.srpo.dpo: dpo label_smoothing=0.1 does not apply to loss_type='ipo'"),
    (lambda c: setattr(c.srpo.dpo, "share_prompts", True), r"config.srpo.dpo.share_prompts puts a prompt's pairs in one tree.*pairs_per_row > 1"),
    (lambda c: setattr(c.model, "compute_dtype", "fp8"), r"config.model.compute_dtype='fp8'"),
    (lambda c: setattr(c.model, "attention_impl", "cudnn"), r'config.model.attention_impl="cudnn" is cuDNN.*bf16/fp16 only; set config.model.compute_dtype="bfloat16"'),
    (lambda c: setattr(c.rw.data, "on_error", "ignore"), r"config.rw.data.on_error"),
    (lambda c: setattr(c.rw.opt, "warmup_steps", 1000), r"warmup_steps=1000 exceeds"),
    (lambda c: setattr(c.rw.data, "sources", ""), r"config.rw.data.sources is empty"),
    (lambda c: setattr(c.model, "init_from", ""), r"config.model.init_from is empty"),
])
def test_bad_values_fail_with_the_key_and_the_fix(mutate, message):
  saro = load_config("saro")
  mutate(saro)
  with pytest.raises(ConfigError, match=message):
    training_config(saro, "rw", device_count=8)
    training_config(saro, "srpo", device_count=8)


def test_a_train_config_built_in_python_checks_its_flag_type():
  # ml_collections refuses a non-bool for logps_keep_logits; a TrainConfig built directly (as the
  # benchmarks build theirs) is checked by validate.
  with pytest.raises(ConfigError, match=r"config.srpo.train.logps_keep_logits=1 must be True or"):
    config_lib.TrainConfig(logps_keep_logits=1).validate("srpo.train")


def test_wrong_type_and_unknown_key_in_a_section():
  raw = load_config("saro").to_dict()
  raw["rw"]["train"]["steps"] = "ten"  # a config file can build such a dict; flags cannot
  saro = ml_collections.ConfigDict(raw)
  with pytest.raises(ConfigError, match=r"config.rw.train.steps='ten' must be an integer"):
    training_config(saro, "rw", device_count=1)
  saro = load_config("saro")
  saro.rw.train.stepz = 3
  with pytest.raises(ConfigError, match=r"config.rw.train: unknown key\(s\) \['stepz'\]"):
    training_config(saro, "rw", device_count=1)


def test_tuple_fields_take_lists_or_comma_strings():
  from saro_jax import config as config_lib
  gen = config_lib.section(config_lib.GenerateConfig, {"stop": "</answer>, END"}, "generate")
  assert gen.stop == ("</answer>", "END")  # a flag's string, split at commas
  assert config_lib.section(config_lib.GenerateConfig, {"stop": ["a,b"]}, "g").stop == ("a,b",)
  with pytest.raises(ConfigError, match=r"config.g.stop=5 must be a comma-separated string or a list"):
    config_lib.section(config_lib.GenerateConfig, {"stop": 5}, "g")
  data = config_lib.section(config_lib.DataConfig, {"length_buckets": [128, 256]}, "rw.data")
  assert data.length_buckets == (128, 256)  # int tuples: lists only, checked by validate
  with pytest.raises(ConfigError, match=r"config.rw.data.length_buckets='128' must be a list"):
    config_lib.section(config_lib.DataConfig, {"length_buckets": "128"}, "rw.data")


def test_unknown_stage_lists_the_stages():
  from saro_jax import stages
  config = ml_collections.ConfigDict({"stage": "train_everything"})
  with pytest.raises(ValueError, match=r"config.stage='train_everything' is not a stage; available: .*'rw'"):
    stages.run(config, "/nonexistent")
  assert {"rw", "srpo", "saro"} <= set(stages.available())
  assert "reference" not in stages.available()


def test_batch_must_divide_process_count():
  saro = load_config("saro")
  saro.rw.train.batch_size = 6
  with pytest.raises(ConfigError, match=r"not divisible by the 4 processes"):
    training_config(saro, "rw", device_count=2, process_count=4)


def _main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "saro_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_command_line_rejects_unknown_key_and_bad_mesh_before_compiling(tmp_path):
  out = _main("--config", "configs/saro.py", "--config.rw.train.stepz=3", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "stepz" in out.stderr
  out = _main("--config", "configs/saro.py", "--config.mesh.tensor=3", f"--workdir={tmp_path}")
  assert out.returncode != 0
  assert "config.mesh data*fsdp*tensor = 1*-1*3 does not fit the 8 devices" in out.stderr
  # Nothing was built: the workdir has no stage output.
  assert not os.path.exists(tmp_path / "rw")


# ---- data.* : every data pipeline option is a config key --------------------------------------

# The PipelineOptions fields a config does not carry: they come from train.*, seed and the runtime.
NOT_DATA_KEYS = ("batch_size", "seed", "process_index", "process_count")


def test_every_pipeline_option_is_a_data_key_with_the_pipeline_default():
  import dataclasses
  from saro_jax.data import pipeline
  data = config_lib.DataConfig()
  for f in dataclasses.fields(pipeline.PipelineOptions):
    if f.name in NOT_DATA_KEYS or f.default is dataclasses.MISSING:
      continue
    assert hasattr(data, f.name), f"PipelineOptions.{f.name} cannot be set from a config"
    assert tuple(getattr(data, f.name)) == tuple(f.default) if isinstance(f.default, tuple) else (
        getattr(data, f.name) == f.default), f.name


def _command_line_config(*overrides: str) -> ml_collections.ConfigDict:
  """``configs/saro.py`` with ``--config.*`` overrides, parsed as main.py parses them."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={os.path.join(ROOT, 'configs', 'saro.py')}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


DATA_OVERRIDES = {"max_prompt_length": 48, "truncation": "drop", "response_truncation": "drop",
                  "min_response_tokens": 3, "length_buckets": (64, 256), "drop_remainder": True,
                  "read_threads": 2, "prefetch_workers": 1, "pack_window": 0.5}


def test_data_options_set_on_the_command_line_reach_the_pipeline(monkeypatch):
  from saro_jax import engine
  from saro_jax.data import pipeline
  saro = _command_line_config(*(
      f"--config.rw.data.{k}={v if not isinstance(v, tuple) else ','.join(map(str, v))}"
      for k, v in DATA_OVERRIDES.items()))
  cfg = training_config(saro, "rw", device_count=8)
  built = []

  class Built(Exception):
    pass

  def capture(kind, sources, tokenizer, options):
    built.append(options)
    raise Built  # the options are what this test checks; no worker process is started

  monkeypatch.setattr(pipeline, "_examples", capture)
  with pytest.raises(Built):
    engine.batches("sft", cfg, tokenizer=None)
  options = built[0]
  for key, value in DATA_OVERRIDES.items():
    assert getattr(options, key) == value, key
  assert options.max_length == 256 and options.batch_size == cfg.train.batch_size


def test_data_options_change_the_batches():
  """Two of the keys, end to end through the real pipeline on the bundled data: length buckets
  shorten rows; a prompt limit with truncation "drop" drops (and counts) long prompts."""
  import transformers
  from saro_jax import engine
  from saro_jax.data import bundled
  tok = transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
  saro = load_config("saro")
  buckets = (192, 224, 256)  # the bundled traces' batches hold rows of 179..256 tokens
  saro.rw.data.update(length_buckets=buckets, max_prompt_length=24, truncation="drop",
                      pack=False, shuffle=False, num_epochs=1)
  it = engine.batches("sft", training_config(saro, "rw", device_count=8), tok)
  lengths = []
  for b in it:
    longest = int((b["segment_ids"] > 0).sum(axis=1).max())
    assert b["tokens"].shape[1] == min(x for x in buckets if x >= longest)
    lengths.append(b["tokens"].shape[1])
  stats = it.stats.as_dict()
  assert min(lengths) < 256, lengths
  assert stats["dropped/prompt_too_long"] > 0
  assert stats["examples"] + stats["dropped"] == stats["source/kept"]


@pytest.mark.parametrize("key, value, message", [
    ("max_prompt_length", 256, r"config.rw.data.max_prompt_length=256 must be 0 \(no prompt limit\) or below rw.data.max_length=256"),
    ("max_prompt_length", -1, r"config.rw.data.max_prompt_length=-1"),
    ("truncation", "middle", r"config.rw.data.truncation='middle' is not one of"),
    ("response_truncation", "trim", r"config.rw.data.response_truncation='trim' is not one of \['cut', 'drop'\]"),
    ("min_response_tokens", 0, r"config.rw.data.min_response_tokens=0 must be > 0"),
    ("min_response_tokens", 1.5, r"config.rw.data.min_response_tokens=1.5 must be an integer"),
    ("length_buckets", (64, 100), r"config.rw.data.length_buckets=\(64, 100\) must be .* largest equal to rw.data.max_length=256"),
    ("length_buckets", (0, 256), r"config.rw.data.length_buckets=\(0, 256\) must be positive"),
    ("drop_remainder", "yes", r"config.rw.data.drop_remainder='yes' must be true/false"),
    ("read_threads", -1, r"config.rw.data.read_threads=-1 must be >= 0"),
    ("prefetch_workers", -2, r"config.rw.data.prefetch_workers=-2 must be >= 0"),
    ("pack_window", -1.0, r"config.rw.data.pack_window=-1.0 must be a number of batches from 0"),
    ("pack_window", 100.0, r"config.rw.data.pack_window=100.0 must be .* to 64"),
])
def test_bad_data_option_names_its_key(key, value, message):
  raw = load_config("saro").to_dict()
  raw["rw"]["data"][key] = value  # a config file can build any value; flags check types first
  with pytest.raises(ConfigError, match=message):
    training_config(ml_collections.ConfigDict(raw), "rw", device_count=8)


@pytest.mark.parametrize("field,value", [("cpu_gemm", "mkl"), ("attention_impl", "cpu_flash")])
def test_cpu_kernels_on_several_devices_are_refused_before_any_weights_load(field, value):
  # The config check runs first (training_config is what main and the engine call before they
  # read a checkpoint); models.load keeps the platform check (test_cpu_gemm.py,
  # test_cpu_attention.py).
  cfg = load_config("rw")
  cfg.model[field] = value
  assert getattr(training_config(cfg, device_count=1).model, field) == value
  with pytest.raises(ConfigError, match=rf'config\.model\.{field}="{value}" runs on one CPU device,'
                                        r" and this run has 8 devices"):
    training_config(cfg, device_count=8)
