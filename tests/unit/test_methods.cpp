// The method table (src/methods): what every entry must satisfy, so a new
// method (one file + one table line) is checked the moment it is listed:
//   - names are unique and found by find_method; unknown names list the table;
//   - each method's own options are unique across the table and none shadows
//     a program option (the program adds them all to one description);
//   - every method (and each ablation variant) makes an evaluation plan on a
//     tiny model whose policy decodes, and at a budget holding everything
//     decodes exactly what the full cache decodes (every part covering all);
//     (a method with its own architecture, MethodInfo::own_architecture, is
//     exempt from that identity: it decodes through its own model);
//   - a trainable method with its own weights has a training extension.
#define BOOST_TEST_MODULE methods
#include <boost/program_options.hpp>
#include <boost/test/unit_test.hpp>
#include <set>

#include "app/options.hpp"
#include "core/error.hpp"
#include "eval/evaluator.hpp"
#include "methods/method.hpp"

using namespace dsrsq;
namespace m = dsrsq::methods;

namespace {

ModelConfig tiny() {
  ModelConfig c;
  c.vocab = 40;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_layers = 2;
  c.d_ff = 32;
  c.max_pos = 96;
  c.validate();
  return c;
}

// Greedy decode of `steps` tokens after a prompt, through the plan's selector and policy.
std::vector<std::int32_t> decode(Transformer& model, m::EvalPlan& plan, const Encoded& enc, std::int64_t steps,
                                 const KVBudget& budget) {
  std::vector<std::int32_t> pos, idx;  // positions the prompt tokens take; their indices
  if (plan.select) {
    Selection s = plan.select(enc, SelectionEnv{ByteTokenizer(), budget, steps});
    idx = s.idx;
    pos = s.pos.empty() ? s.idx : s.pos;
  } else {
    for (std::int64_t i = 0; i < enc.prompt_len; ++i) pos.push_back(static_cast<std::int32_t>(i));
    idx = pos;
  }
  std::vector<std::int32_t> tok;
  for (auto i : idx) tok.push_back(enc.tokens[static_cast<std::size_t>(i)]);
  SequenceInfo info;
  info.prompt_len = static_cast<std::int64_t>(pos.size());
  info.query_len = enc.query_len;
  info.max_new_tokens = steps;
  info.budget_tokens = enc.prompt_len + steps;
  plan.policy->begin(info, budget);
  const auto n = static_cast<std::int64_t>(pos.size());
  // The plan's own model when it has one, else the backbone through the policy.
  auto run = [&](TensorView t, TensorView p) {
    if (plan.extend) return plan.extend(t, p);
    model.extend(*plan.policy, t, p);
    return model.logits();
  };
  TensorView lg = run(TensorView(tok.data(), Shape{1, n}), TensorView(pos.data(), Shape{1, n}));
  plan.policy->end_prefill();
  std::vector<std::int32_t> out;
  std::int32_t p = pos.back() + 1;
  for (std::int64_t s = 0; s < steps; ++s) {
    const float* row = lg.ptr<float>() + (lg.shape[0] - 1) * lg.shape[1];
    std::int32_t t = static_cast<std::int32_t>(std::max_element(row, row + lg.shape[1]) - row);
    out.push_back(t);
    if (s + 1 == steps) break;
    lg = run(TensorView(&t, Shape{1, 1}), TensorView(&p, Shape{1, 1}));
    ++p;
  }
  return out;
}

Encoded prompt(std::int64_t ctx, std::int64_t q) {
  Encoded e;
  for (std::int64_t i = 0; i < ctx + q; ++i) e.tokens.push_back(static_cast<std::int32_t>(3 + (i * 7) % 31));
  e.prompt_len = ctx + q;
  e.query_len = q;
  e.context_tokens = ctx - 1;  // token 0 plays [BOS]
  return e;
}

}  // namespace

