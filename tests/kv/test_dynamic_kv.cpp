// DynamicKV (src/kv/dynamic_kv.*): the cross-layer share arithmetic on
// hand-built scores, the budget after the forced last-layer reallocation (the
// debug model's 2 layers are below the interval of 4), the transient prefill
// state in peak_prefill, infeasible budgets, the reuse protocol and input errors.
#define BOOST_TEST_MODULE dynamic_kv
#include <boost/test/unit_test.hpp>

#include <numeric>

#include "core/error.hpp"
#include "evict_util.hpp"
#include "kv/dynamic_kv.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;
using testing::evict_cfg;

namespace {

DynamicKVConfig defaults() { return DynamicKVConfig{}; }

}  // namespace

// Hits decide the shares: 1 head, 4 prefix tokens per layer, base 2, 2 layers:
// the top 4 of all scores sit in layer 0, so layer 0 gets all of base * L = 4.
BOOST_AUTO_TEST_CASE(shares_follow_hits) {
  const std::vector<std::vector<double>> s{{9, 8, 7, 6}, {1, 0, 0, 0}};
  BOOST_TEST((DynamicKVPolicy::shares(s, 1, 2, 2, {4, 4}) == std::vector<std::int64_t>{4, 0}));
  // Interleaved: hits 9, 8 (layer 1), 7 (layer 0), 6 (layer 1) -> counts 1 : 3 of 4.
  const std::vector<std::vector<double>> t{{7, 1, 0, 0}, {9, 8, 6, 2}};
  BOOST_TEST((DynamicKVPolicy::shares(t, 1, 2, 2, {4, 4}) == std::vector<std::int64_t>{1, 3}));
  // A cap (candidates already cut) moves the rest to the layer with room.
  BOOST_TEST((DynamicKVPolicy::shares(s, 1, 2, 2, {3, 4}) == std::vector<std::int64_t>{3, 1}));
  // Two heads: the top base * heads * seen = 8 of 16 scores; layer 0 holds 6 of
  // them (all of head 0, two of head 1), layer 1 two: shares of 2 * 2 = 4 are
  // 3 and 1 (floors 3 and 1, nothing left over).
  const std::vector<std::vector<double>> u{{10, 10, 10, 10, 9, 9, 0, 0}, {9, 9, 0, 0, 0, 0, 0, 0}};
  BOOST_TEST((DynamicKVPolicy::shares(u, 2, 2, 2, {8, 8}) == std::vector<std::int64_t>{3, 1}));
  // Fractions: counts 1 : 1 : 1 of base * L = 4 over 3 seen layers of 4 -> 1.33
  // each, floors 1, 1, 1; the one left goes to the lowest layer on the tie.
  const std::vector<std::vector<double>> v{{5, 0}, {4, 0}, {3, 0}};
  BOOST_TEST((DynamicKVPolicy::shares(v, 1, 1, 4, {2, 2, 2}) == std::vector<std::int64_t>{2, 1, 1}));
  // Every layer at its cap: the shares stop there.
  BOOST_TEST((DynamicKVPolicy::shares(s, 1, 2, 2, {1, 1}) == std::vector<std::int64_t>{1, 1}));
}

