// ctest smoke test of the CMake build: dlopen libsoftvq_fast.so (argv[1]), call
// softvq_fast::attention_fwd through the dispatcher on strided (B, S, H, D) views, and compare
// with a naive float64 loop. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

namespace {

// out[b, i, h, :] = sum_j softmax_j(q_i . k_j * scale) v_j, in double.
at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const auto q64 = q.to(at::kDouble).contiguous(), k64 = k.to(at::kDouble).contiguous(),
             v64 = v.to(at::kDouble).contiguous();
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Sk = k.size(1);
  auto out = at::zeros({B, Sq, H, D}, q64.options());
  auto qa = q64.accessor<double, 4>(), ka = k64.accessor<double, 4>(), va = v64.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  std::vector<double> scores(Sk);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < Sk; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += qa[b][i][h][d] * ka[b][j][h][d];
          scores[j] = s * scale;
          mx = std::max(mx, scores[j]);
        }
        for (int64_t j = 0; j < Sk; ++j) sum += scores[j] = std::exp(scores[j] - mx);
        for (int64_t j = 0; j < Sk; ++j)
          for (int64_t d = 0; d < D; ++d) oa[b][i][h][d] += scores[j] / sum * va[b][j][h][d];
      }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s path/to/libsoftvq_fast.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("softvq_fast::attention_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          double)>();
  at::manual_seed(0);
  const auto qkv = at::randn({2, 37, 3, 3, 72});  // q, k, v as strided views, as models produce them
  const auto q = qkv.select(2, 0), k = qkv.select(2, 1), v = qkv.select(2, 2);
  const double scale = 1.0 / std::sqrt(72.0);
  const auto [out, lse] = op.call(q, k, v, scale);
  const auto ref = naive_attention(q, k, v, scale);
  const double err = (out.to(at::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
  std::printf("softvq_fast::attention_fwd (cpu, float32) relative error vs float64 loop: %.3g\n", err);
  return err <= 1e-5 ? 0 : 1;
}
