#include "eval/evaluator.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>

#include "core/error.hpp"
#include "core/timer.hpp"
#include "eval/metrics.hpp"

namespace dsrsq {

namespace {

// Greedy decoding: the last row of the logits, copied to the host (one row
// per step on a device backend).
std::int32_t argmax_last_row(Backend& be, const TensorView& logits) {
  const std::int64_t N = logits.shape[0];
  const std::vector<float> row = to_host<float>(be, logits.rows(N - 1, 1));
  return static_cast<std::int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// The tokens' logits: the method's own model when it has one, else the backbone through the policy.
TensorView run_model(Transformer& model, KVPolicy& policy, const EvalConfig& cfg, TensorView tokens, TensorView pos) {
  if (cfg.extend) return cfg.extend(tokens, pos);
  model.extend(policy, tokens, pos);
  return model.logits();
}

// Activation memory: the backbone's arena, plus the method's own model's (EvalConfig::extend).
void reset_activation_peaks(Arena& act, const EvalConfig& cfg) {
  act.reset_peak();
  if (cfg.reset_activation_peak) cfg.reset_activation_peak();
}
std::size_t activation_peak(const Arena& act, const EvalConfig& cfg) {
  return act.peak_bytes() + (cfg.activation_peak_bytes ? cfg.activation_peak_bytes() : 0);
}

// What serving an example cost up to its first token.
struct DecodeCost {
  std::size_t peak_act = 0;  // activation high-water mark so far
  double bytes_time = 0;     // integral of held bytes over time so far
  double time_total = 0;     // serving time so far (ttft)
  std::size_t held_bytes = 0;  // bytes held beside the policy's cache throughout (a reuse snapshot)
};

// Greedy decoding after end_prefill() (the first token `next` is known, the
// prompt ends at position prompt_len), then the example's final cost and KV
// figures.
// pos_shift: the decode positions run that much below prompt_len (a selector's renumbered prompt).
void decode_answer(Transformer& model, KVPolicy& policy, const Tokenizer& tok, const EvalConfig& cfg,
                   std::int32_t next, std::int64_t prompt_len, DecodeCost c, ExampleEval& r,
                   std::int64_t pos_shift = 0) {
  Arena& act = model.activation_arena();
  std::size_t peak_act = c.peak_act;
  double bytes_time = c.bytes_time, time_total = c.time_total;
  std::vector<std::int32_t> gen;
  double itl_sum = 0, full_keys_sum = 0;
  std::int64_t p = prompt_len, decode_steps = 0;
  const double flops0 = model.backend().flops_counted();
  while (static_cast<std::int64_t>(gen.size()) < cfg.max_new_tokens && next != tok.eos_id()) {
    gen.push_back(next);
    if (static_cast<std::int64_t>(gen.size()) == cfg.max_new_tokens) break;
    std::int32_t tk = next, ps = static_cast<std::int32_t>(p++ - pos_shift);
    Timer ts;
    act.reset();
    reset_activation_peaks(act, cfg);
    next = argmax_last_row(model.backend(), run_model(model, policy, cfg, TensorView(&tk, Shape{1, 1}), TensorView(&ps, Shape{1, 1})));
    const double dt = ts.seconds();
    itl_sum += dt;
    full_keys_sum += static_cast<double>(p);  // a full cache holds every token up to this one
    ++decode_steps;
    const std::size_t step_act = activation_peak(act, cfg);
    peak_act = std::max(peak_act, step_act);
    bytes_time += static_cast<double>(step_act + policy.memory().resident_after_prefill + c.held_bytes) * dt;
    time_total += dt;
  }
  r.flops += model.backend().flops_counted() - flops0;  // decoding, from the Backend's meter
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
  for (const auto& [k, v] : policy.meta()) r.meta[k] = v;
  r.attended_tokens = policy.attended_tokens();
  r.full_keys = decode_steps ? full_keys_sum / static_cast<double>(decode_steps) : 0.0;
  r.peak_bytes = peak_act + r.kv.peak_prefill + c.held_bytes;
  r.avg_bytes = time_total > 0 ? bytes_time / time_total : 0.0;
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
  const double flops0 = model.backend().flops_counted();
  Timer t;
  std::vector<std::int32_t> pos, idx;  // the positions the prompt tokens take; their indices in enc.tokens
  if (cfg.select) {
    Selection s = cfg.select(enc, SelectionEnv{tok, cfg.budget, cfg.max_new_tokens});
    DSRSQ_REQUIRE(!s.idx.empty() && (s.pos.empty() || s.pos.size() == s.idx.size()),
                  "method '", cfg.name, "': its selector returned ", s.idx.size(), " indices and ", s.pos.size(), " positions");
    idx = std::move(s.idx);
    pos = s.pos.empty() ? idx : std::move(s.pos);
    for (auto& [k, v] : s.notes) r.meta[k] = v;
  } else {
    pos.resize(static_cast<std::size_t>(enc.prompt_len));
    for (std::int64_t i = 0; i < enc.prompt_len; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    idx = pos;
  }
  const auto n_in = static_cast<std::int64_t>(pos.size());
  std::vector<std::int32_t> prompt(pos.size());
  for (std::size_t i = 0; i < pos.size(); ++i) prompt[i] = enc.tokens[static_cast<std::size_t>(idx[i])];
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
  reset_activation_peaks(act, cfg);
  // Query-agnostic: the context part first (indices before the question),
  // then the question; query-aware: one call.
  const std::int64_t question_at = enc.prompt_len - enc.query_len;
  const auto n_ctx = cfg.query_agnostic
                         ? static_cast<std::int64_t>(std::lower_bound(idx.begin(), idx.end(), question_at) - idx.begin())
                         : n_in;
  TensorView logits;
  if (n_ctx > 0)
    logits = run_model(model, policy, cfg, TensorView(prompt.data(), Shape{1, n_ctx}), TensorView(pos.data(), Shape{1, n_ctx}));
  if (n_ctx < n_in)
    logits = run_model(model, policy, cfg, TensorView(prompt.data() + n_ctx, Shape{1, n_in - n_ctx}),
                       TensorView(pos.data() + n_ctx, Shape{1, n_in - n_ctx}));
  policy.end_prefill();
  std::int32_t next = argmax_last_row(model.backend(), logits);
  r.ttft_s = t.seconds();
  std::size_t peak_act = activation_peak(act, cfg);
  double bytes_time = static_cast<double>(peak_act + policy.memory().peak_prefill) * r.ttft_s;
  double time_total = r.ttft_s;
  r.flops = model.backend().flops_counted() - flops0;

  decode_answer(model, policy, tok, cfg, next, enc.prompt_len, DecodeCost{peak_act, bytes_time, time_total, 0}, r,
                enc.prompt_len - (pos.back() + 1));
  return r;
}

std::vector<ExampleEval> evaluate_reuse(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                                        const std::vector<data::Example>& test, const EvalConfig& cfg) {
  DSRSQ_INPUT_CHECK(!cfg.select, "--protocol reuse: method '", cfg.name,
                    "' selects context tokens with the question; it has no query-agnostic form");
  DSRSQ_INPUT_CHECK(!cfg.extend, "--protocol reuse: method '", cfg.name, "' runs its own model, which takes no snapshot");
  Arena& act = model.activation_arena();
  // Groups: examples with the same context string, in order of first appearance.
  std::vector<std::vector<std::size_t>> groups;
  {
    std::map<std::string, std::size_t> at;
    for (std::size_t i = 0; i < test.size(); ++i) {
      auto [it, fresh] = at.try_emplace(test[i].context, groups.size());
      if (fresh) groups.emplace_back();
      groups[it->second].push_back(i);
    }
  }
  std::vector<ExampleEval> out(test.size());
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto& members = groups[g];
    std::vector<Encoded> enc;
    std::int64_t keep = std::numeric_limits<std::int64_t>::max(), longest_q = 0;
    for (const std::size_t i : members) {
      const data::Example& ex = test[i];
      enc.push_back(encode_example(
          ex, tok, cfg.max_seq_len - cfg.max_new_tokens + static_cast<std::int64_t>(tok.encode(ex.answers.front()).size()) + 1));
      keep = std::min(keep, enc.back().context_tokens);
      longest_q = std::max(longest_q, enc.back().query_len);
    }
    // [BOS] + the context suffix every member keeps (left truncation keeps suffixes).
    const Encoded& e0 = enc.front();
    std::vector<std::int32_t> ctx{e0.tokens.front()};
    ctx.insert(ctx.end(), e0.tokens.begin() + 1 + (e0.context_tokens - keep), e0.tokens.begin() + 1 + e0.context_tokens);
    const auto n_ctx = static_cast<std::int64_t>(ctx.size());
    std::vector<std::int32_t> ctx_pos(ctx.size());
    for (std::size_t i = 0; i < ctx.size(); ++i) ctx_pos[i] = static_cast<std::int32_t>(i);

    // Compress once: begin, prefill the context, snapshot.
    SequenceInfo info;
    info.batch = 1;
    info.prompt_len = n_ctx + longest_q;
    info.query_len = 0;
    info.max_new_tokens = cfg.max_new_tokens;
    info.budget_tokens = info.prompt_len + cfg.max_new_tokens;
    const double shared_flops0 = model.backend().flops_counted();
    Timer ts;
    policy.begin(info, cfg.budget);
    act.reset();
    act.reset_peak();
    model.extend(policy, TensorView(ctx.data(), Shape{1, n_ctx}), TensorView(ctx_pos.data(), Shape{1, n_ctx}));
    const std::unique_ptr<KVSnapshot> snap = policy.snapshot();
    const double shared_s = ts.seconds();
    const std::size_t shared_act = act.peak_bytes();
    const std::size_t snap_bytes = snap->bytes();
    const double shared_bytes_time = static_cast<double>(shared_act + policy.memory().peak_prefill + snap_bytes) * shared_s;
    const double shared_flops = model.backend().flops_counted() - shared_flops0;
    const auto size = static_cast<double>(members.size());

    for (std::size_t m = 0; m < members.size(); ++m) {
      const data::Example& ex = test[members[m]];
      const Encoded& e = enc[m];
      ExampleEval& r = out[members[m]];
      r.id = ex.id;
      r.golds = ex.answers;
      r.meta = ex.meta;
      r.task = ex.meta.count("task") ? ex.meta.at("task") : "";
      const std::int64_t extra = e.context_tokens - keep;
      r.context_tokens = keep;
      r.truncated_tokens = e.truncated + extra;
      r.prompt_tokens = n_ctx + e.query_len;
      std::vector<std::int32_t> q(e.tokens.begin() + (e.prompt_len - e.query_len), e.tokens.begin() + e.prompt_len);
      std::vector<std::int32_t> qpos(q.size());
      for (std::size_t i = 0; i < q.size(); ++i) qpos[i] = static_cast<std::int32_t>(n_ctx + static_cast<std::int64_t>(i));
      const auto nq = static_cast<std::int64_t>(q.size());
      r.prompt_tokens_in = nq;
      r.shared_tokens = static_cast<double>(n_ctx) / size;
      r.meta["prompt_tokens_in"] = std::to_string(nq);
      r.meta["reuse_group"] = std::to_string(g);
      r.meta["reuse_group_size"] = std::to_string(members.size());
      r.meta["shared_context_tokens"] = std::to_string(n_ctx);
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.9g", shared_s);
      r.meta["shared_prefill_s"] = secs;
      r.meta["snapshot_bytes"] = std::to_string(snap_bytes);
      r.meta["reuse_extra_truncated"] = std::to_string(extra);

      // Ask: restore, the question, the first token.
      const double ask_flops0 = model.backend().flops_counted();
      Timer t;
      policy.restore(*snap);
      act.reset();
      act.reset_peak();
      model.extend(policy, TensorView(q.data(), Shape{1, nq}), TensorView(qpos.data(), Shape{1, nq}));
      policy.end_prefill();
      const std::int32_t next = argmax_last_row(model.backend(), model.logits());
      r.ttft_s = t.seconds();
      r.shared_serve_s = shared_s / size;
      r.flops = shared_flops / size + (model.backend().flops_counted() - ask_flops0);
      DecodeCost c;
      c.peak_act = std::max(shared_act, act.peak_bytes());
      c.time_total = r.ttft_s;
      c.held_bytes = snap_bytes;
      c.bytes_time = shared_bytes_time / size +
                     static_cast<double>(act.peak_bytes() + policy.memory().peak_prefill + snap_bytes) * r.ttft_s;
      decode_answer(model, policy, tok, cfg, next, n_ctx + nq, c, r);
      // avg_bytes is over this example's own time plus its share of the compression.
      const double own = r.serve_s;
      r.avg_bytes = own + r.shared_serve_s > 0 ? r.avg_bytes * own / (own + r.shared_serve_s) : 0.0;
    }
  }
  return out;
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
    me.tokens_run += static_cast<double>(r.prompt_tokens_in + r.generated_tokens) + r.shared_tokens;
    me.context_tokens_served += static_cast<double>(r.prompt_tokens);
    me.serve_s += r.serve_s + r.shared_serve_s;
  }
  me.throughput_tok_s = me.serve_s > 0 ? me.tokens_run / me.serve_s : 0.0;
  me.context_tokens_per_s = me.serve_s > 0 ? me.context_tokens_served / me.serve_s : 0.0;
}

MethodEval evaluate_method(Transformer& model, KVPolicy& policy, const Tokenizer& tok,
                           const std::vector<data::Example>& test, const EvalConfig& cfg) {
  MethodEval me;
  me.method = cfg.name.empty() ? policy.name() : cfg.name;
  Timer wall;
  if (cfg.reuse)
    me.examples = evaluate_reuse(model, policy, tok, test, cfg);
  else
    for (const auto& ex : test) me.examples.push_back(serve_example(model, policy, tok, ex, cfg));
  score_and_aggregate(me);
  me.wall_s = wall.seconds();
  me.process_peak_rss_bytes = static_cast<double>(peak_rss_bytes());
  return me;
}

}  // namespace dsrsq
