#include "kv/dynamic_kv.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"
#include "kv/wrapped_snapshot.hpp"

namespace dsrsq {

void DynamicKVConfig::validate() const {
  DSRSQ_INPUT_CHECK(window >= 0, "option --dynamic_kv_window: must be >= 0 (0: max(question, 8)), got ", window);
  DSRSQ_INPUT_CHECK(kernel >= 1 && kernel % 2 == 1, "option --dynamic_kv_kernel: the pooling kernel must be odd and >= 1, got ",
                    kernel);
  DSRSQ_INPUT_CHECK(r_max >= 1 && std::isfinite(r_max), "option --dynamic_kv_r_max: must be >= 1 and finite, got ", r_max);
  DSRSQ_INPUT_CHECK(interval >= 1, "option --dynamic_kv_interval: must be >= 1, got ", interval);
}

DynamicKVPolicy::DynamicKVPolicy(const ModelConfig& cfg, Backend& backend, const DynamicKVConfig& c)
    : EvictingPolicy(cfg, backend, "dynamic_kv"), c_(c) {
  c_.validate();
}

std::int64_t DynamicKVPolicy::window_for(std::int64_t tn) const {
  const std::int64_t d = snapkv::default_window(info().query_len, tn);
  return c_.window > 0 ? std::min(c_.window, std::max<std::int64_t>(1, tn - 1)) : d;
}

bool DynamicKVPolicy::plan(const SequenceInfo& info, std::size_t requested_bytes) {
  const ModelConfig& cfg = config();
  row_tokens_ = static_cast<std::int64_t>(requested_bytes / KVBudget::full_bytes(cfg, 1));
  w_ = base_ = bs_ = tn_ = 0;
  reallocations_ = 0;
  scores_.assign(static_cast<std::size_t>(cfg.n_layers), {});
  cand_.assign(static_cast<std::size_t>(cfg.n_layers), {});
  held_.assign(static_cast<std::size_t>(cfg.n_layers), {});
  budgets_.assign(static_cast<std::size_t>(info.batch), std::vector<std::int64_t>(static_cast<std::size_t>(cfg.n_layers), -1));
  pending_.clear();
  score_bytes_ = score_peak_ = 0;
  // Fixed minimum: the window (or the whole prompt, if shorter) plus the
  // generated tokens in every row. Query-aware: the compression call is the
  // whole prompt; under context_only the question's slots come on top and a
  // budget below that minimum is met by keeping just the window.
  const std::int64_t n = info.prompt_len;
  if (n <= 1) return row_tokens_ >= n + info.max_new_tokens;
  const std::int64_t minimum = std::min(n, window_for(n)) + info.max_new_tokens;
  return row_tokens_ >= minimum;
}

std::vector<std::int32_t> DynamicKVPolicy::kept_of(std::int64_t layer, std::int64_t r) const {
  std::vector<std::int32_t> k = cand_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(r)];
  std::sort(k.begin(), k.end());
  for (std::int64_t j = tn_ - w_; j < tn_; ++j) k.push_back(static_cast<std::int32_t>(j));
  return k;
}

std::vector<std::vector<std::int32_t>> DynamicKVPolicy::select(const LayerPrefill& p) {
  const ModelConfig& cfg = config();
  const std::int64_t tn = p.tokens, rows = this->rows(), l = p.layer;
  const auto ls = static_cast<std::size_t>(l);
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(rows));
  // Per-layer average count (window included) once the tokens still to come have their slots.
  const std::int64_t C = row_tokens_ - slots_after(tn);
  if (tn <= 1 || C >= tn) {  // everything fits: no compression (SnapKV's early return)
    std::vector<std::int32_t> all(static_cast<std::size_t>(tn));
    std::iota(all.begin(), all.end(), 0);
    for (auto& o : out) o = all;
    return out;
  }
  tn_ = tn;
  w_ = window_for(tn);
  base_ = std::max<std::int64_t>(0, C - w_);  // C < w: infeasible, the window alone is kept
  const std::int64_t prefix = tn - w_;
  bs_ = std::min<std::int64_t>(static_cast<std::int64_t>(std::floor(c_.r_max * static_cast<double>(base_))), prefix);

  std::vector<double> s = snapkv::window_scores(backend(), scratch(), p.q, p.k, p.pos, w_, c_.kernel, c_.pool);
  cand_[ls].assign(static_cast<std::size_t>(rows), {});
  for (std::int64_t r = 0; r < rows; ++r) {
    // Candidates in DESCENDING score order (ties to the lower index): the
    // reallocation cuts this list from its end.
    const double* sr = s.data() + r * prefix;
    std::vector<std::int32_t> idx(static_cast<std::size_t>(prefix));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [sr](std::int32_t a, std::int32_t b) { return sr[a] > sr[b]; });
    idx.resize(static_cast<std::size_t>(bs_));
    cand_[ls][static_cast<std::size_t>(r)] = std::move(idx);
  }
  scores_[ls] = std::move(s);
  score_bytes_ += scores_[ls].size() * sizeof(double);
  score_peak_ = std::max(score_peak_, score_bytes_);

  if (l % c_.interval == c_.interval - 1 || l == cfg.n_layers - 1) reallocate(l);
  held_[ls].assign(static_cast<std::size_t>(rows), {});
  for (std::int64_t r = 0; r < rows; ++r) {
    out[static_cast<std::size_t>(r)] = kept_of(l, r);
    held_[ls][static_cast<std::size_t>(r)] = out[static_cast<std::size_t>(r)];
  }
  if (l == cfg.n_layers - 1) {  // the cross-layer state is no longer needed
    for (auto& v : scores_) std::vector<double>().swap(v);
    score_bytes_ = 0;
  }
  return out;
}

