// An XLA:CPU FFI handler: C = op(A) @ op(B) for row-major fp32 matrices through a BLAS's sgemm_.
// saro_jax/models/cpu_gemm.py compiles it on first use (model.cpu_gemm="mkl") and links it to the
// MKL that torch's wheel exports. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T,
// so the call passes B first; the transposes are flags, never copies.
#include <cstdint>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

static ffi::Error Sgemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) {
    return ffi::Error::InvalidArgument("saro_jax cpu_gemm: operands must be 2-D");
  }
  const int64_t M = trans_a ? da[1] : da[0], K = trans_a ? da[0] : da[1];
  const int64_t K2 = trans_b ? db[1] : db[0], N = trans_b ? db[0] : db[1];
  if (K != K2) return ffi::Error::InvalidArgument("saro_jax cpu_gemm: contracted dims differ");
  const int64_t big = std::numeric_limits<int>::max();
  if (M > big || N > big || K > big) {
    return ffi::Error::InvalidArgument("saro_jax cpu_gemm: a dim exceeds the BLAS's 32-bit ints");
  }
  float* out = c->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    for (int64_t i = 0; i < M * N; ++i) out[i] = 0.f;
    return ffi::Error::Success();
  }
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ldb = static_cast<int>(trans_b ? K : N), lda = static_cast<int>(trans_a ? M : K);
  const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
  const float one = 1.f, zero = 0.f;
  sgemm_(&tb, &ta, &m, &n, &k, &one, b.typed_data(), &ldb, a.typed_data(), &lda, &zero, out, &m);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaroJaxSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
