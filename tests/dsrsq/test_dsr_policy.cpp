// DSR sampling math (src/retrieval/dsr_policy.hpp) against independent
// references: the Plackett-Luce log-probability against the direct sequential
// sampling product on every ordered subset of a tiny context; Gumbel-top-k
// frequencies against those probabilities (chi-square); the REINFORCE estimator
// against the exact gradient of the expected reward (enumeration + finite
// differences); the analytic PL gradient against finite differences; variance
// reduction by the moving-average baseline; PPO clipping; the budget head's
// Gaussian-logit policy (log-density, gradient, unbiasedness against the exact
// expected reward from the normal CDF).
//
// Monte Carlo checks use fixed seeds (deterministic results) and bounds of a
// few standard errors; each bound is paired with a check that a wrong answer of
// the kind it guards against falls outside it.
#define BOOST_TEST_MODULE dsrsq_dsr_policy
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "../common/reference.hpp"
#include "retrieval/dsr_policy.hpp"

namespace dr = dsrsq::retrieval;
using ref::Vec;
using Sel = std::vector<std::int32_t>;

namespace {

// All ordered k-subsets of {0..n-1}.
void enumerate(std::int64_t n, std::int64_t k, Sel& cur, std::vector<char>& used, std::vector<Sel>& out) {
  if (static_cast<std::int64_t>(cur.size()) == k) {
    out.push_back(cur);
    return;
  }
  for (std::int32_t i = 0; i < n; ++i) {
    if (used[static_cast<std::size_t>(i)]) continue;
    used[static_cast<std::size_t>(i)] = 1;
    cur.push_back(i);
    enumerate(n, k, cur, used, out);
    cur.pop_back();
    used[static_cast<std::size_t>(i)] = 0;
  }
}
std::vector<Sel> all_ordered(std::int64_t n, std::int64_t k) {
  std::vector<Sel> out;
  Sel cur;
  std::vector<char> used(static_cast<std::size_t>(n), 0);
  enumerate(n, k, cur, used, out);
  return out;
}

// Direct sequential sampling probability: prod_j exp(s_{i_j}) / sum_{available} exp(s).
double direct_prob(const Vec& s, const Sel& sel) {
  std::vector<char> gone(s.size(), 0);
  double p = 1;
  for (const std::int32_t i : sel) {
    double den = 0;
    for (std::size_t m = 0; m < s.size(); ++m)
      if (!gone[m]) den += std::exp(s[m]);
    p *= std::exp(s[static_cast<std::size_t>(i)]) / den;
    gone[static_cast<std::size_t>(i)] = 1;
  }
  return p;
}

double expected_reward(const Vec& s, const std::vector<Sel>& sels, const std::function<double(const Sel&)>& R) {
  double e = 0;
  for (const auto& sel : sels) e += direct_prob(s, sel) * R(sel);
  return e;
}

Vec fd_grad(Vec x, const std::function<double(const Vec&)>& f, double h) {
  Vec g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

struct MeanVar {
  Vec sum, sumsq;
  std::int64_t n = 0;
  explicit MeanVar(std::size_t d) : sum(d, 0.0), sumsq(d, 0.0) {}
  void add(const Vec& x) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      sum[i] += x[i];
      sumsq[i] += x[i] * x[i];
    }
    ++n;
  }
  double mean(std::size_t i) const { return sum[i] / double(n); }
  double var(std::size_t i) const { return sumsq[i] / double(n) - mean(i) * mean(i); }
  double se(std::size_t i) const { return std::sqrt(var(i) / double(n)); }
  double total_var() const {
    double t = 0;
    for (std::size_t i = 0; i < sum.size(); ++i) t += var(i);
    return t;
  }
};

}  // namespace

