#pragma once
// One backend interface with coarse ops. Every op has its forward and backward
// side by side, the same argument structs on every backend, and a shape check
// at the boundary (done once here, before the backend's implementation runs,
// so every backend rejects bad input with the same message).
//
// Dimension letters: B batch, T query tokens, S key tokens, NH heads, HS head
// size, C channels, OC output channels, V vocabulary, N rows (= B*T).
// Float tensors of one op share one dtype: f32 in the engine, f64 in the
// gradient tests. Index tensors are i32.
//
// Gradient rule per op (written at each struct): "+=" accumulates into the
// buffer (the caller zeroes it once), "=" overwrites it.
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "core/arena.hpp"
#include "core/tensor.hpp"

namespace dsrsq {

// ---- embedding --------------------------------------------------------------
// out(N,C) = table[tokens[n]].   Backward: dtable += scatter(dout).
struct EmbeddingArgs {
  TensorView tokens;  // i32 (N)
  TensorView table;   // (V, C)
  TensorView out;     // (N, C)
};
struct EmbeddingGradArgs {
  TensorView tokens;  // i32 (N)
  TensorView dout;    // (N, C)
  TensorView dtable;  // (V, C)  +=
};

// ---- rotary position embedding (rotate-half / GPT-NeoX layout) -------------
// In place on x (N, NH, HS), HS even: for i < HS/2, angle = pos * theta^(-2i/HS),
// (x[i], x[i+HS/2]) -> (x[i] cos - x[i+HS/2] sin, x[i+HS/2] cos + x[i] sin).
// Backward is the inverse rotation applied in place to the gradient.
struct RopeArgs {
  TensorView x;    // (N, NH, HS), in place
  TensorView pos;  // i32 (N): the token's position in the full sequence
  double theta = 10000.0;
};

// ---- layernorm --------------------------------------------------------------
// out = (x - mean) * rstd * weight + bias over the last dim.
// Saved for backward: mean (N), rstd (N).  Backward: dx +=, dweight +=, dbias +=.
struct LayerNormArgs {
  TensorView x, weight, bias, out;  // (N,C), (C), (C), (N,C)
  TensorView mean, rstd;            // (N), (N): written
  double eps = 1e-5;
};
struct LayerNormGradArgs {
  TensorView dout, x, weight, mean, rstd;  // as saved by forward
  TensorView dx, dweight, dbias;           // +=
};

// ---- linear -----------------------------------------------------------------
// out(N,OC) = x(N,C) @ weight(OC,C)^T + bias(OC)   (bias optional).
// Backward: dx = or += (dx_accumulate), dweight +=, dbias += (optional).
struct LinearArgs {
  TensorView x, weight, bias, out;
};
struct LinearGradArgs {
  TensorView dout, x, weight;
  TensorView dx, dweight, dbias;  // dx or dbias may be empty (not needed)
  bool dx_accumulate = false;
};

// ---- general (strided batched) matmul ---------------------------------------
// c[b] = alpha * op(a[b]) @ op(b[b]) + beta * c[b] (+ bias(N) on every row).
// a is (M,K) or (K,M) when trans_a; b is (K,N) or (N,K) when trans_b; c (M,N);
// all 2-D, or all 3-D with the same leading batch dim.
// Backward: da +=, db += (either may be empty), dbias += (optional).
struct MatmulArgs {
  TensorView a, b, c, bias;
  bool trans_a = false, trans_b = false;
  double alpha = 1.0, beta = 0.0;
};
struct MatmulGradArgs {
  TensorView dc, a, b;
  TensorView da, db, dbias;
  bool trans_a = false, trans_b = false;
  double alpha = 1.0;
};

// ---- GELU (tanh approximation, as GPT-2 and torch's approximate='tanh') ------
// Backward: dx = dout * gelu'(x)  (overwrite).
struct GeluArgs {
  TensorView x, out;  // same shape
};
struct GeluGradArgs {
  TensorView dout, x, dx;  // dx =
};

// ---- attention --------------------------------------------------------------
// q (B,T,NH,HS); k, v (B,S,NH,HS); o (B,T,NH,HS); lse (B,NH,T).
// q_pos i32 (B,T), k_pos i32 (B,S): positions in the full sequence. With
// causal, key j is visible to query i iff k_pos[j] <= q_pos[i]; keys may come in
// any order (a retrieved subset keeps its original positions).
// Computed blockwise with online softmax: no T x S matrix, blocks whose keys
// are all invisible are skipped. A row with no visible key gets o = 0 and
// lse = -inf. scale defaults to 1/sqrt(HS) when <= 0.
// Saved for backward: o, lse.  Backward: dq +=, dk +=, dv += (ring steps add
// partial contributions; the caller zeroes them once).
struct AttentionArgs {
  TensorView q, k, v, o, lse;
  TensorView q_pos, k_pos;
  bool causal = true;
  double scale = 0.0;
};
struct AttentionGradArgs {
  TensorView dout, q, k, v, o, lse;
  TensorView q_pos, k_pos;
  TensorView dq, dk, dv;  // +=
  bool causal = true;
  double scale = 0.0;
};

// ---- softmax cross-entropy with a loss mask ---------------------------------
// losses[n] = -log softmax(logits[n])[targets[n]] for rows with mask[n] != 0
// (0 for the others). Returns sum_n mask[n] * losses[n] * inv_norm.
// Backward: dlogits[n] = dloss * inv_norm * mask[n] * (softmax(logits[n]) - onehot)  (overwrite).
struct CrossEntropyArgs {
  TensorView logits;   // (N, V)
  TensorView targets;  // i32 (N); rows with mask 0 may hold any value
  TensorView mask;     // (N) weights, float dtype of logits
  TensorView losses;   // (N) written
  double inv_norm = 1.0;
};
struct CrossEntropyGradArgs {
  TensorView logits, targets, mask;
  TensorView dlogits;  // (N, V) =
  double inv_norm = 1.0;
  double dloss = 1.0;
};

// ---- AdamW (decoupled weight decay), in place -------------------------------
// g' = grad_scale * g; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
// p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p), bias-corrected by step (1-based).
struct AdamWArgs {
  TensorView params, grads, m, v;  // same shape, f32
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double grad_scale = 1.0;
  std::int64_t step = 1;
};

// ---- element-wise and reductions --------------------------------------------
struct AxpyArgs {  // y += alpha * x
  TensorView x, y;
  double alpha = 1.0;
};

// Optional per-op wall-time profile (off by default; DSRSQ_PROFILE=1 turns it
// on for the programs that honour it). Times each op's implementation call.
struct OpProfileEntry {
  const char* op;
  double seconds;
  std::int64_t calls;
};

class Backend {
 public:
  virtual ~Backend() = default;
  void set_profiling(bool on) { profiling_ = on; }
  bool profiling() const { return profiling_; }
  std::vector<OpProfileEntry> profile() const;
  void reset_profile();
  virtual std::string_view name() const = 0;
  virtual Device device() const = 0;
  virtual Allocator& allocator() = 0;
  virtual void synchronize() {}