std::vector<std::int64_t> DynamicKVPolicy::shares(const std::vector<std::vector<double>>& scores, std::int64_t heads,
                                                 std::int64_t base, std::int64_t layers,
                                                 const std::vector<std::int64_t>& cap) {
  const auto seen = static_cast<std::int64_t>(scores.size());
  DSRSQ_REQUIRE(seen >= 1 && static_cast<std::int64_t>(cap.size()) == seen, "dynamic_kv: shares of ", seen, " layers");
  std::vector<std::int64_t> start(static_cast<std::size_t>(seen + 1), 0);
  for (std::int64_t j = 0; j < seen; ++j)
    start[static_cast<std::size_t>(j + 1)] = start[static_cast<std::size_t>(j)] + static_cast<std::int64_t>(scores[static_cast<std::size_t>(j)].size());
  auto value = [&](std::int64_t f) {
    const auto j = static_cast<std::size_t>(std::upper_bound(start.begin(), start.end(), f) - start.begin() - 1);
    return scores[j][static_cast<std::size_t>(f - start[j])];
  };
  // The top-(base * heads * seen) of the flat scores (ties to the earlier entry).
  std::vector<std::int64_t> order(static_cast<std::size_t>(start.back()));
  std::iota(order.begin(), order.end(), 0);
  const std::int64_t hits = std::min<std::int64_t>(base * heads * seen, start.back());
  std::vector<std::int64_t> count(static_cast<std::size_t>(seen), 0);
  if (hits > 0) {
    std::nth_element(order.begin(), order.begin() + (hits - 1), order.end(), [&](std::int64_t x, std::int64_t y) {
      const double vx = value(x), vy = value(y);
      return vx > vy || (vx == vy && x < y);
    });
    for (std::int64_t i = 0; i < hits; ++i) {
      const std::int64_t f = order[static_cast<std::size_t>(i)];
      ++count[static_cast<std::size_t>(std::upper_bound(start.begin(), start.end(), f) - start.begin() - 1)];
    }
  }
  const std::int64_t total = std::accumulate(count.begin(), count.end(), std::int64_t{0});
  // Shares of base * L (L: all layers), floored and capped by what each layer
  // still holds (cuts are irrevocable); the rest goes one at a time by largest
  // fraction (the lower layer on ties), each layer one before any gets two.
  const std::int64_t target = base * layers;
  std::vector<std::int64_t> budget(static_cast<std::size_t>(seen), 0);
  std::vector<double> frac(static_cast<std::size_t>(seen), 0.0);
  for (std::int64_t j = 0; j < seen; ++j) {
    const auto js = static_cast<std::size_t>(j);
    const double raw = total > 0 ? static_cast<double>(target) * static_cast<double>(count[js]) / static_cast<double>(total)
                                 : static_cast<double>(target) / static_cast<double>(seen);
    budget[js] = std::min(cap[js], static_cast<std::int64_t>(std::floor(raw)));
    frac[js] = raw - std::floor(raw);
  }
  std::int64_t left = target - std::accumulate(budget.begin(), budget.end(), std::int64_t{0});
  while (left > 0) {
    std::int64_t best = -1;
    for (std::int64_t j = 0; j < seen; ++j) {
      const auto js = static_cast<std::size_t>(j);
      if (budget[js] < cap[js] && frac[js] >= 0 && (best < 0 || frac[js] > frac[static_cast<std::size_t>(best)])) best = j;
    }
    if (best < 0) {  // every layer with room had its extra one: another round
      bool room = false;
      for (std::int64_t j = 0; j < seen; ++j) {
        frac[static_cast<std::size_t>(j)] = 0.0;
        room = room || budget[static_cast<std::size_t>(j)] < cap[static_cast<std::size_t>(j)];
      }
      if (!room) break;  // every layer holds all its candidates
      continue;
    }
    ++budget[static_cast<std::size_t>(best)];
    frac[static_cast<std::size_t>(best)] = -1.0;
    --left;
  }
  return budget;
}

