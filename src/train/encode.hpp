#pragma once
// From examples to token sequences and (B, T) batches.
//
// Sequence layout (DESIGN.md section 3): [BOS] context [SEP] query [ANS] answer [EOS].
// The prompt is everything up to and including [ANS]; training predicts the
// answer tokens and [EOS] only (answer-only loss).
// Truncation rule (one rule for every method, recorded in the results file):
// when prompt + answer + EOS exceed max_seq_len, context tokens are dropped
// from the LEFT (the oldest text), never the query or the answer.
#include <cstdint>
#include <string>
#include <vector>

#include "data/example.hpp"
#include "data/tokenizer.hpp"
#include "model/transformer.hpp"

namespace dsrsq {

inline constexpr const char* kTruncationRule = "left-truncate context: drop the oldest context tokens so prompt + answer + EOS fit max_seq_len";

struct Encoded {
  std::vector<std::int32_t> tokens;  // full sequence (prompt + answer + EOS)
  std::int64_t prompt_len = 0;       // tokens up to and including [ANS]
  std::int64_t query_len = 0;        // [SEP] query [ANS]
  std::int64_t context_tokens = 0;   // context tokens kept
  std::int64_t truncated = 0;        // context tokens dropped by the truncation rule
  // Multi-query training sequences (all_queries): 1 at every token that is an
  // answer or its EOS, of every query. Empty: the answer is everything from
  // prompt_len on (one query).
  std::vector<std::uint8_t> answer_mask;
  std::int64_t queries = 1;  // queries in the sequence
};

// answer_budget: tokens reserved for the answer and EOS (the first answer is encoded).
// all_queries (training a multi-query task, data::make_task's mq_recall): the
// example's further queries (meta more_queries / more_answers) follow the
// first answer, each as [SEP] query [ANS] answer [EOS], so one sequence
// supervises every answer; prompt_len and query_len still describe the first
// query (what evaluation asks).
Encoded encode_example(const data::Example& ex, const Tokenizer& tok, std::int64_t max_seq_len,
                       bool all_queries = false);

// Host buffers of one training batch.
struct HostBatch {
  std::int64_t B = 0, T = 0;
  std::vector<std::int32_t> tokens, pos, targets;
  std::vector<float> mask;
  std::vector<std::uint8_t> is_answer;  // 1 where the target is an answer token or EOS
  std::int64_t answer_tokens = 0;  // rows with mask 1
  // Optional (DSRSQ): 1 where the token is one RCKV keeps compressed at inference.
  std::vector<std::uint8_t> compress;
  Batch view();
};

// Right-pads the sequences to the longest one; padding has mask 0. Answer and
// EOS targets (of every query, see Encoded::answer_mask) get weight 1; the other targets (context and query: a language-
// modelling term that teaches the copying that retrieval needs) get lm_weight.
// pad_multiple > 1 pads T up to a multiple of it (sequence parallelism needs
// T divisible by 2 sp); padding positions continue 0..T-1.
HostBatch make_batch(const std::vector<const Encoded*>& seqs, std::int32_t pad_id, float lm_weight = 0.0f,
                     std::int64_t pad_multiple = 1);
// The columns (time steps) `columns` of every row, positions kept: a sequence-
// parallel rank's zigzag shard (dist::zigzag_shard).
HostBatch shard_batch(const HostBatch& hb, const std::vector<std::int32_t>& columns);

}  // namespace dsrsq
