#include "kv/rocket_kv.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"
#include "kv/wrapped_snapshot.hpp"

namespace dsrsq {

void RocketKVConfig::validate() const {
  DSRSQ_INPUT_CHECK(window >= 1, "option --rocket_kv_window: must be >= 1, got ", window);
  DSRSQ_INPUT_CHECK(kernel == 0 || (kernel >= 1 && kernel % 2 == 1),
                    "option --rocket_kv_kernel: the pooling kernel must be odd and >= 1 (0: odd(clamp(N/128, 3, 63))), got ",
                    kernel);
}

std::int64_t RocketKVParams::resident_tokens() const { return Pcap + (g >= 2 ? (Pcap + g - 1) / g : 0); }

RocketKVParams RocketKVParams::derive(std::int64_t B, std::int64_t S, std::int64_t T, std::int64_t d) {
  RocketKVParams p;
  p.B = B;
  const double c = std::max(1.0, static_cast<double>(S) / static_cast<double>(B));
  const double alpha = std::min(0.2 + 0.06 * std::log2(c), 0.8);
  p.Pcap = static_cast<std::int64_t>(static_cast<double>(S) / std::pow(c, alpha));
  p.Pcap = std::max(p.Pcap, std::min<std::int64_t>(2 * T, S));  // the eval path's floor
  p.Pcap = std::min(p.Pcap, S);
  p.k = std::max<std::int64_t>(1, B / 2);
  p.c2 = std::max(1.0, static_cast<double>(p.Pcap) / static_cast<double>(B));
  p.g = std::max<std::int64_t>(1, std::min(static_cast<std::int64_t>(std::floor(p.c2)),
                                           static_cast<std::int64_t>(std::ceil(std::sqrt(p.c2)))));
  // inf_llm: int(d * g / c2) (the gpt-fast path rounds), at least one channel.
  p.r = std::clamp<std::int64_t>(static_cast<std::int64_t>(static_cast<double>(d * p.g) / p.c2), 1, d);
  return p;
}

RocketKVParams RocketKVParams::for_budget(std::int64_t row_tokens, std::int64_t S, std::int64_t T, std::int64_t d,
                                          bool& fits) {
  // resident_tokens() is not monotone in B (g steps), so every B is tried.
  for (std::int64_t B = 2 * S; B >= 1; --B) {
    const RocketKVParams p = derive(B, S, T, d);
    if (p.resident_tokens() <= row_tokens) {
      fits = true;
      return p;
    }
  }
  fits = false;
  return derive(1, S, T, d);
}

std::vector<float> RocketKVPolicy::page_bounds(const float* keys, std::int64_t n, std::int64_t hs, std::int64_t g) {
  const std::int64_t pages = (n + g - 1) / g;
  std::vector<float> b(static_cast<std::size_t>(pages * 2 * hs));
  for (std::int64_t p = 0; p < pages; ++p) {
    float* mn = b.data() + p * 2 * hs;
    float* mx = mn + hs;
    std::fill(mn, mn + hs, std::numeric_limits<float>::infinity());
    std::fill(mx, mx + hs, -std::numeric_limits<float>::infinity());
    for (std::int64_t t = p * g; t < std::min(n, (p + 1) * g); ++t)
      for (std::int64_t c = 0; c < hs; ++c) {
        mn[c] = std::min(mn[c], keys[t * hs + c]);
        mx[c] = std::max(mx[c], keys[t * hs + c]);
      }
  }
  return b;
}

std::vector<std::int32_t> RocketKVPolicy::stage2_select(const float* q, const float* bounds, std::int64_t n,
                                                        std::int64_t hs, std::int64_t g, std::int64_t r,
                                                        std::int64_t k) {
  // 1. The top-r channels of |q| (ties to the lower channel).
  std::vector<std::int32_t> ch(static_cast<std::size_t>(hs));
  std::iota(ch.begin(), ch.end(), 0);
  std::stable_sort(ch.begin(), ch.end(), [q](std::int32_t a, std::int32_t b) { return std::fabs(q[a]) > std::fabs(q[b]); });
  ch.resize(static_cast<std::size_t>(std::min(r, hs)));
  double l1 = 0, l1r = 0;
  for (std::int64_t c = 0; c < hs; ++c) l1 += std::fabs(static_cast<double>(q[c]));
  for (std::int32_t c : ch) l1r += std::fabs(static_cast<double>(q[c]));
  // 2.-4. Page upper bounds of q.k, SparQ's temperature, softmax over tokens.
  const double tau = l1 > 0 ? std::sqrt(static_cast<double>(hs) * l1r / l1) : 1.0;
  const std::int64_t pages = (n + g - 1) / g;
  std::vector<double> s(static_cast<std::size_t>(pages));
  double mx = -std::numeric_limits<double>::infinity();
  for (std::int64_t p = 0; p < pages; ++p) {
    const float* mn = bounds + p * 2 * hs;
    const float* mxk = mn + hs;
    double acc = 0;
    for (std::int32_t c : ch) acc += static_cast<double>(q[c]) * static_cast<double>(q[c] > 0 ? mxk[c] : mn[c]);
    s[static_cast<std::size_t>(p)] = acc / (tau > 0 ? tau : 1.0);
    mx = std::max(mx, s[static_cast<std::size_t>(p)]);
  }
  double z = 0;
  for (std::int64_t t = 0; t < n; ++t) z += std::exp(s[static_cast<std::size_t>(t / g)] - mx);
  std::vector<double> prob(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) prob[static_cast<std::size_t>(t)] = std::exp(s[static_cast<std::size_t>(t / g)] - mx) / z;
  // 5. The top-k tokens (one query head per KV head here: no group average).
  return snapkv::top_in_order(prob.data(), n, std::min(k, n));
}

RocketKVPolicy::RocketKVPolicy(const ModelConfig& cfg, Backend& backend, const RocketKVConfig& c)
    : EvictingPolicy(cfg, backend, "rocket_kv"), c_(c) {
  c_.validate();
}

bool RocketKVPolicy::plan(const SequenceInfo& info, std::size_t requested_bytes) {
  const ModelConfig& cfg = config();
  const auto row_tokens = static_cast<std::int64_t>(requested_bytes / KVBudget::full_bytes(cfg, 1));
  const std::int64_t S = info.prompt_len + info.max_new_tokens, T = info.max_new_tokens;
  // Fixed minimum: stage 1 keeps at least the engine's window (or the whole
  // prompt if shorter) beside the generated tokens; the smallest traffic
  // budget whose Pcap holds that sets the minimum resident tokens. Below it the
  // policy keeps that minimum with that B (infeasible), not B = 1 (k = 1).
  const std::int64_t n = info.prompt_len;
  min_keep_ = n <= 1 ? n : std::min(n, snapkv::default_window(info.query_len, n));
  std::int64_t b_min = 1;
  while (b_min < 2 * S && RocketKVParams::derive(b_min, S, T, cfg.head_size()).Pcap - T < min_keep_) ++b_min;
  const std::int64_t r_min = RocketKVParams::derive(b_min, S, T, cfg.head_size()).resident_tokens();
  bool fits = false;
  prm_ = RocketKVParams::for_budget(std::max(row_tokens, r_min), S, T, cfg.head_size(), fits);
  arenas_.clear();
  arenas_.resize(static_cast<std::size_t>(cfg.n_layers));
  bounds_.assign(static_cast<std::size_t>(cfg.n_layers), TensorView{});
  pages_.assign(static_cast<std::size_t>(cfg.n_layers), 0);
  bounded_.assign(static_cast<std::size_t>(cfg.n_layers), {});
  return fits && row_tokens >= r_min;
}

std::vector<std::vector<std::int32_t>> RocketKVPolicy::select(const LayerPrefill& p) {
  const std::int64_t tn = p.tokens, rows = this->rows();
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(rows));
  std::int64_t keep = std::max(prm_.Pcap - slots_after(tn), std::min(min_keep_, tn));
  if (tn <= 1 || tn <= keep) {  // the reference skips stage 1 when the prompt fits
    std::vector<std::int32_t> all(static_cast<std::size_t>(tn));
    std::iota(all.begin(), all.end(), 0);
    for (auto& o : out) o = all;
    return out;
  }
  const std::int64_t w = std::max<std::int64_t>(
      1, std::min({c_.window, tn - 1, std::max(snapkv::default_window(info().query_len, tn), keep / 2)}));
  keep = std::max(keep, w);
  std::int64_t kernel = c_.kernel;
  if (kernel == 0) {
    kernel = std::clamp<std::int64_t>(tn / 128, 3, 63);
    if (kernel % 2 == 0) ++kernel;
  }
  const std::vector<double> s = snapkv::window_scores(backend(), scratch(), p.q, p.k, p.pos, w, kernel, snapkv::Pool::max);
  for (std::int64_t r = 0; r < rows; ++r)
    out[static_cast<std::size_t>(r)] = snapkv::keep_with_window(s.data() + r * (tn - w), tn, w, keep);
  return out;
}

