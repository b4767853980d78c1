#!/usr/bin/env python3
"""Generates model/unicode_tables.h and model/unicode_tables.c: the Unicode data behind the CLIP tokenizer's text
cleanup (model/clip_text_clean.c).

The tokenizer must reproduce, in C, what ImageBind's SimpleTokenizer does in Python:
    ftfy.fix_text -> html.unescape x2 -> str.strip -> regex sub(r'\\s+', ' ') -> str.strip -> str.lower
    -> regex findall of the CLIP pre-token pattern (IGNORECASE).
Each of those reads its own Unicode data (Python's unicodedata, the `regex` module's bundled database, ftfy's
tables, the html module's entity table). Rather than re-deriving that data from the UCD files, every table here
is read from the very library whose behaviour it stands for, so the C side matches those exact versions:
  - NFC (ftfy's normalisation), str.lower, str.isspace, re's \\d: Python's unicodedata / str methods.
  - Letter / number / whitespace classes of the pre-token pattern: the `regex` module itself, probed with the
    pattern's own character classes under IGNORECASE (which differs from the plain categories, e.g. U+0345).
  - HTML entities, invalid character references: Python's html module.
  - Ligatures, width map, control characters, all-caps entities, sloppy windows-1252: ftfy's own tables.

Needs `regex` and `ftfy`, so run it with the reference venv:
    tests/reference/.venv/bin/python tools/gen_unicode_tables.py
and commit its output. The generated header records the versions it read.
"""
import html
import html.entities
import os
import re
import sys
import unicodedata

import ftfy
import ftfy.bad_codecs  # noqa: F401  (registers the sloppy-windows-1252 codec)
import ftfy.chardata
import regex

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT_H = os.path.join(ROOT, "model", "unicode_tables.h")
OUT_C = os.path.join(ROOT, "model", "unicode_tables.c")
MAX_CP = 0x110000

# Property bits of uni_props (must match the header's UNI_* defines below).
SCAN_OTHER, SCAN_LETTER, SCAN_NUMBER, SCAN_SKIP = 0, 1, 2, 3
P_REGEX_SPACE, P_PY_SPACE, P_PY_DECIMAL, P_CASE_IGNORABLE, P_CASED = 4, 8, 16, 32, 64


def regex_unicode_version():
    """The regex module bundles its own Unicode database and does not say which; probe characters that each
    version added (Kawi, CJK Ext. I, Cyrillic Tje, Sidetic)."""
    version = "<15.0"
    for v, cp in (("15.0", 0x11F00), ("15.1", 0x2EBF0), ("16.0", 0x1C89), ("17.0", 0x10940)):
        if regex.fullmatch(r"\p{Assigned}", chr(cp)):
            version = ">=" + v
    return version


def runs(values):
    """[(first_cp, value)] for each maximal run of equal values over 0..MAX_CP-1."""
    out = []
    prev = None
    for cp, v in enumerate(values):
        if v != prev:
            out.append((cp, v))
            prev = v
    return out


def scan_class(ch):
    """How the CLIP pattern's alternatives see one character (the pattern is compiled with IGNORECASE)."""
    letter = regex.fullmatch(r"[\p{L}]", ch, regex.IGNORECASE) is not None
    number = regex.fullmatch(r"[\p{N}]", ch, regex.IGNORECASE) is not None
    other = regex.fullmatch(r"[^\s\p{L}\p{N}]", ch, regex.IGNORECASE) is not None
    assert letter + number + other <= 1, hex(ord(ch))
    if letter:
        return SCAN_LETTER
    if number:
        return SCAN_NUMBER
    if other:
        return SCAN_OTHER
    return SCAN_SKIP  # whitespace, and U+0345 which IGNORECASE puts in no class at all


def sigma_props(ch):
    """Case-ignorable and cased, as CPython's str.lower() sees them when it decides on a final sigma.
    CPython does not expose them, so they are read back through lower() itself (see handle_capital_sigma):
      'A'+X+'Σ' ends in ς  iff  X ignorable or X cased
      'AΣ'+X    has ς      iff  X ignorable or X not cased
    Cased only matters for characters that are not case-ignorable (the scan stops at those)."""
    t1 = ("A" + ch + "\u03a3").lower()[-1] == "\u03c2"
    t3 = ("A\u03a3" + ch).lower()[1] == "\u03c2"
    ignorable = t1 and t3
    cased = t1 and not ignorable
    return ignorable, cased


