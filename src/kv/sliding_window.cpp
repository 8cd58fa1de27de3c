#include "kv/sliding_window.hpp"

#include <algorithm>
#include <utility>

#include "model/transformer.hpp"

namespace dsrsq {

SlidingWindowPolicy::SlidingWindowPolicy(const ModelConfig& cfg, Backend& backend, std::int64_t default_sinks)
    : cfg_(cfg), be_(backend), default_sinks_(default_sinks),
      scratch_("kv_scratch", std::size_t{1} << 20, backend.allocator()) {
  DSRSQ_INPUT_CHECK(default_sinks >= 0, "KV policy window: sink count must be >= 0, got ", default_sinks);
}

void SlidingWindowPolicy::begin(const SequenceInfo& info, const KVBudget& budget) {
  kvdetail::check_sequence(cfg_, info);
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  const std::size_t requested = budget.resolve(cfg_, info.budget_basis());
  const std::size_t per_token = KVBudget::full_bytes(cfg_, 1);
  begun_ = false;
  kv_arena_.reset();
  k_.clear();
  v_.clear();
  orig_.clear();
  scratch_.reset();
  scratch_.reset_peak();
  stats_.clear();
  info_ = info;
  budget_ = budget;
  decoding_ = false;
  requested_ = requested;

  // Keep count: never 0 (resolve() already gives at least one token), never
  // more than the sequence can use.
  const auto keep = static_cast<std::int64_t>(std::max<std::size_t>(1, requested / per_token));
  cap_ = std::min(keep, total);
  sinks_ = std::min(default_sinks_, cap_ - 1);
  if (cap_ - sinks_ < info.query_len) sinks_ = std::max<std::int64_t>(0, cap_ - info.query_len);
  // The window holds the last W prompt tokens at the end of prefill (all of
  // them if the prompt fits).
  question_kept_ = info.prompt_len <= cap_ || cap_ - sinks_ >= info.query_len;
  achieved_ = static_cast<std::size_t>(cap_) * per_token;

  const std::int64_t L = cfg_.n_layers, B = info.batch, NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t per = B * cap_ * NH * HS;
  const std::size_t block = static_cast<std::size_t>(2 * L * per) * sizeof(float);
  kv_arena_ = std::make_unique<Arena>("kv_cache_window", block, be_.allocator());
  TensorView all = kv_arena_->allocate(Shape{2 * L * per}, DType::f32);
  be_.fill(all, 0.0);  // empty slots are masked but must not hold NaN
  float* base = all.ptr<float>();
  const Shape s{B, cap_, NH, HS};
  for (std::int64_t l = 0; l < L; ++l) {
    k_.emplace_back(base + (2 * l) * per, s);
    v_.emplace_back(base + (2 * l + 1) * per, s);
  }
  orig_.assign(static_cast<std::size_t>(L), std::vector<std::int32_t>(static_cast<std::size_t>(B * cap_), -1));
  state_.assign(static_cast<std::size_t>(L), LayerState{});
  resident_ = peak_ = 0;
  begun_ = true;
}

std::int64_t SlidingWindowPolicy::logical(const LayerState& st, std::int64_t s) const {
  if (s >= st.len) return -1;
  if (st.len < cap_ || s < sinks_) return s;
  const std::int64_t W = cap_ - sinks_;
  return sinks_ + ((s - st.head) % W + W) % W;
}

void SlidingWindowPolicy::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                                 TensorView out) {
  kvdetail::check_attend("KV policy 'window'", begun_, cfg_, info_.batch, layer, q, k, v, pos, out);
  const std::int64_t Tn = q.shape[1];
  const LayerState& st = state_[static_cast<std::size_t>(layer)];
  std::int64_t t = 0;
  while (t < Tn) {
    // Room left: a whole chunk at once (no eviction inside it). Full: one
    // token at a time, each evicting the oldest window token first.
    const std::int64_t c = st.len < cap_ ? std::min(Tn - t, cap_ - st.len) : 1;
    process(layer, t, c, q, k, v, pos, out);
    t += c;
  }
}

