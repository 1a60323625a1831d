// CPU soft-VQ forward and backward, written once and compiled per instruction set.
//
// A translation unit defines SOFTVQ_CPU_ISA (the namespace: portable, avx2, avx512), enables the
// matching target and CPU_CAPABILITY_* macros, includes the torch headers it needs, then this
// file, so that at::vec::Vectorized<float> is 8 or 16 lanes wide here.
//
// No tokens x codes tensor exists: work is split into tasks that each own a block of rows (forward,
// grad z) or a block of codes (column sums, grad codebook) and walk the other axis in blocks of
// kBlock codes / kRows rows. Per step, scores for kRows rows x kBlock codes are computed as
// broadcast-z x codebook-column FMAs (vectorised along codes) into a 2 KiB tile, exponentiated in
// place, and folded into the running state: online softmax (max logit, sums, entropy sum) and
// accumulators of dim Dp (vectorised along the code dimension).
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including soft_vq_kernel.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "cpu/fast_exp.h"
#include "cpu/register_block.h"

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kRows = 4;        // rows per register block
constexpr int64_t kBlock = kSoftVQCodeBlock;  // codes per step, a multiple of kLanes
constexpr int64_t kRowTask = 32;    // rows per row task, a multiple of kRows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();

// exp of very negative arguments yields denormals, which x86 handles in microcode (tens of times
// slower); flushing them to zero changes no result above 1e-38.
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline float hsum(const Vec& v) {
  float t[kLanes];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += t[i];
  return s;
}

inline float hmax(const Vec& v) {  // NaN wins, as in torch.max
  float t[kLanes];
  v.store(t);
  float m = t[0];
  for (int64_t i = 1; i < kLanes; ++i) m = (t[i] > m || std::isnan(t[i])) ? t[i] : m;
  return m;
}

// Most vectors per register block: kRows x kMaxVecs accumulators (or held rows) plus the operands
// fit the 32 registers of AVX-512 (4 x 4) and the 16 of AVX2 (4 x 3; 4 x 4 spilled there).
constexpr int kMaxVecs = kLanes >= 16 ? 4 : 3;

// Calls f(std::integral_constant<int, NV>, x0) over [0, width) in blocks of NV <= kMaxVecs vectors
// (width a multiple of kLanes; next_block_vectors).
template <typename F>
inline void over_vector_blocks(int64_t width, F&& f) {
  for (int64_t x0 = 0, left = width / kLanes; left > 0;) {
    const int64_t step = next_block_vectors(left, kMaxVecs);
    switch (step) {
      case 4: if constexpr (kMaxVecs >= 4) f(std::integral_constant<int, 4>{}, x0); break;
      case 3: f(std::integral_constant<int, 3>{}, x0); break;
      case 2: f(std::integral_constant<int, 2>{}, x0); break;
      default: f(std::integral_constant<int, 1>{}, x0); break;
    }
    x0 += step * kLanes;
    left -= step;
  }
}

// s[r * kBlock + j] = sum_{d < D} rows[r * Dp + d] * et[d * Kp + j], kRows rows x kBlock codes.
inline void scores(const float* rows, int64_t Dp, int64_t D, const float* et, int64_t Kp, float* s) {
  over_vector_blocks(kBlock, [&](auto nv, int64_t j0) {
    register_block<Vec, kRows, decltype(nv)::value>(rows, Dp, et + j0, Kp, D, s + j0, kBlock, Into::kOverwrite);
  });
}

// acc[r * Dp + :] += sum_{j < n} w[r * kBlock + j] * e[j * Dp + :] for the kRows rows, the block's
// sum formed on its own, then added (two-level summation, see Into::kAddSum).
inline void weighted_codes(const float* w, const float* e, int64_t Dp, int64_t n, float* acc) {
  over_vector_blocks(Dp, [&](auto nv, int64_t d0) {
    register_block<Vec, kRows, decltype(nv)::value>(w, kBlock, e + d0, Dp, n, acc + d0, Dp, Into::kAddSum);
  });
}

// acc[j * Dp + :] += sum_r w[r * kBlock + j] * rows[r * Dp + :] for j < n (codes gather rows).
inline void weighted_rows(const float* w, const float* rows, int64_t Dp, int64_t n, float* acc) {
  over_vector_blocks(Dp, [&](auto nv, int64_t d0) {
    constexpr int NV = decltype(nv)::value;
    Vec g[kRows][NV];
    for (int64_t r = 0; r < kRows; ++r)
      for (int v = 0; v < NV; ++v) g[r][v] = Vec::loadu(rows + r * Dp + d0 + v * kLanes);
    for (int64_t j = 0; j < n; ++j) {
      for (int v = 0; v < NV; ++v) {
        Vec a = Vec::loadu(acc + j * Dp + d0 + v * kLanes);
        for (int64_t r = 0; r < kRows; ++r) a = at::vec::fmadd(Vec(w[r * kBlock + j]), g[r][v], a);
        a.store(acc + j * Dp + d0 + v * kLanes);
      }
    }
  });
}

