#include "train/conversation_train.h"

#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>

#include "model/conversation.h"

const char *train_position_word(double center_row, double center_col, int side) {
    // The reference compares the Python floats c / 224 with 1/3 and 2/3; the same doubles here.
    double r = center_row / side, c = center_col / side;
    static const char *words[3][3] = {{"top left", "top", "top right"},
                                      {"left", "center", "right"},
                                      {"bottom left", "bottom", "bottom right"}};
    int ri = r <= 1.0 / 3 ? 0 : r <= 2.0 / 3 ? 1 : 2;
    int ci = c <= 1.0 / 3 ? 0 : c <= 2.0 / 3 ? 1 : 2;
    return words[ri][ci];
}

Status train_question_text(const char *description, char *buf, size_t cap) {
    AGPT_CHECK_ARG(description && buf, "train_question_text: NULL argument");
    int n = snprintf(buf, cap, "%s%s", description, TRAIN_QUESTION);
    AGPT_CHECK_ARG(n >= 0 && (size_t)n < cap, "train_question_text: %d bytes do not fit in %zu", n, cap);
    return AGPT_OK;
}

Status train_answer_text(int n_regions, const double (*centers)[2], int side, char *buf, size_t cap) {
    AGPT_CHECK_ARG(buf && n_regions >= 0 && (n_regions == 0 || centers) && side > 0,
                   "train_answer_text: %d regions", n_regions);
    int n;
    if (n_regions == 0) {
        n = snprintf(buf, cap, "%s", TRAIN_ANSWER_NORMAL);
    } else if (n_regions == 1) {
        n = snprintf(buf, cap, "Yes, there is an anomaly in the image, at the %s of the image.",
                     train_position_word(centers[0][0], centers[0][1], side));
    } else {
        // The distinct positions, in the order first met ("top", "left", ...).
        const char *word[TRAIN_MAX_REGIONS];
        int n_words = 0;
        for (int i = 0; i < n_regions && i < TRAIN_MAX_REGIONS; i++) {
            const char *w = train_position_word(centers[i][0], centers[i][1], side);
            bool seen = false;
            for (int j = 0; j < n_words && !seen; j++) seen = !strcmp(word[j], w);
            if (!seen) word[n_words++] = w;
        }
        char list[512] = "";
        size_t used = 0;
        for (int j = 0; j < n_words; j++) {
            const char *sep = j == 0 ? "" : j == n_words - 1 ? " and " : ", ";
            used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", sep, word[j]);
        }
        n = snprintf(buf, cap, "Yes, there are %d anomalies in the image, they are at the %s of the image.",
                     n_regions, list);
    }
    AGPT_CHECK_ARG(n >= 0 && (size_t)n < cap, "train_answer_text: %d bytes do not fit in %zu", n, cap);
    return AGPT_OK;
}

void train_tokens_free(TrainTokens *t) {
    free(t->ids), free(t->targets);
    memset(t, 0, sizeof *t);
}

// Appends tok(a + b) to out, with targets = ids when supervised, else TRAIN_IGNORE.
static Status append_piece(const SpTokenizer *tok, const char *a, const char *b, int supervised, TrainTokens *out,
                           int *cap) {
    size_t la = strlen(a), lb = strlen(b);
    char *text = malloc(la + lb + 1);
    if (!text) return AGPT_FAIL(AGPT_ERR_OOM, "train_tokenize: no memory");
    memcpy(text, a, la), memcpy(text + la, b, lb + 1);
    int need = 0;
    Status s = AGPT_OK;
    for (;;) {
        s = sp_encode(tok, text, out->ids + out->n, *cap - out->n, &need);
        if (s == AGPT_OK) break;
        if (need <= *cap - out->n) break;  // a real error, not a short buffer
        int grown = out->n + need + 64;
        int32_t *ids = realloc(out->ids, (size_t)grown * sizeof(int32_t));
        if (ids) out->ids = ids;
        int32_t *tg = ids ? realloc(out->targets, (size_t)grown * sizeof(int32_t)) : NULL;
        if (tg) out->targets = tg;
        if (!ids || !tg) {
            s = AGPT_FAIL(AGPT_ERR_OOM, "train_tokenize: no memory for %d tokens", grown);
            break;
        }
        *cap = grown;
        agpt_clear_error();
    }
    free(text);
    if (s != AGPT_OK) return s;
    for (int i = 0; i < need; i++) out->targets[out->n + i] = supervised ? out->ids[out->n + i] : TRAIN_IGNORE;
    out->n += need;
    return AGPT_OK;
}

Status train_tokenize(const SpTokenizer *tok, const char *question, const char *answer, int max_len, TrainTokens *out) {
    AGPT_CHECK_ARG(tok && question && answer && out && max_len > 0, "train_tokenize: bad arguments");
    memset(out, 0, sizeof *out);
    int cap = 256;
    out->ids = malloc((size_t)cap * sizeof(int32_t));
    out->targets = malloc((size_t)cap * sizeof(int32_t));
    if (!out->ids || !out->targets) {
        train_tokens_free(out);
        return AGPT_FAIL(AGPT_ERR_OOM, "train_tokenize: no memory");
    }
    Status s = append_piece(tok, question, CONV_ASSISTANT, 0, out, &cap);
    if (s == AGPT_OK) s = append_piece(tok, answer, "\n###", 1, out, &cap);
    if (s != AGPT_OK) {
        train_tokens_free(out);
        return s;
    }
    if (out->n > max_len) out->n = max_len;
    return AGPT_OK;
}
