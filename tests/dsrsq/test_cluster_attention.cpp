// SQA cluster attention (src/attention/cluster_attention.hpp):
// - with k_c = m it is dense attention (Backend::attention_fwd/bwd): f64 to
//   1e-12 relative, f32 to fp32 rounding;
// - with k_c < m it equals a brute-force double reference that attends exactly
//   to the plan's chosen keys (the plan's attends() mask, written from the
//   definition), in f64 and f32;
// - its backward matches central finite differences of its own f64 forward
//   with the plan (the choice) held fixed;
// - causality: future keys and values never change a query's output;
// - k-means is deterministic given the seed and Lloyd steps never increase the
//   within-cluster sum of squares; degenerate inputs (n < m, duplicates) work;
// - the token-efficiency statistics equal counts taken from the mask.
#define BOOST_TEST_MODULE dsrsq_cluster_attention
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/reference.hpp"
#include "attention/cluster_attention.hpp"
#include "backend/backend.hpp"

namespace at = dsrsq::attention;
using dsrsq::Shape;
using dsrsq::TensorView;
using ref::IVec;
using ref::Vec;

namespace {

dsrsq::Backend& be() { return dsrsq::cpu_backend(); }

struct Problem {
  std::int64_t B, T, S, NH, HS;
  Vec q, k, v;
  IVec qpos, kpos;
  Shape qs() const { return Shape{B, T, NH, HS}; }
  Shape ks() const { return Shape{B, S, NH, HS}; }
};

// Keys at positions 0..S-1 (optionally shuffled); queries at the last T positions.
Problem make_problem(std::int64_t B, std::int64_t T, std::int64_t S, std::int64_t NH, std::int64_t HS,
                     std::uint64_t seed, bool shuffle_keys = false) {
  dsrsq::Rng rng(seed);
  Problem p{B, T, S, NH, HS, {}, {}, {}, {}, {}};
  p.q = ref::normal<double>(B * T * NH * HS, rng);
  p.k = ref::normal<double>(B * S * NH * HS, rng);
  p.v = ref::normal<double>(B * S * NH * HS, rng);
  for (std::int64_t b = 0; b < B; ++b) {
    IVec kp(static_cast<std::size_t>(S));
    for (std::int64_t j = 0; j < S; ++j) kp[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(j);
    if (shuffle_keys) ref::shuffle(kp, rng);
    p.kpos.insert(p.kpos.end(), kp.begin(), kp.end());
    for (std::int64_t i = 0; i < T; ++i) p.qpos.push_back(static_cast<std::int32_t>(S - T + i));
  }
  return p;
}

template <class T>
std::vector<T> cast(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
at::ClusterPlan plan_of(Problem& p, const at::ClusterAttentionConfig& cfg) {
  std::vector<T> q = cast<T>(p.q), k = cast<T>(p.k);
  return at::cluster_plan(TensorView(q.data(), p.qs()), TensorView(k.data(), p.ks()),
                          TensorView(p.qpos.data(), Shape{p.B, p.T}), TensorView(p.kpos.data(), Shape{p.B, p.S}), cfg);
}

struct Out {
  Vec o, lse;
};
template <class T>
Out cluster_fwd(Problem& p, const at::ClusterPlan& plan) {
  std::vector<T> q = cast<T>(p.q), k = cast<T>(p.k), v = cast<T>(p.v);
  std::vector<T> o(q.size()), lse(static_cast<std::size_t>(p.B * p.NH * p.T));
  at::cluster_attention_fwd(be(), plan,
                            {TensorView(q.data(), p.qs()), TensorView(k.data(), p.ks()), TensorView(v.data(), p.ks()),
                             TensorView(o.data(), p.qs()), TensorView(lse.data(), Shape{p.B, p.NH, p.T}),
                             TensorView(p.qpos.data(), Shape{p.B, p.T}), TensorView(p.kpos.data(), Shape{p.B, p.S})});
  return {Vec(o.begin(), o.end()), Vec(lse.begin(), lse.end())};
}
template <class T>
Out dense_fwd(Problem& p, bool causal) {
  std::vector<T> q = cast<T>(p.q), k = cast<T>(p.k), v = cast<T>(p.v);
  std::vector<T> o(q.size()), lse(static_cast<std::size_t>(p.B * p.NH * p.T));
  be().attention_fwd({TensorView(q.data(), p.qs()), TensorView(k.data(), p.ks()), TensorView(v.data(), p.ks()),
                      TensorView(o.data(), p.qs()), TensorView(lse.data(), Shape{p.B, p.NH, p.T}),
                      TensorView(p.qpos.data(), Shape{p.B, p.T}), TensorView(p.kpos.data(), Shape{p.B, p.S}), causal});
  return {Vec(o.begin(), o.end()), Vec(lse.begin(), lse.end())};
}

// Gradients (dq, dk, dv) for dL/do = G, from zeroed buffers.
struct Grads {
  Vec dq, dk, dv;
};
template <class T>
Grads cluster_bwd(Problem& p, const at::ClusterPlan& plan, const Vec& G) {
  const Out f = cluster_fwd<T>(p, plan);
  std::vector<T> q = cast<T>(p.q), k = cast<T>(p.k), v = cast<T>(p.v), o = cast<T>(f.o), lse = cast<T>(f.lse),
                 g = cast<T>(G);
  std::vector<T> dq(q.size(), T(0)), dk(k.size(), T(0)), dv(v.size(), T(0));
  at::cluster_attention_bwd(be(), plan,
                            {TensorView(g.data(), p.qs()), TensorView(q.data(), p.qs()), TensorView(k.data(), p.ks()),
                             TensorView(v.data(), p.ks()), TensorView(o.data(), p.qs()),
                             TensorView(lse.data(), Shape{p.B, p.NH, p.T}), TensorView(p.qpos.data(), Shape{p.B, p.T}),
                             TensorView(p.kpos.data(), Shape{p.B, p.S}), TensorView(dq.data(), p.qs()),
                             TensorView(dk.data(), p.ks()), TensorView(dv.data(), p.ks())});
  return {Vec(dq.begin(), dq.end()), Vec(dk.begin(), dk.end()), Vec(dv.begin(), dv.end())};
}
template <class T>
Grads dense_bwd(Problem& p, const Vec& G, bool causal) {
  const Out f = dense_fwd<T>(p, causal);
  std::vector<T> q = cast<T>(p.q), k = cast<T>(p.k), v = cast<T>(p.v), o = cast<T>(f.o), lse = cast<T>(f.lse),
                 g = cast<T>(G);
  std::vector<T> dq(q.size(), T(0)), dk(k.size(), T(0)), dv(v.size(), T(0));
  be().attention_bwd({TensorView(g.data(), p.qs()), TensorView(q.data(), p.qs()), TensorView(k.data(), p.ks()),
                      TensorView(v.data(), p.ks()), TensorView(o.data(), p.qs()),
                      TensorView(lse.data(), Shape{p.B, p.NH, p.T}), TensorView(p.qpos.data(), Shape{p.B, p.T}),
                      TensorView(p.kpos.data(), Shape{p.B, p.S}), TensorView(dq.data(), p.qs()),
                      TensorView(dk.data(), p.ks()), TensorView(dv.data(), p.ks()), causal});
  return {Vec(dq.begin(), dq.end()), Vec(dk.begin(), dk.end()), Vec(dv.begin(), dv.end())};
}

// Brute-force double reference: softmax over exactly the keys plan.attends() allows.
Out masked_reference(const Problem& p, const at::ClusterPlan& plan) {
  Out r{Vec(p.q.size(), 0.0), Vec(static_cast<std::size_t>(p.B * p.NH * p.T))};
  const double scale = 1.0 / std::sqrt(double(p.HS));
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < p.NH; ++h)
      for (std::int64_t i = 0; i < p.T; ++i) {
        std::vector<std::pair<std::int64_t, double>> sc;
        for (std::int64_t j = 0; j < p.S; ++j) {
          if (!plan.attends(b, h, i, j, p.qpos.data(), p.kpos.data())) continue;
          double d = 0;
          for (std::int64_t c = 0; c < p.HS; ++c)
            d += p.q[static_cast<std::size_t>(((b * p.T + i) * p.NH + h) * p.HS + c)] *
                 p.k[static_cast<std::size_t>(((b * p.S + j) * p.NH + h) * p.HS + c)];
          sc.emplace_back(j, d * scale);
        }
        double& lse = r.lse[static_cast<std::size_t>((b * p.NH + h) * p.T + i)];
        if (sc.empty()) {
          lse = -std::numeric_limits<double>::infinity();
          continue;
        }
        double mx = sc[0].second;
        for (const auto& e : sc) mx = std::max(mx, e.second);
        double sum = 0;
        for (const auto& e : sc) sum += std::exp(e.second - mx);
        lse = mx + std::log(sum);
        for (const auto& e : sc)
          for (std::int64_t c = 0; c < p.HS; ++c)
            r.o[static_cast<std::size_t>(((b * p.T + i) * p.NH + h) * p.HS + c)] +=
                std::exp(e.second - lse) * p.v[static_cast<std::size_t>(((b * p.S + e.first) * p.NH + h) * p.HS + c)];
      }
  return r;
}

// rel_err on lse that treats matching -inf entries as equal.
double lse_err(const Vec& got, const Vec& want) {
  Vec g, w;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (got[i] != want[i]) return std::numeric_limits<double>::infinity();
      continue;
    }
    g.push_back(got[i]);
    w.push_back(want[i]);
  }
  return ref::rel_err(g, w);
}

