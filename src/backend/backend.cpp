// Boundary checks shared by every backend, and the ops that are compositions
// of other ops (linear and matmul backward are matmuls).
#include "backend/backend.hpp"

#include "backend/sim/sim_backend.hpp"

#include <chrono>
#include <cmath>
#include <cstring>

namespace dsrsq {

class OpTimer {
 public:
  OpTimer(Backend& b, const char* op) : b_(b), op_(op) {
    if (b_.profiling_) t0_ = std::chrono::steady_clock::now();
  }
  ~OpTimer() {
    if (!b_.profiling_) return;
    b_.synchronize();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    for (auto& e : b_.prof_)
      if (std::strcmp(e.op, op_) == 0) {
        e.seconds += dt;
        ++e.calls;
        return;
      }
    b_.prof_.push_back(OpProfileEntry{op_, dt, 1});
  }
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  Backend& b_;
  const char* op_;
  std::chrono::steady_clock::time_point t0_{};
};

std::vector<OpProfileEntry> Backend::profile() const { return prof_; }
void Backend::reset_profile() { prof_.clear(); }

namespace {

bool is_float(DType t) { return t == DType::f32 || t == DType::f64; }

void check_float(const char* op, const char* arg, const TensorView& t) {
  if (!is_float(t.dtype))
    raise_input_error(detail::cat(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected f32 or f64"));
}

void check_rank(const char* op, const char* arg, const TensorView& t, int rank) {
  check_present(op, arg, t);
  if (t.shape.rank != rank)
    raise_input_error(detail::cat(op, ": argument '", arg, "' has shape ", t.shape.str(), ", expected ", rank, " dims"));
}

// A host-readable view of a small tensor that a boundary check reads
// (positions, tokens, targets, mask, row indices): the tensor itself when it
// is in host memory; for a device tensor, a copy made by the backend that owns
// it (copy_to_host synchronises the stream: a cost per op call on a GPU, paid
// for the same error messages on every backend). A tensor on a device the
// backend does not own fails in copy_to_host with both devices named.
class HostView {
 public:
  HostView(Backend& be, const TensorView& t) : view_(t) {
    if (t.empty() || t.device == Device::cpu) return;
    buf_.resize(t.bytes());
    be.copy_to_host(t, buf_);
    view_.data = buf_.data();
    view_.device = Device::cpu;
  }
  const TensorView& operator*() const { return view_; }

 private:
  std::vector<std::byte> buf_;
  TensorView view_;
};

// Positions must lie in [0, 2^30) so they never overflow or alias.
void check_positions(Backend& be, const char* op, const char* arg, const TensorView& pos) {
  check_dtype(op, arg, pos, DType::i32);
  const HostView hv(be, pos);
  const auto* p = (*hv).ptr<std::int32_t>();
  for (std::int64_t i = 0; i < pos.numel(); ++i)
    if (p[i] < 0 || p[i] >= (1 << 30))
      raise_input_error(detail::cat(op, ": argument '", arg, "' holds position ", p[i], " at index ", i,
                                    ", outside [0, 2^30)"));
}

void check_tokens(Backend& be, const char* op, const TensorView& tokens, std::int64_t vocab) {
  check_dtype(op, "tokens", tokens, DType::i32);
  const HostView hv(be, tokens);
  const auto* p = (*hv).ptr<std::int32_t>();
  for (std::int64_t i = 0; i < tokens.numel(); ++i)
    if (p[i] < 0 || p[i] >= vocab)
      raise_input_error(detail::cat(op, ": token id ", p[i], " at index ", i, " outside the vocabulary [0, ", vocab, ")"));
}

struct MatDims {
  std::int64_t batch, m, n, k;
};

MatDims matmul_dims(const char* op, const TensorView& a, const TensorView& b, const TensorView& c, bool ta, bool tb) {
  check_float(op, "a", a);
  check_same_dtype(op, "b", b, a);
  check_same_dtype(op, "c", c, a);
  const int r = a.shape.rank;
  if (r != 2 && r != 3) raise_input_error(detail::cat(op, ": argument 'a' has shape ", a.shape.str(), ", expected 2 or 3 dims"));
  check_rank(op, "b", b, r);
  check_rank(op, "c", c, r);
  const int o = r - 2;
  const std::int64_t batch = r == 3 ? a.shape[0] : 1;
  if (r == 3 && (b.shape[0] != batch || c.shape[0] != batch))
    raise_input_error(detail::cat(op, ": batch dims differ: a ", a.shape.str(), ", b ", b.shape.str(), ", c ", c.shape.str()));
  const std::int64_t m = ta ? a.shape[o + 1] : a.shape[o];
  const std::int64_t k = ta ? a.shape[o] : a.shape[o + 1];
  const std::int64_t kb = tb ? b.shape[o + 1] : b.shape[o];
  const std::int64_t n = tb ? b.shape[o] : b.shape[o + 1];
  if (k != kb)
    raise_input_error(detail::cat(op, ": inner dims differ: op(a) is ", m, "x", k, " (a ", a.shape.str(),
                                  ta ? " transposed" : "", "), op(b) is ", kb, "x", n, " (b ", b.shape.str(),
                                  tb ? " transposed" : "", ")"));
  if (c.shape[o] != m || c.shape[o + 1] != n)
    raise_input_error(detail::cat(op, ": argument 'c' has shape ", c.shape.str(), ", expected ", m, "x", n,
                                  " from a ", a.shape.str(), " and b ", b.shape.str()));
  return {batch, m, n, k};
}

void check_attention(Backend& be, const char* op, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                     const TensorView& lse, const TensorView& q_pos, const TensorView& k_pos) {
  check_rank(op, "q", q, 4);
  check_float(op, "q", q);
  check_rank(op, "k", k, 4);
  check_same_dtype(op, "k", k, q);
  const std::int64_t B = q.shape[0], T = q.shape[1], NH = q.shape[2], HS = q.shape[3], S = k.shape[1];
  check_shape(op, "k", k, Shape{B, S, NH, HS});
  check_shape(op, "v", v, Shape{B, S, NH, HS});
  check_same_dtype(op, "v", v, q);
  check_shape(op, "o", o, Shape{B, T, NH, HS});
  check_same_dtype(op, "o", o, q);
  check_shape(op, "lse", lse, Shape{B, NH, T});
  check_same_dtype(op, "lse", lse, q);
  check_shape(op, "q_pos", q_pos, Shape{B, T});
  check_shape(op, "k_pos", k_pos, Shape{B, S});
  check_positions(be, op, "q_pos", q_pos);
  check_positions(be, op, "k_pos", k_pos);
}

}  // namespace

void Backend::embedding_fwd(const EmbeddingArgs& a) {
  const char* op = "embedding_fwd";
  check_rank(op, "table", a.table, 2);
  check_float(op, "table", a.table);
  check_rank(op, "tokens", a.tokens, 1);
  check_shape(op, "out", a.out, Shape{a.tokens.shape[0], a.table.shape[1]});
  check_same_dtype(op, "out", a.out, a.table);
  check_tokens(*this, op, a.tokens, a.table.shape[0]);
  OpTimer timer_(*this, "embedding_fwd");
  embedding_fwd_impl(a);
}

void Backend::embedding_bwd(const EmbeddingGradArgs& a) {
  const char* op = "embedding_bwd";
  check_rank(op, "dtable", a.dtable, 2);
  check_float(op, "dtable", a.dtable);
  check_rank(op, "tokens", a.tokens, 1);
  check_shape(op, "dout", a.dout, Shape{a.tokens.shape[0], a.dtable.shape[1]});
  check_same_dtype(op, "dout", a.dout, a.dtable);
  check_tokens(*this, op, a.tokens, a.dtable.shape[0]);
  OpTimer timer_(*this, "embedding_bwd");
  embedding_bwd_impl(a);
}

static void check_rope(Backend& be, const char* op, const RopeArgs& a) {
  check_rank(op, "x", a.x, 3);
  check_float(op, "x", a.x);
  if (a.x.shape[2] % 2 != 0)
    raise_input_error(detail::cat(op, ": head size ", a.x.shape[2], " of x ", a.x.shape.str(), " must be even"));
  check_shape(op, "pos", a.pos, Shape{a.x.shape[0]});
  check_positions(be, op, "pos", a.pos);
  if (!(a.theta > 0)) raise_input_error(detail::cat(op, ": theta must be > 0, got ", a.theta));
  if (!(a.log_base == 0 || a.log_base > 1))
    raise_input_error(detail::cat(op, ": log_base must be 0 (off) or > 1, got ", a.log_base));
}

void Backend::rope_fwd(const RopeArgs& a) {
  check_rope(*this, "rope_fwd", a);
  OpTimer timer_(*this, "rope_fwd");
  rope_impl(a, false);
}

void Backend::rope_bwd(const RopeArgs& a) {
  check_rope(*this, "rope_bwd", a);
  OpTimer timer_(*this, "rope_bwd");
  rope_impl(a, true);
}

void Backend::layernorm_fwd(const LayerNormArgs& a) {
  const char* op = "layernorm_fwd";
  check_rank(op, "x", a.x, 2);
  check_float(op, "x", a.x);
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
  check_shape(op, "weight", a.weight, Shape{C});
  check_shape(op, "bias", a.bias, Shape{C});
  check_shape(op, "out", a.out, Shape{N, C});
  check_shape(op, "mean", a.mean, Shape{N});
  check_shape(op, "rstd", a.rstd, Shape{N});
  for (auto* t : {&a.weight, &a.bias, &a.out, &a.mean, &a.rstd}) check_same_dtype(op, "weight/bias/out/mean/rstd", *t, a.x);
  OpTimer timer_(*this, "layernorm_fwd");
  layernorm_fwd_impl(a);
}

void Backend::layernorm_bwd(const LayerNormGradArgs& a) {
  const char* op = "layernorm_bwd";
  check_rank(op, "x", a.x, 2);
  check_float(op, "x", a.x);
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
  check_shape(op, "dout", a.dout, Shape{N, C});
  check_shape(op, "weight", a.weight, Shape{C});
  check_shape(op, "mean", a.mean, Shape{N});
  check_shape(op, "rstd", a.rstd, Shape{N});
  check_shape(op, "dx", a.dx, Shape{N, C});
  check_shape(op, "dweight", a.dweight, Shape{C});
  check_shape(op, "dbias", a.dbias, Shape{C});
  for (auto* t : {&a.dout, &a.weight, &a.mean, &a.rstd, &a.dx, &a.dweight, &a.dbias})
    check_same_dtype(op, "dout/weight/mean/rstd/dx/dweight/dbias", *t, a.x);
  OpTimer timer_(*this, "layernorm_bwd");
  layernorm_bwd_impl(a);
}

void Backend::linear_fwd(const LinearArgs& a) {
  const char* op = "linear_fwd";
  check_rank(op, "x", a.x, 2);
  check_rank(op, "weight", a.weight, 2);
  if (a.weight.shape[1] != a.x.shape[1])
    raise_input_error(detail::cat(op, ": x ", a.x.shape.str(), " and weight ", a.weight.shape.str(),
                                  " disagree on the input channels"));
  check_shape(op, "out", a.out, Shape{a.x.shape[0], a.weight.shape[0]});
  if (!a.bias.empty()) {
    check_shape(op, "bias", a.bias, Shape{a.weight.shape[0]});
    check_same_dtype(op, "bias", a.bias, a.x);
  }
  matmul_fwd(MatmulArgs{a.x, a.weight, a.out, a.bias, false, true, 1.0, 0.0});
}

void Backend::linear_bwd(const LinearGradArgs& a) {
  const char* op = "linear_bwd";
  check_rank(op, "x", a.x, 2);
  check_rank(op, "weight", a.weight, 2);
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1], OC = a.weight.shape[0];
  check_shape(op, "weight", a.weight, Shape{OC, C});
  check_shape(op, "dout", a.dout, Shape{N, OC});
  if (!a.dx.empty()) {
    // dx(N,C) = dout(N,OC) @ weight(OC,C)
    check_shape(op, "dx", a.dx, Shape{N, C});
    matmul_fwd(MatmulArgs{a.dout, a.weight, a.dx, {}, false, false, 1.0, a.dx_accumulate ? 1.0 : 0.0});
  }
  if (!a.dweight.empty()) {
    // dweight(OC,C) += dout^T(OC,N) @ x(N,C)
    check_shape(op, "dweight", a.dweight, Shape{OC, C});
    matmul_fwd(MatmulArgs{a.dout, a.x, a.dweight, {}, true, false, 1.0, 1.0});
  }
  if (!a.dbias.empty()) {
    check_shape(op, "dbias", a.dbias, Shape{OC});
    check_same_dtype(op, "dbias", a.dbias, a.dout);
    OpTimer timer_(*this, "bias_grad");
    bias_rows_sum_impl(a.dout, a.dbias);
  }
}

void Backend::matmul_fwd(const MatmulArgs& a) {
  const MatDims d = matmul_dims("matmul_fwd", a.a, a.b, a.c, a.trans_a, a.trans_b);
  if (!a.bias.empty()) {
    check_shape("matmul_fwd", "bias", a.bias, Shape{d.n});
    check_same_dtype("matmul_fwd", "bias", a.bias, a.a);
  }
  flops_ += 2.0 * static_cast<double>(d.batch) * static_cast<double>(d.m) * static_cast<double>(d.n) *
            static_cast<double>(d.k);
  OpTimer timer_(*this, a.trans_a ? "matmul_dweight" : (a.beta != 0 ? "matmul_acc" : "matmul"));
  matmul_fwd_impl(a);
}

void Backend::matmul_bwd(const MatmulGradArgs& g) {
  const char* op = "matmul_bwd";
  const MatDims d = matmul_dims(op, g.a, g.b, g.dc, g.trans_a, g.trans_b);
  const double al = g.alpha;
  if (!g.da.empty()) {
    check_shape(op, "da", g.da, g.a.shape);
    // see the derivation: d op(a) = alpha dc op(b)^T
    if (!g.trans_a) matmul_fwd(MatmulArgs{g.dc, g.b, g.da, {}, false, !g.trans_b, al, 1.0});
    else matmul_fwd(MatmulArgs{g.b, g.dc, g.da, {}, g.trans_b, true, al, 1.0});
  }
  if (!g.db.empty()) {
    check_shape(op, "db", g.db, g.b.shape);
    // d op(b) = alpha op(a)^T dc
    if (!g.trans_b) matmul_fwd(MatmulArgs{g.a, g.dc, g.db, {}, !g.trans_a, false, al, 1.0});
    else matmul_fwd(MatmulArgs{g.dc, g.a, g.db, {}, true, g.trans_a, al, 1.0});
  }
  if (!g.dbias.empty()) {
    check_shape(op, "dbias", g.dbias, Shape{d.n});
    bias_rows_sum_impl(g.dc.reshaped(Shape{d.batch * d.m, d.n}), g.dbias);
  }
}

void Backend::gelu_fwd(const GeluArgs& a) {
  check_float("gelu_fwd", "x", a.x);
  check_shape("gelu_fwd", "out", a.out, a.x.shape);
  check_same_dtype("gelu_fwd", "out", a.out, a.x);
  OpTimer timer_(*this, "gelu_fwd");
  gelu_fwd_impl(a);
}

void Backend::gelu_bwd(const GeluGradArgs& a) {
  check_float("gelu_bwd", "x", a.x);
  check_shape("gelu_bwd", "dout", a.dout, a.x.shape);
  check_shape("gelu_bwd", "dx", a.dx, a.x.shape);
  check_same_dtype("gelu_bwd", "dout", a.dout, a.x);
  check_same_dtype("gelu_bwd", "dx", a.dx, a.x);
  OpTimer timer_(*this, "gelu_bwd");
  gelu_bwd_impl(a);
}

void Backend::attention_fwd(const AttentionArgs& a) {
  check_attention(*this, "attention_fwd", a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos);
  flops_ += attention_cost(a.q.shape[0], a.q.shape[1], a.k.shape[1], a.q.shape[2], a.q.shape[3], a.causal, false).flops;
  OpTimer timer_(*this, "attention_fwd");
  attention_fwd_impl(a);
}

void Backend::attention_bwd(const AttentionGradArgs& a) {
  const char* op = "attention_bwd";
  check_attention(*this, op, a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos);
  check_shape(op, "dout", a.dout, a.q.shape);
  check_shape(op, "dq", a.dq, a.q.shape);
  check_shape(op, "dk", a.dk, a.k.shape);
  check_shape(op, "dv", a.dv, a.v.shape);
  for (auto* t : {&a.dout, &a.dq, &a.dk, &a.dv}) check_same_dtype(op, "dout/dq/dk/dv", *t, a.q);
  flops_ += attention_cost(a.q.shape[0], a.q.shape[1], a.k.shape[1], a.q.shape[2], a.q.shape[3], a.causal, true).flops;
  OpTimer timer_(*this, "attention_bwd");
  attention_bwd_impl(a);
}

static void check_ce(Backend& be, const char* op, const TensorView& logits, const TensorView& targets,
                     const TensorView& mask) {
  check_rank(op, "logits", logits, 2);
  check_float(op, "logits", logits);
  const std::int64_t N = logits.shape[0], V = logits.shape[1];
  check_shape(op, "targets", targets, Shape{N});
  check_shape(op, "mask", mask, Shape{N});
  check_same_dtype(op, "mask", mask, logits);
  check_dtype(op, "targets", targets, DType::i32);
  const HostView ht(be, targets), hm(be, mask);
  const auto* t = (*ht).ptr<std::int32_t>();
  for (std::int64_t i = 0; i < N; ++i) {
    const double w = mask.dtype == DType::f32 ? (*hm).ptr<float>()[i] : (*hm).ptr<double>()[i];
    if (w != 0 && (t[i] < 0 || t[i] >= V))
      raise_input_error(detail::cat(op, ": target ", t[i], " at row ", i, " outside the vocabulary [0, ", V, ")"));
  }
}

double Backend::cross_entropy_fwd(const CrossEntropyArgs& a) {
  check_ce(*this, "cross_entropy_fwd", a.logits, a.targets, a.mask);
  check_shape("cross_entropy_fwd", "losses", a.losses, Shape{a.logits.shape[0]});
  check_same_dtype("cross_entropy_fwd", "losses", a.losses, a.logits);
  OpTimer timer_(*this, "cross_entropy_fwd");
  return cross_entropy_fwd_impl(a);
}

void Backend::cross_entropy_bwd(const CrossEntropyGradArgs& a) {
  check_ce(*this, "cross_entropy_bwd", a.logits, a.targets, a.mask);
  check_shape("cross_entropy_bwd", "dlogits", a.dlogits, a.logits.shape);
  check_same_dtype("cross_entropy_bwd", "dlogits", a.dlogits, a.logits);
  OpTimer timer_(*this, "cross_entropy_bwd");
  cross_entropy_bwd_impl(a);
}

void Backend::adamw(const AdamWArgs& a) {
  const char* op = "adamw";
  check_dtype(op, "params", a.params, DType::f32);
  for (auto* t : {&a.grads, &a.m, &a.v}) {
    check_shape(op, "grads/m/v", *t, a.params.shape);
    check_dtype(op, "grads/m/v", *t, DType::f32);
  }
  if (a.step < 1) raise_input_error(detail::cat(op, ": step must be >= 1, got ", a.step));
  OpTimer timer_(*this, "adamw");
  adamw_impl(a);
}

void Backend::axpy(const AxpyArgs& a) {
  check_float("axpy", "x", a.x);
  check_shape("axpy", "y", a.y, a.x.shape);
  check_same_dtype("axpy", "y", a.y, a.x);
  OpTimer timer_(*this, "axpy");
  axpy_impl(a);
}

void Backend::fill(TensorView x, double value) {
  check_present("fill", "x", x);
  OpTimer timer_(*this, "fill");
  fill_impl(x, value);
}

void Backend::copy(TensorView src, TensorView dst) {
  check_shape("copy", "dst", dst, src.shape);
  check_same_dtype("copy", "dst", dst, src);
  copy_impl(src, dst);
}

double Backend::sum_squares(TensorView x) {
  check_float("sum_squares", "x", x);
  OpTimer timer_(*this, "sum_squares");
  return sum_squares_impl(x);
}

void Backend::scale(TensorView x, double s) {
  check_float("scale", "x", x);
  scale_impl(x, s);
}

OpCost linear_cost(std::int64_t n, std::int64_t c, std::int64_t oc, bool backward) {
  const double f = 2.0 * static_cast<double>(n) * static_cast<double>(c) * static_cast<double>(oc);
  return {backward ? 2 * f : f, 4.0 * static_cast<double>(n * c + c * oc + n * oc)};
}

OpCost attention_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs, bool causal,
                      bool backward) {
  // Two matmuls (QK^T and PV) of 2*T*S*HS flops each per head; causal with the
  // queries at the end of the keys sees S - T + (T+1)/2 keys on average.
  // Backward = 2.5 x forward (flash-attention's convention: 5 matmuls, one recomputed).
  const double keys = causal ? static_cast<double>(s) - static_cast<double>(t) + (static_cast<double>(t) + 1) / 2.0
                             : static_cast<double>(s);
  const double fwd = 4.0 * static_cast<double>(b * nh) * static_cast<double>(t) * keys * static_cast<double>(hs);
  return {backward ? 2.5 * fwd : fwd, 4.0 * static_cast<double>(b * nh * (2 * t + 2 * s) * hs)};
}

// ---- methods' ops: boundary checks ---------------------------------------------

namespace {
void check_2d(const char* op, const char* arg, const TensorView& t) { check_rank(op, arg, t, 2); }
void check_index_range(Backend& be, const char* op, const TensorView& idx, std::int64_t n) {
  check_dtype(op, "idx", idx, DType::i32);
  const HostView hv(be, idx);
  const auto* p = (*hv).ptr<std::int32_t>();
  for (std::int64_t i = 0; i < idx.numel(); ++i)
    if (p[i] < 0 || p[i] >= n)
      raise_input_error(detail::cat(op, ": index ", p[i], " at ", i, " outside [0, ", n, ")"));
}
}  // namespace

const char* op_name(OpId op) {
  static const char* names[] = {"embedding", "rope", "layernorm", "linear", "matmul", "gelu", "attention",
                                "cross_entropy", "adamw", "axpy", "fill", "copy", "sum_squares", "scale",
                                "gather_rows", "scatter_add_rows", "attention_merge", "latent_attention",
                                "attention_mass", "topk", "kmeans_assign", "sym_eigen", "gram", "lowrank_recon",
                                "conv_project", "host_copy", "host_tasks"};
  static_assert(sizeof(names) / sizeof(names[0]) == static_cast<std::size_t>(OpId::count_));
  return names[static_cast<int>(op)];
}

void Backend::gather_rows(const GatherRowsArgs& a) {
  const char* op = "gather_rows";
  check_2d(op, "src", a.src);
  check_2d(op, "dst", a.dst);
  check_rank(op, "idx", a.idx, 1);
  check_shape(op, "dst", a.dst, Shape{a.idx.shape[0], a.src.shape[1]});
  check_same_dtype(op, "dst", a.dst, a.src);
  check_index_range(*this, op, a.idx, a.src.shape[0]);
  OpTimer timer_(*this, op);
  gather_rows_impl(a);
}

void Backend::scatter_add_rows(const ScatterAddRowsArgs& a) {
  const char* op = "scatter_add_rows";
  check_2d(op, "src", a.src);
  check_2d(op, "dst", a.dst);
  check_float(op, "src", a.src);
  check_rank(op, "idx", a.idx, 1);
  check_shape(op, "src", a.src, Shape{a.idx.shape[0], a.dst.shape[1]});
  check_same_dtype(op, "dst", a.dst, a.src);
  check_index_range(*this, op, a.idx, a.dst.shape[0]);
  flops_ += scatter_add_rows_cost(a.idx.shape[0], a.dst.shape[1], dtype_size(a.src.dtype)).flops;
  OpTimer timer_(*this, op);
  scatter_add_rows_impl(a);
}

void Backend::attention_merge(const AttentionMergeArgs& a) {
  const char* op = "attention_merge";
  check_rank(op, "o", a.o, 4);
  check_float(op, "o", a.o);
  const std::int64_t B = a.o.shape[0], T = a.o.shape[1], NH = a.o.shape[2];
  check_shape(op, "lse", a.lse, Shape{B, NH, T});
  check_shape(op, "o_b", a.o_b, a.o.shape);
  check_shape(op, "lse_b", a.lse_b, Shape{B, NH, T});
  check_same_dtype(op, "lse", a.lse, a.o);
  check_same_dtype(op, "lse_b", a.lse_b, a.o_b);
  check_float(op, "o_b", a.o_b);
  flops_ += attention_merge_cost(B, T, NH, a.o.shape[3], dtype_size(a.o.dtype), dtype_size(a.o_b.dtype)).flops;
  OpTimer timer_(*this, op);
  attention_merge_impl(a);
}

void Backend::latent_attention_fwd(const LatentAttentionArgs& a) {
  const char* op = "latent_attention_fwd";
  check_rank(op, "q", a.q, 4);
  check_rank(op, "k", a.k, 4);
  check_dtype(op, "q", a.q, DType::f32);
  check_dtype(op, "k", a.k, DType::f32);
  const std::int64_t B = a.q.shape[0], T = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  check_shape(op, "k", a.k, Shape{B, S, NH, HS});
  check_rank(op, "latent", a.latent, 3);
  check_dtype(op, "latent", a.latent, DType::f32);
  const std::int64_t Sp = a.latent.shape[1], dc = a.latent.shape[2];
  if (a.latent.shape[0] != B || Sp < S)
    raise_input_error(detail::cat(op, ": latent ", a.latent.str(), " must be (B=", B, ", >= S=", S, ", dc)"));
  check_shape(op, "k_pos", a.k_pos, Shape{B, Sp});
  check_shape(op, "q_pos", a.q_pos, Shape{B, T});
  check_positions(*this, op, "q_pos", a.q_pos);
  check_dtype(op, "k_pos", a.k_pos, DType::i32);
  check_shape(op, "up", a.up, Shape{NH * HS, dc});
  check_dtype(op, "up", a.up, DType::f32);
  check_shape(op, "o", a.o, a.q.shape);
  check_dtype(op, "o", a.o, DType::f64);
  check_shape(op, "lse", a.lse, Shape{B, NH, T});
  check_dtype(op, "lse", a.lse, DType::f64);
  if (!a.centroids.empty()) {
    check_rank(op, "centroids", a.centroids, 4);
    const std::int64_t M = a.centroids.shape[2];
    check_shape(op, "centroids", a.centroids, Shape{B, NH, M, HS});
    check_dtype(op, "centroids", a.centroids, DType::f32);
    check_rank(op, "assign", a.assign, 3);
    if (a.assign.shape[0] != B || a.assign.shape[1] != NH || a.assign.shape[2] < S)
      raise_input_error(detail::cat(op, ": assign ", a.assign.str(), " must be (B, NH, >= S)"));
    check_dtype(op, "assign", a.assign, DType::i32);
    check_shape(op, "sizes", a.sizes, Shape{B, NH, M});
    check_dtype(op, "sizes", a.sizes, DType::i32);
    if (a.clusters < 1 || a.clusters > M || a.top_clusters < 1)
      raise_input_error(detail::cat(op, ": clusters ", a.clusters, " must lie in [1, ", M, "], top_clusters >= 1"));
  }
  if (!a.mass.empty()) {
    check_shape(op, "mass", a.mass, Shape{B, S});
    check_dtype(op, "mass", a.mass, DType::f64);
    check_shape(op, "row_weight", a.row_weight, Shape{T});
    check_dtype(op, "row_weight", a.row_weight, DType::f64);
  }
  if (!a.lse_other.empty()) {
    check_shape(op, "lse_other", a.lse_other, Shape{B, NH, T});
    check_dtype(op, "lse_other", a.lse_other, DType::f32);
  }
  if (!a.used.empty()) {
    check_shape(op, "used", a.used, Shape{B, T});
    check_dtype(op, "used", a.used, DType::f64);
  }
  flops_ += latent_attention_cost(B, T, S, NH, HS, dc, !a.mass.empty()).flops;
  OpTimer timer_(*this, op);
  latent_attention_fwd_impl(a);
}

void Backend::attention_mass(const AttentionMassArgs& a) {
  const char* op = "attention_mass";
  check_rank(op, "q", a.q, 4);
  check_dtype(op, "q", a.q, DType::f32);
  check_dtype(op, "k", a.k, DType::f32);
  const std::int64_t B = a.q.shape[0], T = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3];
  check_rank(op, "k", a.k, 4);
  const std::int64_t S = a.k.shape[1];
  check_shape(op, "k", a.k, Shape{B, S, NH, HS});
  check_shape(op, "q_pos", a.q_pos, Shape{B, T});
  check_shape(op, "k_pos", a.k_pos, Shape{B, S});
  check_positions(*this, op, "q_pos", a.q_pos);
  check_positions(*this, op, "k_pos", a.k_pos);
  check_shape(op, "row_weight", a.row_weight, Shape{T});
  check_dtype(op, "row_weight", a.row_weight, DType::f64);
  check_shape(op, "mass", a.mass, Shape{B, S});
  check_dtype(op, "mass", a.mass, DType::f64);
  if (!(a.divisor > 0)) raise_input_error(detail::cat(op, ": divisor must be > 0, got ", a.divisor));
  flops_ += attention_mass_cost(B, T, S, NH, HS).flops;
  OpTimer timer_(*this, op);
  attention_mass_impl(a);
}

