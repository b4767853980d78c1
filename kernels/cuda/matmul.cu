// GEMM through cuBLASLt, and the bias gradient.
//
// Our tensors are row-major; cuBLASLt is column-major. A row-major X[r,c] is, byte for byte, the column-major
// X^T[c,r] with leading dimension c. So for the row-major C[M,N] = op(A)[M,K] @ op(B)[K,N] we ask cuBLASLt
// for the column-major C^T[N,M] = op(B)^T[N,K] @ op(A)^T[K,M]: the first cuBLASLt operand is b's memory,
// the second is a's, and neither needs a copy. b's memory read column-major is already op(B)^T when b is
// not transposed (row-major [K,N] -> column-major [N,K]), and needs cuBLASLt's transpose when it is
// (row-major [N,K] -> column-major [K,N]). Likewise for a.
//
// The bias epilogue adds a vector "per row of D". Our D is the column-major C^T[N,M], whose rows are our
// columns n, so bias[n] lands on every C[m,n]: exactly the row-major broadcast over rows that ops.h asks for.
// We use the epilogue only when beta == 0, where it is the ops.h formula exactly; with beta != 0 a separate
// kernel adds the bias after the GEMM, so the meaning never depends on how the epilogue orders bias and
// beta*C. op_linear always calls with beta = 0, so every biased linear layer (ViT qkv/out_proj/fc1/fc2, the
// patch decoder's fc) gets its bias from the epilogue, with no extra pass over the output.
//
// No GELU epilogue, on purpose. CUBLASLT_EPILOGUE_GELU_BIAS would fuse ViT's fc1 bias + GELU, but cuBLASLt's
// GELU is the tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) (cublasLt.h names it only "GELU";
// PyTorch's _addmm_activation(use_gelu=True), which uses it, matches F.gelu(approximate="tanh")), while ImageBind's
// nn.GELU is the exact erf form. The two differ by up to ~4e-4 per element, which would break the f32 1e-5 match
// with the reference. So fc1 uses the BIAS epilogue and op_gelu's exact-erf kernel runs after it.
//
// Compute type is CUBLAS_COMPUTE_32F with f32 scale for every storage dtype: f32 inputs get true fp32
// GEMMs (no TF32), so f32 results can be compared tightly against OpenBLAS; f16/bf16 get fp32 accumulation.
//
// Descriptors are made per call (a few microseconds) rather than cached: a cache would be global state
// shared by engines on several threads. The heuristic runs per call for the same reason.
#include <stdint.h>

#include "kernels/cuda/common.cuh"

static cudaDataType_t cuda_data_type(DType dt) {
    return dt == DT_F32 ? CUDA_R_32F : dt == DT_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

// The largest power of two (at most 256, cuBLASLt's default expectation) that divides the address and, for
// batched calls, the byte stride between items: every item's base pointer then has that alignment.
static uint32_t alignment_of(const void *p, int64_t stride_bytes, int64_t batch) {
    uint32_t al = 256;
    uintptr_t addr = (uintptr_t)p;
    while (al > 1 && (addr % al) != 0) al >>= 1;
    if (batch > 1 && stride_bytes != 0)
        while (al > 1 && ((uint64_t)stride_bytes % al) != 0) al >>= 1;
    return al;
}

// c = beta_c * c + bias broadcast over rows (bias may be NULL), for `batch` items of [M,N] `stride_c` apart.
// beta_c == 0 writes without reading c, so a NaN-filled output is fully overwritten (BLAS semantics).
template <typename T>
__global__ void scale_add_bias_kernel(T *c, const T *bias, int64_t batch, int64_t M, int64_t N, int64_t stride_c,
                                      float beta_c) {
    const int64_t per_item = M * N, total = batch * per_item;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t item = idx / per_item, rem = idx - item * per_item, col = rem % N;
        T *p = c + item * stride_c + rem;
        float v = beta_c == 0.0f ? 0.0f : beta_c * to_f32(*p);
        if (bias) v += to_f32(bias[col]);
        *p = from_f32<T>(v);
    }
}