// (a) exact PL log-probability = direct sequential formula; probabilities sum to 1.
BOOST_AUTO_TEST_CASE(plackett_luce_matches_enumeration) {
  dsrsq::Rng rng(11);
  const Vec s = ref::normal<double>(5, rng, 1.5);
  const auto sels = all_ordered(5, 3);
  BOOST_TEST(sels.size() == 60u);
  double total = 0, max_rel = 0;
  for (const auto& sel : sels) {
    const double lp = dr::plackett_luce_log_prob(s, sel);
    const double p = direct_prob(s, sel);
    max_rel = std::max(max_rel, std::abs(std::exp(lp) - p) / p);
    total += std::exp(lp);
  }
  BOOST_TEST(max_rel < 1e-13);
  BOOST_TEST(std::abs(total - 1.0) < 1e-13);
  // The seed's defect (log_softmax over the selected logits only) is a different
  // quantity: it would not sum to 1 over ordered subsets.
  double wrong_total = 0;
  for (const auto& sel : sels) {
    double den = 0;
    for (const auto i : sel) den += std::exp(s[static_cast<std::size_t>(i)]);
    double lp = 0;
    for (const auto i : sel) lp += s[static_cast<std::size_t>(i)] - std::log(den);
    wrong_total += std::exp(lp);
  }
  BOOST_TEST(std::abs(wrong_total - 1.0) > 0.1);
  // k = N (full permutations) also sums to 1; shift invariance with huge scores.
  double perm_total = 0;
  for (const auto& sel : all_ordered(4, 4)) perm_total += std::exp(dr::plackett_luce_log_prob(Vec(s.begin(), s.begin() + 4), sel));
  BOOST_TEST(std::abs(perm_total - 1.0) < 1e-13);
  Vec shifted = s;
  for (auto& x : shifted) x += 1000.0;
  BOOST_TEST(std::abs(dr::plackett_luce_log_prob(shifted, sels[17]) - dr::plackett_luce_log_prob(s, sels[17])) < 1e-9);
  // Extreme spread: finite and equal to the direct formula in log space.
  const Vec ext{300.0, 0.0, -300.0, 5.0};
  const Sel order{2, 0, 1};  // the least likely item first
  const double lp = dr::plackett_luce_log_prob(ext, order);
  // step 1: -300 - logsumexp(all) = -600 - log(1 + e^-300 + e^-600 + e^-295) ~ -600
  // step 2: 300 - logsumexp(300, 0, 5) ~ 0; step 3: 0 - logsumexp(0, 5) = -log(1 + e^5)
  BOOST_TEST(std::isfinite(lp));
  BOOST_TEST(std::abs(lp - (-600.0 - std::log1p(std::exp(5.0)))) < 1e-9);
  BOOST_CHECK_THROW(dr::plackett_luce_log_prob(s, Sel{1, 1}), std::exception);
  BOOST_CHECK_THROW(dr::plackett_luce_log_prob(s, Sel{5}), std::exception);
}

// (d) analytic gradient of the PL log-probability = finite differences.
BOOST_AUTO_TEST_CASE(plackett_luce_gradient_matches_fd) {
  dsrsq::Rng rng(12);
  for (const std::int64_t k : {1, 3, 4, 7}) {
    const Vec s = ref::normal<double>(7, rng, 2.0);
    const Sel sel = dr::gumbel_top_k(s, k, rng);
    BOOST_TEST_REQUIRE(static_cast<std::int64_t>(sel.size()) == k);
    Vec g(s.size());
    const double lp = dr::plackett_luce_log_prob_grad(s, sel, g);
    BOOST_TEST(std::abs(lp - dr::plackett_luce_log_prob(s, sel)) < 1e-14);
    const Vec num = fd_grad(s, [&](const Vec& x) { return dr::plackett_luce_log_prob(x, sel); }, 1e-5);
    BOOST_TEST_CONTEXT("k=" << k) { BOOST_TEST(ref::rel_err(g, num) < 1e-8); }
    double sum = 0;  // shift invariance: the gradient sums to 0
    for (const double x : g) sum += x;
    BOOST_TEST(std::abs(sum) < 1e-12);
  }
  // A spread of 80: the tail softmax terms underflow gracefully, no NaN.
  const Vec s{40.0, -40.0, 0.0, 39.0, -5.0};
  const Sel sel{1, 0, 4};
  Vec g(s.size());
  dr::plackett_luce_log_prob_grad(s, sel, g);
  const Vec num = fd_grad(s, [&](const Vec& x) { return dr::plackett_luce_log_prob(x, sel); }, 1e-5);
  BOOST_TEST(ref::all_finite(g.data(), 5));
  BOOST_TEST(ref::rel_err(g, num) < 1e-8);
}

