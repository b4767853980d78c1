// Fused flash-style attention on tensor cores (mma.sync m16n8k16, f16 or bf16 in, f32 accumulate; sm_80+,
// so it runs on the RTX 3090 (sm_86) and the H100/H200 (sm_90) alike). Head dims 64, 80 and 128.
//
//   q: [B,Tq,H,D]   k, v: [B,Tk,H,D]   out: [B,Tq,H,D]   (heads interleaved, as the QKV projection writes them;
//   one head's row is D contiguous elements, consecutive tokens are H*D apart)
//   s_ij = scale q_i . k_j; causal: query i sees keys j <= i + (Tk - Tq); a query that sees no key gets 0.
//
// Kernels (one instantiation per storage type and D):
//   flash_fwd_kernel<T,D,false>   forward: 4 warps, 64 queries per block (16 per warp), key tiles of 64,
//                                 online softmax in registers; O never leaves registers until the end.
//   flash_fwd_kernel<T,D,true>    the same pass for the backward: instead of O it writes per query the
//                                 log-sum-exp (base 2, of the scaled scores) and delta_i = dO_i . O_i.
//   flash_decode_kernel<T,D>      Tq = 1 over a long cache: split-K over the keys (grid: splits x H x B), a
//   flash_decode_combine_kernel   group of lanes per key with 16-byte loads, partial (m, l, o) per split in the
//                                 workspace, then one combine pass per (b, h).
//   flash_bwd_dq_kernel<T,D>      dQ: 4 warps x 16 queries, key tiles of 32; P and dS rebuilt from the saved
//                                 statistics; each dQ row written by exactly one warp (no atomics).
//   flash_bwd_dkdv_kernel<T,D>    dK, dV: 4 warps x 16 keys, query tiles of 32; likewise one writer per row.
// The backward is flash-2 style but without the atomics: dQ and dK/dV are separate passes, so it recomputes
// S and dP twice and is deterministic. All its products are mma.sync too.
//
// ---- m16n8k16 fragment ownership (PTX ISA, "Matrix Fragments for mma.m16n8k16", f16/bf16 inputs) --------------
// lane = threadIdx.x % 32, g = lane / 4 (the "groupID"), t = lane % 4 (the "threadID_in_group").
// Each .b32 register holds two 16-bit elements; the element with the LOWER column (A) / row (B) index sits in
// the LOWER 16 bits.
//   A (16 x 16, row-major, rows m, columns k), 4 registers:
//     a0: (m = g,     k = 2t, 2t+1)      a1: (m = g + 8, k = 2t, 2t+1)
//     a2: (m = g,     k = 2t+8, 2t+9)    a3: (m = g + 8, k = 2t+8, 2t+9)
//   B (16 x 8, rows k, columns n; ".col" = each column's k's are what a register pairs), 2 registers:
//     b0: (k = 2t, 2t+1,  n = g)         b1: (k = 2t+8, 2t+9, n = g)
//   C/D (16 x 8, f32), 4 registers:
//     c0: (m = g, n = 2t)   c1: (m = g, n = 2t+1)   c2: (m = g + 8, n = 2t)   c3: (m = g + 8, n = 2t+1)
// Consequences used below:
//   * S = Q K^T: A = Q rows (k = head dim): a0 is the u32 at Q[g][k0 + 2t]. B = K^T: b0 is the u32 at
//     K[n0 + g][k0 + 2t] (a K row is contiguous in d, which is the k of this product).
//   * O = P V: the S accumulators of key tiles 2kk and 2kk+1 ARE the A fragment of k-step kk:
//     a0 = pack(S[2kk].c0, c1), a1 = pack(S[2kk].c2, c3), a2 = pack(S[2kk+1].c0, c1), a3 = pack(S[2kk+1].c2, c3).
//     B = V (k = key, n = d): b0 = pack(V[k0 + 2t][n0 + g], V[k0 + 2t + 1][n0 + g]): two 16-bit shared loads,
//     since consecutive k are different V rows. (No ldmatrix anywhere: plain shared loads only.)
// Every fragment load below names which of these rules it follows.
//
// Shared-memory rows are padded by 8 elements (16 bytes): the u32 fragment loads of a warp (8 rows g x 4
// words t) then fall in 32 different banks for D = 64, 80 and 128, and each row start stays 16-byte aligned
// for cp.async.
#include "kernels/cuda/common.cuh"

#include <type_traits>

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kFwdBQ = 16 * kWarps;  // queries per forward block
constexpr int kFwdBK = 64;           // keys per forward tile
constexpr int kBwdBQ = 32;           // queries per dK/dV-kernel tile
constexpr int kBwdBK = 32;           // keys per dQ-kernel tile
constexpr float kLog2e = 1.4426950408889634f;

// ---- tensor-core and copy primitives ----------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats rounded to T, `lo` in the low 16 bits.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same<T, __half>::value) {
        return (uint32_t)__half_as_ushort(__float2half_rn(lo)) |
               ((uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16);
    } else {
        return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
               ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
    }
}

// Two 16-bit elements from two places, `lo` in the low 16 bits.
template <typename T> __device__ __forceinline__ uint32_t pack_pair(const T *lo, const T *hi) {
    return (uint32_t)(*reinterpret_cast<const uint16_t *>(lo)) |
           ((uint32_t)(*reinterpret_cast<const uint16_t *>(hi)) << 16);
}

