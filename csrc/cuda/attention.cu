// CUDA implementation of softvq_fast::attention_fwd: the CUDA runtime calls around the kernels of
// attention_kernel.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <utility>

#include "attention_kernel.cuh"

namespace softvq_fast::cuda {
namespace {

// The shared-memory opt-in, once per kernel and device: it persists, and setting it on every launch
// costs microseconds next to kernels that take tens at short lengths.
void allow_shared_memory(const LaunchPlan& plan, int device) {
  static std::mutex mutex;
  static std::set<std::pair<void (*)(AttentionParams), int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({plan.kernel, device})) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(plan.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes));
  done.insert({plan.kernel, device});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, double scale) {
  at::Tensor q = q_in, k = k_in, v = v_in;  // replaced by aligned copies where needed
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse, params] = prepare_cuda_attention(q, k, v, scale);
  if (out.numel() == 0) return {out, lse};
  const LaunchPlan plan = plan_launch(q, params);
  allow_shared_memory(plan, q.get_device());
  plan.kernel<<<plan.grid, plan.threads, plan.smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace softvq_fast::cuda

TORCH_LIBRARY_IMPL(softvq_fast, CUDA, m) {
  m.impl("attention_fwd", &softvq_fast::cuda::attention_fwd_cuda);
}
