#!/usr/bin/env bash
# The test command: install dependencies, build (with CUDA where nvcc exists, so CUDA build errors are
# caught), run every test (GPU tests report skipped without a device), then rebuild the CPU engine with
# AddressSanitizer + UBSan and run the CPU tests again. The three CPU runs cover the three SIMD levels
# (kernels/cpu/isa.h): the CPU's best, portable C (with OpenBLAS's AVX2 kernels), and AVX2 under the sanitizers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"

# The CPU decides which SIMD kernels run (kernels/cpu/isa.h) and which OpenBLAS kernels run: say which it is.
echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores =="
echo "   SIMD: $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512dq|avx512_bf16|amx_bf16)$' | tr '\n' ' ')"

echo "== build (Release) =="
"$root/tools/build.sh" "$root/build"
echo "== tests =="
(cd "$root/build" && ctest --output-on-failure)
# Once more with the lowest SIMD level forced (portable C) and OpenBLAS's Haswell kernels, the ones AVX2-only
# machines (AMD Zen, most cloud x86) run, so a machine with AVX-512 also tests what others run.
echo "== CPU tests with AGPT_CPU_ISA=portable OPENBLAS_CORETYPE=Haswell =="
(cd "$root/build" && AGPT_CPU_ISA=portable OPENBLAS_CORETYPE=Haswell ctest --output-on-failure -L cpu -E '^test_(ops_cpu_bf16_|cpu_isa_env_)')

echo "== build (ASan + UBSan, CPU) =="
"$root/tools/build.sh" "$root/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAGPT_SANITIZE=ON
echo "== tests under sanitizers (AGPT_CPU_ISA=avx2: the middle SIMD level's model paths) =="
(cd "$root/build-asan" && AGPT_CPU_ISA=avx2 ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -L cpu)
