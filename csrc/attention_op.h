// Argument checks and output allocation shared by the CPU and CUDA attention kernels.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "attention_params.h"

namespace softvq_fast {

// Checks q (B, Sq, H, D), k and v (B, Sk, H, D) and describes them (out and lse left null).
// Inputs whose last dimension is strided are copied (the Python dispatcher sends none).
inline AttentionParams describe_attention(at::Tensor& q, at::Tensor& k, at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4, "attention: q must be (batch, seq, heads, head_dim), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(),
              "attention: k and v must both be (batch, kv_seq, heads, head_dim), got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "attention: k/v shape ", k.sizes(), " does not match q shape ", q.sizes(),
              " in batch, heads or head_dim");
  TORCH_CHECK(k.size(1) > 0, "attention: k and v need at least one key");
  TORCH_CHECK(q.size(3) > 0, "attention: head_dim must be positive");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  for (at::Tensor* t : {&q, &k, &v}) {
    if (t->stride(3) != 1 && t->size(3) > 1) *t = t->contiguous();
  }
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.kv_len = k.size(1);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.scale = static_cast<float>(scale);
  return p;
}

// describe_attention, plus the forward's outputs: out (B, Sq, H, D) contiguous and lse (B, H, Sq)
// float32.
inline std::tuple<at::Tensor, at::Tensor, AttentionParams> prepare_attention(at::Tensor& q, at::Tensor& k,
                                                                             at::Tensor& v, double scale) {
  AttentionParams p = describe_attention(q, k, v, scale);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  return {out, lse, p};
}

}  // namespace softvq_fast
