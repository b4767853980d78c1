// The CLIP text cleanup: whitespace_clean(basic_clean(text)).lower(), a C rendering of the Python functions it
// replaces (ftfy.fix_text, html.unescape, str.strip, regex.sub, str.lower), named in each section. See
// clip_text_clean.h, and clip_tokenizer.h for the steps in order.
//
// Text is handled as arrays of code points (uint32_t), like Python's str, so every step can be checked against
// the Python it mirrors one character at a time; UTF-8 appears only at the input.
#include "model/clip_text_clean.h"

#include <stdlib.h>
#include <string.h>

#include "model/unicode_tables.h"

// ---- growable code-point buffers ---------------------------------------------------------------------------
// A failed allocation sets `oom` and turns every later push into a no-op, so a stage runs straight through and
// the caller checks once at the end.

typedef struct CpBuf {
    uint32_t *v;
    size_t n, cap;
    bool oom;
} CpBuf;

static bool cp_reserve(CpBuf *b, size_t extra) {
    if (b->oom) return false;
    if (extra <= b->cap - b->n) return true;
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->n < extra) {
        if (cap > SIZE_MAX / 2 / sizeof(uint32_t)) {
            b->oom = true;
            return false;
        }
        cap *= 2;
    }
    uint32_t *v = realloc(b->v, cap * sizeof *v);
    if (!v) {
        b->oom = true;
        return false;
    }
    b->v = v;
    b->cap = cap;
    return true;
}

static void cp_push(CpBuf *b, uint32_t c) {
    if (cp_reserve(b, 1)) b->v[b->n++] = c;
}

static void cp_append(CpBuf *b, const uint32_t *v, size_t n) {
    if (n && cp_reserve(b, n)) {
        memcpy(b->v + b->n, v, n * sizeof *v);
        b->n += n;
    }
}

static void cp_free(CpBuf *b) {
    free(b->v);
    *b = (CpBuf){0};
}

static void cp_swap(CpBuf *a, CpBuf *b) {
    CpBuf t = *a;
    *a = *b;
    *b = t;
}

// ---- UTF-8 ---------------------------------------------------------------------------------------------------

// One code point from s[0, n), n >= 1: returns it and sets *len to the bytes used. An ill-formed sequence
// returns CLIP_UTF8_BAD with *len = its maximal valid prefix (at least 1 byte), the unit that Python's
// errors="replace" turns into one U+FFFD. Surrogates (ED A0..BF) and overlongs (C0, C1, E0 80..9F, F0 80..8F)
// are ill-formed, as are code points past U+10FFFF (F4 90.., F5..FF).
uint32_t clip_utf8_decode_one(const uint8_t *s, size_t n, size_t *len) {
    uint8_t b = s[0];
    *len = 1;
    if (b < 0x80) return b;
    int need;
    uint32_t cp;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b >= 0xC2 && b <= 0xDF) {
        need = 1, cp = b & 0x1F;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 2, cp = b & 0x0F;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3, cp = b & 0x07;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else {
        return CLIP_UTF8_BAD;
    }
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n || s[k] < (k == 1 ? lo : 0x80) || s[k] > (k == 1 ? hi : 0xBF)) {
            *len = (size_t)k;
            return CLIP_UTF8_BAD;
        }
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    *len = (size_t)need + 1;
    return cp;
}

// bytes.decode("utf-8", errors="replace").
static void utf8_decode(const uint8_t *s, size_t n, CpBuf *out) {
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t c = clip_utf8_decode_one(s + i, n - i, &len);
        cp_push(out, c == CLIP_UTF8_BAD ? 0xFFFD : c);
    }
}

// ---- Unicode data lookups (model/unicode_tables.c) -----------------------------------------------------------

static uint8_t run_lookup(const UniRun *runs, int count, uint32_t cp) {
    int lo = 0, hi = count - 1;  // runs[0].first == 0, so the answer exists
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (runs[mid].first <= cp) lo = mid;
        else hi = mid - 1;
    }
    return runs[lo].value;
}

static uint8_t props(uint32_t cp) { return run_lookup(uni_props, uni_props_count, cp); }
int clip_scan_class(uint32_t cp) { return props(cp) & UNI_SCAN_MASK; }
bool clip_is_py_space(uint32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 9 && cp <= 13) || (cp >= 0x1C && cp <= 0x1F);
    return props(cp) & UNI_PY_SPACE;
}
static bool is_regex_space(uint32_t cp) { return cp == ' ' || (props(cp) & UNI_REGEX_SPACE); }
static uint8_t ccc(uint32_t cp) { return cp < 0x300 ? 0 : run_lookup(uni_ccc, uni_ccc_count, cp); }

