// e2e_check: the comparisons tests/test_e2e.sh needs, over the golden file and agpt's outputs.
//
//   e2e_check meta GOLDEN KEY                       prints the metadata value (no newline)
//   e2e_check map GOLDEN KEY MAP.safetensors TOL    relative L2 error of agpt's raw map against the golden map;
//                                                   exit 1 above TOL or on any NaN/inf
//   e2e_check json GOLDEN KEY JSONL FIELD           JSONL's first line has FIELD equal to the metadata value
//   e2e_check score GOLDEN KEY JSONL TOL            JSONL's first line has "score" within TOL of tensor KEY[0]
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/safetensors.h"

static cJSON *first_line(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    static char line[1 << 20];
    cJSON *j = fgets(line, sizeof line, f) ? cJSON_Parse(line) : NULL;
    fclose(f);
    return j;
}

static int fail(const char *what) {
    fprintf(stderr, "e2e_check: %s\n", what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) return fail("usage: e2e_check meta|map|json|score GOLDEN KEY ...");
    SafeTensors *golden = NULL;
    if (st_open(argv[2], &golden) != AGPT_OK) return fail(agpt_last_error());
    const char *cmd = argv[1], *key = argv[3];
    int rc = 1;
    if (!strcmp(cmd, "meta")) {
        const char *v = st_metadata(golden, key);
        if (v) fputs(v, stdout), rc = 0;
        else fprintf(stderr, "e2e_check: no metadata %s\n", key);
    } else if (!strcmp(cmd, "map") && argc == 6) {
        SafeTensors *out = NULL;
        Tensor want, got;
        if (st_open(argv[4], &out) != AGPT_OK || st_get(golden, key, &want) != AGPT_OK ||
            st_get(out, "anomaly_map", &got) != AGPT_OK) {
            fprintf(stderr, "e2e_check: %s\n", agpt_last_error());
        } else if (tensor_numel(&want) != tensor_numel(&got) || want.dtype != DT_F32 || got.dtype != DT_F32) {
            fprintf(stderr, "e2e_check: map sizes or dtypes differ\n");
        } else {
            const float *a = want.data, *b = got.data;
            double num = 0, den = 0, max_abs = 0;
            int bad = 0;
            for (int64_t i = 0; i < tensor_numel(&want); i++) {
                if (!isfinite(b[i])) bad++;
                double d = (double)a[i] - b[i];
                num += d * d, den += (double)a[i] * a[i];
                if (fabs(d) > max_abs) max_abs = fabs(d);
            }
            // Maps are probabilities (scale 1): relative to max(||want||, sqrt(n)), so a map close to zero
            // everywhere is compared on its scale, not on its own tiny norm (tests/README.md, tolerances).
            double floor2 = (double)tensor_numel(&want);
            double rel = sqrt(num / (den > floor2 ? den : floor2));
            double tol = atof(argv[5]);
            printf("%s: rel_l2 %.3g, max |diff| %.3g (tolerance %g)%s\n", key, rel, max_abs, tol,
                   bad ? ", non-finite values" : "");
            rc = !(bad == 0 && rel <= tol);
        }
        st_close(out);
    } else if (!strcmp(cmd, "json") && argc == 6) {
        cJSON *j = first_line(argv[4]);
        const char *want = st_metadata(golden, key);
        const char *got = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, argv[5]));
        if (want && got && strcmp(want, got) == 0) rc = 0;
        else fprintf(stderr, "e2e_check: %s: want '%s', agpt wrote '%s'\n", argv[5], want ? want : "(none)",
                     got ? got : "(none)");
        cJSON_Delete(j);
    } else if (!strcmp(cmd, "score") && argc == 6) {
        cJSON *j = first_line(argv[4]);
        const cJSON *score = cJSON_GetObjectItemCaseSensitive(j, "score");
        Tensor want;
        if (cJSON_IsNumber(score) && st_get(golden, key, &want) == AGPT_OK && want.dtype == DT_F32 &&
            tensor_numel(&want) >= 1) {
            double w = ((const float *)want.data)[0], d = fabs(w - score->valuedouble);
            printf("%s: %.7g vs %.7g\n", key, w, score->valuedouble);
            rc = !(d <= atof(argv[5]));
        } else {
            fprintf(stderr, "e2e_check: no score to compare\n");
        }
        cJSON_Delete(j);
    } else {
        fprintf(stderr, "e2e_check: bad arguments\n");
    }
    st_close(golden);
    return rc;
}
