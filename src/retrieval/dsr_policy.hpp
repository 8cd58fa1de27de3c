#pragma once
// DSR sampling math (DESIGN.md section 8, ALGORITHMS.md 13.1): the retriever's
// selection policy and the budget policy, with exact log-probabilities and
// gradients, for REINFORCE / PPO training. Everything here is f64 on the CPU and
// independent of the model: the caller turns d(loss)/d(scores) into parameter
// gradients through its own scorer.
//
// Selection policy. Scores s_1..s_N (finite). Sampling: Gumbel-top-k, i.e. take
// the k largest s_i + G_i (G_i iid standard Gumbel), in decreasing order. The
// ordered selection (i_1..i_k) then has the Plackett-Luce probability
//   log p = sum_j [ s_{i_j} - logsumexp(s over items not among i_1..i_{j-1}) ]
// (the reference code's log_softmax over the selected logits is NOT this).
// Its gradient: d log p / d s_m = sum_j [ 1{m = i_j} - 1{m in R_j} softmax_{R_j}(s)_m ],
// R_j = items still available at step j.
//
// Estimator (ascent on J, reported as a loss to minimise, L = -J):
//   advantage A_n = reward_n - baseline (the baseline BEFORE this batch's update;
//   a moving average b <- decay b + (1 - decay) mean(rewards) is updated after),
//   ratio rho_n = exp(log p_new - log p_old),
//   J = mean_n min(rho_n A_n, clip(rho_n, 1 - eps, 1 + eps) A_n),   eps = 0.2;
//   dJ/d(log p_new) = A_n rho_n where the unclipped term is the minimum, else 0.
// On-policy (log p_old = log p_new) the gradient is REINFORCE: mean A_n grad log p_n.
//
// Budget policy. A linear head on query features gives a logit mean
// mu = w . f + b. During training the logit is SAMPLED, z ~ N(mu, sigma^2),
// sigma = exp(log_sigma) (learned or fixed); at inference z = mu. Then
//   c = sigmoid(z), budget = clamp(round(base * (1 + alpha * c)), 1, N).
// The budget is a deterministic function of z, so REINFORCE on the exact
// Gaussian log-density of z is an unbiased gradient of E[reward(budget)]:
//   log p(z) = -(z - mu)^2 / (2 sigma^2) - log sigma - log(2 pi)/2,
//   d/dmu = (z - mu) / sigma^2   (so d/dw = that * f, d/db = that),
//   d/dlog_sigma = (z - mu)^2 / sigma^2 - 1.
// Reward of one query: task_score - lambda * selected / N.
#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.hpp"

namespace dsrsq::retrieval {

// ---- selection policy -------------------------------------------------------
// Ordered Gumbel-top-k sample of min(k, N) distinct indices (ties of the
// perturbed scores: lower index first).
std::vector<std::int32_t> gumbel_top_k(std::span<const double> scores, std::int64_t k, Rng& rng);
// Deterministic top-k (inference): the same order rule without noise.
std::vector<std::int32_t> top_k(std::span<const double> scores, std::int64_t k);

// Exact Plackett-Luce log-probability of an ordered selection (distinct indices).
double plackett_luce_log_prob(std::span<const double> scores, std::span<const std::int32_t> selection);
// Same, and grad = d log p / d scores (size N, overwritten). O(N + k).
double plackett_luce_log_prob_grad(std::span<const double> scores, std::span<const std::int32_t> selection,
                                   std::span<double> grad);

// ---- baseline ------------------------------------------------------------------
// Exponential moving average of rewards. value() is 0 until the first update;
// the first update sets it to the batch mean, later ones blend with `decay`.
class MovingAverageBaseline {
 public:
  explicit MovingAverageBaseline(double decay = 0.9) : decay_(decay) {}
  double value() const { return value_; }
  bool initialized() const { return initialized_; }
  void update(double batch_mean_reward);
  void update(std::span<const double> rewards);  // with the batch mean
  double decay() const { return decay_; }

