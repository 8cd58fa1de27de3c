#pragma once
// RCKV: the rotating compressive low-rank KV cache of DSRSQ (DESIGN.md section
// 8, ALGORITHMS.md 13.3). Two pieces:
//
// RckvProjections: the learned matrices, per layer l (C = d_model, all heads
// together, d_c = latent size):
//   P_k, P_v (d_c, C)  down-projections of PRE-RoPE keys / values: c = P x
//   U_k, U_v (C, d_c)  up-projections (learned freely, initialised as P^T):
//                      x_hat = U c
// plus the compression loss (HOF's L_compression) with its gradient.
//
// RckvPolicy (KV policy "rckv"): per layer and batch row a rotating buffer of
// `slots` latents (c_k, c_v, original position, importance w) and a window of
// the `window` most recent tokens kept exactly (pre-RoPE k and v). Attention
// of a new query (rotated with RoPE at its original position) is ONE softmax,
// scale 1/sqrt(HS), over
//   buffer slots: key  = RoPE(U_k c_k, slot position)   (reconstruct, then rotate:
//                        ALGORITHMS.md 13.3 trick 1),
//                 value contribution per head h = U_v[h] (sum_j p_hj c_v,j):
//                        attention over the d_c-dim latents, one up-projection
//                        per query and head (U_v folded into the output);
//   window tokens and the new tokens: exact keys and values, causal by position
//                        among the new tokens.
// The two parts are computed separately (buffer: own OpenMP kernel; window +
// new: Backend::attention_fwd) and merged with the guarded log-sum-exp rule.
//
// After attending, the call's new tokens enter the window (so the tokens of one
// extend() call attend to each other exactly: a prompt given in one call is
// prefilled with exact attention, only later calls see compressed context),
// unless train_matched_prefill: then the call's tokens that will leave the
// window are attended through U P x by the whole call, as DSRSQ's training
// forward does. With sqa, a multi-token call's attention is SQA cluster
// attention over its tokens and the window (as in training).
// Tokens pushed out of the window (oldest first) are compressed, c = P x, and
// written to the buffer: to the next free slot if any, else to an evicted slot
// chosen per batch row with probability proportional to exp(-w_i / tau)
// (tau = 0: the smallest w; equal smallest w: one of them drawn uniformly, so
// ties never systematically evict the oldest slot), drawn from
// Rng(cfg.seed, layer) (reseeded at begin(): a sequence is reproducible).
// Importance of a token written by a multi-token call (a prompt): the attention
// mass it received in that call (Backend::attention_mass: dense softmax over
// window + call, f64, mean over heads). By default every query i of the call
// counts with the decode EMA's weight (1 - decay) decay^(Tn-1-i), so a prompt
// token starts where the EMA would have put it had it been a slot during the
// prompt; with observe_prefill only the call's last max(W, 1) queries count,
// uniformly (SnapKV's observation window). When the buffer is full such a
// token competes with the residents and is itself dropped when it is the one
// chosen for eviction. (Before this rule, prompt tokens entered at the buffer
// mean -- 0 in a fresh buffer -- and ties went to slot 0: the buffer kept the
// earliest tokens it could and evicted BOS first, position not importance.)
// A token leaving the window during decoding starts at the buffer mean.
// Importance: after every attend() call, for each query row i in order,
//   w_j <- decay * w_j + (1 - decay) * m_ij,   m_ij = attention probability of
// slot j for query i, averaged over heads (the probability in the ONE merged
// softmax). A newly written slot starts at the mean w of the slots filled just
// before the write (the victim included), or 0 in an empty buffer.
//
// Budget (begin()): requested = KVBudget::resolve(cfg, prompt_len + max_new_tokens)
// per sequence. Window tokens W = min(cfg.window, prompt_len + max_new_tokens).
// Per layer and sequence a slot costs slot_bytes = 2 d_c * 4 (f32 latents) + 4
// (f32 importance); a window token costs window_token_bytes = 2 C * 4 (f32
// pre-RoPE k, v). Positions (one i32 per kept token) are counted by no policy
// (the one byte rule: results/README.md, "KV bytes"). cfg.buffer > 0 gives
// the slot count; cfg.buffer <= 0 derives
//   slots = floor((requested - L W window_token_bytes) / (L slot_bytes)),
// at least 1 (infeasible budget: achieved > requested) and at most
// max(1, prompt_len + max_new_tokens - W) (more slots cannot be used).
// achieved = L (slots slot_bytes + W window_token_bytes) [+ the SQA state, see
// below] = the bytes this policy allocates per sequence, up to the arena's
// 64-byte rounding of its two blocks.
//
// Memory (memory(), whole batch): everything lives in one arena allocated at
// begin() and constant afterwards (resident = peak = total = arena bytes).
// read_per_step: per decode token, summed over layers and rows: filled slots x
// slot_bytes (every filled slot is read: all keys are reconstructed, even with
// SQA) + (window + visible new tokens) x 2 C * 4. attended_tokens(): mean keys
// one decode query attends to (buffer slots used, averaged over heads, plus
// window and visible new tokens). Per-call scratch (reconstructed keys, rotated
// window keys and values, the latent partial) lives in a separate arena. Strict
// bytes (DESIGN.md section 9): a prompt given in one call attends all of its
// tokens through that scratch, so the first generated token's context was
// built from more keys than the budget holds; that scratch is therefore
// COUNTED in memory().peak_prefill (arena peak + scratch high-water mark of
// prefill), shown in the table, while resident/total stay the arena bytes and
// the attention results are unchanged. infeasible(): achieved > requested --
// the fixed part (window, SQA index) plus one slot exceed the requested bytes,
// or an explicit cfg.buffer is larger than the budget pays for.
//
// Training vs inference (a known mismatch, not fixed here): DSRSQ's training
// forward (RckvTrainTransform) compresses every token beyond the window into
// an UNLIMITED buffer -- each later query sees all earlier tokens through
// U P x, with no eviction and no importance -- while inference keeps only
// `slots` latents chosen by importance. With train_matched_prefill the
// prompt's own attention matches training; what differs is what survives
// into decoding (only a budget's worth of slots). Measured on the debug
// DSRSQ run (configs/dsrsq_debug.ini, 120 needle examples): the same trained
// weights score F1 0.817 with a buffer holding every token (--rckv_buffer
// 1000, what training sees; 12x the bytes) and 0.158 with the budget-sized
// buffer at 1/8 of the full cache: the eviction training never sees is where
// DSRSQ loses at a small budget.
//
// SQA (cfg.sqa): at end_prefill(), per (layer, row, head) k-means
// (attention::kmeans, m' = min(clusters, filled slots) clusters, seed
// Rng(sqa_cfg.seed, (layer * B + b) * NH + h)) over the reconstructed post-RoPE
// keys of the filled buffer slots. At decode each query scores the centroids by
// dot product and uses only the buffer slots of its top-k_c non-empty clusters
// (ties to the lower cluster index), plus the whole window and new tokens. A
// slot (re)written later is assigned to its nearest centroid (centroids are not
// moved). With an empty buffer at end_prefill() SQA stays off for the sequence.
// top_clusters >= clusters gives exactly the dense (non-SQA) result. The SQA
// state (f32 centroids, i32 assignments and cluster sizes) is allocated in the
// arena at begin() and counted.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention/cluster_attention.hpp"
#include "core/rng.hpp"
#include "kv/kv_detail.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"

