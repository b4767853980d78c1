// The SentencePiece BPE tokenizer of LLaMA / Vicuna (reference section 5.3), read straight from its
// tokenizer.model (a serialized sentencepiece.ModelProto) with a small protobuf reader of our own: no protobuf or
// sentencepiece library at run time. It reproduces what sentencepiece 0.2 computes for a BPE model:
//
//   encode(text) = byte_fallback(bpe(normalize(text)))      (no BOS/EOS: callers prepend BOS themselves)
//
// normalize: identity normalisation (the model must have an empty precompiled_charsmap; LLaMA's normalizer is
//   "identity"), except that malformed UTF-8 becomes U+FFFD one byte at a time, as sentencepiece's normalizer does.
//   add_dummy_prefix prepends one "▁" (U+2581) to a non-empty text; escape_whitespaces turns every ' ' into "▁"
//   (tabs and newlines stay as they are); remove_extra_whitespaces (off in LLaMA) drops leading, trailing and
//   repeated spaces. The empty text encodes to no ids.
// bpe: symbols start as UTF-8 characters (user-defined pieces match first, longest wins, and are never merged
//   further); repeatedly merge the adjacent pair whose concatenation is a NORMAL/USER_DEFINED/UNUSED piece of
//   highest score, the leftmost on ties (a heap: O(n log n)); UNUSED results are split back into their parts.
// byte_fallback: a symbol that is not a piece becomes one <0xNN> piece per UTF-8 byte (or <unk> without it).
//
// decode(ids): pieces concatenated; "▁" -> ' '; the "▁" that starts the first non-control piece is dropped (the
// dummy prefix); runs of <0xNN> pieces become bytes, with every byte that does not form valid UTF-8 shown as
// U+FFFD; control pieces (<s>, </s>) vanish; <unk> shows as the model's unk_surface (" ⁇ ").
//
// Refused at load (clear error, never a crash): truncated or corrupt protobuf, files that are not a model (PNG,
// empty), model types other than BPE (unigram, word, char), a normalizer or denormalizer with a precompiled
// charsmap (nmt_nfkc and friends: not implemented), treat_whitespace_as_suffix, duplicate or empty pieces, byte
// pieces without byte_fallback, byte_fallback without all 256 byte pieces, no or several <unk> pieces.
//
// Differences from HF's slow LlamaTokenizer, which the reference calls: HF first splits the text on its special
// tokens, so the literal text "<s>" becomes id 1 there; here (as in sentencepiece) it is ordinary text.
// Tested against sentencepiece 0.2.3 on LLaMA's model and on variants of it with the options LLaMA leaves off
// (remove_extra_whitespaces, no dummy prefix, no whitespace escaping, user-defined and unused pieces); see
// tests/reference/make_sp_tokenizer_goldens.py. User-defined pieces are matched by a scan over all of them at each
// position (LLaMA has none; fine for a handful).
// A loaded tokenizer is read-only: any number of threads may encode and decode with it at once.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

typedef struct SpTokenizer SpTokenizer;

// Loads tokenizer.model from a file; *out is set only on success.
Status sp_load_file(const char *path, SpTokenizer **out);
// The same from bytes in memory (the model file embeds them); the bytes are not kept after the call.
Status sp_load_memory(const void *buf, size_t len, SpTokenizer **out);
void sp_free(SpTokenizer *t);

// Encodes a NUL-terminated string (any bytes accepted) into ids[0..*n). When cap is too small it fails with
// AGPT_ERR_ARG, sets *n to the count needed (so the caller can retry) and leaves the first cap ids in ids.
Status sp_encode(const SpTokenizer *t, const char *text, int32_t *ids, int cap, int *n);
// Decodes ids into a malloc'd NUL-terminated UTF-8 string (caller frees). An id outside [0, vocab) is an error.
Status sp_decode(const SpTokenizer *t, const int32_t *ids, int n, char **out);

int sp_vocab_size(const SpTokenizer *t);
// The piece string of an id ("▁the", "<0x0A>", "<s>"), or NULL when id is out of range.
const char *sp_piece(const SpTokenizer *t, int id);
// The id of an exact piece string, or -1.
int sp_piece_to_id(const SpTokenizer *t, const char *piece);
// <s>, </s>, <unk> (1, 2, 0 for LLaMA); -1 when the model has no such control piece.
int sp_bos_id(const SpTokenizer *t);
int sp_eos_id(const SpTokenizer *t);
int sp_unk_id(const SpTokenizer *t);
