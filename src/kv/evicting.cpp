#include "kv/evicting.hpp"

#include <algorithm>
#include <span>

#include "model/transformer.hpp"

namespace dsrsq {

// One layer's cache: every row's K and V in one block of ragged rows (row r
// owns slots [off[r], off[r] + cap[r]), the first len[r] in use), plus the
// subclass's resident per-row state (extra), all from the layer's own arena.
struct EvictingPolicy::Layer {
  bool ready = false;
  std::unique_ptr<Arena> arena;
  TensorView k, v;  // (slots, HS)
  std::vector<std::int64_t> off, cap, len;
  std::vector<std::int32_t> pos;  // (slots) original positions (host)
  std::vector<TensorView> extra;  // layer_alloc() blocks, in allocation order
  // pos on the backend, for attention (an arena of its own: positions are not
  // KV bytes); on the CPU backend the host vector itself.
  std::unique_ptr<Arena> pos_arena;
  TensorView dpos;
  std::int64_t slots() const { return off.empty() ? 0 : off.back() + cap.back(); }
  // After pos[from, from + n) changed (n < 0: all of it, or pos was replaced).
  void upload_pos(Backend& be, std::int64_t from = 0, std::int64_t n = -1) {
    const auto size = static_cast<std::int64_t>(pos.size());
    if (be.device() == Device::cpu) {
      dpos = TensorView(pos.data(), Shape{size});
      return;
    }
    if (dpos.empty() || dpos.numel() != size) {
      pos_arena = std::make_unique<Arena>("kv_positions", std::max<std::size_t>(pos.size() * 4, 64), be.allocator());
      dpos = pos_arena->allocate(Shape{size}, DType::i32);
      n = -1;
    }
    if (n < 0) {
      from = 0;
      n = size;
    }
    be.copy_from_host(std::as_bytes(std::span<const std::int32_t>(pos.data() + from, static_cast<std::size_t>(n))),
                      dpos.rows(from, n));
  }
};

namespace {

// Rows of x (B, Tn, NH, HS) in (sequence, head)-major order: row (b*NH + h)*Tn + t
// of the result is token t of head h of sequence b; and the inverse.
std::vector<std::int32_t> to_heads_major(std::int64_t B, std::int64_t Tn, std::int64_t NH) {
  std::vector<std::int32_t> idx(static_cast<std::size_t>(B * Tn * NH));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t t = 0; t < Tn; ++t)
        idx[static_cast<std::size_t>((b * NH + h) * Tn + t)] = static_cast<std::int32_t>((b * Tn + t) * NH + h);
  return idx;
}
std::vector<std::int32_t> from_heads_major(std::int64_t B, std::int64_t Tn, std::int64_t NH) {
  std::vector<std::int32_t> idx(static_cast<std::size_t>(B * Tn * NH));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t t = 0; t < Tn; ++t)
        idx[static_cast<std::size_t>((b * Tn + t) * NH + h)] = static_cast<std::int32_t>((b * NH + h) * Tn + t);
  return idx;
}

TensorView device_index(Backend& be, Arena& scratch, const std::vector<std::int32_t>& idx) {
  TensorView t = scratch.allocate(Shape{static_cast<std::int64_t>(idx.size())}, DType::i32);
  be.copy_from_host(std::as_bytes(std::span(idx)), t);
  return t;
}

}  // namespace

EvictingPolicy::EvictingPolicy(const ModelConfig& cfg, Backend& backend, std::string name)
    : cfg_(cfg), be_(backend), name_(std::move(name)), scratch_("kv_scratch", std::size_t{1} << 20, backend.allocator()) {}

EvictingPolicy::~EvictingPolicy() = default;

void EvictingPolicy::begin(const SequenceInfo& info, const KVBudget& budget) {
  kvdetail::check_sequence(cfg_, info);
  const std::size_t requested = budget.resolve(cfg_, info.budget_basis());
  begun_ = false;
  layers_.clear();
  scratch_.reset();
  stats_.clear();
  info_ = info;
  budget_ = budget;
  decoding_ = false;
  requested_ = requested;
  resident_ = peak_ = transient_peak_ = 0;
  for (std::int64_t l = 0; l < cfg_.n_layers; ++l) layers_.push_back(std::make_unique<Layer>());
  begun_ = true;
  infeasible_ = !plan(info, requested);
}

