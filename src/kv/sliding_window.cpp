#include "kv/sliding_window.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

#include "model/transformer.hpp"

namespace dsrsq {

SlidingWindowPolicy::SlidingWindowPolicy(const ModelConfig& cfg, Backend& backend, std::int64_t default_sinks)
    : cfg_(cfg), be_(backend), default_sinks_(default_sinks),
      scratch_("kv_scratch", std::size_t{1} << 20, backend.allocator()), idx_(backend) {
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
  ring_kpos_.clear();
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
  const Shape s{B, cap_, NH, HS};
  for (std::int64_t l = 0; l < L; ++l) {
    k_.push_back(all.rows((2 * l) * per, per).reshaped(s));
    v_.push_back(all.rows((2 * l + 1) * per, per).reshaped(s));
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
    // Room left: a whole chunk at once (no eviction inside it). Full: chunks of
    // at most W tokens (kFullChunk), each token evicting the oldest window token.
    const std::int64_t c = st.len < cap_ ? std::min(Tn - t, cap_ - st.len)
                                         : std::min({Tn - t, cap_ - sinks_, kFullChunk});
    process(layer, t, c, q, k, v, pos, out);
    t += c;
  }
}

void SlidingWindowPolicy::process(std::int64_t layer, std::int64_t t0, std::int64_t c, const TensorView& q,
                                  const TensorView& k, const TensorView& v, const TensorView& pos,
                                  const TensorView& out) {
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t W = cap_ - sinks_, S = sinks_;
  const auto l = static_cast<std::size_t>(layer);
  LayerState& st = state_[l];
  ArenaScope scope(scratch_);
  auto idx = [](std::int64_t x) { return static_cast<std::size_t>(x); };

  const TensorView kc = k_[l].reshaped(Shape{B * cap_, NH, HS}), vc = v_[l].reshaped(Shape{B * cap_, NH, HS});
  const TensorView kn = k.reshaped(Shape{B * Tn, NH, HS}), vn = v.reshaped(Shape{B * Tn, NH, HS});
  const TensorView qn = q.reshaped(Shape{B * Tn, NH, HS}), on = out.reshaped(Shape{B * Tn, NH, HS});
  const std::vector<std::int32_t> pos_host = to_host<std::int32_t>(be_, pos);
  const std::int32_t* pp = pos_host.data();
  idx_.reset();
  const Shape rows{B * c, NH, HS}, bshape{B, c, NH, HS};

  // The chunk's tokens have stream indices tau = seen .. seen + c - 1; keys
  // are rotated by tau once, here (see the header: relative positions).
  const std::int64_t tau0 = st.seen;
  std::vector<std::int32_t> tau(idx(B * c));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < c; ++i) tau[idx(b * c + i)] = static_cast<std::int32_t>(tau0 + i);
  const TensorView tau_v = idx_(tau, Shape{B * c});
  TensorView kr = scratch_.allocate(rows, DType::f32), vr = scratch_.allocate(rows, DType::f32);
  TensorView qw = scratch_.allocate(rows, DType::f32);
  for (std::int64_t b = 0; b < B; ++b) {
    be_.copy(kn.rows(b * Tn + t0, c), kr.rows(b * c, c));
    be_.copy(vn.rows(b * Tn + t0, c), vr.rows(b * c, c));
    be_.copy(qn.rows(b * Tn + t0, c), qw.rows(b * c, c));
  }
  be_.rope_fwd(RopeArgs{kr, tau_v, cfg_.rope_theta});
  TensorView oc = scratch_.allocate(rows, DType::f32);
  TensorView lse = scratch_.allocate(Shape{B, NH, c}, DType::f32);
  // Stores the chunk into slots [slot, slot + n) of every row (contiguous).
  auto store = [&](std::int64_t i0, std::int64_t slot, std::int64_t n) {
    for (std::int64_t b = 0; b < B; ++b) {
      be_.copy(kr.rows(b * c + i0, n), kc.rows(b * cap_ + slot, n));
      be_.copy(vr.rows(b * c + i0, n), vc.rows(b * cap_ + slot, n));
      std::copy(pp + b * Tn + t0 + i0, pp + b * Tn + t0 + i0 + n, orig_[l].begin() + b * cap_ + slot);
    }
  };

