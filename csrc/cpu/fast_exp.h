// exp on at::vec::Vectorized<float>, shared by the CPU kernels. Include it in a kernel header,
// inside a translation unit that defined SOFTVQ_CPU_ISA and opened its target region (see
// soft_vq_kernel.h), so that Vectorized<float> has that build's width.
#pragma once
#ifndef SOFTVQ_CPU_ISA
#error "define SOFTVQ_CPU_ISA before including fast_exp.h"
#endif

namespace softvq_fast::cpu::SOFTVQ_CPU_ISA {
namespace {

// exp by Cody-Waite reduction x = n ln2 + r (|r| <= ln2 / 2) and the degree-7 Taylor polynomial
// of exp(r) (truncation < 7e-9): about 1 ulp, several times cheaper than Sleef's exp in at::vec.
// Below -87.34 (results under float32's smallest normal) it returns 0; NaN stays NaN.
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  constexpr float kMin = -87.336544f, kMax = 88.f;
  const Vec xc = at::vec::minimum(at::vec::maximum(x, Vec(kMin)), Vec(kMax));
  const Vec n = (xc * Vec(1.44269504f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693145752f), xc);
  r = at::vec::fmadd(n, Vec(-1.42860677e-6f), r);
  Vec poly(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) poly = at::vec::fmadd(poly, r, Vec(c));
  const IVec exponent = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  const Vec y = poly * at::vec::cast<float>(exponent);
  return Vec::blendv(y, Vec(0.f), x < Vec(kMin));
}

}  // namespace
}  // namespace softvq_fast::cpu::SOFTVQ_CPU_ISA
