// Validation and dispatch for kernels/ops.h. Every shape, dtype and device rule is checked here once,
// so the backends can assume well-formed input.
#include "kernels/ops.h"

#include <math.h>

#include "kernels/cpu/cpu_ops.h"
#include "runtime/memory.h"
#ifdef AGPT_WITH_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

#define DESC(t, buf) tensor_describe((t), (buf), sizeof(buf))
#define F(t) ((float *)(t)->data)
#define CF(t) ((const float *)(t)->data)
#define PTR(t) ((t) ? (t)->data : NULL)

// Every tensor on the engine's device; the CPU backend computes in f32 only.
static Status check_tensor(const Engine *e, const Tensor *t, const char *op, const char *what) {
    char d[96];
    if (!t || !t->data) return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s is missing", op, what);
    if (t->device != e->device)
        return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s is %s but the engine runs on %s; copy it with tensor_copy first",
                         op, what, DESC(t, d), device_name(e->device));
    return AGPT_OK;
}

static Status check_float(const Engine *e, const Tensor *t, DType dt, const char *op, const char *what) {
    AGPT_TRY(check_tensor(e, t, op, what));
    char d[96];
    if (t->dtype != dt)
        return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s is %s, expected dtype %s like the other operands", op, what,
                         DESC(t, d), dtype_name(dt));
    if (e->device == DEV_CPU && dt != DT_F32)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: the CPU backend computes in f32; %s is %s (cast it first)", op,
                         what, DESC(t, d));
    if (!dtype_is_float(dt)) return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s must be a float tensor", op, what);
    return AGPT_OK;
}

static Status check_same_shape(const Tensor *a, const Tensor *b, const char *op, const char *what) {
    char x[96], y[96];
    if (!tensor_same_shape(a, b))
        return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s shapes differ: %s vs %s", op, what, DESC(a, x), DESC(b, y));
    return AGPT_OK;
}

// A vector parameter [C] for rows of width C.
static Status check_vector(const Engine *e, const Tensor *t, DType dt, int64_t C, const char *op,
                           const char *what) {
    AGPT_TRY(check_float(e, t, dt, op, what));
    char d[96];
    if (tensor_numel(t) != C) return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s is %s, expected [%lld]", op, what, DESC(t, d),
                                               (long long)C);
    return AGPT_OK;
}

// Per-row statistics: f32 [rows].
static Status check_stats(const Engine *e, const Tensor *t, int64_t rows, const char *op, const char *what) {
    AGPT_TRY(check_tensor(e, t, op, what));
    char d[96];
    if (t->dtype != DT_F32 || tensor_numel(t) != rows)
        return AGPT_FAIL(AGPT_ERR_ARG, "%s: %s is %s, expected f32[%lld]", op, what, DESC(t, d), (long long)rows);
    return AGPT_OK;
}

#ifdef AGPT_WITH_CUDA
#define ON_CUDA(e) ((e)->device == DEV_CUDA)
#else
#define ON_CUDA(e) 0
#endif

// ---------------------------------------------------------------------------------------------------------
// matmul

// b or a linear weight: of dtype dt like the other operands, or on the CPU with f32 activations also bf16 or f16.
static Status check_weight(const Engine *e, const Tensor *t, DType dt, const char *op, const char *what) {
    if (e->device == DEV_CPU && dt == DT_F32 && t && (t->dtype == DT_BF16 || t->dtype == DT_F16))
        return check_tensor(e, t, op, what);
    return check_float(e, t, dt, op, what);
}

typedef struct MatmulDims {
    int64_t batch, M, N, K, stride_a, stride_b, stride_c;
} MatmulDims;

static Status matmul_dims(const Tensor *out, const Tensor *a, const Tensor *b, bool trans_a, bool trans_b,
                          MatmulDims *d) {
    char x[96], y[96], z[96];
    AGPT_CHECK_ARG(a->ndim >= 2 && a->ndim <= 3 && b->ndim >= 2 && b->ndim <= 3,
                   "matmul: a %s and b %s must be 2-D or 3-D", DESC(a, x), DESC(b, y));
    AGPT_CHECK_ARG(!(b->ndim == 3 && a->ndim == 2), "matmul: a 3-D b %s needs a 3-D a (got %s)", DESC(b, x),
                   DESC(a, y));
    int64_t batch = a->ndim == 3 ? a->shape[0] : 1;
    int64_t ar = a->shape[a->ndim - 2], ac = a->shape[a->ndim - 1];
    int64_t br = b->shape[b->ndim - 2], bc = b->shape[b->ndim - 1];
    int64_t M = trans_a ? ac : ar, K = trans_a ? ar : ac;
    int64_t Kb = trans_b ? bc : br, N = trans_b ? br : bc;
    AGPT_CHECK_ARG(K == Kb, "matmul: inner dims differ: op(a) is %lldx%lld from %s, op(b) is %lldx%lld from %s",
                   (long long)M, (long long)K, DESC(a, x), (long long)Kb, (long long)N, DESC(b, y));
    AGPT_CHECK_ARG(b->ndim == 2 || b->shape[0] == batch, "matmul: batch of a %s and b %s differ", DESC(a, x),
                   DESC(b, y));
    bool out_ok = (a->ndim == 3) ? (out->ndim == 3 && out->shape[0] == batch && out->shape[1] == M &&
                                    out->shape[2] == N)
                                 : (out->ndim == 2 && out->shape[0] == M && out->shape[1] == N);
    AGPT_CHECK_ARG(out_ok, "matmul: out is %s, expected %s[%lld,%lld] for a %s, b %s", DESC(out, z),
                   a->ndim == 3 ? "batch x " : "", (long long)M, (long long)N, DESC(a, x), DESC(b, y));
    *d = (MatmulDims){batch, M, N, K, M * K, b->ndim == 3 ? K * N : 0, M * N};
    // A shared weight with an untransposed 3-D a is one big GEMM: fold the batch into the rows.
    if (a->ndim == 3 && b->ndim == 2 && !trans_a) *d = (MatmulDims){1, batch * M, N, K, 0, 0, 0};
    return AGPT_OK;
}

