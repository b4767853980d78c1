// The reference's class-name choice from the prompt text and its multi-turn prompt text.
#include <string.h>

#include "model/conversation.h"
#include "test.h"

int main(void) {
    // The consequences the reference page lists for the MVTec/VisA test prompts (2.3).
    struct { const char *text, *want; } cases[] = {
        {"This is a photo of a bottle for anomaly detection. Is there any anomaly in the image?", "bottle"},
        {"This is a photo of 4 capsules for anomaly detection", "capsule"},
        {"This is a photo of a macaroni1 sample", "macaroni"},
        {"a pcb3 board", "pcb"},
        {"a pipe fryum on a belt", "fryum"},          // 'fryum' comes before 'pipe fryum' in the list
        {"This is a photo of a chewinggom", "object"}, // the reference prompt's typo misses 'chewinggum'
        {"a metal nut, and a screw", "metal nut"},     // list order, not text order
        {"Is there any anomaly?", "object"},
        {"", "object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *got = conversation_class_name(cases[i].text);
        CHECK(strcmp(got, cases[i].want) == 0, "class of '%s' is '%s', want '%s'", cases[i].text, got, cases[i].want);
    }
    CHECK(strcmp(conversation_class_name(NULL), "object") == 0, "NULL text");

    char *p = conversation_prompt_text(NULL, 0, "Is there any anomaly in the image?");
    CHECK(p && strcmp(p, "Is there any anomaly in the image?") == 0, "first turn: %s", p ? p : "(null)");
    free(p);
    ConversationTurn h[2] = {{"Is there any anomaly in the image?", "Yes, there is an anomaly in the image."},
                             {"Where is it?", "At the top left of the image."}};
    p = conversation_prompt_text(h, 2, "Why?");
    const char *want = "Is there any anomaly in the image?\n### Assistant: Yes, there is an anomaly in the image.\n###"
                       " Human: Where is it?\n### Assistant: At the top left of the image.\n### Human: Why?";
    CHECK(p && strcmp(p, want) == 0, "third turn:\n%s\nwant:\n%s", p ? p : "(null)", want);
    free(p);
    return test_summary();
}
