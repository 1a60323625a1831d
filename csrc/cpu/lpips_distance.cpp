// CPU implementation of softvq_fast::lpips_distance_cpu_forward / lpips_distance_cpu_backward (the
// `cpu` backend of softvq_fast.ops.lpips_distance): argument checks, allocation, the kernel build
// chosen by cpu/isa.h (lpips_distance_avx512.cpp, lpips_distance_avx2.cpp, or the portable one
// compiled here), and the sums over tiles in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/lpips_distance_cpu.h"
#define SOFTVQ_CPU_ISA portable
#include "cpu/lpips_distance_kernel.h"
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

// Pixels per tile: a power of two in [16, kMaxTile] with C x tile floats of about 32 KiB, so that
// a tile of fx and one of fy stay in the caches between the kernel's two walks over channels.
int64_t tile_for(int64_t channels) {
  int64_t tile = portable::kMaxTile;
  while (tile > 16 && channels * tile > 8192) tile /= 2;
  return tile;
}

LpipsShape check_features(const char* op, const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& weight,
                          double eps) {
  TORCH_CHECK(fx.dim() == 4 && fx.sizes() == fy.sizes(), op, ": fx and fy must be (B, C, H, W) of one shape, got ",
              fx.sizes(), " and ", fy.sizes());
  TORCH_CHECK(fx.device().is_cpu() && fy.device().is_cpu() && weight.device().is_cpu(), op,
              ": fx, fy and weight must be CPU tensors");
  const auto dtype = fx.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) && fy.scalar_type() == dtype, op,
              ": fx and fy must both be float32, bfloat16 or float16, got ", dtype, " and ", fy.scalar_type());
  const int64_t B = fx.size(0), C = fx.size(1), P = fx.size(2) * fx.size(3);
  TORCH_CHECK(C > 0 && P > 0, op, ": fx needs C >= 1 channels and H * W >= 1 pixels, got ", fx.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, op, ": weight must be (C,) = (", C, "), got ", weight.sizes());
  const int64_t tile = tile_for(C);
  return LpipsShape{B, C, P, tile, (P + tile - 1) / tile, static_cast<float>(eps)};
}

void check_stats(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == sizes, op, ": ", name,
              " must be a float32 CPU tensor of shape ", sizes, ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
}

// Calls f(T{}) with T the C++ type of the features' dtype (float, c10::BFloat16 or c10::Half).
template <typename F>
void with_feature_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpips_distance_cpu_forward(const at::Tensor& fx, const at::Tensor& fy,
                                                                          const at::Tensor& weight, double eps) {
  const LpipsShape s = check_features("lpips_distance_cpu_forward", fx, fy, weight, eps);
  const at::Tensor x = fx.contiguous(), y = fy.contiguous(), w = weight.to(at::kFloat).contiguous();
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor norm_x = at::empty({s.B, fx.size(2), fx.size(3)}, options), norm_y = at::empty_like(norm_x);
  at::Tensor tile_sums = at::empty({s.B, s.tiles}, options);
  with_feature_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LpipsForwardArgs<T> args{x.const_data_ptr<T>(), y.const_data_ptr<T>(), w.const_data_ptr<float>(),
                                   norm_x.mutable_data_ptr<float>(), norm_y.mutable_data_ptr<float>(),
                                   tile_sums.mutable_data_ptr<float>()};
    run_chosen_isa<const LpipsShape&, const LpipsForwardArgs<T>&>(SOFTVQ_ISA_ENTRIES(lpips_distance_forward), s, args);
  });
  at::Tensor out = at::empty({s.B}, options);
  const float* sums = tile_sums.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < s.B; ++b) o[b] = portable::row_sum(sums + b * s.tiles, s.tiles) / static_cast<float>(s.P);
  return {out, norm_x, norm_y};
}

// grad_weight[c] = sum_b g[b] * sum over tiles of tile_squares[b, tile, c], in a fixed order.
at::Tensor weight_gradient(const at::Tensor& tile_squares, const float* g, const LpipsShape& s) {
  at::Tensor grad_weight = at::zeros({s.C}, tile_squares.options());
  float* gw = grad_weight.mutable_data_ptr<float>();
  const float* squares = tile_squares.const_data_ptr<float>();
  std::vector<float> per_sample(s.C);
  for (int64_t b = 0; b < s.B; ++b) {
    std::fill(per_sample.begin(), per_sample.end(), 0.f);
    for (int64_t t = 0; t < s.tiles; ++t) {
      const float* row = squares + (b * s.tiles + t) * s.C;
      for (int64_t c = 0; c < s.C; ++c) per_sample[c] += row[c];
    }
    for (int64_t c = 0; c < s.C; ++c) gw[c] += g[b] * per_sample[c];
  }
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpips_distance_cpu_backward(
    const at::Tensor& grad_out, const at::Tensor& fx, const at::Tensor& fy, const at::Tensor& weight,
    const at::Tensor& norm_x, const at::Tensor& norm_y, double eps, bool need_fx, bool need_fy, bool need_weight) {
  const char* op = "lpips_distance_cpu_backward";
  const LpipsShape s = check_features(op, fx, fy, weight, eps);
  check_stats(op, "norm_x", norm_x, {s.B, fx.size(2), fx.size(3)});
  check_stats(op, "norm_y", norm_y, {s.B, fx.size(2), fx.size(3)});
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.dim() == 1 && grad_out.size(0) == s.B, op,
              ": grad_out must be a CPU tensor of shape (B,) = (", s.B, "), got ", grad_out.sizes());
  const at::Tensor x = fx.contiguous(), y = fy.contiguous(), w = weight.to(at::kFloat).contiguous();
  const at::Tensor nx = norm_x.contiguous(), ny = norm_y.contiguous();
  const at::Tensor g = (grad_out.to(at::kFloat) / static_cast<double>(s.P)).contiguous();
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor grad_fx = need_fx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_fy = need_fy ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor tile_squares = at::empty({need_weight ? s.B * s.tiles * s.C : 0}, options);
  if (need_fx || need_fy || need_weight) {
    with_feature_type(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const LpipsBackwardArgs<T> args{x.const_data_ptr<T>(), y.const_data_ptr<T>(), w.const_data_ptr<float>(),
                                      nx.const_data_ptr<float>(), ny.const_data_ptr<float>(), g.const_data_ptr<float>(),
                                      need_fx ? grad_fx.mutable_data_ptr<T>() : nullptr,
                                      need_fy ? grad_fy.mutable_data_ptr<T>() : nullptr,
                                      need_weight ? tile_squares.mutable_data_ptr<float>() : nullptr};
      run_chosen_isa<const LpipsShape&, const LpipsBackwardArgs<T>&>(SOFTVQ_ISA_ENTRIES(lpips_distance_backward), s,
                                                                     args);
    });
  }
  at::Tensor grad_weight =
      need_weight ? weight_gradient(tile_squares, g.const_data_ptr<float>(), s) : at::empty({0}, options);
  return {grad_fx, grad_fy, grad_weight};
}

}  // namespace
}  // namespace softvq_fast::cpu

TORCH_LIBRARY_IMPL(softvq_fast, CPU, m) {
  m.impl("lpips_distance_cpu_forward", &softvq_fast::cpu::lpips_distance_cpu_forward);
  m.impl("lpips_distance_cpu_backward", &softvq_fast::cpu::lpips_distance_cpu_backward);
}
