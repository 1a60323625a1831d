// The AVX2 + FMA build of the CPU attention kernel (chosen at run time by attention.cpp).
//
// Torch's headers are included first so that only at::vec (in its own namespace here) and the
// kernel are compiled for the wider target. g++ does not define the ISA macros for a target
// pragma in C++, and at::vec and sleef.h test them, so they are defined here (GCC only).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention_cpu.h"

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
#include "cpu/attention_kernel.h"
#pragma GCC pop_options
#endif