template <typename T> __device__ __forceinline__ uint32_t ld_u32(const T *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

// The two elements of a u32 fragment register as floats (low half first).
template <typename T> __device__ __forceinline__ void unpack2(uint32_t u, float &lo, float &hi) {
    if constexpr (std::is_same<T, __half>::value) {
        lo = __half2float(__ushort_as_half((unsigned short)(u & 0xFFFFu)));
        hi = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
    } else {
        lo = __bfloat162float(__ushort_as_bfloat16((unsigned short)(u & 0xFFFFu)));
        hi = __bfloat162float(__ushort_as_bfloat16((unsigned short)(u >> 16)));
    }
}

// 16 bytes global -> shared without a register round trip; `valid` false fills zeros (src-size 0 reads
// nothing, but the address must still be a mapped one: callers pass a row that exists).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" :: : "memory"); }
// The "memory" clobbers keep the compiler from moving shared-memory reads above the wait even where no
// __syncthreads follows (every wait here is followed by one today).
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [r0, r0 + ROWS) of one head (row stride `ld` elements) into smem rows of D + 8 elements; rows at or past
// `nrows` become zeros (so a partial tile multiplies as if padded with zero keys/queries: never garbage, which
// could be NaN and survive a multiplication by P = 0).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(T *smem, const T *base, int64_t ld, int r0, int nrows) {
    constexpr int VPR = D / 8;  // 16-byte vectors per row
    for (int idx = threadIdx.x; idx < ROWS * VPR; idx += kThreads) {
        const int r = idx / VPR, c = idx - r * VPR;
        const bool ok = r0 + r < nrows;
        const T *src = base + (int64_t)(ok ? r0 + r : 0) * ld + c * 8;
        cp_async16(smem + r * (D + 8) + c * 8, src, ok);
    }
}

// Sum and max over the 4 lanes of a quad (the lanes t = 0..3 sharing a row g).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}

// A fragments of a 16-row block of a head straight from global memory (rows at or past `nrows` read as 0):
// frag[ks] follows the A rule above for rows row0 + g and row0 + g + 8, k = 16 ks + 2t (+8).
template <typename T, int D>
__device__ __forceinline__ void load_a_frags_global(uint32_t (&frag)[D / 16][4], const T *base, int64_t ld, int row0,
                                                    int nrows, int g, int t) {
    const bool ok0 = row0 + g < nrows, ok1 = row0 + g + 8 < nrows;
    const T *r0 = base + (int64_t)(row0 + g) * ld, *r1 = base + (int64_t)(row0 + g + 8) * ld;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const int k = ks * 16 + 2 * t;
        frag[ks][0] = ok0 ? ld_u32(r0 + k) : 0u;
        frag[ks][1] = ok1 ? ld_u32(r1 + k) : 0u;
        frag[ks][2] = ok0 ? ld_u32(r0 + k + 8) : 0u;
        frag[ks][3] = ok1 ? ld_u32(r1 + k + 8) : 0u;
    }
}

// Number of keys a query block [q0, q0 + n) needs: all keys, or under the causal mask up to the last visible
// key of its last query (clamped to [0, Tk]).
__device__ __forceinline__ int keys_needed(int q_last, int Tq, int Tk, bool causal) {
    if (!causal) return Tk;
    const long long e = (long long)q_last + (Tk - Tq) + 1;
    return e < 0 ? 0 : (e > Tk ? Tk : (int)e);
}

struct FwdParams {
    void *out;           // [B,Tq,H,D] (plain forward)
    const void *q, *k, *v;
    const void *dout;    // [B,Tq,H,D] (statistics pass only)
    float *lse, *delta;  // [B,H,Tq] (statistics pass only): lse in base 2 of the scaled scores, +inf if no key
    int Tq, Tk, H;
    bool causal;
    float scale_log2;    // scale * log2(e): scores live in the base-2 domain
};

// ---------------------------------------------------------------------------------------------------------
// Forward. Grid (ceil(Tq / 64), H, B). Warp w owns queries q0 + 16 w .. q0 + 16 w + 15; lane (g, t) owns rows
// g and g + 8 of that strip: S accumulators s[nt][0..1] are row g, keys j0 + 8 nt + 2t (+1); s[nt][2..3] row g + 8.

template <typename T, int D, bool STATS>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const FwdParams p) {
    constexpr int KS = D / 16;     // k-steps over the head dim
    constexpr int NT = kFwdBK / 8; // key n-tiles of S
    constexpr int ND = D / 8;      // head-dim n-tiles of O
    __shared__ __align__(16) T sK[kFwdBK * (D + 8)];
    __shared__ __align__(16) T sV[kFwdBK * (D + 8)];

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int Tq = p.Tq, Tk = p.Tk, H = p.H;
    const int q0 = blockIdx.x * kFwdBQ;
    const int h = blockIdx.y, b = blockIdx.z;
    const int64_t ld = (int64_t)H * D;
    const T *qb = (const T *)p.q + ((int64_t)b * Tq * H + h) * D;
    const T *kb = (const T *)p.k + ((int64_t)b * Tk * H + h) * D;
    const T *vb = (const T *)p.v + ((int64_t)b * Tk * H + h) * D;

    const int qlast = min(q0 + kFwdBQ, Tq) - 1;
    const int kend = keys_needed(qlast, Tq, Tk, p.causal);
    const int ntiles = (kend + kFwdBK - 1) / kFwdBK;
    if (ntiles > 0) {
        load_tile_async<T, D, kFwdBK>(sK, kb, ld, 0, Tk);
        cp_async_commit();
    }

    uint32_t qf[KS][4];
    load_a_frags_global<T, D>(qf, qb, ld, q0 + 16 * w, Tq, g, t);

    const int row0 = q0 + 16 * w + g, row1 = row0 + 8;  // this lane's two query rows
    const int diag = Tk - Tq;                          // query i sees keys j <= i + diag
    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // l: this lane's partial sums

    for (int jt = 0; jt < ntiles; jt++) {
        const int j0 = jt * kFwdBK;
        load_tile_async<T, D, kFwdBK>(sV, vb, ld, j0, Tk);
        cp_async_commit();
        cp_async_wait<1>();  // K tile jt has landed (V tile jt may still be in flight)
        __syncthreads();

        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int n = 0; n < NT; n++) {
                // B rule: b0 = K[n0 + g][k0 + 2t], b1 = K[n0 + g][k0 + 2t + 8].
                const T *kr = sK + (n * 8 + g) * (D + 8) + ks * 16 + 2 * t;
                mma16816<T>(s[n], qf[ks], ld_u32(kr), ld_u32(kr + 8));
            }
        }

        // Scale into the base-2 domain and mask: keys past Tk, and under the causal mask keys after the
        // query's diagonal. Only tiles that reach past either need the per-element test.
        const bool need_mask = j0 + kFwdBK > Tk || (p.causal && j0 + kFwdBK - 1 > q0 + diag);
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[n][e] * p.scale_log2;
                if (need_mask) {
                    const int j = j0 + n * 8 + 2 * t + (e & 1);
                    const int i = e < 2 ? row0 : row1;
                    if (j >= Tk || (p.causal && j > i + diag)) x = -INFINITY;
                }
                s[n][e] = x;
            }
        }

        // Online softmax: new row maxima (over the quad), rescale what came before.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // A row with no visible key yet keeps max -inf: subtract 0 instead, so exp2(-inf - 0) = 0, not NaN.
        const float base0 = mx0 == -INFINITY ? 0.0f : mx0, base1 = mx1 == -INFINITY ? 0.0f : mx1;
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);  // m = -inf: 0 (l and o are 0 anyway)
        m0 = mx0;
        m1 = mx1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][0] *= corr0;
            o[n][1] *= corr0;
            o[n][2] *= corr1;
            o[n][3] *= corr1;
        }
