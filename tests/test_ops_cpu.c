// CPU ops through kernels/ops.h: each forward against a naive double-precision loop, each backward against
// central finite differences of that double loop, plus the shape/device checks of the op interface.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "test.h"
#define TEST_NAME_WIDTH 52
#include "test_util.h"

static Rng rng;
static Engine eng;

// ---- helpers ---------------------------------------------------------------------------------------------

// A double-precision forward: reads its inputs through ctx, returns loss = sum(out * g).
typedef double (*LossFn)(void *ctx);

// Central differences of loss() with respect to every element of x (a double array inside ctx).
static double *finite_diff(LossFn loss, void *ctx, double *x, int64_t n) {
    double *g = calloc((size_t)n + 1, sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double keep = x[i], h = 1e-6 * fmax(1.0, fabs(keep));
        x[i] = keep + h;
        double lp = loss(ctx);
        x[i] = keep - h;
        double lm = loss(ctx);
        x[i] = keep;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

// ---- matmul ----------------------------------------------------------------------------------------------

// c = op(a) op(b) for batch items; b shared when b_batched is 0.
static void ref_matmul(double *c, const float *a, const float *b, const float *bias, int64_t batch, int64_t M,
                       int64_t N, int64_t K, bool ta, bool tb, bool b_batched) {
    for (int64_t z = 0; z < batch; z++)
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) {
                double s = bias ? bias[j] : 0;
                const float *az = a + z * M * K, *bz = b + (b_batched ? z * K * N : 0);
                for (int64_t k = 0; k < K; k++)
                    s += (double)(ta ? az[k * M + i] : az[i * K + k]) * (tb ? bz[j * K + k] : bz[k * N + j]);
                c[(z * M + i) * N + j] = s;
            }
}

static void test_matmul_case(int64_t batch, int64_t M, int64_t N, int64_t K, bool ta, bool tb, bool b_batched,
                             bool with_bias) {
    char name[128];
    snprintf(name, sizeof name, "matmul b%lld %lldx%lldx%lld ta%d tb%d%s%s", (long long)batch, (long long)M,
             (long long)N, (long long)K, ta, tb, b_batched ? " batched-b" : "", with_bias ? " bias" : "");
    float *a = test_randn(&rng, batch * M * K, 1), *b = test_randn(&rng, (b_batched ? batch : 1) * K * N, 1);
    float *bias = with_bias ? test_randn(&rng, N, 1) : NULL, *c = test_poisoned(batch * M * N);
    double *ref = malloc((size_t)(batch * M * N) * sizeof(double));
    ref_matmul(ref, a, b, bias, batch, M, N, K, ta, tb, b_batched);
    Tensor ta_t = batch > 1 ? cpu_f32_3d(a, batch, ta ? K : M, ta ? M : K) : cpu_f32_2d(a, ta ? K : M, ta ? M : K);
    Tensor tb_t = b_batched ? cpu_f32_3d(b, batch, tb ? N : K, tb ? K : N) : cpu_f32_2d(b, tb ? N : K, tb ? K : N);
    Tensor tc = batch > 1 ? cpu_f32_3d(c, batch, M, N) : cpu_f32_2d(c, M, N);
    Tensor tbias = cpu_f32_1d(bias, N);
    CHECK_OK(op_matmul(&eng, &tc, &ta_t, &tb_t, with_bias ? &tbias : NULL, ta, tb, 1.0f, 0.0f));
    CHECK_CLOSE_D(name, c, ref, batch * M * N, 1e-5);

    // alpha and beta: c2 = 0.5 * op(a)op(b) + 2 * c_prev
    float *c2 = malloc((size_t)(batch * M * N) * sizeof(float));
    double *ref2 = malloc((size_t)(batch * M * N) * sizeof(double));
    for (int64_t i = 0; i < batch * M * N; i++) {
        c2[i] = (float)i * 0.01f;
        ref2[i] = 0.5 * (ref[i] - (with_bias ? bias[i % N] : 0)) + 2.0 * c2[i] + (with_bias ? bias[i % N] : 0);
    }
    Tensor tc2 = batch > 1 ? cpu_f32_3d(c2, batch, M, N) : cpu_f32_2d(c2, M, N);
    CHECK_OK(op_matmul(&eng, &tc2, &ta_t, &tb_t, with_bias ? &tbias : NULL, ta, tb, 0.5f, 2.0f));
    snprintf(name + strlen(name), sizeof name - strlen(name), " a.5 b2");
    CHECK_CLOSE_D(name, c2, ref2, batch * M * N, 1e-5);
    free(a), free(b), free(bias), free(c), free(ref), free(c2), free(ref2);
}

// Gradient of loss = sum(g * op(a) op(b)) is exact in closed form: da = g op(b)^T etc. Check against the
// double reference by finite differences on a tiny case, all transpose combinations and batch layouts.
typedef struct MatmulCtx {
    double *a, *b, *g;
    int64_t batch, M, N, K;
    bool ta, tb, b_batched;
} MatmulCtx;

static double matmul_loss(void *p) {
    MatmulCtx *c = p;
    double L = 0;
    for (int64_t z = 0; z < c->batch; z++)
        for (int64_t i = 0; i < c->M; i++)
            for (int64_t j = 0; j < c->N; j++) {
                const double *az = c->a + z * c->M * c->K, *bz = c->b + (c->b_batched ? z * c->K * c->N : 0);
                double s = 0;
                for (int64_t k = 0; k < c->K; k++)
                    s += (c->ta ? az[k * c->M + i] : az[i * c->K + k]) * (c->tb ? bz[j * c->K + k] : bz[k * c->N + j]);
                L += s * c->g[(z * c->M + i) * c->N + j];
            }
    return L;
}

static void test_matmul_backward_case(int64_t batch, bool ta, bool tb, bool b_batched) {
    int64_t M = 5, N = 4, K = 3;
    int64_t na = batch * M * K, nb = (b_batched ? batch : 1) * K * N, nc = batch * M * N;
    float *a = test_randn(&rng, na, 1), *b = test_randn(&rng, nb, 1), *g = test_randn(&rng, nc, 1);
    float *da = test_poisoned(na), *db = test_poisoned(nb);
    Tensor ta_t = batch > 1 ? cpu_f32_3d(a, batch, ta ? K : M, ta ? M : K) : cpu_f32_2d(a, ta ? K : M, ta ? M : K);
    Tensor tb_t = b_batched ? cpu_f32_3d(b, batch, tb ? N : K, tb ? K : N) : cpu_f32_2d(b, tb ? N : K, tb ? K : N);
    Tensor tda = ta_t, tdb = tb_t;
    tda.data = da, tdb.data = db;
    Tensor tg = batch > 1 ? cpu_f32_3d(g, batch, M, N) : cpu_f32_2d(g, M, N);
    CHECK_OK(op_matmul_backward(&eng, &tda, &tdb, &tg, &ta_t, &tb_t, ta, tb, false));
    MatmulCtx ctx = {
        test_to_double(a, na), test_to_double(b, nb), test_to_double(g, nc), batch, M, N, K, ta, tb, b_batched};
    double *fa = finite_diff(matmul_loss, &ctx, ctx.a, na), *fb = finite_diff(matmul_loss, &ctx, ctx.b, nb);
    char name[96];
    snprintf(name, sizeof name, "matmul_backward b%lld ta%d tb%d%s da", (long long)batch, ta, tb,
             b_batched ? " batched-b" : "");
    CHECK_CLOSE_D(name, da, fa, na, 1e-5);
    name[strlen(name) - 2] = 0;
    strcat(name, "db");
    CHECK_CLOSE_D(name, db, fb, nb, 1e-5);
    // accumulate = true adds the same gradient again
    CHECK_OK(op_matmul_backward(&eng, &tda, &tdb, &tg, &ta_t, &tb_t, ta, tb, true));
    for (int64_t i = 0; i < nb; i++) fb[i] *= 2;
    strcat(name, " accumulated");
    CHECK_CLOSE_D(name, db, fb, nb, 1e-5);
    free(a), free(b), free(g), free(da), free(db), free(fa), free(fb), free(ctx.a), free(ctx.b), free(ctx.g);
}

typedef struct LinearCtx {
    double *x, *w, *bias, *g;
    int64_t rows, K, N;
} LinearCtx;

static double linear_loss(void *p) {
    LinearCtx *c = p;
    double L = 0;
    for (int64_t r = 0; r < c->rows; r++)
        for (int64_t n = 0; n < c->N; n++) {
            double s = c->bias[n];
            for (int64_t k = 0; k < c->K; k++) s += c->x[r * c->K + k] * c->w[n * c->K + k];
            L += s * c->g[r * c->N + n];
        }
    return L;
}

static void test_linear(void) {
    int64_t B = 2, T = 3, K = 6, N = 5, rows = B * T;
    float *x = test_randn(&rng, rows * K, 1), *w = test_randn(&rng, N * K, 1), *bias = test_randn(&rng, N, 1),
          *g = test_randn(&rng, rows * N, 1);
    float *y = test_poisoned(rows * N), *dx = test_poisoned(rows * K);
    float *dw = calloc((size_t)(N * K), sizeof(float)), *db = calloc((size_t)N, sizeof(float));
    Tensor tx = cpu_f32_3d(x, B, T, K), tw = cpu_f32_2d(w, N, K), tb = cpu_f32_1d(bias, N), ty = cpu_f32_3d(y, B, T, N),
           tg = cpu_f32_3d(g, B, T, N);
    Tensor tdx = cpu_f32_3d(dx, B, T, K), tdw = cpu_f32_2d(dw, N, K), tdb = cpu_f32_1d(db, N);
    CHECK_OK(op_linear(&eng, &ty, &tx, &tw, &tb));
    LinearCtx ctx = {test_to_double(x, rows * K), test_to_double(w, N * K), test_to_double(bias, N),
                     test_to_double(g, rows * N), rows, K, N};
    double *ref = malloc((size_t)(rows * N) * sizeof(double));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t n = 0; n < N; n++) {
            double s = bias[n];
            for (int64_t k = 0; k < K; k++) s += (double)x[r * K + k] * w[n * K + k];
            ref[r * N + n] = s;
        }
    CHECK_CLOSE_D("linear [2,3,6] @ [5,6]^T + b", y, ref, rows * N, 1e-6);
    CHECK_OK(op_linear_backward(&eng, &tdx, &tdw, &tdb, &tg, &tx, &tw));
    double *fx = finite_diff(linear_loss, &ctx, ctx.x, rows * K);
    double *fw = finite_diff(linear_loss, &ctx, ctx.w, N * K);
    double *fb = finite_diff(linear_loss, &ctx, ctx.bias, N);
    CHECK_CLOSE_D("linear_backward dx", dx, fx, rows * K, 1e-5);
    CHECK_CLOSE_D("linear_backward dw", dw, fw, N * K, 1e-5);
    CHECK_CLOSE_D("linear_backward dbias", db, fb, N, 1e-5);
    // A second call accumulates into dw and db but overwrites dx.
    CHECK_OK(op_linear_backward(&eng, &tdx, &tdw, &tdb, &tg, &tx, &tw));
    for (int64_t i = 0; i < N * K; i++) fw[i] *= 2;
    for (int64_t i = 0; i < N; i++) fb[i] *= 2;
    CHECK_CLOSE_D("linear_backward dx overwritten", dx, fx, rows * K, 1e-5);
    CHECK_CLOSE_D("linear_backward dw accumulated", dw, fw, N * K, 1e-5);
    CHECK_CLOSE_D("linear_backward dbias accumulated", db, fb, N, 1e-5);
    // wrong shapes are errors, not crashes
    Tensor bad_w = cpu_f32_2d(w, K, N);
    CHECK_ERR(op_linear(&eng, &ty, &tx, &bad_w, &tb));
    Tensor bad_y = cpu_f32_3d(y, B, T, N - 1);
    CHECK_ERR(op_linear(&eng, &bad_y, &tx, &tw, &tb));
    free(x), free(w), free(bias), free(g), free(y), free(dx), free(dw), free(db), free(ref), free(fx), free(fw),
        free(fb), free(ctx.x), free(ctx.w), free(ctx.bias), free(ctx.g);
}

