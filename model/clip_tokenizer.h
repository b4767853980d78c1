// The CLIP byte-level BPE tokenizer of ImageBind's text branch (SimpleTokenizer in AnomalyGPT's
// code/model/ImageBind/models/multimodal_preprocessors.py, the same algorithm as open_clip's): text in, the 77
// token ids the text encoder reads out.
//
//   ids = [49406 <|startoftext|>] + bpe(clean(text)) + [49407 <|endoftext|>], cut to 77, zero-padded
//
// Truncation follows ImageBind's fork, not open_clip: EOT is appended first and the list is then cut to 77, so
// a text of 76 or more BPE tokens ends in a text token, with no EOT (open_clip would overwrite slot 76 with
// EOT). The text encoder then picks the argmax id as its "EOT" position, exactly as ImageBind does.
//
// clean(text) (model/clip_text_clean.c), in order (what basic_clean, whitespace_clean and .lower() do in Python):
//   1. UTF-8 decode; invalid bytes become U+FFFD as in bytes.decode("utf-8", errors="replace").
//   2. ftfy.fix_text (ftfy 6.3.1 defaults) per line, each line repeated to a fixed point: HTML entities (ftfy's
//      rules: only `&...;` forms, off from the first line that contains '<'), C1 controls as windows-1252,
//      Latin ligatures, full/halfwidth forms, curly quotes, line breaks, ANSI terminal escapes, control
//      characters, NFC. NOT done: ftfy's mojibake repair (fix_encoding: re-decoding text that was decoded in
//      the wrong codec, e.g. "sÃ³" -> "só"); such text keeps its mojibake here.
//   3. html.unescape twice (Python's rules: html5 entities with and without ';', numeric references).
//   4. strip, collapse runs of the regex module's \s to one space, strip, str.lower() (with the final-sigma rule).
// then the pre-token pattern <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
// [^\s\p{L}\p{N}]+ (IGNORECASE), each piece as UTF-8 bytes mapped through bytes_to_unicode, then BPE with "</w>".
// The Unicode data (model/unicode_tables.c) was read from Python 3.11 / regex / ftfy themselves; see its header.
// As in the fork, text that spells "<|startoftext|>" or "<|endoftext|>" becomes ids 49406 / 49407.
//
// Cost is linear in the text except where Python's is worse: BPE of one long word is O(n log n) (Python O(n^2)),
// and entities nested k deep ("&amp;amp;...") take k passes over their line, as ftfy's fixed-point loop does.
// Callers taking text from the network should cap its length.
//
// A loaded tokenizer is read-only: any number of threads may call clip_tokenize on it at once.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

#define CLIP_CONTEXT_LENGTH 77
#define CLIP_VOCAB_SIZE 49408
#define CLIP_NUM_MERGES 48894  // lines [1, 49152-256-2+1) of the merges file
#define CLIP_SOT_ID 49406      // <|startoftext|>
#define CLIP_EOT_ID 49407      // <|endoftext|>

typedef struct ClipTokenizer ClipTokenizer;

// Loads the merges file (bpe_simple_vocab_16e6.txt.gz), gzipped or plain text. A file that is not the CLIP
// merges file (too few lines, a line that is not two known symbols, a broken gzip stream, invalid UTF-8) is a
// clear error (AGPT_ERR_FORMAT or AGPT_ERR_IO); *out is set only on success.
Status clip_tokenizer_load_file(const char *path, ClipTokenizer **out);
// The same from bytes in memory (the model file embeds them): gzip when they start with the gzip magic
// (1f 8b), plain text otherwise. The bytes are not kept after the call.
Status clip_tokenizer_load_memory(const void *gz_or_text, size_t len, ClipTokenizer **out);
void clip_tokenizer_free(ClipTokenizer *t);

typedef struct ClipTokens {
    int32_t ids[CLIP_CONTEXT_LENGTH];  // [77] the encoder input; zero after n_tokens (id 0 is also "!", so
                                       // read n_tokens, not the zeros, to find the end)
    int n_tokens;                      // ids written before the zero padding: 2..77
    bool truncated;                    // the text did not fit: some BPE tokens (and the EOT) were cut off
} ClipTokens;

// Tokenizes one NUL-terminated UTF-8 string (any bytes are accepted). Fails only on bad arguments or when
// memory runs out.
Status clip_tokenize_ex(const ClipTokenizer *t, const char *text, ClipTokens *out);
// The same with plain outputs: ids [77] zero-padded, *n_tokens as above. A caller that must know about
// truncation uses clip_tokenize_ex (or sees ids[76] != CLIP_EOT_ID when *n_tokens == 77).
Status clip_tokenize(const ClipTokenizer *t, const char *text, int32_t *ids, int *n_tokens);

// The cleanup alone (steps 1-4 above), as NUL-terminated UTF-8 in a malloc'd buffer the caller frees. For tests
// and for showing users what the tokenizer saw.
Status clip_clean_text(const char *text, char **out);