namespace dsrsq::compress {

struct RckvConfig {
  std::int64_t d_c = 64;        // latent size (all heads together), in [1, d_model]
  std::int64_t buffer = 1024;   // slots per layer per sequence; <= 0: derived from the KV budget
  std::int64_t window = 16;     // recent tokens kept uncompressed, >= 0
  double tau = 0.0;             // eviction temperature, >= 0; 0 = evict the least important slot
  double importance_decay = 0.9;  // EMA decay of the importance, in [0, 1)
  std::uint64_t seed = 0;       // eviction sampling
  bool sqa = false;             // cluster attention over the buffer at decode (and over a multi-token call's tokens)
  // Prefill as DSRSQ trains (see attend()): within one call, the tokens that
  // leave the window are attended through their reconstruction. Off: exact.
  bool train_matched_prefill = false;
  // Importance of a multi-token call's tokens from the call's observation
  // window (see below); off: they start at the buffer's mean importance.
  bool observe_prefill = false;
  attention::ClusterAttentionConfig sqa_cfg;
  // Throws a dsrsq input error naming the option (rckv_d_c, rckv_window,
  // rckv_tau, rckv_importance_decay, rckv_sqa_clusters, rckv_sqa_top_clusters,
  // rckv_sqa_lloyd_steps).
  void validate(const ModelConfig& model) const;
};

class RckvProjections {
 public:
  // Per layer l the flat buffer holds, in this order, pk (d_c, C), pv (d_c, C),
  // uk (C, d_c), uv (C, d_c), row-major f32.
  RckvProjections(const ModelConfig& model, const RckvConfig& cfg);
  static std::int64_t num_parameters(const ModelConfig& model, const RckvConfig& cfg);
  // Views into the caller's buffers of num_parameters() floats each; grads may
  // be nullptr (inference: no backward).
  void bind(float* params, float* grads);
  bool bound() const { return params_ != nullptr; }
  // "rckv.<l>.pk", ".pv", ".uk", ".uv", decay = false. Requires bind().
  std::vector<Param> params() const;

