#include "kv/full.hpp"

#include <algorithm>

#include "model/transformer.hpp"

namespace dsrsq {

FullPolicy::FullPolicy(const ModelConfig& cfg, Backend& backend)
    : cfg_(cfg), be_(backend), scratch_("kv_scratch", std::size_t{1} << 20, backend.allocator()),
      pos_arena_("kv_positions", std::size_t{1} << 16, backend.allocator()) {}

void FullPolicy::begin(const SequenceInfo& info, const KVBudget& budget) {
  kvdetail::check_sequence(cfg_, info);
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  // Validate the budget even though `full` keeps everything: a bad --kv_budget
  // fails the same way for every method.
  const std::size_t requested = budget.resolve(cfg_, info.budget_basis());
  // Drop everything from the previous sequence first (frees its cache).
  begun_ = false;
  kv_arena_.reset();
  k_.clear();
  v_.clear();
  pos_.clear();
  kpos_.clear();
  pos_arena_.reset();
  scratch_.reset();
  stats_.clear();
  info_ = info;
  budget_ = budget;
  decoding_ = false;
  cap_ = total;
  requested_ = requested;
  achieved_ = KVBudget::full_bytes(cfg_, total);

  const std::int64_t L = cfg_.n_layers, B = info.batch, NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t per = B * cap_ * NH * HS;  // elements of one layer's K (or V)
  // One block for all K and V: the arena figure is the allocation, not a count.
  const std::size_t block = static_cast<std::size_t>(2 * L * per) * sizeof(float);
  kv_arena_ = std::make_unique<Arena>("kv_cache_full", block, be_.allocator());
  TensorView all = kv_arena_->allocate(Shape{2 * L * per}, DType::f32);
  be_.fill(all, 0.0);  // unused slots are masked, but must not hold NaN (0 * NaN in P V)
  const Shape s{B, cap_, NH, HS};
  for (std::int64_t l = 0; l < L; ++l) {
    k_.push_back(all.rows((2 * l) * per, per).reshaped(s));
    v_.push_back(all.rows((2 * l + 1) * per, per).reshaped(s));
  }
  pos_.assign(static_cast<std::size_t>(L), std::vector<std::int32_t>(static_cast<std::size_t>(B * cap_),
                                                                     KVCache::kEmptyPos));
  // The positions attention reads, on the backend (uncounted, as in full_bytes);
  // pos_ is their host copy (snapshots).
  for (std::int64_t l = 0; l < L; ++l) {
    kpos_.push_back(pos_arena_.allocate(Shape{B, cap_}, DType::i32));
    from_host<std::int32_t>(be_, pos_[static_cast<std::size_t>(l)], kpos_.back());
  }
  len_.assign(static_cast<std::size_t>(L), 0);
  resident_ = peak_ = 0;
  begun_ = true;
}

void FullPolicy::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) {
  kvdetail::check_attend("KV policy 'full'", begun_, cfg_, info_.batch, layer, q, k, v, pos, out);
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size();
  const auto l = static_cast<std::size_t>(layer);
  std::int64_t& len = len_[l];
  DSRSQ_INPUT_CHECK(len + Tn <= cap_, "KV policy 'full': cache capacity ", cap_, " (prompt_len + max_new_tokens) exceeded: ",
                    len, " cached + ", Tn, " new tokens");
  ArenaScope scope(scratch_);

  // RoPE with the original positions, in place (the model does not reuse q, k).
  TensorView pos_flat = pos.reshaped(Shape{B * Tn});
  be_.rope_fwd(RopeArgs{q.reshaped(Shape{B * Tn, NH, HS}), pos_flat, cfg_.rope_theta, cfg_.attn_log_base});
  be_.rope_fwd(RopeArgs{k.reshaped(Shape{B * Tn, NH, HS}), pos_flat, cfg_.rope_theta});

  // Append post-RoPE keys and values and the positions.
  const TensorView kc = k_[l].reshaped(Shape{B * cap_, NH, HS}), vc = v_[l].reshaped(Shape{B * cap_, NH, HS});
  const TensorView kn = k.reshaped(Shape{B * Tn, NH, HS}), vn = v.reshaped(Shape{B * Tn, NH, HS});
  const std::vector<std::int32_t> pp = to_host<std::int32_t>(be_, pos);  // B * Tn positions
  const TensorView kp = kpos_[l].reshaped(Shape{B * cap_});
  for (std::int64_t b = 0; b < B; ++b) {
    be_.copy(kn.rows(b * Tn, Tn), kc.rows(b * cap_ + len, Tn));
    be_.copy(vn.rows(b * Tn, Tn), vc.rows(b * cap_ + len, Tn));
    be_.copy(pos_flat.rows(b * Tn, Tn), kp.rows(b * cap_ + len, Tn));
    std::copy(pp.begin() + b * Tn, pp.begin() + (b + 1) * Tn, pos_[l].begin() + b * cap_ + len);
  }
  len += Tn;

  const TensorView kpos = kpos_[l];
  TensorView lse = scratch_.allocate(Shape{B, NH, Tn}, DType::f32);
  be_.attention_fwd(AttentionArgs{q, k_[l], v_[l], out, lse, pos, kpos, true, 0.0});

  if (decoding_) {
    // Query i of this call sees the len - Tn + i + 1 cached tokens up to itself.
    const std::size_t tok_bytes = 2 * static_cast<std::size_t>(NH * HS) * sizeof(float);
    for (std::int64_t i = 0; i < Tn; ++i) {
      const std::int64_t keys = len - Tn + i + 1;
      stats_.read_bytes += static_cast<std::size_t>(B * keys) * tok_bytes;
      stats_.keys += static_cast<double>(keys * B);
      stats_.queries += B;
    }
    if (layer == 0) stats_.tokens += Tn;
  } else if (layer == cfg_.n_layers - 1) {
    peak_ = std::max(peak_, kv_arena_->peak_bytes());
  }
}

