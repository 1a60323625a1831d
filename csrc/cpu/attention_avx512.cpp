// The AVX-512 (F, BW, VL, DQ) build of the CPU attention kernels (chosen at run time by attention.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "cpu/attention_cpu.h"
#include "cpu/target_avx512.h"
#define SOFTVQ_CPU_ISA avx512
#include "cpu/attention_kernel.h"
#include "cpu/attention_backward_kernel.h"
#pragma GCC pop_options
#endif