void Backend::topk(const TopKArgs& a) {
  const char* op = "topk";
  check_2d(op, "x", a.x);
  check_float(op, "x", a.x);
  check_2d(op, "idx", a.idx);
  check_dtype(op, "idx", a.idx, DType::i32);
  if (a.idx.shape[0] != a.x.shape[0] || a.idx.shape[1] > a.x.shape[1])
    raise_input_error(detail::cat(op, ": idx ", a.idx.str(), " must be (R, k <= N) for x ", a.x.str()));
  flops_ += topk_cost(a.x.shape[0], a.x.shape[1], a.idx.shape[1], dtype_size(a.x.dtype)).flops;
  OpTimer timer_(*this, op);
  topk_impl(a);
}

void Backend::kmeans_assign(const KMeansAssignArgs& a) {
  const char* op = "kmeans_assign";
  check_rank(op, "x", a.x, 3);
  check_rank(op, "centroids", a.centroids, 3);
  check_float(op, "x", a.x);
  check_same_dtype(op, "centroids", a.centroids, a.x);
  const std::int64_t G = a.x.shape[0], N = a.x.shape[1], D = a.x.shape[2], M = a.centroids.shape[1];
  check_shape(op, "centroids", a.centroids, Shape{G, M, D});
  check_shape(op, "assign", a.assign, Shape{G, N});
  check_dtype(op, "assign", a.assign, DType::i32);
  if (!a.dist.empty()) {
    check_shape(op, "dist", a.dist, Shape{G, N});
    check_dtype(op, "dist", a.dist, DType::f64);
  }
  if (a.clusters < 0 || a.clusters > M || (a.clusters == 0 && M == 0))
    raise_input_error(detail::cat(op, ": clusters ", a.clusters, " outside [1, ", M, "]"));
  flops_ += kmeans_assign_cost(G, N, M, D, dtype_size(a.x.dtype)).flops;
  OpTimer timer_(*this, op);
  kmeans_assign_impl(a);
}

