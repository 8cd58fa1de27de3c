#pragma once
// What rag and attention_rag share after scoring (ALGORITHMS.md sections 3,
// 4 and the RAG positions correction): how many context tokens the byte
// budget leaves, which ranked units fit, and the prompt
// [BOS] kept context [SEP] question [ANS] they are read as.
#include <cstdint>
#include <string>
#include <vector>

#include "kv/kv_policy.hpp"
#include "model/config.hpp"
#include "retrieval/chunks.hpp"
#include "train/encode.hpp"

namespace dsrsq::retrieval {

// Context tokens a full cache over the retrieved prompt can hold within
// `budget` (resolved for the whole sequence: prompt + max_new_tokens, as the
// KV policy resolves it): the budget's whole tokens minus [BOS], [SEP]
// question [ANS] and the generated tokens. Negative when even those exceed it
// (the cell is infeasible: no context fits).
std::int64_t context_room(const ModelConfig& cfg, const KVBudget& budget, const Encoded& enc,
                          std::int64_t max_new_tokens);

// The units to keep: taken in decreasing score (ties: the earlier unit
// first), each one that still fits in `room` tokens, until none is left (a
// unit too large for what is left is skipped, so one long top unit does not
// leave the budget empty: the budget is filled in score order). Returned in
// document order.
std::vector<TokenSpan> keep_top(const std::vector<TokenSpan>& units, const std::vector<double>& scores,
                                std::int64_t room);

// AttentionRAG's token scores: each context token gets the focal attention
// mass of its position in its chunk's pass ([BOS] chunk [SEP] question [ANS]:
// pass position 1 + its offset in the chunk); the first `sinks` positions of
// every pass ([BOS] included) get -inf (not ranked). pass_mass[c] holds chunk
// c's pass, chunks cover the context's tokens.
std::vector<double> focal_token_scores(const std::vector<TokenSpan>& chunks,
                                       const std::vector<std::vector<double>>& pass_mass, std::int64_t sinks,
                                       std::int64_t context_tokens);

// AttentionRAG's rule: a unit (sentence) scores the best score of its tokens
// (token_scores per context token; -inf: not ranked, e.g. an attention sink),
// then keep_top. A unit holding the top token is kept whole.
std::vector<TokenSpan> keep_best_units(const std::vector<TokenSpan>& units, const std::vector<double>& token_scores,
                                       std::int64_t room);

// "b-e,b-e,...": kept context-relative spans [b, e), for an example's notes.
std::string spans_text(const std::vector<TokenSpan>& spans);

// The retrieved prompt: indices into enc.tokens of [BOS], the kept context
// spans (context-relative, ascending, disjoint), [SEP] question [ANS]; and
// their positions: 0, 1, ... when `contiguous` (the retrieved text read as a
// prompt of its own), else each token's original position.
struct RagPrompt {
  std::vector<std::int32_t> idx, pos;
};
RagPrompt rag_prompt(const Encoded& enc, const std::vector<TokenSpan>& kept, bool contiguous);

}  // namespace dsrsq::retrieval
