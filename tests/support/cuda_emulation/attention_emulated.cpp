// csrc/cuda/attention_kernel.cuh compiled for the CPU against simt.h: the CUDA attention forward
// (input preparation, launch plan, kernel) run by emulated threads, plus small kernels that show
// the emulation catches what it claims to. Built by tests/test_attention_cuda_emulated.py.
#include <torch/extension.h>

#define SOFTVQ_CUDA_EMULATION 1
#include "simt.h"

namespace softvq_fast::cuda {
namespace {

alignas(16) unsigned char smem_raw[simt::kSharedBytes];  // the kernel's extern __shared__ array

// mma.sync.m16n8k16 / m16n8k8 with fp32 accumulators, as warp collectives.
template <typename T>
void mma16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  simt::LaneSlot in;
  std::copy(a, a + 4, in.a);
  in.b[0] = b0;
  in.b[1] = b1;
  simt::mma<T, 16>(c, in, simt::Collective::kMma16);
}

template <typename T>
void mma8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  simt::LaneSlot in;
  in.a[0] = a0;
  in.a[1] = a1;
  in.b[0] = b0;
  simt::mma<T, 8>(c, in, simt::Collective::kMma8);
}

}  // namespace
}  // namespace softvq_fast::cuda

#include "attention_kernel.cuh"

namespace softvq_fast::cuda {
namespace {

// attention_fwd as attention.cu runs it, with outputs poisoned (NaN) before the launch.
std::tuple<at::Tensor, at::Tensor> emulated_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, double scale, int64_t seed) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  auto [out, lse, params] = prepare_cuda_attention(q, k, v, scale);
  out.fill_(NAN);
  lse.fill_(NAN);
  if (out.numel() == 0) return {out, lse};
  const LaunchPlan plan = plan_launch(q, params);
  simt::launch(plan.kernel, plan.grid, plan.threads, plan.smem_bytes, params, static_cast<uint32_t>(seed), smem_raw);
  return {out, lse};
}

// The emulation's own checks.
struct ProbeArgs {
  float* out;
  bool sync;
};

// Thread 0 writes shared memory that every thread then reads, with or without __syncthreads
// between: without it, threads scheduled before thread 0 read the 0xff fill.
__global__ void shared_write_read(ProbeArgs a) {
  float* shared = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) shared[0] = 1.f;
  if (a.sync) __syncthreads();
  a.out[threadIdx.x] = shared[0];
}

// Lanes 0-15 shuffle while lanes 16-31 return: a warp collective not every lane reaches.
__global__ void divergent_shuffle(ProbeArgs a) {
  if (threadIdx.x % 32 >= 16) return;
  a.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// One warp multiplies A (16 x 16) by B (16 x 8), both bf16, loading its fragments in the layouts
// the kernel assumes; out (16 x 8) = A·B.
struct MmaArgs {
  const c10::BFloat16* a;
  const c10::BFloat16* b;
  float* out;
};

__global__ void one_mma(MmaArgs m) {
  const int lane = threadIdx.x, group = lane / 4, quad = lane % 4;
  auto pair = [](const c10::BFloat16* p, int next) {  // p[0] in the low half, p[next] in the high
    uint16_t lo, hi;
    std::memcpy(&lo, p, 2);
    std::memcpy(&hi, p + next, 2);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  };
  const uint32_t a[4] = {pair(m.a + group * 16 + 2 * quad, 1), pair(m.a + (group + 8) * 16 + 2 * quad, 1),
                         pair(m.a + group * 16 + 8 + 2 * quad, 1), pair(m.a + (group + 8) * 16 + 8 + 2 * quad, 1)};
  // B is row-major (k, n): a register holds two consecutive k, one row (8 elements) apart.
  const uint32_t b0 = pair(m.b + 2 * quad * 8 + group, 8), b1 = pair(m.b + (8 + 2 * quad) * 8 + group, 8);
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  mma16<__nv_bfloat16>(c, a, b0, b1);
  m.out[group * 8 + 2 * quad] = c[0];
  m.out[group * 8 + 2 * quad + 1] = c[1];
  m.out[(group + 8) * 8 + 2 * quad] = c[2];
  m.out[(group + 8) * 8 + 2 * quad + 1] = c[3];
}

at::Tensor probe(const std::string& name, int64_t threads, int64_t seed) {
  at::Tensor out = at::full({threads}, -1.f);
  const ProbeArgs args{out.data_ptr<float>(), name != "unsynced"};
  auto kernel = name == "divergent_shuffle" ? divergent_shuffle : shared_write_read;
  const int shared_bytes = name == "overflowing" ? 0 : 4;  // shared_write_read writes 4 bytes
  simt::launch(kernel, dim3(1), static_cast<int>(threads), shared_bytes, args, static_cast<uint32_t>(seed), smem_raw);
  return out;
}

// The launch attention_fwd makes for these inputs: (grid x, y, z), threads, shared memory bytes.
std::tuple<std::vector<int64_t>, int64_t, int64_t> launch_plan(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  const AttentionParams params = std::get<2>(prepare_cuda_attention(q, k, v, 1.0));
  const LaunchPlan plan = plan_launch(q, params);
  return {{plan.grid.x, plan.grid.y, plan.grid.z}, plan.threads, plan.smem_bytes};
}

at::Tensor emulated_mma(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
                  a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "emulated_mma takes bf16 a (16, 16) and b (16, 8)");
  at::Tensor ac = a.contiguous(), bc = b.contiguous(), out = at::full({16, 8}, NAN);
  const MmaArgs args{ac.data_ptr<c10::BFloat16>(), bc.data_ptr<c10::BFloat16>(), out.data_ptr<float>()};
  simt::launch(one_mma, dim3(1), 32, 0, args, 0, smem_raw);
  return out;
}

}  // namespace
}  // namespace softvq_fast::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd", &softvq_fast::cuda::emulated_attention_fwd, "the CUDA attention forward, emulated");
  m.def("probe", &softvq_fast::cuda::probe, "run one of the emulation's check kernels (synced, unsynced, "
        "overflowing, divergent_shuffle) and return what each thread wrote");
  m.def("launch_plan", &softvq_fast::cuda::launch_plan, "the launch attention_fwd makes for q, k, v");
  m.def("mma", &softvq_fast::cuda::emulated_mma, "one emulated mma.m16n8k16 (bf16) of a (16, 16) by b (16, 8)");
}
