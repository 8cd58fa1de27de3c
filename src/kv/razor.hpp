#pragma once
// RazorAttention (ALGORITHMS.md section 6 and its corrections): retrieval
// heads keep every token; every other head keeps N0 attention sinks, the most
// recent L_h tokens and ONE compensation slot holding the mean key and mean
// value of the dropped tokens D, whose logit gets + ln|D| AFTER the 1/sqrt(d)
// scaling (so the slot weighs as |D| copies of a mean token: with identical
// dropped tokens it reproduces full attention exactly). Compression happens
// once, after each layer's prefill; generated tokens are then appended to
// every head (the deployment's rule: no decode-time folding).
//
// Retrieval heads come from a calibration run of the model on random tokens
// (a segment repeated several times): per (layer, head) the echo score (the
// attention mass a query puts on all earlier copies of its own token) and the
// induction score (the mass on the tokens right after those copies), each the
// mean over the queries that have such tokens. The top fractions of heads by
// each score, over all (layer, head) pairs of the model, are protected. The
// engine's model is MHA, so the GQA max over a group's query heads is the
// identity.
//
// Bytes (the one byte rule): K and V of every kept token, plus per compressed
// row its slot: mean K, mean V and ln|D| (2 HS + 1 f32). L_h comes from the
// byte budget: the protected heads' full rows first, the rest split evenly
// over the other heads; when the protected heads alone leave too little for
// the others' minimum (sinks + slot + the tokens still to come), the
// lowest-ranked protected heads are demoted (recorded in meta()).
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kv/evicting.hpp"

