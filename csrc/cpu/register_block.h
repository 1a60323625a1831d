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

namespace softvq_fast::cpu {

enum class Into {
  kOverwrite,   // c = p
  kAccumulate,  // the accumulators start from c: one running sum, c = c + a[.][0] b[0] + ...
  kAddSum,      // c = c + p, p summed on its own first: over many blocks this two-level
                // summation keeps float32 error at ~(depth + blocks) ulp instead of the total length
};

template <typename Vec, int64_t ROWS, int64_t NV, bool kAColumns = false>
inline void register_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c,
                           int64_t ldc, Into into) {
  constexpr int64_t kLanes = Vec::size();
  Vec acc[ROWS][NV];
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t v = 0; v < NV; ++v)
      acc[r][v] = into == Into::kAccumulate ? Vec::loadu(c + r * ldc + v * kLanes) : Vec(0.f);
  for (int64_t x = 0; x < depth; ++x) {
    Vec col[NV];
    for (int64_t v = 0; v < NV; ++v) col[v] = Vec::loadu(b + x * ldb + v * kLanes);
    for (int64_t r = 0; r < ROWS; ++r) {
      const Vec ar(kAColumns ? a[x * lda + r] : a[r * lda + x]);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, col[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t v = 0; v < NV; ++v) {
      float* out = c + r * ldc + v * kLanes;
      (into == Into::kAddSum ? Vec::loadu(out) + acc[r][v] : acc[r][v]).store(out);
    }
}

}  // namespace softvq_fast::cpu
