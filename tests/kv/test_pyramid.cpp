// PyramidKV (src/kv/pyramid.*): the per-layer budget arithmetic (kvpress's,
// with float steps and an exact fix-up), its two special cases, the selection
// on a hand-built case, C from the byte budget and infeasibility.
#define BOOST_TEST_MODULE pyramid
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "backend/backend.hpp"
#include "core/rng.hpp"
#include "kv/pyramid.hpp"
#include "model/transformer.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;
using Mode = pyramid::Budgets::Mode;

BOOST_AUTO_TEST_CASE(budgets_worked_examples) {
  // L 4, N 100, C 20, w 8, beta 20: C - w = 12, min 0.6, max 23.4, step 7.6:
  // 23.4 15.8 8.2 0.6 -> floors 23 15 8 1 (0 lifted to 1: none reaches 0),
  // sum 47; the fix-up adds one to the largest remainder (layer 1): 23 16 8 1 = 48.
  auto b = pyramid::layer_budgets(100, 20, 8, 4, 20);
  BOOST_TEST((b.mode == Mode::pyramid));
  BOOST_TEST(b.prefix == (std::vector<std::int64_t>{23, 16, 8, 1}), boost::test_tools::per_element());
  // max clamped to N - w: C - w = 40, max 78 >= N - w = 76 -> max 76, min 4: 76 40 4.
  b = pyramid::layer_budgets(80, 44, 4, 3, 20);
  BOOST_TEST((b.mode == Mode::pyramid));
  BOOST_TEST(b.prefix == (std::vector<std::int64_t>{76, 40, 4}), boost::test_tools::per_element());
  // N <= C: no compression.
  b = pyramid::layer_budgets(20, 20, 8, 4, 20);
  BOOST_TEST((b.mode == Mode::none));
  // N < 2 (C - w): plain SnapKV, C - w each.
  b = pyramid::layer_budgets(23, 20, 8, 4, 20);
  BOOST_TEST((b.mode == Mode::snapkv));
  BOOST_TEST(b.prefix == (std::vector<std::int64_t>(4, 12)), boost::test_tools::per_element());
  // N = 2 (C - w) is the first pyramid case.
  BOOST_TEST((pyramid::layer_budgets(24, 20, 8, 4, 20).mode == Mode::pyramid));
  // One layer: no slope (kvpress PR #266's division by L - 1).
  b = pyramid::layer_budgets(100, 20, 8, 1, 20);
  BOOST_TEST(b.prefix == (std::vector<std::int64_t>{12}), boost::test_tools::per_element());
  BOOST_CHECK_THROW(pyramid::layer_budgets(100, 8, 8, 4, 20), Error);   // C < w + 1
  BOOST_CHECK_THROW(pyramid::layer_budgets(100, 20, 8, 4, 0.5), Error);  // beta < 1
}

// Over a sweep: the sum is exactly L (C - w), every budget lies in [1, N - w],
// budgets never rise from a layer to the next, and each is within one token
// of kvpress's float value max - l step (or 1 where that is below 1).
BOOST_AUTO_TEST_CASE(budgets_sum_floor_and_order) {
  Rng rng(5, 1);
  int pyramids = 0;
  for (int it = 0; it < 3000; ++it) {
    const std::int64_t L = 1 + static_cast<std::int64_t>(rng.below(40));
    const std::int64_t w = static_cast<std::int64_t>(rng.below(20));
    const std::int64_t C = w + 1 + static_cast<std::int64_t>(rng.below(300));
    const std::int64_t N = 1 + static_cast<std::int64_t>(rng.below(1500));
    const double beta = 1 + 30 * rng.uniform();
    const auto b = pyramid::layer_budgets(N, C, w, L, beta);
    BOOST_TEST_CONTEXT("L=" << L << " w=" << w << " C=" << C << " N=" << N << " beta=" << beta) {
      BOOST_REQUIRE(b.prefix.size() == static_cast<std::size_t>(L));
      if (N <= C) {
        BOOST_TEST((b.mode == Mode::none));
        continue;
      }
      const std::int64_t sum = std::accumulate(b.prefix.begin(), b.prefix.end(), std::int64_t{0});
      BOOST_TEST(sum == L * (C - w));
      for (std::int64_t l = 0; l < L; ++l) {
        const auto x = b.prefix[static_cast<std::size_t>(l)];
        BOOST_TEST((x >= 1 && x <= N - w));
        if (l > 0) BOOST_TEST(x <= b.prefix[static_cast<std::size_t>(l - 1)]);
      }
      if (b.mode == Mode::pyramid) {
        ++pyramids;
        const double per = static_cast<double>(C - w);
        double mn = per / beta, mx = 2 * per - mn;
        if (mx >= static_cast<double>(N - w)) {
          mx = static_cast<double>(N - w);
          mn = 2 * per - mx;
        }
        for (std::int64_t l = 0; l < L; ++l) {
          const double f = std::max(1.0, mx - static_cast<double>(l) * (mx - mn) / static_cast<double>(L - 1));
          BOOST_TEST(std::fabs(static_cast<double>(b.prefix[static_cast<std::size_t>(l)]) - f) < 1.0 + 1e-9);
        }
      } else {
        BOOST_TEST((N < 2 * (C - w) || L == 1));
      }
    }
  }
  BOOST_TEST(pyramids > 100);
}

