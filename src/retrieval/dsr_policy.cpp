// DSR selection and budget policies: Gumbel-top-k, exact Plackett-Luce
// log-probability and gradient, moving-average baseline, PPO clipped surrogate,
// Gaussian-logit budget head. Formulas are written in the header.
#include "retrieval/dsr_policy.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dsrsq::retrieval {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double logaddexp(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

std::vector<std::int32_t> ordered_top(const std::vector<double>& v, std::int64_t k) {
  const std::int64_t n = static_cast<std::int64_t>(v.size());
  k = std::clamp<std::int64_t>(k, 0, n);
  std::vector<std::int32_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](std::int32_t a, std::int32_t b) {
    const double va = v[static_cast<std::size_t>(a)], vb = v[static_cast<std::size_t>(b)];
    return va > vb || (va == vb && a < b);
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

// log D_j for every step j (D_j = sum of exp(s) over the items available at
// step j), from the tail: the never-chosen items, then adding the chosen ones
// back in reverse order. Validates the selection.
std::vector<double> step_log_denominators(std::span<const double> s, std::span<const std::int32_t> sel) {
  const std::int64_t n = static_cast<std::int64_t>(s.size()), k = static_cast<std::int64_t>(sel.size());
  DSRSQ_REQUIRE(k <= n, "plackett_luce: selection of ", k, " items from ", n);
  std::vector<char> chosen(static_cast<std::size_t>(n), 0);
  for (const std::int32_t i : sel) {
    DSRSQ_REQUIRE(i >= 0 && i < n, "plackett_luce: index ", i, " out of range [0, ", n, ")");
    DSRSQ_REQUIRE(!chosen[static_cast<std::size_t>(i)], "plackett_luce: index ", i, " selected twice");
    chosen[static_cast<std::size_t>(i)] = 1;
  }
  double mx = kNegInf;
  for (std::int64_t i = 0; i < n; ++i)
    if (!chosen[static_cast<std::size_t>(i)]) mx = std::max(mx, s[static_cast<std::size_t>(i)]);
  double tail = kNegInf;
  if (mx != kNegInf) {
    double sum = 0;
    for (std::int64_t i = 0; i < n; ++i)
      if (!chosen[static_cast<std::size_t>(i)]) sum += std::exp(s[static_cast<std::size_t>(i)] - mx);
    tail = mx + std::log(sum);
  }
  std::vector<double> logD(static_cast<std::size_t>(k));
  for (std::int64_t j = k - 1; j >= 0; --j) {
    tail = logaddexp(tail, s[static_cast<std::size_t>(sel[static_cast<std::size_t>(j)])]);
    logD[static_cast<std::size_t>(j)] = tail;
  }
  return logD;
}

}  // namespace

std::vector<std::int32_t> gumbel_top_k(std::span<const double> scores, std::int64_t k, Rng& rng) {
  std::vector<double> pert(scores.begin(), scores.end());
  for (auto& x : pert) x += rng.gumbel();
  return ordered_top(pert, k);
}

std::vector<std::int32_t> top_k(std::span<const double> scores, std::int64_t k) {
  return ordered_top(std::vector<double>(scores.begin(), scores.end()), k);
}

double plackett_luce_log_prob(std::span<const double> scores, std::span<const std::int32_t> selection) {
  const std::vector<double> logD = step_log_denominators(scores, selection);
  double lp = 0;
  for (std::size_t j = 0; j < selection.size(); ++j)
    lp += scores[static_cast<std::size_t>(selection[j])] - logD[j];
  return lp;
}

double plackett_luce_log_prob_grad(std::span<const double> scores, std::span<const std::int32_t> selection,
                                   std::span<double> grad) {
  DSRSQ_REQUIRE(grad.size() == scores.size(), "plackett_luce_log_prob_grad: grad has ", grad.size(),
                " entries, scores ", scores.size());
  const std::vector<double> logD = step_log_denominators(scores, selection);
  const std::size_t k = selection.size();
  double lp = 0;
  for (std::size_t j = 0; j < k; ++j) lp += scores[static_cast<std::size_t>(selection[j])] - logD[j];
  if (k == 0) {
    std::fill(grad.begin(), grad.end(), 0.0);
    return lp;
  }
  // C_t = sum_{j <= t} exp(logD_t - logD_j) (every term <= 1: D shrinks with j), so
  // sum_{j <= t} softmax_{R_j}(s)_m = exp(s_m - logD_t) C_t for m available at step t.
  std::vector<double> C(k);
  C[0] = 1.0;
  for (std::size_t t = 1; t < k; ++t) C[t] = 1.0 + C[t - 1] * std::exp(logD[t] - logD[t - 1]);
  // Items never chosen are available at every step.
  for (std::size_t m = 0; m < scores.size(); ++m) grad[m] = -std::exp(scores[m] - logD[k - 1]) * C[k - 1];
  for (std::size_t t = 0; t < k; ++t) {
    const std::size_t m = static_cast<std::size_t>(selection[t]);
    grad[m] = 1.0 - std::exp(scores[m] - logD[t]) * C[t];
  }
  return lp;
}

void MovingAverageBaseline::update(double batch_mean_reward) {
  if (!initialized_) {
    value_ = batch_mean_reward;
    initialized_ = true;
  } else {
    value_ = decay_ * value_ + (1.0 - decay_) * batch_mean_reward;
  }
}
void MovingAverageBaseline::update(std::span<const double> rewards) {
  if (rewards.empty()) return;
  update(std::accumulate(rewards.begin(), rewards.end(), 0.0) / static_cast<double>(rewards.size()));
}

