#include "kv/razor.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/timer.hpp"
#include "kv/kv_detail.hpp"
#include "model/transformer.hpp"

namespace dsrsq {
namespace razor {
namespace {

// A view of `count` elements of t starting `offset` elements in, shaped `s`.
TensorView sub(const TensorView& t, std::int64_t offset, Shape s) {
  return TensorView(static_cast<char*>(t.data) + offset * static_cast<std::int64_t>(dtype_size(t.dtype)), s, t.dtype,
                    t.device);
}

// Index tensors live where the backend computes (a copy on the host backend).
TensorView device_index(Backend& be, Arena& scratch, const std::vector<std::int32_t>& idx) {
  TensorView t = scratch.allocate(Shape{static_cast<std::int64_t>(idx.size())}, DType::i32);
  be.copy_from_host(std::as_bytes(std::span(idx)), t);
  return t;
}

// The calibration run's KV policy: a full cache (the model must attend
// exactly as it does when serving) that, at every call, scores the call's
// queries for echo and induction attention per (layer, head).
class CalibrationPolicy final : public KVPolicy {
 public:
  CalibrationPolicy(const ModelConfig& cfg, Backend& be, const std::vector<std::int32_t>& tokens)
      : cfg_(cfg), be_(be), tokens_(tokens), scratch_("razor_calibration_scratch", std::size_t{1} << 20, be.allocator()) {
    const auto L = static_cast<std::size_t>(cfg.n_layers), NH = static_cast<std::size_t>(cfg.n_heads);
    echo_sum_.assign(L, std::vector<double>(NH, 0.0));
    ind_sum_ = echo_sum_;
    echo_n_.assign(L, std::vector<std::int64_t>(NH, 0));
    ind_n_ = echo_n_;
  }
  std::string name() const override { return "razor_calibration"; }
  void begin(const SequenceInfo& info, const KVBudget&) override {
    DSRSQ_REQUIRE(info.batch == 1 && info.prompt_len == static_cast<std::int64_t>(tokens_.size()),
                  "razor calibration: one sequence of the calibration tokens");
    const std::int64_t L = cfg_.n_layers, S = info.prompt_len, C = cfg_.d_model;
    arena_ = std::make_unique<Arena>("razor_calibration_kv", static_cast<std::size_t>(2 * L * S * C) * sizeof(float),
                                     be_.allocator());
    k_.clear();
    v_.clear();
    for (std::int64_t l = 0; l < L; ++l) {
      k_.push_back(arena_->allocate(Shape{1, S, cfg_.n_heads, cfg_.head_size()}, DType::f32));
      v_.push_back(arena_->allocate(Shape{1, S, cfg_.n_heads, cfg_.head_size()}, DType::f32));
    }
    len_.assign(static_cast<std::size_t>(L), 0);
    pos_.resize(static_cast<std::size_t>(S));
    std::iota(pos_.begin(), pos_.end(), 0);
  }
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override {
    const std::int64_t Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size();
    const auto l = static_cast<std::size_t>(layer);
    const std::int64_t len = len_[l];
    ArenaScope scope(scratch_);
    const TensorView pf = pos.reshaped(Shape{Tn});
    const std::vector<std::int32_t> ph = to_host<std::int32_t>(be_, pf);
    for (std::int64_t i = 0; i < Tn; ++i)
      DSRSQ_REQUIRE(ph[static_cast<std::size_t>(i)] == len + i, "razor calibration: positions must run 0, 1, ...");
    be_.rope_fwd(RopeArgs{q.reshaped(Shape{Tn, NH, HS}), pf, cfg_.rope_theta, cfg_.attn_log_base});
    be_.rope_fwd(RopeArgs{k.reshaped(Shape{Tn, NH, HS}), pf, cfg_.rope_theta});
    const std::int64_t S = len + Tn;
    const TensorView kc = k_[l].reshaped(Shape{k_[l].shape[1], NH, HS}), vc = v_[l].reshaped(Shape{v_[l].shape[1], NH, HS});
    be_.copy(k.reshaped(Shape{Tn, NH, HS}), kc.rows(len, Tn));
    be_.copy(v.reshaped(Shape{Tn, NH, HS}), vc.rows(len, Tn));
    const TensorView ks = kc.rows(0, S).reshaped(Shape{1, S, NH, HS}), vs = vc.rows(0, S).reshaped(Shape{1, S, NH, HS});
    TensorView lse = scratch_.allocate(Shape{1, NH, Tn}, DType::f32);
    be_.attention_fwd(AttentionArgs{q, ks, vs, out, lse, pos, kvdetail::op_arg(be_, scratch_, pos_.data(), Shape{1, S}),
                                    true, 0.0});
    std::vector<std::int32_t> seen(tokens_.begin(), tokens_.begin() + S);
    accumulate_layer_scores(be_, scratch_, q, ks, len, seen, echo_sum_[l], ind_sum_[l], echo_n_[l], ind_n_[l]);
    len_[l] = S;
  }
  KVMemory memory() const override { return {}; }
  std::size_t budget_requested_bytes() const override { return 0; }
  std::size_t budget_achieved_bytes() const override { return 0; }
  double attended_tokens() const override { return 0; }

