// The AVX2 + FMA build of the CPU LPIPS layer-distance kernels (chosen at run time by
// lpips_distance.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/lpips_distance_cpu.h"
#include "cpu/target_avx2.h"
#define SOFTVQ_CPU_ISA avx2
#include "cpu/lpips_distance_kernel.h"
#pragma GCC pop_options
#endif