static bool sorted_u32_contains(const uint32_t *v, int count, uint32_t cp) {
    int lo = 0, hi = count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (v[mid] == cp) return true;
        if (v[mid] < cp) lo = mid + 1;
        else hi = mid - 1;
    }
    return false;
}

static const UniMulti *multi_find(const UniMulti *v, int count, uint32_t cp) {
    int lo = 0, hi = count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (v[mid].cp == cp) return &v[mid];
        if (v[mid].cp < cp) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

static int multi_len(const UniMulti *m) { return m->to[2] ? 3 : m->to[1] ? 2 : 1; }

// html.entities.html5 by name (code points, no ';'); NULL when absent or not ASCII.
static const UniEntity *entity_find(const uint32_t *name, size_t len) {
    char key[40];
    if (len == 0 || len >= sizeof key) return NULL;
    for (size_t i = 0; i < len; i++) {
        if (name[i] >= 0x80 || name[i] == 0) return NULL;
        key[i] = (char)name[i];
    }
    key[len] = 0;
    int lo = 0, hi = uni_entities_count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        int c = strcmp(uni_entities[mid].name, key);
        if (c == 0) return &uni_entities[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

static void entity_value(const UniEntity *e, CpBuf *out) {
    cp_push(out, e->value[0]);
    if (e->value[1]) cp_push(out, e->value[1]);
}

static bool is_ascii_alnum(uint32_t c) { return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'); }
static bool is_ascii_digit(uint32_t c) { return c >= '0' && c <= '9'; }
static bool is_ascii_xdigit(uint32_t c) { return is_ascii_digit(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f'); }
static int xdigit_value(uint32_t c) { return c <= '9' ? (int)(c - '0') : (int)((c | 0x20) - 'a' + 10); }

// ---- html.unescape (Python's html module) ----------------------------------------------------------------------
// Replaces every match of  &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)  as _replace_charref does.

static void html_charref(uint32_t num, CpBuf *out) {
    for (int i = 0; i < uni_invalid_charrefs_count; i++) {
        if (uni_invalid_charrefs[i].from == num) {
            cp_push(out, uni_invalid_charrefs[i].to);
            return;
        }
    }
    if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
        cp_push(out, 0xFFFD);
        return;
    }
    if (sorted_u32_contains(uni_invalid_codepoints, uni_invalid_codepoints_count, num)) return;  // dropped
    cp_push(out, num);
}

static void html_unescape(const uint32_t *s, size_t n, CpBuf *out) {
    out->n = 0;
    size_t i = 0;
    while (i < n) {
        if (s[i] != '&') {
            cp_push(out, s[i++]);
            continue;
        }
        size_t j = i + 1;
        if (j < n && s[j] == '#') {
            bool hex = j + 1 < n && (s[j + 1] == 'x' || s[j + 1] == 'X');
            size_t d = j + (hex ? 2 : 1), k = d;
            // Python's int() has no ceiling; anything above 0x10FFFF behaves alike, so saturate there.
            uint32_t num = 0;
            while (k < n && (hex ? is_ascii_xdigit(s[k]) : is_ascii_digit(s[k]))) {
                uint32_t v = hex ? (uint32_t)xdigit_value(s[k]) : s[k] - '0';
                num = num > 0x10FFFF ? 0x110000 : num * (hex ? 16 : 10) + v;
                k++;
            }
            if (k == d) {  // "&#" or "&#x" without digits: not a reference ('#' also ends the named form)
                cp_push(out, s[i++]);
                continue;
            }
            if (k < n && s[k] == ';') k++;
            html_charref(num, out);
            i = k;
            continue;
        }
        size_t k = j;
        while (k < n && k - j < 32 && s[k] != '\t' && s[k] != '\n' && s[k] != '\f' && s[k] != ' ' && s[k] != '<' &&
               s[k] != '&' && s[k] != '#' && s[k] != ';')
            k++;
        if (k == j) {
            cp_push(out, s[i++]);
            continue;
        }
        size_t name_len = k - j;
        bool semi = k < n && s[k] == ';';
        size_t end = k + (semi ? 1 : 0);  // the match is s[i, end); "s" in Python is s[j, end)
        const UniEntity *e = entity_find(s + j, name_len);
        if (e && (semi || (e->flags & UNI_ENTITY_LEGACY))) {
            entity_value(e, out);
            i = end;
            continue;
        }
        // The longest legacy (no ';') entity that prefixes the name, at least 2 characters; the rest stays.
        size_t full = end - j;  // len(s) in Python, ';' included
        bool found = false;
        for (size_t x = full - 1; x >= 2; x--) {  // x <= name_len: a prefix never includes the ';'
            e = entity_find(s + j, x);
            if (e && (e->flags & UNI_ENTITY_LEGACY)) {
                entity_value(e, out);
                cp_append(out, s + j + x, end - (j + x));
                found = true;
                break;
            }
        }
        if (!found) cp_append(out, s + i, end - i);
        i = end;
    }
}

// ---- ftfy.fix_text (ftfy 6.3.1, default TextFixerConfig) -------------------------------------------------------
// Per line (and per 1e6 code points, max_decode_length), fix_and_explain repeats these steps until the text
// stops changing: unescape_html, [fix_encoding: not implemented, see clip_tokenizer.h], fix_c1_controls,
// fix_latin_ligatures, fix_character_width, uncurl_quotes, fix_line_breaks, fix_surrogates (nothing to do:
// decoded UTF-8 has no surrogates), remove_terminal_escapes, remove_control_chars, NFC.

// ftfy's unescape_html: only  &#?[0-9A-Za-z]{1,24};  is considered, decoded through ftfy's HTML_ENTITIES (the
// html5 names that end in ';', plus capitalised forms of some lowercase names) or, for "&#...;", through
// html.unescape when that consumes the whole match.
static void ftfy_unescape_html(const uint32_t *s, size_t n, CpBuf *out, CpBuf *tmp) {
    out->n = 0;
    size_t i = 0;
    while (i < n) {
        if (s[i] != '&') {
            cp_push(out, s[i++]);
            continue;
        }
        bool hash = i + 1 < n && s[i + 1] == '#';
        size_t j = i + 1 + (hash ? 1 : 0), k = j;
        while (k < n && k - j < 25 && is_ascii_alnum(s[k])) k++;
        size_t len = k - j;
        if (len < 1 || len > 24 || k >= n || s[k] != ';') {  // a longer run cannot end in ';' within 24
            cp_push(out, s[i++]);
            continue;
        }
        size_t end = k + 1;
        if (hash) {
            html_unescape(s + i, end - i, tmp);
            bool has_semicolon = false;
            for (size_t t = 0; t < tmp->n; t++) has_semicolon |= tmp->v[t] == ';';
            if (has_semicolon) cp_append(out, s + i, end - i);  // only part was decoded: keep the original
            else cp_append(out, tmp->v, tmp->n);
            i = end;
            continue;
        }
        const UniEntity *e = entity_find(s + j, len);
        if (e) {
            entity_value(e, out);
        } else {
            // "&NAME;" in capitals: ftfy knows it when NAME lowercased is a flagged html5 name.
            uint32_t low[24];
            bool capitals = true;
            for (size_t t = 0; t < len; t++) {
                uint32_t c = s[j + t];
                if (c >= 'a' && c <= 'z') capitals = false;
                low[t] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
            }
            e = capitals ? entity_find(low, len) : NULL;
            if (e && (e->flags & UNI_ENTITY_FTFY_UPPER)) {
                if (e->upper[0]) {
                    for (int t = 0; t < 3 && e->upper[t]; t++) cp_push(out, e->upper[t]);
                } else {
                    entity_value(e, out);
                }
            } else {
                cp_append(out, s + i, end - i);
            }
        }
        i = end;
    }
}

// The context-free translate steps, composed per character in ftfy's order: fix_c1_controls (U+0080..U+009F
// as sloppy windows-1252), fix_latin_ligatures, fix_character_width, uncurl_quotes.
static void ftfy_uncurl(uint32_t c, CpBuf *out) {
    if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) c = '\'';
    else if (c >= 0x201C && c <= 0x201F) c = '"';
    cp_push(out, c);
}

static void ftfy_width_then_uncurl(uint32_t c, CpBuf *out) {
    bool maybe = c == 0x3000 || (c >= 0xFF01 && c <= 0xFFEF);
    const UniMulti *m = maybe ? multi_find(uni_ftfy_width, uni_ftfy_width_count, c) : NULL;
    if (!m) {
        ftfy_uncurl(c, out);
        return;
    }
    for (int t = 0; t < multi_len(m); t++) ftfy_uncurl(m->to[t], out);
}

static void ftfy_translate(const uint32_t *s, size_t n, CpBuf *out) {
    out->n = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c < 0x80) {  // none of these steps touches ASCII
            cp_push(out, c);
            continue;
        }
        if (c <= 0x9F) c = uni_ftfy_c1[c - 0x80];
        const UniMulti *lig = multi_find(uni_ftfy_ligatures, uni_ftfy_ligatures_count, c);
        if (!lig) {
            ftfy_width_then_uncurl(c, out);
            continue;
        }
        for (int t = 0; t < multi_len(lig); t++) ftfy_width_then_uncurl(lig->to[t], out);
    }
}

// fix_line_breaks: \r\n, \r, U+2028, U+2029, U+0085 -> \n.
static void ftfy_line_breaks(const uint32_t *s, size_t n, CpBuf *out) {
    out->n = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c == '\r') {
            if (i + 1 < n && s[i + 1] == '\n') i++;
            c = '\n';
        } else if (c == 0x2028 || c == 0x2029 || c == 0x85) {
            c = '\n';
        }
        cp_push(out, c);
    }
}