void RocketKVPolicy::after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) {
  const auto l = static_cast<std::size_t>(p.layer);
  const std::int64_t rows = this->rows();
  bounded_[l].assign(static_cast<std::size_t>(rows), 0);
  if (prm_.g < 2) return;  // single-key pages: the keys are their own bounds
  std::int64_t cap = 0;
  for (const auto& k : kept) cap = std::max(cap, static_cast<std::int64_t>(k.size()));
  cap += slots_after(p.tokens);
  pages_[l] = (cap + prm_.g - 1) / prm_.g;
  alloc_bounds(p.layer);
  std::vector<float> host;
  for (std::int64_t r = 0; r < rows; ++r) update_bounds(p.layer, r, host);
}

void RocketKVPolicy::alloc_bounds(std::int64_t layer) {
  const auto l = static_cast<std::size_t>(layer);
  const Shape shape{rows(), pages_[l], 2, config().head_size()};
  arenas_[l] = std::make_unique<Arena>("rocket_kv_bounds", std::max<std::size_t>(static_cast<std::size_t>(shape.numel()) * sizeof(float), 64),
                                       backend().allocator());
  bounds_[l] = arenas_[l]->allocate(shape, DType::f32);
  backend().fill(bounds_[l], 0.0);
}

std::size_t RocketKVPolicy::own_bytes() const {
  std::size_t n = 0;
  for (const auto& a : arenas_)
    if (a) n += a->used_bytes();
  return n;
}

