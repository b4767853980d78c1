"""Golden ids for model/sp_tokenizer.c: the real sentencepiece library on LLaMA's tokenizer.model.

Writes tests/data/sp_tokenizer_ids.txt. Run with the reference venv from the repository root:
    tests/reference/.venv/bin/python tests/reference/make_sp_tokenizer_goldens.py
The model is read from ../shared/data/llama-tokenizer.model (never copied into the project).

The reference (AnomalyGPT, section 5.3) tokenises with HF's slow LlamaTokenizer and add_special_tokens=False, which
for text without special-token spellings is exactly SentencePieceProcessor.encode(text). Strings are passed to
sentencepiece as UTF-8 bytes, so byte strings that are not valid UTF-8 are tested too: sentencepiece's normalizer
turns each malformed byte into U+FFFD, which the C tokenizer must reproduce. Strings containing a NUL byte are left
out (the C API takes NUL-terminated text).

After the cases for LLaMA's model come a few sections for variants of it that exercise the options LLaMA leaves
off (remove_extra_whitespaces, no dummy prefix, no whitespace escaping, user-defined and unused pieces). A variant
is the model file with a few protobuf bytes appended: a repeated embedded message merges into the first one, so
appending normalizer_spec{remove_extra_whitespaces: true} changes just that flag, and appending pieces adds ids.

File format: '#' lines are comments; every other line is tab-separated:
    E <tab> <text as hex bytes> <tab> <ids separated by spaces>      encode(text) == ids
    D <tab> <ids separated by spaces> <tab> <text as hex bytes>      decode(ids) == text
    M <tab> <hex bytes appended to the model file> <tab> <name>      the following cases use that variant
Either field of E and D may be empty (the empty string; no ids).
"""
import os
import random
import unicodedata

import struct

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
OUT = os.path.join(ROOT, "tests", "data", "sp_tokenizer_ids.txt")
MODEL = os.path.join(ROOT, "..", "shared", "data", "llama-tokenizer.model")

# code/test_mvtec.py of the official AnomalyGPT.
DESCRIBLES = {
    "bottle": "This is a photo of a bottle for anomaly detection, which should be round, without any damage, flaw, defect, scratch, hole or broken part.",
    "cable": "This is a photo of three cables for anomaly detection, cables cannot be missed or swapped, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "capsule": "This is a photo of a capsule for anomaly detection, which should be black and orange, with print '500', without any damage, flaw, defect, scratch, hole or broken part.",
    "carpet": "This is a photo of carpet for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "grid": "This is a photo of grid for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "hazelnut": "This is a photo of a hazelnut for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "leather": "This is a photo of leather for anomaly detection, which should be brown and without any damage, flaw, defect, scratch, hole or broken part.",
    "metal_nut": "This is a photo of a metal nut for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part, and shouldn't be fliped.",
    "pill": "This is a photo of a pill for anomaly detection, which should be white, with print 'FF' and red patterns, without any damage, flaw, defect, scratch, hole or broken part.",
    "screw": "This is a photo of a screw for anomaly detection, which tail should be sharp, and without any damage, flaw, defect, scratch, hole or broken part.",
    "tile": "This is a photo of tile for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "toothbrush": "This is a photo of a toothbrush for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "transistor": "This is a photo of a transistor for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
    "wood": "This is a photo of wood for anomaly detection, which should be brown with patterns, without any damage, flaw, defect, scratch, hole or broken part.",
    "zipper": "This is a photo of a zipper for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part.",
}

POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]

