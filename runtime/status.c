#include "runtime/status.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[2048];

Status agpt_fail_at(Status code, const char *file, int line, const char *fmt, ...) {
    // Show the path from the project root only: "runtime/x.c", not "/home/.../runtime/x.c".
    const char *short_file = file;
    const char *roots[] = {"runtime/", "kernels/", "model/", "train/", "tools/", "bench/", "tests/"};
    for (size_t i = 0; i < sizeof roots / sizeof roots[0]; i++) {
        const char *p = strstr(file, roots[i]);
        if (p && (p == file || p[-1] == '/')) { short_file = p; break; }
    }
    int n = snprintf(last_error, sizeof last_error, "%s:%d: ", short_file, line);
    if (n < 0) n = 0;
    if ((size_t)n < sizeof last_error) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

Status agpt_add_context(Status code, const char *fmt, ...) {
    char prefix[512], old[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, last_error, sizeof old);
    snprintf(last_error, sizeof last_error, "%.500s: %.1500s", prefix, old);
    return code;
}

const char *agpt_last_error(void) { return last_error; }
void agpt_clear_error(void) { last_error[0] = 0; }

const char *agpt_status_name(Status code) {
    switch (code) {
    case AGPT_OK: return "ok";
    case AGPT_ERR_ARG: return "invalid argument";
    case AGPT_ERR_IO: return "i/o error";
    case AGPT_ERR_FORMAT: return "bad format";
    case AGPT_ERR_OOM: return "out of memory";
    case AGPT_ERR_UNSUPPORTED: return "unsupported";
    case AGPT_ERR_DEVICE: return "device error";
    }
    return "unknown error";
}
