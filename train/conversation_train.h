// The training conversations of the anomaly datasets (anomalygpt-reference.md 6.3 and 5.4; mvtec.py, visa.py,
// openllama.py::build_one_instance): the question, the templated answer with the position words, and the token
// ids with their loss targets. model/conversation.h holds the inference side (prompt text, class choice).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "model/sp_tokenizer.h"
#include "runtime/status.h"

#define TRAIN_MAX_TGT_LEN 1024  // max_tgt_len: the text part is cut to this many tokens (the 30-slot prefix not counted)
#define TRAIN_IGNORE -100       // the target of a token without loss
#define TRAIN_QUESTION " Is there any anomaly in the image?"
#define TRAIN_ANSWER_NORMAL "No, there is no anomaly in the image."

// The position of a region centre (row, col) in a side x side image (224 in the reference): row thirds give
// top / (middle) / bottom, column thirds left / center / right, each third including its upper boundary
// (c / side <= 1/3, <= 2/3). One of "top left", "top", "top right", "left", "center", "right", "bottom left",
// "bottom", "bottom right".
const char *train_position_word(double center_row, double center_col, int side);

// The human turn: description + TRAIN_QUESTION, into buf (cap bytes).
Status train_question_text(const char *description, char *buf, size_t cap);
#define TRAIN_MAX_REGIONS 16  // centres an answer names positions for (a real mask may have more regions)

// The gpt turn for n_regions centres (0: the normal answer; 1 or 2: the "Yes, ..." templates of 6.3, where two
// equal positions are named once). More regions (real masks in supervised training) extend the two-region
// template: "Yes, there are N anomalies in the image, they are at the A, B and C of the image.", each position
// once, in the order first met, of the first min(n, TRAIN_MAX_REGIONS) centres. centers [n][2] are (row, col).
Status train_answer_text(int n_regions, const double (*centers)[2], int side, char *buf, size_t cap);

// Token ids and loss targets of one two-turn conversation, the text part of the LLM input:
//   tok(question + "\n### Assistant:") with targets TRAIN_IGNORE, then tok(answer + "\n###") with targets = ids,
// each piece tokenised on its own (its own dummy prefix), cut to max_len tokens.
typedef struct TrainTokens {
    int32_t *ids;      // [n]
    int32_t *targets;  // [n]: the id where the loss applies, TRAIN_IGNORE elsewhere
    int n;
} TrainTokens;
Status train_tokenize(const SpTokenizer *tok, const char *question, const char *answer, int max_len, TrainTokens *out);
void train_tokens_free(TrainTokens *t);
