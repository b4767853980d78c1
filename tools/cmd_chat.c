// agpt chat: a terminal conversation about one image, as the reference's web demo holds it (anomalygpt-reference.md
// 5.5, 9): every turn re-runs the whole history with the image, the map is the zero-shot map of the class the
// conversation names or the few-shot map once normal references are given. Lines come from stdin (a terminal or a
// pipe); each answer goes to stdout on its own line, a one-line summary of the turn to stderr. A failed turn or
// command (an unreadable image, a question longer than the context) prints an error and the chat goes on. When
// the history would outgrow the context, the oldest turns are dropped (and stderr says so) before the turn runs.
// Stdout that cannot be written ends the chat with exit status 1.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt.h"
#include "model/prompt_learner.h"
#include "runtime/log.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

#define MAX_LIST 64
#define MAX_TURNS 256

static void commands(FILE *f);

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt chat --model M.safetensors [options] IMAGE\n"
            "  --model F        the model file (vision encoder, decoder, prompt learner, LLaMA)\n"
            "  --weights F      a file of weights layered over the model; repeatable\n"
            "  --tokenizer F    LLaMA's SentencePiece tokenizer.model (default: the one embedded in the model file)\n"
            "  --reference F    a normal image of the product: few-shot map instead of the zero-shot one\n"
            "                   (one: the model is opened for batches of one image, as the web demo uses)\n"
            "  --greedy         argmax decoding instead of sampling\n"
            "  --temperature T, --top-p P, --top-k K, --seed S   sampling (default 1.0, 0.01, 50, 42: the web demo;\n"
            "                   T 1e-4..1e4, P (0, 1], K >= 0 with 0 no top-k, S any uint64)\n"
            "  --max-new N      new tokens per answer, 1..1024 (default 512)\n"
            "  --context N      tokens the conversation may hold: prompt, history and answer, 64..32768 (default\n"
            "                   2048); the oldest turns are dropped when the history would not fit\n"
            "  --squash         resize to 224x224 ignoring the aspect ratio (the web demo's path)\n"
            "  --device cpu|cuda, --dtype f32|f16|bf16 (cuda: the compute dtype, default f16 as the reference; cpu:\n"
            "                   bf16/f16 keep the weight matrices in it, half the memory; default f32), --threads N\n"
            "\n"
            "Type a question and press enter. Commands:\n");
    commands(f);
}

static void commands(FILE *f) {
    fprintf(f,
            "  /image PATH       talk about another image (clears the history)\n"
            "  /reference PATH   add a normal reference image (few-shot map from now on)\n"
            "  /references clear back to the zero-shot map\n"
            "  /reset            clear the history\n"
            "  /help             this list\n"
            "  /quit             leave (as does end of input)\n");
}

typedef struct Chat {
    AnomalyGPT model;
    Image image;
    char *image_path;
    Image refs[MAX_LIST];
    int n_refs;
    ConversationTurn history[MAX_TURNS];  // strings owned
    int n_history;
    Sampler sampler;
    bool greedy;
    int max_new;
} Chat;

static void clear_history(Chat *c) {
    for (int i = 0; i < c->n_history; i++) {
        free((char *)c->history[i].question);
        free((char *)c->history[i].answer);
    }
    c->n_history = 0;
}

// Drops the oldest n turns of the history.
static void drop_oldest(Chat *c, int n) {
    for (int i = 0; i < n; i++) {
        free((char *)c->history[i].question);
        free((char *)c->history[i].answer);
    }
    memmove(c->history, c->history + n, (size_t)(c->n_history - n) * sizeof *c->history);
    c->n_history -= n;
}

