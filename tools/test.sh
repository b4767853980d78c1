#!/usr/bin/env bash
# The test command: install dependencies, build (with CUDA where nvcc exists, so CUDA build errors are
# caught), run every test (GPU tests report skipped without a device), then rebuild the CPU engine with
# AddressSanitizer + UBSan and run the CPU tests again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"

echo "== build (Release) =="
"$root/tools/build.sh" "$root/build"
echo "== tests =="
(cd "$root/build" && ctest --output-on-failure)

echo "== build (ASan + UBSan, CPU) =="
"$root/tools/build.sh" "$root/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAGPT_SANITIZE=ON
echo "== tests under sanitizers =="
(cd "$root/build-asan" && ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -L cpu)