struct Case {
  const char* what;
  std::int64_t B, T, S, NH, HS, m;
  bool causal, shuffle;
};

}  // namespace

// k_c = m: dense attention, forward and backward, f64 and f32.
BOOST_AUTO_TEST_CASE(all_clusters_equals_dense) {
  const Case cases[] = {
      {"prefill", 2, 37, 37, 2, 16, 4, true, false},
      {"queries at the end", 1, 5, 70, 3, 8, 6, true, false},
      {"non-causal", 2, 9, 23, 2, 8, 5, false, false},
      {"shuffled key positions", 2, 20, 50, 2, 8, 4, true, true},
      {"more clusters than keys", 1, 11, 11, 2, 4, 16, true, false},
      {"long, several tiles", 1, 150, 300, 1, 16, 8, true, false},
  };
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT(c.what) {
      Problem p = make_problem(c.B, c.T, c.S, c.NH, c.HS, 100 + c.T, c.shuffle);
      at::ClusterAttentionConfig cfg;
      cfg.clusters = c.m;
      cfg.top_clusters = c.m;
      cfg.causal = c.causal;
      cfg.seed = 7;
      const at::ClusterPlan plan = plan_of<double>(p, cfg);
      BOOST_TEST(plan.stats.key_fraction() == 1.0);
      const Out got = cluster_fwd<double>(p, plan), want = dense_fwd<double>(p, c.causal);
      BOOST_TEST(ref::rel_err(got.o, want.o) < 1e-12);
      BOOST_TEST(lse_err(got.lse, want.lse) < 1e-12);
      dsrsq::Rng rng(5);
      const Vec G = ref::normal<double>(static_cast<std::int64_t>(p.q.size()), rng);
      const Grads gg = cluster_bwd<double>(p, plan, G), gw = dense_bwd<double>(p, G, c.causal);
      BOOST_TEST(ref::rel_err(gg.dq, gw.dq) < 1e-12);
      BOOST_TEST(ref::rel_err(gg.dk, gw.dk) < 1e-12);
      BOOST_TEST(ref::rel_err(gg.dv, gw.dv) < 1e-12);
      // f32: plan from f32 keys (same choice: all clusters), compared with the f32 dense kernel.
      const at::ClusterPlan plan32 = plan_of<float>(p, cfg);
      const Out g32 = cluster_fwd<float>(p, plan32), w32 = dense_fwd<float>(p, c.causal);
      // Two f32 paths, summation order only (u = 2^-24, kappa = 1 for the L2
      // error over all rows). Forward per path: scores (HS), expf (2), softmax
      // sum and P V over <= S keys (2S), <= 3 roundings per online merge of m
      // clusters: n_f = HS + 2 + 2S + 3m; two paths: 2 n_f u (2.5e-5 at S = 70,
      // 7.6e-5 at S = 300). The old 2e-6 (34 u) was below it for every case.
      // Backward per path: P recomputed (n_f), dP = dO V and D = rowsum(dO o)
      // (2 HS), dS = P (dP - D) (cancellation: kappa 2), dq over S keys, dk /
      // dv over T queries: n_b = 2 (n_f + 2 HS + S + T); two paths 2 n_b u.
      // A wrong cluster mask moves o by > 1e-3 (checked in the k_c < m case).
      const double u = 0x1p-24, n_f = c.HS + 2 + 2.0 * c.S + 3.0 * c.m, n_b = 2 * (n_f + 2.0 * c.HS + c.S + c.T);
      BOOST_TEST(ref::rel_err(g32.o, w32.o) < 2 * n_f * u);
      BOOST_TEST(lse_err(g32.lse, w32.lse) < 2 * n_f * u);
      const Grads g32b = cluster_bwd<float>(p, plan32, G), w32b = dense_bwd<float>(p, G, c.causal);
      BOOST_TEST(ref::rel_err(g32b.dq, w32b.dq) < 2 * n_b * u);
      BOOST_TEST(ref::rel_err(g32b.dk, w32b.dk) < 2 * n_b * u);
      BOOST_TEST(ref::rel_err(g32b.dv, w32b.dv) < 2 * n_b * u);
    }
  }
}

