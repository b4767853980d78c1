// agpt bench detect: the whole AnomalyGPT inspection (anomalygpt_ask: preprocessing, ImageBind-H vision with
// taps, the decoder and zero-shot map, the prompt learner, llama_proj, the LLM input, LLaMA-7B prefill and greedy
// decode) with random weights at full size, one image at a time, in inspections/s: verdict-only (3 new tokens)
// and a full answer (--answer-tokens new tokens). Both modes generate exactly that many tokens, whatever the
// random weights say (AnomalyGPT.ignore_stop), so that bench/peers/torch_anomalygpt.py, which runs the official
// per-image pipeline in PyTorch with generate(min_new_tokens = max_new_tokens), does the same work.
// No model file: the parts come from anomalygpt_init_random; the LLaMA tokenizer (for the prompt's token ids)
// from --tokenizer or ../shared/data/llama-tokenizer.model (skipped, exit 0, when there is none).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

// The official MVTec bottle test prompt (describles['bottle'] + ' Is there any anomaly in the image?'): 49 tokens
// with "\n### Assistant:" (anomalygpt-reference.md 5.3), so the LLM input is 79 rows at full size.
static const char *DEFAULT_PROMPT =
    "This is a photo of a bottle for anomaly detection, which should be round, without any damage, flaw, defect, "
    "scratch, hole or broken part. Is there any anomaly in the image?";

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt bench detect [--device cpu|cuda] [--dtype f32|f16|bf16] [--threads N] [--iters N]\n"
            "                         [--verdict-tokens N] [--answer-tokens N] [--vision-layers N] [--vision-width C]\n"
            "                         [--llm-layers N] [--llm-width C] [--tokenizer F] [--prompt TEXT] [--json FILE]\n"
            "  End-to-end inspections/s of AnomalyGPT with random weights, one 224x224 image at a time (the same\n"
            "  noise image each time, class 'object'): verdict-only (--verdict-tokens, 3) and full answer\n"
            "  (--answer-tokens, 32) new tokens, exactly that many (stops ignored), greedy. Full size by default:\n"
            "  ImageBind-H (32 x 1280, 16 heads), decoder 4 x (1280->1024), prompt learner, llama_proj, LLaMA-7B\n"
            "  (32 x 4096). Smaller sizes for a CPU: --vision-layers/--llm-layers (multiples of 4 keep the taps\n"
            "  distinct, any >= 1 works), --vision-width (multiple of 80: 80 per head), --llm-width (multiple of\n"
            "  128; the MLP is width x 11008/4096). --iters: timed inspections per mode after one warm-up (cuda 10,\n"
            "  cpu 2). Default: cuda f16 (the reference runs fp16) when a GPU exists, else cpu f32.\n"
            "  bench/peers/torch_anomalygpt.py runs the same work in PyTorch; bench/compare.py pairs the --json files.\n");
}

static int int_option(int argc, char **argv, int *i, int lo, int hi, int *out) {
    const char *v = cli_value(argc, argv, i, "bench detect");
    long long x;
    if (!v || cli_parse_int("bench detect", argv[*i - 1], v, lo, hi, &x)) return -1;
    *out = (int)x;
    return 0;
}

typedef struct ModeResult {
    const char *mode;
    int new_tokens;
    int prefix_tokens;  // rows of the LLM input
    double s_per_inspection, vision_ms, prefill_ms, decode_ms;
} ModeResult;

// One warm-up inspection, then `iters` timed ones: wall time per inspection and the mean stage times.
static Status run_mode(AnomalyGPT *a, const Image *img, const char *prompt, int new_tokens, int iters, ModeResult *r) {
    AnomalyAnswer ans;
    memset(&ans, 0, sizeof ans);
    r->new_tokens = new_tokens;
    r->vision_ms = r->prefill_ms = r->decode_ms = 0;
    AGPT_TRY(anomalygpt_ask(a, img, NULL, 0, prompt, NULL, new_tokens, &ans));  // warm-up
    free(ans.text);
    double t0 = timer_now_s();
    for (int it = 0; it < iters; it++) {
        memset(&ans, 0, sizeof ans);
        AGPT_TRY(anomalygpt_ask(a, img, NULL, 0, prompt, NULL, new_tokens, &ans));
        free(ans.text);
        if (ans.n_tokens != new_tokens)
            return AGPT_FAIL(AGPT_ERR_ARG, "generated %d tokens, asked for %d", ans.n_tokens, new_tokens);
        r->prefix_tokens = ans.prefix_tokens;
        r->vision_ms += ans.vision_ms, r->prefill_ms += ans.prefill_ms, r->decode_ms += ans.decode_ms;
    }
    r->s_per_inspection = (timer_now_s() - t0) / iters;
    r->vision_ms /= iters, r->prefill_ms /= iters, r->decode_ms /= iters;
    return AGPT_OK;
}

