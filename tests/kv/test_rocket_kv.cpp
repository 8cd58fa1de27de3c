// RocketKV (src/kv/rocket_kv.*): the reference's parameter derivation against
// ALGORITHMS.md's table, the byte-budget inversion, page bounds and stage 2's
// choice on hand-built keys, one decode step against a brute-force
// reference, stage 1's keep count and bytes, infeasible budgets, the reuse
// protocol and input errors.
#define BOOST_TEST_MODULE rocket_kv
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "evict_util.hpp"
#include "kv/rocket_kv.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;
using testing::evict_cfg;

// ALGORITHMS.md section 10 at S = 32768, d = 128 (T = 0: no floor): Pcap and g
// of its table; k = B/2; r = int(d g / c2) of the inf_llm path (the table's 61
// at B = 256 is the gpt-fast path's round(60.76)); g = 2 at B = 4096 (the correction).
BOOST_AUTO_TEST_CASE(parameters_match_the_reference_table) {
  struct Row { std::int64_t B, Pcap, g, r; };
  for (const Row& w : {Row{256, 1618, 3, 60}, Row{512, 3191, 3, 61}, Row{1024, 5792, 3, 67}, Row{4096, 14868, 2, 70}}) {
    BOOST_TEST_CONTEXT("B = " << w.B) {
      const RocketKVParams p = RocketKVParams::derive(w.B, 32768, 0, 128);
      BOOST_TEST(p.Pcap == w.Pcap);
      BOOST_TEST(p.g == w.g);
      BOOST_TEST(p.r == w.r);
      BOOST_TEST(p.k == w.B / 2);
      BOOST_TEST(p.resident_tokens() == w.Pcap + (w.Pcap + w.g - 1) / w.g);
    }
  }
  // The eval path's floor: Pcap >= min(2T, S).
  BOOST_TEST(RocketKVParams::derive(1, 100, 30, 8).Pcap >= 60);
  // B >= S: c = 1, Pcap = S, g = 1 (no bound cache), k >= S / 2.
  const RocketKVParams full = RocketKVParams::derive(200, 100, 4, 8);
  BOOST_TEST(full.Pcap == 100);
  BOOST_TEST(full.g == 1);
  BOOST_TEST(full.resident_tokens() == 100);
}

// The byte budget fixes the resident tokens: the chosen B fits and no larger B does.
BOOST_AUTO_TEST_CASE(budget_inversion_picks_the_largest_fitting_traffic) {
  const std::int64_t S = 300, T = 10, d = 8;
  for (const std::int64_t row_tokens : {40, 75, 150, 299, 300, 1000}) {
    BOOST_TEST_CONTEXT("row tokens " << row_tokens) {
      bool fits = false;
      const RocketKVParams p = RocketKVParams::for_budget(row_tokens, S, T, d, fits);
      BOOST_TEST(fits);
      BOOST_TEST(p.resident_tokens() <= row_tokens);
      for (std::int64_t B = p.B + 1; B <= 2 * S; ++B)
        BOOST_TEST_REQUIRE(RocketKVParams::derive(B, S, T, d).resident_tokens() > row_tokens, "B " << B);
      if (row_tokens >= S) BOOST_TEST(p.k == S);  // exact attention over everything
    }
  }
  bool fits = true;
  RocketKVParams::for_budget(5, S, T, d, fits);  // below the floor min(2T, S) = 20
  BOOST_TEST(!fits);
}

// Hand-built keys (hs 2, pages of 2): bounds per page, and stage 2 ranks pages
// by q . (max where q > 0, min where not) over the top-r channels.
BOOST_AUTO_TEST_CASE(page_bounds_and_stage2_choice) {
  // token:            0       1       2       3       4       5     (6: a partial page)
  const std::vector<float> keys{5, 0, 1, 2, 0, -4, 1, 1, 3, 9, -1, 0, 2, 7};
  const std::vector<float> b = RocketKVPolicy::page_bounds(keys.data(), 7, 2, 2);
  const std::vector<float> want{1, 0, 5, 2,  0, -4, 1, 1,  -1, 0, 3, 9,  2, 7, 2, 7};
  BOOST_TEST(b == want, boost::test_tools::per_element());
  // q = (1, -0.1), r = 1: channel 0, its max: pages score 5, 1, 3, 2 -> k = 2 takes page 0.
  const std::vector<float> q{1.0f, -0.1f};
  BOOST_TEST((RocketKVPolicy::stage2_select(q.data(), b.data(), 7, 2, 2, 1, 2) == std::vector<std::int32_t>{0, 1}));
  // k = 3: page 2 next (3), its earlier token on the tie.
  BOOST_TEST((RocketKVPolicy::stage2_select(q.data(), b.data(), 7, 2, 2, 1, 3) == std::vector<std::int32_t>{0, 1, 4}));
  // Negative q on channel 0 reads the min: pages score -1, 0, 1, -2 -> page 2, then page 1.
  const std::vector<float> qn{-1.0f, 0.1f};
  BOOST_TEST((RocketKVPolicy::stage2_select(qn.data(), b.data(), 7, 2, 2, 1, 3) == std::vector<std::int32_t>{2, 4, 5}));
  // r = 2 uses channel 1 too: q = (1, -1): pages 5 - 0, 1 - (-4), 3 - 0, 2 - 7 -> 5, 5, 3, -5:
  // pages 0 and 1 tie, k = 3 takes page 0 and the earlier token of page 1.
  const std::vector<float> q2{1.0f, -1.0f};
  BOOST_TEST((RocketKVPolicy::stage2_select(q2.data(), b.data(), 7, 2, 2, 2, 3) == std::vector<std::int32_t>{0, 1, 2}));
  // g = 1: the bounds are the keys, r = hs gives the exact q . k ranking.
  const std::vector<float> b1 = RocketKVPolicy::page_bounds(keys.data(), 7, 2, 1);
  // q2 . k: 5, -1, 4, 0, -6, -1, -5 -> top 3: tokens 0, 2, 3.
  BOOST_TEST((RocketKVPolicy::stage2_select(q2.data(), b1.data(), 7, 2, 1, 2, 3) == std::vector<std::int32_t>{0, 2, 3}));
}

