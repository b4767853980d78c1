// The CLIP BPE tokenizer: the pre-token scanner, byte-level BPE, and loading the merges file. The text cleanup in
// front of it is model/clip_text_clean.c. See clip_tokenizer.h.
//
// The cleaned text arrives as code points (uint32_t), like Python's str; UTF-8 appears only for the BPE bytes.
#include "model/clip_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "model/clip_text_clean.h"
#include "model/unicode_tables.h"

// ---- UTF-8 ---------------------------------------------------------------------------------------------------

// Appends the UTF-8 of one code point (never a surrogate here) to a byte buffer with room for 4 more bytes.
static int utf8_put(uint32_t c, uint8_t *o) {
    if (c < 0x80) {
        o[0] = (uint8_t)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (uint8_t)(0xC0 | (c >> 6));
        o[1] = (uint8_t)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (uint8_t)(0xE0 | (c >> 12));
        o[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (c >> 18));
    o[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

// ---- the tokenizer -------------------------------------------------------------------------------------------

#define PAIR_SLOTS (1u << 17)  // open addressing, load < 0.4 for the 48894 merges
#define PAIR_EMPTY UINT64_MAX

typedef struct PairSlot {
    uint64_t key;    // (left id << 32) | right id, canonical vocabulary ids
    int32_t rank;    // merge priority: lower merges first
    int32_t merged;  // vocabulary id of the joined symbol
} PairSlot;

struct ClipTokenizer {
    int32_t byte_id[256];      // vocabulary id of each byte's bytes_to_unicode character
    int32_t byte_end_id[256];  // ... with "</w>"
    PairSlot *pairs;           // [PAIR_SLOTS]
};

static uint32_t hash64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (uint32_t)k;
}

static const PairSlot *pair_find(const ClipTokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t h = hash64(key) & (PAIR_SLOTS - 1);; h = (h + 1) & (PAIR_SLOTS - 1)) {
        if (t->pairs[h].key == key) return &t->pairs[h];
        if (t->pairs[h].key == PAIR_EMPTY) return NULL;
    }
}

// BPE over one word, as SimpleTokenizer.bpe does it: repeatedly take the lowest-ranked adjacent pair and
// merge all its occurrences left to right. Here with a linked list and a heap of candidate pairs keyed by
// (rank, position), so a long word costs O(n log n) instead of Python's O(n^2). All candidates of the lowest
// rank are popped before any is merged, because pairs made by those merges (even of a lower rank) must wait
// for the next round, as in Python.
typedef struct BpeNode {
    int32_t sym;  // vocabulary id; -1 once merged into its left neighbour
    int32_t prev, next;
} BpeNode;

typedef struct BpeCand {
    int32_t rank, pos;     // pos: index of the left node
    int32_t left, right;   // the symbols the pair had when pushed; a changed node makes the candidate stale
    int32_t merged;
} BpeCand;

typedef struct Bpe {
    BpeNode *nodes;
    BpeCand *heap, *batch;
    size_t node_cap, heap_n, heap_cap, batch_cap;
    bool oom;
} Bpe;

static bool cand_less(const BpeCand *a, const BpeCand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

// Room for `need` (> 0) elements of `elem` bytes: returns the (maybe moved) array, or NULL when memory runs out
// (then p is untouched and still owned by the caller).
static void *grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t cap2 = *cap ? *cap : 16;
    while (cap2 < need) {
        if (cap2 > SIZE_MAX / 2 / elem) return NULL;
        cap2 *= 2;
    }
    void *q = realloc(p, cap2 * elem);
    if (q) *cap = cap2;
    return q;
}

static void heap_push(Bpe *b, BpeCand c) {
    BpeCand *heap = grow(b->heap, &b->heap_cap, b->heap_n + 1, sizeof *heap);
    if (!heap) {
        b->oom = true;
        return;
    }
    b->heap = heap;
    size_t i = b->heap_n++;
    while (i > 0 && cand_less(&c, &b->heap[(i - 1) / 2])) {
        b->heap[i] = b->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    b->heap[i] = c;
}

static BpeCand heap_pop(Bpe *b) {
    BpeCand top = b->heap[0], last = b->heap[--b->heap_n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const BpeCand *best = &last;
        if (l < b->heap_n && cand_less(&b->heap[l], best)) m = l, best = &b->heap[l];
        if (l + 1 < b->heap_n && cand_less(&b->heap[l + 1], best)) m = l + 1;
        if (m == i) break;
        b->heap[i] = b->heap[m];
        i = m;
    }
    if (b->heap_n) b->heap[i] = last;
    return top;
}

static void bpe_consider(const ClipTokenizer *t, Bpe *b, int32_t pos) {
    int32_t next = b->nodes[pos].next;
    if (next < 0) return;
    const PairSlot *p = pair_find(t, b->nodes[pos].sym, b->nodes[next].sym);
    if (p) heap_push(b, (BpeCand){p->rank, pos, b->nodes[pos].sym, b->nodes[next].sym, p->merged});
}

// Appends the ids of one pre-token (its UTF-8 bytes) to ids[*n..cap).
static void bpe_word(const ClipTokenizer *t, Bpe *b, const uint8_t *bytes, size_t len, int32_t *ids, int *n,
                     int cap) {
    BpeNode *nodes = grow(b->nodes, &b->node_cap, len, sizeof *nodes);
    if (!nodes) {
        b->oom = true;
        return;
    }
    b->nodes = nodes;
    for (size_t i = 0; i < len; i++) {
        b->nodes[i].sym = i + 1 == len ? t->byte_end_id[bytes[i]] : t->byte_id[bytes[i]];
        b->nodes[i].prev = (int32_t)i - 1;
        b->nodes[i].next = i + 1 == len ? -1 : (int32_t)i + 1;
    }
    b->heap_n = 0;
    for (size_t i = 0; i + 1 < len; i++) bpe_consider(t, b, (int32_t)i);
    while (b->heap_n && !b->oom) {
        size_t nb = 0;
        int32_t rank = b->heap[0].rank;
        while (b->heap_n && b->heap[0].rank == rank) {
            BpeCand *batch = grow(b->batch, &b->batch_cap, nb + 1, sizeof *batch);
            if (!batch) {
                b->oom = true;
                return;
            }
            b->batch = batch;
            b->batch[nb++] = heap_pop(b);
        }
        for (size_t k = 0; k < nb; k++) {
            BpeCand c = b->batch[k];
            BpeNode *l = &b->nodes[c.pos];
            if (l->sym != c.left || l->next < 0 || b->nodes[l->next].sym != c.right) continue;  // stale
            BpeNode *r = &b->nodes[l->next];
            l->sym = c.merged;
            l->next = r->next;
            if (r->next >= 0) b->nodes[r->next].prev = c.pos;
            r->sym = -1;
            if (l->prev >= 0) bpe_consider(t, b, l->prev);
            bpe_consider(t, b, c.pos);
        }
    }
    for (int32_t i = 0; i >= 0 && *n < cap; i = b->nodes[i].next) ids[(*n)++] = b->nodes[i].sym;
}

// Does the pre-token pattern's literal `lit` match s[i...]? Letters also match their case variants, as
// IGNORECASE makes them (U+017F matches 's').
static bool literal_at(const uint32_t *s, size_t n, size_t i, const char *lit) {
    for (; *lit; lit++, i++) {
        if (i >= n) return false;
        uint32_t c = s[i], l = (uint32_t)(unsigned char)*lit;
        if (c == l) continue;
        bool letter = l >= 'a' && l <= 'z';
        if (letter && c == l - 32) continue;
        bool folds = false;
        for (int k = 0; letter && k < uni_pattern_folds_count; k++)
            folds |= uni_pattern_folds[k].from == c && uni_pattern_folds[k].to == l;
        if (!folds) return false;
    }
    return true;
}

// Length of the pre-token at s[i] (findall of the CLIP pattern), or 0 when none starts there (the position is
// skipped, as findall does).
static size_t pretoken_at(const uint32_t *s, size_t n, size_t i) {
    static const char *const literals[] = {"<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m",
                                           "'ll", "'d"};
    if (s[i] == '<' || s[i] == '\'') {
        for (size_t k = 0; k < sizeof literals / sizeof *literals; k++)
            if (literal_at(s, n, i, literals[k])) return strlen(literals[k]);
    }
    int cls = clip_scan_class(s[i]);
    if (cls == UNI_SCAN_SKIP) return 0;
    if (cls == UNI_SCAN_NUMBER) return 1;
    size_t j = i + 1;
    while (j < n && clip_scan_class(s[j]) == cls) j++;
    return j - i;
}

Status clip_tokenize_ex(const ClipTokenizer *t, const char *text, ClipTokens *out) {
    AGPT_CHECK_ARG(t && text && out, "clip_tokenize: tokenizer, text and output must not be NULL");
    memset(out, 0, sizeof *out);
    uint32_t *clean = NULL;
    size_t clean_n = 0;
    Bpe bpe = {0};
    uint8_t *bytes = NULL;
    size_t bytes_cap = 0;
    AGPT_TRY(clip_clean_codepoints(text, &clean, &clean_n));
    // [SOT] + bpe ids + [EOT], cut to 77 (ImageBind's order): at most 76 text ids matter; the 76th means the
    // EOT fell off.
    int32_t text_ids[CLIP_CONTEXT_LENGTH - 1];
    int n = 0;
    const int cap = CLIP_CONTEXT_LENGTH - 1;
    for (size_t i = 0; i < clean_n && n < cap && !bpe.oom;) {
        size_t len = pretoken_at(clean, clean_n, i);
        if (len == 0) {
            i++;
            continue;
        }
        uint8_t *more = grow(bytes, &bytes_cap, len * 4, 1);
        if (!more) {
            bpe.oom = true;
            break;
        }
        bytes = more;
        size_t nb = 0;
        for (size_t k = 0; k < len; k++) nb += (size_t)utf8_put(clean[i + k], bytes + nb);
        // The fork's bpe cache maps the special tokens to themselves, so they come out as their own ids.
        if (nb == 15 && memcmp(bytes, "<|startoftext|>", 15) == 0) text_ids[n++] = CLIP_SOT_ID;
        else if (nb == 13 && memcmp(bytes, "<|endoftext|>", 13) == 0) text_ids[n++] = CLIP_EOT_ID;
        else bpe_word(t, &bpe, bytes, nb, text_ids, &n, cap);
        i += len;
    }
    bool oom = bpe.oom;
    free(bpe.nodes), free(bpe.heap), free(bpe.batch), free(bytes), free(clean);
    if (oom) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory tokenizing a text of %zu bytes", strlen(text));
    out->ids[0] = CLIP_SOT_ID;
    memcpy(out->ids + 1, text_ids, (size_t)n * sizeof *text_ids);
    out->n_tokens = n + 1;
    if (n < cap) out->ids[out->n_tokens++] = CLIP_EOT_ID;
    else out->truncated = true;
    return AGPT_OK;
}

Status clip_tokenize(const ClipTokenizer *t, const char *text, int32_t *ids, int *n_tokens) {
    AGPT_CHECK_ARG(ids && n_tokens, "clip_tokenize: ids and n_tokens must not be NULL");
    ClipTokens tok;
    AGPT_TRY(clip_tokenize_ex(t, text, &tok));
    memcpy(ids, tok.ids, sizeof tok.ids);
    *n_tokens = tok.n_tokens;
    return AGPT_OK;
}

Status clip_clean_text(const char *text, char **out) {
    AGPT_CHECK_ARG(text && out, "clip_clean_text: text and out must not be NULL");
    *out = NULL;
    uint32_t *clean = NULL;
    size_t clean_n = 0;
    AGPT_TRY(clip_clean_codepoints(text, &clean, &clean_n));
    Status st = AGPT_OK;
    char *s = malloc(clean_n * 4 + 1);
    if (!s) {
        st = AGPT_FAIL(AGPT_ERR_OOM, "out of memory for a cleaned text of %zu characters", clean_n);
    } else {
        size_t k = 0;
        for (size_t i = 0; i < clean_n; i++) k += (size_t)utf8_put(clean[i], (uint8_t *)s + k);
        s[k] = 0;
        *out = s;
    }
    free(clean);
    return st;
}

// ---- loading the merges file ---------------------------------------------------------------------------------

#define MAX_MERGES_BYTES (64u << 20)  // the real file is 3.2 MB decompressed; anything far larger is not it

typedef struct Bytes {
    uint8_t *v;
    size_t n, cap;
} Bytes;

static bool bytes_append(Bytes *b, const void *p, size_t n) {
    uint8_t *v = grow(b->v, &b->cap, b->n + n + 1, 1);
    if (!v) return false;
    b->v = v;
    memcpy(b->v + b->n, p, n);
    b->n += n;
    return true;
}

// gzip members from memory, one after another (as gzip.open reads them); anything after them is an error.
static Status gunzip_memory(const uint8_t *src, size_t len, Bytes *out) {
    z_stream z = {0};
    if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) return AGPT_FAIL(AGPT_ERR_OOM, "zlib inflateInit2 failed");
    size_t pos = 0;
    Status st = AGPT_OK;
    uint8_t chunk[65536];
    while (st == AGPT_OK) {
        size_t avail = len - pos;
        z.next_in = (Bytef *)(src + pos);
        z.avail_in = avail > UINT32_MAX ? UINT32_MAX : (uInt)avail;
        z.next_out = chunk;
        z.avail_out = sizeof chunk;
        int rc = inflate(&z, Z_NO_FLUSH);
        pos += (avail > UINT32_MAX ? UINT32_MAX : avail) - z.avail_in;
        size_t got = sizeof chunk - z.avail_out;
        if (got && (out->n + got > MAX_MERGES_BYTES || !bytes_append(out, chunk, got))) {
            st = out->n + got > MAX_MERGES_BYTES
                     ? AGPT_FAIL(AGPT_ERR_FORMAT, "gzip data inflates past %u MB; not a CLIP merges file",
                                 MAX_MERGES_BYTES >> 20)
                     : AGPT_FAIL(AGPT_ERR_OOM, "out of memory inflating the merges file");
            break;
        }
        if (rc == Z_STREAM_END) {
            if (pos == len) break;
            if (len - pos < 2 || src[pos] != 0x1f || src[pos + 1] != 0x8b) {
                st = AGPT_FAIL(AGPT_ERR_FORMAT, "%zu stray bytes after the gzip data", len - pos);
                break;
            }
            inflateReset(&z);
            continue;
        }
        if (rc == Z_BUF_ERROR && pos == len) {
            st = AGPT_FAIL(AGPT_ERR_FORMAT, "gzip data is truncated (%zu bytes read)", len);
        } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
            st = AGPT_FAIL(AGPT_ERR_FORMAT, "gzip data is corrupt: %s", z.msg ? z.msg : "inflate failed");
        }
    }
    inflateEnd(&z);
    return st;
}