  std::vector<std::vector<double>> echo_sum_, ind_sum_;
  std::vector<std::vector<std::int64_t>> echo_n_, ind_n_;

 private:
  ModelConfig cfg_;
  Backend& be_;
  const std::vector<std::int32_t>& tokens_;
  std::unique_ptr<Arena> arena_;
  Arena scratch_;
  std::vector<TensorView> k_, v_;
  std::vector<std::int64_t> len_;
  std::vector<std::int32_t> pos_;
};

// Indices 0..n-1 by descending value, ties to the lower index.
std::vector<std::int32_t> ranked(const std::vector<double>& x) {
  std::vector<std::int32_t> o(x.size());
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [&](std::int32_t a, std::int32_t b) { return x[static_cast<std::size_t>(a)] > x[static_cast<std::size_t>(b)]; });
  return o;
}

}  // namespace

std::int64_t default_segment(std::int64_t max_pos) { return std::min<std::int64_t>(2500, max_pos / 4); }

std::vector<std::int32_t> calibration_tokens(std::int64_t vocab, std::int64_t segment, std::int64_t repeats,
                                             std::uint64_t seed) {
  DSRSQ_INPUT_CHECK(segment >= 2 && repeats >= 2, "razor calibration: a segment of >= 2 tokens repeated >= 2 times, got ",
                    segment, " x ", repeats);
  Rng rng(seed, 0x52415a4fu);  // "RAZO": a stream of its own
  std::vector<std::int32_t> seg(static_cast<std::size_t>(segment));
  for (auto& t : seg) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  std::vector<std::int32_t> out;
  for (std::int64_t r = 0; r < repeats; ++r) out.insert(out.end(), seg.begin(), seg.end());
  return out;
}

void accumulate_layer_scores(Backend& be, Arena& scratch, const TensorView& q, const TensorView& k, std::int64_t q0,
                             const std::vector<std::int32_t>& tokens, std::vector<double>& echo_sum,
                             std::vector<double>& ind_sum, std::vector<std::int64_t>& echo_n,
                             std::vector<std::int64_t>& ind_n) {
  const std::int64_t Tq = q.shape[1], NH = q.shape[2], HS = q.shape[3], S = k.shape[1];
  DSRSQ_REQUIRE(static_cast<std::int64_t>(tokens.size()) == S && q0 + Tq <= S, "razor scores: ", tokens.size(),
                " token ids for ", S, " keys, queries [", q0, ", ", q0 + Tq, ")");
  ArenaScope scope(scratch);
  // Keys with the heads as batch rows: kh[h, j] = k[j, h].
  std::vector<std::int32_t> idx(static_cast<std::size_t>(NH * S));
  for (std::int64_t h = 0; h < NH; ++h)
    for (std::int64_t j = 0; j < S; ++j) idx[static_cast<std::size_t>(h * S + j)] = static_cast<std::int32_t>(j * NH + h);
  TensorView kh = scratch.allocate(Shape{NH, S, 1, HS}, DType::f32);
  be.gather_rows({k.reshaped(Shape{S * NH, HS}), device_index(be, scratch, idx), kh.reshaped(Shape{NH * S, HS})});
  std::vector<std::int32_t> kpos(static_cast<std::size_t>(NH * S));
  for (std::int64_t h = 0; h < NH; ++h)
    for (std::int64_t j = 0; j < S; ++j) kpos[static_cast<std::size_t>(h * S + j)] = static_cast<std::int32_t>(j);
  TensorView qh = scratch.allocate(Shape{NH, 1, 1, HS}, DType::f32);
  TensorView mass = scratch.allocate(Shape{NH, S}, DType::f64);
  std::vector<double> mass_h(static_cast<std::size_t>(NH * S));
  std::vector<std::int32_t> qidx(static_cast<std::size_t>(NH)), qpos(static_cast<std::size_t>(NH));
  double one = 1.0;
  const TensorView kpos_v = kvdetail::op_arg(be, scratch, kpos.data(), Shape{NH, S});
  const TensorView one_v = kvdetail::op_arg(be, scratch, &one, Shape{1});
  // Earlier copies of each token, in position order.
  std::unordered_map<std::int32_t, std::vector<std::int32_t>> where;
  for (std::int64_t j = 0; j < q0; ++j) where[tokens[static_cast<std::size_t>(j)]].push_back(static_cast<std::int32_t>(j));
  for (std::int64_t i = 0; i < Tq; ++i) {
    const std::int64_t g = q0 + i;
    auto& copies = where[tokens[static_cast<std::size_t>(g)]];
    if (!copies.empty()) {
      for (std::int64_t h = 0; h < NH; ++h) {
        qidx[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(i * NH + h);
        qpos[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(g);
      }
      {
        ArenaScope s(scratch);
        be.gather_rows({q.reshaped(Shape{Tq * NH, HS}), device_index(be, scratch, qidx), qh.reshaped(Shape{NH, HS})});
      }
      ArenaScope s(scratch);
      be.attention_mass(AttentionMassArgs{qh, kh, kvdetail::op_arg(be, scratch, qpos.data(), Shape{NH, 1}), kpos_v,
                                          one_v, mass, 1.0});
      be.copy_to_host(mass, std::as_writable_bytes(std::span<double>(mass_h)));
      // Induction targets: the token right after each earlier copy, before the query.
      bool any_ind = false;
      for (auto j : copies) any_ind = any_ind || j + 1 < g;
      for (std::int64_t h = 0; h < NH; ++h) {
        const double* m = mass_h.data() + h * S;
        double e = 0, d = 0;
        for (auto j : copies) {
          e += m[j];
          if (j + 1 < g) d += m[j + 1];
        }
        echo_sum[static_cast<std::size_t>(h)] += e;
        ++echo_n[static_cast<std::size_t>(h)];
        if (any_ind) {
          ind_sum[static_cast<std::size_t>(h)] += d;
          ++ind_n[static_cast<std::size_t>(h)];
        }
      }
    }
    copies.push_back(static_cast<std::int32_t>(g));
  }
}

HeadScores calibrate(Transformer& model, std::int64_t segment, std::int64_t repeats, std::uint64_t seed) {
  const ModelConfig& cfg = model.config();
  const std::int64_t T = segment * repeats;
  DSRSQ_INPUT_CHECK(T <= cfg.max_pos, "razor calibration: ", segment, " x ", repeats, " = ", T,
                    " tokens exceed the model's max_pos ", cfg.max_pos);
  const std::vector<std::int32_t> tokens = calibration_tokens(cfg.vocab, segment, repeats, seed);
  Backend& be = model.backend();
  Timer t;
  const double f0 = be.flops_counted();
  CalibrationPolicy pol(cfg, be, tokens);
  SequenceInfo info;
  info.prompt_len = T;
  pol.begin(info, KVBudget{});
  std::vector<std::int32_t> pos(static_cast<std::size_t>(T));
  std::iota(pos.begin(), pos.end(), 0);
  // Chunks bound the logits buffer (chunk x vocab); attention is exact either way.
  const std::int64_t chunk = 256;
  std::vector<std::int32_t> tk(tokens);
  for (std::int64_t c0 = 0; c0 < T; c0 += chunk) {
    const std::int64_t n = std::min(chunk, T - c0);
    model.extend(pol, TensorView(tk.data() + c0, Shape{1, n}), TensorView(pos.data() + c0, Shape{1, n}));
  }
  HeadScores s;
  s.layers = cfg.n_layers;
  s.heads = cfg.n_heads;
  for (std::int64_t l = 0; l < cfg.n_layers; ++l)
    for (std::int64_t h = 0; h < cfg.n_heads; ++h) {
      const auto L = static_cast<std::size_t>(l), H = static_cast<std::size_t>(h);
      s.echo.push_back(pol.echo_n_[L][H] ? pol.echo_sum_[L][H] / static_cast<double>(pol.echo_n_[L][H]) : 0.0);
      s.induction.push_back(pol.ind_n_[L][H] ? pol.ind_sum_[L][H] / static_cast<double>(pol.ind_n_[L][H]) : 0.0);
    }
  s.tokens = T;
  s.seconds = t.seconds();
  s.flops = be.flops_counted() - f0;
  return s;
}

std::int64_t head_count(double fraction, std::int64_t n) {
  DSRSQ_INPUT_CHECK(fraction >= 0 && fraction <= 1, "razor: a head fraction must lie in [0, 1], got ", fraction);
  if (fraction == 0 || n <= 0) return 0;
  return std::clamp<std::int64_t>(std::llround(fraction * static_cast<double>(n)), 1, n);
}

std::vector<std::int32_t> protected_heads(const HeadScores& s, double f_induction, double f_echo) {
  const auto n = static_cast<std::int64_t>(s.induction.size());
  const std::int64_t ni = head_count(f_induction, n), ne = head_count(f_echo, n);
  const auto by_ind = ranked(s.induction), by_echo = ranked(s.echo);
  struct Pick {
    double prio;
    int kind;  // 0 induction, 1 echo
    std::int32_t head;
  };
  std::map<std::int32_t, Pick> picks;
  auto add = [&](const std::vector<std::int32_t>& order, std::int64_t count, int kind) {
    for (std::int64_t r = 0; r < count; ++r) {
      const std::int32_t h = order[static_cast<std::size_t>(r)];
      const double prio = static_cast<double>(r + 1) / static_cast<double>(count);
      auto it = picks.find(h);
      if (it == picks.end() || prio < it->second.prio) picks[h] = Pick{prio, it == picks.end() ? kind : std::min(kind, it->second.kind), h};
    }
  };
  add(by_ind, ni, 0);
  add(by_echo, ne, 1);
  std::vector<Pick> v;
  for (auto& [h, p] : picks) v.push_back(p);
  std::sort(v.begin(), v.end(), [](const Pick& a, const Pick& b) {
    if (a.prio != b.prio) return a.prio < b.prio;
    if (a.kind != b.kind) return a.kind < b.kind;
    return a.head < b.head;
  });
  std::vector<std::int32_t> out;
  for (auto& p : v) out.push_back(p.head);
  return out;
}

std::string head_list(const std::vector<std::int32_t>& heads, std::int64_t n_heads) {
  std::vector<std::int32_t> s(heads);
  std::sort(s.begin(), s.end());
  std::ostringstream os;
  for (std::size_t i = 0; i < s.size(); ++i) os << (i ? "," : "") << "l" << s[i] / n_heads << "h" << s[i] % n_heads;
  return os.str();
}

void fill_slot(Backend& be, Arena& scratch, const TensorView& k_rows, const TensorView& v_rows,
               const std::vector<std::int32_t>& idx, const TensorView& slot) {
  const auto n = static_cast<std::int64_t>(idx.size());
  const std::int64_t HS = k_rows.shape[1];
  DSRSQ_REQUIRE(n >= 1 && slot.numel() == slot_floats(HS), "razor slot: ", n, " dropped rows, slot ", slot.str());
  ArenaScope scope(scratch);
  TensorView g = scratch.allocate(Shape{n, HS}, DType::f32);
  TensorView ones = scratch.allocate(Shape{1, n}, DType::f32);
  be.fill(ones, 1.0);
  const TensorView ix = device_index(be, scratch, idx);
  for (int kind = 0; kind < 2; ++kind) {
    be.gather_rows({kind == 0 ? k_rows : v_rows, ix, g});
    be.matmul_fwd(MatmulArgs{ones, g, sub(slot, kind * HS, Shape{1, HS}), {}, false, false, 1.0 / static_cast<double>(n), 0.0});
  }
  be.fill(sub(slot, 2 * HS, Shape{1}), std::log(static_cast<double>(n)));
}

void merge_slot(Backend& be, Arena& scratch, const TensorView& q, const TensorView& slot, const TensorView& o,
                const TensorView& lse, double scale) {
  const std::int64_t Tq = q.shape[0], HS = q.shape[2];
  ArenaScope scope(scratch);
  if (scale <= 0) scale = 1.0 / std::sqrt(static_cast<double>(HS));
  // The slot's logit: scale * q . mean K, then + ln|D| (the matmul's bias is
  // added after alpha: the correction's "after the scaling").
  TensorView lse_b = scratch.allocate(Shape{Tq, 1}, DType::f32);
  be.matmul_fwd(MatmulArgs{q.reshaped(Shape{Tq, HS}), sub(slot, 0, Shape{1, HS}), lse_b, sub(slot, 2 * HS, Shape{1}),
                           false, true, scale, 0.0});
  // Its output is mean V for every query.
  TensorView o_b = scratch.allocate(Shape{Tq, HS}, DType::f32);
  std::vector<std::int32_t> zeros(static_cast<std::size_t>(Tq), 0);
  be.gather_rows({sub(slot, HS, Shape{1, HS}), device_index(be, scratch, zeros), o_b});
  be.attention_merge(AttentionMergeArgs{o.reshaped(Shape{1, Tq, 1, HS}), lse.reshaped(Shape{1, 1, Tq}),
                                        o_b.reshaped(Shape{1, Tq, 1, HS}), lse_b.reshaped(Shape{1, 1, Tq})});
}

}  // namespace razor

RazorPolicy::RazorPolicy(const ModelConfig& cfg, Backend& backend, razor::Settings settings)
    : EvictingPolicy(cfg, backend, "razor"), s_(std::move(settings)) {
  DSRSQ_INPUT_CHECK(s_.sinks >= 0, "razor: sinks must be >= 0, got ", s_.sinks);
  for (auto h : s_.protect)
    DSRSQ_INPUT_CHECK(h >= 0 && h < cfg.n_layers * cfg.n_heads, "razor: protected head ", h, " outside the model's ",
                      cfg.n_layers * cfg.n_heads, " heads");
}

bool RazorPolicy::plan(const SequenceInfo& info, std::size_t requested) {
  const ModelConfig& c = config();
  const std::int64_t heads = c.n_layers * c.n_heads, B = info.batch;
  const std::size_t tb = token_bytes(), slot_b = static_cast<std::size_t>(razor::slot_floats(c.head_size())) * sizeof(float);
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  late_infeasible_ = false;
  recent_ = -1;
  demoted_ = 0;
  const auto L = static_cast<std::size_t>(c.n_layers);
  slots_.assign(L, TensorView{});
  slot_of_.assign(L, std::vector<std::int32_t>(static_cast<std::size_t>(B * c.n_heads), -1));
  dropped_.assign(L, std::vector<std::int64_t>(static_cast<std::size_t>(B * c.n_heads), 0));
  ++epoch_;
  protect_now_ = s_.protect;
  is_protected_.assign(static_cast<std::size_t>(heads), 0);
  const std::size_t full_row = static_cast<std::size_t>(total) * tb;
  // The whole cache fits: every head keeps everything (the identity with `full`).
  if (static_cast<std::size_t>(heads) * full_row <= requested) {
    row_slots_ = -1;
    for (auto h : protect_now_) is_protected_[static_cast<std::size_t>(h)] = 1;
    return true;
  }
  // Per sequence (the budget is per sequence; every batch row plans alike).
  // Arena alignment: each layer's K/V block and its slot block may round up
  // to 64 bytes.
  const std::size_t reserve = L * 2 * 64;
  const std::size_t avail = requested > reserve ? requested - reserve : 0;
  const std::int64_t later = info.max_new_tokens;  // query-aware: the decode slots follow the one prefill call
  const std::size_t min_row = static_cast<std::size_t>(s_.sinks + later) * tb + slot_b;
  auto need = [&](std::size_t np) { return np * full_row + (static_cast<std::size_t>(heads) - np) * min_row; };
  std::size_t np = protect_now_.size();
  while (np > 0 && need(np) > avail) --np;
  demoted_ = static_cast<std::int64_t>(protect_now_.size() - np);
  protect_now_.resize(np);
  for (auto h : protect_now_) is_protected_[static_cast<std::size_t>(h)] = 1;
  const std::size_t others = static_cast<std::size_t>(heads) - np;
  if (others == 0) {  // every head protected and fitting
    row_slots_ = -1;
    return true;
  }
  if (need(np) > avail) {  // below the minimum even with no protected head
    row_slots_ = s_.sinks + later;
    return false;
  }
  const std::size_t per_row = (avail - np * full_row) / others;
  row_slots_ = static_cast<std::int64_t>((per_row - slot_b) / tb);
  return true;
}

std::vector<std::vector<std::int32_t>> RazorPolicy::select(const LayerPrefill& p) {
  const std::int64_t NH = config().n_heads, Tn = p.tokens, R = rows();
  std::vector<std::vector<std::int32_t>> keep(static_cast<std::size_t>(R));
  std::vector<std::int32_t> all(static_cast<std::size_t>(Tn));
  std::iota(all.begin(), all.end(), 0);
  std::int64_t recent = -1;
  if (row_slots_ >= 0) {
    recent = row_slots_ - s_.sinks - slots_after(Tn);
    if (recent < 0) {  // query-agnostic: the question's slots were not known at begin()
      late_infeasible_ = true;
      recent = 0;
    }
  }
  recent_ = recent;
  for (std::int64_t r = 0; r < R; ++r) {
    auto& k = keep[static_cast<std::size_t>(r)];
    const std::int64_t head = p.layer * NH + r % NH;
    // A single dropped token is cheaper kept than folded (a slot costs more than a token).
    if (recent < 0 || is_protected_[static_cast<std::size_t>(head)] || s_.sinks + recent + 1 >= Tn) {
      k = all;
      continue;
    }
    for (std::int64_t j = 0; j < s_.sinks; ++j) k.push_back(static_cast<std::int32_t>(j));
    for (std::int64_t j = Tn - recent; j < Tn; ++j) k.push_back(static_cast<std::int32_t>(j));
  }
  return keep;
}

void RazorPolicy::after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>& kept) {
  const std::int64_t NH = config().n_heads, HS = config().head_size(), Tn = p.tokens, R = rows();
  const auto l = static_cast<std::size_t>(p.layer);
  ++epoch_;
  std::int32_t n = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    const auto d = Tn - static_cast<std::int64_t>(kept[static_cast<std::size_t>(r)].size());
    dropped_[l][static_cast<std::size_t>(r)] = d;
    slot_of_[l][static_cast<std::size_t>(r)] = d > 0 ? n++ : -1;
  }
  if (n == 0) return;
  slots_[l] = layer_alloc(p.layer, Shape{n, razor::slot_floats(HS)}, DType::f32);
  const std::int64_t B = p.k.shape[0];
  const TensorView kr = p.k.reshaped(Shape{B * Tn * NH, HS}), vr = p.v.reshaped(Shape{B * Tn * NH, HS});
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int32_t s = slot_of_[l][static_cast<std::size_t>(r)];
    if (s < 0) continue;
    const std::int64_t b = r / NH, h = r % NH;
    const auto& k = kept[static_cast<std::size_t>(r)];
    std::vector<std::int32_t> idx;
    std::size_t at = 0;
    for (std::int64_t j = 0; j < Tn; ++j) {
      if (at < k.size() && k[at] == j) {
        ++at;
        continue;
      }
      idx.push_back(static_cast<std::int32_t>((b * Tn + j) * NH + h));
    }
    razor::fill_slot(backend(), scratch(), kr, vr, idx, slot(p.layer, r));
  }
}