// (b) Gumbel-top-k frequencies match exp(PL log-prob): chi-square, 59 dof.
BOOST_AUTO_TEST_CASE(gumbel_top_k_frequencies) {
  dsrsq::Rng srng(13);
  const Vec s = ref::normal<double>(5, srng, 1.0);
  const auto sels = all_ordered(5, 3);
  std::map<Sel, std::int64_t> count;
  dsrsq::Rng rng(14);
  const std::int64_t M = 200000;
  for (std::int64_t t = 0; t < M; ++t) {
    const Sel sel = dr::gumbel_top_k(s, 3, rng);
    ++count[sel];
  }
  auto chi2 = [&](const Vec& scores) {
    double c = 0;
    for (const auto& sel : sels) {
      const double e = double(M) * std::exp(dr::plackett_luce_log_prob(scores, sel));
      const double o = double(count[sel]);
      c += (o - e) * (o - e) / e;
    }
    return c;
  };
  const double dof = 59;
  const double c_true = chi2(s);
  BOOST_TEST_MESSAGE("chi2 = " << c_true << " (dof 59)");
  BOOST_TEST(c_true < dof + 6 * std::sqrt(2 * dof));  // ~124; p-value ~1e-6
  // Power: slightly wrong scores (one shifted by 0.1) are rejected.
  Vec wrong = s;
  wrong[2] += 0.1;
  BOOST_TEST(chi2(wrong) > dof + 6 * std::sqrt(2 * dof));
  // Deterministic given the seed; top_k without noise is the sorted order.
  dsrsq::Rng a(5), b(5);
  BOOST_TEST(dr::gumbel_top_k(s, 3, a) == dr::gumbel_top_k(s, 3, b));
  const Sel tk = dr::top_k(Vec{0.5, 2.0, -1.0, 2.0}, 3);
  BOOST_TEST((tk == Sel{1, 3, 0}));
  BOOST_TEST(dr::gumbel_top_k(s, 9, rng).size() == 5u);  // k clamped to N
}