KVMemory RocketKVPolicy::memory() const {
  // The bounds are built at each layer's compression and never grow, so they
  // are held from then on: with the layers' blocks (which only accumulate
  // here) the peak is the base's plus all of them.
  KVMemory m = EvictingPolicy::memory();
  const std::size_t own = own_bytes();
  m.resident_after_prefill += own;
  m.peak_prefill += own;
  m.total += own;
  return m;
}

std::size_t RocketKVPolicy::budget_achieved_bytes() const {
  return EvictingPolicy::budget_achieved_bytes() + own_bytes() / static_cast<std::size_t>(std::max<std::int64_t>(info().batch, 1));
}

// Brings row r's bounds up to its current keys (the new tokens only: their
// pages are recomputed from the keys they hold, as the inf_llm path does at
// every step). `host` returns the row's bounds (pages x 2 x HS).
void RocketKVPolicy::update_bounds(std::int64_t layer, std::int64_t r, std::vector<float>& host) {
  const auto l = static_cast<std::size_t>(layer);
  const std::int64_t hs = config().head_size(), g = prm_.g, n = row_len(layer, r);
  std::int64_t& done = bounded_[l][static_cast<std::size_t>(r)];
  const TensorView brow = bounds_[l].reshaped(Shape{rows() * pages_[l], 2 * hs}).rows(r * pages_[l], pages_[l]);
  host.resize(static_cast<std::size_t>(pages_[l] * 2 * hs));
  if (done == n) {
    backend().copy_to_host(brow, std::as_writable_bytes(std::span<float>(host)));
    return;
  }
  DSRSQ_REQUIRE((n + g - 1) / g <= pages_[l], "rocket_kv: row ", r, " of layer ", layer, " outgrew its page bounds");
  const std::int64_t first = (done / g) * g;  // the first page that changes, from its first key
  std::vector<float> keys(static_cast<std::size_t>((n - first) * hs));
  backend().copy_to_host(row_k(layer, r).rows(first, n - first), std::as_writable_bytes(std::span<float>(keys)));
  if (done > 0) backend().copy_to_host(brow, std::as_writable_bytes(std::span<float>(host)));
  const std::vector<float> fresh = page_bounds(keys.data(), n - first, hs, g);
  std::copy(fresh.begin(), fresh.end(), host.begin() + (first / g) * 2 * hs);
  backend().copy_from_host(std::as_bytes(std::span<const float>(host)), brow);
  done = n;
}