// ---- norms -----------------------------------------------------------------------------------------------

typedef struct NormCtx {
    double *x, *w, *b, *g;  // b is NULL for RMSNorm
    int64_t rows, C;
    double eps;
} NormCtx;

static void ref_norm(const NormCtx *c, double *out) {
    for (int64_t r = 0; r < c->rows; r++) {
        const double *x = c->x + r * c->C;
        double mu = 0, ss = 0;
        if (c->b) {
            for (int64_t i = 0; i < c->C; i++) mu += x[i];
            mu /= (double)c->C;
        }
        for (int64_t i = 0; i < c->C; i++) ss += (x[i] - mu) * (x[i] - mu);
        double rs = 1.0 / sqrt(ss / (double)c->C + c->eps);
        for (int64_t i = 0; i < c->C; i++) out[r * c->C + i] = (x[i] - mu) * rs * c->w[i] + (c->b ? c->b[i] : 0);
    }
}

static double norm_loss(void *p) {
    NormCtx *c = p;
    double *out = malloc((size_t)(c->rows * c->C) * sizeof(double)), L = 0;
    ref_norm(c, out);
    for (int64_t i = 0; i < c->rows * c->C; i++) L += out[i] * c->g[i];
    free(out);
    return L;
}

static void test_norm(bool layernorm, int64_t rows, int64_t C, bool with_grad) {
    const char *nm = layernorm ? "layernorm" : "rmsnorm";
    float eps = layernorm ? 1e-6f : 1e-6f;
    int64_t n = rows * C;
    float *x = test_randn(&rng, n, 1), *w = test_randn(&rng, C, 1), *b = test_randn(&rng, C, 1), *y = test_poisoned(n);
    for (int64_t i = 0; i < n; i++) x[i] += 0.5f;  // a non-zero mean, so LayerNorm's centring matters
    float *mean = test_poisoned(rows), *rstd = test_poisoned(rows);
    Tensor tx = cpu_f32_2d(x, rows, C), tw = cpu_f32_1d(w, C), tb = cpu_f32_1d(b, C), ty = cpu_f32_2d(y, rows, C);
    Tensor tmean = cpu_f32_1d(mean, rows), trstd = cpu_f32_1d(rstd, rows);
    if (layernorm) CHECK_OK(op_layernorm(&eng, &ty, &tmean, &trstd, &tx, &tw, &tb, eps));
    else CHECK_OK(op_rmsnorm(&eng, &ty, &trstd, &tx, &tw, eps));
    NormCtx ctx = {
        test_to_double(x, n), test_to_double(w, C), layernorm ? test_to_double(b, C) : NULL, NULL, rows, C, eps};
    double *ref = malloc((size_t)n * sizeof(double));
    ref_norm(&ctx, ref);
    char name[96];
    snprintf(name, sizeof name, "%s %lldx%lld", nm, (long long)rows, (long long)C);
    CHECK_CLOSE_D(name, y, ref, n, 1e-6);
    if (with_grad) {
        float *g = test_randn(&rng, n, 1), *dx = test_poisoned(n);
        float *dw = calloc((size_t)C, sizeof(float)), *db = calloc((size_t)C, sizeof(float));
        Tensor tg = cpu_f32_2d(g, rows, C), tdx = cpu_f32_2d(dx, rows, C), tdw = cpu_f32_1d(dw, C),
               tdb = cpu_f32_1d(db, C);
        if (layernorm) CHECK_OK(op_layernorm_backward(&eng, &tdx, &tdw, &tdb, &tg, &tx, &tw, &tmean, &trstd));
        else CHECK_OK(op_rmsnorm_backward(&eng, &tdx, &tdw, &tg, &tx, &tw, &trstd));
        ctx.g = test_to_double(g, n);
        double *fx = finite_diff(norm_loss, &ctx, ctx.x, n), *fw = finite_diff(norm_loss, &ctx, ctx.w, C);
        snprintf(name, sizeof name, "%s_backward %lldx%lld dx", nm, (long long)rows, (long long)C);
        CHECK_CLOSE_D(name, dx, fx, n, 1e-5);
        snprintf(name, sizeof name, "%s_backward %lldx%lld dw", nm, (long long)rows, (long long)C);
        CHECK_CLOSE_D(name, dw, fw, C, 1e-5);
        if (layernorm) {
            double *fb = finite_diff(norm_loss, &ctx, ctx.b, C);
            snprintf(name, sizeof name, "%s_backward %lldx%lld db", nm, (long long)rows, (long long)C);
            CHECK_CLOSE_D(name, db, fb, C, 1e-5);
            free(fb);
        }
        free(g), free(dx), free(dw), free(db), free(fx), free(fw), free(ctx.g);
    }
    Tensor bad_w = cpu_f32_1d(w, C - 1);
    if (layernorm) CHECK_ERR(op_layernorm(&eng, &ty, NULL, NULL, &tx, &bad_w, &tb, eps));
    else CHECK_ERR(op_rmsnorm(&eng, &ty, NULL, &tx, &bad_w, eps));
    free(x), free(w), free(b), free(y), free(mean), free(rstd), free(ref), free(ctx.x), free(ctx.w), free(ctx.b);
}