Status op_matmul(Engine *e, Tensor *out, const Tensor *a, const Tensor *b, const Tensor *bias, bool trans_a,
                 bool trans_b, float alpha, float beta) {
    const char *op = "op_matmul";
    AGPT_TRY(check_tensor(e, a, op, "a"));
    DType dt = a->dtype;
    AGPT_TRY(check_float(e, a, dt, op, "a"));
    AGPT_TRY(check_weight(e, b, dt, op, "b"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    MatmulDims d;
    AGPT_TRY(matmul_dims(out, a, b, trans_a, trans_b, &d));
    if (bias) AGPT_TRY(check_vector(e, bias, dt, d.N, op, "bias"));
    if (d.M == 0 || d.N == 0) return AGPT_OK;
    if (b->dtype != dt)  // only the CPU's bf16/f16 weight passes check_weight with another dtype
        return cpu_matmul_lowp(F(out), CF(a), b->data, b->dtype, bias ? CF(bias) : NULL, d.batch, d.M, d.N, d.K,
                               trans_a, trans_b, d.stride_a, d.stride_b, d.stride_c, alpha, beta);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_matmul(e, dt, out->data, a->data, b->data, PTR(bias), d.batch, d.M, d.N, d.K, trans_a, trans_b,
                           d.stride_a, d.stride_b, d.stride_c, alpha, beta);
#endif
    }
    cpu_matmul(F(out), CF(a), CF(b), bias ? CF(bias) : NULL, d.batch, d.M, d.N, d.K, trans_a, trans_b, d.stride_a,
               d.stride_b, d.stride_c, alpha, beta);
    return AGPT_OK;
}

// The backend call for raw dims, used by the backward passes below.
static Status matmul_raw(Engine *e, DType dt, void *c, const void *a, const void *b, int64_t batch, int64_t M,
                         int64_t N, int64_t K, bool ta, bool tb, int64_t sa, int64_t sb, int64_t sc, float beta) {
    if (M == 0 || N == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_matmul(e, dt, c, a, b, NULL, batch, M, N, K, ta, tb, sa, sb, sc, 1.0f, beta);
#endif
    }
    cpu_matmul(c, a, b, NULL, batch, M, N, K, ta, tb, sa, sb, sc, 1.0f, beta);
    return AGPT_OK;
}

Status op_matmul_backward(Engine *e, Tensor *da, Tensor *db, const Tensor *dout, const Tensor *a, const Tensor *b,
                          bool trans_a, bool trans_b, bool accumulate) {
    const char *op = "op_matmul_backward";
    AGPT_TRY(check_tensor(e, a, op, "a"));
    DType dt = a->dtype;
    AGPT_TRY(check_float(e, a, dt, op, "a"));
    AGPT_TRY(check_float(e, b, dt, op, "b"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    MatmulDims d;
    AGPT_TRY(matmul_dims(dout, a, b, trans_a, trans_b, &d));
    float beta = accumulate ? 1.0f : 0.0f;
    // With C = op(A) op(B):  dop(A) = dC op(B)^T  and  dop(B) = op(A)^T dC. When A itself is stored transposed,
    // dA = (dop(A))^T = op(B) dC^T, and likewise for B; each case is one GEMM with the right transposes.
    // Work per batch item with the folded dims (d.batch items of M x K and K x N).
    int64_t M = d.M, N = d.N, K = d.K;
    if (da) {
        AGPT_TRY(check_float(e, da, dt, op, "da"));
        AGPT_TRY(check_same_shape(da, a, op, "da and a"));
        if (!trans_a)  // dA[M,K] = dC[M,N] @ op(B)^T[N,K]
            AGPT_TRY(matmul_raw(e, dt, da->data, dout->data, b->data, d.batch, M, K, N, false, !trans_b,
                                d.stride_c, d.stride_b, d.stride_a, beta));
        else  // dA[K,M] = op(B)[K,N] @ dC^T[N,M]
            AGPT_TRY(matmul_raw(e, dt, da->data, b->data, dout->data, d.batch, K, M, N, trans_b, true, d.stride_b,
                                d.stride_c, d.stride_a, beta));
    }
    if (db) {
        AGPT_TRY(check_float(e, db, dt, op, "db"));
        AGPT_TRY(check_same_shape(db, b, op, "db and b"));
        // A shared 2-D b under a batched a: its gradient sums over the batch. The folded case (d.batch == 1)
        // already sums; a transposed batched a is summed item by item with beta = 1 after the first.
        int64_t items = (b->ndim == 2) ? d.batch : 1;
        int64_t inner_batch = (b->ndim == 2) ? 1 : d.batch;
        for (int64_t i = 0; i < items; i++) {
            const char *ai = (const char *)a->data + (size_t)(i * d.stride_a) * dtype_size(dt);
            const char *ci = (const char *)dout->data + (size_t)(i * d.stride_c) * dtype_size(dt);
            float bi = (i == 0) ? beta : 1.0f;
            if (!trans_b)  // dB[K,N] = op(A)^T[K,M] @ dC[M,N]
                AGPT_TRY(matmul_raw(e, dt, db->data, ai, ci, inner_batch, K, N, M, !trans_a, false, d.stride_a,
                                    d.stride_c, d.stride_b, bi));
            else  // dB[N,K] = dC^T[N,M] @ op(A)[M,K]
                AGPT_TRY(matmul_raw(e, dt, db->data, ci, ai, inner_batch, N, K, M, true, trans_a, d.stride_c,
                                    d.stride_a, d.stride_b, bi));
        }
    }
    return AGPT_OK;
}

bool ops_set_cpu_bf16_activations(bool on) { return cpu_set_bf16_gemm(on); }

Status op_linear(Engine *e, Tensor *out, const Tensor *x, const Tensor *w, const Tensor *bias) {
    const char *op = "op_linear";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_weight(e, w, dt, op, "w"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96], c[96];
    int64_t K = tensor_cols(x), rows = tensor_rows(x);
    AGPT_CHECK_ARG(w->ndim == 2 && w->shape[1] == K, "op_linear: weight %s does not take inputs %s (want [N,%lld])",
                   DESC(w, a), DESC(x, b), (long long)K);
    int64_t N = w->shape[0];
    AGPT_CHECK_ARG(tensor_cols(out) == N && tensor_rows(out) == rows, "op_linear: out %s, expected [%lld,%lld]",
                   DESC(out, c), (long long)rows, (long long)N);
    if (bias) AGPT_TRY(check_vector(e, bias, dt, N, op, "bias"));
    Tensor x2 = tensor_2d(x->data, dt, e->device, rows, K);
    Tensor o2 = tensor_2d(out->data, dt, e->device, rows, N);
    return op_matmul(e, &o2, &x2, w, bias, false, true, 1.0f, 0.0f);
}

Status op_linear_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *dbias, const Tensor *dout, const Tensor *x,
                          const Tensor *w) {
    const char *op = "op_linear_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, w, dt, op, "w"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    int64_t K = tensor_cols(x), rows = tensor_rows(x);
    char a[96];
    AGPT_CHECK_ARG(w->ndim == 2 && w->shape[1] == K, "op_linear_backward: weight %s for inputs of width %lld",
                   DESC(w, a), (long long)K);
    int64_t N = w->shape[0];
    AGPT_CHECK_ARG(tensor_cols(dout) == N && tensor_rows(dout) == rows, "op_linear_backward: dout %s, expected "
                   "[%lld,%lld]", DESC(dout, a), (long long)rows, (long long)N);
    if (dx) {
        AGPT_TRY(check_float(e, dx, dt, op, "dx"));
        AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
        // dx[rows,K] = dout[rows,N] @ w[N,K]
        AGPT_TRY(matmul_raw(e, dt, dx->data, dout->data, w->data, 1, rows, K, N, false, false, 0, 0, 0, 0.0f));
    }
    if (dw) {
        AGPT_TRY(check_float(e, dw, dt, op, "dw"));
        AGPT_TRY(check_same_shape(dw, w, op, "dw and w"));
        // dw[N,K] += dout^T[N,rows] @ x[rows,K]
        AGPT_TRY(matmul_raw(e, dt, dw->data, dout->data, x->data, 1, N, K, rows, true, false, 0, 0, 0, 1.0f));
    }
    if (dbias) {
        AGPT_TRY(check_vector(e, dbias, dt, N, op, "dbias"));
        if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
            return cuda_bias_grad(e, dt, dbias->data, dout->data, rows, N);
#endif
        }
        cpu_bias_grad(F(dbias), CF(dout), rows, N);
    }
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// elementwise and row ops

Status op_add(Engine *e, Tensor *out, const Tensor *a, const Tensor *b) {
    const char *op = "op_add";
    AGPT_TRY(check_tensor(e, a, op, "a"));
    DType dt = a->dtype;
    AGPT_TRY(check_float(e, a, dt, op, "a"));
    AGPT_TRY(check_float(e, b, dt, op, "b"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(a, b, op, "a and b"));
    AGPT_TRY(check_same_shape(out, a, op, "out and a"));
    int64_t n = tensor_numel(a);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_add(e, dt, out->data, a->data, b->data, n);
#endif
    }
    cpu_add(F(out), CF(a), CF(b), n);
    return AGPT_OK;
}

Status op_scale(Engine *e, Tensor *x, float s) {
    AGPT_TRY(check_tensor(e, x, "op_scale", "x"));
    AGPT_TRY(check_float(e, x, x->dtype, "op_scale", "x"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_scale(e, x->dtype, x->data, tensor_numel(x), s);
#endif
    }
    cpu_scale(F(x), tensor_numel(x), s);
    return AGPT_OK;
}

Status op_sum_squares(Engine *e, double *result, const Tensor *x) {
    AGPT_TRY(check_tensor(e, x, "op_sum_squares", "x"));
    AGPT_TRY(check_float(e, x, x->dtype, "op_sum_squares", "x"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_sum_squares(e, x->dtype, result, x->data, tensor_numel(x));
#endif
    }
    *result = cpu_sum_squares(CF(x), tensor_numel(x));
    return AGPT_OK;
}

Status op_layernorm(Engine *e, Tensor *out, Tensor *mean, Tensor *rstd, const Tensor *x, const Tensor *w,
                    const Tensor *b, float eps) {
    const char *op = "op_layernorm";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(out, x, op, "out and x"));
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    AGPT_TRY(check_vector(e, b, dt, C, op, "bias"));
    if (mean) AGPT_TRY(check_stats(e, mean, rows, op, "mean"));
    if (rstd) AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    AGPT_CHECK_ARG(eps > 0, "op_layernorm: eps must be > 0 (got %g)", (double)eps);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_layernorm(e, dt, out->data, mean ? F(mean) : NULL, rstd ? F(rstd) : NULL, x->data, w->data,
                              b->data, rows, C, eps);
#endif
    }
    cpu_layernorm(F(out), mean ? F(mean) : NULL, rstd ? F(rstd) : NULL, CF(x), CF(w), CF(b), rows, C, eps);
    return AGPT_OK;
}

Status op_layernorm_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *db, const Tensor *dout, const Tensor *x,
                             const Tensor *w, const Tensor *mean, const Tensor *rstd) {
    const char *op = "op_layernorm_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
    AGPT_TRY(check_same_shape(dout, x, op, "dout and x"));
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    AGPT_TRY(check_vector(e, dw, dt, C, op, "dweight"));
    AGPT_TRY(check_vector(e, db, dt, C, op, "dbias"));
    AGPT_TRY(check_stats(e, mean, rows, op, "mean"));
    AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_layernorm_backward(e, dt, dx->data, dw->data, db->data, dout->data, x->data, w->data, CF(mean),
                                       CF(rstd), rows, C);
#endif
    }
    cpu_layernorm_backward(F(dx), F(dw), F(db), CF(dout), CF(x), CF(w), CF(mean), CF(rstd), rows, C);
    return AGPT_OK;
}

