r"""Entry point: flags -> config -> ``saro_jax.stages.<config.stage>.run(config, workdir)``.

  python -m saro_jax.main --config configs/saro.py[:preset] [--config.x=y ...] [--workdir DIR]
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with :preset (e.g. configs/saro.py:tiny).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output dir (default: config.workdir or runs/<name>).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize: from JAX_COORDINATOR_ADDRESS /"
    " JAX_NUM_PROCESSES / JAX_PROCESS_ID if set, else auto-detected (TPU pod, SLURM).")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None, "Directory of JAX's persistent compilation cache (saro_jax/compile_cache.py;"
    " default ~/.cache/saro_jax/xla; '' or 'off' turns it off; JAX_COMPILATION_CACHE_DIR wins).")
flags.mark_flags_as_required(["config"])


def _init_distributed(jax) -> None:
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / grain chatter
  import jax  # after flags: --jax_* flags and XLA_FLAGS are in place

  from saro_jax import host_memory  # before the backend starts its threads (host_memory.py)
  logging.info(host_memory.reuse_freed_memory())
  from saro_jax import compile_cache  # before the first compile
  logging.info(compile_cache.enable(_COMPILE_CACHE.value))
  if _MULTIHOST.value:
    _init_distributed(jax)
  from saro_jax import config as config_lib
  from saro_jax import stages

  config = _CONFIG.value
  workdir = _WORKDIR.value or config_lib.default_workdir(config)
  logging.info("jax %s: %d process(es), %d device(s) (%s); workdir %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform,
               os.path.abspath(workdir))
  stages.run(config, workdir)
  logging.info(compile_cache.summary())


if __name__ == "__main__":
  app.run(main)