// Tokens of an LLM input of history turns [first, n_history) and the question, counted as anomalygpt's
// assemble_input builds it (anomalygpt-reference.md 5.4): <s>, "### Human: <Img>", the image token, "</Img> ",
// the 18 prompts, and prompt text + "\n### Assistant:", each piece tokenised on its own. -1 when out of memory.
static int input_tokens(const Chat *c, int first, const char *question) {
    const SpTokenizer *t = c->model.tokenizer;
    int cap = c->model.max_seq, total = 1 + 1 + PROMPT_TOKENS, n = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    char *text = conversation_prompt_text(c->history + first, c->n_history - first, question);
    char *tail = text ? malloc(strlen(text) + sizeof CONV_ASSISTANT) : NULL;
    if (!ids || !tail) {
        free(ids), free(text), free(tail);
        agpt_clear_error();
        return -1;
    }
    strcpy(tail, text);
    strcat(tail, CONV_ASSISTANT);
    const char *pieces[] = {CONV_PROMPT_START, CONV_IMAGE_END, tail};
    for (int k = 0; k < 3; k++) {
        // A piece longer than cap fails with *n set to the count it needs, which is all we want here.
        if (sp_encode(t, pieces[k], ids, cap, &n) != AGPT_OK && n <= cap) {
            total = -1;
            break;
        }
        total += n;
    }
    agpt_clear_error();
    free(ids), free(text), free(tail);
    return total;
}

// How many of the oldest turns to drop so that the question, the rest of the history and max_new answer tokens
// fit the context (as anomalygpt_ask checks it: input + max_new - 1 <= max_seq); at least one when the history
// is full. 0 when even the question alone does not fit: then the turn fails with the model's own error and the
// history is kept.
static int turns_to_drop(const Chat *c, const char *question) {
    int first = c->n_history == MAX_TURNS ? 1 : 0;
    for (; first <= c->n_history; first++) {
        int T = input_tokens(c, first, question);
        if (T < 0) return first;  // cannot count: let the model judge
        if (T + c->max_new - 1 <= c->model.max_seq) return first;
    }
    return c->n_history == MAX_TURNS ? 1 : 0;
}

static void chat_error(const char *what, Status s) {
    fprintf(stderr, "agpt chat: error (%s): %s%s%s\n", agpt_status_name(s), what ? what : "", what ? ": " : "",
            agpt_last_error());
    agpt_clear_error();
}

static void set_image(Chat *c, const char *path) {
    Image img;
    Status s = image_load(path, &img);
    if (s) {
        chat_error("cannot use the image (keeping the current one)", s);
        return;
    }
    image_free(&c->image);
    c->image = img;
    free(c->image_path);
    c->image_path = strdup(path);
    clear_history(c);
    fprintf(stderr, "image %s (%dx%d); history cleared\n", path, img.width, img.height);
}

static void add_reference(Chat *c, const char *path) {
    if (c->n_refs == MAX_LIST) {
        fprintf(stderr, "agpt chat: error: at most %d references\n", MAX_LIST);
        return;
    }
    if (c->n_refs + 1 > c->model.vision.max_batch) {  // anomalygpt_open sizes the vision batch for one image
        fprintf(stderr, "agpt chat: error: this build takes %d reference image(s) at most (the web demo uses one); "
                "/references clear, then add another\n", c->model.vision.max_batch);
        return;
    }
    Status s = image_load(path, &c->refs[c->n_refs]);
    if (s) {
        chat_error("cannot use the reference", s);
        return;
    }
    s = vision_model_set_references(&c->model.vision, c->refs, c->n_refs + 1);
    if (s) {
        chat_error("cannot add the reference", s);
        image_free(&c->refs[c->n_refs]);
        // Back to the references that were in use (setting clears them first).
        Status r = vision_model_set_references(&c->model.vision, c->refs, c->n_refs);
        if (r) chat_error("restoring the previous references", r);
        return;
    }
    c->n_refs++;
    fprintf(stderr, "%d reference(s): few-shot map\n", c->n_refs);
}

static void clear_references(Chat *c) {
    for (int i = 0; i < c->n_refs; i++) image_free(&c->refs[i]);
    c->n_refs = 0;
    vision_model_set_references(&c->model.vision, NULL, 0);
    fprintf(stderr, "references cleared: zero-shot map\n");
}