Status op_rmsnorm(Engine *e, Tensor *out, Tensor *rstd, const Tensor *x, const Tensor *w, float eps) {
    const char *op = "op_rmsnorm";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(out, x, op, "out and x"));
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    if (rstd) AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    AGPT_CHECK_ARG(eps > 0, "op_rmsnorm: eps must be > 0 (got %g)", (double)eps);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_rmsnorm(e, dt, out->data, rstd ? F(rstd) : NULL, x->data, w->data, rows, C, eps);
#endif
    }
    cpu_rmsnorm(F(out), rstd ? F(rstd) : NULL, CF(x), CF(w), rows, C, eps);
    return AGPT_OK;
}

Status op_rmsnorm_backward(Engine *e, Tensor *dx, Tensor *dw, const Tensor *dout, const Tensor *x, const Tensor *w,
                           const Tensor *rstd) {
    const char *op = "op_rmsnorm_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
    AGPT_TRY(check_same_shape(dout, x, op, "dout and x"));
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    AGPT_TRY(check_vector(e, dw, dt, C, op, "dweight"));
    AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_rmsnorm_backward(e, dt, dx->data, dw->data, dout->data, x->data, w->data, CF(rstd), rows, C);
#endif
    }
    cpu_rmsnorm_backward(F(dx), F(dw), CF(dout), CF(x), CF(w), CF(rstd), rows, C);
    return AGPT_OK;
}

// The add-fused norms' CPU halves live in kernels/cpu/norms.c next to the row code they share.
void cpu_add_layernorm(float *sum, float *out, float *mean, float *rstd, const float *a, const float *b,
                       const float *w, const float *bias, int64_t rows, int64_t C, float eps);
void cpu_add_rmsnorm(float *sum, float *out, float *rstd, const float *a, const float *b, const float *w,
                     int64_t rows, int64_t C, float eps);

// sum = a + b with a, b, sum alike; out like them and a separate buffer (the fused kernels read the sum back
// from `sum` while writing `out`).
static Status check_add_norm(const Engine *e, const Tensor *sum, const Tensor *out, const Tensor *a,
                             const Tensor *b, const char *op) {
    AGPT_TRY(check_tensor(e, a, op, "a"));
    DType dt = a->dtype;
    AGPT_TRY(check_float(e, a, dt, op, "a"));
    AGPT_TRY(check_float(e, b, dt, op, "b"));
    AGPT_TRY(check_float(e, sum, dt, op, "sum"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(a, b, op, "a and b"));
    AGPT_TRY(check_same_shape(sum, a, op, "sum and a"));
    AGPT_TRY(check_same_shape(out, a, op, "out and a"));
    AGPT_CHECK_ARG(out->data != a->data && out->data != b->data && out->data != sum->data,
                   "%s: out must be its own buffer (it may not alias a, b or sum; sum may alias a or b)", op);
    return AGPT_OK;
}

Status op_add_layernorm(Engine *e, Tensor *sum, Tensor *out, Tensor *mean, Tensor *rstd, const Tensor *a,
                        const Tensor *b, const Tensor *w, const Tensor *bias, float eps) {
    const char *op = "op_add_layernorm";
    AGPT_TRY(check_add_norm(e, sum, out, a, b, op));
    DType dt = a->dtype;
    int64_t rows = tensor_rows(a), C = tensor_cols(a);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    AGPT_TRY(check_vector(e, bias, dt, C, op, "bias"));
    if (mean) AGPT_TRY(check_stats(e, mean, rows, op, "mean"));
    if (rstd) AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    AGPT_CHECK_ARG(eps > 0, "op_add_layernorm: eps must be > 0 (got %g)", (double)eps);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_add_layernorm(e, dt, sum->data, out->data, mean ? F(mean) : NULL, rstd ? F(rstd) : NULL,
                                  a->data, b->data, w->data, bias->data, rows, C, eps);
#endif
    }
    cpu_add_layernorm(F(sum), F(out), mean ? F(mean) : NULL, rstd ? F(rstd) : NULL, CF(a), CF(b), CF(w), CF(bias),
                      rows, C, eps);
    return AGPT_OK;
}

Status op_add_rmsnorm(Engine *e, Tensor *sum, Tensor *out, Tensor *rstd, const Tensor *a, const Tensor *b,
                      const Tensor *w, float eps) {
    const char *op = "op_add_rmsnorm";
    AGPT_TRY(check_add_norm(e, sum, out, a, b, op));
    DType dt = a->dtype;
    int64_t rows = tensor_rows(a), C = tensor_cols(a);
    AGPT_TRY(check_vector(e, w, dt, C, op, "weight"));
    if (rstd) AGPT_TRY(check_stats(e, rstd, rows, op, "rstd"));
    AGPT_CHECK_ARG(eps > 0, "op_add_rmsnorm: eps must be > 0 (got %g)", (double)eps);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_add_rmsnorm(e, dt, sum->data, out->data, rstd ? F(rstd) : NULL, a->data, b->data, w->data, rows,
                                C, eps);
#endif
    }
    cpu_add_rmsnorm(F(sum), F(out), rstd ? F(rstd) : NULL, CF(a), CF(b), CF(w), rows, C, eps);
    return AGPT_OK;
}

