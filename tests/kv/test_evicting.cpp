// The evicting-policy base (kv/evicting.hpp) and SnapKV window scoring
// (kv/snapkv.hpp): per-row subsets attended exactly, against a double
// reference; the window scores against a direct computation; pooling and
// top-k rules on hand-built cases; bytes; the reuse protocol's contract.
#define BOOST_TEST_MODULE evicting
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "../common/reference.hpp"
#include "core/rng.hpp"
#include "kv/evicting.hpp"
#include "kv/full.hpp"
#include "kv/snapkv.hpp"
#include "model/transformer.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;
using ref::IVec;
using ref::Vec;

namespace {

ModelConfig small_cfg() {
  ModelConfig c;
  c.vocab = 61;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = 2;
  c.d_ff = 64;
  c.max_pos = 512;
  return c;
}

// Row r keeps the tokens j with (j + r) % 3 != 0, and always the call's last
// token: a different subset per head, some rows losing their first tokens.
class SubsetPolicy final : public EvictingPolicy {
 public:
  using EvictingPolicy::EvictingPolicy;
  bool plan(const SequenceInfo&, std::size_t) override { return true; }
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override {
    std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(rows()));
    for (std::int64_t r = 0; r < rows(); ++r)
      for (std::int64_t j = 0; j < p.tokens; ++j)
        if ((j + r) % 3 != 0 || j == p.tokens - 1) keep[static_cast<std::size_t>(r)].push_back(static_cast<std::int32_t>(j));
    return keep;
  }
  static bool kept(std::int64_t r, std::int64_t j, std::int64_t tn) { return (j + r) % 3 != 0 || j == tn - 1; }
};

class KeepAllPolicy final : public EvictingPolicy {
 public:
  using EvictingPolicy::EvictingPolicy;
  bool plan(const SequenceInfo&, std::size_t) override { return true; }
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override {
    std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(rows()));
    for (auto& k : keep)
      for (std::int64_t j = 0; j < p.tokens; ++j) k.push_back(static_cast<std::int32_t>(j));
    return keep;
  }
};

std::vector<float> to_f32(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

}  // namespace

