// The CUDA attention forward for bf16 / fp16 (fp32 accumulation): device code, launch planning and
// input preparation, everything but the CUDA runtime calls (csrc/cuda/attention.cu makes those).
// tests/support/cuda_emulation compiles this header for the CPU, against an emulation of the CUDA built-ins
// it uses, so that the kernel's logic is tested without a GPU.
//
// One kernel template, two configurations (see plan_launch()):
//   short: kv length <= 128, head dims 64/72/128. A thread block loads the whole key/value sequence
//          into shared memory once and has one warp per 16 query rows, so a whole (short) sequence
//          runs in one block; n-tiles past the real length are skipped. Instantiated for 64 and
//          128 keys, so that up to 64 keys do not reserve shared memory for 128 (which would
//          hold a 32-key sequence to 5 blocks an SM where its registers allow 8).
//   tiled: any length, head dim 64. 64 query rows (4 warps) per block walk 64-key tiles.
// Either way a warp holds the scores of 64 keys in registers at a time and keeps an online softmax
// (running max and sum, rescaled output) across those chunks; with head dim <= 72 two blocks fit
// an SM's registers.
// Tensor cores through mma.sync m16n8k16 (m16n8k8 for the last 8 of head dim 72, so 72 is not
// padded to 80/96/128). Scores stay in registers and are reused as the A operand of P·V.
//
// Fragment layouts of mma.m16n8k16 (row.col), lane = 4 * group + quad:
//   A (16x16): a0 = (group, 2quad..+1), a1 = (group+8, 2quad..), a2 = (group, 8+2quad..), a3 = (group+8, 8+2quad..)
//   B (16x8):  b0 = (k = 2quad..+1, n = group), b1 = (k = 8+2quad.., n = group)
//   C (16x8):  c0,c1 = (group, 2quad..+1), c2,c3 = (group+8, 2quad..+1)
#pragma once
#include <ATen/ATen.h>
#ifndef SOFTVQ_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "attention_op.h"

