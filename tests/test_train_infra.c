// The trainer's infrastructure: the DeepSpeed WarmupDecayLR schedule against DeepSpeed 0.9.2 itself and a Python
// re-expression (tests/data/schedule.safetensors, made by tests/reference/make_schedule.py), atomic checkpoints and
// their verification, the deterministic loader, and the memory planner at the real 7B sizes.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernels/engine.h"
#include "model/weights.h"
#include "runtime/safetensors.h"
#include "test.h"
#include "train/loader.h"
#include "train/memory_plan.h"
#include "train/run_state.h"
#include "train/schedule.h"
#include "train/trainer.h"

// ---- schedule ----------------------------------------------------------------------------------------------------

// A golden column of float64 values stored as I32 pairs [K,2] (maybe only 4-byte aligned: read with f64_at).
static const unsigned char *f64_column(const SafeTensors *st, const char *name, int64_t k) {
    Tensor t;
    if (st_get(st, name, &t) != AGPT_OK || t.dtype != DT_I32 || t.ndim != 2 || t.shape[0] != k || t.shape[1] != 2)
        return NULL;
    return t.data;
}

static double f64_at(const unsigned char *column, int64_t i) {
    double v;
    memcpy(&v, column + 8 * i, sizeof v);
    return v;
}

static void test_schedule(const char *dir) {
    WarmupDecayConfig r;
    CHECK_OK(schedule_reference_config(3629, 50, &r));
    CHECK(r.total_num_steps == 22681 && r.warmup_num_steps == 2268, "MVTec total %lld warmup %lld",
          (long long)r.total_num_steps, (long long)r.warmup_num_steps);
    CHECK_OK(schedule_reference_config(8659, 50, &r));
    CHECK(r.total_num_steps == 54118 && r.warmup_num_steps == 5411, "VisA total %lld warmup %lld",
          (long long)r.total_num_steps, (long long)r.warmup_num_steps);
    CHECK_OK(schedule_reference_config(20, 1, &r));
    CHECK(r.total_num_steps == 2 && r.warmup_num_steps == 10, "tiny run: warmup floor of 10");
    CHECK(schedule_lr(&r, -1) == 0.0, "before the first step DeepSpeed reports 0");
    CHECK_ERR(schedule_reference_config(0, 50, &r));
    WarmupDecayConfig bad = r;
    bad.warmup_max_lr = -1;
    CHECK_ERR(schedule_check(&bad));
    bad = r, bad.total_num_steps = 0;
    CHECK_ERR(schedule_check(&bad));

    char path[1024];
    snprintf(path, sizeof path, "%s/schedule.safetensors", dir);
    SafeTensors *st = NULL;
    if (st_open(path, &st) != AGPT_OK) {
        CHECK(0, "schedule golden missing: %s", agpt_last_error());
        return;
    }
    const char *peer = st_metadata(st, "peer");
    int cases = atoi(st_metadata(st, "cases") ? st_metadata(st, "cases") : "0"), compared_ds = 0;
    CHECK(cases >= 8, "golden has %d cases", cases);
    double worst = 0;
    for (int n = 0; n < cases; n++) {
        char key[64];
#define META(field) (snprintf(key, sizeof key, "c%d." field, n), st_metadata(st, key))
        WarmupDecayConfig c = {.total_num_steps = atoll(META("total")), .warmup_num_steps = atoll(META("warmup")),
                               .warmup_type = strcmp(META("type"), "linear") == 0 ? WARMUP_LINEAR : WARMUP_LOG,
                               .warmup_min_lr = strtod(META("min_lr"), NULL), .warmup_max_lr = strtod(META("max_lr"), NULL),
                               .optimizer_lr = strtod(META("optimizer_lr"), NULL)};
#undef META
        CHECK_OK(schedule_check(&c));
        Tensor up;
        snprintf(key, sizeof key, "c%d.update", n);
        CHECK_OK(st_get(st, key, &up));
        int64_t k = tensor_numel(&up);
        const int32_t *updates = up.data;
        snprintf(key, sizeof key, "c%d.lr_formula", n);
        const unsigned char *formula = f64_column(st, key, k);
        snprintf(key, sizeof key, "c%d.lr_deepspeed", n);
        const unsigned char *ds = f64_column(st, key, k);
        CHECK(formula != NULL, "case %d: no lr_formula", n);
        if (!formula) continue;
        compared_ds += ds != NULL;
        for (int64_t i = 0; i < k; i++) {
            double got = schedule_lr_at_update(&c, updates[i]);
            const unsigned char *refs[2] = {formula, ds};
            for (int j = 0; j < 2; j++) {
                if (!refs[j]) continue;
                double want = f64_at(refs[j], i), err = fabs(got - want) / (fabs(want) > 1e-12 ? fabs(want) : 1e-12);
                if (!(err <= worst)) worst = isfinite(err) ? err : INFINITY;
                if (!(err <= 1e-12)) {
                    CHECK(0, "case %d update %d: %.17g, %s says %.17g", n, updates[i], got,
                          j ? "DeepSpeed" : "the formula", want);
                    break;
                }
            }
        }
    }
    CHECK(worst <= 1e-12, "schedule worst relative error %g", worst);
    printf("schedule: %d cases, worst relative error %.3g, %d of them against %s\n", cases, worst, compared_ds,
           peer ? peer : "?");
    st_close(st);
}

