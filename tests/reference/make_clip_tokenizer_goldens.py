"""Golden ids for model/clip_tokenizer.c: ImageBind's SimpleTokenizer, with open_clip's SimpleTokenizer as the peer.

Writes tests/data/clip_tokenizer_ids.txt. Run through tests/reference/make_goldens.sh (which sets up the venv).

The reference is the tokenizer of AnomalyGPT's ImageBind fork (code/model/ImageBind/models/multimodal_preprocessors.py).
It is open_clip's algorithm with three differences, reproduced here on top of open_clip's own BPE and vocabulary:
  1. the specials are spelled <|startoftext|> / <|endoftext|> (open_clip 3: <start_of_text> / <end_of_text>), both in
     the pre-token pattern and in the bpe cache, so that text typed by a user maps to ids 49406 / 49407;
  2. whitespace_clean is regex.sub(r"\\s+", " ", text) (open_clip: " ".join(text.split()), Python's str.isspace);
  3. __call__ appends EOT and then cuts to 77, so a long text ends without EOT (open_clip writes EOT into slot 76).
Every string is also run through open_clip, and the script checks that the two agree except where one of these
differences applies.

The C tokenizer implements ftfy.fix_text except its mojibake repair (fix_encoding). Strings whose ftfy output depends
on fix_encoding (fix_text(s) != fix_text(s, fix_encoding=False)) are left out; the golden file lists them in its
header. Byte strings that are not valid UTF-8 are tokenized as bytes.decode("utf-8", errors="replace"), which is the
C tokenizer's defined behaviour for them.

File format, one string per line after the '#' header:
    <truncated 0|1> <id> <id> ...<TAB><text>
The ids are the unpadded prefix of the 77 (zeros follow). The text is UTF-8 with '\\\\' for a backslash and \\xHH
for every byte of a non-printable character and for bytes that are not valid UTF-8.
"""
import html
import os
import random
import unicodedata

import ftfy
import open_clip
import regex
from open_clip.tokenizer import SimpleTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
OUT = os.path.join(ROOT, "tests", "data", "clip_tokenizer_ids.txt")
SHARED_VOCAB = os.path.join(ROOT, "..", "shared", "data", "clip-bpe-simple-vocab-16e6.txt.gz")
CONTEXT = 77
SOT, EOT = 49406, 49407


