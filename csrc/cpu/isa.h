// The instruction sets the CPU kernels are compiled for (one translation unit each, see
// target_avx2.h / target_avx512.h) and the one to run, shared by every op.
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <utility>

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

// The per-ISA entry points of one kernel, for run_chosen_isa (the x86 builds exist only with GCC
// on x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SOFTVQ_ISA_ENTRIES(fn) &avx512::fn, &avx2::fn, &portable::fn
#else
#define SOFTVQ_ISA_ENTRIES(fn) nullptr, nullptr, &portable::fn
#endif

// Calls the entry point of the build chosen_isa() picks with args.
template <typename... Params, typename... Args>
void run_chosen_isa(void (*avx512_fn)(Params...), void (*avx2_fn)(Params...), void (*portable_fn)(Params...),
                    Args&&... args) {
  switch (chosen_isa()) {
    case Isa::kAvx512: avx512_fn(std::forward<Args>(args)...); break;
    case Isa::kAvx2: avx2_fn(std::forward<Args>(args)...); break;
    default: portable_fn(std::forward<Args>(args)...); break;
  }
}

}  // namespace softvq_fast::cpu
