// Embedding lookup on the CPU backend: one row copy per id (ids already checked by kernels/ops.c).
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

void cpu_embedding(float *out, const float *table, const int32_t *ids, int64_t N, int64_t C) {
    for (int64_t i = 0; i < N; i++)
        memcpy(out + i * C, table + (int64_t)ids[i] * C, (size_t)C * sizeof(float));
}

void cpu_kv_append(float *cache, const float *rows, const int32_t *pos, int64_t B, int64_t C, int64_t max_seq) {
    for (int64_t b = 0; b < B; b++)
        memcpy(cache + (b * max_seq + pos[b]) * C, rows + b * C, (size_t)C * sizeof(float));
}