def props_table():
    values = []
    py_decimal = re.compile(r"\d")
    for cp in range(MAX_CP):
        ch = chr(cp)
        v = scan_class(ch)
        if regex.fullmatch(r"\s", ch):
            v |= P_REGEX_SPACE
        if ch.isspace():
            v |= P_PY_SPACE
        if py_decimal.fullmatch(ch):
            v |= P_PY_DECIMAL
        if 0xD800 <= cp <= 0xDFFF:
            values.append(v)  # surrogates never reach the tokenizer (invalid UTF-8)
            continue
        ignorable, cased = sigma_props(ch)
        if ignorable:
            v |= P_CASE_IGNORABLE
        if cased:
            v |= P_CASED
        values.append(v)
    return runs(values)


def lower_tables():
    """str.lower() of every single character: runs of cp -> cp + delta (stride 1 or 2), plus the few characters
    whose lowercase is longer than one code point. U+03A3 gets its context rule in C."""
    simple = {}
    multi = []
    for cp in range(MAX_CP):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        low = chr(cp).lower()
        if low == chr(cp):
            continue
        if len(low) == 1:
            simple[cp] = ord(low) - cp
        else:
            multi.append((cp, [ord(c) for c in low]))
    # Greedy runs: consecutive mapped code points (step 1 or 2) with the same delta.
    out = []
    cps = sorted(simple)
    i = 0
    while i < len(cps):
        first = cps[i]
        delta = simple[first]
        stride = 1
        j = i
        if i + 1 < len(cps) and simple[cps[i + 1]] == delta and cps[i + 1] - first in (1, 2):
            stride = cps[i + 1] - first
            while j + 1 < len(cps) and cps[j + 1] - cps[j] == stride and simple[cps[j + 1]] == delta:
                j += 1
        out.append((first, cps[j], stride, delta))
        i = j + 1
    for first, last, stride, delta in out:  # check the runs reproduce the map exactly
        for cp in range(first, last + 1, stride):
            assert simple[cp] == delta
    assert sum(len(range(f, l + 1, s)) for f, l, s, _ in out) == len(simple)
    assert all(len(m) <= 3 for _, m in multi)
    return out, multi


def nfc_tables():
    """Canonical combining classes, full canonical decompositions (Hangul syllables excluded: they are
    algorithmic) and the primary composites (pairs NFC composes)."""
    ccc = runs([unicodedata.combining(chr(cp)) for cp in range(MAX_CP)])
    decomp = []
    compose = []
    for cp in range(MAX_CP):
        if 0xD800 <= cp <= 0xDFFF or 0xAC00 <= cp <= 0xD7A3:
            continue
        ch = chr(cp)
        nfd = unicodedata.normalize("NFD", ch)
        if nfd != ch:
            decomp.append((cp, [ord(c) for c in nfd]))
        d = unicodedata.decomposition(ch)
        if d and not d.startswith("<"):
            parts = [int(x, 16) for x in d.split()]
            # A two-part canonical decomposition whose composite survives NFC is a primary composite
            # (composition exclusions and non-starter decompositions do not survive).
            if len(parts) == 2 and unicodedata.normalize("NFC", ch) == ch:
                compose.append((parts[0], parts[1], cp))
    compose.sort()
    assert max(len(d) for _, d in decomp) <= 4
    return ccc, decomp, compose