// remove_terminal_escapes: deletes  \033\[((?:\d|;)*)([a-zA-Z])  (\d is any Unicode decimal digit, as in re);
// then remove_control_chars: deletes ftfy's CONTROL_CHARS. Two passes in ftfy; fused here, which is the same
// because the escape pattern is matched before any of its ESC characters would be deleted.
static void ftfy_escapes_and_controls(const uint32_t *s, size_t n, CpBuf *out) {
    CpBuf *o = out;
    o->n = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c == 0x1B && i + 1 < n && s[i + 1] == '[') {
            size_t k = i + 2;
            while (k < n && (s[k] == ';' || (props(s[k]) & UNI_PY_DECIMAL))) k++;
            if (k < n && ((s[k] | 0x20) >= 'a' && (s[k] | 0x20) <= 'z')) {
                i = k;  // drop the whole sequence
                continue;
            }
        }
        if ((c < 0x80 || c >= 0x206A) && sorted_u32_contains(uni_ftfy_control, uni_ftfy_control_count, c)) continue;
        cp_push(o, c);
    }
}

// ---- NFC (unicodedata.normalize("NFC")) -----------------------------------------------------------------------

enum { HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7, HANGUL_LN = 19, HANGUL_VN = 21,
       HANGUL_TN = 28, HANGUL_SN = 11172 };

