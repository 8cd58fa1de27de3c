#include "eval/evaluator.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "core/timer.hpp"
#include "eval/metrics.hpp"

namespace dsrsq {

namespace {

std::int32_t argmax_last_row(const TensorView& logits) {
  const std::int64_t N = logits.shape[0], V = logits.shape[1];
  const float* row = logits.ptr<float>() + (N - 1) * V;
  return static_cast<std::int32_t>(std::max_element(row, row + V) - row);
}

}  // namespace

ExampleEval serve_example(Transformer& model, KVPolicy& policy, const Tokenizer& tok, const data::Example& ex,
                          const EvalConfig& cfg) {
  Arena& act = model.activation_arena();
  ExampleEval r;
  r.id = ex.id;
  r.golds = ex.answers;
  r.meta = ex.meta;
  r.task = ex.meta.count("task") ? ex.meta.at("task") : "";
  Encoded enc = encode_example(ex, tok, cfg.max_seq_len - cfg.max_new_tokens + static_cast<std::int64_t>(tok.encode(ex.answers.front()).size()) + 1);
  r.prompt_tokens = enc.prompt_len;
  r.context_tokens = enc.context_tokens;
  r.truncated_tokens = enc.truncated;

  // FLOPs: the Backend's meter over everything this example runs (selection,
  // scoring, clustering, reconstruction, the model), from the ops' cost functions.
  Backend& be = model.backend();
  const double flops0 = be.flops_counted();
  Timer t;
  std::vector<std::int32_t> pos;
  if (cfg.select) {
    pos = cfg.select(enc);
  } else {
    pos.resize(static_cast<std::size_t>(enc.prompt_len));
    for (std::int64_t i = 0; i < enc.prompt_len; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  }
  const auto n_in = static_cast<std::int64_t>(pos.size());
  std::vector<std::int32_t> prompt(pos.size());
  for (std::size_t i = 0; i < pos.size(); ++i) prompt[i] = enc.tokens[static_cast<std::size_t>(pos[i])];
  r.prompt_tokens_in = n_in;
  r.meta["prompt_tokens_in"] = std::to_string(n_in);
  SequenceInfo info;
  info.batch = 1;
  info.prompt_len = n_in;
  info.query_len = cfg.query_agnostic ? 0 : enc.query_len;
  info.max_new_tokens = cfg.max_new_tokens;
  // The budget is a fraction of the FULL sequence's cache, whatever a selector keeps.
  info.budget_tokens = enc.prompt_len + cfg.max_new_tokens;
  policy.begin(info, cfg.budget);
  act.reset();  // activations of earlier work are dead: measure this example alone
  act.reset_peak();
  // Query-agnostic: the context part first (indices before the question),
  // then the question; query-aware: one call.
  const std::int64_t question_at = enc.prompt_len - enc.query_len;
  const auto n_ctx = cfg.query_agnostic
                         ? static_cast<std::int64_t>(std::lower_bound(pos.begin(), pos.end(), question_at) - pos.begin())
                         : n_in;
  if (n_ctx > 0)
    model.extend(policy, TensorView(prompt.data(), Shape{1, n_ctx}), TensorView(pos.data(), Shape{1, n_ctx}));
  if (n_ctx < n_in)
    model.extend(policy, TensorView(prompt.data() + n_ctx, Shape{1, n_in - n_ctx}),
                 TensorView(pos.data() + n_ctx, Shape{1, n_in - n_ctx}));
  policy.end_prefill();
  std::int32_t next = argmax_last_row(model.logits());
  r.ttft_s = t.seconds();
  std::size_t peak_act = act.peak_bytes();
  double bytes_time = static_cast<double>(act.peak_bytes() + policy.memory().peak_prefill) * r.ttft_s;
  double time_total = r.ttft_s;

  std::vector<std::int32_t> gen;
  double itl_sum = 0, full_keys_sum = 0;
  std::int64_t p = enc.prompt_len, decode_steps = 0;
  while (static_cast<std::int64_t>(gen.size()) < cfg.max_new_tokens && next != tok.eos_id()) {
    gen.push_back(next);
    if (static_cast<std::int64_t>(gen.size()) == cfg.max_new_tokens) break;
    std::int32_t tk = next, ps = static_cast<std::int32_t>(p++);
    Timer ts;
    act.reset();
    act.reset_peak();
    model.extend(policy, TensorView(&tk, Shape{1, 1}), TensorView(&ps, Shape{1, 1}));
    next = argmax_last_row(model.logits());
    const double dt = ts.seconds();
    itl_sum += dt;
    full_keys_sum += static_cast<double>(p);  // a full cache holds every token up to this one
    ++decode_steps;
    peak_act = std::max(peak_act, act.peak_bytes());
    bytes_time += static_cast<double>(act.peak_bytes() + policy.memory().resident_after_prefill) * dt;
    time_total += dt;
  }
  r.flops = be.flops_counted() - flops0;
  r.serve_s = time_total;
  r.generated_tokens = static_cast<std::int64_t>(gen.size());
  r.itl_s = gen.size() > 1 ? itl_sum / static_cast<double>(gen.size() - 1) : 0.0;
  r.prediction = tok.decode(gen);
  r.kv = policy.memory();
  r.budget_requested = policy.budget_requested_bytes();
  r.budget_achieved = policy.budget_achieved_bytes();
  // A budget the policy cannot meet (its fixed minimum is larger, or it cannot
  // shrink at all): the cell is infeasible, recorded per example (meta).
  r.infeasible = policy.infeasible();
  if (r.infeasible) r.meta["kv_infeasible"] = "true";
  r.attended_tokens = policy.attended_tokens();
  r.full_keys = decode_steps ? full_keys_sum / static_cast<double>(decode_steps) : 0.0;
  r.peak_bytes = peak_act + r.kv.peak_prefill;
  r.avg_bytes = time_total > 0 ? bytes_time / time_total : 0.0;
  return r;
}

void score_and_aggregate(MethodEval& me) {
  eval::MetricAggregator agg;
  for (auto& r : me.examples) {
    const eval::ExampleScores sc = agg.add(r.prediction, r.golds);
    r.f1 = sc.f1;
    r.em = sc.em;
    r.rouge_l = sc.rouge_l;
    r.bleu = eval::example_bleu4(r.prediction, r.golds);
  }
  const eval::CorpusScores cs = agg.result();
  me.f1 = cs.f1;
  me.em = cs.em;
  me.rouge_l = cs.rouge_l;
  me.bleu = cs.bleu;
  const double n = std::max<double>(1.0, static_cast<double>(me.examples.size()));
  double eff_n = 0;
  me.token_efficiency = 0;
  for (const auto& r : me.examples)
    if (r.full_keys > 0) {
      me.token_efficiency += r.attended_tokens / r.full_keys;
      eff_n += 1;
    }
  me.token_efficiency = eff_n > 0 ? me.token_efficiency / eff_n : std::nan("");
  me.peak_mem_bytes = me.avg_mem_bytes = me.latency_s = me.itl_s = me.flops = 0;
  me.infeasible_examples = 0;
  me.tokens_run = me.context_tokens_served = me.serve_s = 0;
  for (const auto& r : me.examples) {
    me.peak_mem_bytes = std::max(me.peak_mem_bytes, static_cast<double>(r.peak_bytes));
    me.avg_mem_bytes += r.avg_bytes / n;
    me.latency_s += r.ttft_s / n;
    me.itl_s += r.itl_s / n;
    me.flops += r.flops;
    me.infeasible_examples += r.infeasible ? 1 : 0;
    me.tokens_run += static_cast<double>(r.prompt_tokens_in + r.generated_tokens);
    me.context_tokens_served += static_cast<double>(r.prompt_tokens);
    me.serve_s += r.serve_s;
  }
  me.throughput_tok_s = me.serve_s > 0 ? me.tokens_run / me.serve_s : 0.0;
  me.context_tokens_per_s = me.serve_s > 0 ? me.context_tokens_served / me.serve_s : 0.0;
}

MethodEval evaluate_method(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                           const std::vector<data::Example>& test, const EvalConfig& cfg) {
  MethodEval me;
  me.method = cfg.name.empty() ? policy.name() : cfg.name;
  Timer wall;
  for (const auto& ex : test) me.examples.push_back(serve_example(model, policy, tok, ex, cfg));
  score_and_aggregate(me);
  me.wall_s = wall.seconds();
  me.process_peak_rss_bytes = static_cast<double>(peak_rss_bytes());
  return me;
}

}  // namespace dsrsq
