// CPU attention backward, compiled per instruction set right after attention_kernel.h (whose
// helpers it uses, in the same namespace).
//
// With P = exp(q·kᵀ·scale − lse) recomputed from the forward's log-sum-exp and
// delta_i = sum_x dO[i][x] · O[i][x]:
//   dV = Pᵀ·dO,   dS = P ∘ (dO·Vᵀ − delta),   dQ = dS·K·scale,   dK = dSᵀ·Q·scale.
// One task per (batch, head): it packs the head's q, dO (rows), k transposed (scaled), k, v
// transposed in fp32, then walks key blocks; per block it forms P and dS for all query rows (kRows at
// a time, through rows_times_matrix) and accumulates dQ, then dV and dK (rows = keys, read from the
// columns of P and dS without a transposed copy).
// Memory per thread is O(S x D + S x key block), no S x S buffer.
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including attention_backward_kernel.h"
#endif

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

// sum_x a[x] * b[x] over n floats, n a multiple of kLanes.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  for (int64_t x = 0; x < n; x += kLanes) acc = at::vec::fmadd(Vec::loadu(a + x), Vec::loadu(b + x), acc);
  return at::vec::vec_reduce_all<float>([](Vec& u, Vec& w) { return u + w; }, acc);
}

// Rows ahead of the one being read or written whose cache lines are requested (prefetch_rows):
// enough to cover a miss to memory at a few hundred cycles a row.
constexpr int64_t kAhead = 4;

