// The CPU soft-VQ kernels' arguments and entry points, one per instruction set (soft_vq.cpp picks
// one at run time). Each is compiled from soft_vq_kernel.h in its own translation unit.
//
// All buffers are float32, contiguous, with the code dimension padded to Dp (a multiple of 16,
// zero-filled) and the codebook padded to Kp codes (a multiple of the code block, zero rows).
#pragma once
#include <cstdint>

namespace softvq_fast::cpu {

struct SoftVQProblem {
  int64_t C, M, K, D, Kp, Dp;
  float inv_tau, inv_t;
  const float* z;         // (C, M, Dp)
  const float* codebook;  // (C, Kp, Dp)
  const float* codebook_t;  // (C, Dp, Kp): the transpose, for scores vectorised along codes
};

struct SoftVQForwardOut {
  float* z_q;         // (C, M, Dp)
  float* row_stats;   // (4, C, M): max logit, log-sum at tau, log-sum at T, row entropy at T
  float* column_sum;  // (C, Kp): sum over rows of softmax(logits / T)
  int64_t* indices;   // (C, M)
  bool with_stats;    // argmax indices
  bool with_entropy;  // log-sum at T, row entropy, column sums
};

struct SoftVQBackwardIn {
  const float* grad_z_q;         // (C, M, Dp)
  const float* grad_row_entropy; // (C, M)
  const float* grad_column_sum;  // (C, Kp)
  const float* z_q;              // (C, M, Dp)
  const float* row_stats;        // (4, C, M)
  bool with_entropy;
  float* grad_z;                 // (C, M, Dp)
  float* grad_codebook;          // (C, Kp, Dp)
};

constexpr int64_t kSoftVQCodeBlock = 128;

#define SOFTVQ_DECLARE(isa)                                                          \
  namespace isa {                                                                    \
  void soft_vq_forward(const SoftVQProblem& p, const SoftVQForwardOut& out);         \
  void soft_vq_backward(const SoftVQProblem& p, const SoftVQBackwardIn& b);          \
  }
SOFTVQ_DECLARE(portable)
SOFTVQ_DECLARE(avx2)
SOFTVQ_DECLARE(avx512)
#undef SOFTVQ_DECLARE

}  // namespace softvq_fast::cpu
