#pragma once
// DynamicKV (ALGORITHMS.md section 9 and its correction; reference
// DreamMr/DynamicKV dynamic_v11): SnapKV window scores per layer, every layer
// first keeps a large candidate set (min(r_max * base, N - w) prefix tokens per
// head, in descending score order, plus the window), and every `interval`
// layers a cross-layer top-k over all pooled scores seen so far sets each
// layer's share by its hit count, rescaled so the shares sum to base * L (L all
// layers), and cuts the candidates of every layer seen so far in score order.
// The last layer always reallocates (the correction: otherwise a model whose
// depth is not a multiple of the interval keeps its last layers' candidates and
// exceeds the budget).
//
// Budget: C = the per-row token count the byte budget buys (every layer, K and
// V of one head) minus the slots of the tokens still to come; base = C - w.
// After the final reallocation sum_l (b_l + w) <= L * C, so the layer blocks
// fit the budget. The candidates of layers not yet cut are held in their
// blocks meanwhile: that transient state lands in peak_prefill (the base's
// arena high-water mark), and so do the pooled score rows kept for the
// cross-layer top-k (added by memory(): host doubles, counted at 8 bytes).
//
// Per (sequence, head) row; the engine's model is MHA, so the reference's
// repeat_kv (per query head) and a per-KV-head cache are the same thing.
#include <cstdint>
#include <vector>

#include "kv/evicting.hpp"
#include "kv/snapkv.hpp"

namespace dsrsq {

struct DynamicKVConfig {
  std::int64_t window = 0;  // observation window w; 0: snapkv::default_window (max(question, 8))
  std::int64_t kernel = 7;  // pooling kernel (odd)
  snapkv::Pool pool = snapkv::Pool::avg;
  double r_max = 10.0;          // candidates per layer: min(r_max * base, N - w)
  std::int64_t interval = 4;    // reallocation every `interval` layers (and at the last)
  void validate() const;        // input errors name the option (--dynamic_kv_*)
};

class DynamicKVPolicy final : public EvictingPolicy {
 public:
  DynamicKVPolicy(const ModelConfig& cfg, Backend& backend, const DynamicKVConfig& c);
  KVMemory memory() const override;
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Introspection (tests): per sequence b, the prefix-token share of every
  // layer after the last reallocation (-1: not cut yet), and the number of
  // reallocations run in this sequence's prefill.
  const std::vector<std::int64_t>& layer_budgets(std::int64_t b) const { return budgets_.at(static_cast<std::size_t>(b)); }
  std::int64_t reallocations() const { return reallocations_; }
  std::int64_t row_tokens() const { return row_tokens_; }

  // The reallocation of one sequence: scores[j] holds layer j's pooled prefix
  // scores of every head (heads x prefix); the top (base * heads * seen) of
  // them all count hits per layer, and layer j's share of base * layers is its
  // hit fraction, floored, capped at cap[j] (the candidates it still holds),
  // the remainder handed out by largest fraction. Exposed for tests.
  static std::vector<std::int64_t> shares(const std::vector<std::vector<double>>& scores, std::int64_t heads,
                                          std::int64_t base, std::int64_t layers, const std::vector<std::int64_t>& cap);

 protected:
  bool plan(const SequenceInfo& info, std::size_t requested_bytes) override;
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override;
  void after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) override;

 private:
  DynamicKVConfig c_;
  std::int64_t row_tokens_ = 0;  // tokens one row may hold, over the whole sequence
  std::int64_t w_ = 0, base_ = 0, bs_ = 0, tn_ = 0;
  std::int64_t reallocations_ = 0;
  // Per layer seen so far: pooled scores rows x (Tn - w), candidates per row in
  // descending score order (call indices), what each row holds now (ascending
  // call indices, window included).
  std::vector<std::vector<double>> scores_;
  std::vector<std::vector<std::vector<std::int32_t>>> cand_, held_;
  std::vector<std::vector<std::int64_t>> budgets_;  // per sequence, per layer
  // Earlier layers to shrink once the current layer is filled (after_select).
  std::vector<std::pair<std::int64_t, std::vector<std::vector<std::int32_t>>>> pending_;
  std::size_t score_bytes_ = 0, score_peak_ = 0;
  std::int64_t window_for(std::int64_t tn) const;
  void reallocate(std::int64_t layer);
  std::vector<std::int32_t> kept_of(std::int64_t layer, std::int64_t r) const;  // candidates (ascending) + window
};

}  // namespace dsrsq