void SlidingWindowPolicy::process(std::int64_t layer, std::int64_t t0, std::int64_t c, const TensorView& q,
                                  const TensorView& k, const TensorView& v, const TensorView& pos,
                                  const TensorView& out) {
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t W = cap_ - sinks_;
  const auto l = static_cast<std::size_t>(layer);
  LayerState& st = state_[l];
  ArenaScope scope(scratch_);

  // 1. Store the new pre-RoPE keys and values (evicting the oldest window
  //    token when full: its slot is overwritten).
  const bool room = st.len < cap_;
  const std::int64_t slot0 = room ? st.len : st.head;
  const TensorView kc = k_[l].reshaped(Shape{B * cap_, NH, HS}), vc = v_[l].reshaped(Shape{B * cap_, NH, HS});
  const TensorView kn = k.reshaped(Shape{B * Tn, NH, HS}), vn = v.reshaped(Shape{B * Tn, NH, HS});
  const TensorView qn = q.reshaped(Shape{B * Tn, NH, HS}), on = out.reshaped(Shape{B * Tn, NH, HS});
  const auto* pp = pos.ptr<std::int32_t>();
  for (std::int64_t b = 0; b < B; ++b) {
    be_.copy(kn.rows(b * Tn + t0, c), kc.rows(b * cap_ + slot0, c));
    be_.copy(vn.rows(b * Tn + t0, c), vc.rows(b * cap_ + slot0, c));
    std::copy(pp + b * Tn + t0, pp + b * Tn + t0 + c, orig_[l].begin() + b * cap_ + slot0);
  }
  if (room) {
    st.len += c;
    if (st.len == cap_) st.head = sinks_;  // oldest window token, once full
  } else {
    st.head = sinks_ + (st.head - sinks_ + 1) % W;
  }
  st.seen += c;

  // 2. Cache indices: keys rotated by their index in the cache, empty slots masked.
  std::vector<std::int32_t> rope_pos(static_cast<std::size_t>(B * cap_)), kpos(static_cast<std::size_t>(B * cap_));
  for (std::int64_t s = 0; s < cap_; ++s) {
    const std::int64_t li = logical(st, s);
    for (std::int64_t b = 0; b < B; ++b) {
      rope_pos[static_cast<std::size_t>(b * cap_ + s)] = li < 0 ? 0 : static_cast<std::int32_t>(li);
      kpos[static_cast<std::size_t>(b * cap_ + s)] = li < 0 ? KVCache::kEmptyPos : static_cast<std::int32_t>(li);
    }
  }
  std::vector<std::int32_t> qpos(static_cast<std::size_t>(B * c));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < c; ++i)
      qpos[static_cast<std::size_t>(b * c + i)] = static_cast<std::int32_t>(room ? slot0 + i : cap_ - 1);

  TensorView krot = scratch_.allocate(Shape{B * cap_, NH, HS}, DType::f32);
  be_.copy(kc, krot);
  be_.rope_fwd(RopeArgs{krot, TensorView(rope_pos.data(), Shape{B * cap_}), cfg_.rope_theta});
  TensorView qc = scratch_.allocate(Shape{B * c, NH, HS}, DType::f32);
  for (std::int64_t b = 0; b < B; ++b) be_.copy(qn.rows(b * Tn + t0, c), qc.rows(b * c, c));
  be_.rope_fwd(RopeArgs{qc, TensorView(qpos.data(), Shape{B * c}), cfg_.rope_theta});

  // 3. Attention over the kept tokens, causal by cache index.
  TensorView oc = scratch_.allocate(Shape{B * c, NH, HS}, DType::f32);
  TensorView lse = scratch_.allocate(Shape{B, NH, c}, DType::f32);
  be_.attention_fwd(AttentionArgs{qc.reshaped(Shape{B, c, NH, HS}), krot.reshaped(Shape{B, cap_, NH, HS}), v_[l],
                                  oc.reshaped(Shape{B, c, NH, HS}), lse, TensorView(qpos.data(), Shape{B, c}),
                                  TensorView(kpos.data(), Shape{B, cap_}), true, 0.0});
  for (std::int64_t b = 0; b < B; ++b) be_.copy(oc.rows(b * c, c), on.rows(b * Tn + t0, c));

  if (decoding_) {
    const std::size_t tok_bytes = 2 * static_cast<std::size_t>(NH * HS) * sizeof(float);
    for (std::int64_t i = 0; i < c; ++i) {
      const std::int64_t keys = room ? slot0 + i + 1 : cap_;
      stats_.read_bytes += static_cast<std::size_t>(B * keys) * tok_bytes;
      stats_.keys += static_cast<double>(keys * B);
      stats_.queries += B;
    }
    if (layer == 0) stats_.tokens += c;
  } else {
    peak_ = std::max(peak_, kv_arena_->peak_bytes());
  }
}

