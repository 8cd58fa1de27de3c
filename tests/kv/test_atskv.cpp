// ATSKV (src/kv/atskv.*): the threshold rule on hand-built scores, the
// predictor's training loss falls, a trained predictor keeps more
// answer-evidence tokens than a random one at the same budget, the quantile's
// moving average, the passive tier in total bytes, an untrained predictor
// refused, infeasible budgets and checkpoint round trips.
#define BOOST_TEST_MODULE atskv
#include <boost/test/unit_test.hpp>

#include <numeric>
#include <set>

#include "core/error.hpp"
#include "evict_util.hpp"
#include "kv/atskv.hpp"
#include "snapshot_check.hpp"
#include "train/encode.hpp"

using namespace dsrsq;
using testing::evict_cfg;

namespace {

// A prompt of n tokens whose last q are the question, then an answer of a tokens.
Encoded example(std::int64_t n, std::int64_t q, std::int64_t a, std::int64_t vocab, std::uint64_t seed) {
  Encoded e;
  e.tokens = testing::evict_tokens(n + a, vocab, seed);
  e.prompt_len = n;
  e.query_len = q;
  e.context_tokens = n - q - 1;
  return e;
}

}  // namespace

// Hand-built scores: q = 0.5 of 6 scores {0.9, 0.1, 0.5, 0.7, 0.3, 0.6}: the
// median (linear interpolation) is 0.55; above it 0.9, 0.7, 0.6 (tokens 0, 3, 5).
BOOST_AUTO_TEST_CASE(threshold_and_cap_on_hand_built_scores) {
  const std::vector<double> r{0.9, 0.1, 0.5, 0.7, 0.3, 0.6};
  BOOST_TEST((AtskvPolicy::keep_prefix(r, 0.5, 1.0, 10) == std::vector<std::int32_t>{0, 3, 5}));
  // The cap keeps the highest of them.
  BOOST_TEST((AtskvPolicy::keep_prefix(r, 0.5, 1.0, 2) == std::vector<std::int32_t>{0, 3}));
  // beta scales the threshold: 0.5 * 0.55 = 0.275 lets 0.5 and 0.3 in too.
  BOOST_TEST((AtskvPolicy::keep_prefix(r, 0.5, 0.5, 10) == std::vector<std::int32_t>{0, 2, 3, 4, 5}));
  // q = 0: the minimum is the threshold and is itself dropped (strictly above).
  BOOST_TEST((AtskvPolicy::keep_prefix(r, 0.0, 1.0, 10) == std::vector<std::int32_t>{0, 2, 3, 4, 5}));
  BOOST_TEST(AtskvPolicy::keep_prefix(r, 0.5, 1.0, 0).empty());
}

// Training on recorded examples (frozen random backbone): the mean squared
// error falls well below its start (the targets' variance, the output bias
// starting at their mean).
BOOST_AUTO_TEST_CASE(predictor_training_loss_falls) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 51);
  std::vector<atskv::Sample> samples;
  for (std::uint64_t i = 0; i < 6; ++i) samples.push_back(atskv::record(*m, example(48, 5, 4, cfg.vocab, 100 + i), 0));
  BOOST_TEST(samples.front().w == 8);
  BOOST_TEST(samples.front().rows == 40);
  for (const auto& y : samples.front().y)
    for (double v : y) BOOST_REQUIRE(std::isfinite(v));
  atskv::Predictor pred(cfg, 32, 3);
  BOOST_TEST(!pred.trained());
  const atskv::TrainStats st = atskv::train(pred, samples, 150, 3e-3);
  BOOST_TEST(pred.trained());
  BOOST_TEST(st.rows == 6 * 40);
  BOOST_TEST(st.flops > 0);
  BOOST_TEST_MESSAGE("atskv loss " << st.loss.front() << " -> " << st.loss.back());
  BOOST_TEST(st.loss.back() < 0.5 * st.loss.front());
}

