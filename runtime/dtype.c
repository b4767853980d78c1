#include "runtime/dtype.h"

#include <string.h>

size_t dtype_size(DType dt) {
    switch (dt) {
    case DT_F32: case DT_I32: return 4;
    case DT_F16: case DT_BF16: return 2;
    case DT_U8: return 1;
    default: return 0;
    }
}

static const char *dtype_names[DT_COUNT] = {"f32", "f16", "bf16", "i32", "u8"};

const char *dtype_name(DType dt) { return (dt >= 0 && dt < DT_COUNT) ? dtype_names[dt] : "?"; }

int dtype_from_name(const char *name) {
    for (int i = 0; i < DT_COUNT; i++)
        if (strcmp(name, dtype_names[i]) == 0) return i;
    return -1;
}

int dtype_is_float(DType dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));  // inf or NaN (payload kept)
    if (exp == 0) {
        if (man == 0) return float_of(sign);                               // signed zero
        // Denormal: value = man * 2^-24, exact in f32.
        float v = (float)man * 5.9604644775390625e-8f;
        return float_of(sign | bits_of(v));
    }
    return float_of(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t f32_to_f16(float f) {
    uint32_t u = bits_of(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) {                       // inf or NaN
        if (abs == 0x7f800000u) return sign | 0x7c00;
        return sign | 0x7e00 | (uint16_t)((abs >> 13) & 0x1ff);  // quiet NaN, keep some payload
    }
    if (abs >= 0x477ff000u) return sign | 0x7c00;   // rounds to >= 65520: overflow to inf
    if (abs < 0x38800000u) {                        // below the smallest normal 2^-14: denormal or zero
        if (abs < 0x33000000u) return sign;         // below half the smallest denormal 2^-25: zero
        // Shift the full mantissa (with implicit 1) into denormal position, rounding to nearest even.
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - exp;                 // 14..24 bits dropped beyond the 10-bit field
        uint32_t result = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (result & 1))) result++;
        return sign | (uint16_t)result;
    }
    // Normal: rebias exponent 127 -> 15, round the 13 dropped mantissa bits to nearest even.
    uint32_t result = ((abs >> 13) - (112u << 10));
    uint32_t rem = abs & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (result & 1))) result++;  // may carry into inf: correct
    return sign | (uint16_t)result;
}

float bf16_to_f32(uint16_t b) { return float_of((uint32_t)b << 16); }

uint16_t f32_to_bf16(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN (quiet)
    uint32_t rounding = 0x7fff + ((u >> 16) & 1);
    return (uint16_t)((u + rounding) >> 16);
}

int convert_host(void *dst, DType dst_dt, const void *src, DType src_dt, size_t n) {
    if (dst_dt == src_dt) { memmove(dst, src, n * dtype_size(src_dt)); return 0; }
    if (!dtype_is_float(dst_dt) || !dtype_is_float(src_dt)) return -1;
    for (size_t i = 0; i < n; i++) {
        float v;
        switch (src_dt) {
        case DT_F32: v = ((const float *)src)[i]; break;
        case DT_F16: v = f16_to_f32(((const uint16_t *)src)[i]); break;
        default: v = bf16_to_f32(((const uint16_t *)src)[i]); break;
        }
        switch (dst_dt) {
        case DT_F32: ((float *)dst)[i] = v; break;
        case DT_F16: ((uint16_t *)dst)[i] = f32_to_f16(v); break;
        default: ((uint16_t *)dst)[i] = f32_to_bf16(v); break;
        }
    }
    return 0;
}
