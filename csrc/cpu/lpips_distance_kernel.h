// The CPU LPIPS layer distance, forward and backward, written once and compiled per instruction
// set (see soft_vq_kernel.h for the translation-unit protocol: SOFTVQ_CPU_ISA, target region,
// torch headers first). Plain loops over the contiguous pixels of a tile, which the compiler
// vectorises for the target.
//
// With n = sqrt(sum_c x_c^2), s = n + eps, a = x / s (same for y: m, t, b), d = a - b and, in the
// backward, G_c = 2 w_c d_c g (g = grad_out / P):
//   forward   out = sum over pixels of sum_c w_c d_c^2 (the caller divides by P)
//   grad x_k  = G_k / s - x_k / (s^2 n) * sum_c G_c x_c
//   grad y_k  = -G_k / t + y_k / (t^2 m) * sum_c G_c y_c
// Where n = 0 every x_k is 0, so the second term is 0: its factor 1 / (s^2 n) is taken as 0 there
// (the eager formula's autograd gives NaN at such pixels, through sqrt's derivative at 0).
//
// Each tile is walked twice over its channels: first the norms (forward) or the channel sums
// (backward), then the distance (forward) or the gradients (backward). The tile is sized so that
// its C x tile block of fx and fy stays in the caches between the two walks.
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including lpips_distance_kernel.h"
#endif

#include <algorithm>
#include <cmath>

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

constexpr int64_t kMaxTile = 128;  // lpips_distance.cpp's tiles are at most this wide
constexpr int64_t kLanes = 16;     // partial sums of a row reduction, a whole vector or two
constexpr int64_t kTaskElements = 32768;  // fx elements per parallel task, at least

// sum of v[0..n) in a fixed order: kLanes interleaved partial sums, then the tail, then the lanes.
inline float row_sum(const float* v, int64_t n) {
  float lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[p + l];
  }
  float total = 0.f;
  for (; p < n; ++p) total += v[p];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Calls f(b, p0, n) for every tile (sample b, pixels [p0, p0 + n)) across threads.
template <typename F>
void for_each_tile(const LpipsShape& s, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kTaskElements / (s.C * s.tile));
  at::parallel_for(0, s.B * s.tiles, grain, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const int64_t b = index / s.tiles, p0 = (index % s.tiles) * s.tile;
      f(b, p0, std::min(s.tile, s.P - p0));
    }
  });
}

// d[p] = x[p] * rx[p] - y[p] * ry[p]: the channel row of the normalised difference.
template <typename T>
inline void difference_row(const T* x, const T* y, const float* rx, const float* ry, int64_t n, float* d) {
  for (int64_t p = 0; p < n; ++p) d[p] = static_cast<float>(x[p]) * rx[p] - static_cast<float>(y[p]) * ry[p];
}

// rx[p] = 1 / (n + eps) from the sums of squares ss[p]; norm[p] = n.
inline void reciprocal_norms(const float* ss, int64_t n, float eps, float* norm, float* rx) {
  for (int64_t p = 0; p < n; ++p) {
    norm[p] = std::sqrt(ss[p]);
    rx[p] = 1.f / (norm[p] + eps);
  }
}

// q[p] = sum_c G_c x_c / (s^2 n), 0 where n = 0, from the channel sums gx[p] = sum_c G_c x_c.
inline void projection_scale(const float* gx, const float* norm, const float* rx, int64_t n, float* q) {
  for (int64_t p = 0; p < n; ++p) q[p] = norm[p] > 0.f ? gx[p] * rx[p] * rx[p] / norm[p] : 0.f;
}

template <typename T>
void forward(const LpipsShape& s, const LpipsForwardArgs<T>& a) {
  for_each_tile(s, [&](int64_t b, int64_t p0, int64_t n) {
    const T* x = a.fx + b * s.C * s.P + p0;
    const T* y = a.fy + b * s.C * s.P + p0;
    float ssx[kMaxTile] = {}, ssy[kMaxTile] = {};
    for (int64_t c = 0; c < s.C; ++c) {
      const T* xc = x + c * s.P;
      const T* yc = y + c * s.P;
      for (int64_t p = 0; p < n; ++p) {
        const float xv = static_cast<float>(xc[p]), yv = static_cast<float>(yc[p]);
        ssx[p] += xv * xv;
        ssy[p] += yv * yv;
      }
    }
    float rx[kMaxTile], ry[kMaxTile], d[kMaxTile], acc[kMaxTile] = {};
    reciprocal_norms(ssx, n, s.eps, a.norm_x + b * s.P + p0, rx);
    reciprocal_norms(ssy, n, s.eps, a.norm_y + b * s.P + p0, ry);
    for (int64_t c = 0; c < s.C; ++c) {
      difference_row(x + c * s.P, y + c * s.P, rx, ry, n, d);
      const float w = a.weight[c];
      for (int64_t p = 0; p < n; ++p) acc[p] += w * d[p] * d[p];
    }
    a.tile_sums[b * s.tiles + p0 / s.tile] = row_sum(acc, n);
  });
}

