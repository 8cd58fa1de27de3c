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
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
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
// log_base > 1 (queries only): each row is also scaled by
// s(pos) = max(1, ln(pos + 1) / ln(log_base)), the log-length attention scaling
// (Su 2021; Qwen's logn attention): a query that sees more keys than the
// trained length log_base gets proportionally sharper logits. The backward
// scales by the same s (s R is linear). 0: off.
struct RopeArgs {
  TensorView x;    // (N, NH, HS), in place
  TensorView pos;  // i32 (N): the token's position in the full sequence
  double theta = 10000.0;
  double log_base = 0.0;
};
// s(pos) above (1 when log_base <= 0). A caller whose queries all stand at one
// cache position (the sliding window once full) rotates with log_base 0 and
// passes s(position) / sqrt(HS) as the attention scale instead.
inline double log_length_scale(double log_base, double pos) {
  return log_base > 0 ? std::max(1.0, std::log(pos + 1.0) / std::log(log_base)) : 1.0;
}

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


// ---- gather rows / scatter-add rows (a pair) ---------------------------------
// gather:      dst(M,C) = src[idx[m]]       (any dtype; src, dst share it)   dst =
// scatter_add: dst[idx[m]] += src(M,C)       (float dtypes) the gather's backward:
//              dsrc += scatter_add(ddst). Rows are visited in order m = 0..M-1
//              (repeated indices add in that order: deterministic).
struct GatherRowsArgs {
  TensorView src;  // (N, C)
  TensorView idx;  // i32 (M), each in [0, N)
  TensorView dst;  // (M, C) =
};
struct ScatterAddRowsArgs {
  TensorView src;  // (M, C)
  TensorView idx;  // i32 (M), each in [0, N)
  TensorView dst;  // (N, C) +=
};

// ---- the attention merge (log-sum-exp rule) -----------------------------------
// Merges a partial attention result (o_b, lse_b) over one key set into the
// running result (o, lse) over another, disjoint key set, in place:
//   m = max(lse, lse_b); wa = exp(lse - m), wb = exp(lse_b - m) (0 for a side
//   at -inf; +inf is read as -inf); lse = m + log(wa + wb);
//   o = wa/(wa+wb) * o + wb/(wa+wb) * o_b  (a side with weight 0 contributes 0
//   even when it holds garbage); both sides at -inf: o = 0, lse = -inf.
// o (B,T,NH,HS), lse (B,NH,T) float dtype F; o_b, lse_b the same shapes, float
// dtype P. Arithmetic in the wider of F and P (a double partial merged into an
// f32 result is not rounded to f32 before the merge; f32 partials merged into
// a double accumulator are merged in double).
// No backward of its own: the backward of merged attention is attention_bwd of
// each part with the MERGED lse (as ring attention does).
struct AttentionMergeArgs {
  TensorView o, lse;      // running, updated in place
  TensorView o_b, lse_b;  // partial
};

// ---- latent-space attention (RCKV's buffer) -----------------------------------
// For query (b,i,h) and keys j in [0,S) visible to it (k_pos[b,j] <= q_pos[b,i]
// and, when clusters are given, j's cluster among the query's top_clusters):
//   s_j = scale * q[b,i,h] . k[b,j,h]  (f64 dot of f32 values), p = softmax(s),
//   z = sum_j p_j latent[b,j]  (d_c, f64),  o[b,i,h] = up[h*HS:(h+1)*HS, :] @ z,
//   lse[b,h,i] = log sum_j exp s_j.
// No visible key: lse = -inf, o = 0 (merges as "nothing").
// Clusters (optional, SQA at decode): centroids (B,NH,M,HS) f32, assign (B,NH,S')
// i32 (S' >= S; -1: unassigned), sizes (B,NH,M) i32; `clusters` (<= M) in use.
// Each query scores the non-empty centroids by f64 dot product and keeps the
// top_clusters largest (ties: lower cluster index).
// Mass (optional): the probability of key j in the softmax MERGED with another
// partial of log-normaliser lse_other (B,NH,T) (window attention), weighted per
// query row and averaged over heads, accumulated per key:
//   mass[b,j] += sum_i row_weight[i] * sum_h p'_{ihj} / NH,
//   p' = p * wb/(wa+wb) with the merge weights of AttentionMergeArgs.
// used (optional) (B,T) f64 =: visible keys summed over heads.
// Forward only (inference: RCKV's buffer is not trained through this path).
// latent (B,S',dc) with S' >= S: rows [0,S) are read.
struct LatentAttentionArgs {
  TensorView q;       // f32 (B,T,NH,HS), rotated
  TensorView k;       // f32 (B,S,NH,HS), rotated reconstructed keys
  TensorView q_pos;   // i32 (B,T)
  TensorView k_pos;   // i32 (B,S') rows [0,S) read
  TensorView latent;  // f32 (B,S',dc)
  TensorView up;      // f32 (NH*HS, dc)
  TensorView o;       // f64 (B,T,NH,HS) =
  TensorView lse;     // f64 (B,NH,T) =
  TensorView centroids, assign, sizes;  // optional (see above)
  std::int64_t clusters = 0, top_clusters = 0;
  TensorView lse_other;   // optional f32 (B,NH,T)
  TensorView row_weight;  // f64 (T), with mass
  TensorView mass;        // optional f64 (B,S) +=
  TensorView used;        // optional f64 (B,T) =
  double scale = 0.0;     // <= 0: 1/sqrt(HS)
};