TensorView RazorPolicy::slot(std::int64_t layer, std::int64_t r) const {
  const auto l = static_cast<std::size_t>(layer);
  const std::int32_t s = slot_of_.at(l).at(static_cast<std::size_t>(r));
  if (s < 0) return {};
  const std::int64_t F = razor::slot_floats(config().head_size());
  return razor::sub(slots_[l], s * F, Shape{F});
}

std::int64_t RazorPolicy::dropped(std::int64_t layer, std::int64_t r) const {
  return dropped_.at(static_cast<std::size_t>(layer)).at(static_cast<std::size_t>(r));
}

void RazorPolicy::attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                             TensorView lse) {
  EvictingPolicy::attend_row(layer, r, q, qpos, o, lse);
  const TensorView s = slot(layer, r);
  if (!s.empty()) razor::merge_slot(backend(), scratch(), q, s, o, lse);
}

double RazorPolicy::row_keys_read(std::int64_t layer, std::int64_t r) const {
  return EvictingPolicy::row_keys_read(layer, r) + (slot(layer, r).empty() ? 0.0 : 1.0);
}

std::size_t RazorPolicy::aux_read_bytes(std::int64_t layer, std::int64_t r) const {
  // The slot's mean K and V are counted as one key (row_keys_read); ln|D| here.
  return slot(layer, r).empty() ? 0 : sizeof(float);
}

