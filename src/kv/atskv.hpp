#pragma once
// ATSKV-style learned relevance (ALGORITHMS.md section 11 with its fixes and
// the "Further corrections" entry): a per-layer predictor
//   r = sigmoid(z),  z = w2 . relu(W1 x + b1) + b2   (hidden 32)
// over token features x = [v ; a ; f]:
//   v  the token's value vector (all heads, pre-RoPE): the policy sees q, k, v,
//      not the layer-normed hidden state h; v = Wv LN1(h) + bv is a linear image
//      of it, so it stands in for h;
//   a  per head, the mean attention the token receives from the observation
//      window's queries (one value per head; the window column sums of
//      ALGORITHMS.md section 1 instead of all queries, fix 5);
//   f  relative position t / Tn, a special-token flag (the first token, the
//      engine's [BOS]: the policy sees no token ids) and the mean key norm over
//      heads / sqrt(HS).
// Training (backbone frozen): the target of token j is
//   y_j = log(max over teacher-forced answer queries i of
//             sum_h A_hij |Wo_h v_hj| / |Wo o_i|)
// (KVzap's target, with the residual norm |h_i| replaced by the norm of the
// attention block's output at i: the residual stream is not visible to a KV
// policy; it only scales each query's row), fitted by mean squared error on
// z (r = sigmoid(z) ranks the same), Adam.
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "kv/evicting.hpp"
#include "model/config.hpp"

namespace dsrsq {

class Transformer;
struct Encoded;

namespace atskv {

// Features of one compression call's prefix tokens (t < Tn - w), every
// sequence: q, k (B, Tn, NH, HS) post-RoPE, v (B, Tn, NH, HS), pos i32 (B, Tn).
// Returns B * (Tn - w) rows of dim(cfg) floats.
std::int64_t feature_dim(const ModelConfig& cfg);
std::vector<float> features(Backend& be, Arena& scratch, const ModelConfig& cfg, const TensorView& q,
                            const TensorView& k, const TensorView& v, const TensorView& pos, std::int64_t w);

class Predictor {
 public:
  Predictor(const ModelConfig& cfg, std::int64_t hidden, std::uint64_t seed);
  std::int64_t dim() const { return dim_; }
  std::int64_t hidden() const { return hidden_; }
  // z (pre-sigmoid) of n feature rows for `layer`.
  std::vector<double> logits(std::int64_t layer, const float* x, std::int64_t n) const;
  // One full-batch Adam step of the mean squared error of z against y on n
  // rows of `layer`; returns the loss before the step.
  double adam_step(std::int64_t layer, const float* x, const double* y, std::int64_t n, double lr);
  // Mean squared error of z against y on n rows of `layer` (no update).
  double mse(std::int64_t layer, const float* x, const double* y, std::int64_t n) const;
  // Checkpoint entries "atskv.params" (and "atskv.adam_m", "atskv.adam_v", "atskv.step").
  void save(std::map<std::string, std::vector<float>>& extra, bool with_optimizer) const;
  bool load(const std::map<std::string, std::vector<float>>& extra, bool with_optimizer);
  const std::vector<float>& params() const { return p_; }
  // The output bias b2 of `layer` (data-dependent start: the targets' mean).
  void set_output_bias(std::int64_t layer, double b) { p_[static_cast<std::size_t>(offset(layer) + per_layer_ - 1)] = static_cast<float>(b); }
  // Adam steps taken on `layer` (0: untrained, unless loaded).
  std::int64_t steps(std::int64_t layer) const { return steps_.at(static_cast<std::size_t>(layer)); }
  // Trained (some Adam step taken) or loaded from a checkpoint.
  bool trained() const { return loaded_ || std::any_of(steps_.begin(), steps_.end(), [](std::int64_t s) { return s > 0; }); }
  // FLOPs of one forward (and of one forward + backward) over n rows.
  double flops(std::int64_t n, bool backward) const;