  std::int64_t layers() const { return L_; }
  std::int64_t channels() const { return C_; }
  std::int64_t latent() const { return dc_; }
  const float* pk(std::int64_t l) const { return at(l, 0); }
  const float* pv(std::int64_t l) const { return at(l, 1); }
  const float* uk(std::int64_t l) const { return at(l, 2); }
  const float* uv(std::int64_t l) const { return at(l, 3); }
  float* pk(std::int64_t l) { return at(l, 0); }
  float* pv(std::int64_t l) { return at(l, 1); }
  float* uk(std::int64_t l) { return at(l, 2); }
  float* uv(std::int64_t l) { return at(l, 3); }

  // Every layer: P_k, P_v get random orthonormal rows (Gaussian rows, modified
  // Gram-Schmidt in f64, deterministic given the seed), U = P^T.
  void init_orthonormal(std::uint64_t seed);
  // One layer from pre-RoPE samples k, v f32 (N, C): P = the top-d_c
  // eigenvectors (rows, eigenvalues descending, sign: largest-magnitude entry
  // positive) of the uncentred second moment X^T X (f64; Backend::sym_eigen: LAPACK when the
  // linked OpenBLAS has it, else cyclic Jacobi, slow beyond C ~ 256), U = P^T.
  // With d_c = C, U P = I.
  void init_pca(std::int64_t layer, const TensorView& k, const TensorView& v);

  // Compression loss of one layer on pre-RoPE samples k, v f32 (N, C) (constants):
  //   L = 1/(N C) sum_n ( ||U_k P_k k_n - k_n||^2 + ||U_v P_v v_n - v_n||^2 ),
  // computed in f64. Saves the layer and a copy of k, v for the backward.
  double compression_loss(std::int64_t layer, const TensorView& k, const TensorView& v);
  // Backward of the LAST compression_loss() call: grads of that layer's
  // P_k, P_v, U_k, U_v += dloss * dL/d(.). With r = U P x - x, z = P x:
  //   dL/dU = 2/(N C) sum_n r_n z_n^T,  dL/dP = 2/(N C) sum_n (U^T r_n) x_n^T.
  void compression_loss_backward(double dloss = 1.0);

