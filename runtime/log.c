#include "runtime/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "runtime/timer.h"

static LogLevel current_level = LOG_INFO;
static const char *level_names[] = {"error", "warn", "info", "debug"};

void log_set_level(LogLevel level) { current_level = level; }
LogLevel log_get_level(void) { return current_level; }

int log_level_from_name(const char *name) {
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0) return i;
    return -1;
}

void log_msg(LogLevel level, const char *fmt, ...) {
    if (level > current_level) return;
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[agpt %s] %s\n", level_names[level], line);
}

void progress_begin(Progress *p, const char *label, int64_t total) {
    memset(p, 0, sizeof *p);
    p->label = label;
    p->total = total;
    p->fd = 2;
    p->tty = isatty(p->fd);
    p->start_s = timer_now_s();
    p->last_draw_s = -1e9;
}

static void progress_draw(Progress *p, bool final) {
    double now = timer_now_s();
    double min_interval = p->tty ? 0.1 : 5.0;
    if (!final && now - p->last_draw_s < min_interval) return;
    p->last_draw_s = now;
    double elapsed = now - p->start_s;
    double rate = elapsed > 0 ? (double)p->done / elapsed : 0;
    double frac = p->total > 0 ? (double)p->done / (double)p->total : 0;
    double eta = rate > 0 && p->total > 0 ? (double)(p->total - p->done) / rate : 0;
    char line[256];
    if (p->tty) {
        char bar[31];
        int filled = (int)(frac * 30);
        for (int i = 0; i < 30; i++) bar[i] = i < filled ? '#' : '.';
        bar[30] = 0;
        snprintf(line, sizeof line, "\r%s [%s] %lld/%lld %.1f/s eta %.0fs%s", p->label, bar, (long long)p->done,
                 (long long)p->total, rate, eta, final ? "\n" : "");
    } else {
        snprintf(line, sizeof line, "%s %lld/%lld (%.0f%%) %.1f/s elapsed %.1fs\n", p->label, (long long)p->done,
                 (long long)p->total, 100 * frac, rate, elapsed);
    }
    ssize_t ignored = write(p->fd, line, strlen(line));
    (void)ignored;
}

void progress_step(Progress *p, int64_t n) {
    p->done += n;
    progress_draw(p, false);
}

void progress_end(Progress *p) { progress_draw(p, true); }