// ---- run state ---------------------------------------------------------------------------------------------------

typedef struct Params3 {
    float a[24], am[24], av[24];  // "image_decoder.fc.0.weight" [4,6]
    float b[5], bm[5], bv[5];     // "prompt_learner.base_prompts" [1,5]
} Params3;

static void make_params(Params3 *p, RunParam out[2], uint64_t seed) {
    Rng r;
    rng_seed(&r, seed);
    rng_fill_normal(&r, p->a, 24, 0, 1), rng_fill_normal(&r, p->am, 24, 0, 1), rng_fill_uniform(&r, p->av, 24, 0, 1);
    rng_fill_normal(&r, p->b, 5, 0, 1), rng_fill_normal(&r, p->bm, 5, 0, 1), rng_fill_uniform(&r, p->bv, 5, 0, 1);
    out[0] = (RunParam){"image_decoder.fc.0.weight", tensor_2d(p->a, DT_F32, DEV_CPU, 4, 6),
                        tensor_2d(p->am, DT_F32, DEV_CPU, 4, 6), tensor_2d(p->av, DT_F32, DEV_CPU, 4, 6)};
    out[1] = (RunParam){"prompt_learner.base_prompts", tensor_2d(p->b, DT_F32, DEV_CPU, 1, 5),
                        tensor_2d(p->bm, DT_F32, DEV_CPU, 1, 5), tensor_2d(p->bv, DT_F32, DEV_CPU, 1, 5)};
}

static RunProgress sample_progress(void) {
    RunProgress pr = {.step = 123, .epoch = 4, .position = 17};
    int i = run_progress_rng(&pr, "synth");
    rng_seed(&pr.rngs[i], 99);
    rng_u64(&pr.rngs[i]);
    i = run_progress_rng(&pr, "dropout");
    rng_seed(&pr.rngs[i], 7);
    return pr;
}

static const char *CONFIG = "lr=0.001\nepochs=50\nseed=42\nmicro_batch=1\n";

static Status copy_file(const char *from, const char *to, long keep, long flip) {
    FILE *f = fopen(from, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "open %s", from);
    static unsigned char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    if (keep >= 0 && (size_t)keep < n) n = (size_t)keep;
    if (flip >= 0 && (size_t)flip < n) buf[flip] ^= 0x10;
    FILE *g = fopen(to, "wb");
    if (!g) return AGPT_FAIL(AGPT_ERR_IO, "create %s", to);
    fwrite(buf, 1, n, g);
    fclose(g);
    return AGPT_OK;
}

static long file_size(const char *path) {
    struct stat s;
    return stat(path, &s) == 0 ? (long)s.st_size : -1;
}