#pragma unroll
        for (int n = 0; n < NT; n++) {
            s[n][0] = exp2f(s[n][0] - base0);
            s[n][1] = exp2f(s[n][1] - base0);
            s[n][2] = exp2f(s[n][2] - base1);
            s[n][3] = exp2f(s[n][3] - base1);
            l0 += s[n][0] + s[n][1];
            l1 += s[n][2] + s[n][3];
        }

        cp_async_wait<0>();  // V tile jt has landed
        __syncthreads();     // ... for every thread; and every warp is done reading sK
        if (jt + 1 < ntiles) {
            load_tile_async<T, D, kFwdBK>(sK, kb, ld, j0 + kFwdBK, Tk);
            cp_async_commit();
        }

        // O += P V over the tile's 64 keys: 4 k-steps of 16 keys.
#pragma unroll
        for (int kk = 0; kk < kFwdBK / 16; kk++) {
            uint32_t pa[4];  // A rule applied to the S accumulators (see the header)
            pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const T *v0 = sV + (kk * 16 + 2 * t) * (D + 8) + g;  // B rule: rows k0 + 2t, +1 (b0); +8, +9 (b1)
#pragma unroll
            for (int n = 0; n < ND; n++) {
                const T *vp = v0 + n * 8;
                const uint32_t b0 = pack_pair<T>(vp, vp + (D + 8));
                const uint32_t b1 = pack_pair<T>(vp + 8 * (D + 8), vp + 9 * (D + 8));
                mma16816<T>(o[n], pa, b0, b1);
            }
        }
        __syncthreads();  // every warp is done reading sV before the next tile overwrites it
    }

    // Epilogue: finish the row sums over the quad; C rule for the output columns: n-tile n, columns 8n + 2t, +1.
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    if constexpr (!STATS) {
        T *ob = (T *)p.out + ((int64_t)b * Tq * H + h) * D;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            const int c = n * 8 + 2 * t;
            if (row0 < Tq)
                *reinterpret_cast<uint32_t *>(ob + (int64_t)row0 * ld + c) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
            if (row1 < Tq)
                *reinterpret_cast<uint32_t *>(ob + (int64_t)row1 * ld + c) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
        }
    } else {
        // delta_i = dO_i . O_i with O in f32 (before rounding); lse_i = m_i + log2(l_i).
        const T *dob = (const T *)p.dout + ((int64_t)b * Tq * H + h) * D;
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            const int c = n * 8 + 2 * t;
            float x, y;
            if (row0 < Tq) {
                unpack2<T>(ld_u32(dob + (int64_t)row0 * ld + c), x, y);
                d0 += x * o[n][0] + y * o[n][1];
            }
            if (row1 < Tq) {
                unpack2<T>(ld_u32(dob + (int64_t)row1 * ld + c), x, y);
                d1 += x * o[n][2] + y * o[n][3];
            }
        }
        d0 = quad_sum(d0) * inv0;
        d1 = quad_sum(d1) * inv1;
        if (t == 0) {
            const int64_t sb = ((int64_t)b * H + h) * Tq;
            if (row0 < Tq) {
                p.lse[sb + row0] = l0 > 0.0f ? m0 + log2f(l0) : INFINITY;
                p.delta[sb + row0] = d0;
            }
            if (row1 < Tq) {
                p.lse[sb + row1] = l1 > 0.0f ? m1 + log2f(l1) : INFINITY;
                p.delta[sb + row1] = d1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Decode: Tq = 1 over Tk keys, split over the keys. Grid (nsplit, H, B), 128 threads. G lanes share a key
// (G = D/8 rounded up to a power of two, so the xor shuffles stay inside the group), each lane 8 head elements
// through one 16-byte load; the block's 128/G groups walk the split's keys U at a time, each keeping its own
// online (m, l, o), merged through shared memory at the end into one partial per split:
// part[((b * H + h) * nsplit + split) * (D + 2) + ...] = o[0..D), m, l  (base-2 domain, o unnormalised).

template <int D> constexpr int decode_group() { return D <= 64 ? 8 : 16; }

// Device-side lengths (op_attention_decode, for CUDA graphs replayed at every position): with `lens` non-null,
// sequence b has Tk = lens[b] keys (clamped to [0, S]) at batch stride S, and takes the split count
// cuda_flash_attention's host code picks for that sequence alone (B = 1, as the plain decode step calls it):
// n = min(n0, ceil(Tk / 64), wcap) with n0 = ceil(2 SMs / H) and wcap the splits whose partials (H of them) fit
// the workspace, then kps = ceil(Tk / n), n = ceil(Tk / kps). The grid is
// sized for Tk = S (the most any length can ask for); blocks past a sequence's n exit at once and the combine
// reads only the first n partials, so every number is computed as the host-length launch computes it. An empty
// sequence (Tk = 0) gets one split over no keys: a zero output.
__device__ __forceinline__ int decode_splits(int Tk, int n0, int wcap, int &kps) {
    if (Tk <= 0) {
        kps = 1;
        return 1;
    }
    int n = min(n0, (Tk + 63) / 64);
    n = min(n, wcap);
    kps = (Tk + n - 1) / n;
    return (Tk + kps - 1) / kps;
}

struct DecodeLens {
    const int32_t *lens;  // [B] on the device, or NULL: every sequence has the launch's Tk keys
    int S, n0, wcap;      // with lens: the cache's positions, and the split-count inputs above
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_decode_kernel(float *part, const T *q, const T *k, const T *v,
                                                                int Tk, int H, int keys_per_split,
                                                                float scale_log2, const DecodeLens dl) {
    constexpr int G = decode_group<D>(), NG = kThreads / G, U = 4;
    __shared__ float sm_m[NG], sm_l[NG];
    __shared__ float sm_o[NG][D];
    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, nsplit = gridDim.x;
    const int grp = threadIdx.x / G, c = threadIdx.x % G;
    const bool active = c * 8 < D;
    const int64_t ld = (int64_t)H * D;
    int64_t kstride = Tk;  // rows between sequences of k and v
    if (dl.lens) {
        Tk = min(max(dl.lens[b], 0), dl.S);
        kstride = dl.S;
        if (split >= decode_splits(Tk, dl.n0, dl.wcap, keys_per_split)) return;  // whole block: before any sync
    }
    const int kbeg = split * keys_per_split, kend = min(Tk, kbeg + keys_per_split);

    float qv[8];
    {
        float tmp[8];
        if (active) load_vec<T, 8>(q + ((int64_t)b * H + h) * D + c * 8, tmp);
#pragma unroll
        for (int e = 0; e < 8; e++) qv[e] = active ? tmp[e] * scale_log2 : 0.0f;
    }
    const T *kb = k + ((int64_t)b * kstride * H + h) * D + c * 8, *vb = v + ((int64_t)b * kstride * H + h) * D + c * 8;

    float m = -INFINITY, l = 0.0f, o[8];
#pragma unroll
    for (int e = 0; e < 8; e++) o[e] = 0.0f;
    // The trip count is the same for every thread (the shuffles below need whole warps); a group's keys are
    // kbeg + grp + NG * (u + U * iteration).
    for (int base = kbeg; base < kend; base += NG * U) {
        const int j0 = base + grp;
        float kr[U][8], vr[U][8], s[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = j0 + u * NG;
            const bool ok = active && j < kend;
#pragma unroll
            for (int e = 0; e < 8; e++) kr[u][e] = vr[u][e] = 0.0f;
            if (ok) {
                load_vec<T, 8>(kb + (int64_t)j * ld, kr[u]);
                load_vec<T, 8>(vb + (int64_t)j * ld, vr[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float d = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) d += qv[e] * kr[u][e];
#pragma unroll
            for (int off = G / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            s[u] = j0 + u * NG < kend ? d : -INFINITY;  // uniform over the group
        }
        float mnew = m;
#pragma unroll
        for (int u = 0; u < U; u++) mnew = fmaxf(mnew, s[u]);
        // A group that has seen no valid key yet keeps m = -inf: subtract 0 then, so nothing becomes NaN.
        const float mb = mnew == -INFINITY ? 0.0f : mnew;
        const float corr = exp2f(m - mb);
        l *= corr;
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] *= corr;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const float pj = exp2f(s[u] - mb);
            l += pj;
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] += pj * vr[u][e];
        }
        m = mnew;
    }
    if (c == 0) {
        sm_m[grp] = m;
        sm_l[grp] = l;
    }
    if (active) {
#pragma unroll
        for (int e = 0; e < 8; e++) sm_o[grp][c * 8 + e] = o[e];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < NG; i++) M = fmaxf(M, sm_m[i]);
    float *dst = part + (((int64_t)b * H + h) * nsplit + split) * (D + 2);
    for (int d = threadIdx.x; d < D; d += kThreads) {
        float acc = 0.0f;
        if (M != -INFINITY)
            for (int i = 0; i < NG; i++) acc += sm_o[i][d] * exp2f(sm_m[i] - M);
        dst[d] = acc;
    }
    if (threadIdx.x == 0) {
        float L = 0.0f;
        if (M != -INFINITY)
            for (int i = 0; i < NG; i++) L += sm_l[i] * exp2f(sm_m[i] - M);
        dst[D] = M;
        dst[D + 1] = L;
    }
}

// One block per (b, h): merges the splits' partials and writes out[b, 0, h, :].
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_decode_combine_kernel(T *out, const float *part, int H, int nsplit,
                                                                        const DecodeLens dl) {
    const int64_t bh = blockIdx.x;
    const float *pp = part + bh * nsplit * (D + 2);  // nsplit: the partials' stride (the decode grid's splits)
    if (dl.lens) {  // only this sequence's own splits
        int kps;
        nsplit = decode_splits(min(max(dl.lens[bh / H], 0), dl.S), dl.n0, dl.wcap, kps);
    }
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, pp[s * (D + 2) + D]);
    float L = 0.0f;
    if (M != -INFINITY)
        for (int s = 0; s < nsplit; s++) L += pp[s * (D + 2) + D + 1] * exp2f(pp[s * (D + 2) + D] - M);
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int d = threadIdx.x; d < D; d += kThreads) {
        float acc = 0.0f;
        if (M != -INFINITY)
            for (int s = 0; s < nsplit; s++) acc += pp[s * (D + 2) + d] * exp2f(pp[s * (D + 2) + D] - M);
        out[bh * D + d] = from_f32<T>(acc * inv);  // q/out [B,1,H,D]: (b, h) row at (b * H + h) * D
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, with P_ij = exp2(s_ij * scale_log2 - lse_i), dP_ij = dO_i . v_j, dS_ij = P_ij (dP_ij - delta_i):
//   dQ_i = scale sum_j dS_ij k_j     dK_j = scale sum_i dS_ij q_i     dV_j = sum_i P_ij dO_i

struct BwdParams {
    void *dq, *dk, *dv;
    const void *dout, *q, *k, *v;
    const float *lse, *delta;  // [B,H,Tq]
    int Tq, Tk, H;
    bool causal;
    float scale, scale_log2;
};

// dQ. Grid (ceil(Tq / 64), H, B). Warp w owns queries q0 + 16 w ..; Q and dO fragments stay in registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_dq_kernel(const BwdParams p) {
    constexpr int KS = D / 16, NT = kBwdBK / 8, ND = D / 8;
    __shared__ __align__(16) T sK[kBwdBK * (D + 8)];
    __shared__ __align__(16) T sV[kBwdBK * (D + 8)];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int Tq = p.Tq, Tk = p.Tk, H = p.H;
    const int q0 = blockIdx.x * kFwdBQ, h = blockIdx.y, b = blockIdx.z;
    const int64_t ld = (int64_t)H * D;
    const int64_t qoff = ((int64_t)b * Tq * H + h) * D, koff = ((int64_t)b * Tk * H + h) * D;
    const T *kb = (const T *)p.k + koff, *vb = (const T *)p.v + koff;

    uint32_t qf[KS][4], df[KS][4];
    load_a_frags_global<T, D>(qf, (const T *)p.q + qoff, ld, q0 + 16 * w, Tq, g, t);
    load_a_frags_global<T, D>(df, (const T *)p.dout + qoff, ld, q0 + 16 * w, Tq, g, t);
    const int row0 = q0 + 16 * w + g, row1 = row0 + 8, diag = Tk - Tq;
    const int64_t sb = ((int64_t)b * H + h) * Tq;
    // Rows past Tq: lse = +inf makes P = 0 there; their dQ is never stored.
    const float lse0 = row0 < Tq ? p.lse[sb + row0] : INFINITY, lse1 = row1 < Tq ? p.lse[sb + row1] : INFINITY;
    const float dl0 = row0 < Tq ? p.delta[sb + row0] : 0.0f, dl1 = row1 < Tq ? p.delta[sb + row1] : 0.0f;

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    const int kend = keys_needed(min(q0 + kFwdBQ, Tq) - 1, Tq, Tk, p.causal);
    for (int j0 = 0; j0 < kend; j0 += kBwdBK) {
        load_tile_async<T, D, kBwdBK>(sK, kb, ld, j0, Tk);
        load_tile_async<T, D, kBwdBK>(sV, vb, ld, j0, Tk);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int n = 0; n < NT; n++) {
                // B rule, rows of K (for S = Q K^T) and of V (for dP = dO V^T) are contiguous in d.
                const T *kr = sK + (n * 8 + g) * (D + 8) + ks * 16 + 2 * t;
                const T *vr = sV + (n * 8 + g) * (D + 8) + ks * 16 + 2 * t;
                mma16816<T>(s[n], qf[ks], ld_u32(kr), ld_u32(kr + 8));
                mma16816<T>(dp[n], df[ks], ld_u32(vr), ld_u32(vr + 8));
            }
        }
        // dS in place of s. C rule: s[n][e] is row (e < 2 ? g : g + 8), key j0 + 8n + 2t + (e & 1).
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + n * 8 + 2 * t + (e & 1);
                const int i = e < 2 ? row0 : row1;
                const bool vis = j < Tk && (!p.causal || j <= i + diag);
                const float pr = vis ? exp2f(s[n][e] * p.scale_log2 - (e < 2 ? lse0 : lse1)) : 0.0f;
                s[n][e] = pr * (dp[n][e] - (e < 2 ? dl0 : dl1));
            }
        }
        // dQ += dS K: A = dS (rows queries, k = keys) from the accumulators as in the forward's P;
        // B = K (k = key, n = d): b0 = (K[k0 + 2t][n0 + g], K[k0 + 2t + 1][n0 + g]).