// A string -> id map for building the vocabulary (the symbols are the strings Python's encoder dict holds).
#define VOCAB_SLOTS (1u << 17)

typedef struct VocabMap {
    const char *pool;  // every symbol, NUL-terminated, at offsets[id]
    const uint32_t *offsets;
    int32_t *slot_id;  // [VOCAB_SLOTS], -1 = empty
} VocabMap;

static uint32_t hash_str(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

// Later ids replace earlier ones for the same string, as dict(zip(vocab, range(len(vocab)))) does.
static void vocab_put(VocabMap *m, int32_t id) {
    const char *s = m->pool + m->offsets[id];
    size_t n = strlen(s);
    for (uint32_t h = hash_str(s, n) & (VOCAB_SLOTS - 1);; h = (h + 1) & (VOCAB_SLOTS - 1)) {
        int32_t o = m->slot_id[h];
        if (o < 0 || strcmp(m->pool + m->offsets[o], s) == 0) {
            m->slot_id[h] = id;
            return;
        }
    }
}

static int32_t vocab_get(const VocabMap *m, const char *s, size_t n) {
    for (uint32_t h = hash_str(s, n) & (VOCAB_SLOTS - 1);; h = (h + 1) & (VOCAB_SLOTS - 1)) {
        int32_t o = m->slot_id[h];
        if (o < 0) return -1;
        const char *t = m->pool + m->offsets[o];
        if (strncmp(t, s, n) == 0 && t[n] == 0) return o;
    }
}

// bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 to U+0100.. in byte order. The
// vocabulary lists them in the dict's order: the printable ranges first, then the rest.
static void bytes_to_unicode(uint32_t cp_of_byte[256], int order[256]) {
    int n = 0, extra = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        if (printable) cp_of_byte[b] = (uint32_t)b, order[n++] = b;
    }
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        if (!printable) cp_of_byte[b] = 256u + (uint32_t)extra++, order[n++] = b;
    }
}