Status op_gelu(Engine *e, Tensor *out, const Tensor *x) {
    AGPT_TRY(check_tensor(e, x, "op_gelu", "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, "op_gelu", "x"));
    AGPT_TRY(check_float(e, out, dt, "op_gelu", "out"));
    AGPT_TRY(check_same_shape(out, x, "op_gelu", "out and x"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_gelu(e, dt, out->data, x->data, tensor_numel(x));
#endif
    }
    cpu_gelu(F(out), CF(x), tensor_numel(x));
    return AGPT_OK;
}

Status op_gelu_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x) {
    const char *op = "op_gelu_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
    AGPT_TRY(check_same_shape(dout, x, op, "dout and x"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_gelu_backward(e, dt, dx->data, dout->data, x->data, tensor_numel(x));
#endif
    }
    cpu_gelu_backward(F(dx), CF(dout), CF(x), tensor_numel(x));
    return AGPT_OK;
}

Status op_swiglu(Engine *e, Tensor *out, const Tensor *gate, const Tensor *up) {
    const char *op = "op_swiglu";
    AGPT_TRY(check_tensor(e, gate, op, "gate"));
    DType dt = gate->dtype;
    AGPT_TRY(check_float(e, gate, dt, op, "gate"));
    AGPT_TRY(check_float(e, up, dt, op, "up"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(gate, up, op, "gate and up"));
    AGPT_TRY(check_same_shape(out, up, op, "out and up"));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_swiglu(e, dt, out->data, gate->data, up->data, tensor_numel(up));
#endif
    }
    cpu_swiglu(F(out), CF(gate), CF(up), tensor_numel(up));
    return AGPT_OK;
}

Status op_swiglu_backward(Engine *e, Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate,
                          const Tensor *up) {
    const char *op = "op_swiglu_backward";
    AGPT_TRY(check_tensor(e, gate, op, "gate"));
    DType dt = gate->dtype;
    const Tensor *all[] = {gate, up, dout, dgate, dup};
    const char *names[] = {"gate", "up", "dout", "dgate", "dup"};
    for (int i = 0; i < 5; i++) {
        AGPT_TRY(check_float(e, all[i], dt, op, names[i]));
        AGPT_TRY(check_same_shape(all[i], gate, op, names[i]));
    }
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_swiglu_backward(e, dt, dgate->data, dup->data, dout->data, gate->data, up->data,
                                    tensor_numel(gate));
#endif
    }
    cpu_swiglu_backward(F(dgate), F(dup), CF(dout), CF(gate), CF(up), tensor_numel(gate));
    return AGPT_OK;
}

Status op_softmax(Engine *e, Tensor *out, const Tensor *x, float scale) {
    AGPT_TRY(check_tensor(e, x, "op_softmax", "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, "op_softmax", "x"));
    AGPT_TRY(check_float(e, out, dt, "op_softmax", "out"));
    AGPT_TRY(check_same_shape(out, x, "op_softmax", "out and x"));
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_softmax(e, dt, out->data, x->data, rows, C, scale);
#endif
    }
    cpu_softmax(F(out), CF(x), rows, C, scale);
    return AGPT_OK;
}

Status op_softmax_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *y, float scale) {
    const char *op = "op_softmax_backward";
    AGPT_TRY(check_tensor(e, y, op, "y"));
    DType dt = y->dtype;
    AGPT_TRY(check_float(e, y, dt, op, "y"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_same_shape(dx, y, op, "dx and y"));
    AGPT_TRY(check_same_shape(dout, y, op, "dout and y"));
    int64_t rows = tensor_rows(y), C = tensor_cols(y);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_softmax_backward(e, dt, dx->data, dout->data, y->data, rows, C, scale);
#endif
    }
    cpu_softmax_backward(F(dx), CF(dout), CF(y), rows, C, scale);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// attention and RoPE

static Status attention_dims(const Engine *e, const Tensor *q, const Tensor *k, const Tensor *v, const char *op,
                             int64_t dims[5]) {
    AGPT_TRY(check_tensor(e, q, op, "q"));
    DType dt = q->dtype;
    AGPT_TRY(check_float(e, q, dt, op, "q"));
    AGPT_TRY(check_float(e, k, dt, op, "k"));
    AGPT_TRY(check_float(e, v, dt, op, "v"));
    char a[96], b[96];
    AGPT_CHECK_ARG(q->ndim == 4 && k->ndim == 4, "%s: q %s and k %s must be [B,T,H,D]", op, DESC(q, a), DESC(k, b));
    AGPT_TRY(check_same_shape(k, v, op, "k and v"));
    AGPT_CHECK_ARG(q->shape[0] == k->shape[0] && q->shape[2] == k->shape[2] && q->shape[3] == k->shape[3],
                   "%s: q %s and k %s differ in batch, heads or head dim", op, DESC(q, a), DESC(k, b));
    int64_t B = q->shape[0], Tq = q->shape[1], Tk = k->shape[1], H = q->shape[2], D = q->shape[3];
    AGPT_CHECK_ARG(Tk >= Tq || Tq == 0, "%s: %lld queries over %lld keys: queries may not outnumber keys (a "
                   "causal step sees keys up to its own position)", op, (long long)Tq, (long long)Tk);
    dims[0] = B, dims[1] = Tq, dims[2] = Tk, dims[3] = H, dims[4] = D;
    return AGPT_OK;
}

Status op_attention(Engine *e, Tensor *out, const Tensor *q, const Tensor *k, const Tensor *v, bool causal,
                    float scale) {
    const char *op = "op_attention";
    int64_t d[5];
    AGPT_TRY(attention_dims(e, q, k, v, op, d));
    AGPT_TRY(check_float(e, out, q->dtype, op, "out"));
    AGPT_TRY(check_same_shape(out, q, op, "out and q"));
    if (tensor_numel(q) == 0) return AGPT_OK;  // no queries: nothing to compute
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_attention(e, q->dtype, out->data, q->data, k->data, v->data, d[0], d[1], d[2], d[3], d[4],
                              causal, scale);
#endif
    }
    cpu_attention(F(out), CF(q), CF(k), CF(v), d[0], d[1], d[2], d[3], d[4], causal, scale);
    return AGPT_OK;
}

Status op_attention_backward(Engine *e, Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                             const Tensor *k, const Tensor *v, bool causal, float scale) {
    const char *op = "op_attention_backward";
    int64_t d[5];
    AGPT_TRY(attention_dims(e, q, k, v, op, d));
    DType dt = q->dtype;
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_float(e, dq, dt, op, "dq"));
    AGPT_TRY(check_float(e, dk, dt, op, "dk"));
    AGPT_TRY(check_float(e, dv, dt, op, "dv"));
    AGPT_TRY(check_same_shape(dout, q, op, "dout and q"));
    AGPT_TRY(check_same_shape(dq, q, op, "dq and q"));
    AGPT_TRY(check_same_shape(dk, k, op, "dk and k"));
    AGPT_TRY(check_same_shape(dv, v, op, "dv and v"));
    if (tensor_numel(q) == 0 || tensor_numel(k) == 0) {  // nothing attends: the key gradients are zero
        if (tensor_numel(k) > 0) {
            AGPT_TRY(tensor_zero(dk));
            AGPT_TRY(tensor_zero(dv));
        }
        return AGPT_OK;
    }
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_attention_backward(e, dt, dq->data, dk->data, dv->data, dout->data, q->data, k->data, v->data,
                                       d[0], d[1], d[2], d[3], d[4], causal, scale);
#endif
    }
    cpu_attention_backward(F(dq), F(dk), F(dv), CF(dout), CF(q), CF(k), CF(v), d[0], d[1], d[2], d[3], d[4], causal,
                           scale);
    return AGPT_OK;
}

static Status rope_common(Engine *e, Tensor *out, const Tensor *x, const Tensor *positions, float base,
                          int direction, const char *op) {
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(out, x, op, "out and x"));
    AGPT_TRY(check_tensor(e, positions, op, "positions"));
    char a[96], b[96];
    AGPT_CHECK_ARG(x->ndim == 4 && x->shape[3] % 2 == 0, "%s: x %s must be [B,T,H,D] with even D", op, DESC(x, a));
    int64_t B = x->shape[0], T = x->shape[1], H = x->shape[2], D = x->shape[3];
    AGPT_CHECK_ARG(positions->dtype == DT_I32 && tensor_numel(positions) == B * T,
                   "%s: positions %s must be i32[%lld,%lld]", op, DESC(positions, b), (long long)B, (long long)T);
    AGPT_CHECK_ARG(base > 0, "%s: base must be > 0", op);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_rope(e, dt, out->data, x->data, (const int32_t *)positions->data, B, T, H, D, base, direction);
#endif
    }
    cpu_rope(F(out), CF(x), (const int32_t *)positions->data, B, T, H, D, base, direction);
    return AGPT_OK;
}

Status op_rope(Engine *e, Tensor *out, const Tensor *x, const Tensor *positions, float base) {
    return rope_common(e, out, x, positions, base, +1, "op_rope");
}

Status op_rope_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *positions, float base) {
    return rope_common(e, dx, dout, positions, base, -1, "op_rope_backward");
}

// ---------------------------------------------------------------------------------------------------------
// casts and the optimizer

Status op_copy(Engine *e, Tensor *dst, const Tensor *src) {
    AGPT_TRY(check_tensor(e, dst, "op_copy", "dst"));
    AGPT_TRY(check_tensor(e, src, "op_copy", "src"));
    // The engine's CUDA stream is a blocking one, so the runtime's cudaMemcpy on the legacy stream is ordered
    // with the kernels around it.
    return tensor_copy(dst, src);
}

Status op_cast(Engine *e, Tensor *out, const Tensor *x) {
    AGPT_TRY(check_tensor(e, x, "op_cast", "x"));
    AGPT_TRY(check_tensor(e, out, "op_cast", "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(dtype_is_float(x->dtype) && dtype_is_float(out->dtype),
                   "op_cast: %s -> %s: only f32, f16 and bf16 convert", DESC(x, a), DESC(out, b));
    AGPT_CHECK_ARG(tensor_numel(out) == tensor_numel(x), "op_cast: %s -> %s: element counts differ", DESC(x, a),
                   DESC(out, b));
    int64_t n = tensor_numel(x);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_cast(e, out->data, out->dtype, x->data, x->dtype, n);
#endif
    }
    convert_host(out->data, out->dtype, x->data, x->dtype, (size_t)n);
    return AGPT_OK;
}

Status op_adamw(Engine *e, Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1,
                float beta2, float eps, float weight_decay, int step) {
    const char *op = "op_adamw";
    // Optimizer state and master weights stay f32 on every backend: bf16 updates would lose small steps.
    const Tensor *all[] = {param, grad, m, v};
    const char *names[] = {"param", "grad", "m", "v"};
    for (int i = 0; i < 4; i++) {
        AGPT_TRY(check_tensor(e, all[i], op, names[i]));
        char a[96];
        AGPT_CHECK_ARG(all[i]->dtype == DT_F32, "op_adamw: %s is %s; optimizer tensors are f32", names[i],
                       DESC(all[i], a));
        AGPT_CHECK_ARG(tensor_numel(all[i]) == tensor_numel(param), "op_adamw: %s has %lld elements, param %lld",
                       names[i], (long long)tensor_numel(all[i]), (long long)tensor_numel(param));
    }
    AGPT_CHECK_ARG(step >= 1, "op_adamw: step counts from 1 (got %d)", step);
    int64_t n = tensor_numel(param);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_adamw(e, F(param), CF(grad), F(m), F(v), n, lr, beta1, beta2, eps, weight_decay, step);
#endif
    }
    cpu_adamw(F(param), CF(grad), F(m), F(v), n, lr, beta1, beta2, eps, weight_decay, step);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// vision path: anomaly maps and patch embedding

Status op_l2_normalize(Engine *e, Tensor *out, const Tensor *x, float eps) {
    const char *op = "op_l2_normalize";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(out, x, op, "out and x"));
    AGPT_CHECK_ARG(eps >= 0, "op_l2_normalize: eps must be >= 0 (got %g); 0 is plain division", (double)eps);
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    if (rows == 0 || C == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_l2_normalize(e, dt, out->data, x->data, rows, C, eps);
#endif
    }
    cpu_l2_normalize(F(out), CF(x), rows, C, eps);
    return AGPT_OK;
}

