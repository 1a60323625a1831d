// The tanh-approximated GELU forward / backward and the transpose with column sums of
// softvq_fast::linear's CPU training path, written once and compiled per instruction set (see
// soft_vq_kernel.h for the translation-unit protocol: SOFTVQ_CPU_ISA, target region, torch
// headers first).
//
// GELU, tanh form, with x the pre-activation and u = sqrt(2/pi) (x + 0.044715 x^3):
//   y = 0.5 x (1 + tanh u) = x s,  s = sigmoid(2u) (one exponential),  dy/dx = s + 2 x s (1 - s) du/dx.
// Elementwise work is split into contiguous chunks across threads.
//
// The transpose walks blocks of kColumnBlock columns (one task each), their rows in tiles of
// kLanes x kLanes through registers (at::vec::transpose_mxn), and sums each column along the way
// (per tile of kLanes rows, then into the total).
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including linear_kernel.h"
#endif

#include <algorithm>

#include "cpu/fast_exp.h"

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kElementGrain = 16384;  // elements per elementwise task
constexpr int64_t kColumnBlock = 4 * kLanes;
constexpr float kTanhScale = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;
// Where -2u > 80, sigmoid(2u) < 2e-35 is taken as 0 (as 1 + tanh u rounds to 0): no denormals.
constexpr float kMaxExponent = 80.f;

inline Vec tanh_sigmoid(const Vec& x) {  // sigmoid(2u)
  const Vec u = Vec(kTanhScale) * at::vec::fmadd(Vec(kTanhCubic) * x, x * x, x);
  const Vec exponent = Vec(-2.f) * u;
  const Vec e = fast_exp(at::vec::minimum(exponent, Vec(kMaxExponent)));
  return Vec::blendv(Vec(1.f) / (Vec(1.f) + e), Vec(0.f), exponent > Vec(kMaxExponent));
}

template <typename F>
void for_each_chunk(int64_t n, const F& f) {  // f(begin, end) on chunks of whole vectors but the last
  at::parallel_for(0, (n + kLanes - 1) / kLanes, kElementGrain / kLanes, [&](int64_t begin, int64_t end) {
    f(begin * kLanes, std::min(end * kLanes, n));
  });
}

}  // namespace

void gelu_tanh_forward(const float* h, float* y, int64_t n) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t count = std::min(kLanes, end - i);
      const Vec x = Vec::loadu(h + i, count);
      (x * tanh_sigmoid(x)).store(y + i, count);
    }
  });
}

void gelu_tanh_backward(const float* grad, const float* h, float* grad_h, int64_t n) {
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t count = std::min(kLanes, end - i);
      const Vec x = Vec::loadu(h + i, count), s = tanh_sigmoid(x);
      const Vec du = Vec(kTanhScale) * at::vec::fmadd(Vec(3.f * kTanhCubic) * x, x, Vec(1.f));
      const Vec derivative = at::vec::fmadd(Vec(2.f) * x * s * (Vec(1.f) - s), du, s);
      (Vec::loadu(grad + i, count) * derivative).store(grad_h + i, count);
    }
  });
}

void transpose_with_column_sums(const float* x, int64_t rows, int64_t cols, int64_t row_stride, float* t,
                                float* column_sums) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t c0 = block * kColumnBlock, width = std::min(kColumnBlock, cols - c0);
      Vec total[kColumnBlock / kLanes];
      for (auto& v : total) v = Vec(0.f);
      for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
        const int64_t height = std::min(kLanes, rows - r0);
        for (int64_t c = 0; c < width; c += kLanes) {
          const int64_t lanes = std::min(kLanes, width - c);
          const float* src = x + r0 * row_stride + c0 + c;
          float* dst = t + (c0 + c) * rows + r0;
          if (height == kLanes && lanes == kLanes) {
            at::vec::transpose_mxn<float, kLanes, kLanes>(src, row_stride, dst, rows);
          } else {
            at::vec::transpose_mxn<float>(src, row_stride, dst, rows, static_cast<int>(height), static_cast<int>(lanes));
          }
          if (column_sums != nullptr) {
            Vec tile(0.f);
            for (int64_t r = 0; r < height; ++r) tile = tile + Vec::loadu(src + r * row_stride, lanes);
            total[c / kLanes] = total[c / kLanes] + tile;
          }
        }
      }
      if (column_sums != nullptr) {
        for (int64_t c = 0; c < width; c += kLanes) total[c / kLanes].store(column_sums + c0 + c, std::min(kLanes, width - c));
      }
    }
  });
}

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
