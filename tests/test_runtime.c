// Runtime pieces: errors, tensors, arena, RNG reproducibility, timers, progress output, thread control.
#include <string.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "runtime/threads.h"
#include "runtime/timer.h"
#include "test.h"

static Status fails_deep(void) { return AGPT_FAIL(AGPT_ERR_FORMAT, "bad thing %d", 42); }
static Status fails_through(void) {
    AGPT_TRY(fails_deep());
    return AGPT_OK;
}

int main(void) {
    // Errors carry file:line and the message, and context can be added on the way up.
    Status s = fails_through();
    CHECK(s == AGPT_ERR_FORMAT, "status propagates");
    CHECK(strstr(agpt_last_error(), "tests/test_runtime.c:") && strstr(agpt_last_error(), "bad thing 42"),
          "message has file:line: %s", agpt_last_error());
    agpt_add_context(s, "loading %s", "x.safetensors");
    CHECK(strncmp(agpt_last_error(), "loading x.safetensors: tests/", 29) == 0, "context: %s", agpt_last_error());

    // Tensors
    float buf[24];
    Tensor t = tensor_3d(buf, DT_F32, DEV_CPU, 2, 3, 4);
    CHECK(tensor_numel(&t) == 24 && tensor_rows(&t) == 6 && tensor_cols(&t) == 4 && tensor_nbytes(&t) == 96,
          "tensor sizes");
    char d[64];
    CHECK(strcmp(tensor_describe(&t, d, sizeof d), "f32[2,3,4]@cpu") == 0, "describe: %s", d);
    Tensor r;
    CHECK_OK(tensor_reshape(&t, 2, (int64_t[]){6, 4}, &r));
    CHECK_ERR(tensor_reshape(&t, 2, (int64_t[]){5, 4}, &r));
    Tensor rows = tensor_rows_view(&t, 2, 3);
    CHECK(rows.data == buf + 8 && rows.shape[0] == 3 && rows.shape[1] == 4, "rows view");

    // Arena: aligned pieces, a clear error when full, reset to a mark.
    Arena a;
    CHECK_OK(arena_init(&a, DEV_CPU, 4096));
    Tensor x, y, z;
    CHECK_OK(arena_tensor(&a, DT_F32, 1, (int64_t[]){10}, &x));
    size_t mark = arena_mark(&a);
    CHECK_OK(arena_tensor(&a, DT_BF16, 2, (int64_t[]){3, 5}, &y));
    CHECK(((uintptr_t)x.data % AGPT_ALIGN) == 0 && ((uintptr_t)y.data % AGPT_ALIGN) == 0, "arena alignment");
    CHECK_ERR(arena_tensor(&a, DT_F32, 1, (int64_t[]){2000}, &z));
    CHECK(strstr(agpt_last_error(), "arena full") != NULL, "arena message: %s", agpt_last_error());
    arena_reset_to(&a, mark);
    CHECK_OK(arena_tensor(&a, DT_BF16, 2, (int64_t[]){3, 5}, &z));
    CHECK(z.data == y.data, "reset reuses memory");
    arena_free(&a);

    // Host OOM is an error with the size, never a crash.
    void *p = NULL;
    CHECK_ERR(mem_host_alloc((size_t)1 << 62, &p));
    CHECK(strstr(agpt_last_error(), "GiB") != NULL, "OOM message has the size: %s", agpt_last_error());
    CHECK_OK(mem_host_alloc(100, &p));
    Tensor zt = tensor_1d(p, DT_U8, DEV_CPU, 100);
    memset(p, 7, 100);
    CHECK_OK(tensor_zero(&zt));
    CHECK(((unsigned char *)p)[99] == 0, "tensor_zero");
    mem_host_free(p);
    if (cuda_device_count() == 0) {  // no GPU here: device requests fail cleanly
        CHECK_ERR(mem_device_alloc(16, &p));
        Arena ga;
        CHECK_ERR(arena_init(&ga, DEV_CUDA, 16));
    }

    // RNG: same seed, same sequence; different seeds differ; normal has about the right moments.
    Rng r1, r2;
    rng_seed(&r1, 5);
    rng_seed(&r2, 5);
    int same = 1;
    for (int i = 0; i < 100; i++) same &= rng_u64(&r1) == rng_u64(&r2);
    CHECK(same, "rng reproducible");
    rng_seed(&r2, 6);
    CHECK(rng_u64(&r1) != rng_u64(&r2), "different seeds differ");
    double m = 0, v = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        double g = rng_normal(&r1);
        m += g;
        v += g * g;
    }
    m /= n, v = v / n - m * m;
    CHECK(fabs(m) < 0.01 && fabs(v - 1) < 0.02, "normal mean %g var %g", m, v);
    float u[1000];
    rng_fill_uniform(&r1, u, 1000, -2, 3);
    float lo = 1e9f, hi = -1e9f;
    for (int i = 0; i < 1000; i++) lo = fminf(lo, u[i]), hi = fmaxf(hi, u[i]);
    CHECK(lo >= -2 && hi < 3 && hi - lo > 4.5f, "uniform range [%g, %g)", lo, hi);

    // Monotonic timer
    double t0 = timer_now_s();
    usleep(2000);
    CHECK(timer_now_s() - t0 >= 0.0015, "timer advances");

    // Threads
    threads_set(2);
    CHECK(threads_get() == 2, "threads_set(2) -> %d", threads_get());
    threads_set(0);
    CHECK(threads_get() >= 1, "threads_set(0)");

    // Progress on a non-terminal writes plain lines: capture through a pipe.
    int fds[2];
    CHECK(pipe(fds) == 0, "pipe");
    Progress pr;
    progress_begin(&pr, "convert", 3);
    pr.fd = fds[1];
    pr.tty = false;
    for (int i = 0; i < 3; i++) progress_step(&pr, 1);
    progress_end(&pr);
    close(fds[1]);
    char out[512] = {0};
    ssize_t got = read(fds[0], out, sizeof out - 1);
    close(fds[0]);
    CHECK(got > 0 && strstr(out, "convert 1/3") && strstr(out, "convert 3/3 (100%)") && !strchr(out, '\r'),
          "progress lines: %s", out);

    CHECK(log_level_from_name("debug") == LOG_DEBUG && log_level_from_name("loud") == -1, "log levels");
    return test_summary();
}