Status op_upsample_bilinear(Engine *e, Tensor *out, const Tensor *x) {
    const char *op = "op_upsample_bilinear";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(x->ndim == 4 && out->ndim == 4, "op_upsample_bilinear: x %s and out %s must both be [B,C,H,W]",
                   DESC(x, a), DESC(out, b));
    AGPT_CHECK_ARG(x->shape[0] == out->shape[0] && x->shape[1] == out->shape[1],
                   "op_upsample_bilinear: x %s and out %s differ in batch or channels", DESC(x, a), DESC(out, b));
    int64_t BC = x->shape[0] * x->shape[1];
    int64_t h = x->shape[2], w = x->shape[3], H = out->shape[2], W = out->shape[3];
    if (BC == 0) return AGPT_OK;
    AGPT_CHECK_ARG(H == 0 || W == 0 || (h > 0 && w > 0),
                   "op_upsample_bilinear: cannot resize the empty image %s to %s", DESC(x, a), DESC(out, b));
    if (H == 0 || W == 0) return AGPT_OK;
    AGPT_CHECK_ARG(x->data != out->data, "op_upsample_bilinear: out must not alias x");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_upsample_bilinear(e, dt, out->data, x->data, BC, h, w, H, W);
#endif
    }
    cpu_upsample_bilinear(F(out), CF(x), BC, h, w, H, W);
    return AGPT_OK;
}

Status op_max_dot(Engine *e, Tensor *out, const Tensor *query, const Tensor *refs) {
    const char *op = "op_max_dot";
    AGPT_TRY(check_tensor(e, query, op, "query"));
    DType dt = query->dtype;
    AGPT_TRY(check_float(e, query, dt, op, "query"));
    AGPT_TRY(check_float(e, refs, dt, op, "refs"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96], c[96];
    AGPT_CHECK_ARG(query->ndim == 2 && refs->ndim == 2, "op_max_dot: query %s and refs %s must be [Q,D] and [R,D]",
                   DESC(query, a), DESC(refs, b));
    int64_t Q = query->shape[0], D = query->shape[1], R = refs->shape[0];
    AGPT_CHECK_ARG(refs->shape[1] == D, "op_max_dot: query %s and refs %s differ in row width", DESC(query, a),
                   DESC(refs, b));
    AGPT_CHECK_ARG(out->ndim == 1 && out->shape[0] == Q, "op_max_dot: out is %s, expected [%lld] for query %s",
                   DESC(out, c), (long long)Q, DESC(query, a));
    AGPT_CHECK_ARG(R > 0, "op_max_dot: refs %s has no rows; the maximum over no references is undefined",
                   DESC(refs, b));
    AGPT_CHECK_ARG(D > 0 && D <= INT32_MAX, "op_max_dot: row width %lld of query %s must be in [1, 2^31)",
                   (long long)D, DESC(query, a));
    if (Q == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_max_dot(e, dt, out->data, query->data, refs->data, Q, R, D);
#endif
    }
    return cpu_max_dot(F(out), CF(query), CF(refs), Q, R, D);
}

Status op_softmax2_class1(Engine *e, Tensor *out, const Tensor *logits) {
    const char *op = "op_softmax2_class1";
    AGPT_TRY(check_tensor(e, logits, op, "logits"));
    DType dt = logits->dtype;
    AGPT_TRY(check_float(e, logits, dt, op, "logits"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(logits->ndim == 3 && logits->shape[1] == 2, "op_softmax2_class1: logits %s must be [B,2,N]",
                   DESC(logits, a));
    int64_t B = logits->shape[0], N = logits->shape[2];
    AGPT_CHECK_ARG(out->ndim == 2 && out->shape[0] == B && out->shape[1] == N,
                   "op_softmax2_class1: out is %s, expected [%lld,%lld] for logits %s", DESC(out, b), (long long)B,
                   (long long)N, DESC(logits, a));
    if (B * N == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_softmax2_class1(e, dt, out->data, logits->data, B, N);
#endif
    }
    cpu_softmax2_class1(F(out), CF(logits), B, N);
    return AGPT_OK;
}

Status op_upsample_softmax2_axpy(Engine *e, Tensor *out, const Tensor *logits, float alpha) {
    const char *op = "op_upsample_softmax2_axpy";
    AGPT_TRY(check_tensor(e, logits, op, "logits"));
    DType dt = logits->dtype;
    AGPT_TRY(check_float(e, logits, dt, op, "logits"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(logits->ndim == 4 && logits->shape[1] == 2 && out->ndim == 3 && out->shape[0] == logits->shape[0],
                   "op_upsample_softmax2_axpy: logits %s and out %s, expected [B,2,h,w] and [B,H,W]", DESC(logits, a),
                   DESC(out, b));
    int64_t B = logits->shape[0], h = logits->shape[2], w = logits->shape[3], H = out->shape[1], W = out->shape[2];
    if (B * H * W == 0) return AGPT_OK;
    AGPT_CHECK_ARG(h > 0 && w > 0, "op_upsample_softmax2_axpy: cannot resize the empty grid %s to %s",
                   DESC(logits, a), DESC(out, b));
    AGPT_CHECK_ARG(logits->data != out->data, "op_upsample_softmax2_axpy: out must not alias logits");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_upsample_softmax2_axpy(e, dt, out->data, logits->data, B, h, w, H, W, alpha);
#endif
    }
    cpu_upsample_softmax2_axpy(F(out), CF(logits), B, h, w, H, W, alpha);
    return AGPT_OK;
}

Status op_axpy(Engine *e, Tensor *y, const Tensor *x, float alpha) {
    const char *op = "op_axpy";
    AGPT_TRY(check_tensor(e, y, op, "y"));
    DType dt = y->dtype;
    AGPT_TRY(check_float(e, y, dt, op, "y"));
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_same_shape(y, x, op, "y and x"));
    int64_t n = tensor_numel(y);
    if (n == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_axpy(e, dt, y->data, x->data, n, alpha);
#endif
    }
    cpu_axpy(F(y), CF(x), n, alpha);
    return AGPT_OK;
}

Status op_affine(Engine *e, Tensor *x, float a, float b) {
    AGPT_TRY(check_tensor(e, x, "op_affine", "x"));
    AGPT_TRY(check_float(e, x, x->dtype, "op_affine", "x"));
    int64_t n = tensor_numel(x);
    if (n == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_affine(e, x->dtype, x->data, n, a, b);
#endif
    }
    cpu_affine(F(x), n, a, b);
    return AGPT_OK;
}

Status op_im2patches(Engine *e, Tensor *out, const Tensor *img, int patch) {
    const char *op = "op_im2patches";
    AGPT_TRY(check_tensor(e, img, op, "img"));
    DType dt = img->dtype;
    AGPT_TRY(check_float(e, img, dt, op, "img"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(img->ndim == 4, "op_im2patches: img %s must be [B,C,H,W]", DESC(img, a));
    AGPT_CHECK_ARG(patch >= 1, "op_im2patches: patch size must be >= 1 (got %d)", patch);
    int64_t B = img->shape[0], C = img->shape[1], H = img->shape[2], W = img->shape[3], p = patch;
    AGPT_CHECK_ARG(H % p == 0 && W % p == 0,
                   "op_im2patches: img %s: H and W must be multiples of the patch size %d (resize or crop first)",
                   DESC(img, a), patch);
    int64_t npatch = (H / p) * (W / p), cols = C * p * p;
    AGPT_CHECK_ARG(out->ndim == 3 && out->shape[0] == B && out->shape[1] == npatch && out->shape[2] == cols,
                   "op_im2patches: out is %s, expected [%lld,%lld,%lld] for img %s and patch %d", DESC(out, b),
                   (long long)B, (long long)npatch, (long long)cols, DESC(img, a), patch);
    if (B * npatch * cols == 0) return AGPT_OK;
    AGPT_CHECK_ARG(out->data != img->data, "op_im2patches: out must not alias img");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_im2patches(e, dt, out->data, img->data, B, C, H, W, p);
#endif
    }
    cpu_im2patches(F(out), CF(img), B, C, H, W, p);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// prompt learner: the anomaly map's conv stack

Status op_conv2d(Engine *e, Tensor *out, const Tensor *x, const Tensor *w, const Tensor *bias, int padding) {
    const char *op = "op_conv2d";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, w, dt, op, "w"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96], c[96];
    AGPT_CHECK_ARG(x->ndim == 4 && w->ndim == 4, "op_conv2d: x %s must be [B,Cin,H,W] and w %s [Cout,Cin,k,k]",
                   DESC(x, a), DESC(w, b));
    const int64_t B = x->shape[0], Cin = x->shape[1], H = x->shape[2], W = x->shape[3];
    const int64_t Cout = w->shape[0], k = w->shape[2], p = padding;
    AGPT_CHECK_ARG(w->shape[1] == Cin && w->shape[3] == k && k >= 1,
                   "op_conv2d: w %s does not fit x %s: expected [Cout,%lld,k,k] with k >= 1", DESC(w, b), DESC(x, a),
                   (long long)Cin);
    AGPT_CHECK_ARG(padding >= 0, "op_conv2d: padding must be >= 0 (got %d)", padding);
    AGPT_CHECK_ARG(Cin >= 1, "op_conv2d: x %s has no channels", DESC(x, a));
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    AGPT_CHECK_ARG(Ho >= 1 && Wo >= 1, "op_conv2d: a %lldx%lld kernel with padding %d does not fit x %s", (long long)k,
                   (long long)k, padding, DESC(x, a));
    AGPT_CHECK_ARG(out->ndim == 4 && out->shape[0] == B && out->shape[1] == Cout && out->shape[2] == Ho &&
                       out->shape[3] == Wo,
                   "op_conv2d: out is %s, expected [%lld,%lld,%lld,%lld] for x %s, w %s and padding %d", DESC(out, c),
                   (long long)B, (long long)Cout, (long long)Ho, (long long)Wo, DESC(x, a), DESC(w, b), padding);
    if (bias) AGPT_TRY(check_vector(e, bias, dt, Cout, op, "bias"));
    AGPT_CHECK_ARG(Cin * k * k <= INT32_MAX && Ho * Wo <= INT32_MAX && Cout <= INT32_MAX,
                   "op_conv2d: x %s with w %s is too large for one GEMM", DESC(x, a), DESC(w, b));
    if (B == 0 || Cout == 0) return AGPT_OK;
    AGPT_CHECK_ARG(out->data != x->data, "op_conv2d: out must not alias x");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_conv2d(e, dt, out->data, x->data, w->data, PTR(bias), B, Cin, H, W, Cout, k, p);
#endif
    }
    return cpu_conv2d(F(out), CF(x), CF(w), bias ? CF(bias) : NULL, B, Cin, H, W, Cout, k, p);
}

Status op_relu(Engine *e, Tensor *out, const Tensor *x) {
    const char *op = "op_relu";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_same_shape(out, x, op, "out and x"));
    int64_t n = tensor_numel(x);
    if (n == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_relu(e, dt, out->data, x->data, n);
#endif
    }
    cpu_relu(F(out), CF(x), n);
    return AGPT_OK;
}

Status op_maxpool2x2(Engine *e, Tensor *out, const Tensor *x) {
    const char *op = "op_maxpool2x2";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96];
    AGPT_CHECK_ARG(x->ndim == 4, "op_maxpool2x2: x %s must be [B,C,H,W]", DESC(x, a));
    const int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    AGPT_CHECK_ARG(out->ndim == 4 && out->shape[0] == B && out->shape[1] == C && out->shape[2] == H / 2 &&
                       out->shape[3] == W / 2,
                   "op_maxpool2x2: out is %s, expected [%lld,%lld,%lld,%lld] for x %s", DESC(out, b), (long long)B,
                   (long long)C, (long long)(H / 2), (long long)(W / 2), DESC(x, a));
    if (tensor_numel(out) == 0) return AGPT_OK;
    AGPT_CHECK_ARG(out->data != x->data, "op_maxpool2x2: out must not alias x");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_maxpool2x2(e, dt, out->data, x->data, B * C, H, W);
#endif
    }
    cpu_maxpool2x2(F(out), CF(x), B * C, H, W);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// training: backward of the vision path and the prompt learner, pixel losses

Status op_conv2d_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *dbias, const Tensor *dout, const Tensor *x,
                          const Tensor *w, int padding) {
    const char *op = "op_conv2d_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, w, dt, op, "w"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    char a[96], b[96], c[96];
    AGPT_CHECK_ARG(x->ndim == 4 && w->ndim == 4,
                   "op_conv2d_backward: x %s must be [B,Cin,H,W] and w %s [Cout,Cin,k,k]", DESC(x, a), DESC(w, b));
    const int64_t B = x->shape[0], Cin = x->shape[1], H = x->shape[2], W = x->shape[3];
    const int64_t Cout = w->shape[0], k = w->shape[2], p = padding;
    AGPT_CHECK_ARG(w->shape[1] == Cin && w->shape[3] == k && k >= 1,
                   "op_conv2d_backward: w %s does not fit x %s: expected [Cout,%lld,k,k] with k >= 1", DESC(w, b),
                   DESC(x, a), (long long)Cin);
    AGPT_CHECK_ARG(padding >= 0, "op_conv2d_backward: padding must be >= 0 (got %d)", padding);
    AGPT_CHECK_ARG(Cin >= 1, "op_conv2d_backward: x %s has no channels", DESC(x, a));
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    AGPT_CHECK_ARG(Ho >= 1 && Wo >= 1, "op_conv2d_backward: a %lldx%lld kernel with padding %d does not fit x %s",
                   (long long)k, (long long)k, padding, DESC(x, a));
    AGPT_CHECK_ARG(dout->ndim == 4 && dout->shape[0] == B && dout->shape[1] == Cout && dout->shape[2] == Ho &&
                       dout->shape[3] == Wo,
                   "op_conv2d_backward: dout is %s, expected [%lld,%lld,%lld,%lld] for x %s, w %s and padding %d",
                   DESC(dout, c), (long long)B, (long long)Cout, (long long)Ho, (long long)Wo, DESC(x, a), DESC(w, b),
                   padding);
    if (dx) {
        AGPT_TRY(check_float(e, dx, dt, op, "dx"));
        AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
        AGPT_CHECK_ARG(dx->data != dout->data && dx->data != w->data && dx->data != x->data,
                       "op_conv2d_backward: dx must not alias dout, x or w");
    }
    if (dw) {
        AGPT_TRY(check_float(e, dw, dt, op, "dw"));
        AGPT_TRY(check_same_shape(dw, w, op, "dw and w"));
        AGPT_CHECK_ARG(!dx || dx->data != dw->data, "op_conv2d_backward: dw must not alias dx");
    }
    if (dbias) AGPT_TRY(check_vector(e, dbias, dt, Cout, op, "dbias"));
    AGPT_CHECK_ARG(Cin * k * k <= INT32_MAX && Ho * Wo <= INT32_MAX && Cout <= INT32_MAX,
                   "op_conv2d_backward: x %s with w %s is too large for one GEMM", DESC(x, a), DESC(w, b));
    if (B == 0 || (!dx && !dw && !dbias)) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_conv2d_backward(e, dt, PTR(dx), PTR(dw), PTR(dbias), dout->data, x->data, w->data, B, Cin, H, W,
                                    Cout, k, p);
#endif
    }
    return cpu_conv2d_backward(dx ? F(dx) : NULL, dw ? F(dw) : NULL, dbias ? F(dbias) : NULL, CF(dout), CF(x), CF(w),
                               B, Cin, H, W, Cout, k, p);
}

