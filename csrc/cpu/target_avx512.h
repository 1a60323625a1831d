// Opens the AVX-512 (F, BW, VL, DQ) target region of a kernel translation unit: include it after
// every torch header with inline or template code (those keep the default target), then the
// kernel, then close the region with `#pragma GCC pop_options`. at::vec is compiled in its own
// namespace (CPU_CAPABILITY) here, so nothing is shared with the default-target code. g++ does
// not define the ISA macros for a target pragma in C++, and at::vec and sleef.h test them, so
// they are defined here. GCC on x86-64 only.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prfchw")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY softvq_avx512
#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/vec.h>