// The debug model's 2 layers never reach layer 3, so only the forced
// reallocation at the last layer runs; the layers' shares then sum to
// base * L, every row holds its share plus the window, and the blocks fit the
// budget. 6 layers: reallocations at layers 3 and 5.
BOOST_AUTO_TEST_CASE(budget_holds_after_forced_last_layer_reallocation) {
  for (const std::int64_t layers : {2, 6}) {
    BOOST_TEST_CONTEXT(layers << " layers") {
      const ModelConfig cfg = evict_cfg(layers);
      auto m = testing::evict_model(cfg, 21);
      const std::int64_t B = 2, N = 120, T = 4, Q = 6;
      DynamicKVPolicy pol(cfg, cpu_backend(), defaults());
      const KVBudget budget{0.25, 0};
      const auto prompt = testing::evict_tokens(B * N, cfg.vocab, 22);
      const std::int64_t w = 8;  // max(question 6, 8)
      const std::size_t tok = KVBudget::full_bytes(cfg, 1);
      const std::int64_t row_tokens = static_cast<std::int64_t>(budget.resolve(cfg, N + T) / tok);
      const std::int64_t C = row_tokens - T, base = C - w;
      std::vector<std::vector<std::int64_t>> lens(static_cast<std::size_t>(layers));
      const auto r = testing::evict_run(*m, pol, prompt, B, N, Q, T, budget, [&] {
        for (std::int64_t l = 0; l < layers; ++l)
          for (std::int64_t row = 0; row < pol.rows(); ++row) lens[static_cast<std::size_t>(l)].push_back(pol.row_len(l, row));
      });
      BOOST_TEST(!pol.infeasible());
      BOOST_TEST(pol.row_tokens() == row_tokens);
      BOOST_TEST(pol.reallocations() == (layers == 2 ? 1 : 2));
      for (std::int64_t b = 0; b < B; ++b) {
        const auto& sh = pol.layer_budgets(b);
        BOOST_TEST(std::accumulate(sh.begin(), sh.end(), std::int64_t{0}) == base * layers);
        for (std::int64_t l = 0; l < layers; ++l)
          for (std::int64_t h = 0; h < cfg.n_heads; ++h) {
            const std::int64_t row = b * cfg.n_heads + h;
            BOOST_TEST(lens[static_cast<std::size_t>(l)][static_cast<std::size_t>(row)] == sh[static_cast<std::size_t>(l)] + w);
          }
      }
      // The window always survives; kept positions ascend.
      for (std::int64_t l = 0; l < layers; ++l) {
        const auto p = pol.row_positions(l, 0);
        BOOST_TEST(std::is_sorted(p.begin(), p.end()));
        for (std::int64_t j = N - w; j < N + T; ++j) BOOST_TEST((std::find(p.begin(), p.end(), j) != p.end()), j);
      }
      // Bytes: the blocks fit the budget; the uncut candidates and score rows made the peak.
      BOOST_TEST(pol.budget_achieved_bytes() <= pol.budget_requested_bytes());
      BOOST_TEST(r.mem_prefill.resident_after_prefill <= static_cast<std::size_t>(B) * pol.budget_requested_bytes());
      BOOST_TEST(r.mem_prefill.peak_prefill > r.mem_prefill.resident_after_prefill);
      const std::size_t scores = static_cast<std::size_t>(layers * B * cfg.n_heads * (N - w)) * sizeof(double);
      BOOST_TEST(r.mem_prefill.peak_prefill >= r.mem_prefill.resident_after_prefill + scores);
      BOOST_TEST(r.mem_end.total == r.mem_end.resident_after_prefill);
      BOOST_TEST(r.mem_end.read_per_step > 0u);
      BOOST_TEST(r.mem_end.read_per_step <= r.mem_end.resident_after_prefill);
    }
  }
}

// A budget that holds everything keeps every token and reallocates nothing.
BOOST_AUTO_TEST_CASE(full_budget_keeps_everything) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 23);
  const std::int64_t N = 50, T = 3;
  DynamicKVPolicy pol(cfg, cpu_backend(), defaults());
  testing::evict_run(*m, pol, testing::evict_tokens(N, cfg.vocab, 24), 1, N, 5, T, KVBudget{}, [&] {
    for (std::int64_t l = 0; l < cfg.n_layers; ++l) BOOST_TEST(pol.row_len(l, 0) == N);
  });
  BOOST_TEST(pol.reallocations() == 0);
  BOOST_TEST(!pol.infeasible());
}

// Below the window + generated tokens the budget is infeasible: the window is
// kept anyway and the achieved bytes exceed the request.
BOOST_AUTO_TEST_CASE(infeasible_below_window) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 25);
  const std::int64_t N = 80, T = 4;
  DynamicKVPolicy pol(cfg, cpu_backend(), defaults());
  const KVBudget budget{0, 6 * KVBudget::full_bytes(cfg, 1)};  // 6 tokens per row < 8 + 4
  testing::evict_run(*m, pol, testing::evict_tokens(N, cfg.vocab, 26), 1, N, 3, T, budget);
  BOOST_TEST(pol.infeasible());
  BOOST_TEST(pol.budget_achieved_bytes() > pol.budget_requested_bytes());
}

BOOST_AUTO_TEST_CASE(snapshot_restore_equals_fresh_prefill) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 27);
  for (const std::int64_t B : {1, 2}) {
    BOOST_TEST_CONTEXT("batch " << B) {
      const auto ctx = testing::evict_tokens(B * 60, cfg.vocab, 41), q1 = testing::evict_tokens(B * 4, cfg.vocab, 42),
                 q2 = testing::evict_tokens(B * 6, cfg.vocab, 43);
      testing::check_snapshot_reuse(
          *m, [&] { return std::make_unique<DynamicKVPolicy>(cfg, cpu_backend(), defaults()); }, KVBudget{0.4, 0}, B,
          ctx, q1, q2, 5, 1);
    }
  }
}

BOOST_AUTO_TEST_CASE(errors_name_the_option) {
  const ModelConfig cfg = evict_cfg();
  auto bad = [&](auto set, const char* opt) {
    DynamicKVConfig c;
    set(c);
    BOOST_CHECK_EXCEPTION(DynamicKVPolicy(cfg, cpu_backend(), c), Error, [&](const Error& e) {
      return std::string(e.what()).find(opt) != std::string::npos;
    });
  };
  bad([](DynamicKVConfig& c) { c.kernel = 4; }, "--dynamic_kv_kernel");
  bad([](DynamicKVConfig& c) { c.r_max = 0.5; }, "--dynamic_kv_r_max");
  bad([](DynamicKVConfig& c) { c.interval = 0; }, "--dynamic_kv_interval");
  bad([](DynamicKVConfig& c) { c.window = -1; }, "--dynamic_kv_window");
}
