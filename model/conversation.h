// The text side of an AnomalyGPT conversation (anomalygpt-reference.md 2.3, 5.4-5.6): which class name a prompt
// selects for the zero-shot map, the multi-turn prompt text, and the fixed prompt pieces around the image.
#pragma once
#include <stddef.h>

#include "runtime/status.h"

// The fixed pieces of the LLM input, each tokenised on its own (5.4).
#define CONV_PROMPT_START "### Human: <Img>"
#define CONV_IMAGE_END "</Img> "
#define CONV_ASSISTANT "\n### Assistant:"
#define CONV_STOP_TOKEN 2277  // "##": generation stops once it has appeared (5.6)

// The class name the reference's inference picks from the whole prompt text: the first of its 23 CLASS_NAMES (the
// 15 MVTec names, then object, candle, cashew, chewinggum, fryum, macaroni, pcb, pipe fryum), in that order,
// that is a substring of the text; 'object' when none is. So "capsules" selects "capsule" and "pipe fryum"
// selects "fryum".
const char *conversation_class_name(const char *prompt_text);

// A turn of the history: what the user asked and what the model answered.
typedef struct ConversationTurn {
    const char *question;
    const char *answer;
} ConversationTurn;

// The prompt text of the reference's predict() (5.5), without the trailing "\n### Assistant:":
//   history turn i: (i == 0 ? q : " Human: " + q) + "\n### Assistant: " + a + "\n###"
//   then the new input: input, or " Human: " + input after a history.
// Returns a malloc'd string (caller frees) or NULL with an error recorded.
char *conversation_prompt_text(const ConversationTurn *history, int n_history, const char *input);