// k_c < m: exactly the chosen keys, against the brute-force masked reference.
BOOST_AUTO_TEST_CASE(top_clusters_equals_masked_reference) {
  const Case cases[] = {
      {"prefill", 2, 64, 64, 2, 16, 8, true, false},
      {"queries at the end", 1, 7, 120, 2, 8, 8, true, false},
      {"non-causal", 1, 17, 40, 2, 8, 6, false, false},
      {"shuffled key positions", 1, 30, 90, 2, 8, 6, true, true},
  };
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT(c.what) {
      Problem p = make_problem(c.B, c.T, c.S, c.NH, c.HS, 200 + c.T, c.shuffle);
      at::ClusterAttentionConfig cfg;
      cfg.clusters = c.m;
      cfg.top_clusters = 2;
      cfg.causal = c.causal;
      const at::ClusterPlan plan = plan_of<double>(p, cfg);
      // Statistics from the mask, counted here.
      std::int64_t att = 0, vis = 0, chosen = 0;
      for (std::int64_t b = 0; b < p.B; ++b)
        for (std::int64_t h = 0; h < p.NH; ++h)
          for (std::int64_t i = 0; i < p.T; ++i) {
            const std::int32_t* ch = plan.chosen_of(b, h, i);
            for (std::int64_t r = 0; r < plan.kc; ++r) {
              chosen += ch[r] >= 0;
              if (ch[r] < 0) continue;
              // Every chosen cluster holds at least one visible key (eligibility).
              bool any = false;
              for (std::int64_t j = 0; j < p.S; ++j)
                any = any || (plan.cluster_of(b, h, j) == ch[r] &&
                              (!c.causal || p.kpos[static_cast<std::size_t>(b * p.S + j)] <=
                                                p.qpos[static_cast<std::size_t>(b * p.T + i)]));
              BOOST_TEST(any);
            }
            for (std::int64_t j = 0; j < p.S; ++j) {
              att += plan.attends(b, h, i, j, p.qpos.data(), p.kpos.data());
              vis += !c.causal || p.kpos[static_cast<std::size_t>(b * p.S + j)] <=
                                      p.qpos[static_cast<std::size_t>(b * p.T + i)];
            }
          }
      BOOST_TEST(plan.stats.attended_pairs == att);
      BOOST_TEST(plan.stats.visible_pairs == vis);
      BOOST_TEST(plan.stats.chosen_clusters == chosen);
      BOOST_TEST(plan.stats.key_fraction() < 0.9);  // sparse for real
      BOOST_TEST(plan.stats.active_cluster_fraction(plan.m) <= 2.0 / double(c.m) + 1e-15);
      BOOST_TEST_MESSAGE(c.what << ": key fraction " << plan.stats.key_fraction() << ", active cluster fraction "
                                << plan.stats.active_cluster_fraction(plan.m));
      const Out want = masked_reference(p, plan);
      const Out got = cluster_fwd<double>(p, plan);
      BOOST_TEST(ref::rel_err(got.o, want.o) < 1e-12);
      BOOST_TEST(lse_err(got.lse, want.lse) < 1e-12);
      // The sparse output really differs from dense (the test can tell them apart).
      BOOST_TEST(ref::rel_err(got.o, dense_fwd<double>(p, c.causal).o) > 1e-3);
      const Out got32 = cluster_fwd<float>(p, plan);
      // One f32 path against the exact (double) reference: n_f = HS + 2 + 2S +
      // 3m roundings (see all_clusters_equals_dense), u = 2^-24, kappa = 1.
      const double u = 0x1p-24, n_f = c.HS + 2 + 2.0 * c.S + 3.0 * c.m;
      BOOST_TEST(ref::rel_err(got32.o, want.o) < n_f * u);
      BOOST_TEST(lse_err(got32.lse, want.lse) < n_f * u);
    }
  }
}