void RocketKVPolicy::attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                                TensorView lse) {
  const std::int64_t hs = config().head_size(), n = row_len(layer, r), tn = q.shape[0];
  std::vector<float> bounds;
  if (prm_.g >= 2 && bounds_[static_cast<std::size_t>(layer)].data) update_bounds(layer, r, bounds);
  // Stage 2 is the decode attention: the question's prefill call (context_only)
  // and rows that hold no more than k tokens attend exactly.
  if (tn != 1 || prm_.k >= n) {
    EvictingPolicy::attend_row(layer, r, q, qpos, o, lse);
    return;
  }
  std::vector<float> qh(static_cast<std::size_t>(hs));
  backend().copy_to_host(q.reshaped(Shape{hs}), std::as_writable_bytes(std::span<float>(qh)));
  if (prm_.g < 2) {  // pages of one key: the bounds are the keys
    std::vector<float> keys(static_cast<std::size_t>(n * hs));
    backend().copy_to_host(row_k(layer, r), std::as_writable_bytes(std::span<float>(keys)));
    bounds = page_bounds(keys.data(), n, hs, 1);
  }
  const std::vector<std::int32_t> sel = stage2_select(qh.data(), bounds.data(), n, hs, prm_.g, prm_.r, prm_.k);
  const auto k = static_cast<std::int64_t>(sel.size());
  // 6. Exact attention over the chosen tokens (softmax over them only).
  ArenaScope scope(scratch());
  TensorView idx = scratch().allocate(Shape{k}, DType::i32);
  backend().copy_from_host(std::as_bytes(std::span<const std::int32_t>(sel)), idx);
  TensorView ks = scratch().allocate(Shape{k, hs}, DType::f32), vs = scratch().allocate(Shape{k, hs}, DType::f32);
  backend().gather_rows(GatherRowsArgs{row_k(layer, r), idx, ks});
  backend().gather_rows(GatherRowsArgs{row_v(layer, r), idx, vs});
  const std::vector<std::int32_t> pos = row_positions(layer, r);
  std::vector<std::int32_t> kpos(static_cast<std::size_t>(k));
  for (std::int64_t i = 0; i < k; ++i) kpos[static_cast<std::size_t>(i)] = pos[static_cast<std::size_t>(sel[static_cast<std::size_t>(i)])];
  backend().attention_fwd(AttentionArgs{q.reshaped(Shape{1, 1, 1, hs}), ks.reshaped(Shape{1, k, 1, hs}),
                                        vs.reshaped(Shape{1, k, 1, hs}), o.reshaped(Shape{1, 1, 1, hs}),
                                        lse.reshaped(Shape{1, 1, 1}), qpos.reshaped(Shape{1, 1}),
                                        kvdetail::op_arg(backend(), scratch(), kpos.data(), Shape{1, k}), true, 0.0});
}

double RocketKVPolicy::row_keys_read(std::int64_t layer, std::int64_t r) const {
  return static_cast<double>(std::min(prm_.k, row_len(layer, r)));
}

std::size_t RocketKVPolicy::aux_read_bytes(std::int64_t layer, std::int64_t r) const {
  const std::int64_t n = row_len(layer, r);
  if (prm_.k >= n) return 0;  // exact attention: no approximate scores
  const std::int64_t pages = (n + prm_.g - 1) / prm_.g;
  // One bound (min or max by the sign of q) of each of r channels per page.
  return static_cast<std::size_t>(pages * prm_.r) * sizeof(float);
}

// The base's snapshot plus the bounds and this policy's host state.
namespace {
struct RocketExtra {
  RocketKVParams prm;
  std::int64_t min_keep = 0;
  std::vector<std::int64_t> pages;
  std::vector<std::vector<std::int64_t>> bounded;
  std::vector<char> has_bounds;
};
}  // namespace

std::unique_ptr<KVSnapshot> RocketKVPolicy::snapshot() const {
  auto s = std::make_unique<kvdetail::WrappedSnapshot<RocketExtra>>();
  s->owner = this;
  s->base = EvictingPolicy::snapshot();
  s->extra.prm = prm_;
  s->extra.min_keep = min_keep_;
  s->extra.pages = pages_;
  s->extra.bounded = bounded_;
  for (std::size_t l = 0; l < bounds_.size(); ++l) {
    s->extra.has_bounds.push_back(bounds_[l].data ? 1 : 0);
    if (bounds_[l].data) s->blocks.emplace_back().save(backend(), bounds_[l]);
  }
  s->extra_host_bytes = pages_.size() * sizeof(std::int64_t);
  for (const auto& b : bounded_) s->extra_host_bytes += b.size() * sizeof(std::int64_t);
  return s;
}

void RocketKVPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::wrapped_of<RocketExtra>(snap, this, "rocket_kv");
  EvictingPolicy::restore(*s.base);
  const RocketExtra& e = s.extra;
  const bool same = pages_ == e.pages && bounds_.size() == e.has_bounds.size();
  prm_ = e.prm;
  min_keep_ = e.min_keep;
  pages_ = e.pages;
  bounded_ = e.bounded;
  if (!same) {
    arenas_.clear();
    arenas_.resize(e.has_bounds.size());
    bounds_.assign(e.has_bounds.size(), TensorView{});
  }
  std::size_t bi = 0;
  for (std::size_t l = 0; l < e.has_bounds.size(); ++l) {
    if (!e.has_bounds[l]) {
      arenas_[l].reset();
      bounds_[l] = TensorView{};
      continue;
    }
    if (!bounds_[l].data) alloc_bounds(static_cast<std::int64_t>(l));
    s.blocks[bi++].load(backend(), bounds_[l]);
  }
}

}  // namespace dsrsq
