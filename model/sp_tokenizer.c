// SentencePiece BPE (see sp_tokenizer.h). Three parts: a bounds-checked protobuf reader for ModelProto, the
// normalizer (identity + whitespace handling) and the BPE merge loop of sentencepiece's bpe_model.cc, then decode.
#include "model/sp_tokenizer.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { SP_NORMAL = 1, SP_UNKNOWN = 2, SP_CONTROL = 3, SP_USER_DEFINED = 4, SP_UNUSED = 5, SP_BYTE = 6 };
enum { MODEL_UNIGRAM = 1, MODEL_BPE = 2, MODEL_WORD = 3, MODEL_CHAR = 4 };

static const char kSpace[] = "\xe2\x96\x81";  // U+2581, sentencepiece's visible space
static const char kReplacement[] = "\xef\xbf\xbd";  // U+FFFD

// Piece string -> id, open addressing. Strings live in the tokenizer's arena.
typedef struct PieceMap {
    int32_t *slots;  // [cap] piece id, -1 empty
    uint32_t cap;    // power of two, >= 2 * entries
} PieceMap;

struct SpTokenizer {
    int n;                     // vocabulary size
    char **piece;              // [n] NUL-terminated piece strings (into arena)
    uint32_t *piece_len;       // [n]
    float *score;              // [n]
    uint8_t *type;             // [n] SP_NORMAL..SP_BYTE
    char *arena;
    // sentencepiece keeps two maps: "pieces_" (NORMAL, USER_DEFINED, UNUSED: what BPE may merge into) and
    // "reserved" (UNKNOWN, CONTROL, BYTE), looked up first when a final symbol is turned into an id.
    PieceMap normal, reserved;
    int32_t *user_defined;     // [n_user] ids of USER_DEFINED pieces, matched before characters
    int n_user;
    int32_t byte_id[256];      // <0xNN> piece ids when byte_fallback, else -1
    bool byte_fallback, has_unused;
    int unk_id, bos_id, eos_id;
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    char *unk_surface;         // what decode writes for <unk> (default " \u2047 ")
};

// ---------------------------------------------------------------------------------------------------------------
// Protobuf wire format reader. Every read checks the remaining length; a bad file yields AGPT_ERR_FORMAT.

typedef struct Pb {
    const uint8_t *p, *end;
} Pb;

static bool pb_varint(Pb *b, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (b->p >= b->end) return false;
        uint8_t c = *b->p++;
        x |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;  // more than 10 bytes
}

// One field: its number, wire type and, for length-delimited fields, the payload; for varints the value;
// for fixed32 the 4 raw bytes in v (little endian).
typedef struct PbField {
    uint32_t num, wire;
    uint64_t v;
    const uint8_t *data;
    size_t len;
} PbField;

// Returns 1 with a field, 0 at the end of the message, -1 on a malformed field (message in *why).
static int pb_next(Pb *b, PbField *f, const char **why) {
    if (b->p >= b->end) return 0;
    uint64_t key;
    if (!pb_varint(b, &key)) return *why = "truncated field key", -1;
    f->num = (uint32_t)(key >> 3);
    f->wire = (uint32_t)(key & 7);
    if (f->num == 0 || (key >> 3) > 0x1fffffff) return *why = "invalid field number", -1;
    switch (f->wire) {
    case 0:
        if (!pb_varint(b, &f->v)) return *why = "truncated varint", -1;
        return 1;
    case 1:
        if (b->end - b->p < 8) return *why = "truncated fixed64", -1;
        b->p += 8;
        return 1;
    case 2:
        if (!pb_varint(b, &f->v)) return *why = "truncated length", -1;
        if (f->v > (uint64_t)(b->end - b->p)) return *why = "length past the end of the data", -1;
        f->data = b->p;
        f->len = (size_t)f->v;
        b->p += f->len;
        return 1;
    case 5:
        if (b->end - b->p < 4) return *why = "truncated fixed32", -1;
        f->v = (uint64_t)b->p[0] | (uint64_t)b->p[1] << 8 | (uint64_t)b->p[2] << 16 | (uint64_t)b->p[3] << 24;
        b->p += 4;
        return 1;
    default:  // 3, 4: groups (never used by sentencepiece); 6, 7: invalid
        return *why = "unsupported wire type", -1;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Piece maps

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static int32_t map_find(const SpTokenizer *t, const PieceMap *m, const char *s, size_t n) {
    if (!m->cap) return -1;
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        int32_t id = m->slots[i];
        if (id < 0) return -1;
        if (t->piece_len[id] == n && memcmp(t->piece[id], s, n) == 0) return id;
    }
}

// Inserts id; false when the piece is already there (sentencepiece: "is already defined").
static bool map_insert(const SpTokenizer *t, PieceMap *m, int32_t id) {
    const char *s = t->piece[id];
    size_t n = t->piece_len[id];
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        int32_t o = m->slots[i];
        if (o < 0) {
            m->slots[i] = id;
            return true;
        }
        if (t->piece_len[o] == n && memcmp(t->piece[o], s, n) == 0) return false;
    }
}