// Backward with the choice fixed: central finite differences in f64.
BOOST_AUTO_TEST_CASE(gradient_matches_finite_differences) {
  for (const bool causal : {true, false}) {
    BOOST_TEST_CONTEXT("causal " << causal) {
      Problem p = make_problem(1, 12, 14, 2, 4, causal ? 301 : 302, true);
      at::ClusterAttentionConfig cfg;
      cfg.clusters = 4;
      cfg.top_clusters = 2;
      cfg.causal = causal;
      const at::ClusterPlan plan = plan_of<double>(p, cfg);
      BOOST_TEST_REQUIRE(plan.stats.key_fraction() < 0.95);
      dsrsq::Rng rng(9);
      const Vec G = ref::normal<double>(static_cast<std::int64_t>(p.q.size()), rng);
      const Grads g = cluster_bwd<double>(p, plan, G);
      auto loss = [&] {
        const Out f = cluster_fwd<double>(p, plan);
        double s = 0;
        for (std::size_t i = 0; i < G.size(); ++i) s += G[i] * f.o[i];
        return s;
      };
      auto fd = [&](Vec& x) {
        Vec num(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) {
          const double x0 = x[i];
          x[i] = x0 + 1e-5;
          const double lp = loss();
          x[i] = x0 - 1e-5;
          const double lm = loss();
          x[i] = x0;
          num[i] = (lp - lm) / 2e-5;
        }
        return num;
      };
      BOOST_TEST(ref::rel_err(g.dq, fd(p.q)) < 1e-7);
      BOOST_TEST(ref::rel_err(g.dk, fd(p.k)) < 1e-7);
      BOOST_TEST(ref::rel_err(g.dv, fd(p.v)) < 1e-7);
      // Accumulation: a second backward into the same buffers adds.
      const Grads g2 = cluster_bwd<double>(p, plan, G);
      BOOST_TEST(ref::rel_err(g2.dq, g.dq) < 1e-15);
    }
  }
}

