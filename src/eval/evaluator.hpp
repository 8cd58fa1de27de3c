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
#include "eval/context_selector.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"

namespace dsrsq {

struct ExampleEval {
  std::string id, task, prediction;
  std::vector<std::string> golds;
  double f1 = 0, em = 0, rouge_l = 0;
  double bleu = 0;  // BLEU-4 of this example alone; NaN (n/a) when no gold has >= 4 tokens
  std::int64_t context_tokens = 0, prompt_tokens = 0, generated_tokens = 0, truncated_tokens = 0;
  std::int64_t prompt_tokens_in = 0;  // prompt tokens the method fed to the model (a selector keeps fewer)
  double serve_s = 0;                 // wall time of selection + prefill + decode (ttft + the decode steps)
  // Reuse protocol (--protocol reuse): this example's equal share of its
  // group's shared context compression (wall time, tokens run) -- summed over
  // a group's examples they count the compression once. 0 otherwise.
  double shared_serve_s = 0, shared_tokens = 0;
  double attended_tokens = 0;  // keys one decode query attended to (mean over decode steps)
  double full_keys = 0;        // keys a full cache would hold at those steps (mean): token-efficiency denominator
  double ttft_s = 0, itl_s = 0;  // time to first token; mean inter-token latency
  std::size_t budget_requested = 0, budget_achieved = 0;
  bool infeasible = false;  // the policy could not meet the budget (KVPolicy::infeasible)
  KVMemory kv;
  std::size_t peak_bytes = 0;  // activations + KV, peak over the example
  double avg_bytes = 0;        // time-averaged activations + KV
  double flops = 0;            // forward FLOPs spent (cost model)
  std::map<std::string, std::string> meta;
};

// Columns that mean one thing for every method (DESIGN.md section 9):
//  throughput_tok_s      tokens the method ran through the model (prompt tokens fed,
//                        after any selector, + generated tokens) / serve_s;
//  context_tokens_per_s  the examples' full prompt tokens (context + question, before
//                        selection) / serve_s: the context served per second;
//  serve_s               sum over examples of selection + prefill + decode wall time
//                        (tokenisation and scoring are not the method's work: excluded);
//                        under --protocol reuse plus each group's shared context
//                        compression, once per group (ExampleEval::shared_serve_s);
//                        tokens_run then counts a group's context once too;
//  peak_mem_bytes        max over this method's examples of the activation arena's
//                        high-water mark (reset at every example) + the policy's KV
//                        peak during prefill: this method's own figure;
//  process_peak_rss_bytes the process's peak RSS (VmHWM) when this method finished:
//                        scope = process lifetime (it includes training and every
//                        method evaluated before), not a per-method figure;
//  bleu                  corpus BLEU-4; NaN (n/a) when no gold of the corpus has >= 4
//                        tokens (eval::BleuStats::bleu4_defined).
struct MethodEval {
  std::string method;
  std::vector<ExampleEval> examples;
  double f1 = 0, em = 0, rouge_l = 0, bleu = 0;  // means; bleu = corpus BLEU-4 (NaN: n/a)
  double peak_mem_bytes = 0, avg_mem_bytes = 0, process_peak_rss_bytes = 0;
  double throughput_tok_s = 0, context_tokens_per_s = 0, latency_s = 0, itl_s = 0, token_efficiency = 0, flops = 0;
  double tokens_run = 0, context_tokens_served = 0;  // the two numerators above
  double serve_s = 0;  // the denominator above
  double wall_s = 0;   // the whole evaluation, tokenisation and scoring included
  std::int64_t infeasible_examples = 0;  // examples whose KV budget the method could not meet
};

struct EvalConfig {
  // A context selector (DSRSQ's retriever, RAG): the prompt indices that enter
  // the model and optionally their positions (eval/context_selector.hpp).
  // Null: the whole prompt. It runs inside the time-to-first-token clock.
  ContextSelector select;
  // A method with its own model (GCA): tokens (1, n), positions (1, n) ->
  // logits (n, V), run instead of the backbone; the policy reports its memory.
  std::function<TensorView(TensorView tokens, TensorView pos)> extend;
  // With extend: that model's activation memory beside the backbone's arena
  // (a new high-water mark; its bytes), counted in peak_bytes and avg_bytes.
  std::function<void()> reset_activation_peak;
  std::function<std::size_t()> activation_peak_bytes;
  std::string name;  // the method's name in the results (empty: the policy's)
  KVBudget budget;
  std::int64_t max_new_tokens = 16;
  std::int64_t max_seq_len = 512;
  // Query-agnostic protocol (--protocol context_only): the policy compresses
  // the context in one call knowing nothing of the question (query_len 0),
  // then the question arrives in a second call, then decoding. Off: the
  // question is part of the one prefill call (query-aware).
  bool query_agnostic = false;
  // Reuse protocol (--protocol reuse, "compress once, ask many"; implies
  // query_agnostic, refuses a selector): examples whose context is the same
  // string form a group (order of first appearance); the policy compresses
  // the group's context ONCE (as in context_only: query_len 0), takes a
  // snapshot (KVPolicy::snapshot), and answers every question of the group
  // from a restore of it. See evaluate_reuse.
  bool reuse = false;
};

MethodEval evaluate_method(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                           const std::vector<data::Example>& test, const EvalConfig& cfg);

// The reuse protocol (cfg.reuse; evaluate_method calls it). Per group:
//  * the shared context: [BOS] + the context tokens every member keeps (members
//    are encoded as usual; when the left-truncation rule kept different amounts
//    for different question lengths, the group keeps the shortest suffix and a
//    member that lost more records it: truncated_tokens and meta
//    "reuse_extra_truncated");
//  * the sequence the policy begins: prompt_len = shared context + the group's
//    longest question, query_len 0, and the budget basis = that + max_new_tokens
//    (the fraction refers to the group's longest sequence);
//  * begin + context prefill + snapshot are timed once: meta "shared_prefill_s"
//    on every member, and each member's shared_serve_s = that / group size
//    (so the method's serve_s counts it once per group);
//  * each member: ttft_s = restore + question prefill + end_prefill + first
//    token; then greedy decoding as in serve_example; its KV numbers are the
//    policy's after the question (resident after its prefill, peak over
//    context + question prefill, bytes read per decode step);
//  * peak_bytes also counts the snapshot the group holds while its questions
//    are answered (meta "snapshot_bytes"), and the shared prefill's activations;
//  * meta: "reuse_group" (0-based, order of first appearance), "reuse_group_size",
//    "shared_context_tokens", "shared_prefill_s", "snapshot_bytes",
//    "reuse_extra_truncated"; prompt_tokens_in = the question tokens this example
//    ran (shared_tokens carries its share of the context).
// The examples come back in the order of `test`.
std::vector<ExampleEval> evaluate_reuse(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                                        const std::vector<data::Example>& test, const EvalConfig& cfg);

// The two halves of evaluate_method.
// Serving one example: encode, select, prefill, greedy decode through the policy, with
// its costs (time, memory, KV bytes, FLOPs); the scores are left at 0.
ExampleEval serve_example(Transformer& model, KVPolicy& policy, const Tokenizer& tok, const data::Example& ex,
                          const EvalConfig& cfg);
// Scoring and aggregation: every example's scores (in order), the corpus scores and
// the method's summary columns from its examples.
void score_and_aggregate(MethodEval& me);

}  // namespace dsrsq