#pragma unroll
        for (int kk = 0; kk < kBwdBK / 16; kk++) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const T *k0p = sK + (kk * 16 + 2 * t) * (D + 8) + g;
#pragma unroll
            for (int n = 0; n < ND; n++) {
                const T *kp = k0p + n * 8;
                mma16816<T>(acc[n], a, pack_pair<T>(kp, kp + (D + 8)),
                            pack_pair<T>(kp + 8 * (D + 8), kp + 9 * (D + 8)));
            }
        }
        __syncthreads();  // done with sK/sV before the next tile lands
    }

    T *dqb = (T *)p.dq + qoff;
#pragma unroll
    for (int n = 0; n < ND; n++) {
        const int c = n * 8 + 2 * t;
        if (row0 < Tq)
            *reinterpret_cast<uint32_t *>(dqb + (int64_t)row0 * ld + c) =
                pack2<T>(p.scale * acc[n][0], p.scale * acc[n][1]);
        if (row1 < Tq)
            *reinterpret_cast<uint32_t *>(dqb + (int64_t)row1 * ld + c) =
                pack2<T>(p.scale * acc[n][2], p.scale * acc[n][3]);
    }
}

// dK and dV. Grid (ceil(Tk / 64), H, B), dynamic shared memory (see dkdv_smem_bytes). Warp w owns keys
// j0 + 16 w ..; everything is computed transposed (keys as the M rows): S^T = K Q^T, dP^T = V dO^T,
// dV += P^T dO, dK += dS^T Q. The K and V A-fragments are read from shared memory at each use (keeping them
// in registers next to the two D-wide accumulators would spill at D = 128).
template <int D> constexpr int dkdv_smem_bytes() {
    return (2 * 16 * kWarps * (D + 8) + 2 * kBwdBQ * (D + 8)) * 2 + 2 * kBwdBQ * (int)sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_dkdv_kernel(const BwdParams p) {
    constexpr int KS = D / 16, NT = kBwdBQ / 8, ND = D / 8, BKEYS = 16 * kWarps;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);
    T *sV = sK + BKEYS * (D + 8);
    T *sQ = sV + BKEYS * (D + 8);
    T *sO = sQ + kBwdBQ * (D + 8);  // dO tile
    float *sL = reinterpret_cast<float *>(sO + kBwdBQ * (D + 8));  // lse of the tile's queries
    float *sD = sL + kBwdBQ;                                       // delta

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int Tq = p.Tq, Tk = p.Tk, H = p.H;
    const int j0 = blockIdx.x * BKEYS, h = blockIdx.y, b = blockIdx.z;
    const int64_t ld = (int64_t)H * D;
    const int64_t qoff = ((int64_t)b * Tq * H + h) * D, koff = ((int64_t)b * Tk * H + h) * D;
    const T *qb = (const T *)p.q + qoff, *dob = (const T *)p.dout + qoff;
    const int64_t sb = ((int64_t)b * H + h) * Tq;
    const int diag = Tk - Tq;

    load_tile_async<T, D, BKEYS>(sK, (const T *)p.k + koff, ld, j0, Tk);
    load_tile_async<T, D, BKEYS>(sV, (const T *)p.v + koff, ld, j0, Tk);
    cp_async_commit();

    const int key0 = j0 + 16 * w + g, key1 = key0 + 8;  // this lane's two key rows
    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;

    // The first query that sees key j0 is j0 - diag: earlier query tiles see none of this block's keys.
    int istart = p.causal ? j0 - diag : 0;
    if (istart < 0) istart = 0;
    istart = istart / kBwdBQ * kBwdBQ;
    const T *kw = sK + (16 * w) * (D + 8), *vw = sV + (16 * w) * (D + 8);

    for (int i0 = istart; i0 < Tq; i0 += kBwdBQ) {
        load_tile_async<T, D, kBwdBQ>(sQ, qb, ld, i0, Tq);
        load_tile_async<T, D, kBwdBQ>(sO, dob, ld, i0, Tq);
        cp_async_commit();
        if (threadIdx.x < kBwdBQ) {
            const int i = i0 + threadIdx.x;
            sL[threadIdx.x] = i < Tq ? p.lse[sb + i] : INFINITY;  // +inf: P = 0 for padding queries
            sD[threadIdx.x] = i < Tq ? p.delta[sb + i] : 0.0f;
        }
        cp_async_wait<0>();
        __syncthreads();

        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            uint32_t ka[4], va[4];  // A rule on the warp's 16 key rows of K and V
            const T *kr = kw + g * (D + 8) + ks * 16 + 2 * t, *vr = vw + g * (D + 8) + ks * 16 + 2 * t;
            ka[0] = ld_u32(kr);
            ka[1] = ld_u32(kr + 8 * (D + 8));
            ka[2] = ld_u32(kr + 8);
            ka[3] = ld_u32(kr + 8 * (D + 8) + 8);
            va[0] = ld_u32(vr);
            va[1] = ld_u32(vr + 8 * (D + 8));
            va[2] = ld_u32(vr + 8);
            va[3] = ld_u32(vr + 8 * (D + 8) + 8);
#pragma unroll
            for (int n = 0; n < NT; n++) {
                // B rule: b0 = X[n0 + g][k0 + 2t] with X = Q (for S^T) or dO (for dP^T), contiguous in d.
                const T *qr = sQ + (n * 8 + g) * (D + 8) + ks * 16 + 2 * t;
                const T *orr = sO + (n * 8 + g) * (D + 8) + ks * 16 + 2 * t;
                mma16816<T>(s[n], ka, ld_u32(qr), ld_u32(qr + 8));
                mma16816<T>(dp[n], va, ld_u32(orr), ld_u32(orr + 8));
            }
        }
        // C rule: s[n][e] is key (e < 2 ? key0 : key1), query i0 + 8n + 2t + (e & 1). P^T into s, dS^T into dp.
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = n * 8 + 2 * t + (e & 1);
                const int i = i0 + qi, j = e < 2 ? key0 : key1;
                const bool vis = !p.causal || j <= i + diag;  // i >= Tq: lse = +inf gives 0 already
                const float pr = vis ? exp2f(s[n][e] * p.scale_log2 - sL[qi]) : 0.0f;
                s[n][e] = pr;
                dp[n][e] = pr * (dp[n][e] - sD[qi]);
            }
        }
        // dV += P^T dO and dK += dS^T Q: A from the accumulators (queries are k now), B = dO or Q with
        // k = query, n = d: b0 = (X[k0 + 2t][n0 + g], X[k0 + 2t + 1][n0 + g]).
