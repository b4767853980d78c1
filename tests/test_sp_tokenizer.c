// The SentencePiece BPE tokenizer (model/sp_tokenizer.c) against the real sentencepiece library: every case of
// tests/data/sp_tokenizer_ids.txt (made by tests/reference/make_sp_tokenizer_goldens.py) must encode / decode
// exactly; the token table of the reference's section 5.3 is hard-coded here as well. Plus decode(encode(s)) == s,
// argument errors, speed on long text, and broken model files (truncated, flipped bytes, PNG, empty, unigram,
// charsmap normalizer): an error or a working tokenizer, never a crash (run it under ASan).
// Usage: test_sp_tokenizer [path/to/llama-tokenizer.model]; the default is ../shared/data.
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the model file is absent.
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/sp_tokenizer.h"
#include "runtime/timer.h"
#include "tests/test.h"
#include "tests/test_util.h"

// Hex text -> bytes (NUL-terminated); returns the length or -1.
static long unhex(const char *s, size_t n, char *out) {
    if (n % 2) return -1;
    for (size_t i = 0; i < n; i += 2) {
        unsigned v;
        if (sscanf(s + i, "%2x", &v) != 1) return -1;
        out[i / 2] = (char)v;
    }
    out[n / 2] = 0;
    return (long)(n / 2);
}

static int parse_ids(const char *s, const char *end, int32_t *ids, int cap) {
    int n = 0;
    while (s < end && n < cap) {
        char *e;
        long v = strtol(s, &e, 10);
        if (e == s) break;
        ids[n++] = (int32_t)v;
        s = e;
    }
    return n;
}

static bool valid_utf8(const char *s) {
    const uint8_t *p = (const uint8_t *)s;
    while (*p) {
        uint32_t c = *p;
        uint32_t n = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : 9;
        if (n == 9) return false;
        uint32_t cp = n == 0 ? c : n == 1 ? c & 0x1f : n == 2 ? c & 0x0f : c & 0x07;
        for (uint32_t i = 1; i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (p[i] & 0x3f);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp < 0xe000))
            return false;
        p += n + 1;
    }
    return true;
}

static void print_ids(const char *label, const int32_t *ids, int n) {
    printf("    %s (%d):", label, n);
    for (int i = 0; i < n && i < 40; i++) printf(" %d", ids[i]);
    printf(n > 40 ? " ...\n" : "\n");
}

// encode(text) must equal want[0..n_want).
static bool encode_is(const SpTokenizer *t, const char *text, const int32_t *want, int n_want) {
    int32_t ids[256];
    int n = 0;
    if (sp_encode(t, text, ids, 256, &n) != AGPT_OK) {
        printf("    encode failed: %s\n", agpt_last_error());
        return false;
    }
    if (n == n_want && memcmp(ids, want, (size_t)n * sizeof *ids) == 0) return true;
    printf("    text \"%s\"\n", text);
    print_ids("got ", ids, n);
    print_ids("want", want, n_want);
    return false;
}

