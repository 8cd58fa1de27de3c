#pragma once
// The shared shape of every "prefill in full, then keep a subset" policy
// (ALGORITHMS.md 0.2: SnapKV/PyramidKV, DynamicKV, RocketKV stage 1,
// RazorAttention, ATSKV): a head-batched cache whose rows are (sequence, head)
// pairs, each row with its own set of kept tokens, its own length and its own
// capacity (per-head budgets: Razor keeps every token of a retrieval head and
// a few of the others; per-layer budgets: PyramidKV, DynamicKV).
//
// Protocol, per layer:
//  * the layer's FIRST attend() call of a sequence is its compression call:
//    q and k are rotated with their original positions, the call's K and V are
//    copied into a transient prefill block (counted in peak_prefill: the
//    layer's uncompressed K/V exist while it is scored, as in kvpress's hook),
//    exact causal attention runs over them (compression happens after the
//    prefill, it never changes the prefill's own outputs), then select() says
//    which of the call's tokens each row keeps, and those rows are copied into
//    the layer's own block (one allocation of sum over rows of (kept + the
//    slots for the tokens still to come)); the transient block is released.
//    Query-aware protocol: the call holds context + question; query-agnostic
//    (context_only, reuse): it holds the context only, and the question
//    arrives in a later prefill call that is appended uncompressed.
//  * later calls (the question under context_only, then every decode step)
//    append their tokens to every row and attend over each row's keys through
//    attend_row() (exact attention by default; Razor adds its compensation
//    slot, RocketKV replaces decode attention with its sparse stage 2).
// Kept tokens are stored in position order with their original positions
// (ALGORITHMS.md 0.2), post-RoPE.
//
// Bytes: the K/V of every row (f32 K and V) in one block per layer, plus any
// per-row state a subclass allocates in the layer's arena with
// layer_alloc() (compensation slots, page bounds, importances): all of it is
// resident and counted. Positions (host vectors, mirrored on the backend for
// attention) are counted by no policy (the one byte rule, results/README.md).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_detail.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq {

class EvictingPolicy : public KVPolicy {
 public:
  EvictingPolicy(const ModelConfig& cfg, Backend& backend, std::string name);
  ~EvictingPolicy() override;
  std::string name() const override { return name_; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override;
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override;
  void end_prefill() override;
  KVMemory memory() const override;
  std::size_t budget_requested_bytes() const override { return requested_; }
  std::size_t budget_achieved_bytes() const override;
  // The plan's verdict, or, once prefill has ended, bytes held beyond the
  // budget: under the query-agnostic protocols the question arrives after the
  // compression call, and its tokens can push a plan that fit the context over.
  bool infeasible() const override { return infeasible_ || (decoding_ && budget_achieved_bytes() > requested_); }
  double attended_tokens() const override { return stats_.attended(); }
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Introspection (tests, meta): rows are r = b * n_heads + h.
  std::int64_t rows() const { return info_.batch * cfg_.n_heads; }
  bool layer_ready(std::int64_t layer) const;
  std::int64_t row_len(std::int64_t layer, std::int64_t r) const;
  // Original positions held by a row (position order).
  std::vector<std::int32_t> row_positions(std::int64_t layer, std::int64_t r) const;
  // The row's K or V (row_len x HS, post-RoPE for K), on the backend's device.
  TensorView row_k(std::int64_t layer, std::int64_t r) const;
  TensorView row_v(std::int64_t layer, std::int64_t r) const;

  // Bytes one kept token costs in one row (f32 K and V of one head).
  std::size_t token_bytes() const { return 2 * static_cast<std::size_t>(cfg_.head_size()) * sizeof(float); }
  // Slots each row needs after its compression call for the tokens still to come
  // (the rest of the prompt + max_new_tokens), given the compression call's size.
  std::int64_t slots_after(std::int64_t first_call_tokens) const {
    return info_.prompt_len - first_call_tokens + info_.max_new_tokens;
  }

 protected:
  // What select() sees: the compression call of one layer.
  struct LayerPrefill {
    std::int64_t layer = 0;
    std::int64_t tokens = 0;   // Tn, the call's tokens
    TensorView q, k, v;        // (B, Tn, NH, HS) f32; q, k post-RoPE (k, v: the transient block)
    TensorView pos;            // i32 (B, Tn) original positions (a host copy, whatever the backend)
    TensorView out, lse;       // the call's exact attention output (B, Tn, NH, HS) and lse (B, NH, Tn)
  };
  // Called from begin() after the base's state is reset: a subclass plans its
  // budget (requested_bytes() is set). Return false when the budget is below
  // the method's fixed minimum (recorded as infeasible; the method then keeps
  // its minimum, so budget_achieved_bytes() > requested).
  virtual bool plan(const SequenceInfo& info, std::size_t requested_bytes) = 0;
  // Which of the call's tokens row r keeps: out[r] holds ascending indices in
  // [0, Tn). Called once per layer, on its compression call. A row may keep
  // all Tn tokens.
  virtual std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) = 0;
  // After a layer's rows are filled (the layer's arena exists: layer_alloc()
  // works): a subclass builds per-row state (e.g. Razor's compensation slot from
  // the dropped tokens of `p`). The dropped tokens are those select() left out.
  virtual void after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) {}
  // Attention of one row for Tn queries (every call after the compression
  // call): q (Tn, 1, HS) f32 post-RoPE at positions qpos i32 (Tn); o (Tn, 1, HS)
  // and lse (1, Tn) written. Default: exact attention over the row's keys
  // (which include the call's own tokens, already appended).
  virtual void attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                          TensorView lse);
  // Keys one decode query of row r attends to (token-efficiency numerator and
  // bytes read per step: keys * token_bytes() + aux_read). Default: row_len.
  virtual double row_keys_read(std::int64_t layer, std::int64_t r) const { return static_cast<double>(row_len(layer, r)); }
  virtual std::size_t aux_read_bytes(std::int64_t layer, std::int64_t r) const { return 0; }

  // Per-row state a subclass keeps resident in the layer's arena (counted).
  TensorView layer_alloc(std::int64_t layer, Shape shape, DType dtype);
  // Shrinks already-filled rows of `layer` to the listed subsets (ascending
  // indices into each row's current tokens; rows not listed keep everything)
  // and re-allocates the layer's block at the new size (DynamicKV's late
  // reallocation). Subclass state allocated with layer_alloc() is lost: rebuild it.
  void reselect(std::int64_t layer, const std::vector<std::vector<std::int32_t>>& keep);

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return be_; }
  const SequenceInfo& info() const { return info_; }
  Arena& scratch() { return scratch_; }

 private:
  struct Layer;
  struct State;
  ModelConfig cfg_;
  Backend& be_;
  std::string name_;
  SequenceInfo info_;
  KVBudget budget_;
  bool begun_ = false, decoding_ = false, infeasible_ = false;
  std::size_t requested_ = 0, resident_ = 0, peak_ = 0, transient_peak_ = 0;
  std::vector<std::unique_ptr<Layer>> layers_;
  Arena scratch_;
  kvdetail::DecodeStats stats_;
  std::size_t held_bytes() const;
  void fill_layer(std::int64_t layer, const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& keep);
  void append(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos);
};

}  // namespace dsrsq