// ---- activations and softmax -----------------------------------------------------------------------------

typedef struct ActCtx {
    int kind;  // 0 gelu, 1 swiglu, 2 softmax
    double *x, *u, *g;
    int64_t rows, C;
    double scale;
} ActCtx;

static void ref_act(const ActCtx *c, double *out) {
    int64_t n = c->rows * c->C;
    if (c->kind == 0)
        for (int64_t i = 0; i < n; i++) out[i] = 0.5 * c->x[i] * (1 + erf(c->x[i] / sqrt(2.0)));
    else if (c->kind == 1)
        for (int64_t i = 0; i < n; i++) out[i] = c->x[i] / (1 + exp(-c->x[i])) * c->u[i];
    else
        for (int64_t r = 0; r < c->rows; r++) {
            const double *x = c->x + r * c->C;
            double mx = -INFINITY, s = 0;
            for (int64_t i = 0; i < c->C; i++) mx = fmax(mx, c->scale * x[i]);
            for (int64_t i = 0; i < c->C; i++) s += exp(c->scale * x[i] - mx);
            for (int64_t i = 0; i < c->C; i++) out[r * c->C + i] = exp(c->scale * x[i] - mx) / s;
        }
}

static double act_loss(void *p) {
    ActCtx *c = p;
    int64_t n = c->rows * c->C;
    double *out = malloc((size_t)n * sizeof(double)), L = 0;
    ref_act(c, out);
    for (int64_t i = 0; i < n; i++) L += out[i] * c->g[i];
    free(out);
    return L;
}

