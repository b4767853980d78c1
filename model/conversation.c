#include "model/conversation.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *class_names[] = {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                                    "metal nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                                    "zipper", "object", "candle", "cashew", "chewinggum", "fryum", "macaroni",
                                    "pcb", "pipe fryum"};

const char *conversation_class_name(const char *prompt_text) {
    for (size_t i = 0; i < sizeof class_names / sizeof class_names[0]; i++)
        if (prompt_text && strstr(prompt_text, class_names[i])) return class_names[i];
    return "object";
}

// Appends text to a growing buffer; returns 0 on failure (no memory).
static int append(char **buf, size_t *len, size_t *cap, const char *text) {
    size_t n = strlen(text);
    if (*len + n + 1 > *cap) {
        size_t grown = (*len + n + 1) * 2;
        char *p = realloc(*buf, grown);
        if (!p) return 0;
        *buf = p, *cap = grown;
    }
    memcpy(*buf + *len, text, n + 1);
    *len += n;
    return 1;
}

char *conversation_prompt_text(const ConversationTurn *history, int n_history, const char *input) {
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int ok = append(&buf, &len, &cap, "");
    for (int i = 0; ok && i < n_history; i++) {
        if (i > 0) ok = append(&buf, &len, &cap, " Human: ");
        ok = ok && append(&buf, &len, &cap, history[i].question ? history[i].question : "");
        ok = ok && append(&buf, &len, &cap, "\n### Assistant: ");
        ok = ok && append(&buf, &len, &cap, history[i].answer ? history[i].answer : "");
        ok = ok && append(&buf, &len, &cap, "\n###");
    }
    if (ok && n_history > 0) ok = append(&buf, &len, &cap, " Human: ");
    ok = ok && append(&buf, &len, &cap, input ? input : "");
    if (!ok) {
        free(buf);
        AGPT_FAIL(AGPT_ERR_OOM, "no memory for a prompt of %zu bytes", len);
        return NULL;
    }
    return buf;
}
