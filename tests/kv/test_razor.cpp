// RazorAttention (src/kv/razor.*): the compensation slot's identity, the
// policy against a double reference of its formula, head scoring on a
// hand-built attention pattern, the head counts, L_h from the byte budget,
// demotion, infeasibility and the calibration run on a model.
#define BOOST_TEST_MODULE razor
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "core/rng.hpp"
#include "kv/razor.hpp"
#include "model/transformer.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;

namespace {

constexpr double kU = 0x1.0p-24;  // f32 unit roundoff

// Exact softmax attention of one query over keys (double, from f32 values):
// o = sum_j p_j v_j, p_j ~ exp(scale q.k_j + bias_j).
std::vector<double> ref_attention(const float* q, const std::vector<const float*>& ks, const std::vector<const float*>& vs,
                                  const std::vector<double>& bias, std::int64_t hs, double scale, double* lse = nullptr) {
  std::vector<double> s(ks.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (std::size_t j = 0; j < ks.size(); ++j) {
    double d = 0;
    for (std::int64_t x = 0; x < hs; ++x) d += static_cast<double>(q[x]) * ks[j][x];
    s[j] = d * scale + bias[j];
    mx = std::max(mx, s[j]);
  }
  double z = 0;
  for (auto& e : s) z += (e = std::exp(e - mx));
  std::vector<double> o(static_cast<std::size_t>(hs), 0.0);
  for (std::size_t j = 0; j < ks.size(); ++j)
    for (std::int64_t x = 0; x < hs; ++x) o[static_cast<std::size_t>(x)] += s[j] / z * vs[j][x];
  if (lse) *lse = mx + std::log(z);
  return o;
}

std::vector<float> randn(std::int64_t n, Rng& rng, double sd) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<float>(sd * rng.normal());
  return v;
}

}  // namespace

