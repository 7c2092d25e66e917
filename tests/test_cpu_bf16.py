"""bf16 compute: the weight products and the loss's unembedding run as bf16 GEMMs with fp32
accumulation, and give the numbers the bf16 model defines.

XLA:CPU runs a bf16 x bf16 -> bf16 dot as an fp32 GEMM; ``transformer.dense`` asks for an fp32
result on the CPU (``_cpu_low_precision_matmul``) so the GEMM library keeps the bf16 operands
(AMX on Intel Xeons), and the loss's lm head reads its fp32 master weights in the compute dtype.
Weight gradients (the rows contracted) go through ``transformer.rows_contracted_dot``, a bf16
GEMM on a row-major copy of the activations' transpose.

Error model (bf16 unit roundoff u16 = 2^-8: 8 significand bits with the implicit one; fp32's
Higham gamma(n) for an n-term fp32 sum, tests/error_model.py): bf16 x bf16 products are exact in
fp32, so a product accumulated in fp32 and rounded once to bf16 is within
u16 * |exact| + gamma(n) * sum|terms| of the exact sum of the bf16 inputs' products. A cotangent
rounded to bf16 before its product adds u16 * sum|terms| more.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import error_model as em
from jax.sharding import NamedSharding, PartitionSpec as P
from saro_jax import losses
from saro_jax.models import tiled_attention, transformer

U16 = 2.0 ** -8
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dots")


def bf16(seed, *shape):
  """Random values representable in bf16, as float32."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def bf16_dots(fn, *args) -> tuple[int, int]:
  """How many dots of ``fn``'s optimized program read two bf16 operands, and how many in all."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", hlo))
  operands = re.findall(r"dot\((%[\w.\-]+), (%[\w.\-]+)\)", hlo)
  return sum(types.get(a) == types.get(b) == "bf16" for a, b in operands), len(operands)


def within(got, want, bound, what):
  diff = np.abs(np.asarray(got, np.float64) - want)
  worst = float(np.max(diff / bound))
  print(f"{what}: max |d| / bound = {worst:.3f}")
  return worst <= 1.0


def dense_case(perturb: float = 0.0, mesh=None):
  """dense(x, w) in bf16 and its x / w gradients against float64 on the same bf16 inputs; with
  ``mesh`` (axes data, model), x's rows are sharded over data and w's outputs over model, so the
  backward contracts sharded dims (d x over model, d w over data)."""
  x, w, g = bf16(0, 4, 40, 64), bf16(1, 64, 96), bf16(2, 4, 40, 96)

  def objective(x16, w16):
    y = transformer.dense(x16, w16)
    return jnp.sum(y.astype(jnp.float32) * g), y

  x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w * (1 + perturb), jnp.bfloat16)
  step = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))
  if mesh is None:
    (_, y), (dx, dw) = step(x16, w16)
  else:
    x16 = jax.device_put(x16, NamedSharding(mesh, P("data", None, None)))
    w16 = jax.device_put(w16, NamedSharding(mesh, P(None, "model")))
    with jax.set_mesh(mesh):
      (_, y), (dx, dw) = step(x16, w16)
    if mesh.axis_types[0] == jax.sharding.AxisType.Explicit:  # (auto axes: XLA places outputs)
      assert dx.sharding.is_equivalent_to(x16.sharding, 3)  # each gradient placed as its primal
      assert dw.sharding.is_equivalent_to(w16.sharding, 2)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  # y: one fp32 sum of 64 exact products, one rounding to bf16.
  # Round to nearest: |round(v) - v| <= u16 |v|, and v is the fp32 sum: within gamma(64) * terms
  # of the exact one. A hard bound: one rounding can reach it (seen: 0.97-0.99 of it), never pass it.
  y_ok = within(y, x64 @ w64, U16 * np.abs(x64 @ w64)
                + (1 + U16) * em.gamma(64) * (np.abs(x64) @ np.abs(w64)) + 1e-30, "y")
  # d x = g @ w^T over 96 terms, d w = x^T @ g over 160 rows; each rounded once to bf16 (g is
  # already bf16, so its rounding before the product is exact here).
  gw = np.abs(g64) @ np.abs(w64).T
  dx_ok = within(dx, g64 @ w64.T, (U16 + (1 + U16) * em.gamma(96)) * gw + 1e-30, "d x")
  xg = np.einsum("bli,blo->io", np.abs(x64), np.abs(g64))
  dw_ok = within(dw, np.einsum("bli,blo->io", x64, g64), (U16 + (1 + U16) * em.gamma(160)) * xg
                 + 1e-30, "d w")
  return y_ok and dx_ok and dw_ok


def test_dense_bf16_matches_float64_on_the_bf16_inputs():
  assert dense_case()


@pytest.mark.parametrize("explicit", [False, True], ids=["auto_axes", "explicit_axes"])
def test_dense_bf16_sharded_matches_float64(explicit):
  # The mesh's partial sums and all-reduces only reorder fp32 sums: the same bound holds.
  types = (jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
  assert dense_case(mesh=mesh)


def test_dense_bound_catches_a_perturbed_weight():
  # 2 % on every weight moves each output by 2 % of |x @ w|: over the bound's u16 = 0.4 % of it
  # wherever the output is not a near-cancellation.
  assert not dense_case(perturb=0.02)


def test_dense_bf16_products_are_bf16_gemms_on_cpu():
  x, w = jnp.asarray(bf16(3, 128, 64), jnp.bfloat16), jnp.asarray(bf16(4, 64, 96), jnp.bfloat16)
  grad = jax.grad(lambda x, w: jnp.sum(transformer.dense(x, w).astype(jnp.float32) ** 2), (0, 1))
  # The forward, d x and d w all read bf16 operands (d w contracts the rows: without the
  # row-major copy of x^T, XLA:CPU runs it in fp32). A plain bf16 jnp.dot compiles to fp32 dots.
  assert bf16_dots(grad, x, w) == (3, 3)
  # fp32 compute is untouched: no bf16 anywhere.
  assert bf16_dots(grad, x.astype(jnp.float32), w.astype(jnp.float32)) == (0, 3)


def test_tiled_attention_bf16_products_are_bf16_gemms_on_cpu():
  # Every product of the tiled attention's forward (Q K^T, P V) and backward (the recomputed
  # scores, d P, d V, d K, d Q) reads bf16 operands, in both backward layouts: each contracts its
  # left operand's minor dim (the rows' layout forms d V and d K transposed, as dO^T P and
  # Q^T dS; formed as P^T dO and dS^T Q, XLA:CPU ran those two as fp32 dots: 5 of 7 before
  # session 48). Their numbers: the fp32 parity tests of both layouts (tests/test_attention.py).
  q, k, v = (jnp.asarray(bf16(seed, 2, 96, heads, 16), jnp.bfloat16)
             for seed, heads in ((8, 4), (9, 2), (10, 2)))
  mask = jnp.tril(jnp.ones((96, 96), bool))[None, None].repeat(2, 0)

  def grad(transposed):
    attend = lambda q, k, v: tiled_attention.tiled_attention(q, k, v, mask, 0.25, 32, transposed)
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2))

  assert tiled_attention.prefers_transposed_backward(jnp.bfloat16)
  assert not tiled_attention.prefers_transposed_backward(jnp.float32)
  assert bf16_dots(grad(None), q, k, v) == (7, 7)
  assert bf16_dots(grad(False), q, k, v) == (7, 7)


def test_loss_unembedding_reads_the_weights_in_the_compute_dtype():
  hidden, unembed = bf16(5, 2, 16, 64), np.random.default_rng(6).normal(size=(64, 40)).astype(
      np.float32)
  targets = jnp.asarray(np.random.default_rng(7).integers(0, 40, (2, 16)))
  h16 = jnp.asarray(hidden, jnp.bfloat16)
  logps = lambda w: losses.token_logps(h16, w, targets, vocab_size=40, chunk_size=8)
  # The fp32 master weights give exactly what their bf16 rounding gives.
  np.testing.assert_array_equal(np.asarray(logps(jnp.asarray(unembed))),
                                np.asarray(logps(jnp.asarray(unembed, jnp.bfloat16))))
  objective = lambda w: jnp.sum(logps(w))
  # Every product reads bf16: the forward (and its recomputation), d hidden and d unembed.
  n_bf16, n_dots = bf16_dots(jax.grad(objective), jnp.asarray(unembed))
  assert n_bf16 == n_dots >= 3
  g_unembed = jax.jit(jax.grad(objective))(jnp.asarray(unembed))
  assert g_unembed.dtype == jnp.float32  # the master weight's gradient is not rounded to bf16
  # d unembed = hidden^T @ (onehot - softmax) over the 32 tokens, d logits rounded to bf16 once.
  w16 = np.asarray(jnp.asarray(unembed, jnp.bfloat16).astype(jnp.float32), np.float64)
  logits = hidden.astype(np.float64) @ w16
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  d_logits = np.eye(40)[np.asarray(targets)] - probs
  want = np.einsum("bld,blv->dv", hidden, d_logits)
  terms = np.einsum("bld,blv->dv", np.abs(hidden), np.abs(d_logits))
  # + the softmax's own fp32 error (the logits' 64-term dot and the 40-term sum) in d logits.
  assert within(g_unembed, want, (U16 + em.gamma(32 + 64 + 40 + em.ELEMENTWISE_ULPS)) * terms,
                "d unembed")


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_dense_bf16_under_remat_gives_the_same_gradients(remat):
  # The model's remat policies (jax.checkpoint) around the custom-VJP product: the backward
  # recomputes the forward and runs the same two products on the same operands, so one product's
  # gradients are the same bits. (A chain with elementwise ops between products can differ by a
  # bf16 rounding under remat whatever the product: XLA fuses them differently.)
  x, w, g = (jnp.asarray(bf16(8 + i, *s), jnp.bfloat16) for i, s in
             enumerate(((32, 64), (64, 48), (32, 48))))
  objective = lambda fn: lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * g.astype(jnp.float32))
  checkpointed = jax.checkpoint(transformer.dense, policy=transformer._REMAT_POLICIES[remat])
  plain = jax.jit(jax.grad(objective(transformer.dense), (0, 1)))(x, w)
  remat_grads = jax.jit(jax.grad(objective(checkpointed), (0, 1)))(x, w)
  # d x and d w still bf16 GEMMs under remat (a linear objective needs no forward product).
  assert bf16_dots(jax.grad(objective(checkpointed), (0, 1)), x, w) == (2, 2)
  for a, b in zip(plain, remat_grads):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