// Section 5.3 of the reference, verbatim.
static void test_reference_table(const SpTokenizer *t) {
    static const int32_t human[] = {835, 12968, 29901, 529, 25518, 29958};
    static const int32_t img_end[] = {1533, 25518, 29958, 29871};
    static const int32_t assistant[] = {29871, 13, 2277, 29937, 4007, 22137, 29901};
    static const int32_t no[] = {1939, 29892, 727, 338, 694, 29342, 14997, 297, 278, 1967, 29889, 13, 2277, 29937};
    static const int32_t yes[] = {3869, 29892, 727, 338, 385, 29342, 14997, 297, 278, 1967, 29892,
                                  472,  278,   2246, 2175, 310, 278, 1967, 29889, 13,  2277, 29937};
    static const int32_t bottle[] = {910,   338,   263,   15373, 310,   263,  18046, 280,   363,   29342,
                                     14997, 15326, 29892, 607,   881,   367,  4513,  29892, 1728,  738,
                                     18658, 29892, 285,   10653, 29892, 23503, 29892, 22728, 29892, 16188,
                                     470,   9391,  760,   29889, 1317,  727,  738,   29342, 14997, 297,
                                     278,   1967,  29973, 13,    2277,  29937, 4007, 22137, 29901};
    CHECK(encode_is(t, "### Human: <Img>", human, 6), "PROMPT_START");
    CHECK(encode_is(t, "</Img> ", img_end, 4), "'</Img> '");
    CHECK(encode_is(t, "\n### Assistant:", assistant, 7), "'\\n### Assistant:'");
    CHECK(encode_is(t, "No, there is no anomaly in the image.\n###", no, 14), "normal answer");
    CHECK(encode_is(t, "Yes, there is an anomaly in the image, at the top left of the image.\n###", yes, 22),
          "anomaly answer");
    CHECK(encode_is(t,
                    "This is a photo of a bottle for anomaly detection, which should be round, without any damage, "
                    "flaw, defect, scratch, hole or broken part. Is there any anomaly in the image?\n### Assistant:",
                    bottle, 49),
          "MVTec bottle prompt (49 tokens)");
    // The suffix inside a longer text: "? <0x0A> ## # ▁Ass istant :".
    int32_t ids[64];
    int n = 0;
    CHECK_OK(sp_encode(t, "Is there any anomaly in the image?\n### Assistant:", ids, 64, &n));
    static const int32_t suffix[] = {29973, 13, 2277, 29937, 4007, 22137, 29901};
    CHECK(n >= 7 && memcmp(ids + n - 7, suffix, sizeof suffix) == 0, "suffix ids inside a longer text");
    CHECK(strcmp(sp_piece(t, 4007), "\xe2\x96\x81" "Ass") == 0 && strcmp(sp_piece(t, 13), "<0x0A>") == 0 &&
              strcmp(sp_piece(t, 29871), "\xe2\x96\x81") == 0 && strcmp(sp_piece(t, 25518), "Img") == 0,
          "pieces of section 5.3");
}

typedef struct GoldenStats {
    int n_enc, bad_enc, n_dec, bad_dec;
    double t_enc;
} GoldenStats;

static void print_section(const char *name, const GoldenStats *g) {
    printf("  %-26s %4d encodes (%5.1f ms) %d mismatched; %3d decodes, %d mismatched\n", name, g->n_enc,
           g->t_enc * 1e3, g->bad_enc, g->n_dec, g->bad_dec);
}