// Rows [first, first + kRows) of a (rows x Dp) matrix, or a zero-padded copy in `tile` at the end.
inline const float* row_block(const float* base, int64_t first, int64_t total, int64_t Dp, std::vector<float>& tile) {
  if (first + kRows <= total) return base + first * Dp;
  std::fill(tile.begin(), tile.end(), 0.f);
  std::memcpy(tile.data(), base + first * Dp, sizeof(float) * (total - first) * Dp);
  return tile.data();
}

struct RowState {
  float m = kNegInf;  // max logit so far
  float l = 0.f;      // sum exp((s - m) / tau)
  float lt = 0.f;     // sum exp((s - m) / T)
  float ent = 0.f;    // sum exp((s - m) / T) * (s - m) / T
  int64_t best = 0;
};

// Folds one row of kBlock scores (n valid) into the state; leaves exp((s - m_new) / tau) in s and
// returns the factor by which earlier accumulations must be rescaled.
inline float forward_row(float* s, int64_t n, int64_t k0, RowState& st, float inv_tau, float inv_t,
                         const SoftVQForwardOut& out) {
  for (int64_t j = n; j < kBlock; ++j) s[j] = kNegInf;
  Vec mx(kNegInf);
  for (int64_t j = 0; j < kBlock; j += kLanes) mx = at::vec::maximum(mx, Vec::loadu(s + j));
  const float block_max = hmax(mx);
  const float m_new = std::isnan(block_max) ? block_max : std::max(st.m, block_max);
  const Vec mv(m_new);
  if (out.with_stats && block_max > st.m) st.best = k0 + (std::find(s, s + n, block_max) - s);
  if (out.with_entropy) {
    const float shift = st.lt > 0.f ? (st.m - m_new) * inv_t : 0.f;
    const Vec it(inv_t), low(kLowest);
    Vec sw(0.f), swx(0.f);
    for (int64_t j = 0; j < kBlock; j += kLanes) {
      const Vec x = at::vec::maximum((Vec::loadu(s + j) - mv) * it, low);  // padding: -inf -> lowest
      const Vec w = fast_exp(x);
      sw = sw + w;
      swx = at::vec::fmadd(w, x, swx);
    }
    const float alpha_t = std::exp((st.m - m_new) * inv_t);
    st.ent = alpha_t * (st.ent + st.lt * shift) + hsum(swx);
    st.lt = st.lt * alpha_t + hsum(sw);
  }
  const Vec itau(inv_tau);
  Vec sp(0.f);
  for (int64_t j = 0; j < kBlock; j += kLanes) {
    const Vec p = fast_exp((Vec::loadu(s + j) - mv) * itau);
    p.store(s + j);
    sp = sp + p;
  }
  const float alpha = std::exp((st.m - m_new) * inv_tau);
  st.l = st.l * alpha + hsum(sp);
  st.m = m_new;
  return alpha;
}

void forward_rows(const SoftVQProblem& p, const SoftVQForwardOut& out, int64_t c, int64_t r0, int64_t r1) {
  const int64_t Dp = p.Dp, rows = r1 - r0;
  const float* z = p.z + (c * p.M + r0) * Dp;
  const float* e = p.codebook + c * p.Kp * Dp;
  const float* et = p.codebook_t + c * Dp * p.Kp;
  std::vector<float> acc(kRowTask * Dp, 0.f), tile(kRows * Dp), s(kRows * kBlock);
  RowState st[kRowTask];
  for (int64_t k0 = 0; k0 < p.K; k0 += kBlock) {
    const int64_t n = std::min(kBlock, p.K - k0);
    for (int64_t rr = 0; rr < rows; rr += kRows) {
      scores(row_block(z, rr, rows, Dp, tile), Dp, p.D, et + k0, p.Kp, s.data());
      for (int64_t r = 0; r < kRows; ++r) {
        const Vec alpha(forward_row(s.data() + r * kBlock, n, k0, st[rr + r], p.inv_tau, p.inv_t, out));
        float* a = acc.data() + (rr + r) * Dp;
        for (int64_t d = 0; d < Dp; d += kLanes) (Vec::loadu(a + d) * alpha).store(a + d);
      }
      weighted_codes(s.data(), e + k0 * Dp, Dp, n, acc.data() + rr * Dp);
    }
  }
  const int64_t CM = p.C * p.M;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = c * p.M + r0 + r;
    const Vec inv_l(1.f / st[r].l);
    for (int64_t d = 0; d < Dp; d += kLanes) (Vec::loadu(acc.data() + r * Dp + d) * inv_l).store(out.z_q + row * Dp + d);
    out.row_stats[row] = st[r].m;
    out.row_stats[CM + row] = std::log(st[r].l);
    if (out.with_stats) out.indices[row] = st[r].best;
    if (out.with_entropy) {
      const float log_t = std::log(st[r].lt);
      out.row_stats[2 * CM + row] = log_t;
      out.row_stats[3 * CM + row] = log_t - st[r].ent / st[r].lt;
    }
  }
}