namespace {

// One layer, two heads of 8; RoPE's slowest pair barely turns (theta 1e12:
// angle <= 128 * 1e-9), so a signal in dimension 3 (and 7) survives it.
ModelConfig cfg(std::int64_t layers) {
  ModelConfig c;
  c.vocab = 40;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_layers = layers;
  c.d_ff = 32;
  c.max_pos = 128;
  c.rope_theta = 1e12;
  c.validate();
  return c;
}

}  // namespace

// The window's queries attend to token 17 far more than to anything else:
// with max pooling (kernel 7) the plateau 14..20 outranks every other prefix
// token, so a prefix budget of 7 keeps exactly 14..20 plus the window; with
// kernel 1 the budget of 7 keeps 17 and six others. C comes from the bytes:
// 7 + w prefix-plus-window slots and the decode slots per row.
BOOST_AUTO_TEST_CASE(selection_keeps_what_the_window_attends_to) {
  const std::int64_t N = 40, T = 2, w = 8;
  for (std::int64_t kernel : {7, 1}) {
    BOOST_TEST_CONTEXT("kernel " << kernel) {
      const ModelConfig c = cfg(1);
      const std::int64_t NH = c.n_heads, HS = c.head_size(), C = c.d_model;
      const std::size_t tb = 2 * HS * 4;
      pyramid::Settings s;
      s.kernel = kernel;
      PyramidPolicy p(c, cpu_backend(), s);
      const std::size_t bytes = static_cast<std::size_t>((7 + w + T) * NH) * tb + 64;
      p.begin(SequenceInfo{1, N, 5, T}, KVBudget{1.0, bytes});
      BOOST_TEST(p.row_slots() == 7 + w + T);
      BOOST_TEST(!p.infeasible());
      Rng rng(3, 1);
      std::vector<float> q(static_cast<std::size_t>(N * C)), k(q.size()), v(q.size()), out(q.size());
      for (auto& x : k) x = static_cast<float>(0.1 * rng.normal());
      for (auto& x : v) x = static_cast<float>(rng.normal());
      for (std::int64_t i = 0; i < N; ++i)
        for (std::int64_t h = 0; h < NH; ++h) {
          q[static_cast<std::size_t>((i * NH + h) * HS + 3)] = 10.0f;
          k[static_cast<std::size_t>((i * NH + h) * HS + 3)] = i == 17 ? 3.0f : 0.0f;
        }
      std::vector<std::int32_t> pos(static_cast<std::size_t>(N));
      std::iota(pos.begin(), pos.end(), 0);
      p.attend(0, TensorView(q.data(), Shape{1, N, NH, HS}), TensorView(k.data(), Shape{1, N, NH, HS}),
               TensorView(v.data(), Shape{1, N, NH, HS}), TensorView(pos.data(), Shape{1, N}),
               TensorView(out.data(), Shape{1, N, NH, HS}));
      p.end_prefill();
      BOOST_TEST(p.window() == w);
      for (std::int64_t r = 0; r < NH; ++r) {
        const auto got = p.row_positions(0, r);
        BOOST_TEST(got.size() == static_cast<std::size_t>(7 + w));
        BOOST_TEST(std::is_sorted(got.begin(), got.end()));
        BOOST_TEST((std::find(got.begin(), got.end(), 17) != got.end()));
        for (std::int32_t j = static_cast<std::int32_t>(N - w); j < N; ++j)
          BOOST_TEST((std::find(got.begin(), got.end(), j) != got.end()));
        if (kernel == 7) {
          std::vector<std::int32_t> want;
          for (std::int32_t j = 14; j <= 20; ++j) want.push_back(j);
          for (std::int32_t j = 32; j < 40; ++j) want.push_back(j);
          BOOST_TEST(got == want, boost::test_tools::per_element());
        }
      }
      BOOST_TEST(p.budget_achieved_bytes() <= p.budget_requested_bytes());
    }
  }
}