// The golden file: LLaMA's model first, then "M" sections for variants of it (bytes appended to the model file).
static void test_goldens(const SpTokenizer *base, const uint8_t *model, size_t model_len, const char *path) {
    size_t len = 0;
    char *data = (char *)test_read_file(path, &len);
    CHECK(data != NULL, "golden file %s is missing (make it with tests/reference/make_sp_tokenizer_goldens.py)",
          path);
    if (!data) return;
    data = realloc(data, len + 1);
    data[len] = 0;
    enum { CAP = 1 << 16 };
    int32_t *want = malloc(CAP * sizeof *want), *got = malloc(CAP * sizeof *got);
    char *text = malloc(len + 1);
    uint8_t *variant_model = malloc(model_len + len);
    const SpTokenizer *t = base;
    SpTokenizer *variant = NULL;
    char section[64] = "llama";
    GoldenStats g = {0}, all = {0}, first = {0};
    int n_rt = 0, bad_rt = 0, bad_lines = 0, n_sections = 0, bad_variants = 0;
    for (char *line = data, *next; line && *line; line = next) {
        char *eol = strchr(line, '\n');
        next = eol ? eol + 1 : NULL;
        if (eol) *eol = 0;
        if (line[0] == '#' || line[0] == 0) continue;
        char *f1 = strchr(line, '\t'), *f2 = f1 ? strchr(f1 + 1, '\t') : NULL;
        if (!f1 || !f2 || (line[0] != 'E' && line[0] != 'D' && line[0] != 'M')) {
            bad_lines++;
            continue;
        }
        if (line[0] == 'M') {  // a new section: the model with these bytes appended
            print_section(section, &g);
            if (n_sections++ == 0) first = g;
            g = (GoldenStats){0};
            snprintf(section, sizeof section, "%s", f2 + 1);
            long sl = unhex(f1 + 1, (size_t)(f2 - f1 - 1), text);
            sp_free(variant);
            variant = NULL;
            t = NULL;
            if (sl < 0) {
                bad_lines++;
                continue;
            }
            memcpy(variant_model, model, model_len);
            memcpy(variant_model + model_len, text, (size_t)sl);
            Status st = sp_load_memory(variant_model, model_len + (size_t)sl, &variant);
            if (st != AGPT_OK) {
                bad_variants++;
                printf("  variant %s does not load: %s\n", section, agpt_last_error());
            }
            t = variant;
            continue;
        }
        if (!t) continue;  // a variant that failed to load (counted above)
        if (line[0] == 'E') {
            long tl = unhex(f1 + 1, (size_t)(f2 - f1 - 1), text);
            int nw = parse_ids(f2 + 1, f2 + 1 + strlen(f2 + 1), want, CAP);
            if (tl < 0) {
                bad_lines++;
                continue;
            }
            g.n_enc++;
            int n = 0;
            double t0 = timer_now_s();
            Status st = sp_encode(t, text, got, CAP, &n);
            g.t_enc += timer_now_s() - t0;
            if (st != AGPT_OK || n != nw || memcmp(got, want, (size_t)n * sizeof *got) != 0) {
                if (++all.bad_enc <= 5) {
                    printf("  %s: encode mismatch for hex %.*s%s\n", section,
                           (int)(f2 - f1 - 1 > 120 ? 120 : f2 - f1 - 1), f1 + 1, f2 - f1 - 1 > 120 ? "..." : "");
                    print_ids("got ", got, n);
                    print_ids("want", want, nw);
                }
                g.bad_enc++;
                continue;
            }
            // decode(encode(s)) == s for valid UTF-8 that does not itself spell U+2581 (which decodes to ' '),
            // with LLaMA's own options (the variants drop spaces or prefixes on purpose).
            if (t == base && valid_utf8(text) && !strstr(text, "\xe2\x96\x81")) {
                n_rt++;
                char *back = NULL;
                if (sp_decode(t, got, n, &back) != AGPT_OK || strcmp(back, text) != 0) {
                    if (++bad_rt <= 5)
                        printf("  round trip differs for \"%s\": \"%s\"\n", text, back ? back : "(error)");
                }
                free(back);
            }
        } else {
            int ni = parse_ids(f1 + 1, f2, want, CAP);
            long tl = unhex(f2 + 1, strlen(f2 + 1), text);
            if (tl < 0) {
                bad_lines++;
                continue;
            }
            g.n_dec++;
            char *out = NULL;
            if (sp_decode(t, want, ni, &out) != AGPT_OK || strcmp(out, text) != 0) {
                if (++all.bad_dec <= 5) {
                    printf("  %s: decode mismatch: \"%s\" want \"%s\"\n", section, out ? out : agpt_last_error(),
                           text);
                    print_ids("ids", want, ni);
                }
                g.bad_dec++;
            }
            free(out);
        }
    }
    print_section(section, &g);
    if (n_sections == 0) first = g;
    printf("  %d round trips decode(encode(s)) == s, %d differ\n", n_rt, bad_rt);
    CHECK(bad_lines == 0, "%d malformed lines in %s", bad_lines, path);
    CHECK(first.n_enc >= 2000 && first.n_dec >= 100, "too few golden cases for LLaMA's model: %d encodes, %d decodes",
          first.n_enc, first.n_dec);
    CHECK(n_sections >= 5 && bad_variants == 0, "%d of %d model variants failed to load", bad_variants, n_sections);
    CHECK(all.bad_enc == 0, "%d golden encodes differ from sentencepiece", all.bad_enc);
    CHECK(all.bad_dec == 0, "%d golden decodes differ from sentencepiece", all.bad_dec);
    CHECK(n_rt > 1000 && bad_rt == 0, "%d of %d round trips differ", bad_rt, n_rt);
    sp_free(variant);
    free(variant_model);
    free(want);
    free(got);
    free(text);
    free(data);
}