 private:
  float* at(std::int64_t l, int which) const;
  std::int64_t L_, C_, dc_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  // Saved by compression_loss().
  std::int64_t saved_layer_ = -1, saved_n_ = 0;
  std::vector<float> saved_k_, saved_v_;
};

class RckvPolicy final : public KVPolicy {
 public:
  // Keeps a reference to `proj` (read at every call: training updates show).
  RckvPolicy(const ModelConfig& model, Backend& backend, const RckvProjections& proj, RckvConfig cfg);
  std::string name() const override { return "rckv"; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override;
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override;
  void end_prefill() override;
  KVMemory memory() const override;
  std::size_t budget_requested_bytes() const override { return requested_; }
  std::size_t budget_achieved_bytes() const override { return achieved_; }
  double attended_tokens() const override { return stats_.attended(); }
  // The window, the SQA index and one slot exceed the requested bytes.
  bool infeasible() const override { return infeasible_; }
  // A copy of the arena's two blocks (latents, importance, window, SQA index:
  // the resident bytes) and the host state (positions_, layer lengths, RNG
  // streams, statistics, the prefill scratch high-water mark).
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Per-sequence, per-layer costs (see the top of this file).
  std::size_t slot_bytes() const;
  std::size_t window_token_bytes() const;
  // Inspection (tests, logs).
  const RckvConfig& config() const { return cfg_; }
  std::int64_t slots() const { return S_; }
  std::int64_t window() const { return W_; }
  std::int64_t filled_slots(std::int64_t layer) const { return st_.at(static_cast<std::size_t>(layer)).buf_len; }
  std::int64_t window_tokens(std::int64_t layer) const { return st_.at(static_cast<std::size_t>(layer)).win_len; }
  // Buffer row b of `layer`: original position (-1 if empty) and importance of each slot.
  std::vector<std::int32_t> slot_positions(std::int64_t layer, std::int64_t b) const;
  std::vector<float> slot_importance(std::int64_t layer, std::int64_t b) const;
  // Tests: overwrite the importance of the filled slots of (layer, b).
  void set_slot_importance(std::int64_t layer, std::int64_t b, const std::vector<float>& w);
  // The eviction rule on its own: index of the slot to evict given importances
  // w (tau = 0: argmin, ties lowest index; else P(i) ~ exp(-w_i / tau)).
  static std::int64_t choose_victim(const float* w, std::int64_t n, double tau, Rng& rng);
  bool sqa_active() const { return sqa_active_; }
  std::size_t kv_bytes_allocated() const { return arena_ ? arena_->used_bytes() : 0; }
  std::size_t scratch_peak_bytes() const { return scratch_.peak_bytes(); }

 private:
  struct LayerState {
    std::int64_t buf_len = 0;   // filled slots [0, buf_len) (same in every row)
    std::int64_t win_len = 0;   // tokens in the window ring
    std::int64_t win_head = 0;  // ring slot of the oldest window token
  };
  // The window's tokens (oldest first) and the call's, per batch row: rotated
  // keys, values and positions in scratch.
  struct ExactKV {
    TensorView K, V, pos;  // (B,S,NH,HS) (B,S,NH,HS) i32 (B,S)
    std::int64_t win = 0, S = 0;  // window tokens, then S - win new tokens
  };
  // attend()'s steps, in order.
  ExactKV gather_exact(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos);
  void score_new_tokens(const TensorView& q, const ExactKV& w, const TensorView& pos);
  void attend_exact(const TensorView& q, const ExactKV& w, const TensorView& pos, const TensorView& out,
                    const TensorView& lse_w);
  void attend_buffer(std::int64_t layer, const TensorView& q, const TensorView& pos, const TensorView& lse_w,
                     const TensorView& out, std::vector<double>& buf_keys_used);
  void account(std::int64_t layer, std::int64_t Tn, const std::vector<double>& buf_keys_used);
  void push(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos, Arena& scratch);
  void reconstruct_keys(std::int64_t layer, std::int64_t b, std::int64_t n, float* dst) const;  // (n, C) post-RoPE
  void assign_slot(std::int64_t layer, std::int64_t b, std::int64_t slot);  // SQA: nearest centroid per head
  void build_clusters();
  struct State;

  ModelConfig mc_;
  Backend& be_;
  const RckvProjections& proj_;
  RckvConfig cfg_;
  SequenceInfo info_;
  KVBudget budget_;
  float* fbase_ = nullptr;           // the arena's f32 block (nf_ floats) ...
  std::int32_t* ibase_ = nullptr;    // ... and its i32 block (ni_ ints)
  std::int64_t nf_ = 0, ni_ = 0;
  std::size_t scratch_floor_ = 0;    // prefill scratch high-water mark carried over by restore()
  bool begun_ = false, decoding_ = false, sqa_active_ = false;
  std::int64_t S_ = 0, W_ = 0, m_ = 0;
  std::unique_ptr<Arena> arena_;
  Arena scratch_;
  // Per layer views into the arena.
  std::vector<float*> ck_, cv_, wimp_, wk_, wv_;  // (B,S,dc) (B,S,dc) (B,S) (B,W,C) (B,W,C)
  std::vector<std::int32_t*> bpos_, wpos_;      // (B,S) (B,W), into positions_
  std::vector<std::int32_t> positions_;          // outside the KV arena: positions count for no policy
  // SQA state per layer: centroids (B,NH,m,HS) f32, assign (B,NH,S) i32, sizes (B,NH,m) i32.
  std::vector<float*> cent_;
  std::vector<std::int32_t*> cassign_, csize_;
  std::vector<std::int64_t> m_eff_;  // per layer clusters in use
  std::vector<LayerState> st_;
  std::vector<Rng> rng_;  // per layer
  std::vector<float> new_mass_;  // (B, Tn) of the current call: observation-window mass (-1: none)
  std::size_t requested_ = 0, achieved_ = 0, resident_ = 0, peak_ = 0;
  std::size_t prefill_scratch_ = 0;  // scratch high-water mark of prefill (counted in peak_prefill)
  bool infeasible_ = false;
  kvdetail::DecodeStats stats_;
};

namespace detail {
// Symmetric eigen-decomposition of a (n, n) row-major matrix (used by
// init_pca): vals (n, any order) and vecs (n, n) row-major with the eigenvector
// of vals[j] in column j. LAPACK (weakly linked from OpenBLAS, in the CPU backend) when
// available, else (or with force_jacobi) cyclic Jacobi in f64.
bool lapack_eigen_available();
void symmetric_eigen(const std::vector<double>& a, std::int64_t n, std::vector<double>& vals,
                     std::vector<double>& vecs, bool force_jacobi = false);
}  // namespace detail

}  // namespace dsrsq::compress
