// CPU attention forward, written once and compiled per instruction set.
//
// A translation unit defines SOFTVQ_CPU_ISA (the namespace: portable, avx2, avx512), enables the
// matching target and CPU_CAPABILITY_* macros, includes every torch header it needs, then this
// file, so that at::vec::Vectorized<float> is 8 or 16 lanes wide here without touching the
// code generated for torch's own inline functions.
//
// Work split: at::parallel_for over (batch, head) and, when there are fewer heads than threads,
// ranges of query blocks. A task packs its head's k transposed (D x keys) and v (keys x D, padded
// to whole vectors) in fp32 once, then walks blocks of kQueryBlock query rows and, for each, the
// keys in one block while they fit in L2, else in L1-sized blocks with an online softmax
// (forward_key_block): no S x S buffer, O(S x D) per thread. For
// kRows query rows at a time it computes scores as broadcast-q x k-vector FMAs (vectorised along
// keys) and the output update as broadcast-p x v-vector FMAs (vectorised along the head dim), in
// registers.
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including attention_kernel.h"
#endif

#include <ATen/cpu/vec/functional_base.h>

#include "cpu/register_block.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Query rows and vectors (along keys or head dim) per register block: kRows x kVecs accumulators
// plus kVecs operands and a broadcast fit the 32 registers of AVX-512 (8 x 3) and exactly the 16
// of AVX2 (4 x 3). Eight rows halve the operand loads per FMA and keep 16 or more FMAs in flight on
// AVX-512 even for two-vector blocks (32 keys). On AVX2, 12 accumulators instead of 4 x 2 = 8 cover
// the FMA latency of two pipes (latency x pipes independent FMAs must be in flight). kRows divides
// kLanes: the backward reads kRows columns of P at a time.
constexpr int64_t kRows = kLanes >= 16 ? 8 : 4;
constexpr int64_t kVecs = 3;
constexpr int64_t kKeyBlock = 128;    // most keys per L1-sized block: a multiple of kLanes on every ISA
// Keys per block: all of a short sequence (one softmax pass); for longer ones few enough that
// the packed k and v of a block (2 x keys x dpad floats) stay within 32 KiB, read from L1 by
// every group of kRows query rows.
inline int64_t key_block(int64_t keys, int64_t dpad) {
  return keys <= kKeyBlock ? keys : std::clamp<int64_t>(4096 / dpad / 16 * 16, 16, kKeyBlock);
}
// The forward takes all keys in one block (one softmax pass, no rescaling, the longest products)
// while the packed k and v (2 x keys x dpad floats) stay within this, resident in L2 and read
// from there by every group of kRows query rows. Past this bound they would spill out of L2 and
// key_block's smaller blocks are better; the bound leaves room for CPUs with 1 MiB of L2 a core.
constexpr int64_t kSingleBlockBytes = 768 * 1024;
inline int64_t forward_key_block(int64_t keys, int64_t dpad) {
  return 2 * keys * dpad * static_cast<int64_t>(sizeof(float)) <= kSingleBlockBytes ? keys : key_block(keys, dpad);
}
constexpr int64_t kQueryBlock = 128;  // query rows per task

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(CPU_CAPABILITY_AVX512)
// Eight floats in a 256-bit register: the last half vector of a head dim of 4.5 AVX-512 vectors
// (72). Zen 4 executes it at half the cost of a 512-bit FMA; padding to 80 would spend a full one.
struct HalfVec {
  __m256 v;
  HalfVec() = default;
  explicit HalfVec(float x) : v(_mm256_set1_ps(x)) {}
  explicit HalfVec(__m256 x) : v(x) {}
  static HalfVec loadu(const float* p) { return HalfVec(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  HalfVec operator+(const HalfVec& o) const { return HalfVec(_mm256_add_ps(v, o.v)); }
  static HalfVec fmadd(const HalfVec& a, const HalfVec& b, const HalfVec& c) {
    return HalfVec(_mm256_fmadd_ps(a.v, b.v, c.v));
  }
};
constexpr int64_t kHalfLanes = 8;
#else
using HalfVec = NoHalf;
constexpr int64_t kHalfLanes = 0;  // no half vectors: widths are padded to whole vectors
#endif

template <int64_t kFull, bool kAColumns>
inline void register_block_with_half(bool half, const float* a, int64_t lda, const float* b, int64_t ldb,
                                     int64_t depth, float* c, int64_t ldc, Into into) {
  if constexpr (kHalfLanes > 0) {
    if (half) return register_block<Vec, kRows, kFull, kAColumns, HalfVec>(a, lda, b, ldb, depth, c, ldc, into);
  }
  register_block<Vec, kRows, kFull, kAColumns>(a, lda, b, ldb, depth, c, ldc, into);
}

// c[r][0 : width] = (accumulate ? c[r][...] : 0) + a[r][0 : depth] . b[0 : depth][0 : width] for
// kRows rows (a's rows stored as columns with kAColumns), in register blocks of at most kVecs
// vectors (next_block_vectors). A width of whole vectors and a half (kHalfLanes) ends with a half
// vector in the last block; any other width is rounded up to whole vectors (b and c must have
// those columns).
template <bool kAColumns = false>
inline void rows_times_matrix(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c,
                              int64_t ldc, int64_t width, bool accumulate) {
  const Into into = accumulate ? Into::kAccumulate : Into::kOverwrite;
  const bool half = kHalfLanes > 0 && width > kLanes && width % kLanes == kHalfLanes;
  for (int64_t x0 = 0, left = half ? width / kLanes + 1 : (width + kLanes - 1) / kLanes; left > 0;) {
    const int64_t step = next_block_vectors(left, kVecs);
    const bool with_half = half && step == left;  // the last block takes the half vector
    switch (step - with_half) {
      case 3: register_block_with_half<3, kAColumns>(with_half, a, lda, b + x0, ldb, depth, c + x0, ldc, into); break;
      case 2: register_block_with_half<2, kAColumns>(with_half, a, lda, b + x0, ldb, depth, c + x0, ldc, into); break;
      default: register_block_with_half<1, kAColumns>(with_half, a, lda, b + x0, ldb, depth, c + x0, ldc, into); break;
    }
    x0 += (step - with_half) * kLanes;
    left -= step;
  }
}

// Online softmax of kRows rows of scaled scores s[r * lds + 0 : padded): masks those at or past
// `keys`, turns them into exp(s - m_new), and updates each row's running max m[r] and sum l[r]. On
// the first key block m and l start afresh; on later ones the rows' output accumulators o[r * dpad]
// are rescaled to the new max. The rows are walked together so that their max, exp and sum chains
// overlap instead of waiting on each other's horizontal reductions.
inline void softmax_rows(float* s, int64_t lds, int64_t keys, int64_t padded, bool first, float* o, int64_t dpad,
                         float* m, float* l) {
  Vec vmax[kRows], vsum[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    std::fill(s + r * lds + keys, s + r * lds + padded, -std::numeric_limits<float>::infinity());
    vmax[r] = Vec(-std::numeric_limits<float>::infinity());
    vsum[r] = Vec(0.f);
  }
  for (int64_t j = 0; j < padded; j += kLanes)
    for (int64_t r = 0; r < kRows; ++r) vmax[r] = at::vec::maximum(vmax[r], Vec::loadu(s + r * lds + j));
  float m_new[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    const float block_max =
        at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax[r]);
    m_new[r] = first ? block_max : std::max(m[r], block_max);
    vmax[r] = Vec(m_new[r]);
  }
  for (int64_t j = 0; j < padded; j += kLanes) {
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec e = (Vec::loadu(s + r * lds + j) - vmax[r]).exp_u20();
      e.store(s + r * lds + j);
      vsum[r] = vsum[r] + e;
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    if (first) {
      l[r] = 0.f;
    } else if (m[r] != m_new[r]) {
      const float correction = std::exp(m[r] - m_new[r]);
      const Vec vc(correction);
      for (int64_t x = 0; x < dpad; x += kLanes) (Vec::loadu(o + r * dpad + x) * vc).store(o + r * dpad + x);
      l[r] *= correction;
    }
    l[r] += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum[r]);
    m[r] = m_new[r];
  }
}