void Backend::sym_eigen(const SymEigenArgs& a) {
  const char* op = "sym_eigen";
  check_2d(op, "a", a.a);
  const std::int64_t n = a.a.shape[0];
  check_shape(op, "a", a.a, Shape{n, n});
  check_dtype(op, "a", a.a, DType::f64);
  check_shape(op, "vals", a.vals, Shape{n});
  check_dtype(op, "vals", a.vals, DType::f64);
  check_shape(op, "vecs", a.vecs, Shape{n, n});
  check_dtype(op, "vecs", a.vecs, DType::f64);
  flops_ += sym_eigen_cost(n).flops;
  OpTimer timer_(*this, op);
  sym_eigen_impl(a);
}

void Backend::gram(const GramArgs& a) {
  const char* op = "gram";
  check_2d(op, "x", a.x);
  check_dtype(op, "x", a.x, DType::f32);
  const std::int64_t C = a.x.shape[1];
  check_shape(op, "g", a.g, Shape{C, C});
  check_dtype(op, "g", a.g, DType::f64);
  flops_ += gram_cost(a.x.shape[0], C).flops;
  OpTimer timer_(*this, op);
  gram_impl(a);
}

namespace {
void check_recon(const char* op, const TensorView& x, const TensorView& p, const TensorView& u) {
  check_2d(op, "x", x);
  check_dtype(op, "x", x, DType::f32);
  check_2d(op, "p", p);
  const std::int64_t C = x.shape[1], dc = p.shape[0];
  check_shape(op, "p", p, Shape{dc, C});
  check_shape(op, "u", u, Shape{C, dc});
  check_dtype(op, "p", p, DType::f32);
  check_dtype(op, "u", u, DType::f32);
}
}  // namespace