// With |D| >= 2 identical dropped tokens the slot (mean K, mean V, + ln|D|
// after the 1/sqrt(d) scaling) reproduces full attention. Tolerance from
// error analysis (u = 2^-24, n = |D|, S keys, HS head size):
//  * mean K, V: a sum of n equal f32 values then a scaling by 1/n (itself
//    rounded): relative error <= (n + 1) u;
//  * each logit: the f32 dot products of the two paths differ by at most
//    delta = scale |q| |k| (HS + n + 3) u, plus ln|D| rounded to f32 (u ln n);
//  * a logit perturbation delta moves each softmax weight by <= 2 delta of
//    itself; the weighted sums of both paths add <= (2 S + 10) u max|v|
//    (online softmax, the merge's rescaling, the final division).
// So |o - o_full| <= max|v| (2 delta + (2 S + 10) u + (n + 1) u). Adding
// ln|D| BEFORE the scaling is off by O(1) here: the test tells them apart.
BOOST_AUTO_TEST_CASE(compensation_slot_reproduces_full_attention_with_identical_dropped_tokens) {
  Backend& be = cpu_backend();
  Arena scratch("t", std::size_t{1} << 20, be.allocator());
  const std::int64_t HS = 8, Tq = 3, sinks = 2, recent = 3;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  for (std::int64_t n : {2, 3, 7}) {
    BOOST_TEST_CONTEXT("|D| = " << n) {
      Rng rng(static_cast<std::uint64_t>(n), 1);
      const std::int64_t S = sinks + n + recent;
      std::vector<float> K = randn(S * HS, rng, 1.0), V = randn(S * HS, rng, 1.0), Q = randn(Tq * HS, rng, 1.5);
      for (std::int64_t j = sinks + 1; j < sinks + n; ++j)  // the dropped tokens: copies of the first
        for (std::int64_t x = 0; x < HS; ++x) {
          K[static_cast<std::size_t>(j * HS + x)] = K[static_cast<std::size_t>(sinks * HS + x)];
          V[static_cast<std::size_t>(j * HS + x)] = V[static_cast<std::size_t>(sinks * HS + x)];
        }
      // Full attention over all S keys (no mask: positions 0 for every key).
      std::vector<std::int32_t> qp(static_cast<std::size_t>(Tq), 0), kp(static_cast<std::size_t>(S), 0);
      std::vector<float> of(static_cast<std::size_t>(Tq * HS)), lf(static_cast<std::size_t>(Tq));
      be.attention_fwd(AttentionArgs{TensorView(Q.data(), Shape{1, Tq, 1, HS}), TensorView(K.data(), Shape{1, S, 1, HS}),
                                     TensorView(V.data(), Shape{1, S, 1, HS}), TensorView(of.data(), Shape{1, Tq, 1, HS}),
                                     TensorView(lf.data(), Shape{1, 1, Tq}), TensorView(qp.data(), Shape{1, Tq}),
                                     TensorView(kp.data(), Shape{1, S}), true, 0.0});
      // Kept keys: sinks and recent; exact attention over them, then the slot.
      std::vector<float> Kk, Vk;
      for (std::int64_t j = 0; j < S; ++j)
        if (j < sinks || j >= sinks + n) {
          Kk.insert(Kk.end(), K.begin() + j * HS, K.begin() + (j + 1) * HS);
          Vk.insert(Vk.end(), V.begin() + j * HS, V.begin() + (j + 1) * HS);
        }
      const std::int64_t Sk = sinks + recent;
      std::vector<std::int32_t> kpk(static_cast<std::size_t>(Sk), 0);
      std::vector<float> o(static_cast<std::size_t>(Tq * HS)), l(static_cast<std::size_t>(Tq));
      be.attention_fwd(AttentionArgs{TensorView(Q.data(), Shape{1, Tq, 1, HS}), TensorView(Kk.data(), Shape{1, Sk, 1, HS}),
                                     TensorView(Vk.data(), Shape{1, Sk, 1, HS}), TensorView(o.data(), Shape{1, Tq, 1, HS}),
                                     TensorView(l.data(), Shape{1, 1, Tq}), TensorView(qp.data(), Shape{1, Tq}),
                                     TensorView(kpk.data(), Shape{1, Sk}), true, 0.0});
      std::vector<std::int32_t> dropped;
      for (std::int64_t j = sinks; j < sinks + n; ++j) dropped.push_back(static_cast<std::int32_t>(j));
      std::vector<float> slot(static_cast<std::size_t>(razor::slot_floats(HS)));
      razor::fill_slot(be, scratch, TensorView(K.data(), Shape{S, HS}), TensorView(V.data(), Shape{S, HS}), dropped,
                       TensorView(slot.data(), Shape{razor::slot_floats(HS)}));
      BOOST_TEST(slot[static_cast<std::size_t>(2 * HS)] == static_cast<float>(std::log(static_cast<double>(n))));
      razor::merge_slot(be, scratch, TensorView(Q.data(), Shape{Tq, 1, HS}),
                        TensorView(slot.data(), Shape{razor::slot_floats(HS)}), TensorView(o.data(), Shape{Tq, 1, HS}),
                        TensorView(l.data(), Shape{1, Tq}));

      double qmax = 0, kmax = 0, vmax = 0;
      for (std::int64_t i = 0; i < Tq; ++i) {
        double s2 = 0;
        for (std::int64_t x = 0; x < HS; ++x) s2 += static_cast<double>(Q[static_cast<std::size_t>(i * HS + x)]) * Q[static_cast<std::size_t>(i * HS + x)];
        qmax = std::max(qmax, std::sqrt(s2));
      }
      for (std::int64_t j = 0; j < S; ++j) {
        double s2 = 0;
        for (std::int64_t x = 0; x < HS; ++x) {
          s2 += static_cast<double>(K[static_cast<std::size_t>(j * HS + x)]) * K[static_cast<std::size_t>(j * HS + x)];
          vmax = std::max(vmax, static_cast<double>(std::fabs(V[static_cast<std::size_t>(j * HS + x)])));
        }
        kmax = std::max(kmax, std::sqrt(s2));
      }
      const double nn = static_cast<double>(n), Sd = static_cast<double>(S);
      const double delta = scale * qmax * kmax * (static_cast<double>(HS) + nn + 3) * kU + kU * std::log(nn);
      const double tol = vmax * (2 * delta + (2 * Sd + 10) * kU + (nn + 1) * kU);
      const double tol_lse = delta + (2 * Sd + 10) * kU;
      double worst = 0, worst_before = 0;
      for (std::int64_t i = 0; i < Tq; ++i) {
        BOOST_TEST(std::fabs(l[static_cast<std::size_t>(i)] - lf[static_cast<std::size_t>(i)]) <= tol_lse);
        for (std::int64_t x = 0; x < HS; ++x)
          worst = std::max(worst, static_cast<double>(std::fabs(o[static_cast<std::size_t>(i * HS + x)] - of[static_cast<std::size_t>(i * HS + x)])));
        // The "bias before the scaling" variant, in double: (q.k + ln|D|) scale.
        std::vector<const float*> ks, vs;
        std::vector<double> bias;
        for (std::int64_t j = 0; j < S; ++j)
          if (j < sinks || j >= sinks + n) {
            ks.push_back(K.data() + j * HS);
            vs.push_back(V.data() + j * HS);
            bias.push_back(0.0);
          }
        ks.push_back(K.data() + sinks * HS);
        vs.push_back(V.data() + sinks * HS);
        bias.push_back(std::log(nn) * scale);
        const auto ob = ref_attention(Q.data() + i * HS, ks, vs, bias, HS, scale);
        for (std::int64_t x = 0; x < HS; ++x)
          worst_before = std::max(worst_before, std::fabs(ob[static_cast<std::size_t>(x)] - of[static_cast<std::size_t>(i * HS + x)]));
      }
      BOOST_TEST_MESSAGE("|D|=" << n << ": max |o - o_full| " << worst << " (tol " << tol << "), bias before scaling: " << worst_before);
      BOOST_TEST(worst <= tol);
      BOOST_TEST(worst_before > 100 * tol);
    }
  }
}

