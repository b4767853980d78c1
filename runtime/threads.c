#include "runtime/threads.h"

#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// OpenBLAS has its own pool; keep it in step so BLAS and our loops use the same cores.
void openblas_set_num_threads(int num_threads) __attribute__((weak));

void threads_set(int n) {
#ifdef _OPENMP
    if (n <= 0 && getenv("OMP_NUM_THREADS")) return;  // the user's setting wins over "all cores"
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
#endif
    if (n > 0 && openblas_set_num_threads) openblas_set_num_threads(n);
}

int threads_get(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
