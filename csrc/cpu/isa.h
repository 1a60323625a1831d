// The instruction sets the CPU kernels are compiled for (one translation unit each, see
// target_avx2.h / target_avx512.h) and the one to run, shared by every op.
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace softvq_fast::cpu {

enum class Isa { kPortable, kAvx2, kAvx512 };

// The widest build this CPU runs, or the one SOFTVQ_FAST_CPU_ISA=portable|avx2|avx512 forces
// (tests use it to cover every build); forcing one the CPU lacks is an error.
inline Isa chosen_isa() {
  Isa best = Isa::kPortable;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* forced = std::getenv("SOFTVQ_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  const std::string name(forced);
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "portable",
              "SOFTVQ_FAST_CPU_ISA must be portable, avx2 or avx512, got ", name);
  const Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "SOFTVQ_FAST_CPU_ISA=", name,
              " but this CPU (or build) does not support it");
  return want;
}

}  // namespace softvq_fast::cpu