static void nfc_decompose(uint32_t c, CpBuf *out) {
    if (c < 0xC0) {  // nothing below U+00C0 decomposes
        cp_push(out, c);
        return;
    }
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_SN) {
        uint32_t s = c - HANGUL_S;
        cp_push(out, HANGUL_L + s / (HANGUL_VN * HANGUL_TN));
        cp_push(out, HANGUL_V + (s % (HANGUL_VN * HANGUL_TN)) / HANGUL_TN);
        if (s % HANGUL_TN) cp_push(out, HANGUL_T + s % HANGUL_TN);
        return;
    }
    int lo = 0, hi = uni_decomp_count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (uni_decomp[mid].cp == c) {
            cp_append(out, uni_decomp_pool + uni_decomp[mid].offset, uni_decomp[mid].len);
            return;
        }
        if (uni_decomp[mid].cp < c) lo = mid + 1;
        else hi = mid - 1;
    }
    cp_push(out, c);
}

// The primary composite of (a, b), or 0.
static uint32_t nfc_compose_pair(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_LN && b >= HANGUL_V && b < HANGUL_V + HANGUL_VN)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VN + (b - HANGUL_V)) * HANGUL_TN;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SN && (a - HANGUL_S) % HANGUL_TN == 0 && b > HANGUL_T &&
        b < HANGUL_T + HANGUL_TN)
        return a + (b - HANGUL_T);
    int lo = 0, hi = uni_compose_count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const UniCompose *p = &uni_compose[mid];
        if (p->first == a && p->second == b) return p->composite;
        if (p->first < a || (p->first == a && p->second < b)) lo = mid + 1;
        else hi = mid - 1;
    }
    return 0;
}