// The test of the method: trained on some examples, on held-out ones the
// policy with the trained predictor keeps more of the answer-evidence tokens
// (the top 10% of each layer's prefix by the target: what the answer queries
// read most) than the same policy with a random predictor, at the same budget.
BOOST_AUTO_TEST_CASE(trained_keeps_more_answer_evidence_than_random) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 52);
  const std::int64_t N = 64, Q = 5, A = 4;
  std::vector<atskv::Sample> train;
  for (std::uint64_t i = 0; i < 16; ++i) train.push_back(atskv::record(*m, example(N, Q, A, cfg.vocab, 200 + i), 0));
  atskv::Predictor trained(cfg, 32, 5);
  atskv::train(trained, train, 200, 3e-3);
  atskv::Predictor random(cfg, 32, 6);
  std::map<std::string, std::vector<float>> ck;
  random.save(ck, false);
  BOOST_REQUIRE(random.load(ck, false));  // "trained" as far as the policy asks: a loaded random predictor
  const KVBudget budget{0.3, 0};
  double hits_trained = 0, hits_random = 0, evidence = 0;
  for (std::uint64_t i = 0; i < 16; ++i) {
    const Encoded e = example(N, Q, A, cfg.vocab, 900 + i);
    const atskv::Sample s = atskv::record(*m, e, 0);
    const std::vector<std::int32_t> prompt(e.tokens.begin(), e.tokens.begin() + N);
    for (const atskv::Predictor* p : {&trained, &random}) {
      AtskvConfig ac;
      ac.promote_slots = 0;  // the prefill's choice alone, the whole prefix share for it
      AtskvPolicy pol(cfg, cpu_backend(), ac, *p);
      double hits = 0;
      testing::evict_run(*m, pol, prompt, 1, N, Q, A, budget, [&] {
        for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
          const auto& y = s.y[static_cast<std::size_t>(l)];
          std::vector<std::int32_t> order(y.size());
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return y[a] > y[b]; });
          const std::set<std::int32_t> ev(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(y.size() / 10));
          for (std::int32_t t : pol.row_positions(l, 0)) hits += ev.count(t) ? 1.0 : 0.0;
          if (p == &trained) evidence += static_cast<double>(ev.size());
        }
      });
      (p == &trained ? hits_trained : hits_random) += hits;
    }
  }
  BOOST_TEST_MESSAGE("evidence kept: trained " << hits_trained << ", random " << hits_random << " of " << evidence);
  // Budget 0.3: about a quarter of the prefix is kept, so chance keeps ~25% of
  // the evidence; the trained predictor must keep clearly more.
  BOOST_TEST(hits_trained > hits_random + 0.1 * evidence);
}

// The quantile's moving average from the seed's initial sparsity 0.7 toward
// q_max under memory pressure; the dropped tokens sit in the passive tier,
// counted in total; an untrained predictor is refused when the policy evicts.
BOOST_AUTO_TEST_CASE(quantile_passive_tier_and_untrained_refusal) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 53);
  const std::int64_t N = 80, T = 3, Q = 4;
  std::vector<atskv::Sample> train;
  for (std::uint64_t i = 0; i < 4; ++i) train.push_back(atskv::record(*m, example(N, Q, 3, cfg.vocab, 300 + i), 0));
  atskv::Predictor pred(cfg, 16, 7);
  atskv::train(pred, train, 20, 3e-3);
  AtskvPolicy pol(cfg, cpu_backend(), AtskvConfig{}, pred);
  const auto prompt = testing::evict_tokens(N, cfg.vocab, 54);
  std::size_t passive = 0;
  // K, V of every head and the features beyond the value (attention per head, 3 handcrafted).
  const std::size_t per_token = static_cast<std::size_t>(cfg.n_heads) * pol.token_bytes() +
                                static_cast<std::size_t>(cfg.n_heads + 3) * sizeof(float);
  const auto r = testing::evict_run(*m, pol, prompt, 1, N, Q, T, KVBudget{0.25, 0}, [&] {
    for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
      BOOST_TEST(pol.quantile(l) == 0.8 * 0.7 + 0.2 * 0.5, boost::test_tools::tolerance(1e-12));
      passive += static_cast<std::size_t>(N - pol.row_len(l, 0)) * per_token;
    }
  });
  BOOST_TEST(!pol.infeasible());
  BOOST_TEST_MESSAGE("atskv promotions over " << T << " decode steps: " << pol.promotions());
  BOOST_TEST(passive > 0u);
  BOOST_TEST(pol.passive_bytes() == passive);
  BOOST_TEST(r.mem_end.total == r.mem_end.resident_after_prefill + pol.passive_bytes());
  // Resident: the rows plus the promotion slots (4 per row and layer), within the budget.
  BOOST_TEST(r.mem_end.resident_after_prefill <= pol.budget_requested_bytes());
  std::size_t rows_bytes = 0;
  for (std::int64_t l = 0; l < cfg.n_layers; ++l)
    for (std::int64_t row = 0; row < pol.rows(); ++row) {
      rows_bytes += static_cast<std::size_t>(pol.row_len(l, row)) * pol.token_bytes();
      // Promoted tokens are demoted ones, at most the slots.
      const auto act = pol.row_positions(l, row), pro = pol.promoted(l, row);
      BOOST_TEST(pro.size() <= 4u);
      for (std::int32_t t : pro) {
        BOOST_TEST((std::find(act.begin(), act.end(), t) == act.end()), t);
        BOOST_TEST(t < N - 8);
      }
    }
  BOOST_TEST(r.mem_end.resident_after_prefill ==
             rows_bytes + static_cast<std::size_t>(cfg.n_layers * pol.rows() * 4) * pol.token_bytes());

  atskv::Predictor fresh(cfg, 16, 8);
  AtskvPolicy untrained(cfg, cpu_backend(), AtskvConfig{}, fresh);
  BOOST_CHECK_EXCEPTION(testing::evict_run(*m, untrained, prompt, 1, N, Q, T, KVBudget{0.25, 0}), Error,
                        [](const Error& e) { return std::string(e.what()).find("untrained") != std::string::npos; });
  // A budget holding everything evicts nothing: no predictor needed.
  AtskvPolicy all(cfg, cpu_backend(), AtskvConfig{}, fresh);
  testing::evict_run(*m, all, prompt, 1, N, Q, T, KVBudget{});
  BOOST_TEST(all.passive_bytes() == 0u);
  // Below the window + generated tokens: infeasible.
  AtskvPolicy tiny(cfg, cpu_backend(), AtskvConfig{}, pred);
  testing::evict_run(*m, tiny, prompt, 1, N, Q, T, KVBudget{0, 5 * KVBudget::full_bytes(cfg, 1)});
  BOOST_TEST(tiny.infeasible());
}