// The compression call's output is exact causal attention over the call; a
// later call attends, per (sequence, head) row, to that row's kept tokens and
// the new ones, at their original positions (double reference; the outputs
// are f32 attention over <= 13 keys: error ~ a few ulp of the output scale,
// 1e-5 relative leaves a wide margin and catches any wrong key or position).
BOOST_AUTO_TEST_CASE(subset_rows_match_reference) {
  const ModelConfig cfg = small_cfg();
  const std::int64_t B = 2, N = 10, T = 3, NH = cfg.n_heads, HS = cfg.head_size(), R = B * NH;
  SubsetPolicy pol(cfg, cpu_backend(), "subset");
  pol.begin(SequenceInfo{B, N, 0, T}, KVBudget{});
  Rng rng(5, 1);
  const Vec q = ref::normal<double>(B * N * NH * HS, rng), k = ref::normal<double>(B * N * NH * HS, rng),
            v = ref::normal<double>(B * N * NH * HS, rng);
  IVec pos(static_cast<std::size_t>(B * N));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t) pos[static_cast<std::size_t>(b * N + t)] = t;
  std::vector<float> qf = to_f32(q), kf = to_f32(k), vf = to_f32(v), out(qf.size());
  std::vector<std::int32_t> pi(pos.begin(), pos.end());
  // The policy rotates q and k in place: the reference takes copies first.
  const Vec qr(qf.begin(), qf.end()), kr(kf.begin(), kf.end()), vr(vf.begin(), vf.end());
  const Shape s{B, N, NH, HS};
  pol.attend(0, TensorView(qf.data(), s), TensorView(kf.data(), s), TensorView(vf.data(), s),
             TensorView(pi.data(), Shape{B, N}), TensorView(out.data(), s));
  Vec qrot(q.size()), krot(k.size());
  for (std::int64_t b = 0; b < B; ++b) {
    const IVec pb(pos.begin() + b * N, pos.begin() + (b + 1) * N);
    const auto qb = ref::rope(Vec(qr.begin() + b * N * NH * HS, qr.begin() + (b + 1) * N * NH * HS), N, NH, HS, pb, cfg.rope_theta);
    const auto kb = ref::rope(Vec(kr.begin() + b * N * NH * HS, kr.begin() + (b + 1) * N * NH * HS), N, NH, HS, pb, cfg.rope_theta);
    std::copy(qb.begin(), qb.end(), qrot.begin() + b * N * NH * HS);
    std::copy(kb.begin(), kb.end(), krot.begin() + b * N * NH * HS);
  }
  const auto full = ref::attention(qrot, krot, vr, pos, pos, B, N, N, NH, HS, true);
  BOOST_TEST(ref::rel_err(Vec(out.begin(), out.end()), full.o) < 1e-5);
  for (std::int64_t r = 0; r < R; ++r) {
    const auto p = pol.row_positions(0, r);
    std::vector<std::int32_t> want;
    for (std::int64_t j = 0; j < N; ++j)
      if (SubsetPolicy::kept(r, j, N)) want.push_back(static_cast<std::int32_t>(j));
    BOOST_TEST(p == want, "row " << r);
  }

  // One decode-like call at position N: per row, exact attention over the kept keys + the new key.
  const Vec q1 = ref::normal<double>(B * NH * HS, rng), k1 = ref::normal<double>(B * NH * HS, rng),
            v1 = ref::normal<double>(B * NH * HS, rng);
  std::vector<float> q1f = to_f32(q1), k1f = to_f32(k1), v1f = to_f32(v1), o1(q1f.size());
  const std::vector<float> q1c = q1f, k1c = k1f;
  std::vector<std::int32_t> p1(static_cast<std::size_t>(B), static_cast<std::int32_t>(N));
  const Shape s1{B, 1, NH, HS};
  pol.attend(0, TensorView(q1f.data(), s1), TensorView(k1f.data(), s1), TensorView(v1f.data(), s1),
             TensorView(p1.data(), Shape{B, 1}), TensorView(o1.data(), s1));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const std::int64_t r = b * NH + h;
      const IVec pn{N};
      const Vec qn = ref::rope(Vec(q1c.begin() + (b * NH + h) * HS, q1c.begin() + (b * NH + h + 1) * HS), 1, 1, HS, pn, cfg.rope_theta);
      const Vec kn = ref::rope(Vec(k1c.begin() + (b * NH + h) * HS, k1c.begin() + (b * NH + h + 1) * HS), 1, 1, HS, pn, cfg.rope_theta);
      Vec ks, vs;
      IVec kp;
      for (std::int64_t j = 0; j < N; ++j) {
        if (!SubsetPolicy::kept(r, j, N)) continue;
        const auto at = static_cast<std::size_t>(((b * N + j) * NH + h) * HS);
        ks.insert(ks.end(), krot.begin() + at, krot.begin() + at + HS);
        vs.insert(vs.end(), vr.begin() + at, vr.begin() + at + HS);
        kp.push_back(j);
      }
      ks.insert(ks.end(), kn.begin(), kn.end());
      vs.insert(vs.end(), v1f.begin() + (b * NH + h) * HS, v1f.begin() + (b * NH + h + 1) * HS);
      kp.push_back(N);
      const auto S = static_cast<std::int64_t>(kp.size());
      const auto want = ref::attention(qn, ks, vs, pn, kp, 1, 1, S, 1, 1 * HS, true);
      const Vec got(o1.begin() + (b * NH + h) * HS, o1.begin() + (b * NH + h + 1) * HS);
      BOOST_TEST(ref::rel_err(got, want.o) < 1e-5, "row " << r);
      BOOST_TEST(pol.row_len(0, r) == S);
    }
}

