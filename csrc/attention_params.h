// Plain description of one attention call, shared by the CPU and CUDA kernels.
//
// q: (B, Sq, H, D), k and v: (B, Sk, H, D), any strides in the first three dimensions and stride 1
// in the last; out: (B, Sq, H, D) contiguous; lse: (B, H, Sq) float32, the natural-log
// log-sum-exp of each row of scaled scores (saved for the backward).
#pragma once
#include <cstdint>

namespace softvq_fast {

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t batch, heads, q_len, kv_len, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // strides of (batch, seq, head), in elements
  float scale;
};

// The backward: the forward's description plus out and grad_out (B, Sq, H, D) contiguous, lse as
// the forward wrote it, and the gradients to write, dq (B, Sq, H, D) and dk, dv (B, Sk, H, D),
// contiguous.
struct AttentionGradParams {
  AttentionParams fwd;
  const void* out;
  const void* grad_out;
  void* dq;
  void* dk;
  void* dv;
};

}  // namespace softvq_fast