# Section 5.3's table: the C test hard-codes these too; the script checks the library still agrees.
TABLE = {
    "### Human: <Img>": [835, 12968, 29901, 529, 25518, 29958],
    "</Img> ": [1533, 25518, 29958, 29871],
    "\n### Assistant:": [29871, 13, 2277, 29937, 4007, 22137, 29901],
    "No, there is no anomaly in the image.\n###": [1939, 29892, 727, 338, 694, 29342, 14997, 297, 278, 1967, 29889, 13, 2277, 29937],
    "Yes, there is an anomaly in the image, at the top left of the image.\n###": [3869, 29892, 727, 338, 385, 29342, 14997, 297, 278, 1967, 29892, 472, 278, 2246, 2175, 310, 278, 1967, 29889, 13, 2277, 29937],
    DESCRIBLES["bottle"] + " Is there any anomaly in the image?" + "\n### Assistant:": [910, 338, 263, 15373, 310, 263, 18046, 280, 363, 29342, 14997, 15326, 29892, 607, 881, 367, 4513, 29892, 1728, 738, 18658, 29892, 285, 10653, 29892, 23503, 29892, 22728, 29892, 16188, 470, 9391, 760, 29889, 1317, 727, 738, 29342, 14997, 297, 278, 1967, 29973, 13, 2277, 29937, 4007, 22137, 29901],
}

WORDS = ("the of and to in is it that for on with as was by at from this be are or an not have has but what "
         "which anomaly image photo bottle cable screw defect scratch hole broken crack normal abnormal detection "
         "industrial inspection quality product surface texture color left right top bottom center there any yes no "
         "Assistant Human Img GPU CUDA tokenizer SentencePiece LLaMA Vicuna model training inference don't it's "
         "we'll I'm 3.14 2024 100% $5 e-mail C++ x86_64 http://example.com/a?b=c user@host.org").split()