namespace softvq_fast::cuda {
namespace {

constexpr int kShortMaxKeys = 128;  // keep in sync with softvq_fast/ops/attention.py
constexpr int kShortMaxWarps = 8;   // 128 query rows per block
constexpr int kTiledKeys = 64;
constexpr int kChunk = 64;  // keys whose scores a warp holds in registers at a time
constexpr int kTiledWarps = 4;
// Elements added to each shared-memory row so that the 8 rows read by one fragment load fall in
// different banks: the row length in 32-bit words must be 4 mod 8.
template <int N>
constexpr int kRow = N + (N % 16 == 0 ? 8 : 16);

template <typename T> struct Pack;
template <> struct Pack<__nv_bfloat16> {
  static __device__ uint32_t two(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Pack<__half> {
  static __device__ uint32_t two(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

#ifndef SOFTVQ_CUDA_EMULATION  // the CPU emulation (tests/support/cuda_emulation) brings its own mma16 / mma8
// c += a (16x16) * b (16x8), and the k = 8 variant for the tail of head dim 72.
template <typename T>
__device__ __forceinline__ void mma16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ void mma8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
}
#endif

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Q rows [row0, row0 + 16) of one head as A fragments (zero past q_len): 2 elements per load.
template <typename T, int D>
__device__ void load_q_fragments(uint32_t (&qa)[(D + 15) / 16][4], const T* q, int64_t stride, int row0, int q_len,
                                 int group, int quad) {
  const int r_lo = row0 + group, r_hi = row0 + group + 8;
  const T* lo = q + static_cast<int64_t>(r_lo) * stride;
  const T* hi = q + static_cast<int64_t>(r_hi) * stride;
#pragma unroll
  for (int ks = 0; ks < (D + 15) / 16; ++ks) {
    const int c = ks * 16 + 2 * quad;
    qa[ks][0] = r_lo < q_len ? ld32(lo + c) : 0u;
    qa[ks][1] = r_hi < q_len ? ld32(hi + c) : 0u;
    const bool full = ks * 16 + 16 <= D;  // the k = 8 tail uses only a0, a1
    qa[ks][2] = full && r_lo < q_len ? ld32(lo + c + 8) : 0u;
    qa[ks][3] = full && r_hi < q_len ? ld32(hi + c + 8) : 0u;
  }
}

// One thread's share of a key/value tile: PER 16-byte chunks of k and of v, chunk i being number
// first + i * blockDim.x of the tile (row-major, D / 8 chunks a row); rows at or past `rows` are
// zeros, so that the masked columns of P meet zeros in V. Rows are read as 16-byte chunks
// (prepare_cuda_attention guarantees 16-byte aligned rows).
template <typename T, int D, int KEYS, int PER>
struct KVChunks {
  static constexpr int kChunks = D / 8;
  uint4 k[PER], v[PER];

  __device__ void fetch(const T* kp, const T* vp, int64_t k_stride, int64_t v_stride, int key0, int rows, int first) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int idx = first + i * blockDim.x, r = idx / kChunks, c = idx % kChunks * 8;
      k[i] = v[i] = make_uint4(0, 0, 0, 0);
      if (r < rows) {
        k[i] = *reinterpret_cast<const uint4*>(kp + static_cast<int64_t>(key0 + r) * k_stride + c);
        v[i] = *reinterpret_cast<const uint4*>(vp + static_cast<int64_t>(key0 + r) * v_stride + c);
      }
    }
  }

  // k row-major into ks (row stride kRow<D>), v transposed into vts (row stride kRow<KEYS>).
  __device__ void store(T* ks, T* vts, int first) const {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int idx = first + i * blockDim.x, r = idx / kChunks, c = idx % kChunks * 8;
      if (r >= KEYS) continue;
      *reinterpret_cast<uint4*>(ks + r * kRow<D> + c) = k[i];
      const T* ve = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) vts[(c + e) * kRow<KEYS> + r] = ve[e];
    }
  }
};

// Copies keys [key0, key0 + rows) into shared memory in one go (rows up to the next multiple of 16
// zero-filled).
template <typename T, int D, int KEYS>
__device__ void load_kv_tile(T* ks, T* vts, const T* k, const T* v, int64_t k_stride, int64_t v_stride, int key0,
                             int rows) {
  const int chunks = (rows + 15) / 16 * 16 * (D / 8);
  for (int first = threadIdx.x; first < chunks; first += blockDim.x) {
    KVChunks<T, D, KEYS, 1> chunk;
    chunk.fetch(k, v, k_stride, v_stride, key0, rows, first);
    chunk.store(ks, vts, first);
  }
}

// One block: query rows [blockIdx.x * 16 * warps, ...) of head blockIdx.y, batch blockIdx.z.
// KEYS keys per shared-memory tile, processed in register chunks of kChunk keys. The tiled
// configuration (STAGED, 4 warps) fetches the next tile into registers while it computes on the
// current one.
template <typename T, int D, int KEYS, bool STAGED>
__global__ void __launch_bounds__(STAGED ? 32 * kTiledWarps : 32 * kShortMaxWarps, STAGED ? 3 : (D <= 72 ? 2 : 1))
    attention_forward_kernel(AttentionParams p) {
  constexpr int kStagedChunks = KEYS * (D / 8) / (32 * kTiledWarps);
  constexpr int kSteps = (D + 15) / 16;  // k-steps of Q·Kᵀ (the last one is k = 8 when D % 16 == 8)
  constexpr int kKeyTiles = kChunk / 8;  // n-tiles of the scores held in registers
  constexpr int kDimTiles = D / 8;       // n-tiles of the output
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vts = ks + KEYS * kRow<D>;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y;
  const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * 16;
  const int q_len = static_cast<int>(p.q_len), kv_len = static_cast<int>(p.kv_len);
  const bool active = row0 < q_len;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  const float scale_log2 = p.scale * 1.4426950408889634f;

  uint32_t qa[kSteps][4];
  if (active) load_q_fragments<T, D>(qa, q, p.q_stride[1], row0, q_len, group, quad);
  float o[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // rows group, group + 8

  KVChunks<T, D, KEYS, STAGED ? kStagedChunks : 1> next;
  if constexpr (STAGED) next.fetch(k, v, p.k_stride[1], p.v_stride[1], 0, min(KEYS, kv_len), threadIdx.x);
  for (int key0 = 0; key0 < kv_len; key0 += KEYS) {
    const int tile_keys = min(KEYS, kv_len - key0);
    __syncthreads();  // the previous tile is consumed
    if constexpr (STAGED) {
      next.store(ks, vts, threadIdx.x);
      if (key0 + KEYS < kv_len)
        next.fetch(k, v, p.k_stride[1], p.v_stride[1], key0 + KEYS, min(KEYS, kv_len - key0 - KEYS), threadIdx.x);
    } else {
      load_kv_tile<T, D, KEYS>(ks, vts, k, v, p.k_stride[1], p.v_stride[1], key0, tile_keys);
    }
    __syncthreads();
    if (!active) continue;
    for (int c0 = 0; c0 < tile_keys; c0 += kChunk) {
      const int keys = min(kChunk, tile_keys - c0);
      const int key_tiles = (keys + 7) / 8;

      float s[kKeyTiles][4];
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        if (n < key_tiles) {
          const T* krow = ks + (c0 + n * 8 + group) * kRow<D> + 2 * quad;
#pragma unroll
          for (int st = 0; st < kSteps; ++st) {
            if (st * 16 + 16 <= D) {
              mma16<T>(s[n], qa[st], ld32(krow + st * 16), ld32(krow + st * 16 + 8));
            } else {
              mma8<T>(s[n], qa[st][0], qa[st][1], ld32(krow + st * 16));
            }
          }
        }
      }

      // Scale to log2 units, mask keys past the end, online softmax per row (4 lanes share a row).
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n * 8 + 2 * quad + (e & 1);
          s[n][e] = key < keys ? s[n][e] * scale_log2 : -INFINITY;
        }
        mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset *= 2) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, offset));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, offset));
      }
      const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
      const float corr_lo = exp2f(m_lo - new_lo), corr_hi = exp2f(m_hi - new_hi);  // 0 on the first chunk
      m_lo = new_lo;
      m_hi = new_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        s[n][0] = exp2f(s[n][0] - m_lo);
        s[n][1] = exp2f(s[n][1] - m_lo);
        s[n][2] = exp2f(s[n][2] - m_hi);
        s[n][3] = exp2f(s[n][3] - m_hi);
        sum_lo += s[n][0] + s[n][1];
        sum_hi += s[n][2] + s[n][3];
      }
      l_lo = l_lo * corr_lo + sum_lo;  // per-lane partial sums, combined after the last chunk
      l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        o[n][0] *= corr_lo;
        o[n][1] *= corr_lo;
        o[n][2] *= corr_hi;
        o[n][3] *= corr_hi;
      }

      // O += P·V: the score C fragments of key tiles 2j, 2j+1 are the A fragment of k-step j.
