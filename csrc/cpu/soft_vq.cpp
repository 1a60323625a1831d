// CPU implementation of softvq_fast::soft_vq_cpu_forward / soft_vq_cpu_backward (the fused `cpu`
// backend of softvq_fast.ops.soft_vq): argument checks, float32 packing (code dim padded to a
// multiple of 16, codebook padded to whole code blocks and transposed once per call: O(C*K*D)),
// then the kernel build chosen by cpu/isa.h (soft_vq_avx512.cpp, soft_vq_avx2.cpp, or the portable
// one compiled here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/isa.h"
#include "cpu/soft_vq_cpu.h"
#define SOFTVQ_CPU_ISA portable
#include "cpu/soft_vq_kernel.h"
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// x (..., rows, D) as float32, padded with zeros to (..., rows_to, D_to).
at::Tensor padded(const at::Tensor& x, int64_t rows_to, int64_t dim_to) {
  const at::Tensor f = x.to(at::kFloat).contiguous();
  if (f.size(-2) == rows_to && f.size(-1) == dim_to) return f;
  return at::constant_pad_nd(f, {0, dim_to - f.size(-1), 0, rows_to - f.size(-2)}, 0.0);
}

struct Packed {
  at::Tensor z, codebook, codebook_t;
  SoftVQProblem problem;
};

Packed pack(const at::Tensor& z, const at::Tensor& codebook, double tau, double entropy_temperature) {
  TORCH_CHECK(z.dim() == 3 && codebook.dim() == 3 && z.size(0) == codebook.size(0) && z.size(2) == codebook.size(2),
              "soft_vq (cpu): expected z (C, M, D) and codebook (C, K, D), got z ", z.sizes(), " and codebook ",
              codebook.sizes());
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "soft_vq (cpu): tensors must be on the CPU");
  const int64_t C = z.size(0), M = z.size(1), D = z.size(2), K = codebook.size(1);
  const int64_t Dp = round_up(D, 16), Kp = round_up(K, kSoftVQCodeBlock);
  Packed p;
  p.z = padded(z, M, Dp);
  p.codebook = padded(codebook, Kp, Dp);
  p.codebook_t = p.codebook.transpose(1, 2).contiguous();
  p.problem = SoftVQProblem{C, M, K, D, Kp, Dp, static_cast<float>(1.0 / tau), static_cast<float>(1.0 / entropy_temperature),
                            p.z.data_ptr<float>(), p.codebook.data_ptr<float>(), p.codebook_t.data_ptr<float>()};
  return p;
}

at::Tensor unpad(const at::Tensor& x, int64_t rows, int64_t dim) {
  return x.narrow(-2, 0, rows).narrow(-1, 0, dim).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_vq_cpu_forward(
    const at::Tensor& z, const at::Tensor& codebook, double tau, double entropy_temperature, bool with_stats,
    bool with_entropy) {
  const Packed packed = pack(z, codebook, tau, entropy_temperature);
  const SoftVQProblem& p = packed.problem;
  at::Tensor z_q = at::empty({p.C, p.M, p.Dp}, packed.z.options());
  at::Tensor row_stats = at::zeros({4, p.C, p.M}, packed.z.options());
  at::Tensor column_sum = at::zeros({p.C, p.Kp}, packed.z.options());
  at::Tensor indices = at::zeros({p.C, p.M}, packed.z.options().dtype(at::kLong));
  const SoftVQForwardOut out{z_q.data_ptr<float>(), row_stats.data_ptr<float>(), column_sum.data_ptr<float>(),
                             indices.data_ptr<int64_t>(), with_stats, with_entropy};
  switch (chosen_isa()) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    case Isa::kAvx512: avx512::soft_vq_forward(p, out); break;
    case Isa::kAvx2: avx2::soft_vq_forward(p, out); break;
#endif
    default: portable::soft_vq_forward(p, out); break;
  }
  return {unpad(z_q, p.M, p.D), row_stats, column_sum.narrow(1, 0, p.K).contiguous(), indices};
}

std::tuple<at::Tensor, at::Tensor> soft_vq_cpu_backward(
    const at::Tensor& grad_z_q, const at::Tensor& grad_row_entropy, const at::Tensor& grad_column_sum,
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& z_q, const at::Tensor& row_stats, double tau,
    double entropy_temperature, bool with_entropy) {
  const Packed packed = pack(z, codebook, tau, entropy_temperature);
  const SoftVQProblem& p = packed.problem;
  TORCH_CHECK(grad_z_q.sizes() == z.sizes() && z_q.sizes() == z.sizes(), "soft_vq (cpu) backward: grad_z_q ",
              grad_z_q.sizes(), " and z_q ", z_q.sizes(), " must match z ", z.sizes());
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == 4 && row_stats.size(1) == p.C && row_stats.size(2) == p.M,
              "soft_vq (cpu) backward: row_stats must be (4, C, M), got ", row_stats.sizes());
  const at::Tensor g = padded(grad_z_q, p.M, p.Dp), zq = padded(z_q, p.M, p.Dp);
  const at::Tensor stats = row_stats.to(at::kFloat).contiguous();
  const at::Tensor grad_h = grad_row_entropy.to(at::kFloat).contiguous();
  const at::Tensor grad_c = padded(grad_column_sum.to(at::kFloat).unsqueeze(-2), 1, p.Kp);
  TORCH_CHECK(grad_h.numel() == p.C * p.M && grad_column_sum.numel() == p.C * p.K,
              "soft_vq (cpu) backward: grad_row_entropy must be (C, M) and grad_column_sum (C, K)");
  at::Tensor grad_z = at::empty({p.C, p.M, p.Dp}, packed.z.options());
  at::Tensor grad_codebook = at::empty({p.C, p.Kp, p.Dp}, packed.z.options());
  const SoftVQBackwardIn b{g.data_ptr<float>(), grad_h.data_ptr<float>(), grad_c.data_ptr<float>(),
                           zq.data_ptr<float>(), stats.data_ptr<float>(), with_entropy,
                           grad_z.data_ptr<float>(), grad_codebook.data_ptr<float>()};
  switch (chosen_isa()) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    case Isa::kAvx512: avx512::soft_vq_backward(p, b); break;
    case Isa::kAvx2: avx2::soft_vq_backward(p, b); break;
#endif
    default: portable::soft_vq_backward(p, b); break;
  }
  return {unpad(grad_z, p.M, p.D), unpad(grad_codebook, p.K, p.D)};
}

}  // namespace
}  // namespace softvq_fast::cpu

TORCH_LIBRARY_IMPL(softvq_fast, CPU, m) {
  m.impl("soft_vq_cpu_forward", &softvq_fast::cpu::soft_vq_cpu_forward);
  m.impl("soft_vq_cpu_backward", &softvq_fast::cpu::soft_vq_cpu_backward);
}
