// Errors: every library function that can fail returns a Status. AGPT_OK is 0.
// The failing function records a message (file:line, what was asked, a hint) in a
// thread-local buffer; the caller reads it with agpt_last_error(). Only the CLI exits.
#pragma once
#include <stdarg.h>

typedef enum Status {
    AGPT_OK = 0,
    AGPT_ERR_ARG,          // a caller passed a wrong shape, dtype, device or value
    AGPT_ERR_IO,           // a file could not be opened, read, written or mapped
    AGPT_ERR_FORMAT,       // a file or buffer is corrupt, truncated or of an unknown kind
    AGPT_ERR_OOM,          // an allocation failed (host or device)
    AGPT_ERR_UNSUPPORTED,  // valid input that this build cannot handle (e.g. CUDA op without CUDA)
    AGPT_ERR_DEVICE,       // a CUDA, cuBLAS or cuDNN call failed
} Status;

// Records "file:line: message" and returns code. The message is printf-style.
Status agpt_fail_at(Status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
// The last recorded message of this thread ("" when none).
const char *agpt_last_error(void);
// Prepends context to the last message: "while loading x: <old message>".
Status agpt_add_context(Status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *agpt_status_name(Status code);
void agpt_clear_error(void);

#define AGPT_FAIL(code, ...) agpt_fail_at((code), __FILE__, __LINE__, __VA_ARGS__)

// Propagate a failure upwards unchanged.
#define AGPT_TRY(expr)                       \
    do {                                     \
        Status agpt_try_s_ = (expr);         \
        if (agpt_try_s_ != AGPT_OK) return agpt_try_s_; \
    } while (0)

// Check a precondition; on failure record the message and return AGPT_ERR_ARG.
#define AGPT_CHECK_ARG(cond, ...)                                   \
    do {                                                            \
        if (!(cond)) return AGPT_FAIL(AGPT_ERR_ARG, __VA_ARGS__);   \
    } while (0)