// Splits a merges line as str.split() does (on any str.isspace() character; the text is valid UTF-8 here).
// Returns the number of fields and the byte ranges of the first 3.
static int split_fields(const uint8_t *s, size_t n, size_t start[3], size_t len[3]) {
    int fields = 0;
    size_t i = 0, clen;
    while (i < n) {
        if (clip_is_py_space(clip_utf8_decode_one(s + i, n - i, &clen))) {
            i += clen;
            continue;
        }
        size_t j = i;
        while (j < n && !clip_is_py_space(clip_utf8_decode_one(s + j, n - j, &clen))) j += clen;
        if (fields < 3) start[fields] = i, len[fields] = j - i;
        fields++;
        i = j;
    }
    return fields;
}

typedef struct MergeFields {
    uint32_t start[2], len[2];  // byte ranges of the two symbols in the text
} MergeFields;

// Builds the tokenizer from the file's text, as SimpleTokenizer.__init__ does; `what` names the source.
static Status parse_merges(const uint8_t *text, size_t n, const char *what, ClipTokenizer **out) {
    // gzip.open(...).read().decode("utf-8") is strict.
    for (size_t i = 0, clen; i < n; i += clen)
        if (clip_utf8_decode_one(text + i, n - i, &clen) == CLIP_UTF8_BAD)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: invalid UTF-8 at byte %zu; not a CLIP merges file", what, i);

    uint32_t cp_of_byte[256];
    int order[256];
    bytes_to_unicode(cp_of_byte, order);
    Status st = AGPT_OK;
    ClipTokenizer *t = calloc(1, sizeof *t);
    MergeFields *merges = malloc(CLIP_NUM_MERGES * sizeof *merges);
    uint32_t *offsets = malloc(CLIP_VOCAB_SIZE * sizeof *offsets);
    // Symbol strings: 256 x (2 bytes + NUL) and 256 x (2 + "</w>" + NUL); the merges' joined symbols fit in the
    // bytes of their lines (each loses at least its separating space); the specials need 30.
    char *pool = malloc(n + 256 * 10 + 64);
    int32_t *slot_id = malloc(VOCAB_SLOTS * sizeof *slot_id);
    if (t) t->pairs = malloc(PAIR_SLOTS * sizeof *t->pairs);
    if (!t || !merges || !offsets || !pool || !slot_id || !t->pairs) {
        st = AGPT_FAIL(AGPT_ERR_OOM, "out of memory loading the CLIP merges (%zu bytes)", n);
        goto done;
    }

    // Lines as text.split("\n"): line 0 is the header, lines 1..48894 the merges, any further lines unused.
    const uint8_t *nl = n ? memchr(text, '\n', n) : NULL;
    size_t pos = nl ? (size_t)(nl - text) + 1 : n;
    for (int r = 0; r < CLIP_NUM_MERGES; r++) {
        if (!nl || pos == n) {  // no line r, or only the empty remnant after a final '\n'
            st = AGPT_FAIL(AGPT_ERR_FORMAT,
                           "%s has only %d lines; a CLIP merges file (bpe_simple_vocab_16e6.txt.gz) has a header "
                           "line and at least %d merge lines (is it truncated?)", what, r + 1, CLIP_NUM_MERGES);
            goto done;
        }
        nl = memchr(text + pos, '\n', n - pos);
        size_t end = nl ? (size_t)(nl - text) : n;
        size_t fs[3], fl[3];
        int fields = split_fields(text + pos, end - pos, fs, fl);
        if (fields != 2) {
            size_t show = end - pos > 60 ? 60 : end - pos;
            st = AGPT_FAIL(AGPT_ERR_FORMAT, "%s line %d is \"%.*s\": a merge must be two symbols separated by a "
                           "space", what, r + 2, (int)show, (const char *)text + pos);
            goto done;
        }
        for (int f = 0; f < 2; f++) merges[r].start[f] = (uint32_t)(pos + fs[f]), merges[r].len[f] = (uint32_t)fl[f];
        pos = nl ? (size_t)(nl - text) + 1 : n;
    }

    // The vocabulary in id order: byte symbols, the same with "</w>", the merges joined, the two specials.
    memset(slot_id, 0xff, VOCAB_SLOTS * sizeof *slot_id);
    for (uint32_t i = 0; i < PAIR_SLOTS; i++) t->pairs[i].key = PAIR_EMPTY;
    VocabMap map = {pool, offsets, slot_id};
    size_t used = 0;
    int32_t id = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < 256; k++, id++) {
            offsets[id] = (uint32_t)used;
            used += (size_t)utf8_put(cp_of_byte[order[k]], (uint8_t *)pool + used);
            if (pass) memcpy(pool + used, "</w>", 4), used += 4;
            pool[used++] = 0;
        }
    }
    for (int r = 0; r < CLIP_NUM_MERGES; r++, id++) {
        offsets[id] = (uint32_t)used;
        for (int f = 0; f < 2; f++) {
            memcpy(pool + used, text + merges[r].start[f], merges[r].len[f]);
            used += merges[r].len[f];
        }
        pool[used++] = 0;
    }
    offsets[id++] = (uint32_t)used;
    memcpy(pool + used, "<|startoftext|>", 16), used += 16;
    offsets[id++] = (uint32_t)used;
    memcpy(pool + used, "<|endoftext|>", 14), used += 14;
    for (int32_t i = 0; i < CLIP_VOCAB_SIZE; i++) vocab_put(&map, i);

    for (int k = 0; k < 256; k++) {
        t->byte_id[order[k]] = vocab_get(&map, pool + offsets[k], strlen(pool + offsets[k]));
        t->byte_end_id[order[k]] = vocab_get(&map, pool + offsets[256 + k], strlen(pool + offsets[256 + k]));
    }
    // bpe_ranks: pair -> rank, a later duplicate winning as in dict(zip(merges, range(len(merges)))).
    for (int r = 0; r < CLIP_NUM_MERGES; r++) {
        int32_t sym[2];
        for (int f = 0; f < 2; f++) {
            const char *field = (const char *)text + merges[r].start[f];
            sym[f] = vocab_get(&map, field, merges[r].len[f]);
            if (sym[f] < 0) {
                int show = merges[r].len[f] > 60 ? 60 : (int)merges[r].len[f];
                st = AGPT_FAIL(AGPT_ERR_FORMAT, "%s line %d: symbol \"%.*s\" is neither a byte symbol nor made by "
                               "a merge", what, r + 2, show, field);
                goto done;
            }
        }
        const char *joined = pool + offsets[512 + r];
        int32_t merged = vocab_get(&map, joined, strlen(joined));
        uint64_t key = ((uint64_t)(uint32_t)sym[0] << 32) | (uint32_t)sym[1];
        for (uint32_t h = hash64(key) & (PAIR_SLOTS - 1);; h = (h + 1) & (PAIR_SLOTS - 1)) {
            if (t->pairs[h].key == PAIR_EMPTY || t->pairs[h].key == key) {
                t->pairs[h] = (PairSlot){key, r, merged};
                break;
            }
        }
    }