static void test_run_state(const char *tmp) {
    char dir[1024], bad[1024], path[1200], badpath[1200];
    snprintf(dir, sizeof dir, "%s/ckpt", tmp);
    snprintf(bad, sizeof bad, "%s/bad", tmp);
    mkdir(dir, 0755), mkdir(bad, 0755);
    Params3 saved, loaded;
    RunParam ps[2], pl[2];
    make_params(&saved, ps, 1);
    make_params(&loaded, pl, 2);
    RunProgress pr = sample_progress(), back = {0};
    CHECK_OK(run_state_save(dir, &pr, CONFIG, ps, 2));
    CHECK_OK(run_state_load(dir, CONFIG, pl, 2, &back));
    CHECK(memcmp(&saved, &loaded, sizeof saved) == 0, "masters and moments round-trip bit for bit");
    CHECK(back.step == 123 && back.epoch == 4 && back.position == 17 && back.n_rngs == 2, "progress round-trips");
    CHECK(memcmp(back.rngs, pr.rngs, 2 * sizeof(Rng)) == 0 && strcmp(back.rng_names[1], "dropout") == 0,
          "RNG states round-trip");

    // The delta layers over a base model file as agpt detect --weights does: its tensors win, the rest come from
    // the base.
    snprintf(path, sizeof path, "%s/base.safetensors", tmp);
    float base_a[24] = {0}, base_c[3] = {1, 2, 3};
    StEntry base[2] = {{"image_decoder.fc.0.weight", tensor_2d(base_a, DT_F32, DEV_CPU, 4, 6)},
                       {"image_decoder.fc.0.bias", tensor_1d(base_c, DT_F32, DEV_CPU, 3)}};
    CHECK_OK(st_write(path, base, 2, NULL, 0));
    snprintf(badpath, sizeof badpath, "%s/delta.safetensors", dir);
    SafeTensors *sb = NULL, *sd = NULL;
    CHECK_OK(st_open(path, &sb));
    CHECK_OK(st_open(badpath, &sd));
    Engine eng;
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 1, 1));
    if (sb && sd) {
        WeightStore w;
        weights_init(&w, &eng, DT_F32, sd, badpath);
        CHECK_OK(weights_add_file(&w, sb, path));
        Tensor ta, tc;
        CHECK_OK(weights_load(&w, "image_decoder.fc.0.weight", 2, (int64_t[]){4, 6}, &ta));
        CHECK_OK(weights_load(&w, "image_decoder.fc.0.bias", 1, (int64_t[]){3}, &tc));
        CHECK(ta.data && memcmp(ta.data, saved.a, sizeof saved.a) == 0, "the delta's tensor overrides the base's");
        CHECK(tc.data && ((float *)tc.data)[2] == 3, "the base's other tensors still load");
        CHECK(st_metadata(sd, "agpt.train.step") && strcmp(st_metadata(sd, "agpt.train.step"), "123") == 0,
              "the delta records its step");
        weights_free(&w);
    }
    st_close(sb), st_close(sd);
    engine_destroy(&eng);

    // Other options: refused, naming the line that differs.
    agpt_clear_error();
    Status s = run_state_load(dir, "lr=0.002\nepochs=50\nseed=42\nmicro_batch=1\n", pl, 2, &back);
    CHECK(s != AGPT_OK && strstr(agpt_last_error(), "lr=0.001") && strstr(agpt_last_error(), "lr=0.002"),
          "a different option is refused by name: %s", agpt_last_error());
    // A different set of trained tensors.
    CHECK_ERR(run_state_load(dir, CONFIG, pl, 1, &back));
    RunParam wrong[2] = {pl[0], pl[1]};
    wrong[1].name = "prompt_learner.other";
    CHECK_ERR(run_state_load(dir, CONFIG, wrong, 2, &back));
    wrong[1] = pl[1];
    wrong[1].master = wrong[1].m = wrong[1].v = tensor_2d(loaded.b, DT_F32, DEV_CPU, 5, 1);
    CHECK_ERR(run_state_load(dir, CONFIG, wrong, 2, &back));
    // No state at all.
    CHECK_ERR(run_state_load(bad, CONFIG, pl, 2, &back));

    // Truncations and byte flips of the state: an error every time, and the caller's tensors untouched.
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    snprintf(badpath, sizeof badpath, "%s/state.safetensors", bad);
    long size = file_size(path);
    CHECK(size > 0 && size < (1 << 16), "state size %ld", size);
    Params3 sentinel;
    RunParam psent[2];
    make_params(&sentinel, psent, 3);
    Params3 sentinel_copy = sentinel;
    int refused = 0, tries = 0;
    for (long keep = 0; keep < size; keep += 1 + keep / 7, tries++) {
        CHECK_OK(copy_file(path, badpath, keep, -1));
        refused += run_state_load(bad, CONFIG, psent, 2, &back) != AGPT_OK;
    }
    // One flipped bit anywhere: tensor bytes fail their CRC, the options text its hash, the step, position and RNG
    // states (names included) run.check, and the rest of the header the parser.
    Rng fr;
    rng_seed(&fr, 5);
    for (int i = 0; i < 200; i++, tries++) {
        long at = (long)(rng_u64(&fr) % (uint64_t)size);
        CHECK_OK(copy_file(path, badpath, -1, at));
        if (run_state_load(bad, CONFIG, psent, 2, &back) == AGPT_OK) CHECK(0, "flip at byte %ld of %ld loaded", at, size);
        else refused++;
    }
    CHECK(refused == tries, "%d of %d corrupt states refused", refused, tries);
    CHECK(memcmp(&sentinel, &sentinel_copy, sizeof sentinel) == 0, "a refused state writes nothing");

    // A crash mid-write never leaves a broken file: a child saves in a loop and is SIGKILLed at a random moment.
    int survived = 0;
    for (int round = 0; round < 6; round++) {
        pid_t pid = fork();
        if (pid == 0) {
            RunProgress p2 = pr;
            for (;;) {
                p2.step++;
                if (run_state_save(dir, &p2, CONFIG, ps, 2) != AGPT_OK) _exit(3);
            }
        }
        struct timespec ts = {0, 2000000L + 3000000L * round};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        Params3 got;
        RunParam pg[2];
        make_params(&got, pg, 4);
        Status ls = run_state_load(dir, CONFIG, pg, 2, &back);
        CHECK(ls == AGPT_OK, "after a kill at round %d the state loads: %s", round, agpt_last_error());
        CHECK(memcmp(got.a, saved.a, sizeof saved.a) == 0 && back.step >= 123, "and holds a complete checkpoint");
        survived += ls == AGPT_OK;
    }
    printf("run_state: %d corrupt copies refused, %d of 6 killed writers left a loadable state (last step %lld)\n",
           refused, survived, (long long)back.step);
}