  void embedding_fwd(const EmbeddingArgs& a);
  void embedding_bwd(const EmbeddingGradArgs& a);
  void rope_fwd(const RopeArgs& a);
  void rope_bwd(const RopeArgs& a);  // a.x holds the gradient
  void layernorm_fwd(const LayerNormArgs& a);
  void layernorm_bwd(const LayerNormGradArgs& a);
  void linear_fwd(const LinearArgs& a);
  void linear_bwd(const LinearGradArgs& a);
  void matmul_fwd(const MatmulArgs& a);
  void matmul_bwd(const MatmulGradArgs& a);
  void gelu_fwd(const GeluArgs& a);
  void gelu_bwd(const GeluGradArgs& a);
  void attention_fwd(const AttentionArgs& a);
  void attention_bwd(const AttentionGradArgs& a);
  double cross_entropy_fwd(const CrossEntropyArgs& a);
  void cross_entropy_bwd(const CrossEntropyGradArgs& a);
  void adamw(const AdamWArgs& a);
  void axpy(const AxpyArgs& a);
  void fill(TensorView x, double value);
  void copy(TensorView src, TensorView dst);
  double sum_squares(TensorView x);  // accumulated in double
  void scale(TensorView x, double s);

 protected:
  virtual void embedding_fwd_impl(const EmbeddingArgs& a) = 0;
  virtual void embedding_bwd_impl(const EmbeddingGradArgs& a) = 0;
  virtual void rope_impl(const RopeArgs& a, bool inverse) = 0;
  virtual void layernorm_fwd_impl(const LayerNormArgs& a) = 0;
  virtual void layernorm_bwd_impl(const LayerNormGradArgs& a) = 0;
  virtual void matmul_fwd_impl(const MatmulArgs& a) = 0;
  virtual void gelu_fwd_impl(const GeluArgs& a) = 0;
  virtual void gelu_bwd_impl(const GeluGradArgs& a) = 0;
  virtual void attention_fwd_impl(const AttentionArgs& a) = 0;
  virtual void attention_bwd_impl(const AttentionGradArgs& a) = 0;
  virtual double cross_entropy_fwd_impl(const CrossEntropyArgs& a) = 0;
  virtual void cross_entropy_bwd_impl(const CrossEntropyGradArgs& a) = 0;
  virtual void adamw_impl(const AdamWArgs& a) = 0;
  virtual void axpy_impl(const AxpyArgs& a) = 0;
  virtual void fill_impl(TensorView x, double value) = 0;
  virtual void copy_impl(TensorView src, TensorView dst) = 0;
  virtual double sum_squares_impl(TensorView x) = 0;
  virtual void scale_impl(TensorView x, double s) = 0;
  virtual void bias_rows_sum_impl(TensorView dout2d, TensorView dbias) = 0;  // dbias(OC) += sum over rows

 private:
  friend class OpTimer;
  bool profiling_ = false;
  std::vector<OpProfileEntry> prof_;
};

// The process's CPU backend (OpenBLAS + OpenMP).
Backend& cpu_backend();

// Cost model: the only place FLOPs of the ops are defined.
struct OpCost {
  double flops = 0;
  double bytes = 0;
};
OpCost linear_cost(std::int64_t n, std::int64_t c, std::int64_t oc, bool backward);
// Causal attention with all queries at the end of the keys (T <= S).
OpCost attention_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs, bool causal,
                      bool backward);

}  // namespace dsrsq