bool EvictingPolicy::layer_ready(std::int64_t layer) const {
  return layer >= 0 && layer < cfg_.n_layers && layers_.at(static_cast<std::size_t>(layer))->ready;
}

std::int64_t EvictingPolicy::row_len(std::int64_t layer, std::int64_t r) const {
  const Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  return L.ready ? L.len.at(static_cast<std::size_t>(r)) : 0;
}

std::vector<std::int32_t> EvictingPolicy::row_positions(std::int64_t layer, std::int64_t r) const {
  const Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  if (!L.ready) return {};
  const auto o = L.off.at(static_cast<std::size_t>(r));
  return {L.pos.begin() + o, L.pos.begin() + o + L.len[static_cast<std::size_t>(r)]};
}

TensorView EvictingPolicy::row_k(std::int64_t layer, std::int64_t r) const {
  const Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  DSRSQ_INPUT_CHECK(L.ready, "KV policy '", name_, "': layer ", layer, " has no cache yet");
  return L.k.rows(L.off.at(static_cast<std::size_t>(r)), L.len[static_cast<std::size_t>(r)]);
}

TensorView EvictingPolicy::row_v(std::int64_t layer, std::int64_t r) const {
  const Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  DSRSQ_INPUT_CHECK(L.ready, "KV policy '", name_, "': layer ", layer, " has no cache yet");
  return L.v.rows(L.off.at(static_cast<std::size_t>(r)), L.len[static_cast<std::size_t>(r)]);
}

TensorView EvictingPolicy::layer_alloc(std::int64_t layer, Shape shape, DType dtype) {
  Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  DSRSQ_INPUT_CHECK(L.arena != nullptr, "KV policy '", name_, "': layer_alloc() before layer ", layer, " is filled");
  TensorView t = L.arena->allocate(shape, dtype);
  be_.fill(t, 0.0);
  L.extra.push_back(t);
  return t;
}

std::size_t EvictingPolicy::held_bytes() const {
  std::size_t n = 0;
  for (const auto& L : layers_)
    if (L->arena) n += L->arena->used_bytes();
  return n;
}

std::size_t EvictingPolicy::budget_achieved_bytes() const {
  const std::size_t held = decoding_ ? resident_ : held_bytes();
  return held / static_cast<std::size_t>(std::max<std::int64_t>(info_.batch, 1));
}

void EvictingPolicy::fill_layer(std::int64_t layer, const LayerPrefill& p,
                                const std::vector<std::vector<std::int32_t>>& keep) {
  const std::int64_t B = info_.batch, NH = cfg_.n_heads, HS = cfg_.head_size(), Tn = p.tokens, R = rows();
  DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(keep.size()) == R, "KV policy '", name_, "': select() returned ",
                    keep.size(), " rows, expected ", R);
  Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const std::int64_t extra = slots_after(Tn);
  L.off.assign(static_cast<std::size_t>(R), 0);
  L.cap.assign(static_cast<std::size_t>(R), 0);
  L.len.assign(static_cast<std::size_t>(R), 0);
  std::int64_t slots = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    const auto& kr = keep[static_cast<std::size_t>(r)];
    for (std::size_t i = 0; i < kr.size(); ++i)
      DSRSQ_INPUT_CHECK(kr[i] >= 0 && kr[i] < Tn && (i == 0 || kr[i] > kr[i - 1]), "KV policy '", name_,
                        "': select() row ", r, " must list ascending indices in [0, ", Tn, ")");
    L.off[static_cast<std::size_t>(r)] = slots;
    L.cap[static_cast<std::size_t>(r)] = static_cast<std::int64_t>(kr.size()) + extra;
    L.len[static_cast<std::size_t>(r)] = static_cast<std::int64_t>(kr.size());
    slots += L.cap[static_cast<std::size_t>(r)];
  }
  const std::size_t block = static_cast<std::size_t>(2 * std::max<std::int64_t>(slots, 1) * HS) * sizeof(float);
  L.arena = std::make_unique<Arena>(name_ + "_kv", block, be_.allocator());
  L.extra.clear();
  TensorView all = L.arena->allocate(Shape{2 * std::max<std::int64_t>(slots, 1) * HS}, DType::f32);
  be_.fill(all, 0.0);
  L.k = TensorView(all.data, Shape{std::max<std::int64_t>(slots, 1), HS}, DType::f32, all.device);
  L.v = TensorView(static_cast<float*>(all.data) + std::max<std::int64_t>(slots, 1) * HS,
                   Shape{std::max<std::int64_t>(slots, 1), HS}, DType::f32, all.device);
  L.pos.assign(static_cast<std::size_t>(std::max<std::int64_t>(slots, 1)), KVCache::kEmptyPos);

  ArenaScope scope(scratch_);
  const auto* pp = p.pos.ptr<std::int32_t>();  // host (LayerPrefill)
  const TensorView ksrc = p.k.reshaped(Shape{B * Tn * NH, HS}), vsrc = p.v.reshaped(Shape{B * Tn * NH, HS});
  for (std::int64_t r = 0; r < R; ++r) {
    const auto& kr = keep[static_cast<std::size_t>(r)];
    if (kr.empty()) continue;
    const std::int64_t b = r / NH, h = r % NH, n = static_cast<std::int64_t>(kr.size()), o = L.off[static_cast<std::size_t>(r)];
    std::vector<std::int32_t> src(kr.size());
    for (std::size_t i = 0; i < kr.size(); ++i) {
      src[i] = static_cast<std::int32_t>((b * Tn + kr[i]) * NH + h);
      L.pos[static_cast<std::size_t>(o) + i] = pp[b * Tn + kr[i]];
    }
    const TensorView idx = device_index(be_, scratch_, src);
    be_.gather_rows(GatherRowsArgs{ksrc, idx, L.k.rows(o, n)});
    be_.gather_rows(GatherRowsArgs{vsrc, idx, L.v.rows(o, n)});
  }
  L.upload_pos(be_);
  L.ready = true;
}