// (c) + (e): the REINFORCE estimator is unbiased for the exact gradient of the
// expected reward; the moving-average baseline keeps it unbiased and lowers its variance.
BOOST_AUTO_TEST_CASE(reinforce_unbiased_and_baseline_reduces_variance) {
  const std::int64_t N = 6, k = 3;
  const Vec s{0.3, -0.5, 0.8, 0.0, -0.2, 0.4};
  const auto sels = all_ordered(N, k);
  auto R = [](const Sel& sel) {  // items in the target set {1, 4}
    double r = 0;
    for (const auto i : sel) r += (i == 1 || i == 4) ? 1.0 : 0.0;
    return r;
  };
  const Vec truth = fd_grad(s, [&](const Vec& x) { return expected_reward(x, sels, R); }, 1e-5);
  dsrsq::Rng rng(21);
  const std::int64_t M = 60000;
  MeanVar plain(N), based(N);
  dr::MovingAverageBaseline baseline(0.9);
  for (std::int64_t t = 0; t < M; ++t) {
    dr::SelectionSample smp;
    smp.selection = dr::gumbel_top_k(s, k, rng);
    smp.reward = R(smp.selection);
    smp.old_log_prob = dr::plackett_luce_log_prob(s, smp.selection);  // on-policy
    const std::vector<dr::SelectionSample> one{smp};
    const dr::PolicyLoss l0 = dr::selection_policy_loss(s, one, 0.0);
    const dr::PolicyLoss l1 = dr::selection_policy_loss(s, one, baseline.value());
    baseline.update(smp.reward);  // after use: the baseline never sees its own sample
    Vec g0(N), g1(N);
    for (std::int64_t i = 0; i < N; ++i) {
      g0[static_cast<std::size_t>(i)] = -l0.dloss[static_cast<std::size_t>(i)];  // ascent direction
      g1[static_cast<std::size_t>(i)] = -l1.dloss[static_cast<std::size_t>(i)];
    }
    plain.add(g0);
    based.add(g1);
  }
  for (std::int64_t i = 0; i < N; ++i) {
    const auto u = static_cast<std::size_t>(i);
    BOOST_TEST_CONTEXT("score " << i << ": true " << truth[u] << " plain " << plain.mean(u) << " +- " << plain.se(u)
                                << " baseline " << based.mean(u) << " +- " << based.se(u)) {
      BOOST_TEST(std::abs(plain.mean(u) - truth[u]) < 4 * plain.se(u));
      BOOST_TEST(std::abs(based.mean(u) - truth[u]) < 4 * based.se(u));
      // Power: the seed's defective objective (no exact PL) would be off by far more;
      // here: the bound is tight compared with the gradient itself.
      BOOST_TEST(4 * plain.se(u) < 0.25 * std::abs(truth[u]) + 0.02);
    }
  }
  BOOST_TEST_MESSAGE("estimator variance: plain " << plain.total_var() << ", baseline " << based.total_var());
  BOOST_TEST(based.total_var() < 0.8 * plain.total_var());
  // The defect of the reference code (log_softmax over the selected logits only)
  // gives a biased estimator: its mean is far from the truth on this problem.
  dsrsq::Rng rng2(22);
  MeanVar defect(N);
  for (std::int64_t t = 0; t < 20000; ++t) {
    const Sel sel = dr::gumbel_top_k(s, k, rng2);
    double den = 0;
    for (const auto i : sel) den += std::exp(s[static_cast<std::size_t>(i)]);
    Vec g(N, 0.0);
    for (const auto i : sel) {
      g[static_cast<std::size_t>(i)] += 1.0;
      for (const auto j : sel) g[static_cast<std::size_t>(j)] -= std::exp(s[static_cast<std::size_t>(j)]) / den;
    }
    for (auto& x : g) x *= R(sel);
    defect.add(g);
  }
  double worst = 0;
  for (std::int64_t i = 0; i < N; ++i)
    worst = std::max(worst, std::abs(defect.mean(static_cast<std::size_t>(i)) - truth[static_cast<std::size_t>(i)]) /
                                defect.se(static_cast<std::size_t>(i)));
  BOOST_TEST(worst > 10.0);
}

