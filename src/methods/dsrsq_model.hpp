#pragma once
// DSRSQ as one method (DESIGN.md section 8): the standard transformer as the
// backbone (same parameter layout, so --init_from a standard checkpoint works),
// plus
//   DSR   the retriever (retrieval/dsr_scorer.hpp): scores every context token
//         against the query, samples a budget and a subset (Gumbel-top-k in
//         training, top-k at inference), keeps a span after each top token;
//         only [BOS] + the selected context + the question (+ answer) enter the
//         model, every token at its ORIGINAL position;
//   SQA   cluster sparse attention (attention/cluster_attention.hpp) as the
//         model's training attention, and over the RCKV buffer at decode;
//   RCKV  the rotating compressive cache (kv/rckv.hpp) as the KV policy
//         from prefill into decoding, its projections trained by the
//         compression loss.
// HOF loss, per step (weights g, the last three ramped linearly from 0 over
// `ramp` steps):
//   L = g1 L_task + g2 L_retrieval + g3 L_compression + g4 L_compute
//   L_task         the backbone's loss on the selected sequences (answer tokens,
//                  plus lm_weight on context/query tokens whose successor was kept)
//   L_retrieval    the PPO clipped surrogate of the selection and budget
//                  policies; reward = -(answer loss of the example) - lambda * selected/N,
//                  computed once per sample from the backbone's forward. The
//                  sampling policy's log-probabilities are stored at sampling time;
//                  the retriever then takes dsr.ppo_epochs (E) updates on the same
//                  samples: epochs 0..E-2 each end in an AdamW step of the scorer's
//                  own parameters (its own moments, at the step's learning rate),
//                  followed by a re-run of the scorer's forward only (the backbone
//                  is not re-run); the last epoch's gradient joins the extra
//                  parameters' regular step. E = 1 is REINFORCE (ratio 1).
//   L_compression  RCKV reconstruction error of every layer's pre-RoPE K and V
//                  of the step's tokens (K/V are constants: it trains P and U)
//   L_compute      expected selected fraction (budget at the head's mean logit
//                  over N; its gradient reaches the budget head) + the active-
//                  cluster fraction k_c/m of SQA (a constant: logged)
// The backbone gets only g1 L_task's gradient; the retriever g2 and g4's; the
// RCKV projections g3's. The extra parameters (retriever + projections) have
// their own flat buffer and AdamW (same hyper-parameters as the backbone).
//
// Ablation variants switch parts off at inference on the same trained weights:
// no_dsr (the whole context enters), no_sqa (dense attention everywhere),
// no_rckv (the full KV cache).
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention/cluster_attention.hpp"
#include "kv/rckv.hpp"
#include "core/arena.hpp"
#include "dist/communicator.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"
#include "train/optimizer.hpp"
#include "retrieval/dsr_scorer.hpp"

namespace dsrsq {

struct DsrsqSettings {
  retrieval::DsrConfig dsr;
  attention::ClusterAttentionConfig sqa;
  compress::RckvConfig rckv;
  std::array<double, 4> g{1.0, 0.5, 0.3, 0.2};
  std::int64_t ramp = 1000;
  // AdamW of the retriever's inner PPO epochs (dsr.ppo_epochs > 1); its lr is
  // the step's scheduled rate, passed to hof_terms.
  AdamWConfig ppo_adam;
  // Positions of the selected tokens (--dsr_positions): false keeps each
  // token's original position; true numbers them 0..n-1 in selection order,
  // so the backbone never sees a relative distance longer than it read.
  bool compact_positions = false;
};

// The model positions of selected prompt indices (sorted): the indices
// themselves (original) or 0..n-1 in selection order (compact).
std::vector<std::int32_t> dsr_positions(const std::vector<std::int32_t>& selected, bool compact);

// Which parts run at inference.
struct DsrsqVariant {
  std::string name = "full_model";
  bool dsr = true, sqa = true, rckv = true;
  static DsrsqVariant named(const std::string& name);  // full_model | no_dsr | no_sqa | no_rckv
};

// SQA as the training attention: per layer a cluster plan (k-means over the
// batch's keys, top-k_c clusters per query) held for the backward.
class ClusterAttentionOverride : public AttentionOverride {
 public:
  ClusterAttentionOverride(Backend& be, attention::ClusterAttentionConfig cfg, std::int64_t layers)
      : be_(be), cfg_(cfg), plans_(static_cast<std::size_t>(layers)) {}
  void forward(std::int64_t layer, const AttentionArgs& a) override;
  void backward(std::int64_t layer, const AttentionGradArgs& a) override;
  // Mean over the last forward's layers of the key fraction and active-cluster fraction.
  double key_fraction() const;
  double active_cluster_fraction() const;