static void test_activation(int kind, int64_t rows, int64_t C, bool with_grad) {
    const char *names[] = {"gelu", "swiglu", "softmax"};
    int64_t n = rows * C;
    float scale = 0.7f;
    float *x = test_randn(&rng, n, 2), *u = test_randn(&rng, n, 1), *y = test_poisoned(n);
    Tensor tx = cpu_f32_2d(x, rows, C), tu = cpu_f32_2d(u, rows, C), ty = cpu_f32_2d(y, rows, C);
    if (kind == 0) CHECK_OK(op_gelu(&eng, &ty, &tx));
    else if (kind == 1) CHECK_OK(op_swiglu(&eng, &ty, &tx, &tu));
    else CHECK_OK(op_softmax(&eng, &ty, &tx, scale));
    ActCtx ctx = {kind, test_to_double(x, n), test_to_double(u, n), NULL, rows, C, scale};
    double *ref = calloc((size_t)n, sizeof(double));
    ref_act(&ctx, ref);
    char name[96];
    snprintf(name, sizeof name, "%s %lldx%lld", names[kind], (long long)rows, (long long)C);
    CHECK_CLOSE_D(name, y, ref, n, 1e-6);
    if (with_grad) {
        float *g = test_randn(&rng, n, 1), *dx = test_poisoned(n), *du = test_poisoned(n);
        Tensor tg = cpu_f32_2d(g, rows, C), tdx = cpu_f32_2d(dx, rows, C), tdu = cpu_f32_2d(du, rows, C);
        if (kind == 0) CHECK_OK(op_gelu_backward(&eng, &tdx, &tg, &tx));
        else if (kind == 1) CHECK_OK(op_swiglu_backward(&eng, &tdx, &tdu, &tg, &tx, &tu));
        else CHECK_OK(op_softmax_backward(&eng, &tdx, &tg, &ty, scale));
        ctx.g = test_to_double(g, n);
        double *fx = finite_diff(act_loss, &ctx, ctx.x, n);
        snprintf(name, sizeof name, "%s_backward %lldx%lld dx", names[kind], (long long)rows, (long long)C);
        CHECK_CLOSE_D(name, dx, fx, n, 1e-5);
        if (kind == 1) {
            double *fu = finite_diff(act_loss, &ctx, ctx.u, n);
            CHECK_CLOSE_D("swiglu_backward dup", du, fu, n, 1e-5);
            free(fu);
        }
        free(g), free(dx), free(du), free(fx), free(ctx.g);
    }
    free(x), free(u), free(y), free(ref), free(ctx.x), free(ctx.u);
}

