#pragma once
// "full": the standard transformer's cache (ALGORITHMS.md section 2).
// RoPE with the original positions is applied to q and k (in place in the
// caller's buffers), post-RoPE keys and values are appended to a per-layer
// cache (B, N+T, NH, HS) allocated at begin(), and attention reads the cache
// through backend.attention_fwd; unused slots carry KVCache::kEmptyPos so the
// causal mask hides them.
//
// Bytes counted: the K/V arena only (f32 K and V, every layer), which is
// exactly B * KVBudget::full_bytes(cfg, N+T) when d_model * 4 is a multiple of
// 64. Position ids (i32, one per cached token and layer) live in an arena of
// their own on the backend (with a host copy for snapshots) and are NOT
// counted, as in KVBudget::full_bytes.
// memory() figures are for the whole batch (B sequences); the budget_*
// figures are per sequence (one example), like KVBudget.
#include <memory>
#include <vector>

#include "kv/kv_detail.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq {

class FullPolicy final : public KVPolicy {
 public:
  FullPolicy(const ModelConfig& cfg, Backend& backend);
  std::string name() const override { return "full"; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override;
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override;
  void end_prefill() override;
  KVMemory memory() const override;
  std::size_t budget_requested_bytes() const override { return requested_; }
  std::size_t budget_achieved_bytes() const override { return achieved_; }
  // Full keeps every token: any budget below the full cache is unmet.
  bool infeasible() const override { return achieved_ > requested_; }
  double attended_tokens() const override { return stats_.attended(); }
  // A copy of the K/V block (the whole arena allocation: resident bytes) and
  // the host positions, lengths and statistics.
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  std::int64_t capacity() const { return cap_; }
  std::int64_t cached_tokens(std::int64_t layer) const { return len_.at(static_cast<std::size_t>(layer)); }
  std::size_t kv_bytes_allocated() const { return kv_arena_ ? kv_arena_->used_bytes() : 0; }

 private:
  struct State;
  ModelConfig cfg_;
  Backend& be_;
  SequenceInfo info_;
  KVBudget budget_;
  bool begun_ = false, decoding_ = false;
  std::int64_t cap_ = 0;
  std::unique_ptr<Arena> kv_arena_;
  Arena scratch_;
  std::vector<TensorView> k_, v_;                // per layer (B, cap, NH, HS), post-RoPE
  std::vector<std::vector<std::int32_t>> pos_;  // per layer (B, cap) original positions (host copy)
  Arena pos_arena_;                             // kpos_: not KV bytes (positions are counted by no policy)
  std::vector<TensorView> kpos_;                // per layer (B, cap) the same, on the backend
  std::vector<std::int64_t> len_;               // per layer cached tokens
  std::size_t requested_ = 0, achieved_ = 0, resident_ = 0, peak_ = 0;
  kvdetail::DecodeStats stats_;
  TensorView block() const;  // the one K/V allocation (every layer's K and V)
};

}  // namespace dsrsq
