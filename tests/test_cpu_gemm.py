"""``model.cpu_gemm="mkl"``: fp32 projections through MKL's sgemm inside the XLA:CPU program
(saro_jax/models/cpu_gemm.py). The three product forms against float64, the model's logits and
gradients against XLA's own dots, and the refusals (meshes, a missing compiler, bad values)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import error_model as em
import tiny_hf
from saro_jax import config as config_lib
from saro_jax import models, sharding
from saro_jax.models import cpu_ffi, cpu_gemm, hf
from saro_jax.models.config import ModelConfig

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("g++") or shutil.which("c++")),
        reason='model.cpu_gemm="mkl" compiles its handler with the system C++ compiler; none here'),
    pytest.mark.usefixtures("cpu_ffi_cache"),  # conftest: this module builds the handler
]


def _operands(seed, m, k, n):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((m, k)).astype(np.float32),
          rng.standard_normal((k, n)).astype(np.float32),
          rng.standard_normal((m, n)).astype(np.float32))


def test_the_three_product_forms_are_within_one_reductions_bound_of_float64():
  # Tolerance: each output is a K-term dot product, so any summation order is within
  # gamma(K) * sum_k |a_ik b_kj| of the exact value (error_model point 1, componentwise), for
  # XLA's dots and MKL's alike. K = 96 or 130 here: gamma ~ 6e-6 relative to |A||B|.
  x, w, g = _operands(0, 257, 96, 130)
  y, vjp = jax.vjp(jax.jit(cpu_gemm.matmul), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  cases = {"forward x @ w": (y, x64 @ w64, np.abs(x64) @ np.abs(w64), 96),
           "d x = g @ w^T": (dx, g64 @ w64.T, np.abs(g64) @ np.abs(w64).T, 130),
           "d w = x^T @ g": (dw, x64.T @ g64, np.abs(x64).T @ np.abs(g64), 257)}
  for what, (ours, exact, magnitude, k) in cases.items():
    excess = np.max(np.abs(np.asarray(ours, np.float64) - exact) / (em.gamma(k) * magnitude))
    print(f"{what}: worst error {excess:.3f} of its bound")
    assert ours.shape == exact.shape and excess <= 1.0, what
  # Negative control: one weight off by 1 % of its scale moves its column past the bound.
  w_bug = w.copy()
  w_bug[7, 11] += 1e-2
  bugged = np.asarray(cpu_gemm.matmul(jnp.asarray(x), jnp.asarray(w_bug)), np.float64)
  excess = np.max(np.abs(bugged - x64 @ w64) / (em.gamma(96) * np.abs(x64) @ np.abs(w64)))
  assert excess > 10, excess


def test_an_empty_contraction_gives_zeros():
  out = cpu_gemm.matmul(jnp.ones((3, 0), jnp.float32), jnp.ones((0, 4), jnp.float32))
  np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 4), np.float32))


def test_logits_and_gradients_with_mkl_match_xlas_dots(llama_dir):
  xla = hf.load_hf(str(llama_dir))
  mkl = hf.load_hf(str(llama_dir), cpu_gemm="mkl")
  assert mkl.config.cpu_gemm == "mkl" and mkl.config.rope_theta != 10_000.0
  tokens, positions, segments = tiny_hf.padded_batch(seed=1, lengths=(12, 7), left_pad=(False, True))
  # The projections really are the custom call (seven per layer), not XLA's dots.
  jaxpr = str(jax.make_jaxpr(lambda m: m(tokens, positions, segments))(mkl))
  assert jaxpr.count(cpu_gemm.TARGET) == 7 * mkl.config.num_layers, jaxpr.count(cpu_gemm.TARGET)
  assert cpu_gemm.TARGET not in str(jax.make_jaxpr(lambda m: m(tokens, positions, segments))(xla))
  # Logits and gradients within the error model of XLA's dots; a planted bug caught.
  tiny_hf.assert_same_function(xla, mkl, "mkl vs xla")


def test_mkl_is_refused_on_a_mesh_of_several_devices(llama_dir):
  spec = config_lib.ModelSpec(init_from=str(llama_dir), cpu_gemm="mkl")
  mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  with pytest.raises(cpu_gemm.CpuGemmError, match=r'cpu_gemm="mkl" runs on one CPU device.*2 cpu'):
    models.load(spec, mesh=mesh)
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert models.load(spec, mesh=one).config.cpu_gemm == "mkl"


def test_bad_values_and_a_missing_compiler_are_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.cpu_gemm='blas' is not one of"):
    config_lib.ModelSpec(cpu_gemm="blas").validate()
  with pytest.raises(ValueError, match=r"ModelConfig\.cpu_gemm='blas'"):
    ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=4, cpu_gemm="blas")
  monkeypatch.setenv(cpu_ffi.CACHE_ENV, str(tmp_path))  # an empty cache: it must build
  monkeypatch.setenv(cpu_ffi.COMPILER_ENV, str(tmp_path / "no-such-g++"))
  with pytest.raises(cpu_gemm.CpuGemmError, match=r"no C\+\+ compiler was found \(CXX="):
    cpu_gemm._build(cpu_gemm.blas_library())