// ---- attention and RoPE ----------------------------------------------------------------------------------

typedef struct AttnCtx {
    double *q, *k, *v, *g;
    int64_t B, Tq, Tk, H, D;
    bool causal;
    double scale;
} AttnCtx;

#define IDX(b, t, h, d, T, H, D) ((((b) * (T) + (t)) * (H) + (h)) * (D) + (d))

static void ref_attention(const AttnCtx *c, double *out) {
    double *p = malloc((size_t)c->Tk * sizeof(double));
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t h = 0; h < c->H; h++)
            for (int64_t i = 0; i < c->Tq; i++) {
                double mx = -INFINITY, s = 0;
                for (int64_t j = 0; j < c->Tk; j++) {
                    bool masked = c->causal && j > i + (c->Tk - c->Tq);
                    double dot = 0;
                    for (int64_t d = 0; d < c->D; d++)
                        dot += c->q[IDX(b, i, h, d, c->Tq, c->H, c->D)] * c->k[IDX(b, j, h, d, c->Tk, c->H, c->D)];
                    p[j] = masked ? -INFINITY : dot * c->scale;
                    mx = fmax(mx, p[j]);
                }
                for (int64_t j = 0; j < c->Tk; j++) s += (p[j] = exp(p[j] - mx));
                for (int64_t d = 0; d < c->D; d++) {
                    double o = 0;
                    for (int64_t j = 0; j < c->Tk; j++) o += p[j] / s * c->v[IDX(b, j, h, d, c->Tk, c->H, c->D)];
                    out[IDX(b, i, h, d, c->Tq, c->H, c->D)] = o;
                }
            }
    free(p);
}

