"""XLA compiler options the engine sets on CPU, and whether this jaxlib's CPU compiler takes them.

Both are CPU-only choices, measured on CPUs (benchmarks/README.md); GPU and TPU compiles keep
their compilers' defaults. An option this jaxlib no longer knows (XLA renames experimental ones)
is dropped with a warning, never an error: the program is the same without it, only slower or
larger.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

logger = logging.getLogger(__name__)

# The train steps and the reference forward: XLA:CPU's memory-optimized HLO scheduler orders the
# same ops so that fewer buffers are alive at once. SmolLM2-135M fp32, side_by_side.py's steps:
# XLA temp memory 3.70 -> 3.21 GiB (SRPO, 4 pairs x 256) and 3.65 -> 3.21 GiB (RW, 4 x 512); the
# first steps' loss and log-probs bit for bit the same; step time within the noise in in-process
# A/Bs (median 1.03x on both steps; benchmarks/README.md, session 36).
CPU_STEP_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# The sampler's decode: XLA:CPU compiles a dot either as a YNNPACK fusion (its default) or with
# its own Eigen-backed dot; this turns the YNNPACK fusions off. A decode step's products have few
# rows (M = the batch): SmolLM2 fp32, the model's own [in, out] weights, 32 steps, median of 6
# alternating rounds, ms per step, against the [out, in] copy with YNNPACK: batch 8 51 vs 61, 16
# 63 vs 85, 32 115 vs 116, 64 226 vs 222 (benchmarks/README.md, session 33).
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_takes(items: tuple) -> bool:
  options = dict(items)
  try:
    x = jax.device_put(jnp.zeros(2), jax.local_devices(backend="cpu")[0])
    jax.jit(lambda x: x + 1).lower(x).compile(options)
  except jax.errors.JaxRuntimeError as e:
    logger.warning("XLA:CPU rejects %s (%s): compiling without it", options, e)
    return False
  return True


def cpu_takes(options: dict) -> bool:
  """Whether this jaxlib's CPU compiler accepts ``options`` (checked once per set)."""
  return _cpu_takes(tuple(sorted(options.items())))


def step_options(mesh: Mesh) -> dict | None:
  """``CPU_STEP_OPTIONS`` for a step compiled for this mesh's devices when they are CPUs (and the
  compiler takes them); None (the compiler's defaults) for GPUs and TPUs."""
  if mesh.devices.flat[0].platform != "cpu" or not cpu_takes(CPU_STEP_OPTIONS):
    return None
  return dict(CPU_STEP_OPTIONS)
