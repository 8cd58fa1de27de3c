#include "kv/pyramid.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "core/error.hpp"
#include "kv/kv_detail.hpp"

namespace dsrsq {
namespace pyramid {

Budgets layer_budgets(std::int64_t n, std::int64_t capacity, std::int64_t w, std::int64_t layers, double beta) {
  DSRSQ_INPUT_CHECK(layers >= 1 && w >= 0 && capacity >= w + 1 && beta >= 1, "pyramid budgets: need layers >= 1, w >= 0, C >= w + 1, beta >= 1; got L=",
                    layers, " w=", w, " C=", capacity, " beta=", beta);
  Budgets b;
  const auto L = static_cast<std::size_t>(layers);
  const std::int64_t per = capacity - w;  // mean prefix budget per layer
  if (n <= capacity) {
    b.mode = Budgets::Mode::none;
    b.prefix.assign(L, std::max<std::int64_t>(n - w, 0));
    return b;
  }
  if (n < 2 * per || layers == 1) {
    b.mode = Budgets::Mode::snapkv;
    b.prefix.assign(L, per);
    return b;
  }
  b.mode = Budgets::Mode::pyramid;
  const double target = static_cast<double>(per);
  double mn = target / beta, mx = 2 * target - mn;
  const auto room = static_cast<double>(n - w);  // prefix tokens available
  if (mx >= room) {
    mx = room;
    mn = 2 * target - mx;
  }
  const double step = (mx - mn) / static_cast<double>(layers - 1);
  std::vector<double> f(L);
  b.prefix.resize(L);
  std::int64_t sum = 0;
  for (std::size_t l = 0; l < L; ++l) {
    f[l] = mx - static_cast<double>(l) * step;
    b.prefix[l] = std::clamp<std::int64_t>(static_cast<std::int64_t>(std::floor(f[l])), 1, n - w);
    sum += b.prefix[l];
  }
  // Fix-up to the exact sum L (C - w): +1 to the largest remainders first
  // (ties to the lower layer), or -1 from the smallest, within [1, N - w].
  const std::int64_t want = static_cast<std::int64_t>(L) * per;
  std::vector<std::size_t> order(L);
  std::iota(order.begin(), order.end(), 0);
  auto rem = [&](std::size_t l) { return f[l] - static_cast<double>(b.prefix[l]); };
  while (sum != want) {
    const bool up = sum < want;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t c) { return up ? rem(a) > rem(c) : rem(a) < rem(c); });
    bool moved = false;
    for (std::size_t l : order) {
      if (sum == want) break;
      if (up ? b.prefix[l] < n - w : b.prefix[l] > 1) {
        b.prefix[l] += up ? 1 : -1;
        sum += up ? 1 : -1;
        moved = true;
      }
    }
    DSRSQ_REQUIRE(moved, "pyramid budgets: cannot reach the sum ", want, " within [1, ", n - w, "] per layer");
  }
  return b;
}

}  // namespace pyramid

PyramidPolicy::PyramidPolicy(const ModelConfig& cfg, Backend& backend, pyramid::Settings settings)
    : EvictingPolicy(cfg, backend, "pyramid"), s_(settings) {
  DSRSQ_INPUT_CHECK(s_.window >= 0, "pyramid: window must be >= 0 (0: max(question length, 8)), got ", s_.window);
  DSRSQ_INPUT_CHECK(s_.kernel >= 1 && s_.kernel % 2 == 1, "pyramid: the pooling kernel must be odd and >= 1, got ", s_.kernel);
  DSRSQ_INPUT_CHECK(s_.beta >= 1 && std::isfinite(s_.beta), "pyramid: beta must be >= 1 and finite, got ", s_.beta);
}

std::int64_t PyramidPolicy::window_for(std::int64_t tn) const {
  if (tn <= 1) return 0;
  return s_.window > 0 ? std::min(s_.window, tn - 1) : snapkv::default_window(info().query_len, tn);
}