template <typename T>
static Status launch_scale_add_bias(cudaStream_t s, void *c, const void *bias, int64_t batch, int64_t M, int64_t N,
                                    int64_t stride_c, float beta_c) {
    const int threads = 256;
    scale_add_bias_kernel<T><<<grid_for(batch * M * N, threads), threads, 0, s>>>(
        (T *)c, (const T *)bias, batch, M, N, stride_c, beta_c);
    CUDA_LAUNCH_CHECK("scale_add_bias_kernel");
    return AGPT_OK;
}

// Owns the cuBLASLt descriptors of one call, so every return path releases them.
struct LtCall {
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t first = NULL, second = NULL, out = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    ~LtCall() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (out) cublasLtMatrixLayoutDestroy(out);
        if (second) cublasLtMatrixLayoutDestroy(second);
        if (first) cublasLtMatrixLayoutDestroy(first);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

static Status make_layout(cublasLtMatrixLayout_t *layout, cudaDataType_t type, int64_t rows, int64_t cols,
                          int64_t ld, int64_t batch, int64_t stride) {
    CUBLAS_TRY(cublasLtMatrixLayoutCreate(layout, type, (uint64_t)rows, (uint64_t)cols, ld));
    if (batch > 1) {
        int32_t count = (int32_t)batch;
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                    sizeof count));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                    sizeof stride));
    }
    return AGPT_OK;
}

extern "C" Status cuda_matmul(Engine *e, DType dt, void *c, const void *a, const void *b, const void *bias,
                              int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                              int64_t stride_a, int64_t stride_b, int64_t stride_c, float alpha, float beta) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(batch >= 0 && M >= 0 && N >= 0 && K >= 0, "cuda_matmul: negative size batch=%lld M=%lld N=%lld "
                   "K=%lld", (long long)batch, (long long)M, (long long)N, (long long)K);
    AGPT_CHECK_ARG(batch <= INT32_MAX, "cuda_matmul: batch %lld exceeds cuBLASLt's 32-bit batch count",
                   (long long)batch);
    if (batch == 0 || M == 0 || N == 0) return AGPT_OK;
    cudaStream_t stream = engine_stream(e);

    // A batch over one shared b with contiguous, untransposed a and c items is one GEMM of batch*M rows:
    // bigger tiles, and no reliance on zero batch strides.
    if (batch > 1 && stride_b == 0 && !trans_a && stride_a == M * K && stride_c == M * N) {
        M *= batch;
        batch = 1;
    }

    // An empty sum: cuBLASLt rejects K = 0, and the answer is just beta * c + bias.
    if (K == 0) return DISPATCH_FLOAT(dt, launch_scale_add_bias, stream, c, bias, batch, M, N, stride_c, beta);

    const cudaDataType_t type = cuda_data_type(dt);
    const int64_t es = (int64_t)dtype_size(dt);
    const bool fuse_bias = bias != NULL && beta == 0.0f;
    LtCall lt;

    CUBLAS_TRY(cublasLtMatmulDescCreate(&lt.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // First cuBLASLt operand = b's memory, second = a's (see the top of the file).
    const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_TRY(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first));
    CUBLAS_TRY(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second));
    if (fuse_bias) {
        const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        const int64_t bias_stride = 0;  // one bias vector shared by every batch item
        CUBLAS_TRY(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
        CUBLAS_TRY(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
        if (batch > 1)
            CUBLAS_TRY(cublasLtMatmulDescSetAttribute(lt.op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &bias_stride,
                                                      sizeof bias_stride));
    }

    // Column-major shapes as stored: b is [N,K] col-major (ld N) untransposed, [K,N] (ld K) transposed.
    const int64_t first_rows = trans_b ? K : N, first_cols = trans_b ? N : K;
    const int64_t second_rows = trans_a ? M : K, second_cols = trans_a ? K : M;
    AGPT_TRY(make_layout(&lt.first, type, first_rows, first_cols, first_rows, batch, stride_b));
    AGPT_TRY(make_layout(&lt.second, type, second_rows, second_cols, second_rows, batch, stride_a));
    AGPT_TRY(make_layout(&lt.out, type, N, M, N, batch, stride_c));

    CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&lt.pref));
    const uint64_t ws_bytes = (uint64_t)e->workspace_bytes;
    CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                    sizeof ws_bytes));
    // Tell the heuristic the real alignments: views into the middle of a tensor (rows_view, a batch item)
    // need not be 256-byte aligned, and an algorithm assuming they are would read garbage or fault.
    const uint32_t al_first = alignment_of(b, stride_b * es, batch);
    const uint32_t al_second = alignment_of(a, stride_a * es, batch);
    const uint32_t al_out = alignment_of(c, stride_c * es, batch);
    CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_first,
                                                    sizeof al_first));
    CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_second,
                                                    sizeof al_second));
    CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_out,
                                                    sizeof al_out));
    CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_out,
                                                    sizeof al_out));

    cublasLtHandle_t handle = (cublasLtHandle_t)e->cublaslt;
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle, lt.op, lt.first, lt.second, lt.out, lt.out, lt.pref,
                                                       1, &heur, &found);
    if (hs != CUBLAS_STATUS_SUCCESS || found == 0)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cuBLASLt has no algorithm for %s matmul batch=%lld M=%lld N=%lld K=%lld "
                         "trans_a=%d trans_b=%d bias=%d (alignments a=%u b=%u c=%u bytes): %s",
                         dtype_name(dt), (long long)batch, (long long)M, (long long)N, (long long)K, (int)trans_a,
                         (int)trans_b, (int)(bias != NULL), al_second, al_first, al_out,
                         hs != CUBLAS_STATUS_SUCCESS ? cublasLtGetStatusString(hs) : "no heuristic result");

    // c is both C (read when beta != 0) and D: in place with identical layouts, which cuBLASLt supports.
    CUBLAS_TRY(cublasLtMatmul(handle, lt.op, &alpha, b, lt.first, a, lt.second, &beta, c, lt.out, c, lt.out,
                              &heur.algo, e->workspace, e->workspace_bytes, stream));

    if (bias != NULL && !fuse_bias)
        return DISPATCH_FLOAT(dt, launch_scale_add_bias, stream, c, bias, batch, M, N, stride_c, 1.0f);
    return AGPT_OK;
}

