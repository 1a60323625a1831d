// Entry points of the CPU attention forward, one per instruction set (see attention.cpp for the
// runtime choice). Each is compiled from attention_kernel.h in its own translation unit.
#pragma once
#include "attention_params.h"

namespace softvq_fast::cpu {

enum class Precision { kFloat32, kBFloat16 };

namespace portable { void attention_forward(const AttentionParams& p, Precision precision); }
namespace avx2 { void attention_forward(const AttentionParams& p, Precision precision); }
namespace avx512 { void attention_forward(const AttentionParams& p, Precision precision); }

}  // namespace softvq_fast::cpu
