// The AVX-512 (F, BW, VL, DQ) build of the CPU soft-VQ kernels (chosen at run time by soft_vq.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/soft_vq_cpu.h"
#include "cpu/target_avx512.h"
#define SOFTVQ_CPU_ISA avx512
#include "cpu/soft_vq_kernel.h"
#pragma GCC pop_options
#endif