// dbias[n] += sum over rows of dout[r, n]. A block owns 32 adjacent columns, so each warp reads 32
// consecutive elements of a row (coalesced); its 16 warps split the rows, and the 16 partial sums meet in
// shared memory. Each column is summed by one block in a fixed order: deterministic, no atomics (which
// would not be exact or even available for every storage type).
#define BG_COLS 32
#define BG_ROWS 16
template <typename T>
__global__ void __launch_bounds__(BG_COLS *BG_ROWS)
    bias_grad_kernel(T *dbias, const T *dout, int64_t rows, int64_t N) {
    __shared__ float part[BG_ROWS][BG_COLS + 1];
    const int64_t col = (int64_t)blockIdx.x * BG_COLS + threadIdx.x;
    float acc = 0.0f;
    if (col < N)
        for (int64_t r = threadIdx.y; r < rows; r += BG_ROWS) acc += to_f32(dout[r * N + col]);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < N) {
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < BG_ROWS; i++) sum += part[i][threadIdx.x];
        dbias[col] = from_f32<T>(to_f32(dbias[col]) + sum);
    }
}

template <typename T>
static Status launch_bias_grad(cudaStream_t s, void *dbias, const void *dout, int64_t rows, int64_t N) {
    dim3 block(BG_COLS, BG_ROWS);
    dim3 grid((unsigned)((N + BG_COLS - 1) / BG_COLS));
    bias_grad_kernel<T><<<grid, block, 0, s>>>((T *)dbias, (const T *)dout, rows, N);
    CUDA_LAUNCH_CHECK("bias_grad_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_bias_grad(Engine *e, DType dt, void *dbias, const void *dout, int64_t rows, int64_t N) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(rows >= 0 && N >= 0, "cuda_bias_grad: negative size rows=%lld N=%lld", (long long)rows,
                   (long long)N);
    AGPT_CHECK_ARG((N + BG_COLS - 1) / BG_COLS <= INT32_MAX, "cuda_bias_grad: N=%lld too large", (long long)N);
    if (N == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_bias_grad, engine_stream(e), dbias, dout, rows, N);
}
