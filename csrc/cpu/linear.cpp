// CPU implementation of softvq_fast::gelu_tanh_cpu_forward / gelu_tanh_cpu_backward / transpose_cpu (the
// oneDNN linear layers' training path, softvq_fast.ops.linear): argument checks and allocation,
// then the kernel build chosen by cpu/isa.h (linear_avx512.cpp, linear_avx2.cpp, or the portable
// one compiled here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/isa.h"
#include "cpu/linear_cpu.h"
#define SOFTVQ_CPU_ISA portable
#include "cpu/linear_kernel.h"
#undef SOFTVQ_CPU_ISA

namespace softvq_fast::cpu {
namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor gelu_tanh_cpu_forward(const at::Tensor& x) {
  check_float_cpu("gelu_tanh_cpu_forward", "x", x);
  const at::Tensor h = x.contiguous();
  at::Tensor y = at::empty_like(h);
  run_chosen_isa(SOFTVQ_ISA_ENTRIES(gelu_tanh_forward), h.const_data_ptr<float>(), y.mutable_data_ptr<float>(), h.numel());
  return y;
}

at::Tensor gelu_tanh_cpu_backward(const at::Tensor& grad, const at::Tensor& x) {
  check_float_cpu("gelu_tanh_cpu_backward", "grad", grad);
  check_float_cpu("gelu_tanh_cpu_backward", "x", x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "gelu_tanh_cpu_backward: grad ", grad.sizes(), " must have x's shape ",
              x.sizes());
  const at::Tensor g = grad.contiguous(), h = x.contiguous();
  at::Tensor grad_x = at::empty_like(h);
  run_chosen_isa(SOFTVQ_ISA_ENTRIES(gelu_tanh_backward), g.const_data_ptr<float>(), h.const_data_ptr<float>(),
                 grad_x.mutable_data_ptr<float>(), h.numel());
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> transpose_cpu(const at::Tensor& x, bool with_column_sums) {
  check_float_cpu("transpose_cpu", "x", x);
  TORCH_CHECK(x.dim() == 2, "transpose_cpu: x must be 2-D (rows, cols), got shape ", x.sizes());
  const at::Tensor rows_x = x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
  const int64_t rows = rows_x.size(0), cols = rows_x.size(1);
  at::Tensor t = at::empty({cols, rows}, rows_x.options());
  at::Tensor sums = with_column_sums ? at::zeros({cols}, rows_x.options()) : at::empty({0}, rows_x.options());
  if (rows > 0 && cols > 0) {
    run_chosen_isa(SOFTVQ_ISA_ENTRIES(transpose_with_column_sums), rows_x.const_data_ptr<float>(), rows, cols,
                   rows_x.stride(0), t.mutable_data_ptr<float>(),
                   with_column_sums ? sums.mutable_data_ptr<float>() : nullptr);
  }
  return {t, sums};
}

}  // namespace
}  // namespace softvq_fast::cpu

TORCH_LIBRARY_IMPL(softvq_fast, CPU, m) {
  m.impl("gelu_tanh_cpu_forward", &softvq_fast::cpu::gelu_tanh_cpu_forward);
  m.impl("gelu_tanh_cpu_backward", &softvq_fast::cpu::gelu_tanh_cpu_backward);
  m.impl("transpose_cpu", &softvq_fast::cpu::transpose_cpu);
}