 private:
  Backend& be_;
  attention::ClusterAttentionConfig cfg_;
  std::vector<attention::ClusterPlan> plans_;
};

// RCKV in the training forward: the keys and values of the tokens that
// inference keeps compressed (every prompt token older than the last `window`
// prompt tokens; HostBatch::compress) are replaced by their reconstructions
//   k_hat = U_k (P_k k),  v_hat = U_v (P_v v),
// so the backbone learns to read its compressed cache, and the task loss
// trains P and U together with the reconstruction loss. Backward:
//   dU += dx_hat z^T, dz = U^T dx_hat, dP += dz x^T, dx = P^T dz.
class RckvTrainTransform : public KVTransform {
 public:
  RckvTrainTransform(compress::RckvProjections& proj, Backend& be) : proj_(proj), be_(be) {}
  // The rows (B*T) of the coming forward to transform; empty: none.
  void set_rows(const std::vector<std::uint8_t>& compress);
  void forward(std::int64_t layer, TensorView k, TensorView v) override;
  void backward(std::int64_t layer, TensorView dk, TensorView dv) override;

 private:
  // P (d_c, C) and U (C, d_c) views of one layer and kind (0 keys, 1 values).
  TensorView p_of(std::int64_t layer, int kind, bool grad) const;
  TensorView u_of(std::int64_t layer, int kind, bool grad) const;
  compress::RckvProjections& proj_;
  Backend& be_;
  std::vector<std::int64_t> rows_;
  // Saved per layer and kind: the original rows x (M, C) and latents z (M, d_c).
  std::vector<std::array<std::vector<float>, 2>> x_, z_;
};

// Terms of the HOF loss of one step (unweighted values, for /train).
struct HofTerms {
  double retrieval = 0, compression = 0, compute = 0, selected_fraction = 0, ramp = 0;
  // PPO diagnostics of this rank's samples (lead ranks; 0 elsewhere): the last
  // epoch's mean selection ratio and clip fractions (epoch 0 is on policy).
  std::int64_t ppo_epochs = 0;
  double ppo_mean_ratio = 0, ppo_selection_clip_fraction = 0, ppo_budget_clip_fraction = 0;
};

// The HOF weights of one step: g1 (task, never ramped) and the ramped
// efficiency weights g2..g4 * ramp.
struct HofWeights {
  double task = 0, retrieval = 0, compression = 0, compute = 0, ramp = 0;
};

class DsrsqModel {
 public:
  DsrsqModel(Transformer& backbone, DsrsqSettings s, Backend& be);

  Transformer& backbone() { return model_; }
  const DsrsqSettings& settings() const { return s_; }
  std::span<Param> extra_params() { return extra_params_; }
  TensorView extra_flat() { return extra_; }
  TensorView extra_grads() { return extra_grad_; }
  retrieval::DsrScorer& scorer() { return scorer_; }
  compress::RckvProjections& projections() { return proj_; }
  retrieval::MovingAverageBaseline& baseline() { return baseline_; }
  void zero_extra_grad();

  // Deterministic initialisation of the retriever and the projections (random
  // orthonormal); init_projections_pca then fits P to the backbone's own keys
  // and values on `seqs` (ALGORITHMS.md 13.3 trick 5).
  void init(std::uint64_t seed);
  void init_projections_pca(const std::vector<const Encoded*>& seqs, std::int32_t pad_id);

  // ---- training ----
  // The batch of selected sequences (Gumbel-top-k when sampling, else top-k),
  // padded to a multiple of pad_multiple. Keeps the forwards and selections
  // for policy_terms().
  // sample_seed: sampling on, each sequence drawing from Rng(seed, hash of its
  // tokens), so a sequence's draw does not depend on how the batch is sharded.
  HostBatch training_batch(const std::vector<const Encoded*>& seqs, std::int32_t pad_id, float lm_weight,
                           std::optional<std::uint64_t> sample_seed, std::int64_t pad_multiple);
  // After the backbone's forward and backward of that batch: the HOF terms
  // with their gradients into the extra buffer. answer_loss: per sequence of
  // the batch, its mean answer-token loss (over the whole sequence, all sp
  // shards). comm (may be null): the world, for a global reward mean, and the
  // extra gradients are then summed over it; `lead` = this rank computes the
  // policy terms of its sequences (sp rank 0), the others contribute only the
  // compression term of their tokens. global_sequences / global_rows: the
  // step's sequence count and real-token count over all ranks.
  // lr: the step's scheduled learning rate, needed for the retriever's inner PPO
  // updates (dsr.ppo_epochs > 1 and a non-zero retrieval weight); an error
  // when it is needed and not given. Every rank of comm must call this with
  // the same step (the inner updates all-reduce the retriever's gradient).
  HofTerms hof_terms(std::int64_t step, const HostBatch& local, const std::vector<double>& answer_loss,
                     dist::Communicator* comm, bool lead, double global_sequences,
                     std::optional<double> lr = std::nullopt);
  HofWeights hof_weights(std::int64_t step) const;
  ClusterAttentionOverride* sqa_override() { return &sqa_; }
  // Sequence parallelism: the seeds are chosen by the sharded exact top-k over
  // these ranks (each proposes its block's best, one all-gather, global top-k).
  void set_sp_comm(dist::Communicator* comm) { sp_comm_ = comm; }
  RckvTrainTransform* kv_transform() { return &kvt_; }