def entity_tables():
    """html.entities.html5 keyed by name without ';', with flags: bit 0 = the name is also valid without ';'
    (a legacy entity), bit 1 = ftfy also decodes the all-caps name (value = value.upper(), stored when it
    differs)."""
    h5 = html.entities.html5
    ftfy_entities = ftfy.chardata.HTML_ENTITIES
    names = sorted(n[:-1] for n in h5 if n.endswith(";"))
    for n in h5:  # every legacy name must also exist with ';' and the same value, or the flag cannot hold it
        assert n.endswith(";") or (n + ";" in h5 and h5[n + ";"] == h5[n]), n
    out = []
    upper_count = 0
    for n in names:
        value = h5[n + ";"]
        flags = 1 if n in h5 else 0
        upper = None
        key = "&" + n.upper() + ";"
        if n == n.lower() and key in ftfy_entities and (n.upper() + ";") not in h5:
            flags |= 2
            upper_count += 1
            if ftfy_entities[key] != value:
                upper = ftfy_entities[key]
        out.append((n, flags, value, upper))
    # Check that the table describes ftfy's HTML_ENTITIES exactly.
    rebuilt = {"&" + n + ";": v for n, _, v, _ in out}
    for n, f, v, u in out:
        if f & 2:
            rebuilt["&" + n.upper() + ";"] = u if u is not None else v
    assert rebuilt == ftfy_entities, "entity table does not rebuild ftfy's HTML_ENTITIES"
    assert upper_count == len(ftfy_entities) - len(names)
    assert max(len(n) for n in names) <= 32 and max(len(v) for v in h5.values()) <= 2
    assert max(len(u) for _, _, _, u in out if u) <= 3
    invalid_refs = sorted(html._invalid_charrefs.items())
    invalid_cps = sorted(html._invalid_codepoints)
    return out, invalid_refs, invalid_cps


def ftfy_tables():
    lig = sorted((cp, [ord(c) for c in s]) for cp, s in ftfy.chardata.LIGATURES.items())
    width = sorted((cp, [ord(c) for c in s]) for cp, s in ftfy.chardata.WIDTH_MAP.items())
    control = sorted(ftfy.chardata.CONTROL_CHARS)
    c1 = [ord(bytes([b]).decode("sloppy-windows-1252")) for b in range(0x80, 0xA0)]
    assert max(len(s) for _, s in lig) <= 3 and max(len(s) for _, s in width) <= 2
    # The quote sets of uncurl_quotes and the C1 range of fix_c1_controls are written in clip_text_clean.c;
    # check they are still what ftfy uses.
    assert ftfy.chardata.SINGLE_QUOTE_RE.pattern == "[\u02bc\u2018-\u201b]"
    assert ftfy.chardata.DOUBLE_QUOTE_RE.pattern == "[\u201c-\u201f]"
    assert ftfy.chardata.C1_CONTROL_RE.pattern == r"[\x80-\x9f]"
    assert ftfy.fixes.ANSI_RE.pattern == "\033\\[((?:\\d|;)*)([a-zA-Z])"
    assert ftfy.chardata.HTML_ENTITY_RE.pattern == r"&#?[0-9A-Za-z]{1,24};"
    return lig, width, control, c1


def pattern_folds():
    """Non-ASCII characters that IGNORECASE lets match an ASCII letter of the pattern's literal alternatives
    (<|startoftext|>, <|endoftext|>, 's 't 're 've 'm 'll 'd): e.g. U+017F LONG S matches 's'."""
    letters = sorted(set("startoftextendoftextsrevmld"))
    out = []
    for cp in range(0x80, MAX_CP):
        for ch in letters:
            if regex.fullmatch(ch, chr(cp), regex.IGNORECASE):
                out.append((cp, ord(ch)))
    # Multi-character folds (e.g. U+FB06 'st') do not apply: the regex module's default VERSION0 folds simply.
    assert regex.fullmatch("'st", "'\ufb06", regex.IGNORECASE) is None
    return out


def cp_list(cps, width):
    """A brace initialiser for a uint32_t[width]; C zero-fills what is left out."""
    assert 0 < len(cps) <= width
    return "{" + ",".join("0x%X" % c for c in cps) + "}"


def c_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrap(items, indent="    ", width=118):
    """Joins C initialisers several to a line."""
    lines, cur = [], indent
    for it in items:
        piece = it + ","
        if len(cur) + len(piece) > width and cur.strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += piece
    if cur.strip():
        lines.append(cur.rstrip())
    return "\n".join(lines)


