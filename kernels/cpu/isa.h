// Which SIMD kernels the CPU backend runs. Every SIMD kernel has a portable C fallback; the level in use is the
// best one the CPU has, capped by AGPT_CPU_ISA=portable|avx2|avx512 (read once) or by cpu_set_isa, so a machine
// with AVX-512 can also run, and test, what an AVX2-only machine runs.
//   portable: plain C for the baseline x86-64 (SSE2) target, or any other architecture
//   avx2:     AVX2 + FMA + F16C (Haswell and later, AMD Zen): 8-lane widening GEMV and widen
//   avx512:   AVX-512 F/BW/VL (+ FMA, F16C): 16-lane widening GEMV and widen; with avx512_bf16 also the
//             opt-in bf16 GEMM (AGPT_CPU_BF16_GEMM=1)
#pragma once
#include <stdbool.h>

typedef enum CpuIsa { CPU_ISA_PORTABLE = 0, CPU_ISA_AVX2 = 1, CPU_ISA_AVX512 = 2 } CpuIsa;

CpuIsa cpu_isa_detected(void);  // the best level this CPU supports
CpuIsa cpu_isa(void);           // the level in use: min(detected, the cap)
// Caps the level (tests, benchmarks); returns the level now in use, which is lower than `cap` where the CPU
// lacks it.
CpuIsa cpu_set_isa(CpuIsa cap);
bool cpu_has_avx512_bf16(void);  // avx512_bf16 dot products (with the AVX-512 F/BW/VL/DQ they need)
const char *cpu_isa_name(CpuIsa isa);
int cpu_isa_from_name(const char *name);  // -1 when unknown
