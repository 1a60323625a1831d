// The AVX-512 (F, BW, VL, DQ) build of the CPU kernels of the linear layers' training path (chosen at
// run time by linear.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/linear_cpu.h"
#include "cpu/target_avx512.h"
#define SOFTVQ_CPU_ISA avx512
#include "cpu/linear_kernel.h"
#pragma GCC pop_options
#endif