// Keeping everything decodes what the full cache decodes (logits to fp32
// tolerance: the same attention kernel, run per head instead of over all
// heads at once), and counts the same K/V bytes.
BOOST_AUTO_TEST_CASE(keep_all_equals_full) {
  const ModelConfig cfg = small_cfg();
  Transformer m(cfg, cpu_backend());
  Rng rng(9, 2);
  for (auto& p : m.params()) {
    if (p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos) continue;
    float* x = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) x[i] = static_cast<float>((p.decay ? 0.25 : 0.05) * rng.normal());
  }
  const std::int64_t B = 2, N = 20, T = 5;
  std::vector<std::int32_t> ctx(static_cast<std::size_t>(B * N));
  for (auto& t : ctx) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(cfg.vocab)));
  std::vector<std::int32_t> q(static_cast<std::size_t>(B * 4));
  for (auto& t : q) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(cfg.vocab)));
  FullPolicy full(cfg, cpu_backend());
  KeepAllPolicy all(cfg, cpu_backend(), "keep_all");
  const SequenceInfo info{B, N + 4, 0, T};
  full.begin(info, KVBudget{});
  all.begin(info, KVBudget{});
  testing::prefill_context(m, full, ctx, B, 1);
  testing::prefill_context(m, all, ctx, B, 1);
  const auto a = testing::answer_question(m, full, q, B, N, T);
  const auto b = testing::answer_question(m, all, q, B, N, T);
  std::vector<double> x(a.logits.begin(), a.logits.end()), y(b.logits.begin(), b.logits.end());
  BOOST_TEST(ref::rel_err(y, x) < 1e-4);
  BOOST_TEST(b.mem.resident_after_prefill == a.mem.resident_after_prefill);
  BOOST_TEST(b.achieved == a.achieved);
  BOOST_TEST(b.mem.read_per_step == a.mem.read_per_step);
  BOOST_TEST(b.attended == a.attended);
  // Prefill held the layers' blocks plus one layer's uncompressed K/V.
  BOOST_TEST(b.mem.peak_prefill > b.mem.resident_after_prefill);
}

BOOST_AUTO_TEST_CASE(snapshot_contract) {
  const ModelConfig cfg = small_cfg();
  Transformer m(cfg, cpu_backend());
  const std::int64_t B = 2;
  Rng rng(3, 3);
  auto toks = [&](std::int64_t n) {
    std::vector<std::int32_t> t(static_cast<std::size_t>(n));
    for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(cfg.vocab)));
    return t;
  };
  const auto ctx = toks(B * 30), q1 = toks(B * 4), q2 = toks(B * 6);
  testing::check_snapshot_reuse(
      m, [&] { return std::make_unique<SubsetPolicy>(cfg, cpu_backend(), "subset"); }, KVBudget{}, B, ctx, q1, q2, 6, 2);
}

BOOST_AUTO_TEST_CASE(pool1d_rules) {
  const std::vector<double> x{1, 5, 2, 0, 3};
  // max, kernel 3: in-range neighbours only.
  const std::vector<double> mx{5, 5, 5, 3, 3};
  BOOST_TEST(snapkv::pool1d(x, 3, snapkv::Pool::max) == mx, boost::test_tools::per_element());
  // avg, kernel 3: zero padding counted (sum / 3 at the edges too).
  const auto av = snapkv::pool1d(x, 3, snapkv::Pool::avg);
  const std::vector<double> want{6.0 / 3, 8.0 / 3, 7.0 / 3, 5.0 / 3, 3.0 / 3};
  for (std::size_t i = 0; i < want.size(); ++i) BOOST_TEST(std::abs(av[i] - want[i]) < 1e-15);
  BOOST_TEST(snapkv::pool1d(x, 1, snapkv::Pool::max) == x, boost::test_tools::per_element());
  BOOST_CHECK_THROW(snapkv::pool1d(x, 2, snapkv::Pool::max), Error);
}