done:
    free(merges);
    free(offsets);
    free(pool);
    free(slot_id);
    if (st != AGPT_OK) {
        clip_tokenizer_free(t);
        return st;
    }
    *out = t;
    return AGPT_OK;
}

Status clip_tokenizer_load_memory(const void *gz_or_text, size_t len, ClipTokenizer **out) {
    AGPT_CHECK_ARG(out && (gz_or_text || len == 0), "clip_tokenizer_load_memory: data and out must not be NULL");
    *out = NULL;
    const uint8_t *p = gz_or_text;
    if (len >= 2 && p[0] == 0x1f && p[1] == 0x8b) {
        Bytes text = {0};
        Status st = gunzip_memory(p, len, &text);
        if (st == AGPT_OK) st = parse_merges(text.v, text.n, "the CLIP merges (gzip in memory)", out);
        free(text.v);
        return st == AGPT_OK ? st : agpt_add_context(st, "loading the CLIP tokenizer from memory");
    }
    Status st = parse_merges(p, len, "the CLIP merges (text in memory)", out);
    return st == AGPT_OK ? st : agpt_add_context(st, "loading the CLIP tokenizer from memory");
}

Status clip_tokenizer_load_file(const char *path, ClipTokenizer **out) {
    AGPT_CHECK_ARG(path && out, "clip_tokenizer_load_file: path and out must not be NULL");
    *out = NULL;
    // gzopen also reads a plain-text file as is, so both forms load.
    gzFile f = gzopen(path, "rb");
    if (!f)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot open the CLIP merges file %s; expected bpe_simple_vocab_16e6.txt.gz",
                         path);
    Bytes text = {0};
    Status st = AGPT_OK;
    uint8_t chunk[65536];
    for (;;) {
        int got = gzread(f, chunk, sizeof chunk);
        if (got < 0) {
            int errnum;
            const char *msg = gzerror(f, &errnum);
            // gzerror's message already starts with the path.
            st = AGPT_FAIL(errnum == Z_ERRNO ? AGPT_ERR_IO : AGPT_ERR_FORMAT,
                           "%s (a truncated or corrupt gzip file?)", msg);
            break;
        }
        if (got == 0) break;
        if (text.n + (size_t)got > MAX_MERGES_BYTES) {
            st = AGPT_FAIL(AGPT_ERR_FORMAT, "%s inflates past %u MB; not a CLIP merges file", path,
                           MAX_MERGES_BYTES >> 20);
            break;
        }
        if (!bytes_append(&text, chunk, (size_t)got)) {
            st = AGPT_FAIL(AGPT_ERR_OOM, "out of memory reading %s", path);
            break;
        }
    }
    if (st == AGPT_OK) {
        // gzread reports a stream that stops early (truncated, or missing its CRC/length trailer) only here:
        // it returns the bytes it got and leaves Z_BUF_ERROR "unexpected end of file" in gzerror.
        int errnum;
        const char *msg = gzerror(f, &errnum);
        if (errnum != Z_OK)
            st = AGPT_FAIL(AGPT_ERR_FORMAT, "%s after %zu bytes (a truncated or corrupt gzip file?)", msg, text.n);
    }
    gzclose(f);
    if (st == AGPT_OK) st = parse_merges(text.v, text.n, path, out);
    free(text.v);
    return st == AGPT_OK ? st : agpt_add_context(st, "loading the CLIP tokenizer");
}

void clip_tokenizer_free(ClipTokenizer *t) {
    if (!t) return;
    free(t->pairs);
    free(t);
}