SNIPPETS = [
    "café", "naïve", "résumé", "Ångström", "Straße", "façade", "jalapeño", "Москва", "Ελλάδα", "שלום", "مرحبا",
    "नमस्ते", "ไทย", "한국어", "日本語のテキスト", "中文分词测试", "東京タワー", "繁體中文", "😀", "👍🏽", "👨‍👩‍👧‍👦",
    "🇩🇪", "❤️", "☃", "∑∫√∞", "→←↑↓", "½¾", "™©®", "€£¥", "—–", "…", "“quoted”", "‘single’", "«guillemets»",
    "\u00a0nbsp", "zero\u200bwidth", "\ufeffbom", "\u2581lower", "\ufffd", "tab\there", "new\nline", "cr\r\nlf",
    "<s>", "</s>", "<unk>", "<0x0A>", "▁▁", "   ", "\t\t", "\n\n\n", "0123456789", "3.1415926535", "1,000,000",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𐍈", "\U0010fffd", "\u0301", "e\u0301", "A\u030a", "\x7f", "\x01\x02\x03", "\x1b[31mred\x1b[0m",
]


def random_char(rng):
    r = rng.random()
    if r < 0.5:
        return chr(rng.randint(0x20, 0x7E))
    if r < 0.6:
        return rng.choice(" \t\n\r")
    if r < 0.75:
        return chr(rng.randint(0xA0, 0x24F))  # Latin-1 and Latin Extended
    if r < 0.85:
        return chr(rng.randint(0x4E00, 0x9FFF))  # CJK
    if r < 0.92:
        return chr(rng.randint(0x1F300, 0x1FAFF))  # emoji and pictographs
    while True:  # anything valid: no surrogates, no NUL
        c = rng.randint(1, 0x10FFFF)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def sentence(rng, n_words):
    words = [rng.choice(WORDS) for _ in range(n_words)]
    s = " ".join(words)
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", "!", "?", ",", ":", ";", "", "\n", "..."])


def make_strings(rng):
    out = []
    # Every prompt piece AnomalyGPT tokenises (sections 5.4, 5.5, 6.3).
    out += list(TABLE)
    out += ["### Human: <Img>", "</Img> ", "\n### Assistant:", "\n###", " Human: ", "Human: ",
            "Is there any anomaly in the image?", "No, there is no anomaly in the image.",
            "No, there is no anomaly in the image.\n###"]
    for name, d in DESCRIBLES.items():
        out.append(d + " Is there any anomaly in the image?" + "\n### Assistant:")
        out.append(d + " Is there any anomaly in the image?")
        out.append("Human: " + d + " Is there any anomaly in the image?" + "\n### Assistant:")
        out.append(name)
    for p in POSITIONS:
        out.append(f"Yes, there is an anomaly in the image, at the {p} of the image.\n###")
        for q in POSITIONS[:3]:
            out.append(f"Yes, there are 2 anomalies in the image, they are at the {p} and {q} of the image.\n###")
    out.append(DESCRIBLES["bottle"] + " Is there any anomaly in the image?\n### Assistant: No, there is no anomaly "
               "in the image.\n### Human: Where is it?\n### Assistant:")
    out += SNIPPETS
    # Precomposed and decomposed accents.
    for s in ["café crème brûlée", "Ångström über naïve", "Éléphant à l'école", "Český Krumlov", "Ærø ŷ ǅ"]:
        out += [s, unicodedata.normalize("NFD", s), unicodedata.normalize("NFKC", s)]
    # Whitespace runs.
    for ws in [" ", "  ", "   ", "\t", "\n", " \n ", "\t \t", "\r\n", "      "]:
        out += [ws, ws + "a", "a" + ws, "a" + ws + "b", ws + "Hello" + ws + "world" + ws]
    out += ["", "a", "A", ".", " a", "a ", "  a  b  "]
    # ASCII sentences.
    for _ in range(650):
        out.append(sentence(rng, rng.randint(1, 14)))
    # Mixed with snippets.
    for _ in range(300):
        parts = [rng.choice(WORDS + SNIPPETS) for _ in range(rng.randint(1, 5))]
        out.append(rng.choice(["", " ", "\n"]).join(parts))
    # Random characters.
    for _ in range(420):
        out.append("".join(random_char(rng) for _ in range(rng.randint(1, 24))))
    # Digits.
    for _ in range(60):
        out.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 5))))
    # Long strings (the C side must stay fast: no quadratic merge loop).
    out.append(" ".join(sentence(rng, 20) for _ in range(10)))
    out.append("".join(random_char(rng) for _ in range(300)))
    out.append("a" * 1000)
    out.append(" " * 300)
    out.append("😀" * 300)
    out = [s.encode("utf-8") for s in out]
    # Invalid UTF-8 byte strings (no NUL).
    bad = [b"\xff", b"\xfe\xff", b"a\xffb", b"\x80", b"\xc3", b"\xc3(", b"\xe2\x82", b"\xe2\x82(", b"\xf0\x9f\x98",
           b"\xf0\x9f\x98 a", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
           b"caf\xe9", b"\xef\xbf\xbd", b"\xef\xbf\xbe", b"ok \xa0\xa1 ok", b"\xe2\x96", b"\xe2\x96\x81\xe2\x96"]
    out += bad
    for _ in range(260):
        out.append(bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 16))))
    for _ in range(150):  # valid text with a few corrupted bytes
        s = bytearray("".join(random_char(rng) for _ in range(rng.randint(2, 20))).encode("utf-8"))
        for _ in range(rng.randint(1, 3)):
            s[rng.randrange(len(s))] = rng.randint(1, 255)
        out.append(bytes(s))
    seen, unique = set(), []
    for s in out:
        if b"\x00" not in s and s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def random_ids(rng, n_vocab):
    ids = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.1:
            ids.append(rng.choice([0, 1, 2]))
        elif r < 0.35:
            ids.append(3 + rng.choice([rng.randint(0, 255), rng.randint(0x80, 0xFF), 0x20, 0x0A]))
        elif r < 0.5:
            ids.append(29871)  # "▁"
        else:
            ids.append(rng.randint(3, n_vocab - 1))
    return ids