int cmd_bench_detect(int argc, char **argv) {
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F32;
    int dtype_set = 0, threads = 0, iters = 0, verdict_tokens = 3, answer_tokens = 32;
    AnomalyRandomConfig cfg;
    anomaly_random_config_full(&cfg);
    const char *json_path = NULL, *tokenizer = NULL, *prompt = DEFAULT_PROMPT;
    for (int i = 1; i < argc; i++) {
        int rc = 0;
        if (!strcmp(argv[i], "--device") || !strcmp(argv[i], "--dtype") || !strcmp(argv[i], "--threads")) {
            dtype_set |= !strcmp(argv[i], "--dtype");
            if (cli_engine_option(argc, argv, &i, "bench detect", &dev, &dt, &threads) != 1) return 2;
        } else if (!strcmp(argv[i], "--iters")) {
            rc = int_option(argc, argv, &i, 1, 100000, &iters);
        } else if (!strcmp(argv[i], "--verdict-tokens")) {
            rc = int_option(argc, argv, &i, 1, 1024, &verdict_tokens);
        } else if (!strcmp(argv[i], "--answer-tokens")) {
            rc = int_option(argc, argv, &i, 1, 1024, &answer_tokens);
        } else if (!strcmp(argv[i], "--vision-layers")) {
            rc = int_option(argc, argv, &i, 1, 256, &cfg.vision_layers);
        } else if (!strcmp(argv[i], "--llm-layers")) {
            rc = int_option(argc, argv, &i, 1, 256, &cfg.llm_layers);
        } else if (!strcmp(argv[i], "--vision-width")) {
            rc = int_option(argc, argv, &i, 80, 8192, &cfg.vision_width);
            if (!rc && cfg.vision_width % 80) { fprintf(stderr, "agpt bench detect: --vision-width: a multiple of 80\n"); return 2; }
            cfg.vision_heads = cfg.vision_width / 80, cfg.vision_mlp = 4 * cfg.vision_width;
        } else if (!strcmp(argv[i], "--llm-width")) {
            rc = int_option(argc, argv, &i, 128, 16384, &cfg.llm_width);
            if (!rc && cfg.llm_width % 128) { fprintf(stderr, "agpt bench detect: --llm-width: a multiple of 128\n"); return 2; }
            cfg.llm_heads = cfg.llm_width / 128, cfg.llm_hidden = (int)((int64_t)cfg.llm_width * 11008 / 4096);
        } else if (!strcmp(argv[i], "--tokenizer")) {
            if (!(tokenizer = cli_value(argc, argv, &i, "bench detect"))) return 2;
        } else if (!strcmp(argv[i], "--prompt")) {
            if (!(prompt = cli_value(argc, argv, &i, "bench detect"))) return 2;
        } else if (!strcmp(argv[i], "--json")) {
            if (!(json_path = cli_value(argc, argv, &i, "bench detect"))) return 2;
        } else {
            usage(strcmp(argv[i], "--help") ? stderr : stdout);
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
        if (rc) return 2;
    }
    if (!dtype_set) dt = dev == DEV_CUDA ? DT_F16 : DT_F32;
    if (dev == DEV_CPU && dt != DT_F32) {
        fprintf(stderr, "agpt bench detect: the CPU backend computes in f32; use --dtype f32\n");
        return 2;
    }
    if (!iters) iters = dev == DEV_CUDA ? 10 : 2;
    if (!tokenizer) {
        static const char *candidates[] = {"../shared/data/llama-tokenizer.model", "shared/data/llama-tokenizer.model"};
        for (int i = 0; i < 2 && !tokenizer; i++)
            if (access(candidates[i], R_OK) == 0) tokenizer = candidates[i];
        if (!tokenizer) {
            printf("agpt bench detect: skipped: no LLaMA tokenizer (pass --tokenizer tokenizer.model; looked for "
                   "../shared/data/llama-tokenizer.model and shared/data/llama-tokenizer.model)\n");
            return 0;
        }
    }
    int max_new = verdict_tokens > answer_tokens ? verdict_tokens : answer_tokens;

    Engine eng;
    Status s = engine_create(&eng, dev, 0, threads, 7);
    if (s) return cli_report("bench detect", s);
    AnomalyGPT a;
    memset(&a, 0, sizeof a);
    Image img = {.width = 224, .height = 224, .rgb = NULL};
    FILE *jf = NULL;
    double t0 = timer_now_s();
    // The prompt's tokens plus the 30 rows of the fixed prefix, and the answer: 256 + max_new covers the default.
    s = anomalygpt_init_random(&a, &eng, &cfg, tokenizer, dt, 256 + max_new);
    if (s) goto done;
    a.map_class = "object";  // the class with (random) cached features, whatever the prompt names
    a.ignore_stop = true;    // exactly the asked number of tokens
    printf("agpt bench detect: AnomalyGPT with random weights (%.2f GB, made in %.1f s), %s %s, %d threads\n",
           (double)a.vision.weights.bytes / 1e9, timer_now_s() - t0, device_name(dev), dtype_name(a.vision.weights.dtype),
           eng.num_threads);
    printf("  vision %d x %d (%d heads, MLP %d), decoder 4 x (%d->%d), prompt learner -> %d, llama_proj %d->%d, "
           "LLM %d x %d (%d heads, MLP %d, vocab %d)\n", cfg.vision_layers, cfg.vision_width, cfg.vision_heads,
           cfg.vision_mlp, cfg.vision_width, cfg.embed, cfg.llm_width, cfg.embed, cfg.llm_width, cfg.llm_layers,
           cfg.llm_width, cfg.llm_heads, cfg.llm_hidden, cfg.vocab);
    if ((s = mem_host_alloc((size_t)224 * 224 * 3, (void **)&img.rgb))) goto done;
    {
        Rng rng;
        rng_seed(&rng, 11);
        for (size_t i = 0; i < (size_t)224 * 224 * 3; i++) img.rgb[i] = (uint8_t)(rng_u64(&rng) >> 56);
    }
    ModeResult runs[2] = {{.mode = "verdict"}, {.mode = "full"}};
    for (int m = 0; m < 2 && !s; m++) s = run_mode(&a, &img, prompt, m ? answer_tokens : verdict_tokens, iters, &runs[m]);
    if (s) goto done;
    int prefix = runs[0].prefix_tokens;
    printf("LLM input %d rows; %d timed inspections per mode after a warm-up; greedy, stops ignored\n", prefix, iters);
    printf("%-8s %7s %14s %12s %10s %11s %10s %14s\n", "mode", "tokens", "inspections/s", "ms/inspect", "vision ms",
           "prefill ms", "decode ms", "ms/new token");
    for (int m = 0; m < 2; m++) {
        ModeResult *r = &runs[m];
        printf("%-8s %7d %14.3f %12.2f %10.2f %11.2f %10.2f %14.2f\n", r->mode, r->new_tokens, 1.0 / r->s_per_inspection,
               r->s_per_inspection * 1e3, r->vision_ms, r->prefill_ms, r->decode_ms,
               r->new_tokens > 1 ? r->decode_ms / (r->new_tokens - 1) : 0.0);
    }
    if (json_path) {
        if (!(jf = fopen(json_path, "w"))) {
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", json_path);
            goto done;
        }
        fprintf(jf, "{\"bench\": \"detect\", \"device\": \"%s\", \"dtype\": \"%s\", \"threads\": %d, "
                "\"vision_layers\": %d, \"vision_width\": %d, \"llm_layers\": %d, \"llm_width\": %d, "
                "\"prefix_tokens\": %d, \"iters\": %d, \"weight_gb\": %.3f, \"runs\": [", device_name(dev),
                dtype_name(a.vision.weights.dtype), eng.num_threads, cfg.vision_layers, cfg.vision_width,
                cfg.llm_layers, cfg.llm_width, prefix, iters, (double)a.vision.weights.bytes / 1e9);
        for (int m = 0; m < 2; m++) {
            ModeResult *r = &runs[m];
            fprintf(jf, "%s{\"mode\": \"%s\", \"new_tokens\": %d, \"s_per_inspection\": %.6f, "
                    "\"inspections_per_s\": %.4f, \"vision_ms\": %.3f, \"prefill_ms\": %.3f, \"decode_ms\": %.3f}",
                    m ? ", " : "", r->mode, r->new_tokens, r->s_per_inspection, 1.0 / r->s_per_inspection,
                    r->vision_ms, r->prefill_ms, r->decode_ms);
        }
        fprintf(jf, "]}\n");
        fclose(jf);
    }
done:
    mem_host_free(img.rgb);
    anomalygpt_close(&a);
    engine_destroy(&eng);
    return finish_stdout("bench detect", s ? cli_report("bench detect", s) : 0);
}