template <typename scalar_t>
void backward(const AttentionGradParams& g) {
  const AttentionParams& p = g.fwd;
  const int64_t D = p.head_dim, Sq = p.q_len, Sk = p.kv_len, H = p.heads;
  const int64_t dpad = round_up(D, kLanes), ldk = round_up(Sk, kLanes), block_keys = key_block(Sk, dpad);
  const int64_t rows_pad = round_up(Sq, kRows), keys_rows = round_up(Sk, kRows);
  const int64_t ldb = round_up(block_keys, kLanes);       // row stride of the P / dS blocks
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* out = static_cast<const scalar_t*>(g.out);
  const auto* grad_out = static_cast<const scalar_t*>(g.grad_out);
  auto* dq = static_cast<scalar_t*>(g.dq);
  auto* dk = static_cast<scalar_t*>(g.dk);
  auto* dv = static_cast<scalar_t*>(g.dv);

  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(rows_pad * dpad, 0.f), gbuf(rows_pad * dpad, 0.f), delta(rows_pad, 0.f),
        lse(rows_pad, 0.f), kt(D * ldk), krows(keys_rows * dpad, 0.f), vt(D * ldk), vrows(Sk * dpad),
        dqacc(rows_pad * dpad), dkacc(keys_rows * dpad), dvacc(keys_rows * dpad), pblock(rows_pad * ldb),
        dsblock(rows_pad * ldb), obuf(dpad, 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, b = task / H;
      const scalar_t* qh = q + b * p.q_stride[0] + h * p.q_stride[2];
      const scalar_t* kh = k + b * p.k_stride[0] + h * p.k_stride[2];
      const scalar_t* vh = v + b * p.v_stride[0] + h * p.v_stride[2];
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t row = (b * Sq + i) * H + h;
        if (i + kAhead < Sq) {
          prefetch_rows<false>(qh + (i + kAhead) * p.q_stride[1], 0, 1, D);
          prefetch_rows<false>(grad_out + (row + kAhead * H) * D, 0, 1, D);
          prefetch_rows<false>(out + (row + kAhead * H) * D, 0, 1, D);
        }
        to_float(qh + i * p.q_stride[1], &qbuf[i * dpad], D);
        to_float(grad_out + row * D, &gbuf[i * dpad], D);
        to_float(out + row * D, obuf.data(), D);
        delta[i] = dot(obuf.data(), &gbuf[i * dpad], dpad);  // both zero past D
        lse[i] = p.lse[(b * H + h) * Sq + i];
      }
      // krows holds k, vrows v (fp32 rows), kt k transposed and scaled (scores come out scaled), vt v
      // transposed.
      for (int64_t j = 0; j < Sk; ++j) {
        if (j + kAhead < Sk) {
          prefetch_rows<false>(kh + (j + kAhead) * p.k_stride[1], 0, 1, D);
          prefetch_rows<false>(vh + (j + kAhead) * p.v_stride[1], 0, 1, D);
        }
        to_float(kh + j * p.k_stride[1], &krows[j * dpad], D);
        to_float(vh + j * p.v_stride[1], &vrows[j * dpad], D);
      }
      pack_keys(krows.data(), dpad, Sk, D, p.scale, kt.data(), ldk, nullptr, dpad);
      transpose_block(vrows.data(), dpad, Sk, D, vt.data(), ldk);
      std::fill(dqacc.begin(), dqacc.end(), 0.f);
      std::fill(dkacc.begin(), dkacc.end(), 0.f);
      std::fill(dvacc.begin(), dvacc.end(), 0.f);

      for (int64_t j0 = 0; j0 < Sk; j0 += block_keys) {
        const int64_t keys = std::min(block_keys, Sk - j0), keys_pad = round_up(keys, kLanes);
        for (int64_t r0 = 0; r0 < rows_pad; r0 += kRows) {
          float* s = &pblock[r0 * ldb];
          float* ds = &dsblock[r0 * ldb];
          rows_times_matrix(&qbuf[r0 * dpad], dpad, kt.data() + j0, ldk, D, s, ldb, keys_pad, false);
          rows_times_matrix(&gbuf[r0 * dpad], dpad, vt.data() + j0, ldk, D, ds, ldb, keys_pad, false);
          for (int64_t r = r0; r < r0 + kRows; ++r) {
            float* srow = &pblock[r * ldb];
            float* dsrow = &dsblock[r * ldb];
            if (r >= Sq) {  // padding rows: no probability, no gradient
              std::fill(srow, srow + keys_pad, 0.f);
              std::fill(dsrow, dsrow + keys_pad, 0.f);
              continue;
            }
            const Vec vlse(lse[r]), vdelta(delta[r]);
            for (int64_t j = 0; j < keys_pad; j += kLanes) {
              const Vec prob = (Vec::loadu(srow + j) - vlse).exp_u20();
              prob.store(srow + j);
              (prob * (Vec::loadu(dsrow + j) - vdelta)).store(dsrow + j);
            }
            std::fill(srow + keys, srow + keys_pad, 0.f);
            std::fill(dsrow + keys, dsrow + keys_pad, 0.f);
          }
          // dQ rows += dS · K (unscaled; scale applied at the end)
          rows_times_matrix(ds, ldb, &krows[j0 * dpad], dpad, keys, &dqacc[r0 * dpad], dpad, D, true);
        }
        // dV, dK for this block's keys: rows are keys (the columns of P and dS), depth is the query rows.
        for (int64_t kr = 0; kr < keys; kr += kRows) {
          rows_times_matrix<true>(&pblock[kr], ldb, gbuf.data(), dpad, Sq, &dvacc[(j0 + kr) * dpad], dpad, D, true);
          rows_times_matrix<true>(&dsblock[kr], ldb, qbuf.data(), dpad, Sq, &dkacc[(j0 + kr) * dpad], dpad, D, true);
        }
      }

      for (int64_t i = 0; i < Sq; ++i) {
        scalar_t* row = dq + ((b * Sq + i) * H + h) * D;
        if (i + kAhead < Sq) prefetch_rows<true>(row + kAhead * H * D, 0, 1, D);
        for (int64_t x = 0; x < D; ++x) row[x] = static_cast<scalar_t>(dqacc[i * dpad + x] * p.scale);
      }
      for (int64_t j = 0; j < Sk; ++j) {
        scalar_t* krow = dk + ((b * Sk + j) * H + h) * D;
        scalar_t* vrow = dv + ((b * Sk + j) * H + h) * D;
        if (j + kAhead < Sk) {
          prefetch_rows<true>(krow + kAhead * H * D, 0, 1, D);
          prefetch_rows<true>(vrow + kAhead * H * D, 0, 1, D);
        }
        for (int64_t x = 0; x < D; ++x) {
          krow[x] = static_cast<scalar_t>(dkacc[j * dpad + x] * p.scale);
          vrow[x] = static_cast<scalar_t>(dvacc[j * dpad + x]);
        }
      }
    }
  });
}

}  // namespace

void attention_backward(const AttentionGradParams& p, Precision precision) {
  precision == Precision::kBFloat16 ? backward<c10::BFloat16>(p) : backward<float>(p);
}

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