// ---- loader ------------------------------------------------------------------------------------------------------

typedef struct Sample {
    int64_t index;
    uint64_t draws[3];
} Sample;

typedef struct LoaderCtx {
    int64_t fail_at;  // this dataset index fails (-1: none)
} LoaderCtx;

static Status make_sample(void *ctx, int64_t index, Rng *rng, void *out) {
    const LoaderCtx *c = ctx;
    if (index == c->fail_at) return AGPT_FAIL(AGPT_ERR_FORMAT, "image %lld is corrupt", (long long)index);
    // Uneven work, so threads finish out of order.
    struct timespec ts = {0, (long)((index * 7919) % 5) * 200000L};
    nanosleep(&ts, NULL);
    Sample *s = out;
    s->index = index;
    for (int i = 0; i < 3; i++) s->draws[i] = rng_u64(rng);
    return AGPT_OK;
}

static Status collect(LoaderConfig cfg, int n, Sample *out) {
    Loader *l = NULL;
    AGPT_TRY(loader_start(&cfg, &l));
    Status s = AGPT_OK;
    for (int i = 0; i < n && s == AGPT_OK; i++) {
        int64_t epoch, position, index;
        s = loader_next(l, &out[i], &epoch, &position, &index);
        if (s == AGPT_OK && index != out[i].index) s = AGPT_FAIL(AGPT_ERR_ARG, "index mismatch");
    }
    loader_free(l);
    return s;
}

static void test_loader(void) {
    enum { N = 37, TOTAL = 3 * N };
    LoaderCtx ctx = {.fail_at = -1};
    LoaderConfig cfg = {.n_items = N, .sample_bytes = sizeof(Sample), .seed = 42, .rank = 0, .world = 1,
                        .make_sample = make_sample, .ctx = &ctx};
    static Sample runs[3][TOTAL];
    const int threads[3] = {1, 2, 4};
    for (int r = 0; r < 3; r++) {
        cfg.threads = threads[r], cfg.queue = r == 2 ? 5 : 0;
        CHECK_OK(collect(cfg, TOTAL, runs[r]));
    }
    CHECK(memcmp(runs[0], runs[1], sizeof runs[0]) == 0 && memcmp(runs[0], runs[2], sizeof runs[0]) == 0,
          "1, 2 and 4 threads give the same bytes");
    // Each epoch is a permutation, and the epochs differ.
    for (int e = 0; e < 3; e++) {
        int seen[N] = {0};
        for (int i = 0; i < N; i++) seen[runs[0][e * N + i].index]++;
        int ok = 1;
        for (int i = 0; i < N; i++) ok &= seen[i] == 1;
        CHECK(ok, "epoch %d visits every item once", e);
    }
    CHECK(memcmp(runs[0], runs[0] + N, N * sizeof(Sample)) != 0, "epochs are reshuffled");
    CHECK(loader_index_at(&cfg, 1, 5) == runs[0][N + 5].index, "loader_index_at agrees");
    // A sample's draws depend on (seed, epoch, index) only.
    Rng r;
    loader_sample_rng(42, 2, runs[0][2 * N + 3].index, &r);
    CHECK(rng_u64(&r) == runs[0][2 * N + 3].draws[0], "the sample's RNG is loader_sample_rng(seed, epoch, index)");

    // A resume from (epoch 1, position 5) continues the same stream.
    static Sample resumed[TOTAL];
    LoaderConfig rc = cfg;
    rc.threads = 3, rc.epoch = 1, rc.position = 5;
    CHECK_OK(collect(rc, TOTAL - N - 5, resumed));
    CHECK(memcmp(resumed, runs[0] + N + 5, (TOTAL - N - 5) * sizeof(Sample)) == 0, "a resume continues bit for bit");

    // Ranks: disjoint shares of floor(N / world) items, interleaved over the same permutation.
    const int world = 3;
    static Sample shares[3][N / 3];
    int seen[N] = {0}, ok = 1;
    for (int k = 0; k < world; k++) {
        LoaderConfig kc = cfg;
        kc.threads = 2, kc.rank = k, kc.world = world;
        CHECK(loader_epoch_length(&kc) == N / world, "rank share length");
        CHECK_OK(collect(kc, N / world, shares[k]));
        for (int i = 0; i < N / world; i++) {
            seen[shares[k][i].index]++;
            ok &= shares[k][i].index == runs[0][i * world + k].index;
        }
    }
    int dup = 0;
    for (int i = 0; i < N; i++) dup += seen[i] > 1;
    CHECK(dup == 0 && ok, "ranks take disjoint interleaved shares (%d duplicates)", dup);

    // An error in a worker reaches the consumer with the item's index, after every sample before it.
    for (int t = 1; t <= 4; t *= 2) {
        int64_t fail_pos = 20;
        ctx.fail_at = runs[0][fail_pos].index;
        LoaderConfig ec = cfg;
        ec.threads = t;
        Loader *l = NULL;
        CHECK_OK(loader_start(&ec, &l));
        int delivered = 0;
        Status s = AGPT_OK;
        Sample x;
        while ((s = loader_next(l, &x, NULL, NULL, NULL)) == AGPT_OK && delivered < TOTAL) delivered++;
        char want[64];
        snprintf(want, sizeof want, "dataset item %lld", (long long)ctx.fail_at);
        CHECK(s == AGPT_ERR_FORMAT && delivered == fail_pos && strstr(agpt_last_error(), want) &&
                  strstr(agpt_last_error(), "is corrupt"),
              "%d threads: error after %d samples: %s", t, delivered, agpt_last_error());
        CHECK(loader_next(l, &x, NULL, NULL, NULL) != AGPT_OK, "the error stays");
        loader_free(l);
    }
    ctx.fail_at = -1;
    // A stop (Ctrl-C) with workers blocked on a full queue: next fails, free joins them.
    Loader *l = NULL;
    cfg.threads = 4, cfg.queue = 4;
    CHECK_OK(loader_start(&cfg, &l));
    Sample x;
    CHECK_OK(loader_next(l, &x, NULL, NULL, NULL));
    struct timespec ts = {0, 20000000L};
    nanosleep(&ts, NULL);
    loader_stop(l);
    CHECK_ERR(loader_next(l, &x, NULL, NULL, NULL));
    loader_free(l);
    // Bad configs.
    LoaderConfig b = cfg;
    b.threads = 0;
    CHECK_ERR(loader_start(&b, &l));
    b = cfg, b.rank = 3, b.world = 3;
    CHECK_ERR(loader_start(&b, &l));
    b = cfg, b.position = N + 1;
    CHECK_ERR(loader_start(&b, &l));
    printf("loader: %d samples identical for 1, 2, 4 threads; resume, shares, errors, stop checked\n", TOTAL);
}