double Backend::lowrank_recon_fwd(const LowRankReconArgs& a) {
  check_recon("lowrank_recon_fwd", a.x, a.p, a.u);
  flops_ += lowrank_recon_cost(a.x.shape[0], a.x.shape[1], a.p.shape[0], false).flops;
  OpTimer timer_(*this, "lowrank_recon_fwd");
  return lowrank_recon_fwd_impl(a);
}

void Backend::lowrank_recon_bwd(const LowRankReconGradArgs& a) {
  const char* op = "lowrank_recon_bwd";
  check_recon(op, a.x, a.p, a.u);
  check_shape(op, "dp", a.dp, a.p.shape);
  check_shape(op, "du", a.du, a.u.shape);
  check_dtype(op, "dp", a.dp, DType::f32);
  check_dtype(op, "du", a.du, DType::f32);
  flops_ += lowrank_recon_cost(a.x.shape[0], a.x.shape[1], a.p.shape[0], true).flops;
  OpTimer timer_(*this, op);
  lowrank_recon_bwd_impl(a);
}

namespace {
void check_conv(const char* op, const TensorView& e, const TensorView& taps, const TensorView& w) {
  check_2d(op, "e", e);
  check_2d(op, "taps", taps);
  check_2d(op, "w", w);
  const std::int64_t C = e.shape[1];
  check_shape(op, "taps", taps, Shape{taps.shape[0], C});
  check_shape(op, "w", w, Shape{w.shape[0], C});
  for (const TensorView* t : {&e, &taps, &w}) check_dtype(op, "e/taps/w", *t, DType::f32);
}
}  // namespace