 private:
  double decay_;
  double value_ = 0.0;
  bool initialized_ = false;
};

// Reward of one query: task_score - lambda * selected / N.
double dsr_reward(double task_score, std::int64_t selected, std::int64_t n_context, double lambda);

// ---- PPO / REINFORCE on one scalar log-probability -----------------------------
// Clipped surrogate term for one sample and its derivative w.r.t. log p_new:
// value = min(rho A, clip(rho, 1 - clip, 1 + clip) A), dvalue/dlogp = A rho or 0.
// clip <= 0 disables clipping (plain importance-weighted REINFORCE).
struct PpoTerm {
  double value = 0, dvalue_dlogp = 0, ratio = 1;
  bool clipped = false;
};
PpoTerm ppo_term(double log_prob_new, double log_prob_old, double advantage, double clip);

// One sampled selection for the selection policy (all samples share the scores
// of one query; for many queries call once per query and sum).
struct SelectionSample {
  std::vector<std::int32_t> selection;  // ordered
  double reward = 0;
  double old_log_prob = 0;  // log p under the policy that drew it
};
struct PolicyLoss {
  double loss = 0;                  // -J (minimise)
  std::vector<double> dloss;        // d loss / d scores (size N) for the selection policy
  std::vector<double> advantages;   // per sample
  double mean_ratio = 0, clip_fraction = 0;
};
// loss = -(1/n) sum_n ppo_term(log p_new(selection_n), old_log_prob_n, reward_n - baseline, clip).
PolicyLoss selection_policy_loss(std::span<const double> scores, std::span<const SelectionSample> samples,
                                 double baseline, double clip = 0.2);

// ---- budget policy ----------------------------------------------------------------
struct BudgetHead {
  std::vector<double> w;  // (F)
  double b = 0.0;
  double log_sigma = 0.0;  // exploration std of the logit during training
  double base = 512.0;
  double alpha = 0.5;
  double mean_logit(std::span<const double> features) const;  // mu = w . f + b
};
struct BudgetSample {
  double mu = 0, z = 0, complexity = 0;  // complexity = sigmoid(z)
  std::int64_t budget = 1;
  double log_prob = 0;  // Gaussian log-density of z (0 for the deterministic mean)
};
// budget = clamp(round(base * (1 + alpha * sigmoid(z))), 1, n_context).
std::int64_t budget_from_logit(const BudgetHead& head, double z, std::int64_t n_context);
// rng != nullptr: z ~ N(mu, sigma^2) (training); rng == nullptr: z = mu (inference).
BudgetSample sample_budget(const BudgetHead& head, std::span<const double> features, std::int64_t n_context,
                           Rng* rng);
double budget_log_prob(const BudgetHead& head, std::span<const double> features, double z);
struct BudgetGrad {
  std::vector<double> dw;  // (F)
  double db = 0, dlog_sigma = 0;
};
// grad += weight * d log p(z) / d(w, b, log_sigma). grad.dw is resized to F if empty.
void budget_log_prob_grad(const BudgetHead& head, std::span<const double> features, double z, double weight,
                          BudgetGrad& grad);
struct BudgetSampleRecord {
  std::vector<double> features;
  double z = 0;
  double reward = 0;
  double old_log_prob = 0;
};
struct BudgetLoss {
  double loss = 0;  // -J
  BudgetGrad dloss;  // d loss / d(w, b, log_sigma)
  std::vector<double> advantages;
  double clip_fraction = 0;
};
// Same clipped surrogate as the selection policy, on the budget head's log-density.
// learn_sigma = false leaves dloss.dlog_sigma at 0.
BudgetLoss budget_policy_loss(const BudgetHead& head, std::span<const BudgetSampleRecord> samples, double baseline,
                              double clip = 0.2, bool learn_sigma = false);

}  // namespace dsrsq::retrieval
