#pragma once
// RocketKV (ALGORITHMS.md section 10 and both corrections; reference
// NVlabs/RocketKV, the inf_llm path behind the paper's numbers).
//
// Parameters from the traffic budget B ("token budget": KV token-equivalents
// read per decode step) and S = N + T, as the reference derives them:
//   c = max(1, S/B), alpha = min(0.2 + 0.06 log2 c, 0.8), Pcap = int(S / c^alpha)
//   (at least min(2T, S)), P = Pcap - T, k = B/2, c2 = max(1, Pcap/B),
//   g = min(floor c2, ceil sqrt c2), r = clamp(int(d g / c2), 1, d).
// Equal bytes: the byte budget fixes what is RESIDENT, Pcap tokens plus the
// page bounds (one min and one max key per page of g tokens: one token's K+V
// per page) when g >= 2, so Pcap (1 + 1/g) token-equivalents per row and
// layer. B is the largest traffic budget in [1, 2S] whose Pcap fits the byte
// budget (the relation Pcap(B) is the reference's; B = 2S, k = S, means
// exact attention: the identity at a budget holding everything). With g = 1
// the pages are single keys and the bounds are the keys themselves (the
// reference builds no bound cache then): nothing extra is kept.
//
// Stage 1 (the compression call): SnapKV with max pooling, kernel
// odd(clamp(Tn/128, 3, 63)) (knob), window w = min(32, Tn - 1, max(default
// window, keep/2)): the reference's 32, scaled down for short prompts and small
// budgets so the prefix keeps at least half of the kept tokens, never below
// the engine's window (question + 8); keeps P - (tokens still to come after
// the call) tokens per row in position order.
// Stage 2 (every decode step, attend_row): the top-r query channels by |q|;
// per page the max key bound where q > 0 and the min where not; approximate
// score per page, the same for each of its tokens; p = softmax(s / tau) with
// tau = sqrt(d * |q_r|_1 / |q|_1) (SparQ's temperature; with the engine's MHA
// model, G = 1, there is no group average and the ranking is that of s);
// exact attention over the top-k tokens (ties to the earlier token). The
// bounds are kept resident and updated as tokens arrive, which gives exactly
// the inf_llm path's per-step recomputation from the kept keys (pages are over
// the position-ordered kept keys; only the last page changes).
// Bytes read per decode step and row: k tokens' K and V plus r channels of
// every page bound (or of every key when g = 1).
//
// Stage 2's channel selection, page scores and page bounds are host loops over
// copies of the row's keys and bounds (no Backend op does them yet); the
// gathered exact attention runs on the Backend.
#include <cstdint>
#include <vector>

#include "kv/evicting.hpp"
#include "kv/snapkv.hpp"

namespace dsrsq {

struct RocketKVConfig {
  std::int64_t window = 32;  // stage-1 observation window (scaled down, above)
  std::int64_t kernel = 0;   // stage-1 max-pool kernel; 0: odd(clamp(Tn/128, 3, 63))
  void validate() const;     // input errors name the option (--rocket_kv_*)
};

// The reference's parameters for a traffic budget B over S tokens, T generated, head size d.
struct RocketKVParams {
  std::int64_t B = 0, Pcap = 0, k = 0, g = 1, r = 0;
  double c2 = 1;
  std::int64_t resident_tokens() const;  // Pcap + the pages' bounds (g >= 2)
  static RocketKVParams derive(std::int64_t B, std::int64_t S, std::int64_t T, std::int64_t d);
  // The largest B in [1, 2S] whose resident tokens fit `row_tokens`; B = 1's
  // parameters (and fits = false) when none does.
  static RocketKVParams for_budget(std::int64_t row_tokens, std::int64_t S, std::int64_t T, std::int64_t d, bool& fits);
};

class RocketKVPolicy final : public EvictingPolicy {
 public:
  RocketKVPolicy(const ModelConfig& cfg, Backend& backend, const RocketKVConfig& c);
  const RocketKVParams& params() const { return prm_; }
  // Page bounds of n keys (n x hs, position order) in pages of g: per page its
  // elementwise min then max (pages x 2 x hs), over the keys the page holds.
  static std::vector<float> page_bounds(const float* keys, std::int64_t n, std::int64_t hs, std::int64_t g);
  // Stage 2's choice for one query q (hs): the top-k of the n kept tokens
  // (ascending row indices) by the approximate scores from the page bounds
  // (page size g, top-r channels). Exposed for tests.
  static std::vector<std::int32_t> stage2_select(const float* q, const float* bounds, std::int64_t n, std::int64_t hs,
                                                 std::int64_t g, std::int64_t r, std::int64_t k);
  KVMemory memory() const override;
  std::size_t budget_achieved_bytes() const override;
  std::unique_ptr<KVSnapshot> snapshot() const override;
  void restore(const KVSnapshot& snap) override;

 protected:
  bool plan(const SequenceInfo& info, std::size_t requested_bytes) override;
  std::vector<std::vector<std::int32_t>> select(const LayerPrefill& p) override;
  void after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) override;
  void attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                  TensorView lse) override;
  double row_keys_read(std::int64_t layer, std::int64_t r) const override;
  std::size_t aux_read_bytes(std::int64_t layer, std::int64_t r) const override;

 private:
  RocketKVConfig c_;
  RocketKVParams prm_;
  std::int64_t min_keep_ = 0;
  // Per layer: the bound tensor (rows, pages, 2, HS) (g >= 2) in its own
  // arena (resident, counted in every figure beside the base's K/V blocks;
  // not layer_alloc(): a restore into another layout reallocates those blocks
  // where this policy cannot see them), pages per row, and per row how many of
  // its keys the bounds include.
  std::vector<std::unique_ptr<Arena>> arenas_;
  std::vector<TensorView> bounds_;
  std::vector<std::int64_t> pages_;
  std::vector<std::vector<std::int64_t>> bounded_;
  void update_bounds(std::int64_t layer, std::int64_t r, std::vector<float>& host);
  void alloc_bounds(std::int64_t layer);
  std::size_t own_bytes() const;
};

}  // namespace dsrsq
