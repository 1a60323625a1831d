// The register-blocked product at the heart of the CPU kernels: for ROWS rows of a and NV vectors
// of b,
//   p[r][0 : NV * lanes] = sum_{x < depth} a[r * lda + x] * b[x * ldb + 0 : NV * lanes],
// or, with kAColumns, a[x * lda + r] (a's rows stored as columns: a product with a transposed
// matrix needs no transposed copy),
// with the ROWS x NV accumulators in registers (broadcast-a x vector-b FMAs), written into c (row
// stride ldc) as `into` says. Include it inside a kernel's target region (after cpu/target_*.h)
// so that Vec is that region's at::vec width; the instantiations of different regions are
// different functions.
#pragma once
#include <cstdint>
#include <type_traits>

namespace softvq_fast::cpu {

enum class Into {
  kOverwrite,   // c = p
  kAccumulate,  // the accumulators start from c: one running sum, c = c + a[.][0] b[0] + ...
  kAddSum,      // c = c + p, p summed on its own first: over many blocks this two-level
                // summation keeps float32 error at ~(depth + blocks) ulp instead of the total length
};

// Vectors in the next register block when `left` vectors remain and a block takes at most `most`:
// one vector left over after a full block is merged into a split (most + 1 = 3 + 2 or 2 + 2),
// because a single-vector block keeps too few independent accumulators in flight.
inline int64_t next_block_vectors(int64_t left, int64_t most) {
  return left == most + 1 ? (left + 1) / 2 : (left < most ? left : most);
}

// No half-width vector: the Half argument of register_block when a block has none.
struct NoHalf {};

// With Half (a vector type of half Vec's lanes, with Half(float), loadu, store, + and a static
// fmadd), the block is NV vectors and one half vector wide: a width of 4.5 vectors (head dim 72 in
// AVX-512) then needs no padding column.
template <typename Vec, int64_t ROWS, int64_t NV, bool kAColumns = false, typename Half = NoHalf>
inline void register_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c,
                           int64_t ldc, Into into) {
  constexpr int64_t kLanes = Vec::size();
  constexpr bool kHalf = !std::is_same_v<Half, NoHalf>;
  constexpr int64_t kHalfAt = NV * kLanes;  // the half vector's column
  Vec acc[ROWS][NV];
  [[maybe_unused]] Half half_acc[kHalf ? ROWS : 1];
  for (int64_t r = 0; r < ROWS; ++r) {
    for (int64_t v = 0; v < NV; ++v)
      acc[r][v] = into == Into::kAccumulate ? Vec::loadu(c + r * ldc + v * kLanes) : Vec(0.f);
    if constexpr (kHalf) half_acc[r] = into == Into::kAccumulate ? Half::loadu(c + r * ldc + kHalfAt) : Half(0.f);
  }
  for (int64_t x = 0; x < depth; ++x) {
    Vec col[NV];
    for (int64_t v = 0; v < NV; ++v) col[v] = Vec::loadu(b + x * ldb + v * kLanes);
    [[maybe_unused]] Half half_col;
    if constexpr (kHalf) half_col = Half::loadu(b + x * ldb + kHalfAt);
    for (int64_t r = 0; r < ROWS; ++r) {
      const float scalar = kAColumns ? a[x * lda + r] : a[r * lda + x];
      const Vec ar(scalar);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, col[v], acc[r][v]);
      if constexpr (kHalf) half_acc[r] = Half::fmadd(Half(scalar), half_col, half_acc[r]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r) {
    for (int64_t v = 0; v < NV; ++v) {
      float* out = c + r * ldc + v * kLanes;
      (into == Into::kAddSum ? Vec::loadu(out) + acc[r][v] : acc[r][v]).store(out);
    }
    if constexpr (kHalf) {
      float* out = c + r * ldc + kHalfAt;
      (into == Into::kAddSum ? Half::loadu(out) + half_acc[r] : half_acc[r]).store(out);
    }
  }
}

}  // namespace softvq_fast::cpu