def piece_bytes(text, type_, score=None):
    """A ModelProto.pieces entry (field 1) with piece (1), optional score (2, float) and type (3)."""
    b = text.encode("utf-8")
    body = b"\x0a" + bytes([len(b)]) + b
    if score is not None:
        body += b"\x15" + struct.pack("<f", score)
    body += b"\x18" + bytes([type_])
    return b"\x0a" + bytes([len(body)]) + body


USER_DEFINED, UNUSED = 4, 5
VARIANTS = [
    ("remove_extra_whitespaces", b"\x1a\x02\x20\x01"),  # normalizer_spec{remove_extra_whitespaces: true}
    ("no_dummy_prefix", b"\x1a\x02\x18\x00"),  # normalizer_spec{add_dummy_prefix: false}
    ("no_escape_whitespaces", b"\x1a\x02\x28\x00"),  # normalizer_spec{escape_whitespaces: false}
    ("user_defined", piece_bytes("<Img>", USER_DEFINED) + piece_bytes("Assistant:", USER_DEFINED)
     + piece_bytes("\U0001F600\U0001F600", USER_DEFINED) + piece_bytes("ssis", USER_DEFINED)),
    ("unused", piece_bytes("\u2581xy", UNUSED, 0.0) + piece_bytes("omal", UNUSED, 0.0) + piece_bytes("nt:", UNUSED, 0.0)),
]


def variant_strings(rng, strings):
    picks = [s.encode("utf-8") for s in list(TABLE) + ["### Human: <Img></Img> xyz\n### Assistant: anomaly",
             "<Img><Img>Img", "Assistant:Assistant: x", "\U0001F600\U0001F600\U0001F600", "xyzzy an anomaly",
             " ", "  ", "   a   b   ", "\ta \n b\t", " \u3000 x ", "", "a", "\xa0 a\xa0"]]
    return picks + rng.sample([s for s in strings if len(s) < 80], 80)


def main():
    sp = spm.SentencePieceProcessor(model_file=MODEL)
    rng = random.Random(20261128)
    for s, ids in TABLE.items():
        got = sp.encode(s.encode("utf-8"))
        assert got == ids, (s, got, ids)
    strings = make_strings(rng)
    lines = ["# sentencepiece %s encode/decode goldens for LLaMA's tokenizer.model, made by "
             "tests/reference/make_sp_tokenizer_goldens.py" % spm.__version__,
             "# E<TAB>hex(text)<TAB>ids  |  D<TAB>ids<TAB>hex(decoded text)"]
    for s in strings:
        ids = sp.encode(s)
        lines.append("E\t%s\t%s" % (s.hex(), " ".join(map(str, ids))))
    n_dec = 0
    for _ in range(300):
        ids = random_ids(rng, sp.vocab_size())
        text = sp.decode(ids).encode("utf-8")
        lines.append("D\t%s\t%s" % (" ".join(map(str, ids)), text.hex()))
        n_dec += 1
    model = open(MODEL, "rb").read()
    base_strings = list(strings)
    for name, suffix in VARIANTS:
        v = spm.SentencePieceProcessor(model_proto=model + suffix)
        lines.append("M\t%s\t%s" % (suffix.hex(), name))
        for s in variant_strings(rng, base_strings):
            lines.append("E\t%s\t%s" % (s.hex(), " ".join(map(str, v.encode(s)))))
        for _ in range(20):
            ids = random_ids(rng, v.vocab_size())
            if v.vocab_size() > 32000:  # the added pieces
                ids += [rng.randint(32000, v.vocab_size() - 1) for _ in range(rng.randint(0, 3))]
            rng.shuffle(ids)
            lines.append("D\t%s\t%s" % (" ".join(map(str, ids)), v.decode(ids).encode("utf-8").hex()))
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s: %d encode cases, %d decode cases, %d bytes" % (OUT, len(strings), n_dec, os.path.getsize(OUT)))


if __name__ == "__main__":
    main()