void SlidingWindowPolicy::end_prefill() {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'window': end_prefill() before begin()");
  decoding_ = true;
  resident_ = kv_arena_->used_bytes();
  peak_ = std::max(peak_, kv_arena_->peak_bytes());
}

struct SlidingWindowPolicy::State {
  SequenceInfo info;
  KVBudget budget;
  bool decoding = false;
  std::vector<std::vector<std::int32_t>> orig;
  std::vector<LayerState> layers;
  std::size_t requested = 0, achieved = 0, resident = 0, peak = 0;
  kvdetail::DecodeStats stats;
};

TensorView SlidingWindowPolicy::block() const {
  // k_[0] starts the block: layer 0's K, then its V, then layer 1's ... (begin()).
  return TensorView(k_.front().data, Shape{2 * cfg_.n_layers * info_.batch * cap_ * cfg_.n_heads * cfg_.head_size()},
                    DType::f32, k_.front().device);
}

std::unique_ptr<KVSnapshot> SlidingWindowPolicy::snapshot() const {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'window': snapshot() before begin()");
  auto s = std::make_unique<kvdetail::PolicySnapshot<State>>();
  s->owner = this;
  s->state = State{info_, budget_, decoding_, orig_, state_, requested_, achieved_, resident_, peak_, stats_};
  s->blocks.resize(1);
  s->blocks[0].save(be_, block());
  s->host_bytes = orig_.size() * (orig_.empty() ? 0 : orig_.front().size()) * sizeof(std::int32_t) +
                  state_.size() * sizeof(LayerState);
  return s;
}

void SlidingWindowPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<kvdetail::PolicySnapshot<State>>(snap, this, "window");
  const State& st = s.state;
  // Same sequence and budget: same layout (cap, sinks, question_kept), so the
  // arena is reused; otherwise begin() rebuilds it as it was.
  if (!begun_ || !kvdetail::same_sequence(info_, st.info) || requested_ != st.requested) begin(st.info, st.budget);
  s.blocks[0].load(be_, block());
  decoding_ = st.decoding;
  orig_ = st.orig;
  state_ = st.layers;
  requested_ = st.requested;
  achieved_ = st.achieved;
  resident_ = st.resident;
  peak_ = st.peak;
  stats_ = st.stats;
}

KVMemory SlidingWindowPolicy::memory() const {
  return kvdetail::arena_memory(kv_arena_.get(), decoding_, resident_, peak_, stats_);
}

std::vector<std::int32_t> SlidingWindowPolicy::kept_positions(std::int64_t layer, std::int64_t b) const {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < cfg_.n_layers && b >= 0 && b < info_.batch,
                    "KV policy window: kept_positions(", layer, ", ", b, ") out of range");
  const LayerState& st = state_[static_cast<std::size_t>(layer)];
  std::vector<std::pair<std::int64_t, std::int32_t>> v;
  for (std::int64_t s = 0; s < st.len; ++s)
    v.emplace_back(logical(st, s), orig_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(b * cap_ + s)]);
  std::sort(v.begin(), v.end());
  std::vector<std::int32_t> r;
  for (const auto& e : v) r.push_back(e.second);
  return r;
}

}  // namespace dsrsq
