#include "retrieval/chunks.hpp"

#include <algorithm>
#include <string>

#include "core/error.hpp"

namespace dsrsq::retrieval {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_closer(char c) { return c == '"' || c == '\'' || c == ')' || c == ']' || c == '}'; }

}  // namespace

std::vector<TokenSpan> sentence_spans(std::span<const std::int32_t> tokens, const Tokenizer& tok) {
  const auto n = static_cast<std::int64_t>(tokens.size());
  // The text and, per character, the token it came from.
  std::string text;
  std::vector<std::int64_t> owner;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t id = tokens[static_cast<std::size_t>(i)];
    if (tok.is_special(id)) continue;
    const std::string piece = tok.decode(std::span<const std::int32_t>(&id, 1));
    text += piece;
    owner.insert(owner.end(), piece.size(), i);
  }
  // A sentence ends after token ends[k] (ascending, unique).
  std::vector<std::int64_t> ends;
  auto end_at = [&](std::int64_t t) {
    if (ends.empty() || ends.back() < t) ends.push_back(t);
  };
  const std::size_t m = text.size();
  bool content = false;  // the open sentence holds a non-space character
  for (std::size_t c = 0; c < m; ++c) {
    if (text[c] == '\n') {
      // A newline ends a sentence with text in it; after an end it is leading space.
      if (content) end_at(owner[c]);
      content = false;
      continue;
    }
    if (!is_space(text[c])) content = true;
    if (text[c] != '.' && text[c] != '!' && text[c] != '?') continue;
    std::size_t e = c;
    while (e + 1 < m && (is_closer(text[e + 1]) || text[e + 1] == '.' || text[e + 1] == '!' || text[e + 1] == '?')) ++e;
    if (e + 1 == m || is_space(text[e + 1])) {
      end_at(owner[e]);
      content = false;
    }
    c = e;
  }
  std::vector<TokenSpan> out;
  std::int64_t begin = 0;
  for (const std::int64_t e : ends) {
    out.push_back({begin, e + 1});
    begin = e + 1;
  }
  if (begin < n) out.push_back({begin, n});
  return out;
}

std::vector<TokenSpan> pack_chunks(const std::vector<TokenSpan>& sentences, std::int64_t max_tokens) {
  DSRSQ_INPUT_CHECK(max_tokens >= 1, "chunking: chunk size must be >= 1 token, got ", max_tokens);
  std::vector<TokenSpan> out;
  TokenSpan cur{-1, -1};
  for (const TokenSpan& s : units_within(sentences, max_tokens)) {
    if (cur.begin >= 0 && s.end - cur.begin <= max_tokens) {
      cur.end = s.end;
      continue;
    }
    if (cur.begin >= 0) out.push_back(cur);
    cur = s;
  }
  if (cur.begin >= 0) out.push_back(cur);
  return out;
}

std::vector<TokenSpan> units_within(const std::vector<TokenSpan>& sentences, std::int64_t max_tokens) {
  DSRSQ_INPUT_CHECK(max_tokens >= 1, "chunking: chunk size must be >= 1 token, got ", max_tokens);
  std::vector<TokenSpan> out;
  for (const TokenSpan& s : sentences)
    for (std::int64_t b = s.begin; b < s.end; b += max_tokens) out.push_back({b, std::min(s.end, b + max_tokens)});
  return out;
}

}  // namespace dsrsq::retrieval