bool PyramidPolicy::plan(const SequenceInfo& info, std::size_t requested) {
  const ModelConfig& c = config();
  const std::int64_t L = c.n_layers, NH = c.n_heads;
  const std::size_t tb = token_bytes();
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  late_infeasible_ = false;
  planned_for_ = -1;
  budgets_ = pyramid::Budgets{};
  window_ = window_for(info.prompt_len);
  capacity_ = 0;
  if (static_cast<std::size_t>(L * NH * total) * tb <= requested) {
    row_slots_ = -1;  // every layer keeps everything (the identity with `full`)
    return true;
  }
  // Per sequence: one K/V block per layer, each may round up to 64 bytes.
  const std::size_t reserve = static_cast<std::size_t>(L) * 64;
  const std::size_t avail = requested > reserve ? requested - reserve : 0;
  // Mean slots per (layer, head) row: kept prompt tokens + the tokens to come.
  row_slots_ = static_cast<std::int64_t>(avail / (static_cast<std::size_t>(NH) * tb) / static_cast<std::size_t>(L));
  const std::int64_t min_slots = window_ + 1 + info.max_new_tokens;  // query-aware: one prefill call
  if (row_slots_ < min_slots) {
    row_slots_ = min_slots;
    return false;
  }
  return true;
}

std::vector<std::vector<std::int32_t>> PyramidPolicy::select(const LayerPrefill& p) {
  const std::int64_t Tn = p.tokens, R = rows();
  std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(R));
  std::vector<std::int32_t> all(static_cast<std::size_t>(Tn));
  std::iota(all.begin(), all.end(), 0);
  if (planned_for_ != Tn) {
    planned_for_ = Tn;
    window_ = window_for(Tn);
    budgets_ = pyramid::Budgets{};
    if (row_slots_ >= 0) {
      capacity_ = row_slots_ - slots_after(Tn);
      if (capacity_ < window_ + 1) {  // query-agnostic: the question's slots were unknown at begin()
        late_infeasible_ = true;
        capacity_ = window_ + 1;
      }
      budgets_ = pyramid::layer_budgets(Tn, capacity_, window_, config().n_layers, s_.beta);
    }
  }
  if (row_slots_ < 0 || budgets_.mode == pyramid::Budgets::Mode::none) {
    for (auto& k : keep) k = all;
    return keep;
  }
  const std::int64_t w = window_;
  const std::int64_t n_keep = budgets_.prefix.at(static_cast<std::size_t>(p.layer)) + w;
  const std::vector<double> sc = snapkv::window_scores(backend(), scratch(), p.q, p.k, p.pos, w, s_.kernel, s_.pool);
  for (std::int64_t r = 0; r < R; ++r)
    keep[static_cast<std::size_t>(r)] = snapkv::keep_with_window(sc.data() + r * (Tn - w), Tn, w, n_keep);
  return keep;
}

std::map<std::string, std::string> PyramidPolicy::meta() const {
  std::map<std::string, std::string> m;
  const char* mode = budgets_.mode == pyramid::Budgets::Mode::pyramid ? "pyramid"
                     : budgets_.mode == pyramid::Budgets::Mode::snapkv ? "snapkv"
                                                                        : "none";
  m["pyramid_mode"] = row_slots_ < 0 ? "none" : mode;
  m["pyramid_window"] = std::to_string(window_);
  m["pyramid_capacity"] = std::to_string(row_slots_ < 0 ? -1 : capacity_);
  std::ostringstream b;
  for (std::size_t l = 0; l < budgets_.prefix.size(); ++l) b << (l ? " " : "") << budgets_.prefix[l];
  m["pyramid_prefix_budgets"] = b.str();
  return m;
}

struct PyramidPolicy::Snap final : KVSnapshot {
  const void* owner = nullptr;
  std::unique_ptr<KVSnapshot> base;
  std::int64_t row_slots = -1, window = 0, capacity = 0, planned_for = -1;
  bool late_infeasible = false;
  pyramid::Budgets budgets;
  std::size_t bytes() const override { return base->bytes() + budgets.prefix.size() * sizeof(std::int64_t); }
};

std::unique_ptr<KVSnapshot> PyramidPolicy::snapshot() const {
  auto s = std::make_unique<Snap>();
  s->owner = this;
  s->base = EvictingPolicy::snapshot();
  s->row_slots = row_slots_;
  s->window = window_;
  s->capacity = capacity_;
  s->planned_for = planned_for_;
  s->late_infeasible = late_infeasible_;
  s->budgets = budgets_;
  return s;
}

void PyramidPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<Snap>(snap, this, "pyramid");
  EvictingPolicy::restore(*s.base);
  row_slots_ = s.row_slots;
  window_ = s.window;
  capacity_ = s.capacity;
  planned_for_ = s.planned_for;
  late_infeasible_ = s.late_infeasible;
  budgets_ = s.budgets;
}

}  // namespace dsrsq