// The reuse protocol: the passive tier, the promotion slots and the quantiles
// come back with the rows (query-agnostic: the context is compressed alone).
BOOST_AUTO_TEST_CASE(snapshot_restore_equals_fresh_prefill) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 57);
  std::vector<atskv::Sample> train;
  for (std::uint64_t i = 0; i < 3; ++i) train.push_back(atskv::record(*m, example(60, 5, 3, cfg.vocab, 500 + i), 0));
  atskv::Predictor pred(cfg, 16, 9);
  atskv::train(pred, train, 20, 3e-3);
  for (const std::int64_t B : {1, 2}) {
    BOOST_TEST_CONTEXT("batch " << B) {
      const auto ctx = testing::evict_tokens(B * 70, cfg.vocab, 41), q1 = testing::evict_tokens(B * 4, cfg.vocab, 42),
                 q2 = testing::evict_tokens(B * 6, cfg.vocab, 43);
      testing::check_snapshot_reuse(
          *m, [&] { return std::make_unique<AtskvPolicy>(cfg, cpu_backend(), AtskvConfig{}, pred); }, KVBudget{0.4, 0},
          B, ctx, q1, q2, 5, 1);
    }
  }
}

BOOST_AUTO_TEST_CASE(checkpoint_round_trip) {
  const ModelConfig cfg = evict_cfg();
  atskv::Predictor a(cfg, 8, 1), b(cfg, 8, 2), c(cfg, 9, 2);
  std::map<std::string, std::vector<float>> ck;
  BOOST_TEST(!b.load(ck, true));
  a.save(ck, true);
  BOOST_TEST(b.load(ck, true));
  BOOST_TEST(b.params() == a.params());
  BOOST_CHECK_THROW(c.load(ck, false), Error);  // another hidden size
}

BOOST_AUTO_TEST_CASE(errors_name_the_option) {
  const ModelConfig cfg = evict_cfg();
  atskv::Predictor p(cfg, 4, 1);
  auto bad = [&](auto set, const char* opt) {
    AtskvConfig c;
    set(c);
    BOOST_CHECK_EXCEPTION(AtskvPolicy(cfg, cpu_backend(), c, p), Error,
                          [&](const Error& e) { return std::string(e.what()).find(opt) != std::string::npos; });
  };
  bad([](AtskvConfig& c) { c.beta = 0; }, "--atskv_beta");
  bad([](AtskvConfig& c) { c.q_min = 0.6; }, "--atskv_q");
  bad([](AtskvConfig& c) { c.ema = 1.0; }, "--atskv_ema");
  bad([](AtskvConfig& c) { c.window = -2; }, "--atskv_window");
  BOOST_CHECK_EXCEPTION(atskv::Predictor(cfg, 0, 1), Error,
                        [](const Error& e) { return std::string(e.what()).find("--atskv_hidden") != std::string::npos; });
}
