// Entry points of the CPU attention forward and backward, one per instruction set (see
// attention.cpp for the runtime choice). Each is compiled from attention_kernel.h and
// attention_backward_kernel.h in its own translation unit.
#pragma once
#include "attention_params.h"

namespace softvq_fast::cpu {

enum class Precision { kFloat32, kBFloat16 };

#define SOFTVQ_DECLARE_ATTENTION(isa)                                        \
  namespace isa {                                                            \
  void attention_forward(const AttentionParams& p, Precision precision);     \
  void attention_backward(const AttentionGradParams& p, Precision precision); \
  }
SOFTVQ_DECLARE_ATTENTION(portable)
SOFTVQ_DECLARE_ATTENTION(avx2)
SOFTVQ_DECLARE_ATTENTION(avx512)
#undef SOFTVQ_DECLARE_ATTENTION

}  // namespace softvq_fast::cpu