double dsr_reward(double task_score, std::int64_t selected, std::int64_t n_context, double lambda) {
  DSRSQ_REQUIRE(n_context > 0, "dsr_reward: empty context");
  return task_score - lambda * static_cast<double>(selected) / static_cast<double>(n_context);
}

PpoTerm ppo_term(double log_prob_new, double log_prob_old, double advantage, double clip) {
  PpoTerm t;
  t.ratio = std::exp(log_prob_new - log_prob_old);
  const double unclipped = t.ratio * advantage;
  if (clip <= 0) {
    t.value = unclipped;
    t.dvalue_dlogp = unclipped;
    return t;
  }
  const double clipped = std::clamp(t.ratio, 1.0 - clip, 1.0 + clip) * advantage;
  if (unclipped <= clipped) {
    t.value = unclipped;
    t.dvalue_dlogp = unclipped;  // d(rho A)/dlogp = rho A
  } else {
    t.value = clipped;  // constant in log p: no gradient
    t.dvalue_dlogp = 0.0;
    t.clipped = true;
  }
  return t;
}

PolicyLoss selection_policy_loss(std::span<const double> scores, std::span<const SelectionSample> samples,
                                 double baseline, double clip) {
  PolicyLoss r;
  r.dloss.assign(scores.size(), 0.0);
  if (samples.empty()) return r;
  const double inv = 1.0 / static_cast<double>(samples.size());
  std::vector<double> g(scores.size());
  std::int64_t nclip = 0;
  for (const auto& smp : samples) {
    const double lp = plackett_luce_log_prob_grad(scores, smp.selection, g);
    const double adv = smp.reward - baseline;
    const PpoTerm t = ppo_term(lp, smp.old_log_prob, adv, clip);
    r.advantages.push_back(adv);
    r.loss -= t.value * inv;
    r.mean_ratio += t.ratio * inv;
    nclip += t.clipped ? 1 : 0;
    if (t.dvalue_dlogp != 0)
      for (std::size_t m = 0; m < g.size(); ++m) r.dloss[m] -= t.dvalue_dlogp * inv * g[m];
  }
  r.clip_fraction = static_cast<double>(nclip) * inv;
  return r;
}

double BudgetHead::mean_logit(std::span<const double> features) const {
  DSRSQ_REQUIRE(features.size() == w.size(), "budget head: ", features.size(), " features, ", w.size(), " weights");
  double z = b;
  for (std::size_t i = 0; i < w.size(); ++i) z += w[i] * features[i];
  return z;
}

std::int64_t budget_from_logit(const BudgetHead& head, double z, std::int64_t n_context) {
  DSRSQ_REQUIRE(n_context >= 1, "budget: empty context");
  const double c = 1.0 / (1.0 + std::exp(-z));
  const double raw = std::round(head.base * (1.0 + head.alpha * c));
  if (!(raw >= 1.0)) return 1;  // also NaN
  if (raw >= static_cast<double>(n_context)) return n_context;
  return static_cast<std::int64_t>(raw);
}

BudgetSample sample_budget(const BudgetHead& head, std::span<const double> features, std::int64_t n_context,
                           Rng* rng) {
  BudgetSample s;
  s.mu = head.mean_logit(features);
  s.z = s.mu;
  if (rng) {
    s.z = s.mu + std::exp(head.log_sigma) * rng->normal();
    s.log_prob = budget_log_prob(head, features, s.z);
  }
  s.complexity = 1.0 / (1.0 + std::exp(-s.z));
  s.budget = budget_from_logit(head, s.z, n_context);
  return s;
}

double budget_log_prob(const BudgetHead& head, std::span<const double> features, double z) {
  const double mu = head.mean_logit(features), sigma = std::exp(head.log_sigma);
  const double u = (z - mu) / sigma;
  return -0.5 * u * u - head.log_sigma - 0.5 * std::log(2.0 * M_PI);
}

void budget_log_prob_grad(const BudgetHead& head, std::span<const double> features, double z, double weight,
                          BudgetGrad& grad) {
  const double mu = head.mean_logit(features), var = std::exp(2.0 * head.log_sigma);
  if (grad.dw.empty()) grad.dw.assign(head.w.size(), 0.0);
  DSRSQ_REQUIRE(grad.dw.size() == head.w.size(), "budget_log_prob_grad: dw has ", grad.dw.size(), " entries");
  const double dmu = (z - mu) / var;
  for (std::size_t i = 0; i < grad.dw.size(); ++i) grad.dw[i] += weight * dmu * features[i];
  grad.db += weight * dmu;
  grad.dlog_sigma += weight * ((z - mu) * (z - mu) / var - 1.0);
}

BudgetLoss budget_policy_loss(const BudgetHead& head, std::span<const BudgetSampleRecord> samples, double baseline,
                              double clip, bool learn_sigma) {
  BudgetLoss r;
  r.dloss.dw.assign(head.w.size(), 0.0);
  if (samples.empty()) return r;
  const double inv = 1.0 / static_cast<double>(samples.size());
  std::int64_t nclip = 0;
  for (const auto& smp : samples) {
    const double lp = budget_log_prob(head, smp.features, smp.z);
    const double adv = smp.reward - baseline;
    const PpoTerm t = ppo_term(lp, smp.old_log_prob, adv, clip);
    r.advantages.push_back(adv);
    r.loss -= t.value * inv;
    nclip += t.clipped ? 1 : 0;
    if (t.dvalue_dlogp != 0) budget_log_prob_grad(head, smp.features, smp.z, -t.dvalue_dlogp * inv, r.dloss);
  }
  if (!learn_sigma) r.dloss.dlog_sigma = 0.0;
  r.clip_fraction = static_cast<double>(nclip) * inv;
  return r;
}

}  // namespace dsrsq::retrieval
