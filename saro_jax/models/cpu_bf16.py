"""When the bf16-on-XLA:CPU layouts apply: the one predicate behind them.

XLA:CPU runs a bf16 x bf16 -> bf16 dot as an fp32 GEMM, and hands its GEMM library (YNNPACK,
which uses the CPU's bf16 units) only products whose left operand contracts its minor dim. Two
places lay their products out for it when every operand is bf16 and the default backend is the
CPU: ``transformer.dense`` / ``rows_contracted_dot`` (bf16 GEMMs with an fp32 result) and
``tiled_attention``'s backward on transposed tiles. Other backends, and fp32 anywhere, keep the
plain products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def applies(*dtypes) -> bool:
  """Whether products of operands of these dtypes, traced now, take the bf16-on-XLA:CPU layouts."""
  return (all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes)
          and jax.default_backend() == "cpu")