// Future keys/values never contribute to a query's output.
BOOST_AUTO_TEST_CASE(causal_mask_respected) {
  Problem p = make_problem(2, 48, 48, 2, 8, 401, true);
  at::ClusterAttentionConfig cfg;
  cfg.clusters = 6;
  cfg.top_clusters = 2;
  const at::ClusterPlan plan = plan_of<double>(p, cfg);
  const Out base = cluster_fwd<double>(p, plan);
  for (const std::int32_t cut : {0, 5, 23, 40}) {
    BOOST_TEST_CONTEXT("cut " << cut) {
      Problem q = p;
      for (std::int64_t b = 0; b < p.B; ++b)
        for (std::int64_t j = 0; j < p.S; ++j) {
          if (p.kpos[static_cast<std::size_t>(b * p.S + j)] <= cut) continue;
          for (std::int64_t h = 0; h < p.NH; ++h)
            for (std::int64_t c = 0; c < p.HS; ++c) {
              const auto u = static_cast<std::size_t>(((b * p.S + j) * p.NH + h) * p.HS + c);
              q.k[u] = 50.0 * (c % 2 ? 1 : -1);  // would dominate any softmax it entered
              q.v[u] = 1e3;
            }
        }
      const Out pert = cluster_fwd<double>(q, plan);  // plan (choice) held fixed
      double diff_past = 0, diff_future = 0;
      for (std::int64_t b = 0; b < p.B; ++b)
        for (std::int64_t i = 0; i < p.T; ++i) {
          const bool past = p.qpos[static_cast<std::size_t>(b * p.T + i)] <= cut;
          for (std::int64_t h = 0; h < p.NH; ++h)
            for (std::int64_t c = 0; c < p.HS; ++c) {
              const auto u = static_cast<std::size_t>(((b * p.T + i) * p.NH + h) * p.HS + c);
              (past ? diff_past : diff_future) = std::max(past ? diff_past : diff_future, std::abs(pert.o[u] - base.o[u]));
            }
        }
      BOOST_TEST(diff_past == 0.0);
      if (cut < 40) BOOST_TEST(diff_future > 1.0);  // the perturbation is visible to later queries
    }
  }
  // Perturbing only future VALUES leaves the keys, hence the plan, unchanged: re-planning gives the same output.
  Problem q = p;
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t j = 0; j < p.S; ++j)
      if (p.kpos[static_cast<std::size_t>(b * p.S + j)] > 30)
        for (std::int64_t t = 0; t < p.NH * p.HS; ++t) q.v[static_cast<std::size_t>((b * p.S + j) * p.NH * p.HS + t)] = -7.0;
  const at::ClusterPlan plan2 = plan_of<double>(q, cfg);
  BOOST_TEST((plan2.chosen == plan.chosen));
  const Out pert = cluster_fwd<double>(q, plan2);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t i = 0; i < p.T; ++i)
      if (p.qpos[static_cast<std::size_t>(b * p.T + i)] <= 30)
        for (std::int64_t t = 0; t < p.NH * p.HS; ++t) {
          const auto u = static_cast<std::size_t>((b * p.T + i) * p.NH * p.HS + t);
          BOOST_TEST(pert.o[u] == base.o[u]);
        }
  // Every query sees at least its own-position key's cluster: no row is empty.
  for (const double l : base.lse) BOOST_TEST(std::isfinite(l));
}