// Stable sort of a run of non-starters by combining class. Runs are nearly always a few marks long; a long
// one (hostile input) gets a counting sort so the pass stays linear.
static void nfc_sort_run(uint32_t *v, size_t n, CpBuf *tmp) {
    if (n < 32) {
        for (size_t i = 1; i < n; i++) {
            uint32_t c = v[i];
            uint8_t cc = ccc(c);
            size_t j = i;
            while (j > 0 && ccc(v[j - 1]) > cc) {
                v[j] = v[j - 1];
                j--;
            }
            v[j] = c;
        }
        return;
    }
    size_t start[257] = {0};
    for (size_t i = 0; i < n; i++) start[ccc(v[i]) + 1]++;
    for (int k = 1; k <= 256; k++) start[k] += start[k - 1];
    tmp->n = 0;
    if (!cp_reserve(tmp, n)) return;
    for (size_t i = 0; i < n; i++) tmp->v[start[ccc(v[i])]++] = v[i];
    memcpy(v, tmp->v, n * sizeof *v);
}

static void nfc(const uint32_t *s, size_t n, CpBuf *out, CpBuf *tmp) {
    out->n = 0;
    bool all_below = true;  // nothing below U+0300 decomposes-and-recomposes differently or combines
    for (size_t i = 0; i < n && all_below; i++) all_below = s[i] < 0x300;
    if (all_below) {
        cp_append(out, s, n);
        return;
    }
    for (size_t i = 0; i < n; i++) nfc_decompose(s[i], out);
    if (out->oom) return;
    // Canonical order: each maximal run of non-starters sorted by class.
    for (size_t i = 0; i < out->n;) {
        if (ccc(out->v[i]) == 0) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < out->n && ccc(out->v[j]) != 0) j++;
        if (j - i > 1) nfc_sort_run(out->v + i, j - i, tmp);
        i = j;
    }
    // Canonical composition, in place: a character joins the last starter unless something in between
    // blocks it (a starter, or a mark of the same or higher class).
    size_t w = 0;
    long starter = -1;
    int last_cc = -1;  // class of the last character kept after the starter; -1: none yet
    for (size_t i = 0; i < out->n; i++) {
        uint32_t c = out->v[i];
        int cc = ccc(c);
        if (starter >= 0 && (last_cc == -1 || last_cc < cc)) {
            uint32_t comp = nfc_compose_pair(out->v[starter], c);
            if (comp) {
                out->v[starter] = comp;
                continue;
            }
        }
        if (cc == 0) {
            starter = (long)w;
            last_cc = -1;
        } else {
            last_cc = cc;
        }
        out->v[w++] = c;
    }
    out->n = w;
}

// ---- fix_text driver ---------------------------------------------------------------------------------------

typedef struct Work {
    CpBuf a, b, c, d, e;  // scratch for the stages; reused across segments and calls within one tokenize
} Work;

static void work_free(Work *w) {
    cp_free(&w->a), cp_free(&w->b), cp_free(&w->c), cp_free(&w->d), cp_free(&w->e);
}

static bool work_oom(const Work *w) { return w->a.oom || w->b.oom || w->c.oom || w->d.oom || w->e.oom; }

// fix_and_explain on one segment, appended to out.
static void ftfy_fix_segment(const uint32_t *s, size_t n, bool unescape, CpBuf *out, Work *w) {
    CpBuf *cur = &w->a, *next = &w->b, *orig = &w->c;
    cur->n = 0;
    cp_append(cur, s, n);
    for (;;) {
        orig->n = 0;
        cp_append(orig, cur->v, cur->n);
        if (unescape) {
            ftfy_unescape_html(cur->v, cur->n, next, &w->d);
            cp_swap(cur, next);
        }
        ftfy_translate(cur->v, cur->n, next);
        cp_swap(cur, next);
        ftfy_line_breaks(cur->v, cur->n, next);
        cp_swap(cur, next);
        ftfy_escapes_and_controls(cur->v, cur->n, next);
        cp_swap(cur, next);
        nfc(cur->v, cur->n, next, &w->d);
        cp_swap(cur, next);
        if (work_oom(w)) return;
        if (cur->n == orig->n && (cur->n == 0 || memcmp(cur->v, orig->v, cur->n * sizeof *cur->v) == 0)) break;
    }
    cp_append(out, cur->v, cur->n);
}

