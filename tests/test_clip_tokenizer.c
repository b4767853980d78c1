// The CLIP BPE tokenizer (model/clip_tokenizer.c) against ImageBind's SimpleTokenizer: every string of
// tests/data/clip_tokenizer_ids.txt (made by tests/reference/make_clip_tokenizer_goldens.py) must give exactly its
// ids; plus loading from memory, corrupt merges files, invalid UTF-8, truncation and a long input.
// Usage: test_clip_tokenizer [path/to/clip-bpe-simple-vocab-16e6.txt.gz]; the default is ../shared/data.
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the merges file or the golden file is absent.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "model/clip_tokenizer.h"
#include "runtime/timer.h"
#include "tests/test.h"
#include "tests/test_util.h"

// One gzip member of `n` bytes appended to out (capacity checked by the caller: n + 1024 is plenty).
static size_t gzip_member(const uint8_t *src, size_t n, uint8_t *out) {
    z_stream z = {0};
    if (deflateInit2(&z, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) return 0;
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)(n + 1024);
    int rc = deflate(&z, Z_FINISH);
    size_t len = rc == Z_STREAM_END ? z.total_out : 0;
    deflateEnd(&z);
    return len;
}

// The golden file's text field: '\\' and \xHH escapes.
static size_t unescape(const char *s, char *out) {
    size_t n = 0;
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] == '\\') {
            out[n++] = '\\';
            s++;
        } else if (s[0] == '\\' && s[1] == 'x' && s[2] && s[3]) {
            char hex[3] = {s[2], s[3], 0};
            out[n++] = (char)strtol(hex, NULL, 16);
            s += 3;
        } else {
            out[n++] = *s;
        }
    }
    out[n] = 0;
    return n;
}

static void print_ids(const char *label, const int32_t *ids, int n) {
    printf("    %s (%d):", label, n);
    for (int i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");
}

// Every golden string; returns how many were checked.
static int check_goldens(const ClipTokenizer *tok, FILE *f) {
    static char line[1 << 16], text[1 << 16];
    int checked = 0, mismatched = 0, worst_len = 0;
    double t0 = timer_now_s();
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        if (len && line[len - 1] == '\n') line[--len] = 0;
        if (line[0] == '#' || len == 0) continue;
        char *tab = strchr(line, '\t');
        if (!tab) {
            CHECK(0, "golden line without a tab: %.60s", line);
            continue;
        }
        *tab = 0;
        unescape(tab + 1, text);
        int32_t want[CLIP_CONTEXT_LENGTH] = {0};
        int n_want = 0, want_trunc = 0;
        char *p = line, *end;
        want_trunc = (int)strtol(p, &end, 10);
        for (p = end; n_want < CLIP_CONTEXT_LENGTH; p = end) {
            long v = strtol(p, &end, 10);
            if (end == p) break;
            want[n_want++] = (int32_t)v;
        }
        ClipTokens got;
        Status st = clip_tokenize_ex(tok, text, &got);
        bool same = st == AGPT_OK && got.n_tokens == n_want && got.truncated == (want_trunc != 0) &&
                    memcmp(got.ids, want, sizeof want) == 0;  // the zero padding too
        if (!same && ++mismatched <= 8) {
            printf("  mismatch on \"%s\" (%s)\n", tab + 1, st == AGPT_OK ? "ok" : agpt_last_error());
            print_ids("want", want, n_want);
            print_ids("got ", got.ids, got.n_tokens);
            printf("    truncated want %d got %d\n", want_trunc, (int)got.truncated);
        }
        if ((int)strlen(text) > worst_len) worst_len = (int)strlen(text);
        checked++;
    }
    printf("  %d golden strings (longest %d bytes) in %.1f ms, %d mismatched\n", checked, worst_len,
           (timer_now_s() - t0) * 1e3, mismatched);
    CHECK(mismatched == 0, "%d of %d golden strings tokenize differently from ImageBind's SimpleTokenizer",
          mismatched, checked);
    CHECK(checked >= 2000, "only %d golden strings", checked);
    return checked;
}

static bool same_tokens(const ClipTokenizer *a, const ClipTokenizer *b, const char *text) {
    ClipTokens x, y;
    return clip_tokenize_ex(a, text, &x) == AGPT_OK && clip_tokenize_ex(b, text, &y) == AGPT_OK &&
           memcmp(&x, &y, sizeof x) == 0;
}