Status op_relu_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *y) {
    const char *op = "op_relu_backward";
    AGPT_TRY(check_tensor(e, y, op, "y"));
    DType dt = y->dtype;
    AGPT_TRY(check_float(e, y, dt, op, "y"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_same_shape(dout, y, op, "dout and y"));
    AGPT_TRY(check_same_shape(dx, y, op, "dx and y"));
    int64_t n = tensor_numel(y);
    if (n == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_relu_backward(e, dt, dx->data, dout->data, y->data, n);
#endif
    }
    cpu_relu_backward(F(dx), CF(dout), CF(y), n);
    return AGPT_OK;
}

Status op_maxpool2x2_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x) {
    const char *op = "op_maxpool2x2_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    char a[96], b[96];
    AGPT_CHECK_ARG(x->ndim == 4, "op_maxpool2x2_backward: x %s must be [B,C,H,W]", DESC(x, a));
    const int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    AGPT_CHECK_ARG(dout->ndim == 4 && dout->shape[0] == B && dout->shape[1] == C && dout->shape[2] == H / 2 &&
                       dout->shape[3] == W / 2,
                   "op_maxpool2x2_backward: dout is %s, expected [%lld,%lld,%lld,%lld] for x %s", DESC(dout, b),
                   (long long)B, (long long)C, (long long)(H / 2), (long long)(W / 2), DESC(x, a));
    AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
    if (tensor_numel(x) == 0) return AGPT_OK;
    AGPT_CHECK_ARG(dx->data != x->data && dx->data != dout->data,
                   "op_maxpool2x2_backward: dx must not alias x or dout");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_maxpool2x2_backward(e, dt, dx->data, dout->data, x->data, B * C, H, W);
#endif
    }
    cpu_maxpool2x2_backward(F(dx), CF(dout), CF(x), B * C, H, W);
    return AGPT_OK;
}

Status op_upsample_bilinear_backward(Engine *e, Tensor *dx, const Tensor *dout) {
    const char *op = "op_upsample_bilinear_backward";
    AGPT_TRY(check_tensor(e, dout, op, "dout"));
    DType dt = dout->dtype;
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    char a[96], b[96];
    AGPT_CHECK_ARG(dx->ndim == 4 && dout->ndim == 4,
                   "op_upsample_bilinear_backward: dx %s and dout %s must both be [B,C,H,W]", DESC(dx, a),
                   DESC(dout, b));
    AGPT_CHECK_ARG(dx->shape[0] == dout->shape[0] && dx->shape[1] == dout->shape[1],
                   "op_upsample_bilinear_backward: dx %s and dout %s differ in batch or channels", DESC(dx, a),
                   DESC(dout, b));
    int64_t BC = dx->shape[0] * dx->shape[1];
    int64_t h = dx->shape[2], w = dx->shape[3], H = dout->shape[2], W = dout->shape[3];
    if (BC == 0 || h == 0 || w == 0) return AGPT_OK;  // (an empty dout gives a zero dx)
    AGPT_CHECK_ARG(dx->data != dout->data, "op_upsample_bilinear_backward: dx must not alias dout");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_upsample_bilinear_backward(e, dt, dx->data, dout->data, BC, h, w, H, W);
#endif
    }
    return cpu_upsample_bilinear_backward(F(dx), CF(dout), BC, h, w, H, W);
}