#pragma unroll
      for (int j = 0; j < kKeyTiles / 2; ++j) {
        if (2 * j < key_tiles) {
          const uint32_t pa[4] = {Pack<T>::two(s[2 * j][0], s[2 * j][1]), Pack<T>::two(s[2 * j][2], s[2 * j][3]),
                                  Pack<T>::two(s[2 * j + 1][0], s[2 * j + 1][1]),
                                  Pack<T>::two(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
          for (int n = 0; n < kDimTiles; ++n) {
            const T* vrow = vts + (n * 8 + group) * kRow<KEYS> + c0 + j * 16 + 2 * quad;
            mma16<T>(o[n], pa, ld32(vrow), ld32(vrow + 8));
          }
        }
      }
    }
  }
  if (!active) return;

#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, offset);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, offset);
  }
  const int r_lo = row0 + group, r_hi = row0 + group + 8;
  const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
  T* out = static_cast<T*>(p.out);
  const int64_t row_stride = p.heads * D;
  T* out_lo = out + (static_cast<int64_t>(b) * q_len + r_lo) * row_stride + h * D + 2 * quad;
  T* out_hi = out + (static_cast<int64_t>(b) * q_len + r_hi) * row_stride + h * D + 2 * quad;
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) {
    if (r_lo < q_len) *reinterpret_cast<uint32_t*>(out_lo + n * 8) = Pack<T>::two(o[n][0] * inv_lo, o[n][1] * inv_lo);
    if (r_hi < q_len) *reinterpret_cast<uint32_t*>(out_hi + n * 8) = Pack<T>::two(o[n][2] * inv_hi, o[n][3] * inv_hi);
  }
  if (quad == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + h) * q_len;
    if (r_lo < q_len) lse[r_lo] = (m_lo + log2f(l_lo)) * kLn2;
    if (r_hi < q_len) lse[r_hi] = (m_hi + log2f(l_hi)) * kLn2;
  }
}

