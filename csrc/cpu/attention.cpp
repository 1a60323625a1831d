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
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  auto [out, lse, params] = prepare_attention(q, k, v, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "attention_fwd (cpu): dtype must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= 256, "attention_fwd (cpu): head_dim must be <= 256, got ", q.size(3));
  if (out.numel() == 0) return {out, lse};
  const Precision precision = q.scalar_type() == at::kBFloat16 ? Precision::kBFloat16 : Precision::kFloat32;
  switch (chosen_isa()) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    case Isa::kAvx512: avx512::attention_forward(params, precision); break;
    case Isa::kAvx2: avx2::attention_forward(params, precision); break;
#endif
    default: portable::attention_forward(params, precision); break;
  }
  return {out, lse};
}

}  // namespace
}  // namespace softvq_fast::cpu

TORCH_LIBRARY_IMPL(softvq_fast, CPU, m) {
  m.impl("attention_fwd", &softvq_fast::cpu::attention_fwd_cpu);
}