void EvictingPolicy::append(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos) {
  const std::int64_t B = info_.batch, NH = cfg_.n_heads, HS = cfg_.head_size(), Tn = k.shape[1], R = rows();
  Layer& L = *layers_[static_cast<std::size_t>(layer)];
  ArenaScope scope(scratch_);
  const std::vector<std::int32_t> pos_host = to_host<std::int32_t>(be_, pos);
  const std::int32_t* pp = pos_host.data();
  const TensorView ksrc = k.reshaped(Shape{B * Tn * NH, HS}), vsrc = v.reshaped(Shape{B * Tn * NH, HS});
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t b = r / NH, h = r % NH;
    auto& len = L.len[static_cast<std::size_t>(r)];
    DSRSQ_INPUT_CHECK(len + Tn <= L.cap[static_cast<std::size_t>(r)], "KV policy '", name_, "': row ", r,
                      " of layer ", layer, " is full (", L.cap[static_cast<std::size_t>(r)],
                      " slots: prompt_len + max_new_tokens exceeded)");
    std::vector<std::int32_t> src(static_cast<std::size_t>(Tn));
    const std::int64_t o = L.off[static_cast<std::size_t>(r)] + len;
    for (std::int64_t t = 0; t < Tn; ++t) {
      src[static_cast<std::size_t>(t)] = static_cast<std::int32_t>((b * Tn + t) * NH + h);
      L.pos[static_cast<std::size_t>(o + t)] = pp[b * Tn + t];
    }
    const TensorView idx = device_index(be_, scratch_, src);
    be_.gather_rows(GatherRowsArgs{ksrc, idx, L.k.rows(o, Tn)});
    be_.gather_rows(GatherRowsArgs{vsrc, idx, L.v.rows(o, Tn)});
    L.upload_pos(be_, o, Tn);
    len += Tn;
  }
}

void EvictingPolicy::attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                                TensorView lse) {
  const Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const std::int64_t HS = cfg_.head_size(), n = L.len[static_cast<std::size_t>(r)], Tn = q.shape[0];
  const TensorView k = row_k(layer, r).reshaped(Shape{1, n, 1, HS}), v = row_v(layer, r).reshaped(Shape{1, n, 1, HS});
  const TensorView kpos = L.dpos.rows(L.off[static_cast<std::size_t>(r)], n).reshaped(Shape{1, n});
  be_.attention_fwd(AttentionArgs{q.reshaped(Shape{1, Tn, 1, HS}), k, v, o.reshaped(Shape{1, Tn, 1, HS}),
                                  lse.reshaped(Shape{1, 1, Tn}), qpos.reshaped(Shape{1, Tn}), kpos, true, 0.0});
}