namespace {

std::unique_ptr<Transformer> model(const ModelConfig& c, std::uint64_t seed) {
  auto m = std::make_unique<Transformer>(c, cpu_backend());
  Rng rng(seed, 7);
  for (auto& p : m->params()) {
    if (p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos) continue;
    float* v = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = static_cast<float>((p.decay ? 0.25 : 0.05) * rng.normal());
  }
  return m;
}

}  // namespace

// On a 4-layer model: each layer keeps its pyramid budget plus the window
// (bottom layer most), the bytes stay within the budget, the meta records the
// budgets; below the window + one prefix token + decode slots it is infeasible;
// the reuse protocol's contract holds.
BOOST_AUTO_TEST_CASE(layers_budgets_bytes_and_infeasible) {
  ModelConfig c = cfg(4);
  c.rope_theta = 10000;
  auto m = model(c, 4);
  const std::int64_t N = 96, T = 3, q = 6;
  Rng rng(8, 3);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(N));
  for (auto& t : prompt) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab)));
  for (double f : {0.15, 0.25, 0.5}) {
    BOOST_TEST_CONTEXT("fraction " << f) {
      PyramidPolicy p(c, cpu_backend(), pyramid::Settings{});
      p.begin(SequenceInfo{1, N, q, T}, KVBudget{f, 0});
      const auto a = testing::answer_question(*m, p, prompt, 1, 0, T);
      BOOST_TEST(!a.infeasible);
      BOOST_TEST(a.achieved <= a.requested);
      const std::int64_t C = p.row_slots() - T, w = 8;
      const auto want = pyramid::layer_budgets(N, C, w, 4, 20);
      BOOST_TEST(p.budgets().prefix == want.prefix, boost::test_tools::per_element());
      for (std::int64_t l = 0; l < 4; ++l)
        for (std::int64_t r = 0; r < c.n_heads; ++r)
          BOOST_TEST(p.row_len(l, r) == (want.mode == Mode::none ? N : want.prefix[static_cast<std::size_t>(l)] + w) + T);
      BOOST_TEST(p.meta().count("pyramid_prefix_budgets") == 1u);
    }
  }
  const std::size_t tb = 2 * static_cast<std::size_t>(c.head_size()) * 4;
  const std::size_t min_bytes = static_cast<std::size_t>(4 * c.n_heads * (8 + 1 + T)) * tb + 4 * 64;
  PyramidPolicy p(c, cpu_backend(), pyramid::Settings{});
  p.begin(SequenceInfo{1, N, q, T}, KVBudget{1.0, min_bytes});
  BOOST_TEST(!p.infeasible());
  p.begin(SequenceInfo{1, N, q, T}, KVBudget{1.0, min_bytes - 1});
  BOOST_TEST(p.infeasible());
  // Query-agnostic: planned with the decode slots only (w = 8: no question
  // known); the 16 question tokens arriving after the context take 16 more
  // slots per row: C = that minimum - 16 < w + 1 is reported infeasible.
  {
    PyramidPolicy pa(c, cpu_backend(), pyramid::Settings{});
    pa.begin(SequenceInfo{1, N, 0, T}, KVBudget{1.0, min_bytes});
    BOOST_TEST(!pa.infeasible());
    testing::prefill_context(*m, pa, std::vector<std::int32_t>(prompt.begin(), prompt.begin() + 80), 1, 1);
    const auto a = testing::answer_question(*m, pa, std::vector<std::int32_t>(prompt.begin() + 80, prompt.end()), 1, 80, T);
    BOOST_TEST(a.infeasible);
    PyramidPolicy pb(c, cpu_backend(), pyramid::Settings{});
    pb.begin(SequenceInfo{1, N, 0, T}, KVBudget{1.0, min_bytes + static_cast<std::size_t>(4 * c.n_heads * 16) * tb});
    testing::prefill_context(*m, pb, std::vector<std::int32_t>(prompt.begin(), prompt.begin() + 80), 1, 1);
    const auto b = testing::answer_question(*m, pb, std::vector<std::int32_t>(prompt.begin() + 80, prompt.end()), 1, 80, T);
    BOOST_TEST(!b.infeasible);
    BOOST_TEST(b.achieved <= b.requested);
  }
  std::vector<std::int32_t> ctx(prompt.begin(), prompt.begin() + 80), q1(prompt.begin() + 80, prompt.end()), q2(q1);
  std::reverse(q2.begin(), q2.end());
  testing::check_snapshot_reuse(*m, [&] { return std::make_unique<PyramidPolicy>(c, cpu_backend(), pyramid::Settings{}); },
                                KVBudget{0.4, 0}, 1, ctx, q1, q2, T, 1);
}