// One turn; false when the answer could not be written to stdout (the chat ends).
static bool ask(Chat *c, const char *question) {
    int drop = turns_to_drop(c, question);
    if (drop > 0) {
        drop_oldest(c, drop);
        fprintf(stderr, "agpt chat: the conversation outgrew the context of %d tokens (or %d turns): dropped the "
                "oldest %d turn(s), %d kept (/reset clears them all, --context allows more)\n", c->model.max_seq,
                MAX_TURNS, drop, c->n_history);
    }
    AnomalyAnswer ans = {0};
    double t0 = timer_now_s();
    Status s = anomalygpt_ask(&c->model, &c->image, c->history, c->n_history, question,
                              c->greedy ? NULL : &c->sampler, c->max_new, &ans);
    double ms = 1e3 * (timer_now_s() - t0);
    if (s) {
        char what[256];  // a bad argument here is nearly always a conversation longer than the context
        if (s == AGPT_ERR_ARG)
            snprintf(what, sizeof what, "this turn failed (prompt, history and answer must fit the context of %d "
                     "tokens: /reset clears the history, --context allows more)", c->model.max_seq);
        else
            snprintf(what, sizeof what, "this turn failed");
        chat_error(what, s);
        free(ans.text);
        return true;
    }
    if (printf("%s\n", ans.text) < 0 || fflush(stdout) != 0) {
        fprintf(stderr, "agpt chat: error: cannot write the answer to stdout: %s\n", strerror(errno));
        free(ans.text);
        return false;
    }
    char mode[192];
    if (c->n_refs) snprintf(mode, sizeof mode, "few-shot, %d reference(s)", c->n_refs);
    else snprintf(mode, sizeof mode, "class %s", ans.class_name ? ans.class_name : "?");
    fprintf(stderr, "[score %.4f | %s | %d tokens after a %d-token prompt | %.0f ms]\n", ans.score, mode,
            ans.n_tokens, ans.prefix_tokens, ms);
    char *q = strdup(question);
    if (!q) {
        free(ans.text);
        return true;
    }
    c->history[c->n_history++] = (ConversationTurn){q, ans.text};
    return true;
}

// The argument of a "/command ARG" line, leading spaces skipped; "" when none.
static const char *argument(const char *line, size_t cmd_len) {
    const char *p = line + cmd_len;
    while (*p == ' ' || *p == '\t') p++;
    return p;
}

static bool is_command(const char *line, const char *cmd) {
    size_t n = strlen(cmd);
    return strncmp(line, cmd, n) == 0 && (line[n] == 0 || line[n] == ' ' || line[n] == '\t');
}

int cmd_chat(int argc, char **argv) {
    const char *model = NULL, *tokenizer = NULL, *image = NULL;
    const char *overlays[MAX_LIST], *refs[MAX_LIST];
    int n_overlays = 0, n_refs = 0, threads = 0, squash = 0, context = 2048, max_new = 512;
    SamplerConfig scfg = sampler_default_config();
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F16;  // the reference runs the whole model in fp16 (model.half())
    for (int i = 1; i < argc; i++) {
        int shared = cli_engine_option(argc, argv, &i, "chat", &dev, &dt, &threads);
        if (!shared) shared = cli_sampling_option(argc, argv, &i, "chat", &scfg);
        if (shared < 0) return 2;
        if (shared) continue;
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "chat"))) return 2; } while (0)
#define PUSH(list, n) do { if ((n) == MAX_LIST) { fprintf(stderr, "agpt chat: at most %d of %s\n", MAX_LIST, a); return 2; } (list)[(n)++] = v; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); model = v; }
        else if (!strcmp(a, "--weights")) { VALUE(); PUSH(overlays, n_overlays); }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); tokenizer = v; }
        else if (!strcmp(a, "--reference")) { VALUE(); PUSH(refs, n_refs); }
        else if (!strcmp(a, "--max-new") || !strcmp(a, "--context")) {
            VALUE();
            long long n;
            bool is_max_new = !strcmp(a, "--max-new");
            if (cli_parse_int("chat", a, v, is_max_new ? 1 : 64, is_max_new ? 1024 : 32768, &n)) return 2;
            *(is_max_new ? &max_new : &context) = (int)n;
        }
        else if (!strcmp(a, "--squash")) squash = 1;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else if (a[0] == '-') { fprintf(stderr, "agpt chat: unknown option '%s'\n", a); usage(stderr); return 2; }
        else if (image) { fprintf(stderr, "agpt chat: one image (got '%s' and '%s')\n", image, a); return 2; }
        else image = a;
