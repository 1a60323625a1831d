// CPU attention forward, written once and compiled per instruction set.
//
// A translation unit defines SOFTVQ_CPU_ISA (the namespace: portable, avx2, avx512), enables the
// matching target and CPU_CAPABILITY_* macros, includes every torch header it needs, then this
// file, so that at::vec::Vectorized<float> is 8 or 16 lanes wide here without touching the
// code generated for torch's own inline functions.
//
// Work split: one task per (batch, head, block of up to kQueryBlock query rows), run with
// at::parallel_for. A task walks the keys in blocks of kKeyBlock with an online softmax, so memory
// per task is O(kQueryBlock x kKeyBlock) whatever the sequence length. Per key block it packs
// k transposed (D x keys) and v (keys x D, padded to whole vectors) in fp32, then for 4 query rows
// at a time computes scores as broadcast-q x k-vector FMAs (vectorised along keys) and the output
// update as broadcast-p x v-vector FMAs (vectorised along the head dim), in registers.
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including attention_kernel.h"
#endif

#include <ATen/cpu/vec/functional_base.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kRows = 4;          // query rows per register block
// Vectors per register block (along keys or head dim): kRows x kVecs accumulators plus kVecs
// operands fit the 32 registers of AVX-512 and the 16 of AVX2.
constexpr int64_t kVecs = kLanes >= 16 ? 4 : 2;
constexpr int64_t kKeyBlock = 128;    // keys per block: a multiple of kLanes on every ISA
constexpr int64_t kQueryBlock = 128;  // query rows per task
constexpr int64_t kPrefetchRows = 4;  // k/v rows fetched ahead while packing

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows are far apart in the qkv layout (stride 3 * H * D), which the hardware prefetcher does not
// follow: fetch every cache line of a row a few rows ahead.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(scalar_t)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n, float mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

