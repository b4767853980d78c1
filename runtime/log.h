// Logging with levels to stderr, and a progress bar for long work.
#pragma once
#include <stdbool.h>
#include <stdint.h>

typedef enum LogLevel { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG } LogLevel;

void log_set_level(LogLevel level);
LogLevel log_get_level(void);
int log_level_from_name(const char *name);  // "error".."debug"; -1 if unknown
void log_msg(LogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_E(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define LOG_W(...) log_msg(LOG_WARN, __VA_ARGS__)
#define LOG_I(...) log_msg(LOG_INFO, __VA_ARGS__)
#define LOG_D(...) log_msg(LOG_DEBUG, __VA_ARGS__)

// On a terminal the bar redraws one line in place; otherwise (a log file, CI) it prints a plain line
// per step, at most every `min_interval_s` seconds, so logs stay readable.
typedef struct Progress {
    const char *label;
    int64_t total;
    int64_t done;
    double start_s;
    double last_draw_s;
    bool tty;
    int fd;  // where it draws (2 = stderr)
} Progress;

void progress_begin(Progress *p, const char *label, int64_t total);
void progress_step(Progress *p, int64_t n);
void progress_end(Progress *p);
