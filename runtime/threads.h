// OpenMP threading: one place that sets and reports the thread count for the CPU backend and OpenBLAS.
#pragma once

// n <= 0 means all cores (or $OMP_NUM_THREADS when set).
void threads_set(int n);
int threads_get(void);