void EvictingPolicy::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                            TensorView out) {
  kvdetail::check_attend(name_.c_str(), begun_, cfg_, info_.batch, layer, q, k, v, pos, out);
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size(), R = rows();
  Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const TensorView pos_flat = pos.reshaped(Shape{B * Tn});
  be_.rope_fwd(RopeArgs{q.reshaped(Shape{B * Tn, NH, HS}), pos_flat, cfg_.rope_theta, cfg_.attn_log_base});
  be_.rope_fwd(RopeArgs{k.reshaped(Shape{B * Tn, NH, HS}), pos_flat, cfg_.rope_theta});

  if (!L.ready) {
    DSRSQ_INPUT_CHECK(!decoding_, "KV policy '", name_, "': layer ", layer, " decodes before its prefill");
    // The compression call: exact attention over the call, then selection.
    Arena transient(name_ + "_prefill", std::max<std::size_t>(2 * k.bytes(), 64), be_.allocator());
    TensorView kt = transient.allocate(k.shape, DType::f32), vt = transient.allocate(v.shape, DType::f32);
    be_.copy(k, kt);
    be_.copy(v, vt);
    ArenaScope scope(scratch_);
    TensorView lse = scratch_.allocate(Shape{B, NH, Tn}, DType::f32);
    be_.attention_fwd(AttentionArgs{q, kt, vt, out, lse, pos, pos, true, 0.0});
    std::vector<std::int32_t> pos_host = to_host<std::int32_t>(be_, pos);  // select() reads positions on the host
    LayerPrefill p{layer, Tn, q, kt, vt, TensorView(pos_host.data(), pos.shape), out, lse};
    const auto keep = select(p);
    fill_layer(layer, p, keep);
    after_select(p, keep);
    peak_ = std::max(peak_, held_bytes() + transient.used_bytes());
    return;
  }

  append(layer, k, v, pos);
  ArenaScope scope(scratch_);
  // Heads as rows: queries to (R, Tn, HS), each row attends, outputs back.
  const TensorView qt = scratch_.allocate(Shape{R * Tn, HS}, DType::f32);
  const TensorView ot = scratch_.allocate(Shape{R * Tn, HS}, DType::f32);
  const TensorView lse = scratch_.allocate(Shape{R, Tn}, DType::f32);
  be_.gather_rows(GatherRowsArgs{q.reshaped(Shape{B * Tn * NH, HS}), device_index(be_, scratch_, to_heads_major(B, Tn, NH)), qt});
  std::vector<std::int32_t> qp(static_cast<std::size_t>(R * Tn));
  const std::vector<std::int32_t> pos_host = to_host<std::int32_t>(be_, pos);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t t = 0; t < Tn; ++t) qp[static_cast<std::size_t>(r * Tn + t)] = pos_host[static_cast<std::size_t>((r / NH) * Tn + t)];
  const TensorView qpv = be_.device() == Device::cpu ? TensorView(qp.data(), Shape{R * Tn}) : device_index(be_, scratch_, qp);
  for (std::int64_t r = 0; r < R; ++r)
    attend_row(layer, r, qt.rows(r * Tn, Tn).reshaped(Shape{Tn, 1, HS}), qpv.rows(r * Tn, Tn),
               ot.rows(r * Tn, Tn).reshaped(Shape{Tn, 1, HS}), lse.rows(r, 1).reshaped(Shape{1, Tn}));
  be_.gather_rows(GatherRowsArgs{ot, device_index(be_, scratch_, from_heads_major(B, Tn, NH)),
                                 out.reshaped(Shape{B * Tn * NH, HS})});

  if (decoding_) {
    // Per decode token and layer: bytes read summed over rows; keys averaged over heads.
    for (std::int64_t t = 0; t < Tn; ++t) {
      double keys = 0;
      for (std::int64_t r = 0; r < R; ++r) {
        const double kr = row_keys_read(layer, r);
        keys += kr;
        stats_.read_bytes += static_cast<std::size_t>(kr) * token_bytes() + aux_read_bytes(layer, r);
      }
      stats_.keys += keys / static_cast<double>(NH);
      stats_.queries += B;
    }
    if (layer == 0) stats_.tokens += Tn;
  } else {
    peak_ = std::max(peak_, held_bytes());
  }
}