// lse[i] = m[i] + log(l[i]) for i < n.
inline void store_log_sum_exp(const float* m, const float* l, int64_t n, float* lse) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t count = std::min(kLanes, n - i);
    (Vec::loadu(m + i, count) + Vec::loadu(l + i, count).log()).store(lse + i, count);
  }
}

// Packs the keys of one head: kt[x][j] = k[j][x] * scale (row stride ldk, zero past `keys`; the
// softmax scale is folded in here). bfloat16 rows are converted into `scratch` (keys x dpad floats)
// before the transpose.
// rows x cols of src (row stride lds) into dst (row stride ldd) transposed, each dst row zero from
// column `rows` to ldd.
inline void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  at::vec::transpose_mxn<float>(src, lds, dst, ldd, rows, cols);
  for (int64_t j = 0; j < cols; ++j) std::fill(dst + j * ldd + rows, dst + (j + 1) * ldd, 0.f);
}

template <typename scalar_t>
void pack_keys(const scalar_t* kh, int64_t k_row, int64_t keys, int64_t head_dim, float scale, float* kt,
               int64_t ldk, float* scratch, int64_t dpad) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    transpose_block(kh, k_row, keys, head_dim, kt, ldk);
  } else {
    for (int64_t j = 0; j < keys; ++j) to_float(kh + j * k_row, scratch + j * dpad, head_dim);
    transpose_block(scratch, dpad, keys, head_dim, kt, ldk);
  }
  const Vec vscale(scale);
  for (int64_t x = 0; x < head_dim; ++x) {
    float* row = kt + x * ldk;
    for (int64_t j = 0; j < keys; j += kLanes) (Vec::loadu(row + j) * vscale).store(row + j);
  }
}