void Backend::conv_project_fwd(const ConvProjectArgs& a) {
  const char* op = "conv_project_fwd";
  check_conv(op, a.e, a.taps, a.w);
  check_shape(op, "r", a.r, Shape{a.e.shape[0], a.w.shape[0]});
  check_dtype(op, "r", a.r, DType::f64);
  flops_ += conv_project_cost(a.e.shape[0], a.e.shape[1], a.taps.shape[0], a.w.shape[0], false).flops;
  OpTimer timer_(*this, op);
  conv_project_fwd_impl(a);
}

void Backend::conv_project_bwd(const ConvProjectGradArgs& a) {
  const char* op = "conv_project_bwd";
  check_conv(op, a.e, a.taps, a.w);
  check_shape(op, "dr", a.dr, Shape{a.e.shape[0], a.w.shape[0]});
  check_dtype(op, "dr", a.dr, DType::f64);
  check_shape(op, "dw", a.dw, a.w.shape);
  check_shape(op, "dtaps", a.dtaps, a.taps.shape);
  check_dtype(op, "dw", a.dw, DType::f32);
  check_dtype(op, "dtaps", a.dtaps, DType::f32);
  flops_ += conv_project_cost(a.e.shape[0], a.e.shape[1], a.taps.shape[0], a.w.shape[0], true).flops;
  OpTimer timer_(*this, op);
  conv_project_bwd_impl(a);
}