// ---- memory plan -------------------------------------------------------------------------------------------------

static void test_memory_plan(void) {
    MemPlanConfig c = mem_plan_reference_config();
    MemPlan p;
    CHECK_OK(mem_plan_compute(&c, &p));
    CHECK(p.trained_params == 112663480.0, "decoder + prompt learner = 112,663,480 parameters (got %.0f)",
          p.trained_params);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    static char text[4096];
    mem_plan_format(&p, text, sizeof text);
    printf("memory plan, the reference's run (micro-batch %d x %d tokens, f16, recompute):\n%s", c.micro_batch,
           c.seq_len, text);
    CHECK(p.peak_bytes < 24 * gib && p.peak_bytes > 14 * gib, "peak %.2f GiB: under 24 GiB, above the 7B's weights",
          p.peak_bytes / gib);
    CHECK_OK(mem_plan_check(&p, 24 * gib));
    CHECK(strstr(text, "frozen weights: LLaMA") && strstr(text, "peak"), "the breakdown names its parts");
    agpt_clear_error();
    Status s = mem_plan_check(&p, 1 * gib);
    CHECK(s == AGPT_ERR_OOM && strstr(agpt_last_error(), "budget is 1.00 GiB") &&
              strstr(agpt_last_error(), "frozen weights: LLaMA"),
          "a 1 GiB budget is refused with the numbers: %s", agpt_last_error());
    // The frozen LLaMA in f16 alone: 6.74e9 parameters.
    CHECK(fabs(p.item[1].bytes / 2 - 6738423808.0) < 1, "LLaMA-7B (V=32001) has %.0f parameters", p.item[1].bytes / 2);
    MemPlanConfig nr = c;
    nr.recompute = false;
    MemPlan pn;
    CHECK_OK(mem_plan_compute(&nr, &pn));
    CHECK(pn.peak_bytes > p.peak_bytes + 4 * gib, "without recompute the plan grows (%.2f GiB)", pn.peak_bytes / gib);
    MemPlanConfig lo = c;
    lo.train_lora = true, lo.train_proj = true;
    MemPlan pl;
    CHECK_OK(mem_plan_compute(&lo, &pl));
    CHECK(pl.trained_params == 112663480.0 + 32 * 4 * 2 * 32 * 4096.0 + 1024 * 4096 + 4096, "LoRA + proj counted");
    // lm_head + model.norm and the ViT's blocks move from frozen to trained: every parameter counted once.
    MemPlanConfig hv = c;
    hv.train_head = true, hv.train_vision = true;
    MemPlan ph;
    CHECK_OK(mem_plan_compute(&hv, &ph));
    double head = 32001.0 * 4096 + 4096, blocks = 32 * (4 * 1280.0 * 1280 + 4 * 1280 + 2 * 1280.0 * 5120 + 5120 + 1280 + 4 * 1280);
    CHECK(ph.trained_params == p.trained_params + head + blocks && ph.frozen_params == p.frozen_params - head - blocks,
          "lm_head and the ViT's blocks trained: %.0f trained, %.0f frozen (expected %.0f, %.0f)", ph.trained_params,
          ph.frozen_params, p.trained_params + head + blocks, p.frozen_params - head - blocks);
    CHECK(fabs(ph.item[1].bytes - p.item[1].bytes + head * 2) < 1, "the frozen LLaMA's bytes lose lm_head's");
    // ZeRO-1 over 2 ranks: each rank keeps half of AdamW's moments (112.7 M x 8 bytes / 2 less).
    MemPlanConfig zc = c;
    zc.optimizer_shards = 2;
    MemPlan pz;
    CHECK_OK(mem_plan_compute(&zc, &pz));
    CHECK(fabs(p.peak_bytes - pz.peak_bytes - 112663480.0 * 8 / 2) < 1, "ZeRO-1 on 2 ranks saves %.0f bytes",
          p.peak_bytes - pz.peak_bytes);
    MemPlanConfig z = c;
    z.micro_batch = 0;
    CHECK_ERR(mem_plan_compute(&z, &pl));
}