class ForkTokenizer:
    """ImageBind's SimpleTokenizer (the AnomalyGPT fork), built on an open_clip SimpleTokenizer's bpe and encoder."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    SPECIALS = {"<|startoftext|>": SOT, "<|endoftext|>": EOT}

    def __init__(self, base):
        self.base = base

    @staticmethod
    def clean(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r"\s+", " ", text).strip()
        return text.lower()

    def encode(self, text):
        ids = []
        for token in regex.findall(self.PATTERN, self.clean(text)):
            token = "".join(self.base.byte_encoder[b] for b in token.encode("utf-8"))
            if token in self.SPECIALS:  # the fork's bpe cache returns these unchanged
                ids.append(self.SPECIALS[token])
                continue
            ids.extend(self.base.encoder[t] for t in self.base.bpe(token).split(" "))
        return ids

    def __call__(self, text):
        """(ids before padding, truncated): [SOT] + ids + [EOT], then cut to 77."""
        tokens = [SOT] + self.encode(text) + [EOT]
        return tokens[:CONTEXT], len(tokens) > CONTEXT


# ---- the strings -------------------------------------------------------------------------------------------------

# AnomalyGPT's prompt ensemble (code/model/openllama.py) over the 30 class names it tokenizes.
OBJECTS = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
           "tile", "toothbrush", "transistor", "wood", "zipper", "object", "candle", "cashew", "chewinggum", "fryum",
           "macaroni", "pcb", "pipe_fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "capsules"]
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a photo of a {}.", "a photo of the {}."]

WORDS = ("the quick brown fox jumps over lazy dog industrial anomaly detection surface scratch crack hole "
         "contamination fold glue squeeze print missing bent cut color faulty imprint poke liquid rough thread "
         "manipulated combined broken large small splayed misplaced flip transistor image region left right top "
         "bottom center is there any in this photo yes no an of a to and with for on at by from it its").split()


def prompt_sentences():
    out = []
    for obj in OBJECTS:
        name = obj.replace("_", " ")
        for state in NORMAL_STATES + ABNORMAL_STATES:
            for template in TEMPLATES:
                out.append(template.format(state.format(name)))
    return out


def ascii_sentences(rng, n):
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words = [w.upper() for w in words]
        out.append(" ".join(words) + rng.choice(["", ".", "?", "!", "...", ",", ";"]))
    return out


def punctuation_strings(rng, n):
    marks = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    out = ["...", "!!!", "?!", "--", "()", "[]{}", "<>", "a.b.c", "e-mail", "C++", "x=y+z", "50%", "$5", "#1",
           "a_b_c", "http://example.com/a?b=c&d=e", "user@example.com", "~/path/to/file.txt", ":-)", ";)", "<3",
           "\\", "\\n", "a\\b", "''", "'", "\"quoted\"", "'single'", "(paren)", "**bold**", "__init__"]
    for _ in range(n):
        out.append("".join(rng.choice(marks) for _ in range(rng.randint(1, 12))))
        out.append(rng.choice(WORDS) + "".join(rng.choice(marks) for _ in range(rng.randint(1, 4))) + rng.choice(WORDS))
    return out


def contraction_strings():
    base = ["it's", "don't", "you're", "we've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "YOU'RE", "WE'VE", "I'M",
            "WE'LL", "HE'D", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D",
            "'sa", "'ta", "'rex", "'ll'll", "''s", "'''t", "o'clock", "rock'n'roll", "the dog's bone", "dogs' bones",
            "can't won't shouldn't", "y'all", "'x", "'", "it\u2019s", "don\u2019t", "\u2018quoted\u2019",
            "\u201cdouble\u201d", "it\u02bcs", "it\u201bs", "'\u017f", "it'\u017f", "'\u017ft", "I'M HERE", "she'S",
            "'ll've'd", "abc'defg", "1's", "2'd", "!'s", "'s!", "x 's y", "'ſ'ſ"]
    return base


def digit_strings(rng, n):
    out = ["0", "1", "12", "123", "2024", "3.14159", "1,000,000", "-42", "+7", "1e10", "0x1F", "v1.2.3", "100%",
           "10:30", "2024-01-01", "pcb1", "pcb4 macaroni2", "a1b2c3", "\u0663\u0664\u0665", "\u00b2\u00b3\u00b9",
           "\u00bd \u00bc", "\u2160\u2161\u216b", "\u2460\u2461", "\uff11\uff12\uff13", "\u0967\u0968", "\u4e00\u4e8c",
           "\u2070\u2074", "\U0001d7ce\U0001d7cf", "x\u00b2+y\u00b2", "H\u2082O", "\u00be cup"]
    for _ in range(n):
        out.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        out.append(f"{rng.random() * 1000:.{rng.randint(0, 5)}f} {rng.choice(WORDS)}")
    return out


def accent_strings():
    words = ["café", "naïve", "résumé", "Ångström", "über", "façade", "jalapeño", "crème brûlée", "São Paulo",
             "Zürich", "Kraków", "Dvořák", "Ærøskøbing", "señor", "coöperate", "Việt Nam", "Nguyễn", "Đà Nẵng",
             "ắằẳẵặ", "Ǻǻ", "ḱṕ", "Ẳẵ", "ñÑ", "ÀÁÂÃÄÅ", "àáâãäå", "ÇçÈÉÊË", "İstanbul", "ırmak", "Straße", "STRASSE",
             "ẞ", "Øresund", "Łódź", "Ħal", "Ŋŋ", "Ǆǅǆ", "ǈ", "ﬁ", "ﬂuﬃeﬆ", "Ĳssel", "ŉ", "Å", "Ω", "K"]
    out = []
    for w in words:
        out.append(w)
        out.append(unicodedata.normalize("NFD", w))
        out.append(unicodedata.normalize("NFKD", w))
    # Marks in non-canonical order, stacked marks, marks on nothing, marks that do not compose.
    out += ["a\u0301\u0323", "a\u0323\u0301", "e\u0302\u0301", "o\u031b\u0303", "u\u0308\u0301", "\u0301a",
            "\u0301", "a\u0301\u0301\u0301", "q\u0301", "a\u0345", "\u03b1\u0345", "\u0391\u0345", "\u0345",
            "x\u0345y", "a\u034f\u0301", "a\u200d\u0301", "\u1100\u1161", "\u1100\u1161\u11a8", "\u1112\u1161\u11ab",
            "\uac00\u11a8", "\u1100\u1100\u1161", "\u0915\u093c", "\u09c7\u09be", "\u0b47\u0b3e", "\u0dd9\u0dcf",
            "A\u030a", "\u212b", "\u2126", "\u212a", "\u0340", "\u0344", "\u0374", "\u037e", "\u0387", "\u1f71",
            "\u0958", "\ufb1d", "\U0001d15e", "\u2adc", "e" + "\u0301" * 40, "a" + "\u0316\u0301" * 30]
    return out


def script_strings():
    return ["Ελληνικά", "ΕΛΛΗΝΙΚΆ", "ΟΔΟΣ", "ΟΔΟΣ.", "Σ", "ΑΣ", "ΑΣΑ", "Σ.", "ΑΣ'Σ", "ΑΣ\u0301", "ΑΣ\u0301Α",
            "a\u03a3", "\u03a3a", "1Σ", "ΑΣ1", "ΆΣ ΈΣ", "σς", "ϐϑϕϖϰϱϵ", "ΣΊΣΥΦΟΣ", "ΑΣ-", "ΑΣ’", "ΑΣ'Α", "Α\u00adΣ",
            "Русский язык", "РУССКИЙ", "Ёлка ёлка", "Україна", "Ґ ґ", "Їжак", "Беларусь", "Српски", "Ђорђе",
            "Македонија", "Қазақ", "中文测试", "漢字", "日本語のテキスト", "ｶﾀｶﾅ", "ﾊﾟﾋﾟﾌﾟ", "한국어 텍스트",
            "ᄒᆞᆫ글", "ไทย", "العربية", "עברית", "हिन्दी", "বাংলা", "தமிழ்", "ქართული", "Հայերեն", "አማርኛ",
            "ᠮᠣᠩᠭᠣᠯ", "ꯃꯤꯇꯩ", "𓀀𓀁", "𐌰𐌱", "ᚠᚢᚦ", "Ⓐⓑⓒ", "𝐀𝐁𝐂", "𝒜ℬ", "ℌℑ", "ℍ", "Ⅻ", "ꭰꭱ", "Ꭰ", "ǅ",
            "ᾈ ᾀ ᾼ ῌ", "ﬀ", "İ", "i̇", "I", "ı", "ŀ", "ʼ", "Ꙁ", "Ⴀ", "ⴀ", "𐐀", "𐐨", "𖹀", "𞤀", "Ａｂｃ",
            "ＬＯＵＤ　ＮＯＩＳＥＳ", "Ｕﾀｰﾝ", "￣", "￠￡", "\u3000x\u3000"]


def emoji_strings():
    return ["😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪🇫🇷", "🏴󠁧󠁢󠁷󠁬󠁳󠁿", "❤️", "☺️", "✓ ✔ ✗", "🔥 hot",
            "bottle 🍾", "1️⃣", "#️⃣", "©®™", "♠♣♥♦", "→←↑↓", "∑∏∫", "≤≥≠", "€£¥₹", "°C", "µm", "±0.5",
            "🙂🙃", "🤖 robot", "🧪🔬", "⚠️ warning", "✅ ok", "❌ no", "💩", "🫠", "🦀", "𝕏", "🀄", "🃏"]


ENTITY_STRINGS = [
    "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#39;", "&#x27;", "&#X27;", "&eacute;", "&Eacute;", "&EACUTE;",
    "&amp;amp;", "&amp;amp;amp;", "&amp;amp;amp;amp;", "&amp;lt;", "&amp;#39;", "&lt;b&gt;bold&lt;/b&gt;",
    "<b>&amp;amp;</b>", "x < y &amp;amp; z", "a<b &amp;amp; c", "line one &amp;amp;\nline <two> &amp;amp;",
    "&amp", "&amp x", "&ampx", "&ampxyz;", "&notit;", "&notin;", "&not", "this&not that", "&copy 2024",
    "&copy;2024", "&COPY;", "&nbsp;", "a&nbsp;b", "&nbsp;&nbsp;x", "&thinsp;", "&ensp;&emsp;", "&shy;",
    "&zwj;", "&lrm;", "&#0;", "&#1;", "&#9;", "&#10;", "&#13;", "&#13;&#10;", "&#32;", "&#59;", "&#65;", "&#065;",
    "&#x41;", "&#x041;", "&#65", "&#65abc", "&#65abc;", "&#x41g;", "&#xZZ;", "&#;", "&#x;", "&#", "&",
    "&&", "& amp;", "&#128;", "&#129;", "&#150;", "&#153;", "&#159;", "&#160;", "&#xD800;", "&#xDFFF;",
    "&#x10FFFF;", "&#x110000;", "&#1114112;", "&#99999999999999999999;", "&#xFFFE;", "&#xFDD0;", "&#x1F600;",
    "&#128512;", "&#x1f600", "&frac12;", "&frac12", "&FRAC12;", "&there4;", "&Alpha;", "&alpha;", "&ALPHA;",
    "&szlig;", "&SZLIG;", "&fflig;", "&FFLIG;", "&ntilde; &Ntilde; &NTILDE; &nTILDE;", "&Jscr;ohn &HilbertSpace;",
    "&checkmark;", "&NotEqualTilde;", "&nvlt;", "&bne;", "&fjlig;", "&ThickSpace;", "&Tab;", "&NewLine;",
    "&excl;", "&num;&dollar;&percnt;", "&lpar;&rpar;", "&lbrack;", "&abcdefghijklmnopqrstuvwxyzabcdef;",
    "&abcdefghijklmnopqrstuvwxyzabcdefg;", "&ampabcdefghijklmnopqrstuvwxyzabcdefghij", "&amp" + "x" * 40 + ";",
    "&é;", "&ampé;", "&amp\u00e9", "&#x41;&#x42;&#x43;", "P&eacute;rez", "P&EACUTE;REZ", "BUNDESSTRA&SZLIG;E",
    "&lt;tag&gt;", "a &lt; b", "&amp;nbsp;", "&amp;eacute;", "&AMP;", "&AMP", "&LT;", "&GT", "&QUOT;",
    "&#38;amp;", "&#38;#38;", "&#x26;lt;", "\uff06amp;", "\uff06amp\uff1b", "&amp\uff1b", "&\u2028amp;",
    "caf&eacute; &amp; cr&egrave;me br&ucirc;l&eacute;e", "&#x301;", "e&#x301;", "A&#x30a;", "&Aring;",
    "&angst;", "&ohm;", "&#8217;s", "it&rsquo;s", "&ldquo;hi&rdquo;", "&hellip;", "&mdash;", "&trade;",
    "&bull;", "&euro;", "&pound;", "&yen;", "&deg;", "&micro;", "&times;", "&divide;", "&plusmn;", "&ne;",
]

WHITESPACE_STRINGS = [
    "", " ", "  ", "\t", "\n", "\r\n", "\r", " \t\n\r\x0b\x0c ", "a  b", "a\tb", "a\nb", "a\r\nb", "a\rb",
    "a\x0bb", "a\x0cb", "a\x1cb", "a\x1db\x1ec\x1fd", "a\x85b", "a\xa0b", "a\u1680b", "a\u2000b\u200ac",
    "a\u2028b", "a\u2029b", "a\u202fb", "a\u205fb", "a\u3000b", "a\u200bb", "a\u180eb", "a\ufeffb", "\ufeffa",
    "  leading", "trailing  ", "  both  ", "\t\ttabs\t\t", "\n\nnewlines\n\n", "many     spaces     here",
    "mixed \t\n\r\x0b\x0c\xa0\u2003 whitespace", "\u3000\u3000", "\xa0", "\u2028", "\x85",
    "a \n b \n c", "para one.\n\npara two.", "x\x00y".replace("\x00", ""), "a\x01b\x02c", "a\x7fb", "a\x08b",
    "\x1b[31mred\x1b[0m", "\x1b[1;32mbold green\x1b[m", "\x1b[31", "\x1b[\u0663m x", "\x1b]0;title\x07",
    "a\u206ab", "a\ufff9b\ufffbc", "a\ufffcb", "a\ufffdb", "\u200c\u200d\u200e\u200f", "a\u00adb",
]

LONG_BASES = ["a photo of a bottle", "the quick brown fox jumps over the lazy dog", "x", "ab ", "!", "1",
              "supercalifragilisticexpialidocious", "中文", "😀", "é", "industrial anomaly detection, "]


def long_strings(fork):
    out = []
    for base in LONG_BASES:
        for reps in (20, 45, 100):
            out.append(" ".join([base] * reps) if base.strip() == base else base * reps)
    out.append("a" * 5000)
    out.append("ab" * 3000)
    out.append(("word " * 500).strip())
    out.append("x" * 1000 + " end")
    # Texts of exactly 74, 75, 76 and 77 BPE tokens: the EOT fits up to 75.
    for count in (73, 74, 75, 76, 77, 78):
        out.append(" ".join(["a"] * count))
        out.append(" ".join(["bottle"] * (count - 1)) + ".")
    for s in out[-12:]:
        assert 73 <= len(fork.encode(s)) <= 78, len(fork.encode(s))
    return out


SPECIAL_STRINGS = [
    "<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "a<|endoftext|>b",
    "<|startoftext|>a photo<|endoftext|>", "!<|endoftext|>", "<<|endoftext|>", "<|endoftext|>>",
    "<|endoftext|", "<|ſtartoftext|>", "<|\u017fTARTOFTEXT|>", "<start_of_text>", "<end_of_text>",
    "<|endoftext|><|endoftext|>", " <|endoftext|> ", "&lt;|endoftext|&gt;", "<|end of text|>",
]

INVALID_UTF8 = [b"\xff", b"abc\xffdef", b"\xc3", b"caf\xc3", b"\xc3\x28", b"\xe2\x82", b"\xe2\x82\x28",
                b"\xed\xa0\x80", b"\xed\xbf\xbf x", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80\xf0", b"\xf4\x90\x80\x80",
                b"\xf5\x80\x80\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\x80\x81\x82",
                b"\xbf", b"a\xfe\xfeb", b"\xef\xbb\xbfbom", b"\xe2\x80\xa8", b"bottle\xa0", b"\xc2\xa0x"]

# Mojibake that ftfy repairs (fix_encoding): these are left out of the goldens, and listed in their header.
MOJIBAKE = ["s\u00c3\u00b3", "voil\u00c3\u00a0 le travail", "\u00e2\u0153\u201d No problems", "caf\u00c3\u00a9",
            "\u00c3\u00bcber", "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d"]

# Characters the random strings are built from: a bit of everything the cleanup treats specially.
POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
        + list(" \t\n\r.,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`") * 2
        + list("éèêëàâäçñöüßøåæœÉÀÇÑÖÜ") + ["e\u0301", "a\u0308", "\u0301", "\u0327", "\u0345"]
        + list("αβγδεζηθΣσςΑΒΓΩάέ") + list("абвгдеёжзАБВГДЕЁЖЗ") + list("中文日本語한국어ไทยعربי")
        + ["😀", "👍🏽", "🇩🇪", "❤️", "\u200d"] + list("’‘“”ʼ…–—«»¡¿")
        + ["&amp;", "&lt;", "&#39;", "&eacute;", "&amp;amp;", "&nbsp;", "&copy", "&#x41;", "&ZZZ;", "&EACUTE;"]
        + list("\u00a0\u2003\u3000\u2028\x0b\x0c\x1c") + list("ﬁﬂＡｂ１２３ｶﾀ") + ["\x1b[0m", "\x01", "\x7f"]
        + list("٣²½Ⅻ①") + ["'s", "'t", "'re", "'ll", "'S", "<|endoftext|>", "İ", "ΟΣ"])


def random_strings(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 25)
        out.append("".join(rng.choice(POOL) for _ in range(k)))
    return out


# ---- writing -------------------------------------------------------------------------------------------------------

def escape(data):
    """The golden file's text field for a byte string (see the module docstring)."""
    out = []
    i = 0
    while i < len(data):
        b = data[i]
        n = 1 if b < 0x80 else 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        ch = None
        if n:
            try:
                ch = data[i:i + n].decode("utf-8")
            except UnicodeDecodeError:
                ch = None
        if ch is None:
            out.append("\\x%02x" % b)
            i += 1
            continue
        if ch == "\\":
            out.append("\\\\")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            out.append("".join("\\x%02x" % x for x in ch.encode("utf-8")))
        i += n
    return "".join(out)