static void test_api(const SpTokenizer *t, const uint8_t *model, size_t model_len) {
    CHECK(sp_vocab_size(t) == 32000, "vocab %d, want 32000", sp_vocab_size(t));
    CHECK(sp_bos_id(t) == 1 && sp_eos_id(t) == 2 && sp_unk_id(t) == 0, "bos %d eos %d unk %d, want 1 2 0",
          sp_bos_id(t), sp_eos_id(t), sp_unk_id(t));
    CHECK(sp_piece(t, -1) == NULL && sp_piece(t, 32000) == NULL && strcmp(sp_piece(t, 1), "<s>") == 0,
          "sp_piece range");
    CHECK(sp_piece_to_id(t, "<0x0A>") == 13 && sp_piece_to_id(t, "\xe2\x96\x81") == 29871 &&
              sp_piece_to_id(t, "no such piece") == -1,
          "sp_piece_to_id");

    // Too small a buffer: an error that says how many ids are needed.
    int32_t ids[8];
    int n = -1;
    agpt_clear_error();
    Status st = sp_encode(t, "### Human: <Img>", ids, 3, &n);
    CHECK(st == AGPT_ERR_ARG && n == 6 && strstr(agpt_last_error(), "6"), "cap too small: status %s, n %d, '%s'",
          agpt_status_name(st), n, agpt_last_error());
    CHECK_OK(sp_encode(t, "", ids, 0, &n));
    CHECK(n == 0, "empty text gives %d ids", n);
    CHECK_ERR(sp_encode(t, NULL, ids, 8, &n));

    // Decode: out-of-range ids are errors; BOS/EOS vanish; <unk> shows as " ⁇ ".
    char *s = NULL;
    int32_t bad[] = {263, 32000};
    CHECK_ERR(sp_decode(t, bad, 2, &s));
    int32_t neg[] = {-1};
    CHECK_ERR(sp_decode(t, neg, 1, &s));
    int32_t mixed[] = {1, 15043, 3186, 2};  // <s> ▁Hello ▁world </s>
    CHECK_OK(sp_decode(t, mixed, 4, &s));
    CHECK(s && strcmp(s, "Hello world") == 0, "decode <s> Hello world </s> = \"%s\"", s ? s : "");
    free(s);
    s = NULL;
    CHECK_OK(sp_decode(t, NULL, 0, &s));
    CHECK(s && s[0] == 0, "decode of no ids is \"\"");
    free(s);

    // Invalid UTF-8: each malformed byte is U+FFFD (id 30140 "\ufffd" alone, merged pieces in runs).
    CHECK_OK(sp_encode(t, "a\xff", ids, 8, &n));
    CHECK(n == 2 && ids[0] == 263 && strcmp(sp_piece(t, ids[1]), "\xef\xbf\xbd") == 0, "\"a\\xff\" -> ▁a U+FFFD");

    // Loading from memory gives the same tokenizer.
    SpTokenizer *m = NULL;
    CHECK_OK(sp_load_memory(model, model_len, &m));
    if (m) {
        int32_t a[64], b[64];
        int na = 0, nb = 0;
        const char *txt = "Loading from memory: café 日本語 😀";
        sp_encode(t, txt, a, 64, &na);
        sp_encode(m, txt, b, 64, &nb);
        CHECK(na == nb && na > 0 && memcmp(a, b, (size_t)na * sizeof *a) == 0, "memory load encodes differently");
        sp_free(m);
    }
    CHECK_ERR(sp_load_file("/nonexistent/llama-tokenizer.model", &m));
    CHECK(m == NULL, "failed load leaves *out NULL");
}