#undef VALUE
#undef PUSH
    }
    if (!model || !image) {
        fprintf(stderr, "agpt chat: --model and an image are required\n");
        usage(stderr);
        return 2;
    }
    Status s = check_model_path(model, "--model");
    for (int k = 0; k < n_overlays && s == AGPT_OK; k++) s = check_model_path(overlays[k], "--weights");
    if (s) return cli_report("chat", s);

    static Chat c;  // large (history, references): not on the stack
    memset(&c, 0, sizeof c);
    c.greedy = scfg.greedy;
    c.max_new = max_new;
    Engine eng;
    dt = cli_model_dtype(argc, argv, dev, dt);
    s = engine_create(&eng, dev, 0, threads, 1);
    if (s) return cli_report("chat", s);
    double t0 = timer_now_s();
    if ((s = anomalygpt_open(&c.model, &eng, model, overlays, n_overlays, tokenizer, dt, context))) {
        engine_destroy(&eng);
        return cli_report("chat", s);
    }
    int rc = 0;
    if (squash) c.model.vision.mode = PREPROCESS_SQUASH;
    if (!c.greedy && (s = sampler_init(&c.sampler, &scfg, c.model.llm.vocab))) {
        rc = cli_report("chat", s);
        goto done;
    }
    if ((s = image_load(image, &c.image))) {
        rc = cli_report("chat", s);
        goto done;
    }
    c.image_path = strdup(image);
    if (n_refs > c.model.vision.max_batch) {
        fprintf(stderr, "agpt chat: %d references given; this build takes %d at most (the web demo uses one)\n",
                n_refs, c.model.vision.max_batch);
        rc = 2;
        goto done;
    }
    for (int i = 0; i < n_refs; i++) {
        if ((s = image_load(refs[i], &c.refs[i]))) break;
        c.n_refs++;
    }
    if (s == AGPT_OK && n_refs) s = vision_model_set_references(&c.model.vision, c.refs, n_refs);
    if (s) {
        rc = cli_report("chat", agpt_add_context(s, "reference images"));
        goto done;
    }
    bool tty = isatty(STDIN_FILENO);
    fprintf(stderr, "agpt chat: model loaded in %.1f s; image %s (%dx%d), %s; %s\n", timer_now_s() - t0, image,
            c.image.width, c.image.height, n_refs ? "few-shot map" : "zero-shot map",
            c.greedy ? "greedy" : "sampling");
    if (tty) fprintf(stderr, "Ask about the image; /help lists the commands.\n");

    char *line = NULL;
    size_t cap = 0;
    for (;;) {
        if (tty && (printf("> ") < 0 || fflush(stdout) != 0)) {
            rc = 1;
            break;
        }
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) break;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == 0) continue;
        if (*p != '/') {
            if (!ask(&c, p)) {
                rc = 1;
                break;
            }
        } else if (is_command(p, "/quit") || is_command(p, "/exit")) {
            break;
        } else if (is_command(p, "/image")) {
            const char *path = argument(p, 6);
            if (*path) set_image(&c, path);
            else fprintf(stderr, "agpt chat: /image needs a path\n");
        } else if (is_command(p, "/references")) {
            if (!strcmp(argument(p, 11), "clear")) clear_references(&c);
            else fprintf(stderr, "agpt chat: /references clear (%d in use)\n", c.n_refs);
        } else if (is_command(p, "/reference")) {
            const char *path = argument(p, 10);
            if (*path) add_reference(&c, path);
            else fprintf(stderr, "agpt chat: /reference needs a path\n");
        } else if (is_command(p, "/reset")) {
            clear_history(&c);
            fprintf(stderr, "history cleared\n");
        } else if (is_command(p, "/help")) {
            commands(stderr);
        } else {
            fprintf(stderr, "agpt chat: unknown command '%s' (/help lists them)\n", p);
        }
    }
    free(line);
done:
    clear_history(&c);
    for (int i = 0; i < c.n_refs; i++) image_free(&c.refs[i]);
    image_free(&c.image);
    free(c.image_path);
    sampler_free(&c.sampler);
    anomalygpt_close(&c.model);
    engine_destroy(&eng);
    return finish_stdout("chat", rc);
}