namespace {

// RoPE (rotate-half) in double at position p.
void rope_ref(double* x, std::int64_t HS, std::int64_t p, double theta) {
  const std::int64_t half = HS / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const double ang = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
    const double c = std::cos(ang), s = std::sin(ang), x0 = x[i], x1 = x[i + half];
    x[i] = x0 * c - x1 * s;
    x[i + half] = x1 * c + x0 * s;
  }
}

}  // namespace

// Stage 1 keeps P - T prompt tokens per row (window included, position order);
// the resident bytes are those rows plus the page bounds, within the budget;
// one decode step equals exact attention over stage 2's choice (computed here
// from the row's keys), and the traffic is k tokens plus r channels per page.
BOOST_AUTO_TEST_CASE(stage1_keep_and_one_decode_step_against_reference) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 31);
  const std::int64_t B = 1, N = 200, T = 4, Q = 5, HS = cfg.head_size(), NH = cfg.n_heads;
  const KVBudget budget{0.25, 0};
  const auto prompt = testing::evict_tokens(B * N, cfg.vocab, 32);
  RocketKVPolicy pol2(cfg, cpu_backend(), RocketKVConfig{});
  std::int64_t kept = 0;
  // Room for one more generated token: the hand-made step below.
  const auto r = testing::evict_run(*m, pol2, prompt, B, N, Q, T, budget, [&] { kept = pol2.row_len(0, 0); }, 1);
  const RocketKVParams& p = pol2.params();
  BOOST_TEST(!pol2.infeasible());
  BOOST_TEST(p.Pcap - (T + 1) == kept);
  BOOST_TEST(p.k < kept);  // stage 2 is sparse here
  const std::size_t tok = 2 * static_cast<std::size_t>(HS) * sizeof(float);
  const std::int64_t pages = p.g >= 2 ? (p.Pcap + p.g - 1) / p.g : 0;  // kept + T + 1 = Pcap slots
  BOOST_TEST(r.mem_prefill.resident_after_prefill ==
             static_cast<std::size_t>(cfg.n_layers * NH) * (static_cast<std::size_t>(p.Pcap + pages) * tok));
  BOOST_TEST(r.mem_prefill.resident_after_prefill <= pol2.budget_requested_bytes());
  BOOST_TEST(pol2.attended_tokens() == static_cast<double>(p.k));
  // Per decode token: every layer and row reads k tokens and r channels of each page.
  std::size_t want_read = 0;
  for (std::int64_t s = 0; s < T; ++s) {
    const std::int64_t n = kept + s + 1;
    want_read += static_cast<std::size_t>(cfg.n_layers * NH) *
                 (static_cast<std::size_t>(p.k) * tok + static_cast<std::size_t>((n + p.g - 1) / p.g * p.r) * sizeof(float));
  }
  BOOST_TEST(r.mem_end.read_per_step == want_read / static_cast<std::size_t>(T));

  // One more decode step of layer 0 with hand-made q, k, v, against the brute force.
  std::vector<float> q(static_cast<std::size_t>(NH * HS)), k(q.size()), v(q.size()), out(q.size());
  Rng rng(33, 1);
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = static_cast<float>(rng.normal());
  const std::vector<float> q0 = q;
  // The query as the policy rotates it (the same f32 op: the same channel and page ranking).
  std::vector<float> qrot = q0;
  {
    std::int32_t p0 = static_cast<std::int32_t>(N + T);
    cpu_backend().rope_fwd(RopeArgs{TensorView(qrot.data(), Shape{1, NH, HS}), TensorView(&p0, Shape{1}), cfg.rope_theta});
  }
  std::int32_t pos = static_cast<std::int32_t>(N + T);
  pol2.attend(0, TensorView(q.data(), Shape{1, 1, NH, HS}), TensorView(k.data(), Shape{1, 1, NH, HS}),
              TensorView(v.data(), Shape{1, 1, NH, HS}), TensorView(&pos, Shape{1, 1}),
              TensorView(out.data(), Shape{1, 1, NH, HS}));
  for (std::int64_t h = 0; h < NH; ++h) {
    BOOST_TEST_CONTEXT("head " << h) {
      const std::int64_t n = pol2.row_len(0, h);
      BOOST_TEST(n == kept + T + 1);
      std::vector<float> keys(static_cast<std::size_t>(n * HS)), vals(keys.size());
      std::copy(pol2.row_k(0, h).ptr<float>(), pol2.row_k(0, h).ptr<float>() + n * HS, keys.begin());
      std::copy(pol2.row_v(0, h).ptr<float>(), pol2.row_v(0, h).ptr<float>() + n * HS, vals.begin());
      std::vector<double> qd(q0.begin() + h * HS, q0.begin() + (h + 1) * HS);
      rope_ref(qd.data(), HS, pos, cfg.rope_theta);
      const std::vector<float> qf(qrot.begin() + h * HS, qrot.begin() + (h + 1) * HS);
      const std::vector<float> bounds = RocketKVPolicy::page_bounds(keys.data(), n, HS, p.g);
      const auto sel = RocketKVPolicy::stage2_select(qf.data(), bounds.data(), n, HS, p.g, p.r, p.k);
      BOOST_TEST(static_cast<std::int64_t>(sel.size()) == p.k);
      std::vector<double> sc;
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int32_t j : sel) {
        double d = 0;
        for (std::int64_t e = 0; e < HS; ++e) d += qd[static_cast<std::size_t>(e)] * keys[static_cast<std::size_t>(j * HS + e)];
        sc.push_back(d / std::sqrt(static_cast<double>(HS)));
        mx = std::max(mx, sc.back());
      }
      double z = 0;
      for (auto& s : sc) z += (s = std::exp(s - mx));
      double err = 0, norm = 0;
      for (std::int64_t e = 0; e < HS; ++e) {
        double o = 0;
        for (std::size_t i = 0; i < sel.size(); ++i) o += sc[i] / z * vals[static_cast<std::size_t>(sel[i] * HS + e)];
        err = std::max(err, std::fabs(o - out[static_cast<std::size_t>(h * HS + e)]));
        norm = std::max(norm, std::fabs(o));
      }
      // f32 attention over <= 200 keys of unit-scale values: a few ulps of the largest value.
      BOOST_TEST(err <= 1e-5 * std::max(1.0, norm));
    }
  }
}