void EvictingPolicy::end_prefill() {
  DSRSQ_INPUT_CHECK(begun_, "KV policy '", name_, "': end_prefill() before begin()");
  decoding_ = true;
  resident_ = held_bytes();
  peak_ = std::max(peak_, resident_);
}

KVMemory EvictingPolicy::memory() const {
  KVMemory m;
  m.resident_after_prefill = decoding_ ? resident_ : held_bytes();
  m.peak_prefill = std::max(peak_, m.resident_after_prefill);
  m.read_per_step = stats_.read_per_step();
  m.total = m.resident_after_prefill;
  return m;
}

void EvictingPolicy::reselect(std::int64_t layer, const std::vector<std::vector<std::int32_t>>& keep) {
  Layer& L = *layers_.at(static_cast<std::size_t>(layer));
  DSRSQ_INPUT_CHECK(L.ready, "KV policy '", name_, "': reselect() of layer ", layer, " before it is filled");
  const std::int64_t R = rows(), HS = cfg_.head_size();
  DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(keep.size()) == R, "KV policy '", name_, "': reselect() needs ", R,
                    " rows, got ", keep.size());
  auto next = std::make_unique<Layer>();
  next->off.assign(static_cast<std::size_t>(R), 0);
  next->cap.assign(static_cast<std::size_t>(R), 0);
  next->len.assign(static_cast<std::size_t>(R), 0);
  std::int64_t slots = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    const auto ri = static_cast<std::size_t>(r);
    const auto& kr = keep[ri];
    for (std::size_t i = 0; i < kr.size(); ++i)
      DSRSQ_INPUT_CHECK(kr[i] >= 0 && kr[i] < L.len[ri] && (i == 0 || kr[i] > kr[i - 1]), "KV policy '", name_,
                        "': reselect() row ", r, " must list ascending indices of its ", L.len[ri], " tokens");
    next->off[ri] = slots;
    next->len[ri] = static_cast<std::int64_t>(kr.size());
    next->cap[ri] = next->len[ri] + (L.cap[ri] - L.len[ri]);  // the free slots stay
    slots += next->cap[ri];
  }
  const std::int64_t s1 = std::max<std::int64_t>(slots, 1);
  next->arena = std::make_unique<Arena>(name_ + "_kv", static_cast<std::size_t>(2 * s1 * HS) * sizeof(float),
                                        be_.allocator());
  TensorView all = next->arena->allocate(Shape{2 * s1 * HS}, DType::f32);
  be_.fill(all, 0.0);
  next->k = TensorView(all.data, Shape{s1, HS}, DType::f32, all.device);
  next->v = TensorView(static_cast<float*>(all.data) + s1 * HS, Shape{s1, HS}, DType::f32, all.device);
  next->pos.assign(static_cast<std::size_t>(s1), KVCache::kEmptyPos);
  ArenaScope scope(scratch_);
  for (std::int64_t r = 0; r < R; ++r) {
    const auto ri = static_cast<std::size_t>(r);
    const auto& kr = keep[ri];
    if (kr.empty()) continue;
    std::vector<std::int32_t> src(kr.size());
    for (std::size_t i = 0; i < kr.size(); ++i) {
      src[i] = static_cast<std::int32_t>(L.off[ri] + kr[i]);
      next->pos[static_cast<std::size_t>(next->off[ri]) + i] = L.pos[static_cast<std::size_t>(L.off[ri] + kr[i])];
    }
    const TensorView idx = device_index(be_, scratch_, src);
    const auto n = static_cast<std::int64_t>(kr.size());
    be_.gather_rows(GatherRowsArgs{L.k, idx, next->k.rows(next->off[ri], n)});
    be_.gather_rows(GatherRowsArgs{L.v, idx, next->v.rows(next->off[ri], n)});
  }
  next->upload_pos(be_);
  next->ready = true;
  // Both blocks exist while the rows move: that moment counts in the peak.
  peak_ = std::max(peak_, held_bytes() + next->arena->used_bytes());
  layers_[static_cast<std::size_t>(layer)] = std::move(next);
}

// ---- snapshots (the reuse protocol) ----------------------------------------------