static double attn_loss(void *p) {
    AttnCtx *c = p;
    int64_t n = c->B * c->Tq * c->H * c->D;
    double *out = malloc((size_t)n * sizeof(double)), L = 0;
    ref_attention(c, out);
    for (int64_t i = 0; i < n; i++) L += out[i] * c->g[i];
    free(out);
    return L;
}

static void test_attention(int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal, bool with_grad) {
    int64_t nq = B * Tq * H * D, nk = B * Tk * H * D;
    float scale = 1.0f / sqrtf((float)D);
    float *q = test_randn(&rng, nq, 1), *k = test_randn(&rng, nk, 1), *v = test_randn(&rng, nk, 1),
          *o = test_poisoned(nq);
    Tensor tq = cpu_f32_4d(q, B, Tq, H, D), tk = cpu_f32_4d(k, B, Tk, H, D), tv = cpu_f32_4d(v, B, Tk, H, D),
           to = cpu_f32_4d(o, B, Tq, H, D);
    CHECK_OK(op_attention(&eng, &to, &tq, &tk, &tv, causal, scale));
    AttnCtx ctx = {
        test_to_double(q, nq), test_to_double(k, nk), test_to_double(v, nk), NULL, B, Tq, Tk, H, D, causal, scale};
    double *ref = malloc((size_t)nq * sizeof(double));
    ref_attention(&ctx, ref);
    char name[96];
    snprintf(name, sizeof name, "attention B%lld Tq%lld Tk%lld H%lld D%lld%s", (long long)B, (long long)Tq,
             (long long)Tk, (long long)H, (long long)D, causal ? " causal" : "");
    CHECK_CLOSE_D(name, o, ref, nq, 1e-5);
    if (with_grad) {
        float *g = test_randn(&rng, nq, 1), *dq = test_poisoned(nq), *dk = test_poisoned(nk), *dv = test_poisoned(nk);
        Tensor tg = cpu_f32_4d(g, B, Tq, H, D), tdq = cpu_f32_4d(dq, B, Tq, H, D), tdk = cpu_f32_4d(dk, B, Tk, H, D),
               tdv = cpu_f32_4d(dv, B, Tk, H, D);
        CHECK_OK(op_attention_backward(&eng, &tdq, &tdk, &tdv, &tg, &tq, &tk, &tv, causal, scale));
        ctx.g = test_to_double(g, nq);
        double *fq = finite_diff(attn_loss, &ctx, ctx.q, nq), *fk = finite_diff(attn_loss, &ctx, ctx.k, nk),
               *fv = finite_diff(attn_loss, &ctx, ctx.v, nk);
        char gname[128];
        snprintf(gname, sizeof gname, "%s dq", name);
        CHECK_CLOSE_D(gname, dq, fq, nq, 1e-5);
        snprintf(gname, sizeof gname, "%s dk", name);
        CHECK_CLOSE_D(gname, dk, fk, nk, 1e-5);
        snprintf(gname, sizeof gname, "%s dv", name);
        CHECK_CLOSE_D(gname, dv, fv, nk, 1e-5);
        free(g), free(dq), free(dk), free(dv), free(fq), free(fk), free(fv), free(ctx.g);
    }
    free(q), free(k), free(v), free(o), free(ref), free(ctx.q), free(ctx.k), free(ctx.v);
}