// ---- trainer -----------------------------------------------------------------------------------------------------

// A least-squares problem as the "model": y = w . x + b with w [2,4], b [1]; the step adds d(0.5 err^2).
typedef struct LsqSample {
    float x[8], y;
} LsqSample;

static Status lsq_make(void *ctx, int64_t index, Rng *rng, void *out) {
    (void)ctx, (void)index;
    LsqSample *s = out;
    static const float w_true[8] = {0.5f, -1, 0.25f, 2, -0.75f, 1, 0.1f, -0.3f};
    s->y = 0.3f + 0.01f * rng_normal(rng);
    for (int i = 0; i < 8; i++) s->x[i] = rng_normal(rng), s->y += w_true[i] * s->x[i];
    return AGPT_OK;
}

typedef struct LsqModel {
    float w[8], b, gw[8], gb;
    int micro;          // micro-steps run
    int die_at;         // SIGKILL this process at this micro-step (0: never)
    int stop_at;        // raise SIGINT at this micro-step (0: never)
} LsqModel;

static volatile sig_atomic_t stop_requested = 0;
static void on_sigint(int sig) { (void)sig, stop_requested = 1; }

static Status lsq_step(void *ctx, const void *sample, TrainLosses *out) {
    LsqModel *m = ctx;
    const LsqSample *s = sample;
    if (++m->micro == m->die_at) raise(SIGKILL);
    if (m->micro == m->stop_at) raise(SIGINT);
    double pred = m->b;
    for (int i = 0; i < 8; i++) pred += (double)m->w[i] * s->x[i];
    double err = pred - s->y;
    for (int i = 0; i < 8; i++) m->gw[i] += (float)(err * s->x[i]);
    m->gb += (float)err;
    out->ce = 0.5 * err * err;
    return AGPT_OK;
}

static void lsq_params(LsqModel *m, TrainParam p[2]) {
    p[0] = (TrainParam){.name = "image_decoder.fc.0.weight", .param = tensor_2d(m->w, DT_F32, DEV_CPU, 2, 4),
                        .grad = tensor_2d(m->gw, DT_F32, DEV_CPU, 2, 4)};
    p[1] = (TrainParam){.name = "image_decoder.fc.0.bias", .param = tensor_1d(&m->b, DT_F32, DEV_CPU, 1),
                        .grad = tensor_1d(&m->gb, DT_F32, DEV_CPU, 1)};
}

static TrainerConfig lsq_config(const char *dir) {
    TrainerConfig c = trainer_default_config();
    c.accum = 4, c.total_updates = 30, c.ckpt_every = 5, c.weight_decay = 0, c.grad_clip = 5;
    c.schedule = (WarmupDecayConfig){.warmup_max_lr = 0.1, .warmup_num_steps = 3, .total_num_steps = 40,
                                     .optimizer_lr = 0.1};
    c.dir = dir, c.config_text = "problem=lsq\nlr=0.1\naccum=4\n", c.stop = &stop_requested;
    c.loader = (LoaderConfig){.n_items = 50, .sample_bytes = sizeof(LsqSample), .threads = 2, .seed = 7, .world = 1,
                              .make_sample = lsq_make};
    return c;
}

