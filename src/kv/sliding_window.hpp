#pragma once
// KV policy "window" (the sliding_window method): StreamingLLM (ALGORITHMS.md section 8): S attention sinks
// (the first S tokens) plus a window of the W most recent tokens; the middle is
// evicted. Plain sliding window is S = 0.
//
// Positions ("pos_shift"): every query sees its keys as if the cached keys
// were rotated by their index inside the cache (sinks 0..S-1, then the window
// from oldest to newest) and the query by its own cache index, so the model
// never sees a distance beyond S + W - 1, whatever the original positions
// were. The original positions are kept only for inspection.
// How (same scores, no per-step re-rotation of the cache): RoPE scores depend
// only on the difference of the two rotations. Token number tau of the stream
// (0, 1, 2, ...: its cache index as long as nothing was evicted) is cached with
// its key rotated by tau, once. A window key u seen from token t has cache
// distance t - u (both slide together), so the window is attended with the
// query rotated by t. A sink s is at distance cap - 1 - s from a token that has
// filled the cache, so the sinks are attended in a separate call with the query
// rotated by cap - 1; the two partial results are merged by log-sum-exp
// (backend attention_merge). A decode step stores its token first (over the
// oldest window token, which it does not see), so ring and new key are one
// call. Log-length scaling (attn_log_base) follows the same positions: a query
// at cache index i is scaled by s(i), i.e. s(cap - 1) once the cache is full,
// whatever its stream index. ALGORITHMS.md section 8's pre-RoPE cache gives
// these scores up to rounding (tests/kv/test_kv.cpp compares with a
// brute-force reference that re-rotates every key at every step).
//
// Budget rule (begin()): K = max(1, floor(resolve(budget) / bytes_per_token)),
// bytes_per_token = KVBudget::full_bytes(cfg, 1), capped at N + T (a larger
// budget cannot be used). Sinks S = min(default_sinks, K - 1); if the window
// W = K - S would not hold the question (query_len tokens), S shrinks to
// max(0, K - query_len). If K < query_len the question cannot fit: S = 0,
// W = K keeps the most recent K tokens and question_kept() is false.
//
// Prefill rule: no token, prompt or generated, ever attends to more than the
// K kept tokens. While the cache has room (the first K tokens) a chunk of new
// tokens is attended in one call, causally; while all kept tokens fit this is
// the normal model (cache index = position for a sequence starting at 0). After
// that, tokens are processed in chunks of c <= min(W, kFullChunk) tokens with
// token-by-token StreamingLLM semantics: token t attends to the S sinks, the
// W - 1 tokens before it and itself (keys evicted by earlier tokens of the
// same chunk are masked for it, keys of later tokens are not visible), and the
// chunk then overwrites the c oldest window slots (ring buffer, no copying).
// The result equals one token at a time up to rounding, at the cost of one
// pass over the window per chunk instead of per token. The question is in the
// window at the end of prefill when K >= query_len. During decoding the window
// keeps sliding, so a long answer can push the question out (StreamingLLM
// semantics; nothing is pinned).
//
// Bytes counted: the K/V arena (pre-RoPE K and V, f32, K tokens, every layer)
// = B * K * bytes_per_token, allocated at begin() and constant afterwards.
// Not counted: slot-index/position arrays (host i32) and the per-call scratch
// holding one chunk's rotated queries, keys and partial outputs (transient,
// like activations; see scratch_peak_bytes()). memory() is for the whole batch; budget_* per sequence.
#include <memory>
#include <vector>

#include "kv/kv_detail.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq {

class SlidingWindowPolicy final : public KVPolicy {
 public:
  static constexpr std::int64_t kDefaultSinks = 4;
  // Most tokens per attention call once the cache is full: the window pass
  // costs c x W scores per chunk whatever c is, the chunk's own keys c^2 / 2,
  // so moderate chunks are cheapest; scratch is O(c) rows.
  static constexpr std::int64_t kFullChunk = 512;
  SlidingWindowPolicy(const ModelConfig& cfg, Backend& backend, std::int64_t default_sinks = kDefaultSinks);
  std::string name() const override { return "window"; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override;
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override;
  void end_prefill() override;
  KVMemory memory() const override;
  std::size_t budget_requested_bytes() const override { return requested_; }
  std::size_t budget_achieved_bytes() const override { return achieved_; }
  // It keeps at least one token: a budget below one token is unmet.
  bool infeasible() const override { return achieved_ > requested_; }
  double attended_tokens() const override { return stats_.attended(); }
  // A copy of the K/V block (the whole arena allocation: resident bytes) and
  // the host ring state, positions and statistics.
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Inspection (tests, logs).
  std::int64_t capacity() const { return cap_; }  // K = S + W
  std::int64_t sinks() const { return sinks_; }
  std::int64_t window() const { return cap_ - sinks_; }
  bool question_kept() const { return question_kept_; }
  std::int64_t cached_tokens(std::int64_t layer) const { return state_.at(static_cast<std::size_t>(layer)).len; }
  // Original positions of the kept tokens of batch row b in `layer`, in cache
  // order (sinks, then the window oldest first).
  std::vector<std::int32_t> kept_positions(std::int64_t layer, std::int64_t b) const;
  std::size_t kv_bytes_allocated() const { return kv_arena_ ? kv_arena_->used_bytes() : 0; }
  std::size_t scratch_peak_bytes() const { return scratch_.peak_bytes(); }

 private:
  struct LayerState {
    std::int64_t len = 0;   // filled slots (<= cap)
    std::int64_t head = 0;  // once full: slot of the oldest window token
    std::int64_t seen = 0;  // tokens processed
  };
  // Cache index of slot s in layer state st (-1 if the slot is empty).
  std::int64_t logical(const LayerState& st, std::int64_t s) const;
  void process(std::int64_t layer, std::int64_t t0, std::int64_t c, const TensorView& q, const TensorView& k,
               const TensorView& v, const TensorView& pos, const TensorView& out);

  struct State;
  TensorView block() const;  // the one K/V allocation (every layer's K and V)

  ModelConfig cfg_;
  Backend& be_;
  std::int64_t default_sinks_;
  SequenceInfo info_;
  KVBudget budget_;
  bool begun_ = false, decoding_ = false, question_kept_ = true;
  std::int64_t cap_ = 0, sinks_ = 0;
  std::unique_ptr<Arena> kv_arena_;
  Arena scratch_;
  kvdetail::DeviceIndices idx_;  // index arrays handed to ops (on the backend)
  std::vector<TensorView> k_, v_;                 // per layer (B, cap, NH, HS), keys rotated by stream index
  std::vector<std::vector<std::int32_t>> orig_;  // per layer (B, cap) original positions
  std::vector<LayerState> state_;
  std::vector<std::int32_t> ring_kpos_;  // (B, cap) key positions of a decode step once full (begin() clears)
  std::size_t requested_ = 0, achieved_ = 0, resident_ = 0, peak_ = 0;
  kvdetail::DecodeStats stats_;
};

}  // namespace dsrsq