// Long inputs stay fast: the merge loop is a heap, not a rescan per merge.
static void test_speed(const SpTokenizer *t) {
    size_t len = 1 << 20;
    char *text = malloc(len + 1);
    uint32_t x = 12345;
    for (size_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        text[i] = (x >> 16) % 7 == 0 ? ' ' : (char)('a' + (x >> 16) % 26);
    }
    text[len] = 0;
    int cap = (int)len + 8, n = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    double t0 = timer_now_s();
    CHECK_OK(sp_encode(t, text, ids, cap, &n));
    double dt = timer_now_s() - t0;
    memset(text, 'a', len);  // one 1 MB word: the worst case for a quadratic merge loop
    double t1 = timer_now_s();
    int n2 = 0;
    CHECK_OK(sp_encode(t, text, ids, cap, &n2));
    double dt2 = timer_now_s() - t1;
    printf("  1 MiB of words: %d ids in %.0f ms; 1 MiB of 'a': %d ids in %.0f ms\n", n, dt * 1e3, n2, dt2 * 1e3);
    CHECK(dt < 10 && dt2 < 10, "encoding 1 MiB took %.1f s / %.1f s (quadratic?)", dt, dt2);
    free(text);
    free(ids);
}

// A loaded broken model must still work without crashing.
static void exercise(const SpTokenizer *t) {
    int32_t ids[256];
    int n = 0;
    if (sp_encode(t, "Is there any anomaly in the image? café \xff 日本", ids, 256, &n) == AGPT_OK) {
        char *s = NULL;
        if (sp_decode(t, ids, n, &s) == AGPT_OK) free(s);
    }
}