// Calls f(s, rows_z, first_row) for every kRows-row block of codebook c's rows, with s the
// kRows x kBlock scores against codes [k0, k0 + kBlock). Rows past M are zero.
template <typename F>
void scan_rows(const SoftVQProblem& p, int64_t c, int64_t k0, std::vector<float>& tile, std::vector<float>& s, F&& f) {
  const float* z = p.z + c * p.M * p.Dp;
  const float* et = p.codebook_t + c * p.Dp * p.Kp + k0;
  for (int64_t rr = 0; rr < p.M; rr += kRows) {
    scores(row_block(z, rr, p.M, p.Dp, tile), p.Dp, p.D, et, p.Kp, s.data());
    f(rr);
  }
}

void column_sums(const SoftVQProblem& p, const SoftVQForwardOut& out, int64_t c, int64_t k0) {
  const int64_t CM = p.C * p.M;
  std::vector<float> tile(kRows * p.Dp), s(kRows * kBlock), total(kBlock, 0.f);
  const Vec it(p.inv_t);
  scan_rows(p, c, k0, tile, s, [&](int64_t rr) {
    for (int64_t r = 0; r < std::min(kRows, p.M - rr); ++r) {
      const int64_t row = c * p.M + rr + r;
      const Vec m(out.row_stats[row]), inv_lt(std::exp(-out.row_stats[2 * CM + row]));
      for (int64_t j = 0; j < kBlock; j += kLanes) {
        const Vec q = fast_exp((Vec::loadu(s.data() + r * kBlock + j) - m) * it) * inv_lt;
        (Vec::loadu(total.data() + j) + q).store(total.data() + j);
      }
    }
  });
  std::memcpy(out.column_sum + c * p.Kp + k0, total.data(), sizeof(float) * kBlock);
}

void grad_z_rows(const SoftVQProblem& p, const SoftVQBackwardIn& b, int64_t c, int64_t r0, int64_t r1) {
  const int64_t Dp = p.Dp, rows = r1 - r0, CM = p.C * p.M;
  const float* z = p.z + (c * p.M + r0) * Dp;
  const float* g = b.grad_z_q + (c * p.M + r0) * Dp;
  const float* e = p.codebook + c * p.Kp * Dp;
  const float* et = p.codebook_t + c * Dp * p.Kp;
  std::vector<float> acc(kRowTask * Dp, 0.f), q_acc(kRowTask * Dp, 0.f), z_tile(kRows * Dp), g_tile(kRows * Dp);
  std::vector<float> s(kRows * kBlock), sg(kRows * kBlock), qs(kRows * kBlock);
  // per row: max logit, log-sums, entropy, grad of entropy, g . z_q, sum_j q_j G_j
  float m[kRowTask] = {}, log_l[kRowTask] = {}, log_t[kRowTask] = {}, h[kRowTask] = {}, gh[kRowTask] = {};
  float g_zq[kRowTask] = {}, q_gc[kRowTask] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = c * p.M + r0 + r;
    m[r] = b.row_stats[row];
    log_l[r] = b.row_stats[CM + row];
    log_t[r] = b.row_stats[2 * CM + row];
    h[r] = b.row_stats[3 * CM + row];
    gh[r] = b.grad_row_entropy[row];
    for (int64_t d = 0; d < p.D; ++d) g_zq[r] += g[r * Dp + d] * b.z_q[row * Dp + d];
  }
  const Vec itau(p.inv_tau), it(p.inv_t);
  for (int64_t k0 = 0; k0 < p.K; k0 += kBlock) {
    const int64_t n = std::min(kBlock, p.K - k0);
    const float* gc = b.grad_column_sum + c * p.Kp + k0;
    for (int64_t rr = 0; rr < rows; rr += kRows) {
      scores(row_block(z, rr, rows, Dp, z_tile), Dp, p.D, et + k0, p.Kp, s.data());
      scores(row_block(g, rr, rows, Dp, g_tile), Dp, p.D, et + k0, p.Kp, sg.data());
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t i = rr + r;
        const Vec mv(m[i]), inv_l(std::exp(-log_l[i])), inv_lt(std::exp(-log_t[i])), lt(log_t[i]), hv(h[i]);
        const Vec ghv(gh[i]), gz(g_zq[i]);
        std::fill(s.data() + r * kBlock + n, s.data() + (r + 1) * kBlock, kNegInf);  // padding: q = 0
        Vec qg(0.f);
        for (int64_t j = 0; j < kBlock; j += kLanes) {
          const int64_t at = r * kBlock + j;
          const Vec shifted = Vec::loadu(s.data() + at) - mv;
          Vec ds = fast_exp(shifted * itau) * inv_l * (Vec::loadu(sg.data() + at) - gz) * itau;
          if (b.with_entropy) {
            const Vec log_q = shifted * it - lt;
            const Vec q = fast_exp(shifted * it) * inv_lt;
            const Vec gcv = Vec::loadu(gc + j);
            ds = ds + q * (gcv - ghv * (log_q + hv)) * it;
            q.store(qs.data() + at);
            qg = at::vec::fmadd(q, gcv, qg);
          }
          ds.store(s.data() + at);
        }
        q_gc[i] += hsum(qg);
      }
      weighted_codes(s.data(), e + k0 * Dp, Dp, n, acc.data() + rr * Dp);
      if (b.with_entropy) weighted_codes(qs.data(), e + k0 * Dp, Dp, n, q_acc.data() + rr * Dp);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Vec correction(q_gc[r] * p.inv_t);
    float* out = b.grad_z + (c * p.M + r0 + r) * Dp;
    for (int64_t d = 0; d < Dp; d += kLanes) {
      const Vec a = Vec::loadu(acc.data() + r * Dp + d);
      (b.with_entropy ? a - correction * Vec::loadu(q_acc.data() + r * Dp + d) : a).store(out + d);
    }
  }
}