// sentencepiece's PieceToId: reserved pieces first, then the mergeable ones, else <unk>.
static int32_t piece_to_id(const SpTokenizer *t, const char *s, size_t n) {
    int32_t id = map_find(t, &t->reserved, s, n);
    if (id < 0) id = map_find(t, &t->normal, s, n);
    return id < 0 ? t->unk_id : id;
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

void sp_free(SpTokenizer *t) {
    if (!t) return;
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
    free(t->arena);
    free(t->normal.slots);
    free(t->reserved.slots);
    free(t->user_defined);
    free(t->unk_surface);
    free(t);
}

// The fields of the specs that change encoding or decoding. Strings point into the buffer being parsed.
typedef struct Specs {
    int model_type;
    bool byte_fallback, treat_ws_as_suffix;
    const uint8_t *bos_piece, *eos_piece, *unk_surface;
    size_t bos_len, eos_len, unk_surface_len;
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    size_t charsmap_len, denorm_charsmap_len;
} Specs;

#define FORMAT_ERR(...) AGPT_FAIL(AGPT_ERR_FORMAT, "SentencePiece model: " __VA_ARGS__)

static Status parse_trainer_spec(const uint8_t *data, size_t len, Specs *s) {
    Pb b = {data, data + len};
    PbField f;
    const char *why = "";
    int r;
    while ((r = pb_next(&b, &f, &why)) > 0) {
        if (f.wire == 0) {
            if (f.num == 3) s->model_type = (int)(int32_t)f.v;
            if (f.num == 35) s->byte_fallback = f.v != 0;
            if (f.num == 24) s->treat_ws_as_suffix = f.v != 0;
        } else if (f.wire == 2) {
            if (f.num == 46) s->bos_piece = f.data, s->bos_len = f.len;
            if (f.num == 47) s->eos_piece = f.data, s->eos_len = f.len;
            if (f.num == 44) s->unk_surface = f.data, s->unk_surface_len = f.len;
        }
    }
    if (r < 0) return FORMAT_ERR("trainer_spec: %s (truncated or corrupt file)", why);
    return AGPT_OK;
}

static Status parse_normalizer_spec(const uint8_t *data, size_t len, Specs *s, bool denormalizer) {
    Pb b = {data, data + len};
    PbField f;
    const char *why = "";
    int r;
    while ((r = pb_next(&b, &f, &why)) > 0) {
        if (denormalizer) {
            if (f.wire == 2 && f.num == 2) s->denorm_charsmap_len = f.len;
            continue;
        }
        if (f.wire == 2 && f.num == 2) s->charsmap_len = f.len;
        if (f.wire == 0 && f.num == 3) s->add_dummy_prefix = f.v != 0;
        if (f.wire == 0 && f.num == 4) s->remove_extra_whitespaces = f.v != 0;
        if (f.wire == 0 && f.num == 5) s->escape_whitespaces = f.v != 0;
    }
    if (r < 0) return FORMAT_ERR("normalizer_spec: %s (truncated or corrupt file)", why);
    return AGPT_OK;
}

// "<0xNN>" (upper-case hex, as sentencepiece writes them) -> NN, else -1.
static int byte_of_piece(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static Status build(const uint8_t *buf, size_t len, SpTokenizer *t) {
    Specs s = {.model_type = MODEL_UNIGRAM,  // proto2 defaults
               .add_dummy_prefix = true,
               .remove_extra_whitespaces = true,
               .escape_whitespaces = true};
    if (len == 0) return FORMAT_ERR("empty data (not a tokenizer.model)");

    // Pass 1: count pieces, total piece bytes, and read the specs.
    Pb b = {buf, buf + len};
    PbField f;
    const char *why = "";
    int r;
    size_t n_pieces = 0, arena_len = 0;
    while ((r = pb_next(&b, &f, &why)) > 0) {
        if (f.num == 1 && f.wire == 2) {
            n_pieces++;
            arena_len += f.len + 1;  // upper bound: the piece string is shorter than its message
        } else if (f.num == 2 && f.wire == 2) {
            AGPT_TRY(parse_trainer_spec(f.data, f.len, &s));
        } else if (f.num == 3 && f.wire == 2) {
            AGPT_TRY(parse_normalizer_spec(f.data, f.len, &s, false));
        } else if (f.num == 5 && f.wire == 2) {
            AGPT_TRY(parse_normalizer_spec(f.data, f.len, &s, true));
        }
    }
    if (r < 0) return FORMAT_ERR("%s at byte %zu of %zu (truncated or corrupt file, or not a tokenizer.model)", why,
                                 (size_t)(b.p - buf), len);
    if (n_pieces == 0) return FORMAT_ERR("no pieces (not a tokenizer.model)");
    if (n_pieces > (size_t)INT32_MAX / 4) return FORMAT_ERR("%zu pieces is too many", n_pieces);
    if (s.model_type != MODEL_BPE) {
        const char *names[] = {"?", "unigram", "bpe", "word", "char"};
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED,
                         "SentencePiece model type %d (%s) is not supported: only BPE models (LLaMA's) are",
                         s.model_type, s.model_type >= 1 && s.model_type <= 4 ? names[s.model_type] : "unknown");
    }
    if (s.charsmap_len || s.denorm_charsmap_len)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED,
                         "SentencePiece model has a %s with a precompiled charsmap (e.g. nmt_nfkc): only the identity "
                         "normalizer (LLaMA's) is implemented",
                         s.charsmap_len ? "normalizer" : "denormalizer");
    if (s.treat_ws_as_suffix)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "SentencePiece model with treat_whitespace_as_suffix is not supported");

    t->n = (int)n_pieces;
    t->piece = calloc(n_pieces, sizeof *t->piece);
    t->piece_len = calloc(n_pieces, sizeof *t->piece_len);
    t->score = calloc(n_pieces, sizeof *t->score);
    t->type = calloc(n_pieces, sizeof *t->type);
    t->arena = malloc(arena_len);
    t->user_defined = malloc(n_pieces * sizeof *t->user_defined);
    uint32_t cap = 16;
    while (cap < 2 * n_pieces) cap *= 2;
    t->normal.cap = t->reserved.cap = cap;
    t->normal.slots = malloc(cap * sizeof(int32_t));
    t->reserved.slots = malloc(cap * sizeof(int32_t));
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->arena || !t->user_defined || !t->normal.slots ||
        !t->reserved.slots)
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory for %zu SentencePiece pieces", n_pieces);
    memset(t->normal.slots, 0xff, cap * sizeof(int32_t));
    memset(t->reserved.slots, 0xff, cap * sizeof(int32_t));

    // Pass 2: the pieces, in id order.
    b = (Pb){buf, buf + len};
    char *arena = t->arena;
    int id = 0;
    t->unk_id = -1;
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    while (pb_next(&b, &f, &why) > 0) {
        if (!(f.num == 1 && f.wire == 2)) continue;
        Pb pb = {f.data, f.data + f.len};
        PbField g;
        const uint8_t *str = NULL;
        size_t str_len = 0;
        float score = 0;
        int type = SP_NORMAL;
        while ((r = pb_next(&pb, &g, &why)) > 0) {
            if (g.num == 1 && g.wire == 2) str = g.data, str_len = g.len;
            if (g.num == 2 && g.wire == 5) {
                uint32_t u = (uint32_t)g.v;
                memcpy(&score, &u, sizeof score);
            }
            if (g.num == 3 && g.wire == 0) type = (int)(int32_t)g.v;
        }
        if (r < 0) return FORMAT_ERR("piece %d: %s (truncated or corrupt file)", id, why);
        if (!str || str_len == 0) return FORMAT_ERR("piece %d is empty", id);
        if (memchr(str, 0, str_len)) return FORMAT_ERR("piece %d contains a NUL byte", id);
        if (type < SP_NORMAL || type > SP_BYTE) return FORMAT_ERR("piece %d has unknown type %d", id, type);
        memcpy(arena, str, str_len);
        arena[str_len] = 0;
        t->piece[id] = arena;
        t->piece_len[id] = (uint32_t)str_len;
        t->score[id] = score;
        t->type[id] = (uint8_t)type;
        arena += str_len + 1;

        bool mergeable = type == SP_NORMAL || type == SP_USER_DEFINED || type == SP_UNUSED;
        if (!map_insert(t, mergeable ? &t->normal : &t->reserved, id))
            return FORMAT_ERR("piece %d \"%s\" is defined twice", id, t->piece[id]);
        if (type == SP_USER_DEFINED) t->user_defined[t->n_user++] = id;
        if (type == SP_UNUSED) t->has_unused = true;
        if (type == SP_UNKNOWN) {
            if (t->unk_id >= 0) return FORMAT_ERR("two <unk> pieces (%d and %d)", t->unk_id, id);
            t->unk_id = id;
        }
        if (type == SP_BYTE) {
            if (!s.byte_fallback) return FORMAT_ERR("byte piece %d found although byte_fallback is false", id);
            int v = byte_of_piece(t->piece[id], str_len);
            if (v < 0) return FORMAT_ERR("byte piece %d \"%s\" is not of the form <0xNN>", id, t->piece[id]);
            t->byte_id[v] = id;
        }
        id++;
    }
    if (t->unk_id < 0) return FORMAT_ERR("no <unk> piece");
    t->byte_fallback = s.byte_fallback;
    if (s.byte_fallback)
        for (int v = 0; v < 256; v++)
            if (t->byte_id[v] < 0) return FORMAT_ERR("byte_fallback is on but piece <0x%02X> is missing", v);

    t->add_dummy_prefix = s.add_dummy_prefix;
    t->remove_extra_whitespaces = s.remove_extra_whitespaces;
    t->escape_whitespaces = s.escape_whitespaces;
    // bos/eos as sentencepiece's bos_id(): the id of bos_piece (default "<s>") if it is a control piece.
    int bos = piece_to_id(t, s.bos_piece ? (const char *)s.bos_piece : "<s>", s.bos_piece ? s.bos_len : 3);
    int eos = piece_to_id(t, s.eos_piece ? (const char *)s.eos_piece : "</s>", s.eos_piece ? s.eos_len : 4);
    t->bos_id = bos >= 0 && t->type[bos] == SP_CONTROL ? bos : -1;
    t->eos_id = eos >= 0 && t->type[eos] == SP_CONTROL ? eos : -1;
    const char *surf = s.unk_surface ? (const char *)s.unk_surface : " \xe2\x81\x87 ";
    size_t surf_len = s.unk_surface ? s.unk_surface_len : strlen(surf);
    if (memchr(surf, 0, surf_len)) return FORMAT_ERR("unk_surface contains a NUL byte");
    t->unk_surface = malloc(surf_len + 1);
    if (!t->unk_surface) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    memcpy(t->unk_surface, surf, surf_len);
    t->unk_surface[surf_len] = 0;
    return AGPT_OK;
}

