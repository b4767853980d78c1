#define _DEFAULT_SOURCE  // kill, environ
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

extern char **environ;

// The environment of rank `rank`: this process's, less any AGPT_* variables the launcher sets, plus them. Built
// before fork, so that the child calls nothing but execve (fork in a process with threads, such as NCCL's
// bootstrap thread, leaves only async-signal-safe calls to the child).
static char **rank_environment(int rank, int n, const char *id, char vars[4][320]) {
    int count = 0;
    while (environ[count]) count++;
    char **env = calloc((size_t)count + 5, sizeof *env);
    if (!env) return NULL;
    int k = 0;
    for (int i = 0; i < count; i++)
        if (strncmp(environ[i], "AGPT_RANK=", 10) && strncmp(environ[i], "AGPT_LOCAL_RANK=", 16) &&
            strncmp(environ[i], "AGPT_WORLD_SIZE=", 16) && strncmp(environ[i], "AGPT_NCCL_ID=", 13))
            env[k++] = environ[i];
    snprintf(vars[0], 320, "AGPT_RANK=%d", rank);
    snprintf(vars[1], 320, "AGPT_LOCAL_RANK=%d", rank);
    snprintf(vars[2], 320, "AGPT_WORLD_SIZE=%d", n);
    snprintf(vars[3], 320, "AGPT_NCCL_ID=%s", id ? id : "");
    for (int j = 0; j < 4; j++) env[k++] = vars[j];
    return env;
}

int launch_local(const char *exe, char *const argv[], int n, const char *nccl_id_hex, double grace_s) {
    if (n < 1 || n > LAUNCH_MAX) {
        fprintf(stderr, "agpt: launch: %d processes (1..%d)\n", n, LAUNCH_MAX);
        return 1;
    }
    fflush(stdout), fflush(stderr);
    n_children = n;
    memset(children, 0, sizeof children);
    // The handlers go in first: a Ctrl-C while the ranks start reaches those already started (exec resets the
    // handlers to the default in the children).
    struct sigaction sa = {.sa_handler = forward}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    int first_failure = 0, alive = 0;
    for (int i = 0; i < n; i++) {
        char vars[4][320];
        char **env = rank_environment(i, n, nccl_id_hex, vars);
        if (!env) {
            fprintf(stderr, "agpt: launch: no memory for rank %d's environment\n", i);
            first_failure = 1;
            break;
        }
        pid_t pid = fork();
        if (pid == 0) {
            execve(exe, argv, env);
            _exit(127);  // the parent names the rank and its status, 127
        }
        free(env);
        if (pid < 0) {
            fprintf(stderr, "agpt: launch: cannot start rank %d: %s\n", i, strerror(errno));
            first_failure = 1;
            break;
        }
        children[i] = pid, alive++;
    }
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