def main():
    versions = (
        f"Python {sys.version.split()[0]} (unicodedata {unicodedata.unidata_version}), regex {regex.__version__} "
        f"(Unicode {regex_unicode_version()}), ftfy {ftfy.__version__}"
    )
    props = props_table()
    lower, lower_multi = lower_tables()
    ccc, decomp, compose = nfc_tables()
    entities, invalid_refs, invalid_cps = entity_tables()
    lig, width, control, c1 = ftfy_tables()
    folds = pattern_folds()

    decomp_pool = []
    decomp_rows = []
    for cp, d in decomp:
        decomp_rows.append("{0x%X,%d,%d}" % (cp, len(decomp_pool), len(d)))
        decomp_pool.extend(d)
    assert len(decomp_pool) < 65536

    header = f"""// GENERATED by tools/gen_unicode_tables.py, reading
//   {versions}.
// Do not edit: rerun `tests/reference/.venv/bin/python tools/gen_unicode_tables.py` and commit the output.
//
// The Unicode data behind the CLIP tokenizer's text cleanup (model/clip_text_clean.c). Every table was read from
// the library whose behaviour it reproduces (Python's unicodedata and str methods, the `regex` module, ftfy,
// Python's html module), so the tokenizer matches those versions exactly; a different Python/regex/ftfy can
// differ on characters new to its Unicode version.
#pragma once
#include <stdint.h>

// A run of code points sharing one value: from `first` up to the next entry's `first` - 1. Run tables start at
// U+0000 and are sorted, so a lookup is a binary search for the last run with first <= cp.
typedef struct UniRun {{
    uint32_t first;
    uint8_t value;
}} UniRun;

// uni_props values. Bits 0-1: how the CLIP pre-token pattern (IGNORECASE) classifies the character.
#define UNI_SCAN_MASK 3
#define UNI_SCAN_OTHER 0                       // [^\\s\\p{{L}}\\p{{N}}]
#define UNI_SCAN_LETTER 1                      // [\\p{{L}}]
#define UNI_SCAN_NUMBER 2                      // [\\p{{N}}]
#define UNI_SCAN_SKIP 3                        // in no class (whitespace, and U+0345 under IGNORECASE)
#define UNI_REGEX_SPACE {P_REGEX_SPACE}                      // the regex module's \\s (whitespace_clean)
#define UNI_PY_SPACE {P_PY_SPACE}                         // Python str.isspace() (str.strip)
#define UNI_PY_DECIMAL {P_PY_DECIMAL}                      // Python re's \\d in a str pattern (ftfy's ANSI escapes)
#define UNI_CASE_IGNORABLE {P_CASE_IGNORABLE}                  // case-ignorable, for str.lower()'s final sigma
#define UNI_CASED {P_CASED}                           // cased (set only where not case-ignorable), same rule

extern const UniRun uni_props[];
extern const int uni_props_count;

// Non-ASCII characters that match an ASCII letter of the pattern's literal alternatives under IGNORECASE
// (U+017F LONG S matches 's'): {{from = that character, to = the letter}}.
typedef struct UniPair {{
    uint32_t from, to;
}} UniPair;
extern const UniPair uni_pattern_folds[];
extern const int uni_pattern_folds_count;

// str.lower(): cp -> cp + delta for cp = first, first + stride, ..., last.
typedef struct UniLowerRun {{
    uint32_t first, last;
    int32_t delta;
    uint8_t stride;
}} UniLowerRun;
extern const UniLowerRun uni_lower[];
extern const int uni_lower_count;

// Characters whose lowercase is several code points (zero-padded).
typedef struct UniMulti {{
    uint32_t cp;
    uint32_t to[3];
}} UniMulti;
extern const UniMulti uni_lower_multi[];
extern const int uni_lower_multi_count;

// NFC. Canonical combining class (uni_ccc, a run table with the class as value), full canonical decompositions
// (Hangul syllables excluded: they are algorithmic), and the primary composites sorted by (first, second).
extern const UniRun uni_ccc[];
extern const int uni_ccc_count;
typedef struct UniDecomp {{
    uint32_t cp;
    uint16_t offset;  // into uni_decomp_pool
    uint8_t len;
}} UniDecomp;
extern const UniDecomp uni_decomp[];
extern const int uni_decomp_count;
extern const uint32_t uni_decomp_pool[];
typedef struct UniCompose {{
    uint32_t first, second, composite;
}} UniCompose;
extern const UniCompose uni_compose[];
extern const int uni_compose_count;

// html.entities.html5, sorted by name (written without its ';', ASCII order).
#define UNI_ENTITY_LEGACY 1     // also valid without the ';' (html.unescape only)
#define UNI_ENTITY_FTFY_UPPER 2 // ftfy also decodes "&NAME;" in capitals, as `upper` (or value when upper[0] == 0)
typedef struct UniEntity {{
    const char *name;
    uint8_t flags;
    uint32_t value[2];
    uint32_t upper[3];
}} UniEntity;
extern const UniEntity uni_entities[];
extern const int uni_entities_count;

// html.unescape's numeric references: html._invalid_charrefs (replaced) and html._invalid_codepoints (dropped).
// uni_invalid_charrefs: {{from = the referenced number, to = the character html.unescape puts instead}}.
extern const UniPair uni_invalid_charrefs[];
extern const int uni_invalid_charrefs_count;
extern const uint32_t uni_invalid_codepoints[];  // sorted
extern const int uni_invalid_codepoints_count;

// ftfy: fix_latin_ligatures, fix_character_width (translate maps), remove_control_chars (sorted code points),
// fix_c1_controls (U+0080..U+009F as sloppy windows-1252).
extern const UniMulti uni_ftfy_ligatures[];
extern const int uni_ftfy_ligatures_count;
extern const UniMulti uni_ftfy_width[];
extern const int uni_ftfy_width_count;
extern const uint32_t uni_ftfy_control[];
extern const int uni_ftfy_control_count;
extern const uint32_t uni_ftfy_c1[32];
"""

    def table(ctype, name, items):
        return f"const {ctype} {name}[] = {{\n{wrap(items)}\n}};\nconst int {name}_count = {len(items)};\n"

    ent_rows = []
    for n, flags, value, upper in entities:
        ent_rows.append(
            "{%s,%d,%s,%s}" % (c_string(n), flags, cp_list([ord(c) for c in value], 2),
                               cp_list([ord(c) for c in upper], 3) if upper else "{0}")
        )

    body = [
        "// GENERATED by tools/gen_unicode_tables.py, reading",
        f"//   {versions}. Do not edit.",
        '#include "model/unicode_tables.h"',
        "",
        table("UniRun", "uni_props", ["{0x%X,%d}" % r for r in props]),
        table("UniPair", "uni_pattern_folds", ["{0x%X,0x%X}" % f for f in folds]),
        table("UniLowerRun", "uni_lower", ["{0x%X,0x%X,%d,%d}" % (f, l, d, st) for f, l, st, d in lower]),
        table("UniMulti", "uni_lower_multi", ["{0x%X,%s}" % (cp, cp_list(m, 3)) for cp, m in lower_multi]),
        table("UniRun", "uni_ccc", ["{0x%X,%d}" % r for r in ccc]),
        table("UniDecomp", "uni_decomp", decomp_rows),
        "const uint32_t uni_decomp_pool[] = {\n" + wrap("0x%X" % c for c in decomp_pool) + "\n};\n",
        table("UniCompose", "uni_compose", ["{0x%X,0x%X,0x%X}" % c for c in compose]),
        table("UniEntity", "uni_entities", ent_rows),
        table("UniPair", "uni_invalid_charrefs", ["{0x%X,0x%X}" % (n, ord(s)) for n, s in invalid_refs]),
        table("uint32_t", "uni_invalid_codepoints", ["0x%X" % c for c in invalid_cps]),
        table("UniMulti", "uni_ftfy_ligatures", ["{0x%X,%s}" % (cp, cp_list(s, 3)) for cp, s in lig]),
        table("UniMulti", "uni_ftfy_width", ["{0x%X,%s}" % (cp, cp_list(s, 3)) for cp, s in width]),
        table("uint32_t", "uni_ftfy_control", ["0x%X" % c for c in control]),
        "const uint32_t uni_ftfy_c1[32] = {\n" + wrap("0x%X" % c for c in c1) + "\n};\n",
    ]
    assert all(len(s) == 1 for _, s in invalid_refs)
    with open(OUT_H, "w", encoding="utf-8") as f:
        f.write(header)
    with open(OUT_C, "w", encoding="utf-8") as f:
        f.write("\n".join(body))
    print(f"wrote {OUT_H} and {OUT_C} ({os.path.getsize(OUT_C)} bytes) from {versions}")


if __name__ == "__main__":
    main()