// s[r][j0 : j0 + NV*kLanes] = sum_x q[r][x] * kt[x][j0 : ...] for the kRows rows of q.
template <int64_t NV>
inline void score_block(const float* q, int64_t ldq, const float* kt, int64_t ldk, int64_t head_dim,
                        float* s, int64_t lds, int64_t j0) {
  Vec acc[kRows][NV];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < NV; ++c) acc[r][c] = Vec(0.f);
  for (int64_t x = 0; x < head_dim; ++x) {
    const float* krow = kt + x * ldk + j0;
    Vec kv[NV];
    for (int64_t c = 0; c < NV; ++c) kv[c] = Vec::loadu(krow + c * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec qb(q[r * ldq + x]);
      for (int64_t c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(qb, kv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < NV; ++c) acc[r][c].store(s + r * lds + j0 + c * kLanes);
}

// o[r][d0 : d0 + NV*kLanes] += sum_{j < keys} p[r][j] * v[j][d0 : ...] for the kRows rows.
template <int64_t NV>
inline void value_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t keys,
                        float* o, int64_t ldo, int64_t d0) {
  Vec acc[kRows][NV];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < NV; ++c) acc[r][c] = Vec::loadu(o + r * ldo + d0 + c * kLanes);
  for (int64_t j = 0; j < keys; ++j) {
    Vec vv[NV];
    for (int64_t c = 0; c < NV; ++c) vv[c] = Vec::loadu(v + j * ldv + d0 + c * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec pb(p[r * ldp + j]);
      for (int64_t c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(pb, vv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < NV; ++c) acc[r][c].store(o + r * ldo + d0 + c * kLanes);
}

// Runs `block.template operator()<NV>(offset)` over [0, padded) in steps of kVecs vectors, then
// one narrower step for the remaining whole vectors (padded is a multiple of kLanes).
template <typename Block>
inline void for_vector_blocks(int64_t padded, const Block& block) {
  int64_t x0 = 0;
  for (; x0 + kVecs * kLanes <= padded; x0 += kVecs * kLanes) block.template operator()<kVecs>(x0);
  switch ((padded - x0) / kLanes) {
    case 3: block.template operator()<3>(x0); break;
    case 2: block.template operator()<2>(x0); break;
    case 1: block.template operator()<1>(x0); break;
    default: break;
  }
}

// Online softmax of one row of scores s[0 : padded) (entries past the real keys are -inf):
// turns s into exp(s - m_new), rescales the row's output accumulator, updates max and sum.
inline void softmax_row(float* s, int64_t padded, float* o, int64_t dpad, float& m, float& l) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < padded; j += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  const float block_max = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  const float m_new = std::max(m, block_max);
  const Vec vm(m_new);
  Vec vsum(0.f);
  for (int64_t j = 0; j < padded; j += kLanes) {
    const Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  const float block_sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  if (m != m_new) {
    const float correction = std::exp(m - m_new);  // 0 on the first block (m = -inf)
    const Vec vc(correction);
    for (int64_t x = 0; x < dpad; x += kLanes) (Vec::loadu(o + x) * vc).store(o + x);
    l *= correction;
  }
  l += block_sum;
  m = m_new;
}

template <typename scalar_t>
void forward(const AttentionParams& p) {
  const int64_t D = p.head_dim, Sq = p.q_len, Sk = p.kv_len;
  const int64_t dpad = round_up(D, kLanes);
  const int64_t q_blocks = (Sq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = p.batch * p.heads * q_blocks;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_cap = round_up(std::min(Sq, kQueryBlock), kRows);
    std::vector<float> qbuf(rows_cap * dpad, 0.f), obuf(rows_cap * dpad), kt(D * kKeyBlock),
        vbuf(kKeyBlock * dpad, 0.f), sbuf(kRows * kKeyBlock), mrow(rows_cap), lrow(rows_cap);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks, bh = task / q_blocks, h = bh % p.heads, b = bh / p.heads;
      const int64_t i0 = qb * kQueryBlock, rows = std::min(kQueryBlock, Sq - i0);
      const int64_t rows_pad = round_up(rows, kRows);
      const scalar_t* qh = q + b * p.q_stride[0] + h * p.q_stride[2];
      const scalar_t* kh = k + b * p.k_stride[0] + h * p.k_stride[2];
      const scalar_t* vh = v + b * p.v_stride[0] + h * p.v_stride[2];
      for (int64_t i = 0; i < rows; ++i) {
        if (i + kPrefetchRows < rows) prefetch_row(qh + (i0 + i + kPrefetchRows) * p.q_stride[1], D);
        to_float(qh + (i0 + i) * p.q_stride[1], &qbuf[i * dpad], D, p.scale);
      }
      std::fill(qbuf.begin() + rows * dpad, qbuf.begin() + rows_pad * dpad, 0.f);
      std::fill(obuf.begin(), obuf.begin() + rows_pad * dpad, 0.f);
      std::fill(mrow.begin(), mrow.end(), neg_inf);
      std::fill(lrow.begin(), lrow.end(), 0.f);

      for (int64_t j0 = 0; j0 < Sk; j0 += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, Sk - j0);
        const int64_t keys_pad = round_up(keys, kLanes);
        // Pack this key block: kt[x][j] = k[j0 + j][x], vbuf[j][x] = v[j0 + j][x].
        for (int64_t j = 0; j < keys; ++j) {
          if (j + kPrefetchRows < keys) {
            prefetch_row(kh + (j0 + j + kPrefetchRows) * p.k_stride[1], D);
            prefetch_row(vh + (j0 + j + kPrefetchRows) * p.v_stride[1], D);
          }
          const scalar_t* krow = kh + (j0 + j) * p.k_stride[1];
          for (int64_t x = 0; x < D; ++x) kt[x * kKeyBlock + j] = static_cast<float>(krow[x]);
          to_float(vh + (j0 + j) * p.v_stride[1], &vbuf[j * dpad], D, 1.f);
        }
        for (int64_t x = 0; x < D; ++x) std::fill(&kt[x * kKeyBlock + keys], &kt[x * kKeyBlock + keys_pad], 0.f);

        for (int64_t r0 = 0; r0 < rows_pad; r0 += kRows) {
          for_vector_blocks(keys_pad, [&]<int64_t NV>(int64_t jc) {
            score_block<NV>(&qbuf[r0 * dpad], dpad, kt.data(), kKeyBlock, D, sbuf.data(), kKeyBlock, jc);
          });
          for (int64_t r = 0; r < kRows; ++r) {
            float* srow = &sbuf[r * kKeyBlock];
            std::fill(srow + keys, srow + keys_pad, neg_inf);
            softmax_row(srow, keys_pad, &obuf[(r0 + r) * dpad], dpad, mrow[r0 + r], lrow[r0 + r]);
          }
          for_vector_blocks(dpad, [&]<int64_t NV>(int64_t d0) {
            value_block<NV>(sbuf.data(), kKeyBlock, vbuf.data(), dpad, keys, &obuf[r0 * dpad], dpad, d0);
          });
        }
      }

      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.f / lrow[i];
        scalar_t* orow = out + ((b * Sq + i0 + i) * p.heads + h) * D;
        for (int64_t x = 0; x < D; ++x) orow[x] = static_cast<scalar_t>(obuf[i * dpad + x] * inv);
        p.lse[(b * p.heads + h) * Sq + i0 + i] = mrow[i] + std::log(lrow[i]);
      }
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p, Precision precision) {
  if (precision == Precision::kBFloat16) {
    forward<c10::BFloat16>(p);
  } else {
    forward<float>(p);
  }
}

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