#pragma unroll
        for (int kk = 0; kk < kBwdBQ / 16; kk++) {
            uint32_t pa[4], da[4];
            pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            da[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
            da[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
            da[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            da[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
            const T *o0 = sO + (kk * 16 + 2 * t) * (D + 8) + g, *q0p = sQ + (kk * 16 + 2 * t) * (D + 8) + g;
#pragma unroll
            for (int n = 0; n < ND; n++) {
                const T *op = o0 + n * 8, *qp = q0p + n * 8;
                mma16816<T>(dv[n], pa, pack_pair<T>(op, op + (D + 8)),
                            pack_pair<T>(op + 8 * (D + 8), op + 9 * (D + 8)));
                mma16816<T>(dk[n], da, pack_pair<T>(qp, qp + (D + 8)),
                            pack_pair<T>(qp + 8 * (D + 8), qp + 9 * (D + 8)));
            }
        }
        __syncthreads();  // done with sQ/sO/sL/sD before the next tile lands
    }
    cp_async_wait<0>();  // no query tile at all (istart >= Tq): the K/V copies must still finish

    T *dkb = (T *)p.dk + koff, *dvb = (T *)p.dv + koff;
#pragma unroll
    for (int n = 0; n < ND; n++) {
        const int c = n * 8 + 2 * t;
        if (key0 < Tk) {
            *reinterpret_cast<uint32_t *>(dkb + (int64_t)key0 * ld + c) =
                pack2<T>(p.scale * dk[n][0], p.scale * dk[n][1]);
            *reinterpret_cast<uint32_t *>(dvb + (int64_t)key0 * ld + c) = pack2<T>(dv[n][0], dv[n][1]);
        }
        if (key1 < Tk) {
            *reinterpret_cast<uint32_t *>(dkb + (int64_t)key1 * ld + c) =
                pack2<T>(p.scale * dk[n][2], p.scale * dk[n][3]);
            *reinterpret_cast<uint32_t *>(dvb + (int64_t)key1 * ld + c) = pack2<T>(dv[n][2], dv[n][3]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

int sm_count() {
    static int count = 0;  // read once; a benign race (every thread stores the same value)
    if (count == 0) {
        int dev = 0, n = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) !=
                                                      cudaSuccess || n <= 0)
            n = 80;
        count = n;
    }
    return count;
}

template <typename T, int D>
Status launch_forward(cudaStream_t s, const FwdParams &p, int B, bool stats) {
    dim3 grid((unsigned)((p.Tq + kFwdBQ - 1) / kFwdBQ), (unsigned)p.H, (unsigned)B);
    if (stats) {
        flash_fwd_kernel<T, D, true><<<grid, kThreads, 0, s>>>(p);
        CUDA_LAUNCH_CHECK("flash_fwd_kernel (statistics)");
    } else {
        flash_fwd_kernel<T, D, false><<<grid, kThreads, 0, s>>>(p);
        CUDA_LAUNCH_CHECK("flash_fwd_kernel");
    }
    return AGPT_OK;
}

template <typename T, int D>
Status launch_decode(cudaStream_t s, float *part, int nsplit, int kps, void *out, const void *q, const void *k,
                     const void *v, int B, int Tk, int H, float scale_log2, const DecodeLens &dl) {
    dim3 grid((unsigned)nsplit, (unsigned)H, (unsigned)B);
    flash_decode_kernel<T, D><<<grid, kThreads, 0, s>>>(part, (const T *)q, (const T *)k, (const T *)v, Tk, H, kps,
                                                          scale_log2, dl);
    CUDA_LAUNCH_CHECK("flash_decode_kernel");
    flash_decode_combine_kernel<T, D><<<(unsigned)(B * H), kThreads, 0, s>>>((T *)out, part, H, nsplit, dl);
    CUDA_LAUNCH_CHECK("flash_decode_combine_kernel");
    return AGPT_OK;
}

template <typename T, int D>
Status launch_backward(cudaStream_t s, const BwdParams &p, int B) {
    dim3 gq((unsigned)((p.Tq + kFwdBQ - 1) / kFwdBQ), (unsigned)p.H, (unsigned)B);
    flash_bwd_dq_kernel<T, D><<<gq, kThreads, 0, s>>>(p);
    CUDA_LAUNCH_CHECK("flash_bwd_dq_kernel");
    constexpr int smem = dkdv_smem_bytes<D>();
    if (smem > 48 * 1024)  // per device and function: set it on every call (a cheap host-side call)
        CUDA_TRY(cudaFuncSetAttribute(flash_bwd_dkdv_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    dim3 gk((unsigned)((p.Tk + 16 * kWarps - 1) / (16 * kWarps)), (unsigned)p.H, (unsigned)B);
    flash_bwd_dkdv_kernel<T, D><<<gk, kThreads, smem, s>>>(p);
    CUDA_LAUNCH_CHECK("flash_bwd_dkdv_kernel");
    return AGPT_OK;
}

#define FLASH_D_SWITCH(D, FN, ...)                                                                         \
    switch (D) {                                                                                           \
    case 64: return FN<T, 64>(__VA_ARGS__);                                                                \
    case 80: return FN<T, 80>(__VA_ARGS__);                                                                \
    default: return FN<T, 128>(__VA_ARGS__);                                                               \
    }

template <typename T> Status forward_t(cudaStream_t s, const FwdParams &p, int B, int D, bool stats) {
    FLASH_D_SWITCH(D, launch_forward, s, p, B, stats)
}
template <typename T>
Status decode_t(cudaStream_t s, float *part, int nsplit, int kps, void *out, const void *q, const void *k,
                const void *v, int B, int Tk, int H, int D, float scale_log2, const DecodeLens &dl = DecodeLens{}) {
    FLASH_D_SWITCH(D, launch_decode, s, part, nsplit, kps, out, q, k, v, B, Tk, H, scale_log2, dl)
}
template <typename T> Status backward_t(cudaStream_t s, const BwdParams &p, int B, int D) {
    FLASH_D_SWITCH(D, launch_backward, s, p, B)
}

// Checks shared by the entry points. Sizes must fit the int indexing and the grid.
Status flash_check(const char *fn, DType dt, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D,
                   std::initializer_list<const void *> ptrs) {
    if (!cuda_flash_attention_supported(dt, D, B, Tq, Tk, H))
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: flash attention takes f16/bf16, D in {64, 80, 128}, "
                         "B, H <= 65535 and Tq, Tk < 2^30; got %s D=%lld B=%lld H=%lld Tq=%lld Tk=%lld", fn,
                         dtype_name(dt), (long long)D, (long long)B, (long long)H, (long long)Tq, (long long)Tk);
    for (const void *ptr : ptrs)
        if (!aligned16(ptr))
            return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: flash attention needs 16-byte aligned q, k, v and outputs",
                             fn);
    return AGPT_OK;
}

}  // namespace

extern "C" bool cuda_flash_attention_supported(DType dt, int64_t D, int64_t B, int64_t Tq, int64_t Tk, int64_t H) {
    return (dt == DT_F16 || dt == DT_BF16) && (D == 64 || D == 80 || D == 128) && B >= 0 && H >= 0 && Tq >= 0 &&
           Tk >= 0 && B <= 65535 && H <= 65535 && Tq < (1 << 30) && Tk < (1 << 30);
}

extern "C" Status cuda_flash_attention(Engine *e, DType dt, void *out, const void *q, const void *k, const void *v,
                                       int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal,
                                       float scale) {
    AGPT_TRY(flash_check("cuda_flash_attention", dt, B, Tq, Tk, H, D, {out, q, k, v}));
    if (B == 0 || Tq == 0 || H == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    const float scale_log2 = scale * kLog2e;
    if (Tq == 1 && Tk > 0) {
        // Split-K decode: enough blocks for about two waves, at least 64 keys a split, partials in the workspace.
        const int64_t bh = B * H;
        int64_t nsplit = (2 * sm_count() + bh - 1) / bh;
        const int64_t max_by_keys = (Tk + 63) / 64;
        if (nsplit > max_by_keys) nsplit = max_by_keys;
        const int64_t per = bh * (D + 2) * (int64_t)sizeof(float);
        if (nsplit * per > (int64_t)e->workspace_bytes) nsplit = (int64_t)e->workspace_bytes / per;
        if (nsplit >= 1 && nsplit <= 65535) {
            const int64_t kps = (Tk + nsplit - 1) / nsplit;
            nsplit = (Tk + kps - 1) / kps;  // no empty split
            return dt == DT_F16 ? decode_t<__half>(s, (float *)e->workspace, (int)nsplit, (int)kps, out, q, k, v,
                                                   (int)B, (int)Tk, (int)H, (int)D, scale_log2)
                                : decode_t<__nv_bfloat16>(s, (float *)e->workspace, (int)nsplit, (int)kps, out, q, k,
                                                          v, (int)B, (int)Tk, (int)H, (int)D, scale_log2);
        }
        // B * H too large for the workspace: the general kernel handles Tq = 1 too.
    }
    FwdParams p = {};
    p.out = out;
    p.q = q;
    p.k = k;
    p.v = v;
    p.Tq = (int)Tq;
    p.Tk = (int)Tk;
    p.H = (int)H;
    p.causal = causal;
    p.scale_log2 = scale_log2;
    return dt == DT_F16 ? forward_t<__half>(s, p, (int)B, (int)D, false)
                        : forward_t<__nv_bfloat16>(s, p, (int)B, (int)D, false);
}

extern "C" Status cuda_flash_attention_decode(Engine *e, DType dt, void *out, const void *q, const void *k,
                                              const void *v, const int32_t *lengths, int64_t B, int64_t S, int64_t H,
                                              int64_t D, float scale) {
    AGPT_TRY(flash_check("cuda_flash_attention_decode", dt, B, 1, S, H, D, {out, q, k, v}));
    AGPT_CHECK_ARG(lengths != NULL, "cuda_flash_attention_decode: lengths are missing");
    if (B == 0 || H == 0) return AGPT_OK;
    // The split choice cuda_flash_attention makes for one sequence (the plain decode step attends one sequence
    // at a time: B = 1, so B*H = H), taken for Tk = S for the grid and per sequence in the kernels. The partials
    // of all B sequences share the workspace at once.
    const int64_t n0 = (2 * sm_count() + H - 1) / H;
    const int64_t per = H * (D + 2) * (int64_t)sizeof(float);  // one sequence's partials per split
    const int64_t wcap = (int64_t)e->workspace_bytes / per;
    int64_t grid = n0 < (S + 63) / 64 ? n0 : (S + 63) / 64;
    if (grid > wcap) grid = wcap;
    if (S < 1 || grid < 1 || grid > 65535 || B * grid * per > (int64_t)e->workspace_bytes)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "cuda_flash_attention_decode: the partials of %lld sequences x %lld "
                         "heads x %lld splits do not fit the %zu-byte workspace", (long long)B, (long long)H,
                         (long long)grid, e->workspace_bytes);
    DecodeLens dl;
    dl.lens = lengths;
    dl.S = (int)S;
    dl.n0 = (int)(n0 < 65535 ? n0 : 65535);  // larger n0 never wins: the grid is at most 65535
    dl.wcap = (int)(wcap < 65535 ? wcap : 65535);
    const float scale_log2 = scale * kLog2e;
    cudaStream_t s = engine_stream(e);
    return dt == DT_F16 ? decode_t<__half>(s, (float *)e->workspace, (int)grid, 1, out, q, k, v, (int)B, (int)S,
                                           (int)H, (int)D, scale_log2, dl)
                        : decode_t<__nv_bfloat16>(s, (float *)e->workspace, (int)grid, 1, out, q, k, v, (int)B,
                                                  (int)S, (int)H, (int)D, scale_log2, dl);
}

extern "C" bool cuda_flash_attention_backward_fits(Engine *e, int64_t B, int64_t Tq, int64_t H) {
    return 2 * B * H * Tq * (int64_t)sizeof(float) <= (int64_t)e->workspace_bytes;
}

extern "C" Status cuda_flash_attention_backward(Engine *e, DType dt, void *dq, void *dk, void *dv, const void *dout,
                                                const void *q, const void *k, const void *v, int64_t B, int64_t Tq,
                                                int64_t Tk, int64_t H, int64_t D, bool causal, float scale) {
    AGPT_TRY(flash_check("cuda_flash_attention_backward", dt, B, Tq, Tk, H, D, {dq, dk, dv, dout, q, k, v}));
    if (B == 0 || H == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    if (Tq == 0 || Tk == 0) {  // nothing attends: every gradient is an empty sum (+0 is all-zero bytes)
        const size_t kbytes = (size_t)(B * Tk * H * D) * dtype_size(dt);
        const size_t qbytes = (size_t)(B * Tq * H * D) * dtype_size(dt);
        if (kbytes) {
            CUDA_TRY(cudaMemsetAsync(dk, 0, kbytes, s));
            CUDA_TRY(cudaMemsetAsync(dv, 0, kbytes, s));
        }
        if (qbytes) CUDA_TRY(cudaMemsetAsync(dq, 0, qbytes, s));
        return AGPT_OK;
    }
    if (!cuda_flash_attention_backward_fits(e, B, Tq, H))
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "cuda_flash_attention_backward: the %lld x 2 statistics of B*H*Tq do "
                         "not fit the %zu-byte engine workspace", (long long)(B * H * Tq), e->workspace_bytes);
    float *lse = (float *)e->workspace, *delta = lse + B * H * Tq;
    FwdParams f = {};
    f.q = q;
    f.k = k;
    f.v = v;
    f.dout = dout;
    f.lse = lse;
    f.delta = delta;
    f.Tq = (int)Tq;
    f.Tk = (int)Tk;
    f.H = (int)H;
    f.causal = causal;
    f.scale_log2 = scale * kLog2e;
    BwdParams p = {};
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.dout = dout;
    p.q = q;
    p.k = k;
    p.v = v;
    p.lse = lse;
    p.delta = delta;
    p.Tq = (int)Tq;
    p.Tk = (int)Tk;
    p.H = (int)H;
    p.causal = causal;
    p.scale = scale;
    p.scale_log2 = scale * kLog2e;
    if (dt == DT_F16) {
        AGPT_TRY(forward_t<__half>(s, f, (int)B, (int)D, true));
        return backward_t<__half>(s, p, (int)B, (int)D);
    }
    AGPT_TRY(forward_t<__nv_bfloat16>(s, f, (int)B, (int)D, true));
    return backward_t<__nv_bfloat16>(s, p, (int)B, (int)D);
}
