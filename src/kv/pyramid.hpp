#pragma once
// PyramidKV (ALGORITHMS.md section 7 and its corrections, "PyramidKV as kvpress
// computes it"): SnapKV selection inside each layer (kv/snapkv.hpp: the last w
// prompt tokens as the observation window, column scores pooled), with
// per-layer budgets falling linearly from the bottom layer to the top while
// their sum stays fixed. Kept tokens are stored in position order with their
// original positions; generated tokens are appended (no decode eviction).
//
// Budget arithmetic (layer_budgets): with N the compression call's tokens, w
// the window and C the mean per-layer capacity INCLUDING the window,
//   N <= C            no compression;
//   N < 2 (C - w)     plain SnapKV: every layer keeps C - w prefix tokens + w;
//   otherwise         min = (C - w) / beta, max = 2 (C - w) - min (if max >=
//                     N - w: max = N - w, min = 2 (C - w) - max), prefix budget
//                     b_l = max - l (max - min) / (L - 1) in floating point,
//                     then floors fixed up (largest remainders first) so that
//                     sum_l b_l = L (C - w) exactly and each b_l lies in
//                     [1, N - w] (none reaches 0, as kvpress PR #266 requires).
// C comes from the byte budget: every row's slots (kept prompt tokens plus the
// tokens still to come) times the bytes of a token, summed over layers and
// heads, at most the budget. Fixed minimum: the window, one prefix token and
// the decode slots per row.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kv/evicting.hpp"
#include "kv/snapkv.hpp"

namespace dsrsq {
namespace pyramid {

struct Budgets {
  enum class Mode { none, snapkv, pyramid } mode = Mode::none;
  std::vector<std::int64_t> prefix;  // per layer: prefix tokens kept besides the window (none: N - w)
};
// Throws on w < 0, C < w + 1, L < 1 or beta < 1.
Budgets layer_budgets(std::int64_t n, std::int64_t capacity, std::int64_t w, std::int64_t layers, double beta);

struct Settings {
  std::int64_t window = 0;  // 0: max(question length, 8) (snapkv::default_window)
  std::int64_t kernel = 7;  // PyramidKV's LongBench runner
  snapkv::Pool pool = snapkv::Pool::max;
  double beta = 20;
};

}  // namespace pyramid

class PyramidPolicy final : public EvictingPolicy {
 public:
  PyramidPolicy(const ModelConfig& cfg, Backend& backend, pyramid::Settings settings);
  bool infeasible() const override { return EvictingPolicy::infeasible() || late_infeasible_; }
  std::map<std::string, std::string> meta() const override;
  // The base's snapshot plus this policy's host state (budgets, window).
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

  // Introspection (tests): mean row slots per layer planned from the budget
  // (-1: everything fits), the last compression's window and budgets.
  std::int64_t row_slots() const { return row_slots_; }
  std::int64_t window() const { return window_; }
  const pyramid::Budgets& budgets() const { return budgets_; }

 protected:
  bool plan(const SequenceInfo& info, std::size_t requested_bytes) override;
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override;

 private:
  pyramid::Settings s_;
  std::int64_t row_slots_ = -1, window_ = 0, capacity_ = 0;
  bool late_infeasible_ = false;
  pyramid::Budgets budgets_;
  std::int64_t planned_for_ = -1;  // the call size budgets_ was computed for
  std::int64_t window_for(std::int64_t tn) const;
  struct Snap;
};

}  // namespace dsrsq