def main():
    vocab = SHARED_VOCAB if os.path.exists(SHARED_VOCAB) else None  # open_clip bundles the same file
    base = SimpleTokenizer(vocab) if vocab else SimpleTokenizer()
    fork = ForkTokenizer(base)
    rng = random.Random(1234)

    example = fork("a photo of a bottle.")
    assert example == ([49406, 320, 1125, 539, 320, 5392, 269, 49407], False), example

    strings = (prompt_sentences() + ascii_sentences(rng, 300) + punctuation_strings(rng, 60) + contraction_strings()
               + digit_strings(rng, 40) + accent_strings() + script_strings() + emoji_strings() + ENTITY_STRINGS
               + WHITESPACE_STRINGS + long_strings(fork) + SPECIAL_STRINGS + INVALID_UTF8 + random_strings(rng, 700)
               + MOJIBAKE)

    lines, excluded, seen = [], [], set()
    differ = {"truncation": 0, "specials": 0}
    for s in strings:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        if data in seen:
            continue
        seen.add(data)
        text = data.decode("utf-8", errors="replace")
        if ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False):
            excluded.append(data)  # ftfy's mojibake repair changes it: not implemented in C
            continue
        ids, truncated = fork(text)
        # The peer: open_clip's own tokenizer must agree wherever the fork's differences do not apply.
        peer = base([text], context_length=CONTEXT)[0].tolist()
        peer = peer[:len(ids)]
        if peer != ids:
            if truncated and peer[:-1] == ids[:-1] and peer[-1] == EOT:
                differ["truncation"] += 1
            elif "<|" in fork.clean(text) or "<start_of_text>" in text or "<end_of_text>" in text:
                differ["specials"] += 1
            else:
                raise AssertionError(f"open_clip and the fork differ on {text!r}: {peer} vs {ids}")
        lines.append(f"{int(truncated)} {' '.join(map(str, ids))}\t{escape(data)}")

    assert len(lines) >= 2000, len(lines)
    header = [
        "# Golden ids for model/clip_tokenizer.c, made by tests/reference/make_clip_tokenizer_goldens.py with",
        f"# open_clip {open_clip.__version__}, ftfy {ftfy.__version__}, regex {regex.__version__} "
        f"(ImageBind fork semantics: EOT appended, then cut to {CONTEXT}).",
        "# Format: <truncated 0|1> <ids...><TAB><text, \\\\ and \\xHH escaped>. Zeros pad the ids to 77.",
        f"# {len(lines)} strings; open_clip differs from the fork on {differ['truncation']} (EOT written into "
        f"slot 76) and {differ['specials']} (special-token spellings), as expected.",
        f"# Left out, because ftfy's mojibake repair (not implemented in C) changes them ({len(excluded)}):",
    ] + [f"#   {escape(d)}" for d in excluded]
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"wrote {OUT}: {len(lines)} strings ({len(excluded)} left out for mojibake repair), "
          f"{os.path.getsize(OUT)} bytes; open_clip differs on {differ}")


if __name__ == "__main__":
    main()