static void check_basics(const ClipTokenizer *tok) {
    static const int32_t bottle[] = {49406, 320, 1125, 539, 320, 5392, 269, 49407};
    int32_t ids[CLIP_CONTEXT_LENGTH];
    int n = -1;
    CHECK_OK(clip_tokenize(tok, "a photo of a bottle.", ids, &n));
    bool zeros = true;
    for (int i = 8; i < CLIP_CONTEXT_LENGTH; i++) zeros &= ids[i] == 0;
    CHECK(n == 8 && memcmp(ids, bottle, sizeof bottle) == 0 && zeros,
          "\"a photo of a bottle.\" -> [49406, 320, 1125, 539, 320, 5392, 269, 49407] + zeros (got n = %d)", n);

    // 75 text tokens still fit with EOT; 76 push it out (ImageBind cuts after appending EOT).
    char text[1024] = "";
    for (int i = 0; i < 75; i++) strcat(text, "a ");
    ClipTokens t;
    CHECK_OK(clip_tokenize_ex(tok, text, &t));
    CHECK(t.n_tokens == 77 && !t.truncated && t.ids[76] == CLIP_EOT_ID, "75 words: 77 ids ending in EOT, not cut");
    strcat(text, "a");
    CHECK_OK(clip_tokenize_ex(tok, text, &t));
    CHECK(t.n_tokens == 77 && t.truncated && t.ids[76] == 320, "76 words: cut, last id a text token (got %d)",
          t.ids[76]);

    CHECK_OK(clip_tokenize_ex(tok, "", &t));
    CHECK(t.n_tokens == 2 && t.ids[0] == CLIP_SOT_ID && t.ids[1] == CLIP_EOT_ID && t.ids[2] == 0,
          "empty text -> [SOT, EOT]");

    // Invalid UTF-8 is decoded with U+FFFD replacements, like errors="replace": never a crash.
    ClipTokens u;
    CHECK_OK(clip_tokenize_ex(tok, "a\xff\xc3(\xed\xa0\x80z", &t));
    CHECK_OK(clip_tokenize_ex(tok, "a\xef\xbf\xbd\xef\xbf\xbd(\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdz", &u));
    CHECK(memcmp(&t, &u, sizeof t) == 0, "invalid UTF-8 tokenizes as its U+FFFD replacement");

    char *clean = NULL;
    CHECK_OK(clip_clean_text("  &amp;amp; CAF\xc3\x89\tE\xcc\x81  ", &clean));
    CHECK(clean && strcmp(clean, "& caf\xc3\xa9 \xc3\xa9") == 0, "clip_clean_text: \"%s\"", clean ? clean : "(null)");
    free(clean);

    CHECK_ERR(clip_tokenize_ex(tok, NULL, &t));
    CHECK_ERR(clip_tokenize_ex(NULL, "x", &t));
    CHECK_ERR(clip_tokenize(tok, "x", NULL, &n));
}

// Long inputs stay fast: one 1 MB word (BPE over a million symbols) and 1 MB of mixed text.
static void check_long_inputs(const ClipTokenizer *tok) {
    size_t n = 1 << 20;
    char *s = malloc(n + 1);
    if (!s) return;
    for (size_t i = 0; i < n; i++) s[i] = "abcdefghij"[(i * 7 + i / 3) % 10];
    s[n] = 0;
    ClipTokens t;
    double t0 = timer_now_s();
    CHECK_OK(clip_tokenize_ex(tok, s, &t));
    double t_word = timer_now_s() - t0;
    static const char *const pieces[] = {"photo ", "&amp; ", "caf\xc3\xa9 ", "e\xcc\x81", "\xe4\xb8\xad ",
                                         "\xf0\x9f\x98\x80", "it's ", "\t\n", "12 ", "\xce\xa3 "};
    size_t k = 0;
    for (int i = 0; k + 8 < n; i++) {
        const char *p = pieces[(i * 7) % 10];
        memcpy(s + k, p, strlen(p));
        k += strlen(p);
    }
    s[k] = 0;
    t0 = timer_now_s();
    CHECK_OK(clip_tokenize_ex(tok, s, &t));
    double t_mixed = timer_now_s() - t0;
    printf("  1 MB single word: %.0f ms; 1 MB mixed text: %.0f ms\n", t_word * 1e3, t_mixed * 1e3);
    CHECK(t.truncated && t.n_tokens == 77, "1 MB of text is cut to 77");
    CHECK(t_word < 20 && t_mixed < 20, "long inputs take %.1f s and %.1f s", t_word, t_mixed);
    free(s);
}