static void ref_rope(double *out, const double *x, const int32_t *pos, int64_t B, int64_t T, int64_t H,
                     int64_t D, double base, int dir) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < D / 2; i++) {
                    double a = pos[b * T + t] * pow(base, -2.0 * (double)i / (double)D);
                    double c = cos(a), s = dir * sin(a);
                    double x1 = x[IDX(b, t, h, i, T, H, D)], x2 = x[IDX(b, t, h, i + D / 2, T, H, D)];
                    out[IDX(b, t, h, i, T, H, D)] = x1 * c - x2 * s;
                    out[IDX(b, t, h, i + D / 2, T, H, D)] = x2 * c + x1 * s;
                }
}

static void test_rope(void) {
    int64_t B = 2, T = 5, H = 3, D = 16, n = B * T * H * D;
    int32_t pos[10] = {0, 1, 2, 3, 4, 100, 101, 102, 103, 2047};
    float *x = test_randn(&rng, n, 1), *y = test_poisoned(n), *back = test_poisoned(n);
    Tensor tx = cpu_f32_4d(x, B, T, H, D), ty = cpu_f32_4d(y, B, T, H, D), tback = cpu_f32_4d(back, B, T, H, D);
    Tensor tpos = tensor_2d(pos, DT_I32, DEV_CPU, B, T);
    CHECK_OK(op_rope(&eng, &ty, &tx, &tpos, 10000.0f));
    double *xd = test_to_double(x, n), *ref = malloc((size_t)n * sizeof(double));
    ref_rope(ref, xd, pos, B, T, H, D, 10000.0, 1);
    // Positions up to 2047: the float angle loses ~1e-4 absolute, as HF's float32 RoPE does.
    CHECK_CLOSE_D("rope B2 T5 H3 D16 positions to 2047", y, ref, n, 2e-5);
    // The backward is the inverse rotation: applying it to the output gives the input back, and it is the
    // transpose of the forward (the gradient of sum(g * rope(x)) is rope^-1(g)).
    CHECK_OK(op_rope_backward(&eng, &tback, &ty, &tpos, 10000.0f));
    CHECK_CLOSE(back, x, n, 1e-6, "rope_backward(rope(x)) == x");
    ref_rope(ref, xd, pos, B, T, H, D, 10000.0, -1);
    CHECK_OK(op_rope_backward(&eng, &tback, &tx, &tpos, 10000.0f));
    CHECK_CLOSE_D("rope_backward vs double inverse rotation", back, ref, n, 2e-5);
    // in place
    CHECK_OK(op_rope(&eng, &tx, &tx, &tpos, 10000.0f));
    CHECK_CLOSE(x, y, n, 0, "rope in place equals out of place");
    Tensor odd = cpu_f32_4d(x, B, T, H * 2, D / 2 - 1);
    Tensor wrong_pos = tensor_2d(pos, DT_F32, DEV_CPU, B, T);
    CHECK_ERR(op_rope(&eng, &ty, &tx, &wrong_pos, 10000.0f));
    (void)odd;
    free(x), free(y), free(back), free(xd), free(ref);
}

// ---- small ops and interface checks ----------------------------------------------------------------------