// ---- attention mass (importance of keys) ---------------------------------------
// Dense causal softmax of every query over the keys (f64 scores of f32 values,
// scale 1/sqrt(HS) when <= 0), and per key the probability mass it receives:
//   mass[b,j] = (sum_i row_weight[i] sum_h p_{ihj}) / divisor        (=)
// (summed over i, then h, in order). Forward only (a statistic).
struct AttentionMassArgs {
  TensorView q;           // f32 (B,T,NH,HS) rotated
  TensorView k;           // f32 (B,S,NH,HS) rotated
  TensorView q_pos;       // i32 (B,T)
  TensorView k_pos;       // i32 (B,S)
  TensorView row_weight;  // f64 (T); rows with weight 0 are skipped
  TensorView mass;        // f64 (B,S) =
  double divisor = 1.0;
  double scale = 0.0;
};

// ---- top-k per row -------------------------------------------------------------
// idx[r, 0..k) = indices of the k largest values of x[r] in decreasing order;
// ties go to the lower index (deterministic). NaN counts as smaller than all.
struct TopKArgs {
  TensorView x;    // (R, N) float
  TensorView idx;  // i32 (R, k), k <= N  =
};

// ---- k-means assign ------------------------------------------------------------
// assign[g,n] = argmin_c ||x[g,n] - centroids[g,c]||^2 over c < clusters
// (f64 distances; ties to the lower c). dist (optional, f64 (G,N)) = that distance.
struct KMeansAssignArgs {
  TensorView x;          // float (G, N, D)
  TensorView centroids;  // float (G, M, D)
  TensorView assign;     // i32 (G, N) =
  TensorView dist;       // optional f64 (G, N) =
  std::int64_t clusters = 0;  // <= M; 0: M
};

// ---- symmetric eigendecomposition ----------------------------------------------
// a (n,n) f64 symmetric: vals (n) and vecs (n,n), eigenvector of vals[j] in
// column j (order unspecified). LAPACK (divide and conquer, from OpenBLAS) when linked, else cyclic Jacobi.
struct SymEigenArgs {
  TensorView a;     // f64 (n, n), read only
  TensorView vals;  // f64 (n) =
  TensorView vecs;  // f64 (n, n) =
  bool force_jacobi = false;
};

// ---- Gram matrix X^T X (f64) ---------------------------------------------------
// g(C,C) = sum_n x_n x_n^T in f64 from f32 rows (the uncentred second moment).
struct GramArgs {
  TensorView x;  // f32 (N, C)
  TensorView g;  // f64 (C, C) =
};

// ---- low-rank reconstruction loss (RCKV's compression term) ---------------------
// fwd returns sum_n ||U P x_n - x_n||^2 (f64). bwd, with r = U P x - x, z = P x:
//   dp += scale * sum_n (U^T r_n) x_n^T,  du += scale * sum_n r_n z_n^T.
struct LowRankReconArgs {
  TensorView x;  // f32 (N, C)
  TensorView p;  // f32 (dc, C)
  TensorView u;  // f32 (C, dc)
};
struct LowRankReconGradArgs {
  TensorView x, p, u;
  TensorView dp, du;  // f32 +=
  double scale = 1.0;
};

