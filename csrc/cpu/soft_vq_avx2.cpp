// The AVX2 + FMA build of the CPU soft-VQ kernels (chosen at run time by soft_vq.cpp); the same
// target setup as attention_avx2.cpp (g++ does not define the ISA macros for a target pragma).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Everything with inline or template code is included before the target pragma.
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

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY softvq_avx2
#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/vec.h>
#define SOFTVQ_CPU_ISA avx2
#include "cpu/soft_vq_kernel.h"
#pragma GCC pop_options
#endif