// Packs the values of one head: v[j][x] (row stride dpad; vbuf comes zeroed and only the first
// head_dim columns are written, so it stays zero past the head dim).
template <typename scalar_t>
void pack_values(const scalar_t* vh, int64_t v_row, int64_t keys, int64_t head_dim, float* vbuf, int64_t dpad) {
  for (int64_t j = 0; j < keys; ++j) to_float(vh + j * v_row, vbuf + j * dpad, head_dim);
}

// Asks for the cache lines of `count` rows (row stride ld, `width` elements each), in a writable
// state if kWrite. One head's rows lie a page or more apart (the heads are interleaved), which the
// hardware prefetchers do not follow, so each row otherwise waits for its lines when first read or
// written, which at short sequences is a visible share of the forward.
template <bool kWrite, typename scalar_t>
inline void prefetch_rows(const scalar_t* first, int64_t ld, int64_t count, int64_t width) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t r = 0; r < count; ++r) {
    const char* row = reinterpret_cast<const char*>(first + r * ld);
    for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(row + byte, kWrite ? 1 : 0, 3);
    __builtin_prefetch(row + bytes - 1, kWrite ? 1 : 0, 3);
  }
}

template <typename scalar_t>
void forward(const AttentionParams& p) {
  const int64_t D = p.head_dim, Sq = p.q_len, Sk = p.kv_len;
  const int64_t dpad = round_up(D, kLanes), ldk = round_up(Sk, kLanes), block_keys = forward_key_block(Sk, dpad);
  const int64_t lds = round_up(block_keys, kLanes);  // row stride of the scores
  const int64_t q_blocks = (Sq + kQueryBlock - 1) / kQueryBlock;
  // Split a head's query blocks over tasks only as far as needed to keep every thread busy: each
  // task packs the head's keys and values once.
  const int64_t heads = p.batch * p.heads;
  const int64_t splits = std::clamp<int64_t>((2 * at::get_num_threads() + heads - 1) / heads, 1, q_blocks);
  const int64_t blocks_per_task = (q_blocks + splits - 1) / splits;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  // float32 q rows are read in place (in groups of kRows whole rows), bfloat16 ones converted
  // into a buffer first. k is packed (transposed) once per task, and so is v unless it is float32
  // with at most kKeyBlock keys and each row's dpad floats lie within v: read in place then, which
  // saves more than its strided rows cost (with more keys they cost more). Past a head
  // dim that is not whole vectors that reads the next head's values into o's padding columns,
  // which only feed the padding columns of the output rows, never written out.
  constexpr bool kInPlace = std::is_same_v<scalar_t, float>;

  at::parallel_for(0, heads * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_cap = round_up(std::min(Sq, kQueryBlock), kRows);
    std::vector<float> qbuf(rows_cap * dpad, 0.f), obuf(rows_cap * dpad), kt(D * ldk), vbuf(Sk * dpad, 0.f),
        sbuf(kRows * lds), mrow(rows_cap), lrow(rows_cap);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / splits, h = bh % p.heads, b = bh / p.heads;
      const int64_t block_end = std::min(q_blocks, (task % splits + 1) * blocks_per_task);
      const scalar_t* qh = q + b * p.q_stride[0] + h * p.q_stride[2];
      const scalar_t* vh = v + b * p.v_stride[0] + h * p.v_stride[2];
      pack_keys(k + b * p.k_stride[0] + h * p.k_stride[2], p.k_stride[1], Sk, D, p.scale, kt.data(), ldk, vbuf.data(),
                dpad);
      const float* vmat = vbuf.data();
      int64_t ldv = dpad;
      if constexpr (kInPlace) {
        if (Sk <= kKeyBlock && (D == dpad || (p.v_stride[2] == D && (p.heads - 1 - h) * D >= dpad - D))) {
          vmat = vh;
          ldv = p.v_stride[1];
        }
      }
      if (vmat == vbuf.data()) pack_values(vh, p.v_stride[1], Sk, D, vbuf.data(), dpad);

      for (int64_t qb = task % splits * blocks_per_task; qb < block_end; ++qb) {
        const int64_t i0 = qb * kQueryBlock, rows = std::min(kQueryBlock, Sq - i0);
        const int64_t rows_pad = round_up(rows, kRows);
        const int64_t packed_from = kInPlace ? rows / kRows * kRows : 0;
        for (int64_t i = packed_from; i < rows; ++i) to_float(qh + (i0 + i) * p.q_stride[1], &qbuf[i * dpad], D);
        std::fill(qbuf.begin() + rows * dpad, qbuf.begin() + rows_pad * dpad, 0.f);

        prefetch_rows<true>(out + ((b * Sq + i0) * p.heads + h) * D, p.heads * D, rows, D);
        for (int64_t j0 = 0; j0 < Sk; j0 += block_keys) {
          const int64_t keys = std::min(block_keys, Sk - j0);
          const int64_t keys_pad = round_up(keys, kLanes);
          for (int64_t r0 = 0; r0 < rows_pad; r0 += kRows) {
            const float* qblock = &qbuf[r0 * dpad];
            int64_t ldq = dpad;
            if constexpr (kInPlace) {
              if (r0 < packed_from) {
                qblock = qh + (i0 + r0) * p.q_stride[1];
                ldq = p.q_stride[1];
              }
            }
            // scores (kRows x keys) = q rows . k columns, then softmax, then o += p . v
            rows_times_matrix(qblock, ldq, kt.data() + j0, ldk, D, sbuf.data(), lds, keys_pad, false);
            softmax_rows(sbuf.data(), lds, keys, keys_pad, j0 == 0, &obuf[r0 * dpad], dpad, &mrow[r0], &lrow[r0]);
            rows_times_matrix(sbuf.data(), lds, vmat + j0 * ldv, ldv, keys, &obuf[r0 * dpad], dpad, D, j0 > 0);
          }
        }

        for (int64_t i = 0; i < rows; ++i) {
          const float inv = 1.f / lrow[i];
          scalar_t* orow = out + ((b * Sq + i0 + i) * p.heads + h) * D;
          for (int64_t x = 0; x < D; ++x) orow[x] = static_cast<scalar_t>(obuf[i * dpad + x] * inv);
        }
        store_log_sum_exp(mrow.data(), lrow.data(), rows, p.lse + (b * p.heads + h) * Sq + i0);
      }
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p, Precision precision) {
  precision == Precision::kBFloat16 ? forward<c10::BFloat16>(p) : forward<float>(p);
}

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