namespace {

ModelConfig one_layer(std::int64_t layers = 1) {
  ModelConfig c;
  c.vocab = 40;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_layers = layers;
  c.d_ff = 32;
  c.max_pos = 128;
  c.validate();
  return c;
}

// One compression call of N tokens then decode calls, straight into the policy.
struct Driven {
  std::vector<float> q, k, v;  // pre-RoPE, (N + T, NH, HS)
};

Driven random_qkv(const ModelConfig& c, std::int64_t n, std::uint64_t seed) {
  Rng rng(seed, 2);
  const std::int64_t C = c.d_model;
  return Driven{randn(n * C, rng, 1.0), randn(n * C, rng, 1.0), randn(n * C, rng, 1.0)};
}

}  // namespace

// L_h from the byte budget: row slots = (budget - alignment reserve) per row
// minus the slot's bytes, over a token's bytes; one byte less gives one less.
// Then the decode output of every head equals a double reference of Razor's
// formula (sinks + recent + the new tokens exactly, the dropped ones as one
// slot with mean K, mean V and + ln|D| after the scaling).
BOOST_AUTO_TEST_CASE(policy_matches_its_formula_and_sizes_recent_from_budget) {
  const ModelConfig c = one_layer();
  Backend& be = cpu_backend();
  const std::int64_t N = 40, T = 3, NH = c.n_heads, HS = c.head_size(), C = c.d_model;
  const std::size_t tb = 2 * HS * 4, slot_b = razor::slot_floats(HS) * 4;
  // Wanted: 4 sinks + 10 recent + 3 decode slots per row, 2 rows, + 2 x 64 reserve.
  const std::size_t requested = 2 * (17 * tb + slot_b) + 2 * 64;
  {
    RazorPolicy p(c, be, razor::Settings{4, {}, {}});
    p.begin(SequenceInfo{1, N, 5, T}, KVBudget{1.0, requested - 1});
    BOOST_TEST(p.row_slots() == 16);
  }
  RazorPolicy p(c, be, razor::Settings{4, {}, {}});
  p.begin(SequenceInfo{1, N, 5, T}, KVBudget{1.0, requested});
  BOOST_TEST(p.row_slots() == 17);
  BOOST_TEST(!p.infeasible());
  Driven d = random_qkv(c, N + T, 5);
  // Post-RoPE copies for the reference (the same op the policy runs).
  std::vector<float> qr = d.q, kr = d.k;
  std::vector<std::int32_t> pos(static_cast<std::size_t>(N + T));
  for (std::int64_t i = 0; i < N + T; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  be.rope_fwd(RopeArgs{TensorView(qr.data(), Shape{N + T, NH, HS}), TensorView(pos.data(), Shape{N + T}), c.rope_theta});
  be.rope_fwd(RopeArgs{TensorView(kr.data(), Shape{N + T, NH, HS}), TensorView(pos.data(), Shape{N + T}), c.rope_theta});
  std::vector<float> out(static_cast<std::size_t>(N * C));
  {
    std::vector<float> q(d.q.begin(), d.q.begin() + N * C), k(d.k.begin(), d.k.begin() + N * C), v(d.v.begin(), d.v.begin() + N * C);
    p.attend(0, TensorView(q.data(), Shape{1, N, NH, HS}), TensorView(k.data(), Shape{1, N, NH, HS}),
             TensorView(v.data(), Shape{1, N, NH, HS}), TensorView(pos.data(), Shape{1, N}),
             TensorView(out.data(), Shape{1, N, NH, HS}));
  }
  p.end_prefill();
  BOOST_TEST(p.recent() == 10);
  for (std::int64_t r = 0; r < NH; ++r) {
    std::vector<std::int32_t> want{0, 1, 2, 3};
    for (std::int32_t j = 30; j < 40; ++j) want.push_back(j);
    BOOST_TEST(p.row_positions(0, r) == want, boost::test_tools::per_element());
    BOOST_TEST(p.dropped(0, r) == 26);
  }
  for (std::int64_t t = N; t < N + T; ++t) {
    std::vector<float> q(d.q.begin() + t * C, d.q.begin() + (t + 1) * C), k(d.k.begin() + t * C, d.k.begin() + (t + 1) * C),
        v(d.v.begin() + t * C, d.v.begin() + (t + 1) * C), o(static_cast<std::size_t>(C));
    std::int32_t ps = static_cast<std::int32_t>(t);
    p.attend(0, TensorView(q.data(), Shape{1, 1, NH, HS}), TensorView(k.data(), Shape{1, 1, NH, HS}),
             TensorView(v.data(), Shape{1, 1, NH, HS}), TensorView(&ps, Shape{1, 1}), TensorView(o.data(), Shape{1, 1, NH, HS}));
    for (std::int64_t h = 0; h < NH; ++h) {
      std::vector<const float*> ks, vs;
      std::vector<double> bias;
      auto at = [&](const std::vector<float>& x, std::int64_t j) { return x.data() + (j * NH + h) * HS; };
      for (std::int64_t j = 0; j <= t; ++j)
        if (j < 4 || j >= 30) {
          ks.push_back(at(kr, j));
          vs.push_back(at(d.v, j));
          bias.push_back(0.0);
        }
      std::vector<float> mk(static_cast<std::size_t>(HS), 0.0f), mv(static_cast<std::size_t>(HS), 0.0f);
      std::vector<double> sk(static_cast<std::size_t>(HS), 0.0), sv(static_cast<std::size_t>(HS), 0.0);
      for (std::int64_t j = 4; j < 30; ++j)
        for (std::int64_t x = 0; x < HS; ++x) {
          sk[static_cast<std::size_t>(x)] += at(kr, j)[x];
          sv[static_cast<std::size_t>(x)] += at(d.v, j)[x];
        }
      for (std::int64_t x = 0; x < HS; ++x) {
        mk[static_cast<std::size_t>(x)] = static_cast<float>(sk[static_cast<std::size_t>(x)] / 26);
        mv[static_cast<std::size_t>(x)] = static_cast<float>(sv[static_cast<std::size_t>(x)] / 26);
      }
      ks.push_back(mk.data());
      vs.push_back(mv.data());
      bias.push_back(std::log(26.0));
      const auto ref = ref_attention(at(qr, t), ks, vs, bias, HS, 1.0 / std::sqrt(static_cast<double>(HS)));
      // f32 against double: the mean of 26 keys (27 u relative), dot products
      // (HS u), the softmax over 16 keys: 1e-5 of max|v| ~ 3 bounds it (u = 6e-8).
      for (std::int64_t x = 0; x < HS; ++x)
        BOOST_TEST(std::fabs(o[static_cast<std::size_t>(h * HS + x)] - ref[static_cast<std::size_t>(x)]) <= 1e-5);
    }
  }
  BOOST_TEST(p.budget_achieved_bytes() <= p.budget_requested_bytes());
  const auto m = p.meta();
  BOOST_TEST(m.at("razor_recent_tokens") == "10");
  BOOST_TEST(m.at("razor_protected_heads") == "");
}

// Echo and induction scores of a constructed attention pattern: a segment of
// 8 distinct tokens repeated 4 times; keys one-hot in their segment offset.
// Head 0 looks for offset o + 1 (induction: the token after the earlier
// copies), head 1 for its own offset o (echo, and itself), head 2 is uniform.
BOOST_AUTO_TEST_CASE(head_scores_of_a_hand_built_pattern) {
  Backend& be = cpu_backend();
  Arena scratch("t", std::size_t{1} << 20, be.allocator());
  const std::int64_t seg = 8, T = 4 * seg, NH = 3, HS = 8;
  std::vector<std::int32_t> tokens;
  for (std::int64_t i = 0; i < T; ++i) tokens.push_back(static_cast<std::int32_t>(10 + i % seg));
  std::vector<float> q(static_cast<std::size_t>(T * NH * HS), 0.0f), k(q.size(), 0.0f);
  for (std::int64_t i = 0; i < T; ++i) {
    const std::int64_t o = i % seg;
    for (std::int64_t h = 0; h < NH; ++h) k[static_cast<std::size_t>((i * NH + h) * HS + o)] = 1.0f;
    q[static_cast<std::size_t>((i * NH + 0) * HS + (o + 1) % seg)] = 40.0f;
    q[static_cast<std::size_t>((i * NH + 1) * HS + o)] = 40.0f;
  }
  std::vector<double> es(NH, 0.0), is(NH, 0.0);
  std::vector<std::int64_t> en(NH, 0), in(NH, 0);
  // Two calls (queries [0, 20) then [20, 32)) as the chunked calibration makes them.
  razor::accumulate_layer_scores(be, scratch, TensorView(q.data(), Shape{1, 20, NH, HS}),
                                 TensorView(k.data(), Shape{1, 20, NH, HS}), 0,
                                 std::vector<std::int32_t>(tokens.begin(), tokens.begin() + 20), es, is, en, in);
  std::vector<float> q2(q.begin() + 20 * NH * HS, q.end());
  razor::accumulate_layer_scores(be, scratch, TensorView(q2.data(), Shape{1, 12, NH, HS}),
                                 TensorView(k.data(), Shape{1, T, NH, HS}), 20, tokens, es, is, en, in);
  razor::HeadScores s;
  s.layers = 1;
  s.heads = NH;
  for (std::int64_t h = 0; h < NH; ++h) {
    BOOST_TEST(en[static_cast<std::size_t>(h)] == 3 * seg);  // the queries of copies 1..3
    s.echo.push_back(es[static_cast<std::size_t>(h)] / static_cast<double>(en[static_cast<std::size_t>(h)]));
    s.induction.push_back(is[static_cast<std::size_t>(h)] / static_cast<double>(in[static_cast<std::size_t>(h)]));
  }
  BOOST_TEST_MESSAGE("induction " << s.induction[0] << " " << s.induction[1] << " " << s.induction[2] << ", echo "
                                  << s.echo[0] << " " << s.echo[1] << " " << s.echo[2]);
  // Head 0 puts its mass on the keys of offset o + 1 before it: all of them
  // follow an earlier copy, except position 0 for the offset-7 queries (token
  // 0 follows nothing): those get c / (c + 1) in copy c, so the mean over the
  // 24 queries of copies 1..3 is (21 + 1/2 + 2/3 + 3/4) / 24. Head 1 spreads
  // over the earlier copies and itself: c / (c + 1), mean 23/36. Logits are 0
  // or 40/sqrt(8) = 14.1: the mass leaking to the other keys is below
  // 32 e^-14.1 = 2.3e-5.
  const double leak = 3e-5;
  BOOST_TEST(std::fabs(s.induction[0] - (21.0 + 23.0 / 12.0) / 24.0) < leak);
  BOOST_TEST(s.echo[0] < leak);
  BOOST_TEST(std::fabs(s.echo[1] - 23.0 / 36.0) < leak);
  BOOST_TEST(s.induction[1] < leak);
  BOOST_TEST(s.induction[2] < 0.2);
  BOOST_TEST(s.echo[2] < 0.2);
  const auto prot = razor::protected_heads(s, 0.34, 0.34);  // one head of each kind out of 3
  BOOST_TEST(prot.size() == 2u);
  BOOST_TEST(prot[0] == 0);  // induction ranks first at equal relative rank
  BOOST_TEST(prot[1] == 1);
  BOOST_TEST(razor::head_list(prot, NH) == "l0h0,l0h1");
}

// The paper's fractions on small and large models.
BOOST_AUTO_TEST_CASE(head_counts) {
  // 2 layers x 4 heads: 14% of 8 = 1.12 -> 1 induction head; 1% = 0.08 ->
  // at least one echo head: 2 of 8 protected (25%) when they differ.
  BOOST_TEST(razor::head_count(0.14, 8) == 1);
  BOOST_TEST(razor::head_count(0.01, 8) == 1);
  BOOST_TEST(razor::head_count(0.0, 8) == 0);
  BOOST_TEST(razor::head_count(0.14, 1024) == 143);
  BOOST_TEST(razor::head_count(0.01, 1024) == 10);
  BOOST_TEST(razor::head_count(1.0, 8) == 8);
  BOOST_CHECK_THROW(razor::head_count(1.5, 8), Error);
}

// Protected heads that leave too little for the others are demoted, lowest
// priority first; below the minimum (sinks + slot + decode slots) the policy
// is infeasible and keeps its minimum.
BOOST_AUTO_TEST_CASE(demotion_and_infeasible) {
  const ModelConfig c = one_layer(2);  // 4 heads
  Backend& be = cpu_backend();
  const std::int64_t N = 40, T = 2, HS = c.head_size();
  const std::size_t tb = 2 * HS * 4, slot_b = razor::slot_floats(HS) * 4, reserve = 2 * 2 * 64;
  const std::size_t full_row = (N + T) * tb, min_row = (4 + T) * tb + slot_b;
  auto run = [&](std::size_t bytes, const std::vector<std::int32_t>& prot) {
    auto p = std::make_unique<RazorPolicy>(c, be, razor::Settings{4, prot, {}});
    p->begin(SequenceInfo{1, N, 4, T}, KVBudget{1.0, bytes});
    return p;
  };
  // Room for one protected head and three minimal others, not two protected.
  const std::size_t one = reserve + full_row + 3 * min_row + 10;
  auto p = run(one, {3, 1});
  BOOST_TEST(p->demoted() == 1);
  BOOST_TEST(p->protected_now() == std::vector<std::int32_t>{3}, boost::test_tools::per_element());
  BOOST_TEST(p->meta().at("razor_protected_heads") == "l1h1");
  BOOST_TEST(p->meta().at("razor_demoted_heads") == "1");
  BOOST_TEST(!p->infeasible());
  auto q = run(reserve + full_row + 3 * min_row + 10 + full_row, {3, 1});
  BOOST_TEST(q->demoted() == 0);
  auto r = run(reserve + 4 * min_row - 1, {3, 1});
  BOOST_TEST(r->infeasible());
  BOOST_TEST(r->demoted() == 2);
  auto s = run(reserve + 4 * min_row, {});
  BOOST_TEST(!s->infeasible());
  BOOST_TEST(s->row_slots() == 4 + T);
}

namespace {

std::unique_ptr<Transformer> model(const ModelConfig& c, std::uint64_t seed);

}  // namespace

// Query-agnostic protocol: begin() plans with the decode slots only; when the
// context arrives alone, the question's tokens take recent slots. A budget
// that fits the minimum for one prefill call then leaves no room for them:
// the policy reports infeasible (recent clamped at 0), not a budget it missed
// silently; with room for the question it stays feasible and within budget.
BOOST_AUTO_TEST_CASE(query_agnostic_question_slots) {
  const ModelConfig c = one_layer(2);
  auto m = model(c, 5);
  const std::int64_t N = 40, T = 2, q = 10, HS = c.head_size();
  const std::size_t tb = 2 * HS * 4, slot_b = razor::slot_floats(HS) * 4, reserve = 2 * 2 * 64;
  std::vector<std::int32_t> ctx(static_cast<std::size_t>(N - q)), question(static_cast<std::size_t>(q));
  for (std::size_t i = 0; i < ctx.size(); ++i) ctx[i] = static_cast<std::int32_t>(1 + i % 30);
  for (std::size_t i = 0; i < question.size(); ++i) question[i] = static_cast<std::int32_t>(2 + i);
  for (std::int64_t extra : {0, 12}) {
    BOOST_TEST_CONTEXT("recent slots beyond the minimum: " << extra) {
      RazorPolicy p(c, cpu_backend(), razor::Settings{4, {}, {}});
      p.begin(SequenceInfo{1, N, 0, T}, KVBudget{1.0, reserve + 4 * ((4 + T + extra) * tb + slot_b)});
      BOOST_TEST(!p.infeasible());  // as planned at begin()
      testing::prefill_context(*m, p, ctx, 1, 1);
      const auto a = testing::answer_question(*m, p, question, 1, N - q, T);
      BOOST_TEST(a.infeasible == (extra < q));
      BOOST_TEST(p.recent() == std::max<std::int64_t>(extra - q, 0));
      if (extra >= q) BOOST_TEST(a.achieved <= a.requested);
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

// The calibration runs the model on the repeated random segment through the
// Backend; every score is a probability mass in [0, 1] and the run's cost is
// recorded. Then the policy decodes on the model within its budget, keeps its
// meta, and passes the reuse protocol's contract.
BOOST_AUTO_TEST_CASE(calibration_on_a_model_and_budgets_met) {
  const ModelConfig c = one_layer(2);
  auto m = model(c, 3);
  const auto toks = razor::calibration_tokens(c.vocab, 16, 4, 9);
  BOOST_TEST(toks.size() == 64u);
  BOOST_TEST((std::vector<std::int32_t>(toks.begin(), toks.begin() + 16) == std::vector<std::int32_t>(toks.begin() + 48, toks.end())));
  const razor::HeadScores s = razor::calibrate(*m, 16, 4, 9);
  BOOST_TEST(s.tokens == 64);
  BOOST_TEST(s.flops > 0);
  BOOST_TEST(s.echo.size() == 4u);
  for (std::size_t i = 0; i < 4; ++i) {
    BOOST_TEST((s.echo[i] >= 0 && s.echo[i] <= 1 + 1e-9));
    BOOST_TEST((s.induction[i] >= 0 && s.induction[i] <= 1 + 1e-9));
  }
  const auto prot = razor::protected_heads(s, 0.14, 0.01);
  BOOST_TEST((prot.size() == 1u || prot.size() == 2u));
  const std::int64_t N = 48, T = 4;
  Rng rng(11, 3);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(N));
  for (auto& t : prompt) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab)));
  for (double f : {0.2, 0.3, 0.5, 0.9}) {
    BOOST_TEST_CONTEXT("fraction " << f) {
      RazorPolicy p(c, cpu_backend(), razor::Settings{4, prot, {}});
      p.begin(SequenceInfo{1, N, 6, T}, KVBudget{f, 0});
      const auto a = testing::answer_question(*m, p, prompt, 1, 0, T);
      BOOST_TEST(!a.infeasible);
      BOOST_TEST(a.achieved <= a.requested);
      BOOST_TEST(a.mem.resident_after_prefill <= a.requested);
      BOOST_TEST(a.mem.peak_prefill >= a.mem.resident_after_prefill);
      BOOST_TEST(a.mem.read_per_step > 0u);
      BOOST_TEST(p.recent() >= 0);
    }
  }
  // The reuse protocol: compress the context once, answer two questions.
  std::vector<std::int32_t> ctx(prompt.begin(), prompt.begin() + 40), q1(prompt.begin() + 40, prompt.end()), q2(q1);
  std::reverse(q2.begin(), q2.end());
  testing::check_snapshot_reuse(
      *m, [&] { return std::make_unique<RazorPolicy>(c, cpu_backend(), razor::Settings{4, prot, {}}); },
      KVBudget{0.5, 0}, 1, ctx, q1, q2, T, 1);
}