BOOST_AUTO_TEST_CASE(top_in_order_and_window) {
  const std::vector<double> s{0.1, 0.9, 0.5, 0.9, std::numeric_limits<double>::quiet_NaN(), 0.3};
  // Top 3: 0.9 (1), 0.9 (3, tie to lower index first), 0.5 (2); returned in position order.
  BOOST_TEST(snapkv::top_in_order(s.data(), 6, 3) == (std::vector<std::int32_t>{1, 2, 3}), boost::test_tools::per_element());
  // NaN is smallest: keeping 5 of 6 drops it.
  BOOST_TEST(snapkv::top_in_order(s.data(), 6, 5) == (std::vector<std::int32_t>{0, 1, 2, 3, 5}), boost::test_tools::per_element());
  // Window of 2 over 8 tokens, keep 4: the top 2 prefix tokens by score + tokens 6, 7.
  BOOST_TEST(snapkv::keep_with_window(s.data(), 8, 2, 4) == (std::vector<std::int32_t>{1, 3, 6, 7}), boost::test_tools::per_element());
  BOOST_TEST(snapkv::keep_with_window(s.data(), 8, 2, 8).size() == 8u);
  BOOST_CHECK_THROW(snapkv::keep_with_window(s.data(), 8, 3, 2), Error);
  BOOST_TEST(snapkv::default_window(3, 100) == 8);
  BOOST_TEST(snapkv::default_window(12, 100) == 12);
  BOOST_TEST(snapkv::default_window(12, 6) == 5);
}

// Window scores: column sums of the window queries' causal softmax over the
// call's keys (double reference from the same f32 inputs; attention_mass
// accumulates in f64, so 1e-12 is a bound with room), then pooled.
BOOST_AUTO_TEST_CASE(window_scores_match_direct) {
  const std::int64_t B = 2, Tn = 13, NH = 3, HS = 8, w = 4, P = Tn - w;
  Rng rng(17, 4);
  const auto qv = ref::normal<float>(B * Tn * NH * HS, rng), kv = ref::normal<float>(B * Tn * NH * HS, rng);
  std::vector<float> q(qv.begin(), qv.end()), k(kv.begin(), kv.end());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B * Tn));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) pos[static_cast<std::size_t>(b * Tn + t)] = static_cast<std::int32_t>(3 * t + b);
  Arena scratch("test", 1 << 20);
  const Shape s{B, Tn, NH, HS};
  for (const auto pool : {snapkv::Pool::avg, snapkv::Pool::max}) {
    const auto got = snapkv::window_scores(cpu_backend(), scratch, TensorView(q.data(), s), TensorView(k.data(), s),
                                           TensorView(pos.data(), Shape{B, Tn}), w, 5, pool);
    BOOST_REQUIRE_EQUAL(got.size(), static_cast<std::size_t>(B * NH * P));
    const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < NH; ++h) {
        std::vector<double> col(static_cast<std::size_t>(P), 0.0);
        for (std::int64_t i = Tn - w; i < Tn; ++i) {
          std::vector<double> sc(static_cast<std::size_t>(Tn), -std::numeric_limits<double>::infinity());
          double mx = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j <= i; ++j) {
            double d = 0;
            for (std::int64_t c = 0; c < HS; ++c)
              d += static_cast<double>(q[static_cast<std::size_t>(((b * Tn + i) * NH + h) * HS + c)]) *
                   k[static_cast<std::size_t>(((b * Tn + j) * NH + h) * HS + c)];
            sc[static_cast<std::size_t>(j)] = d * scale;
            mx = std::max(mx, d * scale);
          }
          double z = 0;
          for (std::int64_t j = 0; j <= i; ++j) z += std::exp(sc[static_cast<std::size_t>(j)] - mx);
          for (std::int64_t j = 0; j < P && j <= i; ++j) col[static_cast<std::size_t>(j)] += std::exp(sc[static_cast<std::size_t>(j)] - mx) / z;
        }
        const auto want = snapkv::pool1d(col, 5, pool);
        for (std::int64_t j = 0; j < P; ++j)
          BOOST_TEST(std::abs(got[static_cast<std::size_t>((b * NH + h) * P + j)] - want[static_cast<std::size_t>(j)]) < 1e-12);
      }
  }
  BOOST_CHECK_THROW(snapkv::window_scores(cpu_backend(), scratch, TensorView(q.data(), s), TensorView(k.data(), s),
                                         TensorView(pos.data(), Shape{B, Tn}), Tn, 5, snapkv::Pool::max),
                    Error);
}