// (f) PPO clip: no gradient outside [0.8, 1.2] in the clipped direction.
BOOST_AUTO_TEST_CASE(ppo_clip) {
  const Vec s{0.2, -0.4, 1.0, 0.5, -1.2};
  const Sel sel{2, 0};
  const double lp = dr::plackett_luce_log_prob(s, sel);
  Vec g(s.size());
  dr::plackett_luce_log_prob_grad(s, sel, g);
  auto loss_of = [&](const Vec& x, double ratio, double adv) {
    const std::vector<dr::SelectionSample> one{{sel, adv, lp - std::log(ratio)}};
    return dr::selection_policy_loss(x, one, 0.0, 0.2);
  };
  auto is_zero = [](const Vec& v) {
    for (const double x : v)
      if (x != 0.0) return false;
    return true;
  };
  struct Case {
    double ratio, adv;
    bool zero;
  };
  for (const Case c : {Case{1.5, 1.0, true}, Case{0.5, -1.0, true}, Case{1.5, -1.0, false}, Case{0.5, 1.0, false},
                       Case{1.1, 1.0, false}, Case{0.9, -1.0, false}, Case{1.0, 2.0, false}}) {
    BOOST_TEST_CONTEXT("ratio " << c.ratio << " advantage " << c.adv) {
      const dr::PolicyLoss l = loss_of(s, c.ratio, c.adv);
      BOOST_TEST(std::abs(l.mean_ratio - c.ratio) < 1e-12);
      BOOST_TEST(is_zero(l.dloss) == c.zero);
      BOOST_TEST((l.clip_fraction == 1.0) == c.zero);
      const double clipped = std::clamp(c.ratio, 0.8, 1.2) * c.adv;
      BOOST_TEST(std::abs(l.loss + std::min(c.ratio * c.adv, clipped)) < 1e-12);
      if (!c.zero) {  // REINFORCE times the ratio
        Vec want(g.size());
        for (std::size_t i = 0; i < g.size(); ++i) want[i] = -c.adv * c.ratio * g[i];
        BOOST_TEST(ref::rel_err(l.dloss, want) < 1e-12);
      }
      // The reported gradient is the derivative of the reported loss (old log p fixed).
      const double old_lp = lp - std::log(c.ratio);
      const Vec num = fd_grad(s, [&](const Vec& x) {
        const std::vector<dr::SelectionSample> one{{sel, c.adv, old_lp}};
        return dr::selection_policy_loss(x, one, 0.0, 0.2).loss;
      }, 1e-6);
      BOOST_TEST(ref::rel_err(l.dloss, num, 1e-3) < 1e-6);
    }
  }
  const dr::PpoTerm t = dr::ppo_term(0.0, std::log(0.5), 1.0, 0.0);  // clip off: plain ratio
  BOOST_TEST(std::abs(t.dvalue_dlogp - 2.0) < 1e-12);
}

BOOST_AUTO_TEST_CASE(baseline_and_reward) {
  dr::MovingAverageBaseline b(0.75);
  BOOST_TEST(b.value() == 0.0);
  b.update(Vec{2.0, 4.0});
  BOOST_TEST(b.value() == 3.0);
  b.update(7.0);
  BOOST_TEST(std::abs(b.value() - (0.75 * 3.0 + 0.25 * 7.0)) < 1e-15);
  BOOST_TEST(std::abs(dr::dsr_reward(0.8, 25, 100, 0.4) - (0.8 - 0.1)) < 1e-15);
}

// Budget head: budget formula, clamp, Gaussian-logit log-density and gradient.
BOOST_AUTO_TEST_CASE(budget_head_formula_and_gradient) {
  dr::BudgetHead h;
  h.w = {0.5, -1.0};
  h.b = 0.1;
  h.log_sigma = std::log(0.7);
  h.base = 512;
  h.alpha = 0.5;
  BOOST_TEST(dr::budget_from_logit(h, 0.0, 100000) == 640);  // 512 * (1 + 0.5 * 0.5)
  BOOST_TEST(dr::budget_from_logit(h, 50.0, 100000) == 768);
  BOOST_TEST(dr::budget_from_logit(h, 50.0, 600) == 600);  // clamp to N
  dr::BudgetHead tiny = h;
  tiny.base = 0.3;
  BOOST_TEST(dr::budget_from_logit(tiny, -50.0, 600) == 1);  // clamp to 1
  const Vec f{0.3, 0.8};
  const dr::BudgetSample det = dr::sample_budget(h, f, 100000, nullptr);
  BOOST_TEST(det.z == h.mean_logit(f));
  BOOST_TEST(det.budget == dr::budget_from_logit(h, det.z, 100000));
  dsrsq::Rng rng(31);
  const dr::BudgetSample smp = dr::sample_budget(h, f, 100000, &rng);
  BOOST_TEST(smp.z != smp.mu);
  const double u = (smp.z - smp.mu) / 0.7;
  BOOST_TEST(std::abs(smp.log_prob - (-0.5 * u * u - std::log(0.7 * std::sqrt(2 * M_PI)))) < 1e-12);
  // Gradient of log p(z) w.r.t. (w, b, log_sigma) against finite differences.
  dr::BudgetGrad g;
  dr::budget_log_prob_grad(h, f, smp.z, 1.0, g);
  Vec theta{h.w[0], h.w[1], h.b, h.log_sigma};
  auto lp_of = [&](const Vec& th) {
    dr::BudgetHead x = h;
    x.w = {th[0], th[1]};
    x.b = th[2];
    x.log_sigma = th[3];
    return dr::budget_log_prob(x, f, smp.z);
  };
  const Vec num = fd_grad(theta, lp_of, 1e-6);
  const Vec ana{g.dw[0], g.dw[1], g.db, g.dlog_sigma};
  BOOST_TEST(ref::rel_err(ana, num) < 1e-8);
}