 private:
  std::int64_t layers_, dim_, hidden_, per_layer_;
  std::vector<float> p_, m_, v_;
  std::vector<std::int64_t> steps_;
  bool loaded_ = false;
  std::int64_t offset(std::int64_t layer) const { return layer * per_layer_; }
};

// Features and targets of one example, per layer (teacher-forced prompt + answer).
struct Sample {
  std::vector<std::vector<float>> x;   // per layer: rows x dim
  std::vector<std::vector<double>> y;  // per layer: rows (log targets)
  std::int64_t rows = 0;               // prefix tokens (prompt_len - w)
  std::int64_t w = 0;
};
// Runs the frozen backbone over enc's prompt + answer and returns the sample;
// the observation window is max(question, 8) (window > 0: that).
Sample record(Transformer& model, const Encoded& enc, std::int64_t window);

struct TrainStats {
  std::vector<double> loss;  // per epoch, mean over layers of the MSE before the epoch's step
  double seconds = 0, flops = 0;
  std::int64_t samples = 0, rows = 0;
};
// Fits the predictor on the recorded samples: `epochs` full-batch Adam steps
// per layer (a fresh layer's output bias starts at its targets' mean).
TrainStats train(Predictor& pred, const std::vector<Sample>& samples, std::int64_t epochs, double lr);
// Mean over layers of the predictor's mean squared error on the samples.
double mse(const Predictor& pred, const std::vector<Sample>& samples);

}  // namespace atskv

struct AtskvConfig {
  std::int64_t window = 0;  // observation window (0: max(question, 8))
  double beta = 1.0;        // tau = beta * quantile(r, q)
  double q_min = 0.1, q_max = 0.5;  // the quantile's range (the seed's run passes [0.1, 0.5])
  double ema = 0.8;                 // moving average of the quantile and of the passive tokens' attention
  std::int64_t promote_slots = 4;   // per row: room for passive tokens promoted back (taken from the budget)
  void validate() const;
};

// The two-tier policy. At each layer's compression call the predictor scores
// the prefix tokens (one score per token, shared by the heads of a sequence);
// a token stays active when r > tau = beta * quantile(r, q) with
//   q = ema * q_prev + (1 - ema) * (q_min + (q_max - q_min) * min(1, M_cur / M_target))
// (fix 1: q is the dropped fraction, so memory pressure keeps fewer; q starts
// at the seed's initial sparsity 0.7), at most the hard cap the byte budget
// leaves after the window (question included: always active), the slots of
// the tokens still to come and `promote_slots` promotion slots.
// Demoted tokens move to the passive tier (host memory: their K, V and
// features), counted in memory().total, not in the resident figures.
// At every decode step each passive token's attention feature follows, as a
// moving average (ema), the probability the step's query gives it against
// the active keys' normaliser (the passive keys are read: that traffic is in
// read_per_step); its score is recomputed, the layer's quantile follows the
// memory ratio again, and passive tokens whose score rises above the
// threshold are promoted into the promotion slots (resident, counted), the
// highest first, displacing promoted tokens that fell below it (which return
// to the passive tier). Decode attention is exact over the active row and
// the promoted slots (merged by log-sum-exp). The tokens kept at prefill are
// not demoted during decoding (the base's rows only shrink by reselect(),
// which would rebuild every row of the layer at each step).
class AtskvPolicy final : public EvictingPolicy {
 public:
  AtskvPolicy(const ModelConfig& cfg, Backend& backend, const AtskvConfig& c, const atskv::Predictor& pred);
  void end_prefill() override;
  KVMemory memory() const override;
  std::size_t budget_achieved_bytes() const override;
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;
  std::size_t passive_bytes() const { return passive_bytes_; }
  double quantile(std::int64_t layer) const { return q_.at(static_cast<std::size_t>(layer)); }
  // Positions promoted into row r's slots of `layer`, and promotions so far.
  std::vector<std::int32_t> promoted(std::int64_t layer, std::int64_t r) const;
  std::int64_t promotions() const { return promotions_; }
  // The kept prefix tokens given their scores r: those with r > beta *
  // quantile(r, q), at most `cap` of them (the highest), ascending.
  static std::vector<std::int32_t> keep_prefix(const std::vector<double>& r, double q, double beta, std::int64_t cap);
  static double quantile_of(std::vector<double> r, double q);

 protected:
  bool plan(const SequenceInfo& info, std::size_t requested_bytes) override;
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override;
  void after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) override;
  void attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                  TensorView lse) override;
  double row_keys_read(std::int64_t layer, std::int64_t r) const override;
  std::size_t aux_read_bytes(std::int64_t layer, std::int64_t r) const override;

 private:
  AtskvConfig c_;
  const atskv::Predictor& pred_;
  std::int64_t row_tokens_ = 0, slots_ = 0, promotions_ = 0;
  bool decoding_ = false;
  std::vector<double> q_;  // per layer, the smoothed quantile
  std::size_t passive_bytes_ = 0;
  // Passive tier of one sequence and layer: the demoted tokens' features
  // beyond their values (tokens x (heads + 3): the attention part updated; the
  // value part is their V, held once), scores, positions, and per head K, V.
  struct Passive {
    std::vector<float> f;
    std::vector<double> r, a_step;  // a_step: this step's probabilities (tokens x heads)
    std::vector<double> r_active;   // the prefill scores of the prefix tokens kept active
    std::vector<std::int32_t> pos;
    std::vector<std::vector<float>> k, v;  // per head: tokens x HS
    std::vector<std::int32_t> slot_of;     // per token: its promotion slot, -1: none
    std::vector<std::int32_t> in_slot;     // per slot: the token in it, -1: empty
    double tau = 0;
  };
  std::vector<std::vector<Passive>> passive_;  // per layer, per sequence
  // Promotion slots: per layer, K and V (rows, slots, HS) in their own arena.
  std::vector<std::unique_ptr<Arena>> arenas_;
  std::vector<TensorView> slot_k_, slot_v_;
  void alloc_slots(std::int64_t layer);
  std::size_t own_bytes() const;
  void rescore(std::int64_t layer, std::int64_t b);
};

}  // namespace dsrsq