static double log_field(const char *path, int line, const char *field) {
    FILE *f = fopen(path, "r");
    char buf[512], key[64];
    double v = NAN;
    snprintf(key, sizeof key, "\"%s\":", field);
    for (int i = 0; f && fgets(buf, sizeof buf, f); i++) {
        char *at = strstr(buf, key);
        if (at && (i == line || line < 0)) v = strtod(at + strlen(key), NULL);
    }
    if (f) fclose(f);
    return v;
}

static void test_trainer(const char *tmp) {
    Engine eng;
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 1, 1));
    char da[1024], db[1024], dc[1024], logp[1100];
    snprintf(da, sizeof da, "%s/run_a", tmp), snprintf(db, sizeof db, "%s/run_b", tmp);
    snprintf(dc, sizeof dc, "%s/run_c", tmp);
    mkdir(da, 0755), mkdir(db, 0755), mkdir(dc, 0755);

    // A: uninterrupted.
    LsqModel a = {0};
    TrainParam pa[2];
    lsq_params(&a, pa);
    TrainerConfig ca = lsq_config(da);
    TrainerResult ra;
    CHECK_OK(trainer_run(&eng, &ca, pa, 2, lsq_step, &a, &ra));
    snprintf(logp, sizeof logp, "%s/log.jsonl", da);
    double first = log_field(logp, 0, "ce"), last = log_field(logp, -1, "ce");
    CHECK(ra.updates == 30 && last < 0.2 * first, "the loss falls: %g -> %g over %lld updates", first, last,
          (long long)ra.updates);
    CHECK(log_field(logp, 0, "lr") == 0.1 && log_field(logp, 1, "lr") == 0.0 && isfinite(log_field(logp, 2, "grad_norm")),
          "log.jsonl has DeepSpeed's lr sequence and the grad norm");

    // B: a child is SIGKILLed in update 13 (last checkpoint at 10), then the run resumes here.
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        LsqModel m = {.die_at = 4 * 12 + 2};
        TrainParam pp[2];
        lsq_params(&m, pp);
        TrainerConfig c = lsq_config(db);
        TrainerResult r;
        trainer_run(&eng, &c, pp, 2, lsq_step, &m, &r);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the child was killed");
    LsqModel b = {0};
    TrainParam pb[2];
    lsq_params(&b, pb);
    TrainerConfig cb = lsq_config(db);
    cb.resume = true;
    TrainerResult rb;
    CHECK_OK(trainer_run(&eng, &cb, pb, 2, lsq_step, &b, &rb));
    CHECK(rb.updates == 30 && b.micro == 4 * 20, "resumed from update 10 (%d micro-steps run)", b.micro);
    CHECK(memcmp(a.w, b.w, sizeof a.w) == 0 && a.b == b.b, "killed and resumed ends bit-identical");

    // C: SIGINT at update 8 saves and stops; the resume also ends bit-identical.
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, &old);
    LsqModel c1 = {.stop_at = 4 * 7 + 3};
    TrainParam pc[2];
    lsq_params(&c1, pc);
    TrainerConfig cc = lsq_config(dc);
    TrainerResult rc;
    CHECK_OK(trainer_run(&eng, &cc, pc, 2, lsq_step, &c1, &rc));
    CHECK(rc.stopped && rc.updates == 8, "Ctrl-C stops after update %lld", (long long)rc.updates);
    stop_requested = 0;
    sigaction(SIGINT, &old, NULL);
    LsqModel c2 = {0};
    lsq_params(&c2, pc);
    cc.resume = true;
    CHECK_OK(trainer_run(&eng, &cc, pc, 2, lsq_step, &c2, &rc));
    CHECK(rc.updates == 30 && memcmp(a.w, c2.w, sizeof a.w) == 0 && a.b == c2.b, "stopped and resumed ends bit-identical");
    // Other options: refused.
    cc.config_text = "problem=lsq\nlr=0.2\naccum=4\n";
    CHECK_ERR(trainer_run(&eng, &cc, pc, 2, lsq_step, &c2, &rc));
    // D: every tensor at lr_scale 0.5 is the schedule at half the lr (a power of two: the same floats); a scale
    // on one tensor alone moves only that one.
    char dd[1024], de[1024], df[1024];
    snprintf(dd, sizeof dd, "%s/run_d", tmp), snprintf(de, sizeof de, "%s/run_e", tmp);
    snprintf(df, sizeof df, "%s/run_f", tmp);
    mkdir(dd, 0755), mkdir(de, 0755), mkdir(df, 0755);
    LsqModel d = {0}, h = {0}, f = {0};
    TrainParam pd[2], ph[2], pf[2];
    lsq_params(&d, pd), lsq_params(&h, ph), lsq_params(&f, pf);
    pd[0].lr_scale = pd[1].lr_scale = 0.5f;
    TrainerConfig cd = lsq_config(dd), ch = lsq_config(de), cf = lsq_config(df);
    ch.schedule.warmup_max_lr = ch.schedule.optimizer_lr = 0.05;
    pf[1].lr_scale = 0.5f;
    TrainerResult rd;
    CHECK_OK(trainer_run(&eng, &cd, pd, 2, lsq_step, &d, &rd));
    CHECK_OK(trainer_run(&eng, &ch, ph, 2, lsq_step, &h, &rd));
    CHECK_OK(trainer_run(&eng, &cf, pf, 2, lsq_step, &f, &rd));
    CHECK(memcmp(d.w, h.w, sizeof d.w) == 0 && d.b == h.b && memcmp(d.w, a.w, sizeof d.w) != 0,
          "lr_scale 0.5 everywhere = half the schedule's lr, bit for bit (and not the full lr's result)");
    CHECK(f.b != a.b && f.b != h.b, "a scaled bias alone ends elsewhere (%g, full lr %g, half %g)", f.b, a.b, h.b);
    // G: ZeRO-1 in one process (one shard holding every moment) takes the plain steps bit for bit, and its
    // checkpoint (the moments gathered into full tensors) resumes bit for bit.
    char dg[1024];
    snprintf(dg, sizeof dg, "%s/run_g", tmp);
    mkdir(dg, 0755);
    sigaction(SIGINT, &sa, &old);
    LsqModel g1 = {.stop_at = 4 * 7 + 3}, g2 = {0};
    TrainParam pg[2];
    lsq_params(&g1, pg);
    TrainerConfig cg = lsq_config(dg);
    cg.zero = 1;
    TrainerResult rg;
    CHECK_OK(trainer_run(&eng, &cg, pg, 2, lsq_step, &g1, &rg));
    stop_requested = 0;
    sigaction(SIGINT, &old, NULL);
    CHECK(rg.stopped && rg.updates == 8, "ZeRO-1: Ctrl-C stops after update %lld", (long long)rg.updates);
    lsq_params(&g2, pg);
    cg.resume = true;
    CHECK_OK(trainer_run(&eng, &cg, pg, 2, lsq_step, &g2, &rg));
    CHECK(rg.updates == 30 && memcmp(a.w, g2.w, sizeof a.w) == 0 && a.b == g2.b,
          "ZeRO-1, stopped and resumed, ends bit-identical to the plain run (b %.9g vs %.9g)", g2.b, a.b);
    cg.zero = 2;
    CHECK_ERR(trainer_run(&eng, &cg, pg, 2, lsq_step, &g2, &rg));
    // H: the device path's logic (host masters, gradients summed in f32 over the update on the "device",
    // copied once per update, masters copied back), on the CPU: the plain run's result up to that f32 sum, and
    // killed + resumed bit for bit.
    char dm[1024], dn[1024];
    snprintf(dm, sizeof dm, "%s/run_m", tmp), snprintf(dn, sizeof dn, "%s/run_n", tmp);
    mkdir(dm, 0755), mkdir(dn, 0755);
    LsqModel h1 = {0}, h2 = {0};
    TrainParam ph1[2], ph2[2];
    lsq_params(&h1, ph1);
    TrainerConfig cm = lsq_config(dm);
    cm.host_copies = true;
    CHECK_OK(trainer_run(&eng, &cm, ph1, 2, lsq_step, &h1, &rg));
    double worst = fabs(h1.b - a.b);
    for (int i = 0; i < 8; i++) worst = fmax(worst, fabs(h1.w[i] - a.w[i]));
    CHECK(rg.updates == 30 && worst < 1e-5 && isfinite(worst), "host copies: the plain result within %.2g", worst);
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        LsqModel m = {.die_at = 4 * 12 + 2};
        TrainParam pp[2];
        lsq_params(&m, pp);
        TrainerConfig c = lsq_config(dn);
        c.host_copies = true;
        TrainerResult r;
        trainer_run(&eng, &c, pp, 2, lsq_step, &m, &r);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the host-copies child was killed");
    lsq_params(&h2, ph2);
    TrainerConfig cn = lsq_config(dn);
    cn.host_copies = true, cn.resume = true;
    CHECK_OK(trainer_run(&eng, &cn, ph2, 2, lsq_step, &h2, &rg));
    CHECK(rg.updates == 30 && memcmp(h1.w, h2.w, sizeof h1.w) == 0 && h1.b == h2.b,
          "host copies: killed and resumed ends bit-identical (the masters reach the parameters after the load)");
    printf("trainer: loss %.4g -> %.4g in 30 updates; SIGKILL + resume and SIGINT + resume bit-identical\n", first, last);
    engine_destroy(&eng);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    char tmp[] = "/tmp/agpt_train_infra_XXXXXX";
    if (!mkdtemp(tmp)) {
        printf("mkdtemp failed\n");
        return 1;
    }
    test_schedule(dir);
    test_run_state(tmp);
    test_loader();
    test_memory_plan();
    test_trainer(tmp);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) printf("could not remove %s\n", tmp);
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