template <typename T>
void backward(const LpipsShape& s, const LpipsBackwardArgs<T>& a) {
  for_each_tile(s, [&](int64_t b, int64_t p0, int64_t n) {
    const int64_t offset = b * s.C * s.P + p0;
    const T* x = a.fx + offset;
    const T* y = a.fy + offset;
    const float* norm_x = a.norm_x + b * s.P + p0;
    const float* norm_y = a.norm_y + b * s.P + p0;
    const float g2 = 2.f * a.grad_out[b];
    float rx[kMaxTile], ry[kMaxTile], d[kMaxTile], gx[kMaxTile] = {}, gy[kMaxTile] = {};
    for (int64_t p = 0; p < n; ++p) {
      rx[p] = 1.f / (norm_x[p] + s.eps);
      ry[p] = 1.f / (norm_y[p] + s.eps);
    }
    // Calls f(c, xc, yc, coef) for every channel, d holding its difference, coef = 2 w_c g (G_c = coef d_c).
    const auto over_channels = [&](const auto& f) {
      for (int64_t c = 0; c < s.C; ++c) {
        const T* xc = x + c * s.P;
        const T* yc = y + c * s.P;
        difference_row(xc, yc, rx, ry, n, d);
        f(c, xc, yc, g2 * a.weight[c]);
      }
    };
    // First walk: sum_c G_c x_c and sum_c G_c y_c per pixel, and the tile's sum of d_c^2.
    over_channels([&](int64_t c, const T* xc, const T* yc, float coef) {
      if (a.grad_fx != nullptr) {
        for (int64_t p = 0; p < n; ++p) gx[p] += coef * d[p] * static_cast<float>(xc[p]);
      }
      if (a.grad_fy != nullptr) {
        for (int64_t p = 0; p < n; ++p) gy[p] += coef * d[p] * static_cast<float>(yc[p]);
      }
      if (a.tile_squares != nullptr) {
        float squares[kMaxTile];
        for (int64_t p = 0; p < n; ++p) squares[p] = d[p] * d[p];
        a.tile_squares[(b * s.tiles + p0 / s.tile) * s.C + c] = row_sum(squares, n);
      }
    });
    if (a.grad_fx == nullptr && a.grad_fy == nullptr) return;
    float qx[kMaxTile], qy[kMaxTile];
    projection_scale(gx, norm_x, rx, n, qx);
    projection_scale(gy, norm_y, ry, n, qy);
    // Second walk: the gradients.
    over_channels([&](int64_t c, const T* xc, const T* yc, float coef) {
      if (a.grad_fx != nullptr) {
        T* out = a.grad_fx + offset + c * s.P;
        for (int64_t p = 0; p < n; ++p) {
          out[p] = static_cast<T>(coef * d[p] * rx[p] - static_cast<float>(xc[p]) * qx[p]);
        }
      }
      if (a.grad_fy != nullptr) {
        T* out = a.grad_fy + offset + c * s.P;
        for (int64_t p = 0; p < n; ++p) {
          out[p] = static_cast<T>(static_cast<float>(yc[p]) * qy[p] - coef * d[p] * ry[p]);
        }
      }
    });
  });
}

}  // namespace

#define SOFTVQ_DEFINE_LPIPS(T)                                                                                  \
  void lpips_distance_forward(const LpipsShape& s, const LpipsForwardArgs<T>& a) { forward<T>(s, a); }          \
  void lpips_distance_backward(const LpipsShape& s, const LpipsBackwardArgs<T>& a) { backward<T>(s, a); }
SOFTVQ_DEFINE_LPIPS(float)
SOFTVQ_DEFINE_LPIPS(c10::BFloat16)
SOFTVQ_DEFINE_LPIPS(c10::Half)
#undef SOFTVQ_DEFINE_LPIPS

}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
