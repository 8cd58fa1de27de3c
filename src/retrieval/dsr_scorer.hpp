#pragma once
// DSR scorer (DESIGN.md section 8, ALGORITHMS.md 13.1): the dynamic sparse
// retriever's learned scoring network, span expansion and budget, with forward
// and backward. The sampling math (Gumbel-top-k, Plackett-Luce, PPO, baseline,
// budget head policy) lives in dsr_policy.hpp and is reused here.
//
// One example (the caller loops over the batch). Inputs are token-embedding rows
// (f32, e.g. gathered from the model's wte), treated as constants: no gradient
// flows to them. C = d_model, w = conv_width, d_r = reduced dimension.
//   local encoding   e'_i = sum_{t=0}^{w-1} a_t (.) E_c[i - t]      (rows before 0 are zero;
//                                                                     a: (w, C), (.) elementwise)
//   query vector     q    = mean of the E_q rows (a bag of tokens: no convolution; the
//                           convolution's job is to give a context token its left neighbours)
//   projections      u    = W_q q,   r_i = W_c e'_i                  (W_q, W_c: (d_r, C))
//   score            s_i  = exp(log_scale) * u.r_i / (|u|_e |r_i|_e), |x|_e = sqrt(|x|^2 + 1e-12)
//   budget features  f    = [ u / |u|_e  (d_r values),  log(N) / 10 ]  (F = d_r + 1), DETACHED:
//                           the budget policy gradient updates only the budget head (w, b),
//                           never W_q (the selection policy owns W_q).
//   budget head      mu   = w . f + b; training z ~ N(mu, budget_sigma^2) (sigma fixed),
//                           inference z = mu; budget = clamp(round(base * (1 + alpha sigmoid(z))), 1, N)
//                           with base = resolve_base_budget(cfg, N).
// Selection: k = seeds_for_budget(budget, span) top tokens (Gumbel-top-k in training,
// plain top-k at inference), each expanded to {i .. i + span} (a matched key is useless
// without the value that follows it). budget >= N selects the whole context, with no
// sampled seeds (selection log-probability 0, no selection gradient).
// Everything is computed in f64 internally; parameters and gradients are f32 in a
// caller-provided flat buffer. Work over tokens is split with OpenMP by token (forward)
// or by channel (backward); summation order does not depend on the thread count.
//
// Initialisation (init(seed)): W_q = W_c = the same N(0, 1/C) matrix (a random projection,
// so the untrained scorer already ranks tokens by embedding cosine with the query),
// conv tap 0 = 1 and taps 1.. = N(0, 0.02^2), log_scale = log(init_scale), budget w = b = 0.
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "model/transformer.hpp"
#include "retrieval/dsr_policy.hpp"