// ---- causal depthwise convolution + projection (DSR's context encoder) ----------
// e'_i = sum_{t < W, t <= i} taps[t] * e[i - t]  (per channel),  r_i = w e'_i  (f64).
// bwd: dw += weight * sum_i dr_i e'_i^T,  dtaps[t] += weight * sum_i (w^T dr_i) * e[i-t].
struct ConvProjectArgs {
  TensorView e;     // f32 (N, C)
  TensorView taps;  // f32 (W, C)
  TensorView w;     // f32 (R, C)
  TensorView r;     // f64 (N, R) =
};
struct ConvProjectGradArgs {
  TensorView e, taps, w;
  TensorView dr;           // f64 (N, R)
  TensorView dw, dtaps;    // f32 +=
  double weight = 1.0;
};

// Ops a backend may or may not implement (ggml's supports_op): a method asks
// before it runs, so a backend without an op refuses the method up front.
enum class OpId {
  embedding, rope, layernorm, linear, matmul, gelu, attention, cross_entropy, adamw, axpy, fill, copy, sum_squares,
  scale, gather_rows, scatter_add_rows, attention_merge, latent_attention, attention_mass, topk, kmeans_assign,
  sym_eigen, gram, lowrank_recon, conv_project, host_copy, host_tasks,
  count_
};
const char* op_name(OpId op);

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
  // FLOPs of every counted op run since the last reset, from the ops' cost
  // functions (matrix products, attention, the methods' ops: latent attention,
  // attention mass and merge, top-k, k-means assignment, eigensolver, Gram,
  // low-rank reconstruction, convolution + projection). Elementwise ops
  // (LayerNorm, GELU, RoPE, embedding, cross-entropy, AdamW) are not counted,
  // as in MFU conventions. Host work outside the ops adds itself (count_flops).
  double flops_counted() const { return flops_; }
  void reset_flops() { flops_ = 0; }
  void count_flops(double f) { flops_ += f; }
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

  // Methods' ops (see the argument structs above).
  void gather_rows(const GatherRowsArgs& a);
  void scatter_add_rows(const ScatterAddRowsArgs& a);  // gather's backward
  void attention_merge(const AttentionMergeArgs& a);
  void latent_attention_fwd(const LatentAttentionArgs& a);
  void attention_mass(const AttentionMassArgs& a);
  void topk(const TopKArgs& a);
  void kmeans_assign(const KMeansAssignArgs& a);
  void sym_eigen(const SymEigenArgs& a);
  void gram(const GramArgs& a);
  double lowrank_recon_fwd(const LowRankReconArgs& a);
  void lowrank_recon_bwd(const LowRankReconGradArgs& a);
  void conv_project_fwd(const ConvProjectArgs& a);
  void conv_project_bwd(const ConvProjectGradArgs& a);
  // Host <-> backend memory (the only way host code moves a device tensor).
  void copy_to_host(TensorView src, std::span<std::byte> dst);
  void copy_from_host(std::span<const std::byte> src, TensorView dst);
  // Independent host tasks fn(0..n-1) (e.g. one k-means per (batch, head)),
  // in parallel where the backend has host threads; each task must write only
  // its own outputs. Not a tensor op: the scheduling hook for host-side work.
  void host_tasks(std::int64_t n, const std::function<void(std::int64_t)>& fn);
  // Whether this backend implements `op` (CPU: every op).
  virtual bool supports(OpId op) const = 0;

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
  virtual void gather_rows_impl(const GatherRowsArgs& a) = 0;
  virtual void scatter_add_rows_impl(const ScatterAddRowsArgs& a) = 0;
  virtual void attention_merge_impl(const AttentionMergeArgs& a) = 0;
  virtual void latent_attention_fwd_impl(const LatentAttentionArgs& a) = 0;
  virtual void attention_mass_impl(const AttentionMassArgs& a) = 0;
  virtual void topk_impl(const TopKArgs& a) = 0;
  virtual void kmeans_assign_impl(const KMeansAssignArgs& a) = 0;
  virtual void sym_eigen_impl(const SymEigenArgs& a) = 0;
  virtual void gram_impl(const GramArgs& a) = 0;
  virtual double lowrank_recon_fwd_impl(const LowRankReconArgs& a) = 0;
  virtual void lowrank_recon_bwd_impl(const LowRankReconGradArgs& a) = 0;
  virtual void conv_project_fwd_impl(const ConvProjectArgs& a) = 0;
  virtual void conv_project_bwd_impl(const ConvProjectGradArgs& a) = 0;
  virtual void copy_to_host_impl(TensorView src, std::span<std::byte> dst) = 0;
  virtual void copy_from_host_impl(std::span<const std::byte> src, TensorView dst) = 0;
  virtual void host_tasks_impl(std::int64_t n, const std::function<void(std::int64_t)>& fn) = 0;

 private:
  friend class OpTimer;
  bool profiling_ = false;
  std::vector<OpProfileEntry> prof_;
  double flops_ = 0;
};