void Backend::copy_to_host(TensorView src, std::span<std::byte> dst) {
  DSRSQ_INPUT_CHECK(dst.size() == src.bytes(), "copy_to_host: destination holds ", dst.size(), " bytes, tensor ",
                    src.str(), " has ", src.bytes());
  DSRSQ_INPUT_CHECK(src.device == device(), "copy_to_host: tensor on ", device_name(src.device), ", backend ",
                    name(), " owns ", device_name(device()));
  copy_to_host_impl(src, dst);
}

void Backend::copy_from_host(std::span<const std::byte> src, TensorView dst) {
  DSRSQ_INPUT_CHECK(src.size() == dst.bytes(), "copy_from_host: source holds ", src.size(), " bytes, tensor ",
                    dst.str(), " has ", dst.bytes());
  DSRSQ_INPUT_CHECK(dst.device == device(), "copy_from_host: tensor on ", device_name(dst.device), ", backend ",
                    name(), " owns ", device_name(device()));
  copy_from_host_impl(src, dst);
}

void Backend::host_tasks(std::int64_t n, const std::function<void(std::int64_t)>& fn) {
  if (n <= 0) return;
  host_tasks_impl(n, fn);
}

#ifdef DSRSQ_HAVE_CUDA
namespace cuda {
Backend* backend_if_present();  // backend/cuda/cuda_backend.cpp: nullptr without a GPU
}
#endif