void FullPolicy::end_prefill() {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'full': end_prefill() before begin()");
  decoding_ = true;
  resident_ = kv_arena_->used_bytes();
  peak_ = std::max(peak_, kv_arena_->peak_bytes());
}

struct FullPolicy::State {
  SequenceInfo info;
  KVBudget budget;
  bool decoding = false;
  std::vector<std::vector<std::int32_t>> pos;
  std::vector<std::int64_t> len;
  std::size_t requested = 0, achieved = 0, resident = 0, peak = 0;
  kvdetail::DecodeStats stats;
};

TensorView FullPolicy::block() const {
  // k_[0] starts the block: layer 0's K, then its V, then layer 1's ... (begin()).
  return TensorView(k_.front().data, Shape{2 * cfg_.n_layers * info_.batch * cap_ * cfg_.n_heads * cfg_.head_size()},
                    DType::f32, k_.front().device);
}

std::unique_ptr<KVSnapshot> FullPolicy::snapshot() const {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'full': snapshot() before begin()");
  auto s = std::make_unique<kvdetail::PolicySnapshot<State>>();
  s->owner = this;
  s->state = State{info_, budget_, decoding_, pos_, len_, requested_, achieved_, resident_, peak_, stats_};
  s->blocks.resize(1);
  s->blocks[0].save(be_, block());
  s->host_bytes = pos_.size() * (pos_.empty() ? 0 : pos_.front().size()) * sizeof(std::int32_t);
  return s;
}

void FullPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<kvdetail::PolicySnapshot<State>>(snap, this, "full");
  const State& st = s.state;
  // The layout follows from the sequence and the budget: rebuild it only when
  // another sequence was begun since (the arena's peak is its one block either way).
  if (!begun_ || !kvdetail::same_sequence(info_, st.info) || requested_ != st.requested) begin(st.info, st.budget);
  s.blocks[0].load(be_, block());
  decoding_ = st.decoding;
  pos_ = st.pos;
  for (std::size_t l = 0; l < pos_.size(); ++l) from_host<std::int32_t>(be_, pos_[l], kpos_[l]);
  len_ = st.len;
  requested_ = st.requested;
  achieved_ = st.achieved;
  resident_ = st.resident;
  peak_ = st.peak;
  stats_ = st.stats;
}

KVMemory FullPolicy::memory() const {
  return kvdetail::arena_memory(kv_arena_.get(), decoding_, resident_, peak_, stats_);
}

}  // namespace dsrsq
