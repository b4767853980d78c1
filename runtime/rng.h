// A seeded, reproducible random generator (xoshiro256**, seeded through splitmix64).
// The same seed gives the same sequence on every machine and thread count.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct Rng {
    uint64_t s[4];
} Rng;

void rng_seed(Rng *r, uint64_t seed);
uint64_t rng_u64(Rng *r);
float rng_uniform(Rng *r);                       // [0, 1) with 24 random bits
float rng_normal(Rng *r);                        // standard normal (Box-Muller)
void rng_fill_uniform(Rng *r, float *x, size_t n, float lo, float hi);
void rng_fill_normal(Rng *r, float *x, size_t n, float mean, float std);