std::map<std::string, std::string> RazorPolicy::meta() const {
  std::map<std::string, std::string> m = s_.calibration_meta;
  m["razor_protected_heads"] = razor::head_list(protect_now_, config().n_heads);
  m["razor_demoted_heads"] = std::to_string(demoted_);
  m["razor_recent_tokens"] = std::to_string(recent_);
  m["razor_sinks"] = std::to_string(s_.sinks);
  return m;
}

struct RazorPolicy::Snap final : KVSnapshot {
  const void* owner = nullptr;
  std::unique_ptr<KVSnapshot> base;
  Host host;
  std::vector<std::vector<float>> slots;  // per layer: the slot block's contents (host)
  std::uint64_t epoch = 0;
  std::size_t bytes() const override {
    std::size_t n = base->bytes() + host.protect_now.size() * sizeof(std::int32_t) + host.is_protected.size();
    for (const auto& v : slots) n += v.size() * sizeof(float);
    for (const auto& v : host.slot_of) n += v.size() * sizeof(std::int32_t);
    for (const auto& v : host.dropped) n += v.size() * sizeof(std::int64_t);
    return n;
  }
};

std::unique_ptr<KVSnapshot> RazorPolicy::snapshot() const {
  auto s = std::make_unique<Snap>();
  s->owner = this;
  s->base = EvictingPolicy::snapshot();
  s->host = Host{protect_now_, is_protected_, demoted_, row_slots_, recent_, late_infeasible_, slot_of_, dropped_};
  s->epoch = epoch_;
  for (const TensorView& t : slots_) {
    auto& h = s->slots.emplace_back(static_cast<std::size_t>(t.empty() ? 0 : t.numel()));
    if (!t.empty()) backend().copy_to_host(t, std::as_writable_bytes(std::span<float>(h)));
  }
  return s;
}

void RazorPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<Snap>(snap, this, "razor");
  // Same epoch: only appends since the snapshot (or since a restore of it), so
  // the base reloads the layers in place, slot blocks included, and slots_
  // still points at them. Otherwise the base may have rebuilt the layers: the
  // slot blocks moved and the base has no accessor for them, so each layer
  // with slots is copied once (reselect keeping every token drops the old
  // blocks) and its slot block allocated again from the snapshot's contents.
  // Same bytes either way.
  const bool same = s.epoch == epoch_;
  EvictingPolicy::restore(*s.base);
  const Host& h = s.host;
  protect_now_ = h.protect_now;
  is_protected_ = h.is_protected;
  demoted_ = h.demoted;
  row_slots_ = h.row_slots;
  recent_ = h.recent;
  late_infeasible_ = h.late_infeasible;
  slot_of_ = h.slot_of;
  dropped_ = h.dropped;
  epoch_ = s.epoch;
  if (same) return;
  const std::int64_t R = rows();
  slots_.assign(s.slots.size(), TensorView{});
  for (std::size_t l = 0; l < s.slots.size(); ++l) {
    if (s.slots[l].empty()) continue;
    const auto layer = static_cast<std::int64_t>(l);
    std::vector<std::vector<std::int32_t>> all(static_cast<std::size_t>(R));
    for (std::int64_t r = 0; r < R; ++r) {
      all[static_cast<std::size_t>(r)].resize(static_cast<std::size_t>(row_len(layer, r)));
      std::iota(all[static_cast<std::size_t>(r)].begin(), all[static_cast<std::size_t>(r)].end(), 0);
    }
    reselect(layer, all);
    const auto F = razor::slot_floats(config().head_size());
    slots_[l] = layer_alloc(layer, Shape{static_cast<std::int64_t>(s.slots[l].size()) / F, F}, DType::f32);
    backend().copy_from_host(std::as_bytes(std::span<const float>(s.slots[l])), slots_[l]);
  }
}

}  // namespace dsrsq