BOOST_AUTO_TEST_CASE(names_unique_and_found) {
  std::set<std::string_view> names;
  for (const m::MethodInfo* info : m::all_methods()) {
    BOOST_TEST(names.insert(info->name).second, "duplicate method name " << info->name);
    BOOST_TEST(&m::find_method(info->name) == info);
    BOOST_TEST(!info->summary.empty());
    BOOST_TEST((info->make != nullptr));
    BOOST_TEST((info->query_agnostic || !info->needs_question.empty()), info->name << ": say why it needs the question");
  }
  BOOST_CHECK_EXCEPTION(m::find_method("no_such_method"), Error, [](const Error& e) {
    const std::string s = e.what();
    for (const m::MethodInfo* info : m::all_methods())
      if (s.find(std::string(info->name)) == std::string::npos) return false;
    return s.find("no_such_method") != std::string::npos;
  });
}

BOOST_AUTO_TEST_CASE(method_options_unique_and_not_shadowing_program_options) {
  // parse_options builds one description of every option: a duplicate throws there.
  const char* argv[] = {"dsrsq", "--dry-run"};
  Options o;
  BOOST_CHECK_NO_THROW(parse_options(2, argv, o));
  std::set<std::string> seen;
  for (const m::MethodInfo* info : m::all_methods()) {
    if (!info->knobs) continue;
    auto k = info->knobs();
    boost::program_options::options_description d;
    k->describe(d);
    for (const auto& opt : d.options()) BOOST_TEST(seen.insert(opt->long_name()).second, opt->long_name());
    std::map<std::string, std::string> kv;
    k->resolved(kv);
    BOOST_TEST(kv.size() == d.options().size(), info->name << ": every option is part of the run identity");
  }
}

BOOST_AUTO_TEST_CASE(every_method_and_variant_plans_and_decodes) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(7);
  const Encoded enc = prompt(60, 6);
  m::RunShape shape{mc.d_model, mc.n_heads, mc.n_layers, 80};
  m::MethodContext full_ctx{model, cpu_backend(), nullptr, AdamWConfig{}, 1};
  auto full = m::find_method("full").make(full_ctx);
  auto full_plan = full->plan("");
  KVBudget all;  // fraction 1: the whole cache
  const auto want = decode(model, full_plan, enc, 5, all);
  for (const m::MethodInfo* info : m::all_methods()) {
    BOOST_TEST_CONTEXT(info->name) {
      std::shared_ptr<m::MethodKnobs> knobs = info->knobs ? info->knobs() : nullptr;
      if (knobs) {
        // Every part covering everything: the options that size a method's parts
        // to hold the whole sequence (a method without them ignores them).
        boost::program_options::options_description d;
        knobs->describe(d);
        std::vector<std::string> args{"x"};
        for (const auto& [key, value] :
             std::vector<std::pair<std::string, std::string>>{{"dsr_base_budget", "100000"}, {"dsr_alpha", "0"},
                                                              {"sqa_clusters", "4"}, {"sqa_top_clusters", "4"},
                                                              {"rckv_d_c", "16"}, {"rckv_buffer", "200"}})
          if (d.find_nothrow(key, false)) {
            args.push_back("--" + key);
            args.push_back(value);
          }
        std::vector<const char*> av;
        for (auto& a : args) av.push_back(a.c_str());
        boost::program_options::variables_map vm;
        boost::program_options::store(
            boost::program_options::parse_command_line(static_cast<int>(av.size()), av.data(), d), vm);
        boost::program_options::notify(vm);
        BOOST_CHECK_NO_THROW(knobs->validate(shape));
      }
      m::MethodContext ctx{model, cpu_backend(), knobs.get(), AdamWConfig{}, 1};
      auto method = info->make(ctx);
      BOOST_TEST((info->trainable && info->backbone == m::Backbone::own) == (method->training() != nullptr));
      std::vector<std::string> variants{""};
      variants.insert(variants.end(), info->variants.begin(), info->variants.end());
      for (const auto& v : variants) {
        BOOST_TEST_CONTEXT("variant '" << v << "'") {
          auto plan = method->plan(v);
          BOOST_REQUIRE(plan.policy != nullptr);
          const auto got = decode(model, plan, enc, 5, all);
          if (info->own_architecture)
            BOOST_TEST(got.size() == want.size());  // its own model: it decodes, but is not the full cache
          else
            BOOST_TEST(got == want, boost::test_tools::per_element());
        }
      }
    }
  }
}