// The cross-layer reallocation over layers 0..layer, per sequence; every seen
// layer's candidates are cut to its share.
void DynamicKVPolicy::reallocate(std::int64_t layer) {
  const std::int64_t NH = config().n_heads, L = config().n_layers, prefix = tn_ - w_, seen = layer + 1;
  ++reallocations_;
  for (std::int64_t b = 0; b < info().batch; ++b) {
    std::vector<std::vector<double>> s(static_cast<std::size_t>(seen));
    std::vector<std::int64_t> cap(static_cast<std::size_t>(seen));
    for (std::int64_t j = 0; j < seen; ++j) {
      const auto js = static_cast<std::size_t>(j);
      const auto at = scores_[js].begin() + b * NH * prefix;
      s[js].assign(at, at + NH * prefix);
      cap[js] = static_cast<std::int64_t>(cand_[js][static_cast<std::size_t>(b * NH)].size());
    }
    const std::vector<std::int64_t> budget = shares(s, NH, base_, L, cap);
    for (std::int64_t j = 0; j < seen; ++j) {
      const auto js = static_cast<std::size_t>(j);
      budgets_[static_cast<std::size_t>(b)][js] = budget[js];
      for (std::int64_t h = 0; h < NH; ++h) cand_[js][static_cast<std::size_t>(b * NH + h)].resize(static_cast<std::size_t>(budget[js]));
    }
  }
  // Earlier layers already sit in their blocks: shrink them once this layer is filled.
  for (std::int64_t j = 0; j < layer; ++j) {
    const auto js = static_cast<std::size_t>(j);
    std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(rows()));
    for (std::int64_t r = 0; r < rows(); ++r) {
      const auto& held = held_[js][static_cast<std::size_t>(r)];
      std::vector<std::int32_t> now = kept_of(j, r);
      auto& k = keep[static_cast<std::size_t>(r)];
      for (std::int32_t t : now)
        k.push_back(static_cast<std::int32_t>(std::lower_bound(held.begin(), held.end(), t) - held.begin()));
      held_[js][static_cast<std::size_t>(r)] = std::move(now);
    }
    pending_.emplace_back(j, std::move(keep));
  }
}

void DynamicKVPolicy::after_select(const LayerPrefill&, const std::vector<std::vector<std::int32_t>>&) {
  for (auto& [j, keep] : pending_) reselect(j, keep);
  pending_.clear();
}

KVMemory DynamicKVPolicy::memory() const {
  KVMemory m = EvictingPolicy::memory();
  // The pooled score rows of every layer are alive together just before the
  // last layer's reallocation, beside the uncut candidate blocks (the base's peak).
  m.peak_prefill += score_peak_;
  return m;
}

// The prefill's own figures (the score rows' peak, the layers' shares) beside the base's snapshot.
namespace {
struct DynamicExtra {
  std::size_t score_peak = 0;
  std::int64_t reallocations = 0;
  std::vector<std::vector<std::int64_t>> budgets;
};
}  // namespace

std::unique_ptr<KVSnapshot> DynamicKVPolicy::snapshot() const {
  auto s = std::make_unique<kvdetail::WrappedSnapshot<DynamicExtra>>();
  s->owner = this;
  s->base = EvictingPolicy::snapshot();
  s->extra = DynamicExtra{score_peak_, reallocations_, budgets_};
  for (const auto& b : budgets_) s->extra_host_bytes += b.size() * sizeof(std::int64_t);
  return s;
}

void DynamicKVPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::wrapped_of<DynamicExtra>(snap, this, "dynamic_kv");
  EvictingPolicy::restore(*s.base);
  score_peak_ = s.extra.score_peak;
  reallocations_ = s.extra.reallocations;
  budgets_ = s.extra.budgets;
  score_bytes_ = 0;
  pending_.clear();
}

}  // namespace dsrsq