namespace dsrsq::retrieval {

struct DsrConfig {
  std::int64_t d_r = 128;          // reduced dimension
  std::int64_t conv_width = 4;     // causal depthwise conv over token embeddings (1 = embedding only)
  std::int64_t span = 2;           // keep each top token plus the `span` tokens after it
  double base_budget = 512;        // tokens; a value in (0, 1) means a fraction of the context length
  double alpha = 0.5;              // budget = base * (1 + alpha * complexity)
  double lambda = 0.1;             // reward = task_score - lambda * selected / N
  double clip = 0.2;               // PPO clip (0 disables clipping)
  double baseline_decay = 0.9;     // moving-average baseline
  double budget_sigma = 0.5;       // exploration std of the budget logit in training (fixed)
  double init_scale = 10.0;        // initial inverse temperature of the cosine scores
  // PPO update epochs per sampled batch: the same sampled subsets are re-scored (the
  // scorer's forward only, never the backbone) and updated `ppo_epochs` times against the
  // log-probabilities stored at sampling time, so the ratio moves and the clip acts.
  // 1 = REINFORCE (one on-policy update per sample, ratio 1, the clip never acts).
  std::int64_t ppo_epochs = 4;
  // Throws dsrsq::Error naming the option: dsr_d_r, dsr_conv_width, dsr_span, dsr_base_budget,
  // dsr_alpha, dsr_lambda, dsr_clip, dsr_baseline_decay, dsr_budget_sigma, dsr_init_scale,
  // dsr_ppo_epochs.
  void validate() const;
  std::int64_t num_features() const { return d_r + 1; }
};

// ---- selection helpers ----------------------------------------------------------
// Base budget in tokens for a context of n: base_budget if >= 1, else round(base_budget * n);
// clamped to [1, n].
std::int64_t resolve_base_budget(const DsrConfig& cfg, std::int64_t n);
// Sorted unique {i .. i + span} ∩ [0, n) over the top tokens i (each must be in [0, n)).
std::vector<std::int32_t> expand_spans(std::span<const std::int32_t> top, std::int64_t span, std::int64_t n);
// ceil(budget / (span + 1)), at least 1: top tokens to draw so the expanded set is about `budget`.
std::int64_t seeds_for_budget(std::int64_t budget, std::int64_t span);

// ---- forward record ----------------------------------------------------------------
// Everything backward needs is owned here, so several examples can be in flight.
struct DsrForward {
  std::int64_t n = 0, c = 0, d_r = 0, span = 0;
  std::vector<double> scores;    // (N) s_i
  std::vector<double> features;  // (F) budget features (constants)
  BudgetHead head;               // snapshot of the budget head at forward time (w, b, log_sigma, base, alpha)
  // saved for backward
  std::vector<float> context;   // (N, C) copy of E_c
  std::vector<double> query;    // (C) q
  std::vector<double> u;        // (d_r) W_q q
  double u_norm = 1;            // |u|_e
  std::vector<double> r;        // (N, d_r) W_c e'_i
  std::vector<double> r_norm;   // (N) |r_i|_e
  std::vector<double> cosine;   // (N) cos(u, r_i)
  double scale = 1;             // exp(log_scale)
};

struct DsrSelection {
  BudgetSample budget;                   // mu, z, complexity, budget, log_prob (0 at inference)
  std::int64_t k = 0;                    // seeds drawn (0 when the whole context is kept)
  bool full = false;                     // budget >= N: every token kept
  std::vector<std::int32_t> seeds;       // ordered top tokens (draw order)
  std::vector<std::int32_t> positions;   // sorted expanded context indices
  double selected_fraction = 0;          // |positions| / N
  double selection_log_prob = 0;         // Plackett-Luce log p of the ordered seeds (0 when full)
  double budget_log_prob = 0;            // Gaussian log-density of z (0 at inference)
};

// Budget from the forward's head (sampled when rng, the mean logit otherwise), then the seeds
// (gumbel_top_k with rng, top_k without) and their expansion. top (optional) replaces the
// ordered top-k over the (perturbed) scores, e.g. the sharded exact top-k of sequence-
// parallel ranks (dist/sharded_top_k.hpp); it must return the same order (value
// descending, ties to the lower index). The Gumbel noise is drawn as gumbel_top_k draws it.
using TopK = std::function<std::vector<std::int32_t>(std::span<const double> values, std::int64_t k)>;
DsrSelection select(const DsrForward& fwd, Rng* rng, const TopK& top = {});

// Bytes the inference path allocated (its block buffers and the seed heap).
struct DsrInferenceStats {
  std::size_t scratch_bytes = 0;
};

// ---- training records ---------------------------------------------------------------
// One sampled selection of one forward (several records may share a forward), with its
// reward (e.g. dsr_reward(task_score, sel.positions.size(), N, cfg.lambda)). The
// selection's log-probabilities are the "old" ones of the PPO ratio.
struct DsrRecord {
  const DsrForward* forward = nullptr;
  const DsrSelection* selection = nullptr;
  double reward = 0;
};
struct DsrPolicyStats {
  double selection_loss = 0;  // mean over records of -ppo_term (selection policy)
  double budget_loss = 0;     // same for the budget policy
  double mean_reward = 0;
  double baseline = 0;        // the baseline the advantages used (before the update)
  double mean_advantage = 0;
  double mean_ratio = 0;      // selection policy
  double selection_clip_fraction = 0, budget_clip_fraction = 0;
  double mean_selected_fraction = 0;
  double mean_budget = 0;
  // Per record (in order): the ratios exp(log p_new - log p_old) of both policies, whether
  // the clip took the sample's term (its gradient is then 0), and the advantage.
  std::vector<double> selection_ratios, budget_ratios, advantages;
  std::vector<char> selection_clipped, budget_clipped;
};

// A record whose forward PPO re-computes in place between epochs.
struct PpoRecord {
  DsrForward* forward = nullptr;
  const DsrSelection* selection = nullptr;  // its log-probabilities are the stored "old" ones
  double reward = 0;
};

// ---- scorer ---------------------------------------------------------------------------
class DsrScorer {
 public:
  DsrScorer(std::int64_t d_model, DsrConfig cfg);

  // Layout of the flat buffer: wq (d_r, C), wc (d_r, C), conv (w, C), log_scale (1),
  // budget_w (d_r + 1), budget_b (1).
  static std::int64_t num_parameters(std::int64_t d_model, const DsrConfig& cfg);
  std::int64_t num_parameters() const { return num_parameters(c_, cfg_); }
  // params: num_parameters() f32; grads: same size, or nullptr (inference only).
  void bind(float* params, float* grads);
  // "dsr.wq", "dsr.wc", "dsr.conv", "dsr.log_scale", "dsr.budget_w", "dsr.budget_b".
  std::vector<Param> params();
  void init(std::uint64_t seed);  // deterministic

