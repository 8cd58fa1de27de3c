#pragma once
// Evaluator: for each test example, prefill context + query through the
// method's KV policy, greedy-decode the answer through the same policy, score
// it and measure its cost. Every example starts from a clean cache
// (KVPolicy::begin) and a clean activation arena, so evaluating an example
// alone or after others gives the same prediction.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "data/example.hpp"
#include "data/tokenizer.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"

namespace dsrsq {

struct ExampleEval {
  std::string id, task, prediction;
  std::vector<std::string> golds;
  double f1 = 0, em = 0, rouge_l = 0, bleu = 0;
  std::int64_t context_tokens = 0, prompt_tokens = 0, generated_tokens = 0, truncated_tokens = 0;
  double attended_tokens = 0;  // keys one decode query attended to (mean over decode steps)
  double full_keys = 0;        // keys a full cache would hold at those steps (mean): token-efficiency denominator
  double ttft_s = 0, itl_s = 0;  // time to first token; mean inter-token latency
  std::size_t budget_requested = 0, budget_achieved = 0;
  KVMemory kv;
  std::size_t peak_bytes = 0;  // activations + KV, peak over the example
  double avg_bytes = 0;        // time-averaged activations + KV
  double flops = 0;            // forward FLOPs spent (cost model)
  std::map<std::string, std::string> meta;
};

struct MethodEval {
  std::string method;
  std::vector<ExampleEval> examples;
  double f1 = 0, em = 0, rouge_l = 0, bleu = 0;  // means; bleu = corpus BLEU-4
  double peak_mem_bytes = 0, avg_mem_bytes = 0, peak_rss_bytes = 0;
  double throughput_tok_s = 0, latency_s = 0, itl_s = 0, token_efficiency = 0, flops = 0;
  double wall_s = 0;
};

struct EvalConfig {
  // A context selector (DSRSQ's retriever): the prompt indices that enter the
  // model, sorted; each keeps its original position. Null: the whole prompt.
  // It runs inside the time-to-first-token clock.
  std::function<std::vector<std::int32_t>(const Encoded&)> select;
  std::string name;  // the method's name in the results (empty: the policy's)
  KVBudget budget;
  std::int64_t max_new_tokens = 16;
  std::int64_t max_seq_len = 512;
};

MethodEval evaluate_method(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                           const std::vector<data::Example>& test, const EvalConfig& cfg);

}  // namespace dsrsq
