// The --gpus launcher (tools/launch.c) with /bin/sh as the ranks: the environment each rank gets, a clean run,
// a rank that fails or is killed stopping the others (SIGTERM, then SIGKILL for one that ignores it) with its
// status passed on, and a program that cannot start.
#include <stdio.h>
#include <string.h>

#include "runtime/timer.h"
#include "tests/test.h"
#include "tools/launch.h"

static int sh(const char *script, int n, double grace, double *seconds) {
    char *argv[] = {"/bin/sh", "-c", (char *)script, NULL};
    double t0 = timer_now_s();
    int rc = launch_local("/bin/sh", argv, n, "abc", grace);
    *seconds = timer_now_s() - t0;
    return rc;
}

int main(void) {
    double t;
    int rc = sh("test \"$AGPT_WORLD_SIZE\" = 3 && test \"$AGPT_RANK\" = \"$AGPT_LOCAL_RANK\" && "
                "test \"$AGPT_RANK\" -ge 0 && test \"$AGPT_RANK\" -lt 3 && test \"$AGPT_NCCL_ID\" = abc", 3, 1, &t);
    CHECK(rc == 0, "3 ranks see their rank, local rank, world size and NCCL id (rc %d)", rc);
    rc = sh("[ \"$AGPT_RANK\" = 1 ] && exit 3; exec sleep 30", 3, 1, &t);
    CHECK(rc == 3 && t < 10, "rank 1 exits 3: the launcher returns 3 and stops the others (%.1f s)", t);
    rc = sh("[ \"$AGPT_RANK\" = 0 ] && kill -9 $$; exec sleep 30", 2, 1, &t);
    CHECK(rc == 128 + 9 && t < 10, "rank 0 killed by SIGKILL: 137 (got %d, %.1f s)", rc, t);
    rc = sh("trap '' TERM; [ \"$AGPT_RANK\" = 1 ] && exit 2; exec sleep 30", 2, 1, &t);
    CHECK(rc == 2 && t >= 0.9 && t < 10, "a rank that ignores SIGTERM gets SIGKILL after the grace time (%.1f s)", t);
    char *argv[] = {"/nonexistent/agpt", NULL};
    rc = launch_local("/nonexistent/agpt", argv, 2, "abc", 1);
    CHECK(rc == 127, "a program that cannot start: 127 (got %d)", rc);
    CHECK(launch_local("/bin/sh", argv, 0, "abc", 1) == 1, "0 ranks: refused");
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