namespace dsrsq {

class Transformer;

namespace razor {

// Echo and induction scores of every (layer, head), index l * n_heads + h.
struct HeadScores {
  std::int64_t layers = 0, heads = 0;
  std::vector<double> echo, induction;
  // The calibration's cost: tokens run, wall seconds, FLOPs (Backend meter).
  std::int64_t tokens = 0;
  double seconds = 0, flops = 0;
};

// The calibration segment's default length: min(2500, max_pos / 4).
std::int64_t default_segment(std::int64_t max_pos);
// `repeats` copies of one segment of `segment` tokens drawn uniformly from
// [0, vocab) by Rng(seed).
std::vector<std::int32_t> calibration_tokens(std::int64_t vocab, std::int64_t segment, std::int64_t repeats,
                                             std::uint64_t seed);

// Scores of one layer's heads for the queries [q0, q0 + Tq) of a sequence
// whose keys [0, S) are given: q (1, Tq, NH, HS) and k (1, S, NH, HS) f32
// post-RoPE, tokens[0..S) the sequence's token ids, positions 0..S-1.
// Adds each query's echo / induction mass to echo_sum[h] / ind_sum[h] and
// counts the queries that have such tokens in echo_n / ind_n. Attention
// probabilities come from the Backend's attention_mass (heads as batch rows,
// one call per query).
void accumulate_layer_scores(Backend& be, Arena& scratch, const TensorView& q, const TensorView& k, std::int64_t q0,
                             const std::vector<std::int32_t>& tokens, std::vector<double>& echo_sum,
                             std::vector<double>& ind_sum, std::vector<std::int64_t>& echo_n,
                             std::vector<std::int64_t>& ind_n);

// Runs `model` over calibration_tokens(...) in chunks through a full-cache
// recording policy and returns the mean scores.
HeadScores calibrate(Transformer& model, std::int64_t segment, std::int64_t repeats, std::uint64_t seed);

// Heads a fraction selects out of n: 0 for fraction 0, else
// clamp(round(fraction * n), 1, n) (at least one of each kind the paper
// protects).
std::int64_t head_count(double fraction, std::int64_t n);

// The protected heads in priority order (the first is demoted last): the top
// head_count(f_induction) heads by induction score and the top
// head_count(f_echo) by echo score (ties to the lower index), united; a head's
// priority is its best relative rank (rank + 1) / count in the lists that chose
// it (ties: induction first, then the lower index).
std::vector<std::int32_t> protected_heads(const HeadScores& s, double f_induction, double f_echo);

// "l0h1,l1h3" for heads l * n_heads + h (sorted by head id); "" for none.
std::string head_list(const std::vector<std::int32_t>& heads, std::int64_t n_heads);

// Compensation slot layout: [mean K (HS) | mean V (HS) | ln|D| (1)], f32.
inline std::int64_t slot_floats(std::int64_t hs) { return 2 * hs + 1; }

// Fills `slot` (slot_floats(HS) f32) from the rows `idx` (|D| >= 1 of them)
// of k_rows and v_rows (R, HS): the means (a ones-vector matmul scaled by
// 1/|D|) and ln|D|.
void fill_slot(Backend& be, Arena& scratch, const TensorView& k_rows, const TensorView& v_rows,
               const std::vector<std::int32_t>& idx, const TensorView& slot);

// Merges the slot into an exact attention result over the kept keys: q (Tq, 1,
// HS) f32 post-RoPE, o (Tq, 1, HS) and lse (1, Tq) updated in place with the
// partial (o = mean V, lse = scale * q . mean K + ln|D|) by the Backend's
// attention_merge (log-sum-exp rule). scale <= 0: 1/sqrt(HS).
void merge_slot(Backend& be, Arena& scratch, const TensorView& q, const TensorView& slot, const TensorView& o,
                const TensorView& lse, double scale = 0.0);

struct Settings {
  std::int64_t sinks = 4;                 // N0
  std::vector<std::int32_t> protect;      // protected heads, priority order (protected_heads())
  std::map<std::string, std::string> calibration_meta;  // recorded with every example
};

}  // namespace razor

class RazorPolicy final : public EvictingPolicy {
 public:
  RazorPolicy(const ModelConfig& cfg, Backend& backend, razor::Settings settings);
  bool infeasible() const override { return EvictingPolicy::infeasible() || late_infeasible_; }
  std::map<std::string, std::string> meta() const override;
  // The base's snapshot plus this policy's host state (protected heads, slot
  // map, counts, recent length).
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Introspection (tests): heads protected for this sequence (after demotion),
  // the planned slots of a non-protected row (sinks + L_h + tokens to come;
  // -1: every row keeps everything), the recent length of the last compression.
  const std::vector<std::int32_t>& protected_now() const { return protect_now_; }
  std::int64_t demoted() const { return demoted_; }
  std::int64_t row_slots() const { return row_slots_; }
  std::int64_t recent() const { return recent_; }
  // The compensation slot of a row (empty when it dropped nothing).
  TensorView slot(std::int64_t layer, std::int64_t r) const;
  std::int64_t dropped(std::int64_t layer, std::int64_t r) const;

 protected:
  bool plan(const SequenceInfo& info, std::size_t requested_bytes) override;
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override;
  void after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) override;
  void attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                  TensorView lse) override;
  double row_keys_read(std::int64_t layer, std::int64_t r) const override;
  std::size_t aux_read_bytes(std::int64_t layer, std::int64_t r) const override;

 private:
  razor::Settings s_;
  std::vector<std::int32_t> protect_now_;
  std::vector<char> is_protected_;               // per head l * NH + h
  std::int64_t demoted_ = 0, row_slots_ = -1, recent_ = -1;
  bool late_infeasible_ = false;
  std::vector<TensorView> slots_;                // per layer (compressed rows, slot_floats) f32
  std::vector<std::vector<std::int32_t>> slot_of_;  // per layer and row: index into slots_, -1 none
  std::vector<std::vector<std::int64_t>> dropped_;  // per layer and row: |D|
  // Bumped whenever the base's layer layout may change (plan(): begin();
  // after_select(): a layer filled): a restore from a snapshot of the same
  // epoch finds the layers the slot views point into.
  std::uint64_t epoch_ = 0;
  struct Host {
    std::vector<std::int32_t> protect_now;
    std::vector<char> is_protected;
    std::int64_t demoted = 0, row_slots = -1, recent = -1;
    bool late_infeasible = false;
    std::vector<std::vector<std::int32_t>> slot_of;
    std::vector<std::vector<std::int64_t>> dropped;
  };
  struct Snap;
};

}  // namespace dsrsq