static void ftfy_fix_text(const uint32_t *s, size_t n, CpBuf *out, Work *w) {
    out->n = 0;
    bool unescape = true;  // "auto": off from the first segment containing '<' onwards
    size_t pos = 0;
    while (pos < n) {
        size_t brk = pos;
        while (brk < n && s[brk] != '\n') brk++;
        brk = brk < n ? brk + 1 : n;
        if (brk - pos > 1000000) brk = pos + 1000000;  // max_decode_length
        for (size_t i = pos; i < brk && unescape; i++) unescape = s[i] != '<';
        ftfy_fix_segment(s + pos, brk - pos, unescape, out, w);
        pos = brk;
    }
}

// ---- the rest of the cleanup ---------------------------------------------------------------------------------

// str.strip(): trims str.isspace() characters at both ends, in place.
static void py_strip(CpBuf *b) {
    size_t lo = 0, hi = b->n;
    while (lo < hi && clip_is_py_space(b->v[lo])) lo++;
    while (hi > lo && clip_is_py_space(b->v[hi - 1])) hi--;
    if (lo > 0) memmove(b->v, b->v + lo, (hi - lo) * sizeof *b->v);
    b->n = hi - lo;
}

// regex.sub(r"\s+", " ", text), in place.
static void collapse_space(CpBuf *b) {
    size_t w = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (is_regex_space(b->v[i])) {
            while (i + 1 < b->n && is_regex_space(b->v[i + 1])) i++;
            b->v[w++] = ' ';
        } else {
            b->v[w++] = b->v[i];
        }
    }
    b->n = w;
}

// Final_Sigma as CPython's handle_capital_sigma: a cased letter (skipping case-ignorables) before, and no cased
// letter (skipping case-ignorables) after.
static bool final_sigma(const uint32_t *s, size_t n, size_t i) {
    size_t j = i;
    while (j > 0 && (props(s[j - 1]) & UNI_CASE_IGNORABLE)) j--;
    if (j == 0 || !(props(s[j - 1]) & UNI_CASED)) return false;
    j = i + 1;
    while (j < n && (props(s[j]) & UNI_CASE_IGNORABLE)) j++;
    return j == n || !(props(s[j]) & UNI_CASED);
}

// str.lower().
static void py_lower(const uint32_t *s, size_t n, CpBuf *out) {
    out->n = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c < 0x80) {
            cp_push(out, (c >= 'A' && c <= 'Z') ? c + 32 : c);
            continue;
        }
        if (c == 0x3A3) {
            cp_push(out, final_sigma(s, n, i) ? 0x3C2 : 0x3C3);
            continue;
        }
        const UniMulti *m = multi_find(uni_lower_multi, uni_lower_multi_count, c);
        if (m) {
            cp_append(out, m->to, (size_t)multi_len(m));
            continue;
        }
        int lo = 0, hi = uni_lower_count - 1;
        while (lo <= hi) {
            int mid = (lo + hi) / 2;
            const UniLowerRun *r = &uni_lower[mid];
            if (c < r->first) {
                hi = mid - 1;
            } else if (c > r->last) {
                lo = mid + 1;
            } else {
                if ((c - r->first) % r->stride == 0) c = (uint32_t)((int32_t)c + r->delta);
                break;
            }
        }
        cp_push(out, c);
    }
}

// The whole cleanup: whitespace_clean(basic_clean(text)).lower(), into `out`.
static Status clean_text(const char *text, CpBuf *out, Work *w) {
    CpBuf *x = &w->e;
    x->n = 0;
    utf8_decode((const uint8_t *)text, strlen(text), x);
    ftfy_fix_text(x->v, x->n, out, w);
    html_unescape(out->v, out->n, x);
    html_unescape(x->v, x->n, out);
    py_strip(out);
    collapse_space(out);
    py_strip(out);
    py_lower(out->v, out->n, x);
    cp_swap(out, x);
    if (out->oom || work_oom(w))
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory cleaning a text of %zu bytes", strlen(text));
    return AGPT_OK;
}

Status clip_clean_codepoints(const char *text, uint32_t **out, size_t *n) {
    *out = NULL;
    *n = 0;
    Work w = {0};
    CpBuf clean = {0};
    Status st = clean_text(text, &clean, &w);
    work_free(&w);
    if (st != AGPT_OK) {
        cp_free(&clean);
        return st;
    }
    *out = clean.v;
    *n = clean.n;
    return AGPT_OK;
}