void grad_codebook_codes(const SoftVQProblem& p, const SoftVQBackwardIn& b, int64_t c, int64_t k0) {
  const int64_t Dp = p.Dp, CM = p.C * p.M;
  const float* g = b.grad_z_q + c * p.M * Dp;
  std::vector<float> tile(kRows * Dp), g_tile(kRows * Dp), s(kRows * kBlock), acc(kBlock * Dp, 0.f);
  const Vec itau(p.inv_tau);
  scan_rows(p, c, k0, tile, s, [&](int64_t rr) {
    for (int64_t r = 0; r < std::min(kRows, p.M - rr); ++r) {
      const int64_t row = c * p.M + rr + r;
      const Vec m(b.row_stats[row]), inv_l(std::exp(-b.row_stats[CM + row]));
      for (int64_t j = 0; j < kBlock; j += kLanes) {
        float* at = s.data() + r * kBlock + j;
        (fast_exp((Vec::loadu(at) - m) * itau) * inv_l).store(at);
      }
    }
    weighted_rows(s.data(), row_block(g, rr, p.M, Dp, g_tile), Dp, std::min(kBlock, p.K - k0), acc.data());
  });
  std::memcpy(b.grad_codebook + (c * p.Kp + k0) * Dp, acc.data(), sizeof(float) * kBlock * Dp);
}

// Runs f(c, first, last) over (codebook, block) tasks of `block` items out of `items`, in parallel.
template <typename F>
void parallel_tasks(int64_t C, int64_t items, int64_t block, F&& f) {
  const int64_t per_codebook = (items + block - 1) / block;
  at::parallel_for(0, C * per_codebook, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / per_codebook, first = (t % per_codebook) * block;
      f(c, first, std::min(first + block, items));
    }
  });
}

}  // namespace

void soft_vq_forward(const SoftVQProblem& p, const SoftVQForwardOut& out) {
  parallel_tasks(p.C, p.M, kRowTask, [&](int64_t c, int64_t r0, int64_t r1) { forward_rows(p, out, c, r0, r1); });
  if (out.with_entropy)
    parallel_tasks(p.C, p.K, kBlock, [&](int64_t c, int64_t k0, int64_t) { column_sums(p, out, c, k0); });
}

void soft_vq_backward(const SoftVQProblem& p, const SoftVQBackwardIn& b) {
  parallel_tasks(p.C, p.M, kRowTask, [&](int64_t c, int64_t r0, int64_t r1) { grad_z_rows(p, b, c, r0, r1); });
  parallel_tasks(p.C, p.K, kBlock, [&](int64_t c, int64_t k0, int64_t) { grad_codebook_codes(p, b, c, k0); });
}

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
