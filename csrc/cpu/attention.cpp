// CPU implementation of softvq_fast::attention_fwd: checks, then the widest kernel build the CPU
// runs (attention_avx512.cpp, attention_avx2.cpp, or the portable one compiled here).
//
// SOFTVQ_FAST_CPU_ISA=portable|avx2|avx512 forces a build (tests use it to cover every path).
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "attention_op.h"
#include "cpu/attention_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#define SOFTVQ_CPU_ISA portable
#include "cpu/attention_kernel.h"
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

enum class Isa { kPortable, kAvx2, kAvx512 };

Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa chosen_isa() {
  static const Isa best = best_isa();
  const char* forced = std::getenv("SOFTVQ_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  const std::string name(forced);
  const Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "portable",
              "SOFTVQ_FAST_CPU_ISA must be portable, avx2 or avx512, got ", name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "SOFTVQ_FAST_CPU_ISA=", name,
              " but this CPU (or build) does not support it");
  return want;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  auto [out, lse, params] = prepare_attention(q, k, v, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "attention_fwd (cpu): dtype must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= 256, "attention_fwd (cpu): head_dim must be <= 256, got ", q.size(3));
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