struct EvictingPolicy::State {
  struct LayerState {
    bool ready = false;
    std::vector<std::int64_t> off, cap, len;
    std::vector<std::int32_t> pos;
    std::vector<Shape> extra_shapes;
    std::vector<DType> extra_types;
  };
  SequenceInfo info;
  KVBudget budget;
  bool decoding = false, infeasible = false;
  std::size_t requested = 0, resident = 0, peak = 0;
  kvdetail::DecodeStats stats;
  std::vector<LayerState> layers;
};

std::unique_ptr<KVSnapshot> EvictingPolicy::snapshot() const {
  DSRSQ_INPUT_CHECK(begun_, "KV policy '", name_, "': snapshot() before begin()");
  auto s = std::make_unique<kvdetail::PolicySnapshot<State>>();
  s->owner = this;
  State& st = s->state;
  st = State{info_, budget_, decoding_, infeasible_, requested_, resident_, peak_, stats_, {}};
  for (const auto& L : layers_) {
    State::LayerState ls{L->ready, L->off, L->cap, L->len, L->pos, {}, {}};
    if (L->ready) {
      s->blocks.emplace_back().save(be_, TensorView(L->k.data, Shape{2 * L->k.shape[0] * L->k.shape[1]}, DType::f32,
                                                     L->k.device));
      for (const TensorView& e : L->extra) {
        ls.extra_shapes.push_back(e.shape);
        ls.extra_types.push_back(e.dtype);
        s->blocks.emplace_back().save(be_, e);
      }
    }
    s->host_bytes += L->pos.size() * sizeof(std::int32_t);
    st.layers.push_back(std::move(ls));
  }
  return s;
}

void EvictingPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<kvdetail::PolicySnapshot<State>>(snap, this, name_.c_str());
  const State& st = s.state;
  // Reuse the layers' allocations when their layout is the snapshot's (the
  // common case: questions appended to the same compressed context), so the
  // views a subclass holds on layer_alloc() blocks stay valid.
  bool same = begun_ && kvdetail::same_sequence(info_, st.info) && requested_ == st.requested &&
              layers_.size() == st.layers.size();
  for (std::size_t l = 0; same && l < layers_.size(); ++l) {
    const auto& L = *layers_[l];
    const auto& ls = st.layers[l];
    same = L.ready == ls.ready && (!ls.ready || (L.off == ls.off && L.cap == ls.cap && L.extra.size() == ls.extra_shapes.size()));
  }
  if (!same) {
    info_ = st.info;
    budget_ = st.budget;
    layers_.clear();
    for (std::size_t l = 0; l < st.layers.size(); ++l) {
      auto L = std::make_unique<Layer>();
      const auto& ls = st.layers[l];
      if (ls.ready) {
        std::int64_t slots = ls.off.empty() ? 1 : std::max<std::int64_t>(ls.off.back() + ls.cap.back(), 1);
        const std::int64_t HS = cfg_.head_size();
        L->arena = std::make_unique<Arena>(name_ + "_kv", static_cast<std::size_t>(2 * slots * HS) * sizeof(float),
                                           be_.allocator());
        TensorView all = L->arena->allocate(Shape{2 * slots * HS}, DType::f32);
        L->k = TensorView(all.data, Shape{slots, HS}, DType::f32, all.device);
        L->v = TensorView(static_cast<float*>(all.data) + slots * HS, Shape{slots, HS}, DType::f32, all.device);
        for (std::size_t e = 0; e < ls.extra_shapes.size(); ++e)
          L->extra.push_back(L->arena->allocate(ls.extra_shapes[e], ls.extra_types[e]));
      }
      layers_.push_back(std::move(L));
    }
    begun_ = true;
  }
  std::size_t bi = 0;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = *layers_[l];
    const auto& ls = st.layers[l];
    L.ready = ls.ready;
    L.off = ls.off;
    L.cap = ls.cap;
    L.len = ls.len;
    L.pos = ls.pos;
    if (!ls.ready) continue;
    L.upload_pos(be_);
    s.blocks[bi++].load(be_, TensorView(L.k.data, Shape{2 * L.k.shape[0] * L.k.shape[1]}, DType::f32, L.k.device));
    for (TensorView& e : L.extra) s.blocks[bi++].load(be_, e);
  }
  decoding_ = st.decoding;
  infeasible_ = st.infeasible;
  requested_ = st.requested;
  resident_ = st.resident;
  peak_ = st.peak;
  stats_ = st.stats;
}

}  // namespace dsrsq