// The same merges from memory (gzip, plain text, two gzip members) give the same tokenizer; broken files are errors.
static void check_loading(const ClipTokenizer *tok, const char *vocab_path, const char *tmp_dir) {
    size_t gz_n = 0;
    uint8_t *gz = test_read_file(vocab_path, &gz_n);
    CHECK(gz && gz_n > 1000, "read %s", vocab_path);
    if (!gz) return;
    const char *probe =
        "A photo of the DAMAGED metal nut, isn't it? \xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 &amp; 123";

    ClipTokenizer *m = NULL;
    CHECK_OK(clip_tokenizer_load_memory(gz, gz_n, &m));
    CHECK(m && same_tokens(tok, m, probe), "gzip bytes from memory tokenize like the file");
    clip_tokenizer_free(m);

    // Plain text, inflated here with zlib's gz* calls (independent of the tokenizer's own reading).
    char path[512];
    snprintf(path, sizeof path, "%s/merges.txt", tmp_dir);
    size_t text_cap = 8u << 20, text_n = 0;
    uint8_t *text = malloc(text_cap);
    gzFile g = gzopen(vocab_path, "rb");
    for (int got; text && g && (got = gzread(g, text + text_n, (unsigned)(text_cap - text_n))) > 0;)
        text_n += (size_t)got;
    if (g) gzclose(g);
    CHECK(text && text_n > 1000000, "inflated the merges file (%zu bytes)", text_n);
    if (!text || text_n < 1000000) {
        free(text), free(gz);
        return;
    }
    m = NULL;
    CHECK_OK(clip_tokenizer_load_memory(text, text_n, &m));
    CHECK(m && same_tokens(tok, m, probe), "plain-text merges from memory tokenize like the file");
    clip_tokenizer_free(m);
    m = NULL;
    CHECK(test_write_file(path, text, text_n) == 0, "write %s", path);
    CHECK_OK(clip_tokenizer_load_file(path, &m));
    CHECK(m && same_tokens(tok, m, probe), "a plain-text merges file tokenizes like the gzip one");
    clip_tokenizer_free(m);

    // Two gzip members (what `cat a.gz b.gz` makes) read as one stream, as gzip.open does.
    uint8_t *two = malloc(text_n + 4096);
    size_t half = text_n / 2;
    size_t a = two ? gzip_member(text, half, two) : 0;
    size_t b = a ? gzip_member(text + half, text_n - half, two + a) : 0;
    CHECK(a && b, "made a two-member gzip");
    m = NULL;
    if (a && b) CHECK_OK(clip_tokenizer_load_memory(two, a + b, &m));
    CHECK(m && same_tokens(tok, m, probe), "a two-member gzip tokenizes like the file");
    clip_tokenizer_free(m);
    free(two);

    // ---- broken inputs: each a clear error, never a crash, *out left NULL ----
    ClipTokenizer *bad = (ClipTokenizer *)&bad;  // must be reset to NULL on failure
    CHECK_ERR(clip_tokenizer_load_memory(gz, gz_n / 2, &bad));
    CHECK(bad == NULL, "a failed load leaves *out NULL");
    CHECK_ERR(clip_tokenizer_load_memory(gz, gz_n - 4, &bad));  // only the trailer's length field is missing
    CHECK_ERR(clip_tokenizer_load_memory(gz, 10, &bad));        // the gzip header alone
    CHECK_ERR(clip_tokenizer_load_memory(gz, 0, &bad));
    CHECK_ERR(clip_tokenizer_load_memory("", 0, &bad));
    snprintf(path, sizeof path, "%s/truncated.gz", tmp_dir);
    CHECK(test_write_file(path, gz, gz_n / 2) == 0, "write %s", path);
    CHECK_ERR(clip_tokenizer_load_file(path, &bad));
    printf("  truncated gzip: %s\n", agpt_last_error());
    snprintf(path, sizeof path, "%s/trailer.gz", tmp_dir);
    CHECK(test_write_file(path, gz, gz_n - 4) == 0, "write %s", path);
    CHECK_ERR(clip_tokenizer_load_file(path, &bad));

    uint8_t *flipped = malloc(gz_n);
    if (flipped) {
        memcpy(flipped, gz, gz_n);
        flipped[gz_n / 3] ^= 0x5a;  // deflate data error or a CRC mismatch, either way an error
        CHECK_ERR(clip_tokenizer_load_memory(flipped, gz_n, &bad));
        snprintf(path, sizeof path, "%s/flipped.gz", tmp_dir);
        CHECK(test_write_file(path, flipped, gz_n) == 0, "write %s", path);
        CHECK_ERR(clip_tokenizer_load_file(path, &bad));
        memcpy(flipped, "\x1f\x8b garbage after the magic", 26);
        CHECK_ERR(clip_tokenizer_load_memory(flipped, 26, &bad));
        free(flipped);
    }
    uint8_t *trailing = malloc(gz_n + 8);
    if (trailing) {
        memcpy(trailing, gz, gz_n);
        memcpy(trailing + gz_n, "JUNKJUNK", 8);
        CHECK_ERR(clip_tokenizer_load_memory(trailing, gz_n + 8, &bad));
        free(trailing);
    }

    snprintf(path, sizeof path, "%s/empty.txt.gz", tmp_dir);
    CHECK(test_write_file(path, "", 0) == 0, "write %s", path);
    CHECK_ERR(clip_tokenizer_load_file(path, &bad));
    printf("  empty file: %s\n", agpt_last_error());
    snprintf(path, sizeof path, "%s/no/such/file.gz", tmp_dir);
    CHECK(clip_tokenizer_load_file(path, &bad) == AGPT_ERR_IO, "a missing file is an I/O error");

    // Too few lines: the header and 1000 merges.
    size_t cut = 0;
    for (int lines = 0; cut < text_n && lines < 1001; cut++) lines += text[cut] == '\n';
    CHECK_ERR(clip_tokenizer_load_memory(text, cut, &bad));
    printf("  short file: %s\n", agpt_last_error());

    // A malformed merge line (one symbol, three symbols, an unknown symbol) and invalid UTF-8.
    uint8_t *edit = malloc(text_n + 64);
    size_t line_at = 0;  // the start of line 501 (1-based, as the messages count), the 500th merge
    for (int lines = 0; line_at < text_n && lines < 500; line_at++) lines += text[line_at] == '\n';
    size_t line_end = line_at;
    while (line_end < text_n && text[line_end] != '\n') line_end++;
    static const char *const bad_lines[] = {"lonely", "th e r", "t \xc4\xb4\xc4\xb4zz", "", "a\xff b"};
    for (int k = 0; edit && k < 5; k++) {
        size_t bl = strlen(bad_lines[k]);
        memcpy(edit, text, line_at);
        memcpy(edit + line_at, bad_lines[k], bl);
        memcpy(edit + line_at + bl, text + line_end, text_n - line_end);
        CHECK_ERR(clip_tokenizer_load_memory(edit, line_at + bl + text_n - line_end, &bad));
        printf("  line 501 = \"%s\": %s\n", k == 4 ? "a\\xff b" : bad_lines[k], agpt_last_error());
    }
    if (edit) {  // the same through a gzip file on disk
        memcpy(edit, text, line_at);
        memcpy(edit + line_at, "lonely", 6);
        memcpy(edit + line_at + 6, text + line_end, text_n - line_end);
        size_t edited = line_at + 6 + text_n - line_end;
        uint8_t *z = malloc(edited + 1024);
        size_t zn = z ? gzip_member(edit, edited, z) : 0;
        snprintf(path, sizeof path, "%s/malformed.txt.gz", tmp_dir);
        CHECK(zn && test_write_file(path, z, zn) == 0, "write %s", path);
        CHECK_ERR(clip_tokenizer_load_file(path, &bad));
        free(z);
    }
    CHECK(bad == NULL, "failed loads left *out NULL");
    free(edit);
    free(text);
    free(gz);
}