// A method that runs its own model (EvalPlan::extend: GCA) reports that
// model's activation memory, and the evaluator counts it in the example's peak
// memory as it counts the backbone's arena for every other method. GCA's
// decoder returns the prompt's logits (prompt tokens x vocab f32) from its
// scratch, so its activations are at least that table. Without the hooks the
// peak would be its KV bytes alone (the backbone's arena is never touched).
BOOST_AUTO_TEST_CASE(own_model_activations_count_in_peak_memory) {
  ModelConfig mc = tiny();
  mc.vocab = static_cast<std::int64_t>(ByteTokenizer::kVocabSize);
  mc.max_pos = 256;
  mc.validate();
  Transformer model(mc, cpu_backend());
  model.init_weights(5);
  const ByteTokenizer tok;
  data::Example ex;
  ex.id = "own";
  ex.context = "The quick brown fox jumps over the lazy dog near 42 river banks, twice, then rests for a while.";
  ex.query = "Which dog?";
  ex.answers = {"lazy"};
  int own = 0;
  for (const m::MethodInfo* info : m::all_methods()) {
    if (!info->own_architecture) continue;
    BOOST_TEST_CONTEXT(info->name) {
      ++own;
      std::shared_ptr<m::MethodKnobs> knobs = info->knobs ? info->knobs() : nullptr;
      m::MethodContext ctx{model, cpu_backend(), knobs.get(), AdamWConfig{}, 1};
      auto method = info->make(ctx);
      m::EvalPlan plan = method->plan("");
      BOOST_REQUIRE(plan.extend != nullptr);
      BOOST_REQUIRE(plan.reset_activation_peak != nullptr);
      BOOST_REQUIRE(plan.activation_peak_bytes != nullptr);
      EvalConfig cfg;
      cfg.extend = plan.extend;
      cfg.reset_activation_peak = plan.reset_activation_peak;
      cfg.activation_peak_bytes = plan.activation_peak_bytes;
      cfg.max_new_tokens = 4;
      cfg.max_seq_len = 200;
      const ExampleEval r = serve_example(model, *plan.policy, tok, ex, cfg);
      const std::size_t logits = static_cast<std::size_t>(r.prompt_tokens) * static_cast<std::size_t>(mc.vocab) * sizeof(float);
      BOOST_TEST(r.peak_bytes >= r.kv.peak_prefill + logits,
                 "peak " << r.peak_bytes << " B, KV " << r.kv.peak_prefill << " B, prompt logits " << logits << " B");
    }
  }
  BOOST_TEST(own >= 1);
}

// The Backend's FLOP meter over one prefill equals what the model's shape
// implies (linear layers 8C^2 + 4CF per token and layer, the LM head 2CV per
// token, causal attention from attention_cost): every product is counted once.
// Exact: every term is an integer below 2^53.
BOOST_AUTO_TEST_CASE(flop_meter_counts_the_model_exactly) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(3);
  const std::int64_t N = 37;
  std::vector<std::int32_t> tok(N), pos(N);
  for (std::int64_t i = 0; i < N; ++i) {
    tok[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(1 + i % 30);
    pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  }
  auto full = make_kv_policy(KVPolicySpec{"full"}, mc, cpu_backend());
  SequenceInfo info;
  info.prompt_len = N;
  full->begin(info, KVBudget{});
  const double f0 = cpu_backend().flops_counted();
  model.extend(*full, TensorView(tok.data(), Shape{1, N}), TensorView(pos.data(), Shape{1, N}));
  const double got = cpu_backend().flops_counted() - f0;
  const double C = static_cast<double>(mc.d_model), F = static_cast<double>(mc.d_ff), V = static_cast<double>(mc.vocab);
  const double want = static_cast<double>(N) * (static_cast<double>(mc.n_layers) * (8 * C * C + 4 * C * F) + 2 * C * V) +
                      static_cast<double>(mc.n_layers) *
                          attention_cost(1, N, N, mc.n_heads, mc.head_size(), true, false).flops;
  BOOST_TEST(got == want);
}