  const bool room = st.len < cap_;
  if (room) {
    // While the cache has room, cache index = stream index: store the chunk,
    // then causal attention over the filled slots (the plain model).
    const std::int64_t slot0 = st.len;
    store(0, slot0, c);
    st.len += c;
    if (st.len == cap_) st.head = sinks_;  // oldest window token, once full
    std::vector<std::int32_t> kpos(idx(B * cap_));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t s = 0; s < cap_; ++s)
        kpos[idx(b * cap_ + s)] = s < st.len ? static_cast<std::int32_t>(s) : KVCache::kEmptyPos;
    be_.rope_fwd(RopeArgs{qw, tau_v, cfg_.rope_theta, cfg_.attn_log_base});
    be_.attention_fwd(AttentionArgs{qw.reshaped(bshape), k_[l], v_[l], oc.reshaped(bshape), lse, tau_v.reshaped(Shape{B, c}),
                                    idx_(kpos, Shape{B, cap_}), true, 0.0});
  } else {
    // Full: token tau sees the sinks at cache indices 0..S-1 from query index
    // cap - 1, and the window tau - W + 1 .. tau. Every query stands at cache
    // index cap - 1, so its log-length factor (ModelConfig::attn_log_base) is
    // s(cap - 1) over all its keys: the queries are rotated without it and the
    // factor goes into the attention scale. Key sets, merged by log-sum-exp
    // (each query's own softmax over its S + W keys):
    //   A  the ring as it is before this chunk: token u (stream index tau_u)
    //      is visible to tau iff tau_u >= tau - W + 1, written for the causal
    //      rule k_pos <= q_pos as k_pos = base - (tau_u + W - 1), q_pos = base - tau;
    //   B  the chunk's own keys, causal by stream index (c <= W: none too old);
    //   C  the sinks, the query rotated by cache index cap - 1 instead of tau.
    // A and B use keys and queries rotated by stream index: q_tau . k_u
    // depends on tau - u only, which is the distance of their cache indices.
    // One token (decode): it is stored first, over the oldest window token
    // (tau - W, which it does not see), and A and B become one call in which
    // every window slot is visible.
    const double scale =
        log_length_scale(cfg_.attn_log_base, static_cast<double>(cap_ - 1)) / std::sqrt(static_cast<double>(HS));
    be_.rope_fwd(RopeArgs{qw, tau_v, cfg_.rope_theta});
    TensorView ob = scratch_.allocate(rows, DType::f32);
    TensorView lb = scratch_.allocate(Shape{B, NH, c}, DType::f32);
    if (c == 1) {
      store(0, st.head, 1);
      st.head = S + (st.head - S + 1) % W;
      if (static_cast<std::int64_t>(ring_kpos_.size()) != B * cap_) {
        ring_kpos_.assign(idx(B * cap_), 0);  // window slots: visible from q_pos 0
        for (std::int64_t b = 0; b < B; ++b)
          std::fill_n(ring_kpos_.begin() + b * cap_, S, KVCache::kEmptyPos);
      }
      std::vector<std::int32_t> qpos(idx(B), 0);
      be_.attention_fwd(AttentionArgs{qw.reshaped(bshape), k_[l], v_[l], oc.reshaped(bshape), lse,
                                      idx_(qpos, Shape{B, 1}), idx_(ring_kpos_, Shape{B, cap_}), true, scale});
    } else {
      const std::int64_t base = tau0 + c + W;
      std::vector<std::int32_t> kpos(idx(B * cap_)), qpos(idx(B * c));
      for (std::int64_t s = 0; s < cap_; ++s) {
        // Window slot s holds stream index seen - cap + logical(s) (the oldest, at S, is seen - W).
        const std::int64_t tu = tau0 - cap_ + logical(st, s);
        const std::int32_t kp = s < S ? KVCache::kEmptyPos : static_cast<std::int32_t>(base - (tu + W - 1));
        for (std::int64_t b = 0; b < B; ++b) kpos[idx(b * cap_ + s)] = kp;
      }
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t i = 0; i < c; ++i) qpos[idx(b * c + i)] = static_cast<std::int32_t>(base - (tau0 + i));
      be_.attention_fwd(AttentionArgs{qw.reshaped(bshape), k_[l], v_[l], oc.reshaped(bshape), lse,
                                      idx_(qpos, Shape{B, c}), idx_(kpos, Shape{B, cap_}), true, scale});
      be_.attention_fwd(AttentionArgs{qw.reshaped(bshape), kr.reshaped(bshape), vr.reshaped(bshape),
                                      ob.reshaped(bshape), lb, tau_v.reshaped(Shape{B, c}), tau_v.reshaped(Shape{B, c}),
                                      true, scale});
      be_.attention_merge(AttentionMergeArgs{oc.reshaped(bshape), lse, ob.reshaped(bshape), lb});
    }
    if (S > 0) {
      TensorView qs = scratch_.allocate(rows, DType::f32);
      TensorView ks = scratch_.allocate(Shape{B * S, NH, HS}, DType::f32), vs = scratch_.allocate(Shape{B * S, NH, HS}, DType::f32);
      for (std::int64_t b = 0; b < B; ++b) {
        be_.copy(qn.rows(b * Tn + t0, c), qs.rows(b * c, c));
        be_.copy(kc.rows(b * cap_, S), ks.rows(b * S, S));  // rotated by stream index = cache index s
        be_.copy(vc.rows(b * cap_, S), vs.rows(b * S, S));
      }
      std::vector<std::int32_t> qsp(idx(B * c), static_cast<std::int32_t>(cap_ - 1)), ksp(idx(B * S));
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t s = 0; s < S; ++s) ksp[idx(b * S + s)] = static_cast<std::int32_t>(s);
      const TensorView qsp_v = idx_(qsp, Shape{B * c});
      be_.rope_fwd(RopeArgs{qs, qsp_v, cfg_.rope_theta});
      const Shape sshape{B, S, NH, HS};
      be_.attention_fwd(AttentionArgs{qs.reshaped(bshape), ks.reshaped(sshape), vs.reshaped(sshape), ob.reshaped(bshape), lb,
                                      qsp_v.reshaped(Shape{B, c}), idx_(ksp, Shape{B, S}), true, scale});
      be_.attention_merge(AttentionMergeArgs{oc.reshaped(bshape), lse, ob.reshaped(bshape), lb});
    }
    if (c > 1) {
      // Evict: the chunk overwrites the c oldest window slots (ring order, at
      // most two contiguous runs).
      const std::int64_t first = std::min(c, cap_ - st.head);
      store(0, st.head, first);
      if (first < c) store(first, S, c - first);
      st.head = S + (st.head - S + c) % W;
    }
  }
  st.seen += c;
  for (std::int64_t b = 0; b < B; ++b) be_.copy(oc.rows(b * c, c), on.rows(b * Tn + t0, c));

  if (decoding_) {
    const std::size_t tok_bytes = 2 * static_cast<std::size_t>(NH * HS) * sizeof(float);
    for (std::int64_t i = 0; i < c; ++i) {
      // Keys of query i: every kept token up to itself (min(K, its stream index + 1)).
      const std::int64_t keys = std::min(cap_, tau0 + i + 1);
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