int main(int argc, char **argv) {
    char vocab[1024], golden[1024];
    snprintf(vocab, sizeof vocab, "%s", argc > 1 ? argv[1] : AGPT_SHARED_DATA "/clip-bpe-simple-vocab-16e6.txt.gz");
    snprintf(golden, sizeof golden, "%s", AGPT_TEST_DATA "/clip_tokenizer_ids.txt");
    FILE *probe = fopen(vocab, "rb");
    if (!probe) {
        printf("skipped: no CLIP merges file at %s (pass its path as the first argument)\n", vocab);
        return TEST_SKIP;
    }
    fclose(probe);
    FILE *gf = fopen(golden, "r");
    if (!gf) {
        printf("skipped: no golden file %s (bash tests/reference/make_goldens.sh makes it)\n", golden);
        return TEST_SKIP;
    }

    ClipTokenizer *tok = NULL;
    double t0 = timer_now_s();
    CHECK_OK(clip_tokenizer_load_file(vocab, &tok));
    printf("  loaded %s in %.1f ms\n", vocab, (timer_now_s() - t0) * 1e3);
    if (!tok) {
        fclose(gf);
        return test_summary();
    }
    check_basics(tok);
    check_goldens(tok, gf);
    fclose(gf);
    check_long_inputs(tok);

    char tmp_dir[64];
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/agpt_clip_XXXXXX");
    if (mkdtemp(tmp_dir)) {
        check_loading(tok, vocab, tmp_dir);
        static const char *const names[] = {"merges.txt", "truncated.gz", "trailer.gz", "flipped.gz", "empty.txt.gz",
                                            "malformed.txt.gz"};
        char path[512];
        for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
            snprintf(path, sizeof path, "%s/%s", tmp_dir, names[i]);
            unlink(path);
        }
        rmdir(tmp_dir);
    } else {
        CHECK(0, "mkdtemp %s failed", tmp_dir);
    }
    clip_tokenizer_free(tok);
    return test_summary();
}
