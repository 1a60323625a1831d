// CPU implementation of softvq_fast::attention_fwd: checks, then the kernel build chosen by
// cpu/isa.h (attention_avx512.cpp, attention_avx2.cpp, or the portable one compiled here).
#include <torch/library.h>

#include "attention_op.h"
#include "cpu/attention_cpu.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#define SOFTVQ_CPU_ISA portable
#include "cpu/attention_kernel.h"
#include "cpu/attention_backward_kernel.h"
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

// The kernels' precision for q's dtype (float32 or bfloat16; head dims up to 256).
Precision cpu_precision(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              " (cpu): dtype must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= 256, op, " (cpu): head_dim must be <= 256, got ", q.size(3));
  return q.scalar_type() == at::kBFloat16 ? Precision::kBFloat16 : Precision::kFloat32;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  auto [out, lse, params] = prepare_attention(q, k, v, scale);
  const Precision precision = cpu_precision(q, "attention_fwd");
  if (out.numel() == 0) return {out, lse};
  run_chosen_isa(SOFTVQ_ISA_ENTRIES(attention_forward), params, precision);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  AttentionParams params = describe_attention(q, k, v, scale);
  const Precision precision = cpu_precision(q, "attention_bwd");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_bwd (cpu): grad_out ",
              grad_out.sizes(), " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}) && lse.scalar_type() == at::kFloat,
              "attention_bwd (cpu): lse must be float32 (B, H, Sq) = (", q.size(0), ", ", q.size(2), ", ", q.size(1),
              "), got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor grad_c = grad_out.to(q.scalar_type()).contiguous(), out_c = out.to(q.scalar_type()).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
       dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  params.lse = lse_c.data_ptr<float>();
  const AttentionGradParams grad{params, out_c.data_ptr(), grad_c.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr()};
  run_chosen_isa(SOFTVQ_ISA_ENTRIES(attention_backward), grad, precision);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace softvq_fast::cpu

TORCH_LIBRARY_IMPL(softvq_fast, CPU, m) {
  m.impl("attention_fwd", &softvq_fast::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &softvq_fast::cpu::attention_bwd_cpu);
}
