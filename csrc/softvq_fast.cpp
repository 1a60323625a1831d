// The Python module `softvq_fast._C` and the schemas of every C++ op.
//
// Importing the module runs the static registrations below and in csrc/cpu, csrc/cuda
// (TORCH_LIBRARY_IMPL blocks). The fake (meta) kernels live in Python, next to each op.
#ifndef SOFTVQ_FAST_LIBTORCH_ONLY  // defined by CMakeLists.txt, which builds a plain libtorch library
#include <Python.h>
#endif
#include <torch/library.h>

#ifndef SOFTVQ_FAST_LIBTORCH_ONLY
extern "C" {
PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "softvq-fast C++/CUDA kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef SOFTVQ_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
#endif

TORCH_LIBRARY(softvq_fast, m) {
  m.def("soft_vq_cpu_forward(Tensor z, Tensor codebook, float tau, float entropy_temperature, bool with_stats, bool with_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_vq_cpu_backward(Tensor grad_z_q, Tensor grad_row_entropy, Tensor grad_column_sum, Tensor z, Tensor codebook, Tensor z_q, Tensor row_stats, float tau, float entropy_temperature, bool with_entropy) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_tanh_cpu_forward(Tensor x) -> Tensor");
  m.def("gelu_tanh_cpu_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("transpose_cpu(Tensor x, bool with_column_sums) -> (Tensor, Tensor)");
  m.def("lpips_distance_cpu_forward(Tensor fx, Tensor fy, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("lpips_distance_cpu_backward(Tensor grad_out, Tensor fx, Tensor fy, Tensor weight, Tensor norm_x, Tensor norm_y, float eps, bool need_fx, bool need_fy, bool need_weight) -> (Tensor, Tensor, Tensor)");
}
