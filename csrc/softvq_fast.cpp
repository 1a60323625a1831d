// The Python module `softvq_fast._C` and the schemas of every C++ op.
//
// Importing the module runs the static registrations below and in csrc/cpu, csrc/cuda
// (TORCH_LIBRARY_IMPL blocks). The fake (meta) kernels live in Python, next to each op.
#include <Python.h>
#include <torch/library.h>

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

TORCH_LIBRARY(softvq_fast, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
}