Status sp_load_memory(const void *buf, size_t len, SpTokenizer **out) {
    AGPT_CHECK_ARG(out && (buf || len == 0), "sp_load_memory: NULL argument");
    *out = NULL;
    SpTokenizer *t = calloc(1, sizeof *t);
    if (!t) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    Status st = build(buf, len, t);
    if (st != AGPT_OK) {
        sp_free(t);
        return st;
    }
    *out = t;
    return AGPT_OK;
}

Status sp_load_file(const char *path, SpTokenizer **out) {
    AGPT_CHECK_ARG(path && out, "sp_load_file: NULL argument");
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot open SentencePiece model %s (check the path)", path);
    size_t cap = 1 << 20, len = 0;
    uint8_t *buf = malloc(cap);
    for (size_t got; buf && (got = fread(buf + len, 1, cap - len, f)) > 0;) {
        len += got;
        if (len == cap) {
            if (cap > ((size_t)1 << 30)) {  // LLaMA's is 500 KB; anything this big is not a tokenizer
                free(buf);
                fclose(f);
                return AGPT_FAIL(AGPT_ERR_FORMAT, "%s is over 1 GB: not a SentencePiece model", path);
            }
            uint8_t *q = realloc(buf, cap *= 2);
            if (!q) free(buf);
            buf = q;
        }
    }
    bool read_err = ferror(f);
    fclose(f);
    if (!buf) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory reading %s", path);
    if (read_err) {
        free(buf);
        return AGPT_FAIL(AGPT_ERR_IO, "error reading %s", path);
    }
    Status st = sp_load_memory(buf, len, out);
    free(buf);
    if (st != AGPT_OK) return agpt_add_context(st, "while loading %s", path);
    return AGPT_OK;
}