// How one call is launched: which instantiation, grid, threads per block, dynamic shared memory.
struct LaunchPlan {
  void (*kernel)(AttentionParams);
  dim3 grid;
  int threads;
  int smem_bytes;
};

template <typename T, int D, int KEYS, bool STAGED = false>
LaunchPlan plan(const AttentionParams& p, int warps) {
  const int rows_per_block = 16 * warps;
  return {attention_forward_kernel<T, D, KEYS, STAGED>,
          dim3((p.q_len + rows_per_block - 1) / rows_per_block, p.heads, p.batch), 32 * warps,
          (KEYS * kRow<D> + D * kRow<KEYS>) * static_cast<int>(sizeof(T))};
}

template <typename T, int D>
LaunchPlan short_plan(const AttentionParams& p, int warps) {
  return p.kv_len <= kShortMaxKeys / 2 ? plan<T, D, kShortMaxKeys / 2>(p, warps) : plan<T, D, kShortMaxKeys>(p, warps);
}

template <typename T>
LaunchPlan plan_launch(const AttentionParams& p) {
  const int64_t d = p.head_dim;
  if (p.kv_len <= kShortMaxKeys && (d == 64 || d == 72 || d == 128)) {
    const int warps = static_cast<int>(std::min<int64_t>(kShortMaxWarps, (p.q_len + 15) / 16));
    if (d == 64) return short_plan<T, 64>(p, warps);
    if (d == 72) return short_plan<T, 72>(p, warps);
    return short_plan<T, 128>(p, warps);
  }
  TORCH_CHECK(d == 64, "attention_fwd (cuda): head_dim must be 64, 72 or 128 for kv length <= ", kShortMaxKeys,
              " and 64 for longer sequences; got head_dim ", d, " with kv length ", p.kv_len);
  static_assert(kTiledKeys * (64 / 8) % (32 * kTiledWarps) == 0, "tiles split evenly over the threads");
  return plan<T, 64, kTiledKeys, true>(p, kTiledWarps);
}

// plan_launch for q's dtype (bf16 or fp16, as prepare_cuda_attention checks).
LaunchPlan plan_launch(const at::Tensor& q, const AttentionParams& p) {
  return q.scalar_type() == at::kBFloat16 ? plan_launch<__nv_bfloat16>(p) : plan_launch<__half>(p);
}

bool rows_aligned(const at::Tensor& t) {
  const auto address = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return address % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

// prepare_attention for the kernels: checks the dtype and replaces inputs whose rows are not
// 16-byte chunks by copies (head dims are multiples of 8; a fresh copy is aligned even where the
// input was a contiguous view at an odd offset). The caller keeps q, k, v alive until the kernel
// has run: the params point into them.
std::tuple<at::Tensor, at::Tensor, AttentionParams> prepare_cuda_attention(at::Tensor& q, at::Tensor& k, at::Tensor& v,
                                                                           double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "attention_fwd (cuda): dtype must be bfloat16 or float16, got ", q.scalar_type());
  for (at::Tensor* t : {&q, &k, &v}) {
    if (t->dim() == 4 && !rows_aligned(*t)) *t = t->clone(at::MemoryFormat::Contiguous);
  }
  return prepare_attention(q, k, v, scale);
}

}  // namespace
}  // namespace softvq_fast::cuda