Status op_l2_normalize_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x, float eps) {
    const char *op = "op_l2_normalize_backward";
    AGPT_TRY(check_tensor(e, x, op, "x"));
    DType dt = x->dtype;
    AGPT_TRY(check_float(e, x, dt, op, "x"));
    AGPT_TRY(check_float(e, dout, dt, op, "dout"));
    AGPT_TRY(check_float(e, dx, dt, op, "dx"));
    AGPT_TRY(check_same_shape(dout, x, op, "dout and x"));
    AGPT_TRY(check_same_shape(dx, x, op, "dx and x"));
    AGPT_CHECK_ARG(eps >= 0, "op_l2_normalize_backward: eps must be >= 0 (got %g)", (double)eps);
    AGPT_CHECK_ARG(dx->data != x->data, "op_l2_normalize_backward: dx must not alias x (it may alias dout)");
    int64_t rows = tensor_rows(x), C = tensor_cols(x);
    if (rows == 0 || C == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_l2_normalize_backward(e, dt, dx->data, dout->data, x->data, rows, C, eps);
#endif
    }
    cpu_l2_normalize_backward(F(dx), CF(dout), CF(x), rows, C, eps);
    return AGPT_OK;
}

Status op_pixel_loss(Engine *e, double *focal, double *dice, Tensor *dp1, const Tensor *p1, const Tensor *gt,
                     float scale) {
    const char *op = "op_pixel_loss";
    AGPT_TRY(check_tensor(e, p1, op, "p1"));
    char a[96], b[96];
    AGPT_CHECK_ARG(p1->dtype == DT_F32 && p1->ndim == 3, "op_pixel_loss: p1 %s must be f32 [B,H,W]", DESC(p1, a));
    AGPT_TRY(check_tensor(e, gt, op, "gt"));
    AGPT_CHECK_ARG(gt->dtype == DT_F32 && tensor_same_shape(gt, p1), "op_pixel_loss: gt %s must be f32 like p1 %s",
                   DESC(gt, b), DESC(p1, a));
    if (dp1) {
        AGPT_TRY(check_tensor(e, dp1, op, "dp1"));
        AGPT_CHECK_ARG(dp1->dtype == DT_F32 && tensor_same_shape(dp1, p1),
                       "op_pixel_loss: dp1 %s must be f32 like p1 %s", DESC(dp1, b), DESC(p1, a));
        AGPT_CHECK_ARG(dp1->data != p1->data && dp1->data != gt->data, "op_pixel_loss: dp1 must not alias p1 or gt");
    }
    const int64_t B = p1->shape[0], H = p1->shape[1], W = p1->shape[2];
    AGPT_CHECK_ARG(B > 0 && H * W > 0, "op_pixel_loss: p1 %s is empty; the mean over no pixels is undefined",
                   DESC(p1, a));
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_pixel_loss(e, focal, dice, PTR(dp1), CF(p1), CF(gt), B, H, W, scale);
#endif
    }
    return cpu_pixel_loss(focal, dice, dp1 ? F(dp1) : NULL, CF(p1), CF(gt), B, H, W, scale);
}

Status op_upsample_softmax2_backward(Engine *e, Tensor *dlogits, const Tensor *dp1, const Tensor *logits) {
    const char *op = "op_upsample_softmax2_backward";
    AGPT_TRY(check_tensor(e, logits, op, "logits"));
    DType dt = logits->dtype;
    AGPT_TRY(check_float(e, logits, dt, op, "logits"));
    AGPT_TRY(check_float(e, dlogits, dt, op, "dlogits"));
    AGPT_TRY(check_tensor(e, dp1, op, "dp1"));
    char a[96], b[96];
    AGPT_CHECK_ARG(logits->ndim == 4 && logits->shape[1] == 2 && dp1->ndim == 3 && dp1->shape[0] == logits->shape[0],
                   "op_upsample_softmax2_backward: logits %s and dp1 %s, expected [B,2,h,w] and [B,H,W]",
                   DESC(logits, a), DESC(dp1, b));
    AGPT_CHECK_ARG(dp1->dtype == DT_F32, "op_upsample_softmax2_backward: dp1 %s must be f32 (op_pixel_loss's)",
                   DESC(dp1, b));
    AGPT_TRY(check_same_shape(dlogits, logits, op, "dlogits and logits"));
    const int64_t B = logits->shape[0], h = logits->shape[2], w = logits->shape[3], H = dp1->shape[1],
                  W = dp1->shape[2];
    if (B * h * w == 0) return AGPT_OK;
    AGPT_CHECK_ARG(dlogits->data != logits->data && dlogits->data != dp1->data,
                   "op_upsample_softmax2_backward: dlogits must not alias logits or dp1");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_upsample_softmax2_backward(e, dt, dlogits->data, CF(dp1), logits->data, B, h, w, H, W);
#endif
    }
    return cpu_upsample_softmax2_backward(F(dlogits), CF(dp1), CF(logits), B, h, w, H, W);
}

// ---------------------------------------------------------------------------------------------------------
// embedding lookup

Status op_embedding(Engine *e, Tensor *out, const Tensor *table, const Tensor *ids) {
    const char *op = "op_embedding";
    AGPT_TRY(check_tensor(e, table, op, "table"));
    DType dt = table->dtype;
    AGPT_TRY(check_float(e, table, dt, op, "table"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    char a[96], b[96], c[96];
    AGPT_CHECK_ARG(ids && ids->data, "op_embedding: ids are missing");
    AGPT_CHECK_ARG(ids->device == DEV_CPU && ids->dtype == DT_I32 && ids->ndim == 1,
                   "op_embedding: ids is %s, expected a host i32 tensor [N] (token ids stay on the CPU)",
                   DESC(ids, a));
    AGPT_CHECK_ARG(table->ndim == 2, "op_embedding: table %s must be [V,C]", DESC(table, a));
    const int64_t V = table->shape[0], C = table->shape[1], N = ids->shape[0];
    AGPT_CHECK_ARG(out->ndim == 2 && out->shape[0] == N && out->shape[1] == C,
                   "op_embedding: out is %s, expected [%lld,%lld] for ids %s and table %s", DESC(out, b),
                   (long long)N, (long long)C, DESC(ids, c), DESC(table, a));
    const int32_t *id = (const int32_t *)ids->data;
    for (int64_t i = 0; i < N; i++)
        AGPT_CHECK_ARG(id[i] >= 0 && id[i] < V, "op_embedding: ids[%lld] = %d is outside the table's %lld rows "
                       "[0,%lld) (table %s)", (long long)i, id[i], (long long)V, (long long)V, DESC(table, a));
    if (N == 0 || C == 0) return AGPT_OK;
    AGPT_CHECK_ARG(out->data != table->data, "op_embedding: out must not alias table");
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_embedding(e, dt, out->data, table->data, id, N, C);
#endif
    }
    cpu_embedding(F(out), CF(table), id, N, C);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// decode steps over device-side ids, positions and lengths

// An i32 vector [n] on the engine's device (host memory on the CPU engine).
static Status check_dev_i32(const Engine *e, const Tensor *t, int64_t n, const char *op, const char *what) {
    AGPT_TRY(check_tensor(e, t, op, what));
    char d[96];
    AGPT_CHECK_ARG(t->dtype == DT_I32 && tensor_numel(t) == n, "%s: %s is %s, expected i32[%lld] on %s", op, what,
                   DESC(t, d), (long long)n, device_name(e->device));
    return AGPT_OK;
}

Status op_embedding_dev(Engine *e, Tensor *out, const Tensor *table, const Tensor *ids) {
    const char *op = "op_embedding_dev";
    AGPT_TRY(check_tensor(e, table, op, "table"));
    DType dt = table->dtype;
    AGPT_TRY(check_float(e, table, dt, op, "table"));
    AGPT_TRY(check_float(e, out, dt, op, "out"));
    AGPT_TRY(check_tensor(e, ids, op, "ids"));
    char a[96], b[96];
    AGPT_CHECK_ARG(table->ndim == 2, "%s: table %s must be [V,C]", op, DESC(table, a));
    AGPT_CHECK_ARG(ids->ndim == 1, "%s: ids %s must be i32 [N]", op, DESC(ids, a));
    const int64_t V = table->shape[0], C = table->shape[1], N = ids->shape[0];
    AGPT_TRY(check_dev_i32(e, ids, N, op, "ids"));
    AGPT_CHECK_ARG(out->ndim == 2 && out->shape[0] == N && out->shape[1] == C,
                   "%s: out is %s, expected [%lld,%lld] for table %s", op, DESC(out, b), (long long)N, (long long)C,
                   DESC(table, a));
    if (N == 0 || C == 0) return AGPT_OK;
    AGPT_CHECK_ARG(out->data != table->data, "%s: out must not alias table", op);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_embedding_dev(e, dt, out->data, table->data, (const int32_t *)ids->data, N, C, V);
#endif
    }
    const int32_t *id = (const int32_t *)ids->data;
    for (int64_t i = 0; i < N; i++)
        AGPT_CHECK_ARG(id[i] >= 0 && id[i] < V, "%s: ids[%lld] = %d is outside the table's %lld rows", op,
                       (long long)i, id[i], (long long)V);
    cpu_embedding(F(out), CF(table), id, N, C);
    return AGPT_OK;
}

Status op_kv_append(Engine *e, Tensor *cache, const Tensor *rows, const Tensor *pos, int64_t max_seq) {
    const char *op = "op_kv_append";
    AGPT_TRY(check_tensor(e, cache, op, "cache"));
    DType dt = cache->dtype;
    AGPT_TRY(check_float(e, cache, dt, op, "cache"));
    AGPT_TRY(check_float(e, rows, dt, op, "rows"));
    char a[96], b[96];
    AGPT_CHECK_ARG(rows->ndim == 2 && cache->ndim == 2 && cache->shape[1] == rows->shape[1],
                   "%s: rows %s must be [B,C] and cache %s [rows,C]", op, DESC(rows, a), DESC(cache, b));
    const int64_t B = rows->shape[0], C = rows->shape[1];
    AGPT_CHECK_ARG(max_seq >= 1 && cache->shape[0] >= B * max_seq, "%s: cache %s holds fewer than %lld sequences "
                   "of max_seq %lld", op, DESC(cache, b), (long long)B, (long long)max_seq);
    AGPT_TRY(check_dev_i32(e, pos, B, op, "pos"));
    if (B == 0 || C == 0) return AGPT_OK;
    AGPT_CHECK_ARG(rows->data != cache->data, "%s: rows must not alias cache", op);
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_kv_append(e, dt, cache->data, rows->data, (const int32_t *)pos->data, B, C, max_seq);
#endif
    }
    const int32_t *p = (const int32_t *)pos->data;
    for (int64_t i = 0; i < B; i++)
        AGPT_CHECK_ARG(p[i] >= 0 && p[i] < max_seq, "%s: pos[%lld] = %d is outside [0,%lld)", op, (long long)i, p[i],
                       (long long)max_seq);
    cpu_kv_append(F(cache), CF(rows), p, B, C, max_seq);
    return AGPT_OK;
}

