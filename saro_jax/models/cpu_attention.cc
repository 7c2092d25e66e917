// XLA:CPU FFI handlers around PyTorch's CPU flash attention (ATen's
// _scaled_dot_product_flash_attention_for_cpu and its backward), for
// model.attention_impl="cpu_flash". saro_jax/models/cpu_attention.py compiles this on first use
// against torch's headers and links it to torch's CPU wheel.
//
// Operands in saro_jax's layouts, fp32, row-major: q [B, L, N, H], k and v [B, L, K, H] (grouped
// query heads, N a multiple of K), bias [B, 1, L, L] (0 where a key is visible, a large negative
// number where not), out [B, L, N, H], logsumexp [B, N, L]. ATen reads [B, L, heads, H] memory as
// its [B, heads, L, H] through strides (no copies in); its results are copied into XLA's buffers.
// The kernel also skips the key blocks above the diagonal (is_causal): every saro_jax training
// mask is causal by slot.
#include <cstdint>
#include <exception>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/from_blob.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t B, L, N, K, H;
};

// Checks the operands' shapes against q's and k's; fills `s`.
ffi::Error Check(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k,
                 ffi::Span<const int64_t> v, ffi::Span<const int64_t> bias, Shape& s) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || bias.size() != 4) {
    return ffi::Error::InvalidArgument("saro_jax cpu_attention: q, k, v and bias must be 4-D");
  }
  s = {q[0], q[1], q[2], k[2], q[3]};
  const bool same = k[0] == s.B && k[1] == s.L && k[3] == s.H && v[0] == s.B && v[1] == s.L &&
                    v[2] == s.K && v[3] == s.H && bias[0] == s.B && bias[1] == 1 &&
                    bias[2] == s.L && bias[3] == s.L;
  if (!same || s.K == 0 || s.N % s.K != 0) {
    return ffi::Error::InvalidArgument(
        "saro_jax cpu_attention: want q [B, L, N, H], k and v [B, L, K, H] with K dividing N, "
        "bias [B, 1, L, L]");
  }
  return ffi::Error::Success();
}

at::TensorOptions F32() { return at::TensorOptions().dtype(at::kFloat); }

// [B, L, heads, H] memory as ATen's [B, heads, L, H].
at::Tensor Heads(const void* data, const Shape& s, int64_t heads) {
  return at::from_blob(const_cast<void*>(data), {s.B, heads, s.L, s.H},
                       {s.L * heads * s.H, s.H, heads * s.H, 1}, F32());
}

at::Tensor Bias(const void* data, const Shape& s) {
  return at::from_blob(const_cast<void*>(data), {s.B, 1, s.L, s.L}, F32());
}

at::Tensor Lse(const void* data, const Shape& s) {
  return at::from_blob(const_cast<void*>(data), {s.B, s.N, s.L}, F32());
}

// Checks the operands' shapes, skips empty ones, runs `body(shape)` and turns ATen's exceptions
// into FFI errors naming `what`.
template <typename Body>
ffi::Error Run(const char* what, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
               ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& bias, Body body) {
  Shape s;
  if (auto e = Check(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(), s);
      e.failure()) {
    return e;
  }
  if (s.B * s.L * s.N * s.H == 0) return ffi::Error::Success();
  try {
    body(s);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("saro_jax cpu_attention ") + what + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  return Run("forward", q, k, v, bias, [&](const Shape& s) {
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        Heads(q.typed_data(), s, s.N), Heads(k.typed_data(), s, s.K),
        Heads(v.typed_data(), s, s.K), 0.0, /*is_causal=*/true, Bias(bias.typed_data(), s),
        static_cast<double>(scale));
    Heads(out->typed_data(), s, s.N).copy_(o);
    Lse(lse->typed_data(), s).copy_(l);
  });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v, float scale) {
  return Run("backward", q, k, v, bias, [&](const Shape& s) {
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        Heads(d_out.typed_data(), s, s.N), Heads(q.typed_data(), s, s.N),
        Heads(k.typed_data(), s, s.K), Heads(v.typed_data(), s, s.K),
        Heads(out.typed_data(), s, s.N), Lse(lse.typed_data(), s), 0.0, /*is_causal=*/true,
        Bias(bias.typed_data(), s), static_cast<double>(scale));
    Heads(d_q->typed_data(), s, s.N).copy_(gq);
    Heads(d_k->typed_data(), s, s.K).copy_(gk);
    Heads(d_v->typed_data(), s, s.K).copy_(gv);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaroJaxFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logsumexp
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaroJaxFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logsumexp
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d v
                                  .Attr<float>("scale"));
