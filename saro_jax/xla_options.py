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

# The train steps and the reference forward, two choices:
#  - XLA:CPU's memory-optimized HLO scheduler orders the same ops so that fewer buffers are alive
#    at once. SmolLM2-135M fp32, side_by_side.py's steps: XLA temp memory 3.70 -> 3.21 GiB (SRPO,
#    4 pairs x 256) and 3.65 -> 3.21 GiB (RW, 4 x 512); the first steps' loss and log-probs bit for
#    bit the same; step time within the noise (benchmarks/README.md, session 36).
#  - YNNPACK takes the dots only (``LIBRARY_FUSION_TYPE_DOT``); XLA's default also hands it the
#    reductions (the softmax's max and sum, the norms', the vocabulary's log-sum-exp) as calls of
#    their own, each reading an operand that a loop fusion first wrote out. As XLA's own loop
#    reductions, the elementwise work that feeds them (mask, scale, exp) fuses into them instead.
#    One layer's tiled attention (4 x 512 causal, SmolLM2's heads) fwd 38-41 -> 26-29 ms and
#    fwd + bwd 93-103 -> 74-84 ms, against PyTorch's SDPA 31 / 93 ms; in-process A/Bs of the
#    whole steps: RW 1.053x (faster in 5 of 6 rounds), SRPO 1.014x (5 of 6). Same arithmetic up
#    to the order of the reductions' sums (benchmarks/README.md, session 37).
CPU_STEP_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

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
  """The ``CPU_STEP_OPTIONS`` this jaxlib's compiler takes (each checked on its own, so a renamed
  one does not drop the others) for a step compiled for this mesh's devices when they are CPUs;
  None (the compiler's defaults) for GPUs and TPUs."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return {k: v for k, v in CPU_STEP_OPTIONS.items() if cpu_takes({k: v})} or None