// The process's CPU backend (OpenBLAS + OpenMP).
Backend& cpu_backend();

// Host copies for host code (small arrays: positions, token ids, one logits
// row, per-row losses): the one way it reads or writes a tensor that may live
// on a device. A host tensor is read or written directly; a device tensor
// goes through be.copy_to_host / copy_from_host (a synchronisation on a GPU).
template <class T>
std::vector<T> to_host(Backend& be, const TensorView& t) {
  std::vector<T> out(static_cast<std::size_t>(t.numel()));
  if (t.device == Device::cpu) {
    const T* p = t.ptr<T>();
    std::copy(p, p + t.numel(), out.begin());
  } else {
    DSRSQ_REQUIRE(t.dtype == dtype_of<T>(), "to_host: tensor dtype is ", dtype_name(t.dtype), ", asked for ",
                  dtype_name(dtype_of<T>()));
    be.copy_to_host(t, std::as_writable_bytes(std::span<T>(out)));
  }
  return out;
}
template <class T>
void from_host(Backend& be, std::span<const T> src, const TensorView& dst) {
  DSRSQ_REQUIRE(static_cast<std::int64_t>(src.size()) == dst.numel(), "from_host: ", src.size(), " values for ",
                dst.str());
  if (dst.device == Device::cpu) {
    std::copy(src.begin(), src.end(), dst.ptr<T>());
  } else {
    DSRSQ_REQUIRE(dst.dtype == dtype_of<T>(), "from_host: tensor dtype is ", dtype_name(dst.dtype), ", given ",
                  dtype_name(dtype_of<T>()));
    be.copy_from_host(std::as_bytes(src), dst);
  }
}

// Cost model: the only place FLOPs of the ops are defined.
struct OpCost {
  double flops = 0;
  double bytes = 0;
};
OpCost linear_cost(std::int64_t n, std::int64_t c, std::int64_t oc, bool backward);
// Causal attention with all queries at the end of the keys (T <= S).
OpCost attention_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs, bool causal,
                      bool backward);
// Costs of the methods' ops (elem: bytes per element of the float dtype).
OpCost gather_rows_cost(std::int64_t m, std::int64_t c, std::size_t elem);
OpCost scatter_add_rows_cost(std::int64_t m, std::int64_t c, std::size_t elem);
OpCost attention_merge_cost(std::int64_t b, std::int64_t t, std::int64_t nh, std::int64_t hs, std::size_t elem,
                            std::size_t elem_b);
// s keys, dc latent size, with_mass: the importance output.
OpCost latent_attention_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs,
                             std::int64_t dc, bool with_mass);
OpCost attention_mass_cost(std::int64_t b, std::int64_t t, std::int64_t s, std::int64_t nh, std::int64_t hs);
OpCost topk_cost(std::int64_t rows, std::int64_t n, std::int64_t k, std::size_t elem);
OpCost kmeans_assign_cost(std::int64_t g, std::int64_t n, std::int64_t m, std::int64_t d, std::size_t elem);
OpCost sym_eigen_cost(std::int64_t n);
OpCost gram_cost(std::int64_t n, std::int64_t c);
OpCost lowrank_recon_cost(std::int64_t n, std::int64_t c, std::int64_t dc, bool backward);
OpCost conv_project_cost(std::int64_t n, std::int64_t c, std::int64_t w, std::int64_t r, bool backward);
OpCost host_copy_cost(std::size_t bytes);

// The process's backend for a device: cpu, sim (backend/sim, the CPU backend
// behind the device boundary), or cuda (nullptr when the build has no CUDA or
// no GPU answers).
Backend* device_backend(Device d);

// Every backend this build can run on this machine (CPU first). Op tests loop
// over it (ggml's test-backend-ops habit).
std::vector<Backend*> available_backends();

}  // namespace dsrsq