static void test_small_ops(void) {
    int64_t n = 1000;
    float *a = test_randn(&rng, n, 1), *b = test_randn(&rng, n, 1), *c = test_poisoned(n);
    double *ref = malloc((size_t)n * sizeof(double));
    Tensor ta = cpu_f32_2d(a, 10, 100), tb = cpu_f32_2d(b, 10, 100), tc = cpu_f32_2d(c, 10, 100);
    CHECK_OK(op_add(&eng, &tc, &ta, &tb));
    for (int64_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    CHECK_CLOSE_D("add", c, ref, n, 1e-7);
    CHECK_OK(op_scale(&eng, &tc, -3.0f));
    for (int64_t i = 0; i < n; i++) ref[i] *= -3.0;
    CHECK_CLOSE_D("scale", c, ref, n, 1e-7);
    double ss = 0, want = 0;
    for (int64_t i = 0; i < n; i++) want += (double)a[i] * a[i];
    CHECK_OK(op_sum_squares(&eng, &ss, &ta));
    CHECK(fabs(ss - want) <= 1e-12 * want, "sum_squares %.17g vs %.17g", ss, want);

    // casts through bf16 and f16 and back equal the scalar conversions
    uint16_t *h = malloc((size_t)n * 2);
    Tensor th = tensor_2d(h, DT_BF16, DEV_CPU, 10, 100);
    CHECK_OK(op_cast(&eng, &th, &ta));
    CHECK_OK(op_cast(&eng, &tc, &th));
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad += c[i] != bf16_to_f32(f32_to_bf16(a[i]));
    CHECK(bad == 0, "cast f32->bf16->f32: %d mismatches", bad);
    th.dtype = DT_F16;
    CHECK_OK(op_cast(&eng, &th, &ta));
    CHECK_OK(op_cast(&eng, &tc, &th));
    bad = 0;
    for (int64_t i = 0; i < n; i++) bad += c[i] != f16_to_f32(f32_to_f16(a[i]));
    CHECK(bad == 0, "cast f32->f16->f32: %d mismatches", bad);

    // The interface refuses what it cannot do, with a message.
    Tensor wrong_shape = cpu_f32_2d(b, 100, 10);
    CHECK_ERR(op_add(&eng, &tc, &ta, &wrong_shape));
    Tensor on_gpu = ta;
    on_gpu.device = DEV_CUDA;
    CHECK_ERR(op_add(&eng, &tc, &on_gpu, &tb));
    CHECK_ERR(op_gelu(&eng, &tc, &th));  // f16 on the CPU backend
    Tensor missing = ta;
    missing.data = NULL;
    CHECK_ERR(op_gelu(&eng, &tc, &missing));
    Tensor m1 = cpu_f32_2d(a, 10, 100), m2 = cpu_f32_2d(b, 10, 100), m3 = cpu_f32_2d(c, 10, 10);
    CHECK_ERR(op_matmul(&eng, &m3, &m1, &m2, NULL, false, false, 1, 0));  // inner dims differ
    Tensor q = cpu_f32_4d(a, 1, 5, 2, 10), k = cpu_f32_4d(b, 1, 4, 2, 10), o = cpu_f32_4d(c, 1, 5, 2, 10);
    CHECK_ERR(op_attention(&eng, &o, &q, &k, &k, true, 1));  // 5 queries over 4 keys
    Tensor q0 = cpu_f32_4d(a, 1, 0, 2, 10), o0 = cpu_f32_4d(c, 1, 0, 2, 10);
    CHECK_OK(op_attention(&eng, &o0, &q0, &k, &k, true, 1));  // no queries: nothing to do, no crash
    free(a), free(b), free(c), free(ref), free(h);
}

int main(void) {
    rng_seed(&rng, 42);
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 42));

    // matmul: every transpose combination, batched, shared weight, bias, alpha/beta, and one real-width case
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            test_matmul_case(1, 33, 47, 80, ta, tb, false, ta == tb);
            test_matmul_case(3, 17, 9, 64, ta, tb, true, false);
            test_matmul_case(3, 17, 9, 64, ta, tb, false, true);
            test_matmul_case(1, 1, 47, 80, ta, tb, false, true);  // one row: the sgemv path of a decode step
            test_matmul_case(3, 1, 9, 64, ta, tb, true, false);
            test_matmul_backward_case(1, ta, tb, false);
            test_matmul_backward_case(3, ta, tb, true);
            test_matmul_backward_case(3, ta, tb, false);
        }
    test_matmul_case(1, 257, 64, 1280, false, true, false, true);
    test_linear();

    // norms at small sizes with gradients, and at the real widths forward
    test_norm(true, 3, 7, true);
    test_norm(false, 3, 7, true);
    int64_t widths[] = {1280, 4096, 5120, 11008};
    for (int i = 0; i < 4; i++) {
        test_norm(true, 5, widths[i], false);
        test_norm(false, 5, widths[i], false);
    }
    test_norm(true, 257, 1280, false);
    test_norm(false, 1000, 64, false);

    for (int kind = 0; kind < 3; kind++) {
        test_activation(kind, 3, 9, true);
        for (int i = 0; i < 4; i++) test_activation(kind, 3, widths[i], false);
        test_activation(kind, 257, 257, false);
    }

    test_attention(2, 5, 5, 2, 4, false, true);
    test_attention(1, 6, 6, 2, 3, true, true);
    test_attention(1, 2, 5, 1, 4, true, true);  // decode-style: 2 new queries over a cache of 5
    test_attention(2, 17, 17, 2, 80, false, false);
    test_attention(1, 77, 77, 2, 64, true, false);
    test_attention(1, 1, 300, 2, 128, true, false);
    test_rope();
    test_small_ops();

    engine_destroy(&eng);
    return test_summary();
}