// Below its floor (the window beside the generated tokens) the budget is infeasible.
BOOST_AUTO_TEST_CASE(infeasible_below_minimum) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 35);
  const std::int64_t N = 120, T = 8;
  RocketKVPolicy pol(cfg, cpu_backend(), RocketKVConfig{});
  testing::evict_run(*m, pol, testing::evict_tokens(N, cfg.vocab, 36), 1, N, 3, T, KVBudget{0, 10 * KVBudget::full_bytes(cfg, 1)});
  BOOST_TEST(pol.infeasible());
  BOOST_TEST(pol.budget_achieved_bytes() > pol.budget_requested_bytes());
  // It keeps its minimum (the window beside the generated tokens), with the stage-2 parameters of that memory.
  BOOST_TEST(pol.params().Pcap - T >= 8);
  BOOST_TEST(pol.row_len(0, 0) == pol.params().Pcap);
}

BOOST_AUTO_TEST_CASE(snapshot_restore_equals_fresh_prefill) {
  const ModelConfig cfg = evict_cfg();
  auto m = testing::evict_model(cfg, 37);
  for (const std::int64_t B : {1, 2}) {
    BOOST_TEST_CONTEXT("batch " << B) {
      const auto ctx = testing::evict_tokens(B * 150, cfg.vocab, 41), q1 = testing::evict_tokens(B * 4, cfg.vocab, 42),
                 q2 = testing::evict_tokens(B * 6, cfg.vocab, 43);
      testing::check_snapshot_reuse(
          *m, [&] { return std::make_unique<RocketKVPolicy>(cfg, cpu_backend(), RocketKVConfig{}); }, KVBudget{0.3, 0},
          B, ctx, q1, q2, 6, 1);
    }
  }
}

BOOST_AUTO_TEST_CASE(errors_name_the_option) {
  const ModelConfig cfg = evict_cfg();
  BOOST_CHECK_EXCEPTION(RocketKVPolicy(cfg, cpu_backend(), RocketKVConfig{32, 4}), Error, [](const Error& e) {
    return std::string(e.what()).find("--rocket_kv_kernel") != std::string::npos;
  });
  BOOST_CHECK_EXCEPTION(RocketKVPolicy(cfg, cpu_backend(), RocketKVConfig{0, 0}), Error, [](const Error& e) {
    return std::string(e.what()).find("--rocket_kv_window") != std::string::npos;
  });
}
