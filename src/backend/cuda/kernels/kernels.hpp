#pragma once
// Launchers of the CUDA backend's kernels (one concern a file in this folder;
// each file names its CPU twin). Plain C++ over raw device pointers and a
// stream, so the host side (cuda_backend.cpp, C++20) and the kernels (nvcc,
// C++17) share nothing but these declarations. Shapes and gradient rules are
// those of the argument structs in backend/backend.hpp. Every launcher returns
// after enqueueing on `stream` (nothing synchronises unless it says so).
// Templates are instantiated for float and double in their .cu files.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dsrsq::cuda {

using i64 = long long;

// embedding.cu
template <class T> void embedding_fwd(const std::int32_t* tok, const T* table, T* out, i64 N, i64 C, cudaStream_t s);
template <class T> void embedding_bwd(const std::int32_t* tok, const T* dout, T* dtable, i64 N, i64 C, cudaStream_t s);

// rope.cu (in place; inverse = the backward)
template <class T>
void rope(T* x, const std::int32_t* pos, i64 N, i64 NH, i64 HS, double theta, double log_base, bool inverse,
          cudaStream_t s);

// layernorm.cu. bwd needs scratch of layernorm_bwd_scratch(C) elements of T.
template <class T>
void layernorm_fwd(const T* x, const T* w, const T* b, T* out, T* mean, T* rstd, i64 N, i64 C, double eps, cudaStream_t s);
i64 layernorm_bwd_scratch(i64 C);
template <class T>
void layernorm_bwd(const T* dout, const T* x, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db, i64 N,
                   i64 C, T* scratch, cudaStream_t s);

// gelu.cu
template <class T> void gelu_fwd(const T* x, T* out, i64 n, cudaStream_t s);
template <class T> void gelu_bwd(const T* dout, const T* x, T* dx, i64 n, cudaStream_t s);

// cross_entropy.cu. fwd writes losses and the total sum_n mask*loss (one
// double at total_dev, device memory); the caller copies it back.
template <class T>
void cross_entropy_fwd(const T* logits, const std::int32_t* tgt, const T* mask, T* losses, double* total_dev, i64 N, i64 V,
                       cudaStream_t s);
template <class T>
void cross_entropy_bwd(const T* logits, const std::int32_t* tgt, const T* mask, T* dlogits, i64 N, i64 V, double g,
                       cudaStream_t s);

// adamw.cu (f32). bc1, bc2 = 1 - beta^step; omb = 1 - beta, computed in double by the caller.
void adamw(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2, float omb1, float omb2,
           float bc1, float bc2, float eps, float wd, float gs, cudaStream_t s);

// elementwise.cu
template <class T> void axpy_t(const T* x, T* y, T alpha, i64 n, cudaStream_t s);
template <class T> void fill(T* x, T value, i64 n, cudaStream_t s);
template <class T> void scale(T* x, T f, i64 n, cudaStream_t s);
void f32_to_f64(const float* x, double* y, i64 n, cudaStream_t s);
// sum of squares in double into *out_dev (device), deterministic; scratch of
// sum_squares_scratch() doubles.
i64 sum_squares_scratch();
template <class T> void sum_squares(const T* x, i64 n, double* scratch, double* out_dev, cudaStream_t s);
// dbias(C) += sum over the N rows of d(N,C), rows in a fixed partition; scratch
// of bias_rows_sum_scratch(C) elements of T.
i64 bias_rows_sum_scratch(i64 C);
template <class T> void bias_rows_sum(const T* d, T* dbias, i64 N, i64 C, T* scratch, cudaStream_t s);
// c(rows, N): beta == 0: c = bias; else c += bias / beta (matmul's bias rule).
template <class T> void add_bias_rows(T* c, const T* bias, i64 rows, i64 N, T beta, cudaStream_t s);
// n x n column-major upper triangle mirrored into the lower one.
void mirror_upper(double* g, i64 n, cudaStream_t s);

// rows.cu
void gather_rows(const void* src, const std::int32_t* idx, void* dst, i64 M, i64 row_bytes, cudaStream_t s);
template <class T> void scatter_add_rows(const T* src, const std::int32_t* idx, T* dst, i64 M, i64 C, cudaStream_t s);

// merge.cu: F running dtype, P partial dtype.
template <class F, class P>
void attention_merge(F* o, F* lse, const P* ob, const P* lseb, i64 B, i64 T, i64 NH, i64 HS, cudaStream_t s);

// attention_fwd.cu / attention_bwd.cu (f32; HS <= kAttentionMaxHS).
constexpr int kAttentionMaxHS = 256;
struct AttentionDims {
  i64 B, T, S, NH, HS;
  bool causal;
  float scale;
};
void attention_fwd(const float* q, const float* k, const float* v, float* o, float* lse, const std::int32_t* qpos,
                   const std::int32_t* kpos, const AttentionDims& d, cudaStream_t s);
// scratch: B*NH*T floats (D_i = dO_i . O_i).
void attention_bwd(const float* dout, const float* q, const float* k, const float* v, const float* o, const float* lse,
                   const std::int32_t* qpos, const std::int32_t* kpos, float* dq, float* dk, float* dv, float* scratch,
                   const AttentionDims& d, cudaStream_t s);

// attention_mass.cu (f32 q, k; f64 scores, weights and mass). scratch: 2*B*T*NH doubles.
void attention_mass(const float* q, const float* k, const std::int32_t* qpos, const std::int32_t* kpos,
                    const double* row_weight, double* mass, double* scratch, i64 B, i64 T, i64 S, i64 NH, i64 HS,
                    double scale, double divisor, cudaStream_t s);

// latent_attention.cu: LatentAttentionArgs as raw device pointers (optional
// ones nullptr; centroids nullptr: no clusters). n = S keys read; me = clusters
// in use (0 without), kc = min(top_clusters, max(me, 1)). dc <= kLatentMaxDc.
constexpr int kLatentMaxDc = 512;
struct LatentAttentionDev {
  const float *q, *k, *latent, *up, *cent, *lse_other;
  const std::int32_t *qpos, *kpos, *assign, *sizes;
  const double* rw;
  double *o, *lse, *mass, *used;
  i64 B, T, NH, HS, n, Sp, dc, M, me, Sa, kc;
  double scale;
};
void latent_attention(const LatentAttentionDev& a, cudaStream_t s);

// select.cu: top-k per row (f32) and k-means assignment.
// topk scratch: topk_scratch_bytes(R, N) bytes.
std::size_t topk_scratch_bytes(i64 R, i64 N);
void topk(const float* x, std::int32_t* idx, i64 R, i64 N, i64 K, void* scratch, std::size_t scratch_bytes,
          cudaStream_t s);
template <class T>
void kmeans_assign(const T* x, const T* c, std::int32_t* assign, double* dist, i64 G, i64 N, i64 D, i64 M, i64 m,
                   cudaStream_t s);

}  // namespace dsrsq::cuda
