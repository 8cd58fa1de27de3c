#include "retrieval/rag_prompt.hpp"

#include <algorithm>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dsrsq::retrieval {

std::int64_t context_room(const ModelConfig& cfg, const KVBudget& budget, const Encoded& enc,
                          std::int64_t max_new_tokens) {
  const std::size_t bytes = budget.resolve(cfg, enc.prompt_len + max_new_tokens);
  const auto tokens = static_cast<std::int64_t>(bytes / KVBudget::full_bytes(cfg, 1));
  return tokens - (1 + enc.query_len + max_new_tokens);
}

std::vector<TokenSpan> keep_top(const std::vector<TokenSpan>& units, const std::vector<double>& scores,
                                std::int64_t room) {
  DSRSQ_REQUIRE(units.size() == scores.size(), "keep_top: ", units.size(), " units, ", scores.size(), " scores");
  std::vector<std::size_t> order(units.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return scores[a] > scores[b]; });
  std::vector<TokenSpan> kept;
  std::int64_t used = 0;
  for (const std::size_t u : order) {
    if (used + units[u].size() > room) continue;
    used += units[u].size();
    kept.push_back(units[u]);
  }
  std::sort(kept.begin(), kept.end(), [](const TokenSpan& a, const TokenSpan& b) { return a.begin < b.begin; });
  return kept;
}

std::vector<double> focal_token_scores(const std::vector<TokenSpan>& chunks,
                                       const std::vector<std::vector<double>>& pass_mass, std::int64_t sinks,
                                       std::int64_t context_tokens) {
  DSRSQ_REQUIRE(chunks.size() == pass_mass.size(), "focal_token_scores: ", chunks.size(), " chunks, ", pass_mass.size(),
                " passes");
  std::vector<double> score(static_cast<std::size_t>(context_tokens), -std::numeric_limits<double>::infinity());
  for (std::size_t c = 0; c < chunks.size(); ++c) {
    const TokenSpan& ch = chunks[c];
    DSRSQ_REQUIRE(ch.begin >= 0 && ch.end <= context_tokens && static_cast<std::int64_t>(pass_mass[c].size()) > ch.size(),
                  "focal_token_scores: chunk [", ch.begin, ", ", ch.end, ") does not fit its pass or the context");
    for (std::int64_t t = ch.begin; t < ch.end; ++t) {
      const std::int64_t at = 1 + (t - ch.begin);  // position in the pass
      if (at >= sinks) score[static_cast<std::size_t>(t)] = pass_mass[c][static_cast<std::size_t>(at)];
    }
  }
  return score;
}

std::vector<TokenSpan> keep_best_units(const std::vector<TokenSpan>& units, const std::vector<double>& token_scores,
                                       std::int64_t room) {
  std::vector<double> best;
  for (const TokenSpan& u : units) {
    DSRSQ_REQUIRE(u.begin >= 0 && u.begin < u.end && u.end <= static_cast<std::int64_t>(token_scores.size()),
                  "keep_best_units: unit [", u.begin, ", ", u.end, ") outside the ", token_scores.size(), " scored tokens");
    best.push_back(*std::max_element(token_scores.begin() + u.begin, token_scores.begin() + u.end));
  }
  return keep_top(units, best, room);
}

std::string spans_text(const std::vector<TokenSpan>& spans) {
  std::string out;
  for (const TokenSpan& s : spans) {
    if (!out.empty()) out += ',';
    out += std::to_string(s.begin);
    out += '-';
    out += std::to_string(s.end);
  }
  return out;
}

RagPrompt rag_prompt(const Encoded& enc, const std::vector<TokenSpan>& kept, bool contiguous) {
  RagPrompt p;
  p.idx.push_back(0);  // [BOS]
  std::int64_t last = -1;
  for (const TokenSpan& s : kept) {
    DSRSQ_REQUIRE(s.begin > last && s.begin <= s.end && s.end <= enc.context_tokens,
                  "rag_prompt: kept spans must be ascending, disjoint and inside the context");
    for (std::int64_t t = s.begin; t < s.end; ++t) p.idx.push_back(static_cast<std::int32_t>(1 + t));
    last = s.end - 1;
  }
  for (std::int64_t i = enc.prompt_len - enc.query_len; i < enc.prompt_len; ++i)
    p.idx.push_back(static_cast<std::int32_t>(i));  // [SEP] question [ANS]
  p.pos.resize(p.idx.size());
  if (contiguous)
    std::iota(p.pos.begin(), p.pos.end(), 0);
  else
    p.pos = p.idx;
  return p;
}

}  // namespace dsrsq::retrieval