  const DsrConfig& config() const { return cfg_; }
  std::int64_t d_model() const { return c_; }
  // The budget head as it is now (n: context length for its base).
  BudgetHead budget_head(std::int64_t n) const;

  // E_c: f32 (N, C), E_q: f32 (Nq, C), both on the CPU, N, Nq >= 1.
  DsrForward forward(const TensorView& context_emb, const TensorView& query_emb) const;
  // Same with the rows gathered from an embedding table wte f32 (V, C) by token id.
  DsrForward forward_tokens(const TensorView& wte, std::span<const std::int32_t> context_tokens,
                            std::span<const std::int32_t> query_tokens) const;

  // Inference-only selection: what select(forward_tokens(...), nullptr) selects
  // (the same budget, seeds in the same order, the same positions), without
  // the training record. One pass over the context in blocks of
  // kInferenceBlock tokens (embedding rows, convolution + projection, scores)
  // feeding a bounded heap of the k best seeds; no score vector and no (N, C)
  // or (N, d_r) buffer is kept, so memory is O(block + budget) instead of the
  // record's ~(4 C + 8 d_r + 24) bytes per context token. selection_log_prob
  // stays 0 (no gradient or PPO ratio is taken at inference), as does the
  // budget's log_prob (z = mu). A budget >= N keeps everything and scores
  // nothing. Sharded contexts (sequence parallelism) use forward + select.
  static constexpr std::int64_t kInferenceBlock = 2048;
  DsrSelection select_inference(const TensorView& wte, std::span<const std::int32_t> context_tokens,
                                std::span<const std::int32_t> query_tokens, DsrInferenceStats* stats = nullptr) const;

  // forward() only reads the parameters (safe to call from several threads); backward() and
  // policy_step() add into the bound grads without locking (one caller at a time).
  // grads += weight * d(loss)/d(params) given dscores = d loss / d scores (N) and, when given,
  // dbudget = d loss / d(budget w, b) (its dlog_sigma is ignored: sigma is fixed).
  void backward(const DsrForward& fwd, std::span<const double> dscores, const BudgetGrad* dbudget,
                double weight = 1.0);

  // Policy-gradient losses over a batch of records, with advantages reward - baseline:
  //   L = (1/B) sum_n [ -ppo(log p_sel_new, old, A_n) - ppo(log p_budget_new, old, A_n) ],
  // log p_new from each record's forward (its scores and head), old from its selection,
  // clip = cfg.clip. Accumulates weight * dL/dparams into the bound grads (weight: e.g. the
  // HOF weight g2 times its ramp). Returns the unweighted loss values for logging.
  DsrPolicyStats policy_step(std::span<const DsrRecord> records, double baseline, double weight);
  // Same, with baseline.value(); afterwards the baseline is updated with the batch mean reward.
  DsrPolicyStats policy_step(std::span<const DsrRecord> records, MovingAverageBaseline& baseline, double weight);

  // Re-runs this scorer's forward on a forward's saved inputs (the context embedding rows
  // and the query vector) with the current parameters: scores, features, head snapshot.
  void refresh(DsrForward& f) const { encode(f); }

  // PPO over cfg.ppo_epochs epochs (E). Epoch e = 0..E-1 is one policy_step over the
  // records (advantages reward - baseline fixed for all epochs; "old" log-probabilities from
  // the selections, i.e. stored at sampling time). Between epochs, update() is called: the
  // caller's optimizer step on this scorer's parameters, which must consume and zero the
  // grads; then every record's forward is refreshed. The last epoch's gradient stays in
  // the grads for the caller's regular step (so E epochs = E parameter updates). Epoch 0
  // is on policy (ratio exactly 1); later epochs see ratios != 1 and the clip.
  // E = 1: exactly policy_step (REINFORCE), update() is never called.
  // Returns the stats of every epoch.
  std::vector<DsrPolicyStats> ppo_step(std::span<const PpoRecord> records, double baseline, double weight,
                                       const std::function<void()>& update);

 private:
  void encode(DsrForward& f) const;  // f.context and f.query filled: the rest

  std::int64_t c_;
  DsrConfig cfg_;
  float* p_ = nullptr;
  float* g_ = nullptr;
  // offsets into the flat buffer
  std::int64_t o_wq_ = 0, o_wc_ = 0, o_conv_ = 0, o_scale_ = 0, o_bw_ = 0, o_bb_ = 0, total_ = 0;
};

}  // namespace dsrsq::retrieval