// reselect() shrinks rows, keeps positions and contents, and lowers the bytes.
BOOST_AUTO_TEST_CASE(reselect_shrinks_rows) {
  class Reselecting final : public EvictingPolicy {
   public:
    using EvictingPolicy::EvictingPolicy;
    using EvictingPolicy::reselect;
    bool plan(const SequenceInfo&, std::size_t) override { return true; }
    std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override {
      std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(rows()));
      for (auto& kk : keep)
        for (std::int64_t j = 0; j < p.tokens; ++j) kk.push_back(static_cast<std::int32_t>(j));
      return keep;
    }
  };
  const ModelConfig cfg = small_cfg();
  const std::int64_t B = 1, N = 8, NH = cfg.n_heads, HS = cfg.head_size();
  Reselecting pol(cfg, cpu_backend(), "resel");
  pol.begin(SequenceInfo{B, N, 0, 2}, KVBudget{});
  Rng rng(2, 2);
  const auto qv = ref::normal<float>(B * N * NH * HS, rng), kv = ref::normal<float>(B * N * NH * HS, rng),
             vv = ref::normal<float>(B * N * NH * HS, rng);
  std::vector<float> q(qv.begin(), qv.end()), k(kv.begin(), kv.end()), v(vv.begin(), vv.end()), o(q.size());
  std::vector<std::int32_t> pos{0, 1, 2, 3, 4, 5, 6, 7};
  const Shape s{B, N, NH, HS};
  pol.attend(0, TensorView(q.data(), s), TensorView(k.data(), s), TensorView(v.data(), s), TensorView(pos.data(), Shape{B, N}),
             TensorView(o.data(), s));
  const auto before_v = std::vector<float>(pol.row_v(0, 2).ptr<float>(), pol.row_v(0, 2).ptr<float>() + N * HS);
  const std::size_t before = pol.budget_achieved_bytes();
  std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(NH));
  keep[2] = {1, 4, 7};
  pol.reselect(0, keep);
  BOOST_TEST(pol.row_len(0, 2) == 3);
  BOOST_TEST(pol.row_len(0, 0) == 0);
  BOOST_TEST(pol.row_positions(0, 2) == (std::vector<std::int32_t>{1, 4, 7}), boost::test_tools::per_element());
  const float* nv = pol.row_v(0, 2).ptr<float>();
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t c = 0; c < HS; ++c)
      BOOST_TEST(nv[i * HS + c] == before_v[static_cast<std::size_t>(keep[2][static_cast<std::size_t>(i)] * HS + c)]);
  BOOST_TEST(pol.budget_achieved_bytes() < before);
}

// A plan that fit the compression call but not what followed (the question
// appended under context_only) is marked infeasible once prefill ends: the
// bytes held decide, not only the plan.
BOOST_AUTO_TEST_CASE(bytes_held_beyond_the_budget_are_infeasible) {
  const ModelConfig cfg = small_cfg();
  Transformer m(cfg, cpu_backend());
  const std::int64_t B = 1, N = 20, T = 3;
  std::vector<std::int32_t> ctx(static_cast<std::size_t>(B * N), 5), q(static_cast<std::size_t>(B * 4), 7);
  for (const double f : {1.0, 0.5}) {
    KeepAllPolicy pol(cfg, cpu_backend(), "keep_all");
    KVBudget budget;
    budget.fraction = f;
    pol.begin(SequenceInfo{B, N + 4, 0, T}, budget);
    testing::prefill_context(m, pol, ctx, B, 1);
    BOOST_TEST(!pol.infeasible());  // the plan accepted the budget
    const auto a = testing::answer_question(m, pol, q, B, N, T);
    BOOST_TEST(a.infeasible == (f < 1.0), "fraction " << f);
    BOOST_TEST((a.achieved > a.requested) == (f < 1.0));
  }
}
