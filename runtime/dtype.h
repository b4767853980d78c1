// Element types and the scalar conversions between them.
// Conversions to f16 and bf16 round to nearest, ties to even, like PyTorch and CUDA's __float2half_rn.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef enum DType { DT_F32 = 0, DT_F16, DT_BF16, DT_I32, DT_U8, DT_COUNT } DType;

size_t dtype_size(DType dt);
const char *dtype_name(DType dt);           // "f32", "f16", "bf16", "i32", "u8"
int dtype_from_name(const char *name);      // -1 if unknown
int dtype_is_float(DType dt);

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_bf16(float f);

// Converts n elements of one dtype to another on the host (float types only, plus identity).
// Returns 0 on success, -1 for an unsupported pair.
int convert_host(void *dst, DType dst_dt, const void *src, DType src_dt, size_t n);