  // ---- inference ----
  // Prompt indices that enter the model (sorted; [BOS] and the question always).
  std::vector<std::int32_t> select_prompt(const Encoded& enc, const DsrsqVariant& v);
  std::unique_ptr<KVPolicy> make_policy(const DsrsqVariant& v);
  bool compact_positions() const { return s_.compact_positions; }

  // Checkpoint: extra parameters, their AdamW state and the baseline.
  void save(std::map<std::string, std::vector<float>>& extra, const TensorView& adam_m, const TensorView& adam_v,
            std::int64_t adam_steps) const;
  // Parameters only (--init_from a DSRSQ checkpoint); false when it has none.
  bool load_params(const std::map<std::string, std::vector<float>>& extra);
  // Returns the AdamW step count stored (or -1 when the checkpoint has no DSRSQ state).
  // With dsr.ppo_epochs > 1 the inner PPO AdamW's state travels too
  // (dsrsq.ppo_adam_m / _v / _state); a checkpoint without it starts that state at 0.
  std::int64_t load(const std::map<std::string, std::vector<float>>& extra, TensorView adam_m, TensorView adam_v);
  // The inner PPO AdamW's state from `root` to every rank (resume under MPI: rank 0 read it).
  void broadcast_ppo_state(dist::Communicator& comm, int root);
  AdamW* ppo_optimizer() { return ppo_opt_.get(); }

 private:
  struct Example {
    retrieval::DsrForward fwd;
    retrieval::DsrSelection sel;
    std::int64_t n = 0;
  };
  // The context indices (into enc.tokens) and the query tokens used for scoring.
  Example score(const Encoded& enc, Rng* rng) const;
  // HOF terms, one function each (hof_terms composes them; the sums feed one
  // all-reduce, so each term has a local part and a finishing part).
  std::vector<double> retrieval_rewards(const std::vector<double>& answer_loss) const;
  // This rank's share of the global mean compression loss; its gradient (weight) into P and U.
  double compression_term(const HostBatch& local, dist::Communicator* comm, double weight);
  // Sum over this rank's sequences of the expected selected fraction (budget at the head's mean).
  double compute_term_local() const;
  // Its pathwise gradient into the budget head, from the current forwards.
  void compute_term_backward(double global_sequences, double weight);
  // PPO (or REINFORCE) over this rank's samples; returns the stats of each epoch
  // (empty on non-lead ranks, which still join the inner updates' all-reduce).
  std::vector<retrieval::DsrPolicyStats> retrieval_term(const std::vector<double>& rewards, double baseline,
                                                        double weight, bool ppo, bool lead,
                                                        dist::Communicator* comm, std::optional<double> lr);
  // Rows `rows` of layer l's saved pre-RoPE keys and values into k, v (rows.size() x C each).
  void gather_saved_kv(std::int64_t layer, const std::vector<std::int64_t>& rows, std::vector<float>& k,
                       std::vector<float>& v) const;

  Transformer& model_;
  DsrsqSettings s_;
  Backend& be_;
  retrieval::DsrScorer scorer_;
  compress::RckvProjections proj_;
  Arena arena_;
  TensorView extra_, extra_grad_;
  std::vector<Param> extra_params_;
  retrieval::MovingAverageBaseline baseline_;
  ClusterAttentionOverride sqa_;
  RckvTrainTransform kvt_;
  dist::Communicator* sp_comm_ = nullptr;
  std::vector<Example> batch_;  // of the last training_batch()
  std::vector<Param> scorer_params_;  // views of the scorer's part of extra_ (inner PPO AdamW)
  std::unique_ptr<AdamW> ppo_opt_;    // dsr.ppo_epochs > 1 only
};

}  // namespace dsrsq
