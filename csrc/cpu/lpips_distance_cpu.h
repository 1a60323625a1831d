// The CPU kernels of softvq_fast::lpips_distance (one VGG layer of LPIPS): arguments and entry
// points, one per instruction set and input dtype (lpips_distance.cpp picks one at run time), each
// compiled from lpips_distance_kernel.h in its own translation unit.
//
// fx, fy are contiguous (B, C, P) with P = H * W pixels, in float32, bfloat16 or float16; every
// other buffer is float32. Work is split into tiles of `tile` pixels of one sample (the last tile
// of a sample may be shorter); each tile writes its own partial sums, which lpips_distance.cpp adds
// up in a fixed order, so results do not depend on the number of threads.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace softvq_fast::cpu {

struct LpipsShape {
  int64_t B, C, P;
  int64_t tile;  // pixels per tile
  int64_t tiles;  // tiles per sample: ceil(P / tile)
  float eps;
};

template <typename T>
struct LpipsForwardArgs {
  const T* fx;            // (B, C, P)
  const T* fy;            // (B, C, P)
  const float* weight;    // (C,)
  float* norm_x;          // (B, P) out: sqrt(sum_c fx^2)
  float* norm_y;          // (B, P) out
  float* tile_sums;       // (B, tiles) out: sum over the tile's pixels of sum_c w_c d_c^2
};

template <typename T>
struct LpipsBackwardArgs {
  const T* fx;            // (B, C, P)
  const T* fy;            // (B, C, P)
  const float* weight;    // (C,)
  const float* norm_x;    // (B, P)
  const float* norm_y;    // (B, P)
  const float* grad_out;  // (B,): d loss / d out[b], already divided by P
  T* grad_fx;             // (B, C, P) out, or nullptr when not needed
  T* grad_fy;             // (B, C, P) out, or nullptr when not needed
  float* tile_squares;    // (B, tiles, C) out: sum over the tile's pixels of d_c^2, or nullptr
};

#define SOFTVQ_DECLARE_LPIPS(T)                                                  \
  void lpips_distance_forward(const LpipsShape& s, const LpipsForwardArgs<T>& a);   \
  void lpips_distance_backward(const LpipsShape& s, const LpipsBackwardArgs<T>& a);
#define SOFTVQ_DECLARE(isa)             \
  namespace isa {                       \
  SOFTVQ_DECLARE_LPIPS(float)           \
  SOFTVQ_DECLARE_LPIPS(c10::BFloat16)   \
  SOFTVQ_DECLARE_LPIPS(c10::Half)       \
  }
SOFTVQ_DECLARE(portable)
SOFTVQ_DECLARE(avx2)
SOFTVQ_DECLARE(avx512)
#undef SOFTVQ_DECLARE
#undef SOFTVQ_DECLARE_LPIPS

}  // namespace softvq_fast::cpu
