#define _DEFAULT_SOURCE  // setenv, kill
#include "tools/launch.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LAUNCH_MAX 256

static pid_t children[LAUNCH_MAX];
static int n_children;

static void forward(int sig) {
    for (int i = 0; i < n_children; i++)
        if (children[i] > 0) kill(children[i], sig);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int rank_of(pid_t pid) {
    for (int i = 0; i < n_children; i++)
        if (children[i] == pid) return i;
    return -1;
}

// A child's end as an exit status: its code, or 128 + the signal that killed it.
static int status_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

int launch_local(const char *exe, char *const argv[], int n, const char *nccl_id_hex, double grace_s) {
    if (n < 1 || n > LAUNCH_MAX) {
        fprintf(stderr, "agpt: launch: %d processes (1..%d)\n", n, LAUNCH_MAX);
        return 1;
    }
    fflush(stdout), fflush(stderr);
    n_children = n;
    int first_failure = 0, alive = 0;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            char v[16];
            snprintf(v, sizeof v, "%d", i);
            setenv("AGPT_RANK", v, 1), setenv("AGPT_LOCAL_RANK", v, 1);
            snprintf(v, sizeof v, "%d", n);
            setenv("AGPT_WORLD_SIZE", v, 1);
            setenv("AGPT_NCCL_ID", nccl_id_hex ? nccl_id_hex : "", 1);
            execv(exe, argv);
            fprintf(stderr, "agpt: launch: cannot start rank %d (%s): %s\n", i, exe, strerror(errno));
            _exit(127);
        }
        if (pid < 0) {
            fprintf(stderr, "agpt: launch: cannot start rank %d: %s\n", i, strerror(errno));
            first_failure = 1;
            break;
        }
        children[i] = pid, alive++;
    }
    struct sigaction sa = {.sa_handler = forward}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    double stop_at = 0;  // when the survivors get SIGKILL (0: no failure yet)
    if (first_failure) forward(SIGTERM), stop_at = now_s() + grace_s;
    while (alive > 0) {
        int status;
        pid_t pid = waitpid(-1, &status, stop_at > 0 ? WNOHANG : 0);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) break;
        if (pid == 0) {  // survivors after a failure: wait for them, then kill them
            if (now_s() > stop_at) forward(SIGKILL), stop_at = now_s() + 3600;
            nanosleep(&(struct timespec){.tv_nsec = 50 * 1000 * 1000}, NULL);
            continue;
        }
        int r = rank_of(pid);
        if (r < 0) continue;
        children[r] = 0, alive--;
        int code = status_code(status);
        if (code != 0 && !first_failure) {
            if (WIFEXITED(status))
                fprintf(stderr, "agpt: rank %d of %d exited with status %d: stopping the other ranks\n", r, n, code);
            else
                fprintf(stderr, "agpt: rank %d of %d was killed by signal %d: stopping the other ranks\n", r, n,
                        WTERMSIG(status));
            first_failure = code;
            forward(SIGTERM);
            stop_at = now_s() + grace_s;
        }
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    n_children = 0;
    return first_failure;
}