Backend* device_backend(Device d) {
  switch (d) {
    case Device::cpu: return &cpu_backend();
    case Device::sim: return &sim::sim_backend();
    case Device::cuda:
#ifdef DSRSQ_HAVE_CUDA
      return cuda::backend_if_present();
#else
      return nullptr;
#endif
  }
  return nullptr;
}

std::vector<Backend*> available_backends() {
  std::vector<Backend*> r{&cpu_backend()};
#ifdef DSRSQ_HAVE_CUDA
  if (Backend* g = cuda::backend_if_present()) r.push_back(g);
#endif
  return r;
}

// ---- costs of the methods' ops ---------------------------------------------------
// flops: floating-point operations (a multiply-add counts 2; exp/log count 1);
// bytes: bytes read plus bytes written, each tensor element once.
namespace {
double D(std::int64_t x) { return static_cast<double>(x); }
}  // namespace

OpCost gather_rows_cost(std::int64_t m, std::int64_t c, std::size_t elem) {
  return {0.0, 2.0 * D(m) * D(c) * static_cast<double>(elem) + 4.0 * D(m)};
}
OpCost scatter_add_rows_cost(std::int64_t m, std::int64_t c, std::size_t elem) {
  return {D(m) * D(c), 3.0 * D(m) * D(c) * static_cast<double>(elem) + 4.0 * D(m)};  // read src, read+write dst
}
OpCost attention_merge_cost(std::int64_t b, std::int64_t t, std::int64_t nh, std::int64_t hs, std::size_t elem,
                            std::size_t elem_b) {
  const double rows = D(b) * D(t) * D(nh);
  // per row: max, 2 exp, add, log, 2 divides; per element 3 flops (2 mul + add)
  return {rows * (7.0 + 3.0 * D(hs)),
          rows * ((D(hs) + 1) * static_cast<double>(2 * elem + elem_b))};
}
OpCost latent_attention_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs,
                             std::int64_t dc, bool with_mass) {
  const double rows = D(b) * D(t) * D(nh);
  // scores 2 HS per key, exp 1 + normalise 1, latent accumulation 2 dc per key,
  // up-projection 2 HS dc per row, mass 3 per key.
  const double per_row = D(s) * (2.0 * D(hs) + 2.0 + 2.0 * D(dc) + (with_mass ? 3.0 : 0.0)) + 2.0 * D(hs) * D(dc);
  const double bytes = 4.0 * D(b) * (D(t) * D(nh) * D(hs) + D(s) * (D(nh) * D(hs) + D(dc) + 1)) +
                       4.0 * D(nh) * D(hs) * D(dc) + 8.0 * rows * (D(hs) + 1) + (with_mass ? 8.0 * D(b) * D(s) : 0.0);
  return {rows * per_row, bytes};
}
OpCost attention_mass_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs) {
  // Two passes over the scores (normaliser, then mass): 2 x (2 HS + 2) per (query, key, head).
  return {D(b) * D(t) * D(s) * D(nh) * 2.0 * (2.0 * D(hs) + 2.0),
          4.0 * D(b) * (D(t) + D(s)) * D(nh) * D(hs) + 8.0 * (D(t) + D(b) * D(s))};
}
OpCost topk_cost(std::int64_t rows, std::int64_t n, std::int64_t k, std::size_t elem) {
  // partial sort: about n log2(k+1) comparisons per row
  return {D(rows) * D(n) * std::log2(D(k) + 1.0), D(rows) * (D(n) * static_cast<double>(elem) + 4.0 * D(k))};
}
OpCost kmeans_assign_cost(std::int64_t g, std::int64_t n, std::int64_t m, std::int64_t d, std::size_t elem) {
  return {D(g) * D(n) * D(m) * 3.0 * D(d),
          static_cast<double>(elem) * D(g) * (D(n) + D(m)) * D(d) + 4.0 * D(g) * D(n)};
}
OpCost sym_eigen_cost(std::int64_t n) {
  // divide and conquer tridiagonal eigensolver with vectors: ~ 9 n^3 (Golub & Van Loan, table 8.1)
  return {9.0 * D(n) * D(n) * D(n), 8.0 * (2.0 * D(n) * D(n) + D(n))};
}
OpCost gram_cost(std::int64_t n, std::int64_t c) {
  return {D(n) * D(c) * (D(c) + 1), 4.0 * D(n) * D(c) + 8.0 * D(c) * D(c)};  // upper triangle, 2 flops per pair
}
OpCost lowrank_recon_cost(std::int64_t n, std::int64_t c, std::int64_t dc, bool backward) {
  // fwd: z = P x (2 C dc), x_hat = U z (2 C dc), residual 3 C per row.
  // bwd: recompute z, r (4 C dc), U^T r (2 C dc), dU (2 C dc), dP (2 C dc).
  const double fwd = D(n) * (4.0 * D(c) * D(dc) + 3.0 * D(c));
  const double bwd = D(n) * (10.0 * D(c) * D(dc) + D(c));
  const double bytes = 4.0 * (D(n) * D(c) + 2.0 * D(c) * D(dc)) + (backward ? 8.0 * D(c) * D(dc) : 0.0);
  return {backward ? bwd : fwd, bytes};
}
OpCost conv_project_cost(std::int64_t n, std::int64_t c, std::int64_t w, std::int64_t r, bool backward) {
  const double conv = 2.0 * D(n) * D(w) * D(c), proj = 2.0 * D(n) * D(c) * D(r);
  const double bytes = 4.0 * (D(n) * D(c) + D(w) * D(c) + D(r) * D(c)) + 8.0 * D(n) * D(r);
  return {backward ? 2.0 * conv + 2.0 * proj : conv + proj, backward ? bytes + 4.0 * (D(w) + D(r)) * D(c) : bytes};
}
OpCost host_copy_cost(std::size_t bytes) { return {0.0, 2.0 * static_cast<double>(bytes)}; }

}  // namespace dsrsq