int sp_vocab_size(const SpTokenizer *t) { return t ? t->n : 0; }
const char *sp_piece(const SpTokenizer *t, int id) { return t && id >= 0 && id < t->n ? t->piece[id] : NULL; }
int sp_bos_id(const SpTokenizer *t) { return t ? t->bos_id : -1; }
int sp_eos_id(const SpTokenizer *t) { return t ? t->eos_id : -1; }
int sp_unk_id(const SpTokenizer *t) { return t ? t->unk_id : -1; }
int sp_piece_to_id(const SpTokenizer *t, const char *piece) {
    if (!t || !piece) return -1;
    size_t n = strlen(piece);
    int32_t id = map_find(t, &t->reserved, piece, n);
    return id >= 0 ? id : map_find(t, &t->normal, piece, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Normalizer

// sentencepiece's DecodeUTF8 validity test: the length of the valid character at s (n bytes left), or 0 when
// the bytes there are malformed (overlong forms, surrogates and values past U+10FFFF included).
static size_t utf8_valid_len(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    if (n >= 2 && (c & 0xe0) == 0xc0) {
        uint32_t cp = (uint32_t)(c & 0x1f) << 6 | (s[1] & 0x3f);
        if ((s[1] & 0xc0) == 0x80 && cp >= 0x80) return 2;
    } else if (n >= 3 && (c & 0xf0) == 0xe0) {
        uint32_t cp = (uint32_t)(c & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f);
        if ((s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80 && cp >= 0x800 && (cp < 0xd800 || cp >= 0xe000))
            return 3;
    } else if (n >= 4 && (c & 0xf8) == 0xf0) {
        uint32_t cp = (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 | (uint32_t)(s[2] & 0x3f) << 6 |
                      (s[3] & 0x3f);
        if ((s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80 && (s[3] & 0xc0) == 0x80 && cp >= 0x10000 &&
            cp <= 0x10ffff)
            return 4;
    }
    return 0;
}

// The longest user-defined piece at s (sentencepiece's PrefixMatcher), or -1.
static int user_defined_at(const SpTokenizer *t, const char *s, size_t n) {
    int best = -1;
    for (int i = 0; i < t->n_user; i++) {
        int id = t->user_defined[i];
        size_t l = t->piece_len[id];
        if (l <= n && memcmp(s, t->piece[id], l) == 0 && (best < 0 || l > t->piece_len[best])) best = id;
    }
    return best;
}

// Normalizer::Normalize for a model without charsmap. out must hold 3 * len + 3 bytes (each input byte becomes
// at most 3: a space becomes "▁", a malformed byte U+FFFD). Returns the normalized length.
static size_t normalize(const SpTokenizer *t, const char *in, size_t len, char *out) {
    const uint8_t *s = (const uint8_t *)in, *end = s + len;
    size_t o = 0;
    if (t->remove_extra_whitespaces)
        while (s < end && *s == ' ') s++;
    if (s == end) return 0;
    if (t->add_dummy_prefix) {
        memcpy(out, t->escape_whitespaces ? kSpace : " ", t->escape_whitespaces ? 3 : 1);
        o += t->escape_whitespaces ? 3 : 1;
    }
    bool prev_space = t->remove_extra_whitespaces;
    while (s < end) {
        // One "prefix": a user-defined piece (kept verbatim), a valid character, or one malformed byte -> U+FFFD.
        const char *piece;
        size_t piece_len, consumed;
        int ud = user_defined_at(t, (const char *)s, (size_t)(end - s));
        if (ud >= 0) {
            piece = t->piece[ud], piece_len = consumed = t->piece_len[ud];
        } else if ((consumed = utf8_valid_len(s, (size_t)(end - s))) > 0) {
            piece = (const char *)s, piece_len = consumed;
        } else {
            piece = kReplacement, piece_len = 3, consumed = 1;
        }
        size_t k = 0;
        if (prev_space)
            while (k < piece_len && piece[k] == ' ') k++;
        if (k < piece_len) {
            for (; k < piece_len; k++) {
                if (t->escape_whitespaces && piece[k] == ' ') {
                    memcpy(out + o, kSpace, 3);
                    o += 3;
                } else {
                    out[o++] = piece[k];
                }
            }
            prev_space = piece[piece_len - 1] == ' ';
        }
        s += consumed;
        if (!t->remove_extra_whitespaces) prev_space = false;
    }
    if (t->remove_extra_whitespaces) {  // drop trailing spaces (escaped or not)
        const char *sp = t->escape_whitespaces ? kSpace : " ";
        size_t sl = t->escape_whitespaces ? 3 : 1;
        while (o >= sl && memcmp(out + o - sl, sp, sl) == 0) o -= sl;
    }
    return o;
}

// ---------------------------------------------------------------------------------------------------------------
// BPE (bpe_model.cc's Model::SampleEncode without dropout)

typedef struct Symbol {
    int32_t start, len;  // bytes of the normalized text; len 0 once merged into its left neighbour
    int32_t prev, next;
    bool freeze;         // a user-defined piece: never merged
} Symbol;

typedef struct Pair {
    int32_t left, right, size;  // size: merged length in bytes when pushed; a mismatch later means stale
    float score;
} Pair;

// The heap's order: higher score first, then the leftmost pair.
static bool pair_before(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct Bpe {
    const SpTokenizer *t;
    const char *text;
    Symbol *sym;
    Pair *heap;
    size_t heap_n, heap_cap;
    int32_t *rev_left;  // [vocab] for UNUSED pieces: byte length of the left part of their last merge, or -1
} Bpe;

static void heap_push(Bpe *b, Pair p) {
    size_t i = b->heap_n++;  // capacity is sized in sp_encode: at most 3 pushes per symbol
    while (i > 0 && pair_before(&p, &b->heap[(i - 1) / 2])) {
        b->heap[i] = b->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    b->heap[i] = p;
}

static Pair heap_pop(Bpe *b) {
    Pair top = b->heap[0], last = b->heap[--b->heap_n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const Pair *best = &last;
        if (l < b->heap_n && pair_before(&b->heap[l], best)) m = l, best = &b->heap[l];
        if (l + 1 < b->heap_n && pair_before(&b->heap[l + 1], best)) m = l + 1;
        if (m == i) break;
        b->heap[i] = b->heap[m];
        i = m;
    }
    if (b->heap_n) b->heap[i] = last;
    return top;
}

static void maybe_add_pair(Bpe *b, int32_t left, int32_t right) {
    if (left < 0 || right < 0 || b->sym[left].freeze || b->sym[right].freeze) return;
    const SpTokenizer *t = b->t;
    int32_t size = b->sym[left].len + b->sym[right].len;
    int32_t id = map_find(t, &t->normal, b->text + b->sym[left].start, (size_t)size);
    if (id < 0) return;
    heap_push(b, (Pair){left, right, size, t->score[id]});
    // An UNUSED piece may be formed but not emitted: remember how it was made to split it again at the end.
    if (t->type[id] == SP_UNUSED) b->rev_left[id] = b->sym[left].len;
}

// Ids of the piece text[start, start+len), UNUSED pieces split back recursively, unknown ones as bytes.
// Returns the count written (or that would be written past cap).
static int emit(const Bpe *b, int32_t start, int32_t len, int32_t *ids, int cap, int n) {
    const SpTokenizer *t = b->t;
    int32_t id = piece_to_id(t, b->text + start, (size_t)len);
    if (t->type[id] == SP_UNUSED && b->rev_left[id] > 0 && b->rev_left[id] < len) {
        int32_t l = b->rev_left[id];
        n = emit(b, start, l, ids, cap, n);
        return emit(b, start + l, len - l, ids, cap, n);
    }
    if (id == t->unk_id && t->byte_fallback) {
        for (int32_t i = 0; i < len; i++, n++)
            if (n < cap) ids[n] = t->byte_id[(uint8_t)b->text[start + i]];
        return n;
    }
    if (n < cap) ids[n] = id;
    return n + 1;
}

Status sp_encode(const SpTokenizer *t, const char *text, int32_t *ids, int cap, int *n) {
    AGPT_CHECK_ARG(t && text && n && (ids || cap == 0) && cap >= 0, "sp_encode: bad argument");
    *n = 0;
    size_t len = strlen(text);
    // Every symbol index and byte offset must fit an int32 (and the output count an int).
    if (len > (size_t)INT32_MAX / 8) return AGPT_FAIL(AGPT_ERR_ARG, "sp_encode: text of %zu bytes is too long", len);
    Bpe b = {.t = t};
    char *norm = malloc(3 * len + 3);
    b.sym = malloc((len + 1) * sizeof *b.sym);
    b.heap_cap = 3 * (len + 1);
    b.heap = malloc(b.heap_cap * sizeof *b.heap);
    if (t->has_unused) {
        b.rev_left = malloc((size_t)t->n * sizeof *b.rev_left);
        if (b.rev_left) memset(b.rev_left, 0xff, (size_t)t->n * sizeof *b.rev_left);
    }
    Status st = AGPT_OK;
    if (!norm || !b.sym || !b.heap || (t->has_unused && !b.rev_left)) {
        st = AGPT_FAIL(AGPT_ERR_OOM, "out of memory encoding a text of %zu bytes", len);
        goto done;
    }
    size_t nlen = normalize(t, text, len, norm);
    b.text = norm;

    // Symbols: user-defined pieces, else one UTF-8 character (the normalized text is valid UTF-8, but the length
    // comes from the lead byte, as in sentencepiece, and is clipped to the text).
    int32_t n_sym = 0;
    for (size_t i = 0; i < nlen;) {
        int ud = user_defined_at(t, norm + i, nlen - i);
        size_t l;
        if (ud >= 0) {
            l = t->piece_len[ud];
        } else {
            static const uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
            l = kLen[(uint8_t)norm[i] >> 4];
            if (l > nlen - i) l = nlen - i;
        }
        b.sym[n_sym] = (Symbol){(int32_t)i, (int32_t)l, n_sym - 1, i + l < nlen ? n_sym + 1 : -1, ud >= 0};
        n_sym++;
        i += l;
    }
    // Pushes: n_sym - 1 initial pairs, then at most 2 per merge (n_sym - 1 merges): under 3 * (len + 1).
    for (int32_t i = 1; i < n_sym; i++) maybe_add_pair(&b, i - 1, i);
    while (b.heap_n) {
        Pair top = heap_pop(&b);
        Symbol *l = &b.sym[top.left], *r = &b.sym[top.right];
        // Stale: one side was merged away, or the left symbol grew since the pair was pushed.
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size || l->next != top.right) continue;
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) b.sym[r->next].prev = top.left;
        r->len = 0;
        maybe_add_pair(&b, l->prev, top.left);
        maybe_add_pair(&b, top.left, l->next);
    }
    int count = 0;
    for (int32_t i = n_sym ? 0 : -1; i >= 0; i = b.sym[i].next)
        count = emit(&b, b.sym[i].start, b.sym[i].len, ids, cap, count);
    *n = count;
    if (count > cap)
        st = AGPT_FAIL(AGPT_ERR_ARG, "sp_encode: the text needs %d ids but the buffer holds %d", count, cap);
done:
    free(norm);
    free(b.sym);
    free(b.heap);
    free(b.rev_left);
    return st;
}

// ---------------------------------------------------------------------------------------------------------------
// Decode

typedef struct Buf {
    char *p;
    size_t n, cap;
    bool oom;
} Buf;

static void buf_put(Buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

// A run of byte pieces as text: valid UTF-8 characters as they are, every other byte as U+FFFD.
static void put_bytes(Buf *out, const uint8_t *bytes, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t l = utf8_valid_len(bytes + i, n - i);
        if (l) {
            buf_put(out, (const char *)bytes + i, l);
            i += l;
        } else {
            buf_put(out, kReplacement, 3);
            i++;
        }
    }
}

Status sp_decode(const SpTokenizer *t, const int32_t *ids, int n, char **out) {
    AGPT_CHECK_ARG(t && out && (ids || n == 0) && n >= 0, "sp_decode: bad argument");
    *out = NULL;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->n)
            return AGPT_FAIL(AGPT_ERR_ARG, "sp_decode: id %d at position %d is outside the vocabulary [0, %d)",
                             ids[i], i, t->n);
    Buf o = {0};
    uint8_t *bytes = malloc((size_t)n + 1);
    if (!bytes) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory decoding %d ids", n);
    size_t n_bytes = 0;
    // The dummy prefix: sentencepiece strips "▁" from the first piece only while nothing visible came before
    // (control pieces are invisible; a byte run or <unk> ends the chance).
    bool bos_ws = t->add_dummy_prefix || t->remove_extra_whitespaces;
    for (int i = 0; i <= n; i++) {
        int type = i < n ? t->type[ids[i]] : 0;
        if (type == SP_BYTE) {
            bytes[n_bytes++] = (uint8_t)byte_of_piece(t->piece[ids[i]], t->piece_len[ids[i]]);
            continue;
        }
        if (n_bytes) {
            put_bytes(&o, bytes, n_bytes);
            n_bytes = 0;
            bos_ws = false;
        }
        if (i == n || type == SP_CONTROL) continue;
        if (type == SP_UNKNOWN) {
            buf_put(&o, t->unk_surface, strlen(t->unk_surface));
            bos_ws = false;
            continue;
        }
        const char *p = t->piece[ids[i]], *end = p + t->piece_len[ids[i]];
        if (bos_ws && end - p >= 3 && memcmp(p, kSpace, 3) == 0) p += 3;
        bos_ws = false;
        while (p < end) {
            if (end - p >= 3 && memcmp(p, kSpace, 3) == 0) {
                buf_put(&o, " ", 1);
                p += 3;
            } else {
                buf_put(&o, p++, 1);
            }
        }
    }
    free(bytes);
    buf_put(&o, "", 0);
    if (o.oom) {
        free(o.p);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory decoding %d ids", n);
    }
    o.p[o.n] = 0;
    *out = o.p;
    return AGPT_OK;
}