static void test_bad_models(const uint8_t *model, size_t len) {
    // Truncations: every length up to 4 KB, then a stride through the file.
    int ok = 0, err = 0, silent = 0;
    for (size_t cut = 0; cut < len; cut += cut < 4096 ? 1 : 997) {
        SpTokenizer *t = NULL;
        agpt_clear_error();
        Status st = sp_load_memory(model, cut, &t);
        if (st == AGPT_OK) {
            ok++;
            exercise(t);
            sp_free(t);
        } else {
            err++;
            if (!agpt_last_error()[0] || t) silent++;
        }
    }
    printf("  truncated models: %d refused, %d loaded\n", err, ok);
    CHECK(err > 0 && silent == 0, "truncations: %d errors without a message", silent);

    // Random byte flips.
    uint8_t *copy = malloc(len);
    uint32_t x = 777;
    ok = err = silent = 0;
    for (int trial = 0; trial < 400; trial++) {
        memcpy(copy, model, len);
        int flips = 1 + trial % 8;
        for (int k = 0; k < flips; k++) {
            x = x * 1664525u + 1013904223u;
            size_t at = trial % 2 ? (x >> 8) % 2048 : (x >> 4) % len;  // half of them in the header area
            x = x * 1664525u + 1013904223u;
            copy[at] ^= (uint8_t)(1 + (x >> 24) % 255);
        }
        SpTokenizer *t = NULL;
        agpt_clear_error();
        if (sp_load_memory(copy, len, &t) == AGPT_OK) {
            ok++;
            exercise(t);
            sp_free(t);
        } else {
            err++;
            if (!agpt_last_error()[0]) silent++;
        }
    }
    printf("  byte-flipped models: %d refused, %d loaded\n", err, ok);
    CHECK(silent == 0, "byte flips: %d errors without a message", silent);
    free(copy);

    // Not a model: PNG, empty, text, zeros, a huge length prefix.
    static const uint8_t png[] = {0x89, 'P',  'N',  'G',  0x0d, 0x0a, 0x1a, 0x0a, 0,    0,    0,    13,   'I',
                                  'H',  'D',  'R',  0,    0,    0,    1,    0,    0,    0,    1,    8,    2,
                                  0,    0,    0,    0x90, 0x77, 0x53, 0xde, 0,    0,    0,    0,    'I',  'E',
                                  'N',  'D',  0xae, 0x42, 0x60, 0x82};
    SpTokenizer *t = NULL;
    CHECK_ERR(sp_load_memory(png, sizeof png, &t));
    CHECK_ERR(sp_load_memory("", 0, &t));
    CHECK_ERR(sp_load_memory("hello world, not a model\n", 25, &t));
    static const uint8_t zeros[64] = {0};
    CHECK_ERR(sp_load_memory(zeros, sizeof zeros, &t));
    static const uint8_t huge_len[] = {0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 'a'};
    CHECK_ERR(sp_load_memory(huge_len, sizeof huge_len, &t));
    static const uint8_t long_varint[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    CHECK_ERR(sp_load_memory(long_varint, sizeof long_varint, &t));
    CHECK(t == NULL, "failed loads leave *out NULL");

    // A unigram model, and a normalizer with a charsmap (nmt_nfkc): a repeated embedded message merges into the
    // first, so appending trainer_spec{model_type: UNIGRAM} / normalizer_spec{precompiled_charsmap: "A"} makes them.
    uint8_t *mod = malloc(len + 16);
    memcpy(mod, model, len);
    memcpy(mod + len, "\x12\x02\x18\x01", 4);
    agpt_clear_error();
    Status st = sp_load_memory(mod, len + 4, &t);
    CHECK(st == AGPT_ERR_UNSUPPORTED && strstr(agpt_last_error(), "unigram"), "unigram model: %s '%s'",
          agpt_status_name(st), agpt_last_error());
    memcpy(mod + len, "\x1a\x03\x12\x01" "A", 5);
    agpt_clear_error();
    st = sp_load_memory(mod, len + 5, &t);
    CHECK(st == AGPT_ERR_UNSUPPORTED && strstr(agpt_last_error(), "charsmap"), "charsmap normalizer: %s '%s'",
          agpt_status_name(st), agpt_last_error());
    // Byte pieces while byte_fallback is false (trainer_spec field 35), and a piece defined twice ("Img" is 25518):
    // sentencepiece refuses both.
    memcpy(mod + len, "\x12\x03\x98\x02\x00", 5);
    CHECK_ERR(sp_load_memory(mod, len + 5, &t));
    memcpy(mod + len, "\x0a\x07\x0a\x03Img\x18\x01", 9);
    CHECK_ERR(sp_load_memory(mod, len + 9, &t));
    // The same model with its own specs re-stated is still fine (merging keeps the other fields).
    memcpy(mod + len, "\x12\x02\x18\x02", 4);
    CHECK_OK(sp_load_memory(mod, len + 4, &t));
    sp_free(t);
    t = NULL;
    free(mod);

    // From files: empty, PNG.
    char path[] = "/tmp/test_sp_tokenizer_XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) {
        close(fd);
        CHECK(test_write_file(path, "", 0) == 0, "write %s", path);
        CHECK_ERR(sp_load_file(path, &t));
        CHECK(test_write_file(path, png, sizeof png) == 0, "write %s", path);
        CHECK_ERR(sp_load_file(path, &t));
        unlink(path);
    }
}

int main(int argc, char **argv) {
    const char *model_path = argc > 1 ? argv[1] : AGPT_SHARED_DATA "/llama-tokenizer.model";
    size_t len = 0;
    uint8_t *model = test_read_file(model_path, &len);
    if (!model) {
        printf("skipped: %s not found\n", model_path);
        return TEST_SKIP;
    }
    SpTokenizer *t = NULL;
    double t0 = timer_now_s();
    CHECK_OK(sp_load_file(model_path, &t));
    printf("  loaded %s in %.1f ms\n", model_path, (timer_now_s() - t0) * 1e3);
    if (t) {
        test_reference_table(t);
        test_goldens(t, model, len, AGPT_TEST_DATA "/sp_tokenizer_ids.txt");
        test_api(t, model, len);
        test_speed(t);
    }
    test_bad_models(model, len);
    sp_free(t);
    free(model);
    return test_summary();
}