BOOST_AUTO_TEST_CASE(kmeans_deterministic_and_monotone) {
  dsrsq::Rng data_rng(501);
  for (int trial = 0; trial < 40; ++trial) {
    const std::int64_t n = 5 + static_cast<std::int64_t>(data_rng.below(200));
    const std::int64_t d = 1 + static_cast<std::int64_t>(data_rng.below(8));
    const std::int64_t m = 1 + static_cast<std::int64_t>(data_rng.below(20));
    Vec x = ref::normal<double>(n * d, data_rng);
    if (trial % 4 == 1)  // duplicated points: ties and empty clusters
      for (std::int64_t i = n / 2; i < n; ++i)
        for (std::int64_t t = 0; t < d; ++t) x[static_cast<std::size_t>(i * d + t)] = x[static_cast<std::size_t>((i % 3) * d + t)];
    BOOST_TEST_CONTEXT("trial " << trial << " n=" << n << " d=" << d << " m=" << m) {
      dsrsq::Rng r1(77, static_cast<std::uint64_t>(trial)), r2(77, static_cast<std::uint64_t>(trial));
      const at::KMeansResult a = at::kmeans(x.data(), n, d, m, 6, r1);
      const at::KMeansResult b = at::kmeans(x.data(), n, d, m, 6, r2);
      BOOST_TEST((a.assign == b.assign));
      BOOST_TEST((a.centroids == b.centroids));
      BOOST_TEST(a.wcss_history.size() == 8u);
      for (std::size_t s = 1; s < a.wcss_history.size(); ++s)
        BOOST_TEST(a.wcss_history[s] <= a.wcss_history[s - 1] * (1 + 1e-12) + 1e-12);
      BOOST_TEST(std::abs(a.wcss() - at::kmeans_wcss(x.data(), n, d, a.centroids, a.assign)) <= 1e-9 * (1 + a.wcss()));
      std::int64_t total = 0;
      for (std::int64_t c = 0; c < m; ++c) total += a.sizes[static_cast<std::size_t>(c)];
      BOOST_TEST(total == n);
      for (const auto c : a.assign) BOOST_TEST((c >= 0 && c < m));
      // Assignment is nearest-centroid (up to the final mean update, which cannot hurt).
      if (m >= n && trial % 4 != 1) BOOST_TEST(a.wcss() == 0.0);  // every point its own centre
    }
  }
  // Lloyd steps strictly improve a k-means++ start on unstructured data.
  Vec x = ref::normal<double>(400 * 3, data_rng);
  dsrsq::Rng r(3);
  const at::KMeansResult km = at::kmeans(x.data(), 400, 3, 8, 5, r);
  BOOST_TEST(km.wcss_history.back() < 0.95 * km.wcss_history.front());
  // A different seed gives a different initialisation (the seed is used).
  dsrsq::Rng ra(1), rb(2);
  BOOST_TEST((at::kmeans(x.data(), 400, 3, 8, 0, ra).assign != at::kmeans(x.data(), 400, 3, 8, 0, rb).assign));
  // Plans are deterministic given the config seed.
  Problem p = make_problem(1, 16, 40, 2, 8, 601);
  at::ClusterAttentionConfig cfg;
  cfg.clusters = 5;
  cfg.top_clusters = 2;
  const at::ClusterPlan p1 = plan_of<double>(p, cfg), p2 = plan_of<double>(p, cfg);
  BOOST_TEST((p1.assign == p2.assign));
  BOOST_TEST((p1.chosen == p2.chosen));
  BOOST_TEST((p1.centroids == p2.centroids));
}

BOOST_AUTO_TEST_CASE(input_errors) {
  Problem p = make_problem(1, 4, 6, 1, 4, 701);
  at::ClusterAttentionConfig cfg;
  cfg.clusters = 0;
  BOOST_CHECK_THROW(plan_of<double>(p, cfg), std::exception);
  cfg.clusters = 2;
  p.kpos[0] = (1 << 30) - 1;  // reserved for padding
  BOOST_CHECK_THROW(plan_of<double>(p, cfg), std::exception);
}
