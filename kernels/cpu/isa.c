// The CPU SIMD level: detection once, the AGPT_CPU_ISA cap once, cpu_set_isa for tests.
#include "kernels/cpu/isa.h"

#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

static const char *const isa_names[] = {"portable", "avx2", "avx512"};

const char *cpu_isa_name(CpuIsa isa) { return isa >= CPU_ISA_PORTABLE && isa <= CPU_ISA_AVX512 ? isa_names[isa] : "?"; }

int cpu_isa_from_name(const char *name) {
    for (int i = 0; name && i <= CPU_ISA_AVX512; i++)
        if (strcmp(name, isa_names[i]) == 0) return i;
    return -1;
}

CpuIsa cpu_isa_detected(void) {
#if HAVE_X86
    static int detected = -1;
    if (detected < 0) {
        bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
        __atomic_store_n(&detected, avx512 ? CPU_ISA_AVX512 : avx2 ? CPU_ISA_AVX2 : CPU_ISA_PORTABLE,
                         __ATOMIC_RELAXED);
    }
    return (CpuIsa)__atomic_load_n(&detected, __ATOMIC_RELAXED);
#else
    return CPU_ISA_PORTABLE;
#endif
}

bool cpu_has_avx512_bf16(void) {
#if HAVE_X86
    return cpu_isa_detected() == CPU_ISA_AVX512 && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

// The cap: -1 until AGPT_CPU_ISA (or the older AGPT_CPU_PORTABLE=1) is read, at the first kernel that asks.
static int isa_cap = -1;

static int cap_from_environment(void) {
    const char *env = getenv("AGPT_CPU_ISA");
    if (env && *env) {
        int isa = cpu_isa_from_name(env);
        if (isa >= 0) return isa;
        LOG_W("AGPT_CPU_ISA=%s is not one of portable, avx2, avx512: using the CPU's best (%s)", env,
              cpu_isa_name(cpu_isa_detected()));
    }
    const char *portable = getenv("AGPT_CPU_PORTABLE");  // the older switch, kept as an alias
    if (portable && portable[0] == '1') return CPU_ISA_PORTABLE;
    return CPU_ISA_AVX512;
}

CpuIsa cpu_isa(void) {
    int cap = __atomic_load_n(&isa_cap, __ATOMIC_RELAXED);
    if (cap < 0) {
        int expected = -1;
        __atomic_compare_exchange_n(&isa_cap, &expected, cap_from_environment(), false, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
        cap = __atomic_load_n(&isa_cap, __ATOMIC_RELAXED);
    }
    CpuIsa detected = cpu_isa_detected();
    return cap < (int)detected ? (CpuIsa)cap : detected;
}

CpuIsa cpu_set_isa(CpuIsa cap) {
    __atomic_store_n(&isa_cap, (int)cap, __ATOMIC_RELAXED);
    return cpu_isa();
}