// Budget policy gradient: unbiased for the exact gradient of the expected reward,
// which is computed from the normal CDF over the budget levels' logit intervals.
BOOST_AUTO_TEST_CASE(budget_policy_gradient_unbiased) {
  dr::BudgetHead h;
  h.w = {0.4, -0.3};
  h.b = 0.2;
  h.log_sigma = std::log(1.2);
  h.base = 10;
  h.alpha = 0.5;  // budgets 10..15
  const std::int64_t N = 100;
  const Vec f{1.0, 0.5};
  auto reward_of = [&](std::int64_t budget) {
    const double task = -0.1 * double((budget - 13) * (budget - 13));
    return dr::dsr_reward(task, budget, N, 0.5);
  };
  // E[R](mu, sigma): budget(z) is non-decreasing; level v covers z in
  // (logit(c_{v-1}), logit(c_v)] with c_v = ((v + 0.5) / base - 1) / alpha.
  auto expected = [&](double mu, double log_sigma) {
    const double sigma = std::exp(log_sigma);
    auto Phi = [&](double z) { return 0.5 * std::erfc(-(z - mu) / (sigma * std::sqrt(2.0))); };
    double e = 0, lo = 0.0;  // Phi(-inf) = 0
    for (std::int64_t v = 10; v <= 15; ++v) {
      const double c = ((double(v) + 0.5) / h.base - 1) / h.alpha;
      const double hi = c >= 1 ? 1.0 : Phi(std::log(c / (1 - c)));
      e += reward_of(v) * (hi - lo);
      lo = hi;
    }
    return e;
  };
  const double mu = h.mean_logit(f);
  const double dmu = (expected(mu + 1e-5, h.log_sigma) - expected(mu - 1e-5, h.log_sigma)) / 2e-5;
  const double dls = (expected(mu, h.log_sigma + 1e-5) - expected(mu, h.log_sigma - 1e-5)) / 2e-5;
  const Vec truth{dmu * f[0], dmu * f[1], dmu, dls};
  dsrsq::Rng rng(32);
  dr::MovingAverageBaseline baseline(0.9);
  MeanVar est(4);
  std::int64_t levels_seen = 0;
  std::vector<char> seen(16, 0);
  for (std::int64_t t = 0; t < 60000; ++t) {
    const dr::BudgetSample s = dr::sample_budget(h, f, N, &rng);
    if (!seen[static_cast<std::size_t>(s.budget)]) ++levels_seen;
    seen[static_cast<std::size_t>(s.budget)] = 1;
    const std::vector<dr::BudgetSampleRecord> one{{f, s.z, reward_of(s.budget), s.log_prob}};
    const dr::BudgetLoss l = dr::budget_policy_loss(h, one, baseline.value(), 0.2, /*learn_sigma=*/true);
    baseline.update(reward_of(s.budget));
    est.add(Vec{-l.dloss.dw[0], -l.dloss.dw[1], -l.dloss.db, -l.dloss.dlog_sigma});
  }
  BOOST_TEST(levels_seen == 6);
  for (std::size_t i = 0; i < 4; ++i)
    BOOST_TEST_CONTEXT("param " << i << ": true " << truth[i] << " estimate " << est.mean(i) << " +- " << est.se(i)) {
      BOOST_TEST(std::abs(est.mean(i) - truth[i]) < 4 * est.se(i));
      BOOST_TEST(4 * est.se(i) < 0.2 * std::abs(truth[i]) + 0.01);  // the bound has power
    }
}