Status op_attention_decode(Engine *e, Tensor *out, const Tensor *q, const Tensor *k, const Tensor *v,
                           const Tensor *lengths, float scale) {
    const char *op = "op_attention_decode";
    int64_t d[5];
    AGPT_TRY(attention_dims(e, q, k, v, op, d));
    AGPT_TRY(check_float(e, out, q->dtype, op, "out"));
    AGPT_TRY(check_same_shape(out, q, op, "out and q"));
    char a[96];
    const int64_t B = d[0], S = d[2], H = d[3], D = d[4];
    AGPT_CHECK_ARG(d[1] == 1, "%s: q %s must be [B,1,H,D]: one query per sequence", op, DESC(q, a));
    AGPT_TRY(check_dev_i32(e, lengths, B, op, "lengths"));
    if (B == 0 || H == 0) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_attention_decode(e, q->dtype, out->data, q->data, k->data, v->data,
                                     (const int32_t *)lengths->data, B, S, H, D, scale);
#endif
    }
    const int32_t *len = (const int32_t *)lengths->data;
    for (int64_t i = 0; i < B; i++)
        AGPT_CHECK_ARG(len[i] >= 1 && len[i] <= S, "%s: lengths[%lld] = %d is outside [1,%lld] (the cache's keys)",
                       op, (long long)i, len[i], (long long)S);
    cpu_attention_decode(F(out), CF(q), CF(k), CF(v), len, B, S, H, D, scale);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// sampling

Status op_sample(Engine *e, int32_t *token, const Tensor *logits, float temperature, int top_k, float top_p,
                 double uniform, bool greedy) {
    const char *op = "op_sample";
    AGPT_CHECK_ARG(token != NULL, "op_sample: token is missing");
    AGPT_TRY(check_tensor(e, logits, op, "logits"));
    AGPT_TRY(check_float(e, logits, logits->dtype, op, "logits"));
    char a[96];
    const int64_t V = tensor_numel(logits);
    AGPT_CHECK_ARG(logits->ndim >= 1 && V >= 1 && V == logits->shape[logits->ndim - 1] && V <= INT32_MAX,
                   "op_sample: logits %s must be one row [V] with 1 <= V < 2^31", DESC(logits, a));
    if (!greedy) {
        AGPT_CHECK_ARG(temperature > 0 && top_p > 0 && top_p <= 1,
                       "op_sample: temperature must be > 0 and top-p in (0, 1] (got %g, %g)", (double)temperature,
                       (double)top_p);
        AGPT_CHECK_ARG(uniform >= 0 && uniform < 1, "op_sample: uniform %g is outside [0, 1)", uniform);
    }
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_sample(e, logits->dtype, token, logits->data, V, temperature, top_k, top_p, uniform, greedy);
#endif
    }
    return cpu_sample(token, CF(logits), V, temperature, top_k, top_p, uniform, greedy);
}

// ---------------------------------------------------------------------------------------------------------
// losses

// Whether the storage of a and b shares any byte.
static bool bytes_overlap(const Tensor *a, const Tensor *b) {
    const char *a0 = (const char *)a->data, *b0 = (const char *)b->data;
    const char *a1 = a0 + (size_t)tensor_numel(a) * dtype_size(a->dtype);
    const char *b1 = b0 + (size_t)tensor_numel(b) * dtype_size(b->dtype);
    return a0 < b1 && b0 < a1;
}

Status op_cross_entropy(Engine *e, double *loss_sum, Tensor *dlogits, const Tensor *logits, const Tensor *targets,
                        int32_t ignore_index, float grad_scale) {
    const char *op = "op_cross_entropy";
    AGPT_TRY(check_tensor(e, logits, op, "logits"));
    DType dt = logits->dtype;
    AGPT_TRY(check_float(e, logits, dt, op, "logits"));
    if (dlogits) {
        AGPT_TRY(check_float(e, dlogits, dt, op, "dlogits"));
        AGPT_TRY(check_same_shape(dlogits, logits, op, "dlogits and logits"));
    }
    char a[96], b[96];
    AGPT_CHECK_ARG(logits->ndim >= 1, "op_cross_entropy: logits %s must have a class dim", DESC(logits, a));
    const int64_t R = tensor_rows(logits), V = tensor_cols(logits);
    AGPT_CHECK_ARG(V >= 1 && V <= INT32_MAX && R <= INT32_MAX,
                   "op_cross_entropy: logits %s must have 1 <= V < 2^31 classes and < 2^31 rows", DESC(logits, a));
    AGPT_CHECK_ARG(targets && targets->data, "op_cross_entropy: targets are missing");
    AGPT_CHECK_ARG(targets->device == DEV_CPU && targets->dtype == DT_I32 && tensor_numel(targets) == R,
                   "op_cross_entropy: targets is %s, expected a host i32 tensor of %lld elements (one per row of "
                   "logits %s)", DESC(targets, b), (long long)R, DESC(logits, a));
    AGPT_CHECK_ARG(!dlogits || dlogits->data == logits->data || !bytes_overlap(dlogits, logits),
                   "op_cross_entropy: dlogits may be logits itself but must not overlap it otherwise");
    AGPT_CHECK_ARG(isfinite(grad_scale), "op_cross_entropy: grad_scale %g is not finite", (double)grad_scale);
    const int32_t *y = (const int32_t *)targets->data;
    for (int64_t r = 0; r < R; r++)
        AGPT_CHECK_ARG(y[r] == ignore_index || (y[r] >= 0 && y[r] < V),
                       "op_cross_entropy: targets[%lld] = %d is neither the ignore index %d nor a class in [0,%lld) "
                       "(logits %s)", (long long)r, (int)y[r], (int)ignore_index, (long long)V, DESC(logits, a));
    if (loss_sum) *loss_sum = 0.0;
    if (R == 0 || (!loss_sum && !dlogits)) return AGPT_OK;
    if (ON_CUDA(e)) {
#ifdef AGPT_WITH_CUDA
        return cuda_cross_entropy(e, dt, loss_sum, PTR(dlogits), logits->data, y, R, V, ignore_index, grad_scale);
#endif
    }
    return cpu_cross_entropy(loss_sum, dlogits ? F(dlogits) : NULL, CF(logits), y, R, V, ignore_index, grad_scale);
}
