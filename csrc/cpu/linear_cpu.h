// The CPU kernels around the oneDNN linear layers' training step (softvq_fast.ops.linear): GELU
// forward and backward, and the transpose of a gradient with its column sums. One entry point per
// instruction set (linear.cpp picks one at run time), each compiled from linear_kernel.h in its
// own translation unit. Buffers are float32; `n` counts elements.
#pragma once
#include <cstdint>

namespace softvq_fast::cpu {

#define SOFTVQ_DECLARE(isa)                                                                               \
  namespace isa {                                                                                         \
  void gelu_tanh_forward(const float* h, float* y, int64_t n);                                            \
  void gelu_tanh_backward(const float* grad, const float* h, float* grad_h, int64_t n);                   \
  void transpose_with_column_sums(const float* x, int64_t rows, int64_t cols, int64_t row_stride, float* t, \
                                  float* column_sums);                                                    \
  }
SOFTVQ_DECLARE(portable)
SOFTVQ_DECLARE(avx2)
SOFTVQ_DECLARE(avx512)
#undef SOFTVQ_DECLARE

}  // namespace softvq_fast::cpu
