#pragma once
// Sentence-aligned chunking of context tokens (ALGORITHMS.md sections 3 and 4):
// the shared front end of rag and attention_rag. Sentences are found in the
// decoded text, so the rule is the same for every tokenizer; chunks pack whole
// sentences up to a token count, as LlamaIndex's SentenceSplitter does.
#include <cstdint>
#include <span>
#include <vector>

#include "data/tokenizer.hpp"

namespace dsrsq::retrieval {

// Tokens [begin, end) of the sequence given to sentence_spans.
struct TokenSpan {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
  bool operator==(const TokenSpan&) const = default;
};

// The sentences of `tokens`, covering them in order without gaps. Each token
// is decoded on its own (special ids decode to nothing) and the texts are
// concatenated. A sentence ends with the token holding a '.', '!' or '?' (and
// any closing quotes or brackets right after it) that is followed by
// whitespace or ends the text, or with a token holding a newline that
// follows text; whitespace after an end starts the next sentence. So "3.14" or "e.g.x" do not split,
// while an abbreviation followed by a space ("Mr. Smith") does: a known
// limitation of rule-based splitting. Tokens whose text straddles a boundary
// end the sentence they start in.
std::vector<TokenSpan> sentence_spans(std::span<const std::int32_t> tokens, const Tokenizer& tok);

// Chunks of at most `max_tokens` tokens (>= 1) packing consecutive whole
// sentences greedily in order; a sentence longer than max_tokens is cut into
// pieces of max_tokens (the last piece shorter), which pack like sentences.
// Covers the sentences' tokens in order without gaps.
std::vector<TokenSpan> pack_chunks(const std::vector<TokenSpan>& sentences, std::int64_t max_tokens);

// The sentences cut at chunk boundaries: every unit lies inside one chunk
// (a sentence longer than a chunk becomes its pieces). The units attention_rag
// keeps or drops.
std::vector<TokenSpan> units_within(const std::vector<TokenSpan>& sentences, std::int64_t max_tokens);

}  // namespace dsrsq::retrieval
