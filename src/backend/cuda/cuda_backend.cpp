// CudaBackend: device memory, host copies, cuBLAS products and the dispatch to
// the kernels of kernels/ (each kernel file names its CPU twin). Shapes and
// gradient rules are the argument structs' in backend/backend.hpp; the shared
// boundary checks have run before any *_impl here.
#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/cuda/cuda_device.hpp"
#include "backend/cuda/kernels/kernels.hpp"
#include "backend/cuda_ops.hpp"

#define DSRSQ_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                            \
    if (cublasStatus_t s_ = (expr); s_ != CUBLAS_STATUS_SUCCESS)                                  \
      ::dsrsq::raise_error("cuBLAS", cublasGetStatusString(s_), #expr, __FILE__, __LINE__);       \
  } while (0)

namespace dsrsq::cuda {

// The kernels' launchers share names with Backend's ops: called as kern::name.
namespace kern = ::dsrsq::cuda;

// ---- memory -------------------------------------------------------------------
void* DeviceAllocator::allocate(std::size_t bytes) {
  DSRSQ_CUDA_CHECK(cudaSetDevice(device_));
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear it: the arena reports out-of-memory with its own name
    throw std::bad_alloc();
  }
  DSRSQ_CUDA_CHECK(e);
  return p;
}

void DeviceAllocator::deallocate(void* p) noexcept { cudaFree(p); }

CudaBackend::Scratch::Scratch(CudaBackend& be, std::size_t bytes) : be_(be) {
  if (bytes) DSRSQ_CUDA_CHECK(cudaMallocAsync(&p_, bytes, be_.stream_));
}
CudaBackend::Scratch::~Scratch() {
  if (p_) cudaFreeAsync(p_, be_.stream_);  // stream-ordered: after the kernels that use it
}

// ---- lifetime -----------------------------------------------------------------
CudaBackend::CudaBackend(int device) : device_(device), name_("cuda:" + std::to_string(device)), alloc_(device) {
  DSRSQ_CUDA_CHECK(cudaSetDevice(device_));
  DSRSQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  DSRSQ_CUBLAS_CHECK(cublasCreate(&blas_));
  DSRSQ_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
  // fp32 products stay fp32 (no TF32 tensor cores): results are compared with
  // the CPU backend and the fp64 reference at fp32 tolerances.
  DSRSQ_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
  DSRSQ_CUDA_CHECK(cudaMalloc(&result_, sizeof(double)));
}

CudaBackend::~CudaBackend() {
  // Never throws: errors at teardown are ignored.
  if (result_) cudaFree(result_);
  if (blas_) cublasDestroy(blas_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaBackend::synchronize() { DSRSQ_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

bool CudaBackend::supports(OpId op) const { return cuda_implements(op); }

void CudaBackend::unsupported(OpId op) const {
  raise_input_error(detail::cat("backend ", name_, " does not implement op '", op_name(op),
                                "' (supports() is false); run this method with --device cpu"));
}

void CudaBackend::require_device(const char* op, std::initializer_list<const TensorView*> ts) const {
  for (const TensorView* t : ts)
    if (!t->empty() && t->device != Device::cuda)
      raise_input_error(detail::cat(op, ": backend ", name_, " got a tensor on ", device_name(t->device), " (",
                                    t->str(), "); copy it to the device with copy_from_host first"));
}

double CudaBackend::read_back_double(const double* dev) {
  double h = 0;
  DSRSQ_CUDA_CHECK(cudaMemcpyAsync(&h, dev, sizeof h, cudaMemcpyDeviceToHost, stream_));
  synchronize();
  return h;
}

namespace {
template <class F>
decltype(auto) dispatch_float(DType t, F&& f) {
  if (t == DType::f64) return f(double{});
  return f(float{});
}
template <class T> T* P(const TensorView& t) { return t.device_ptr<T>(); }
int as_int(const char* op, std::int64_t v) {
  DSRSQ_INPUT_CHECK(v <= 0x7fffffff, op, ": dimension ", v, " exceeds cuBLAS's int range");
  return static_cast<int>(v);
}
}  // namespace

// ---- host copies ----------------------------------------------------------------
void CudaBackend::copy_to_host_impl(TensorView src, std::span<std::byte> dst) {
  if (dst.empty()) return;
  DSRSQ_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data, dst.size(), cudaMemcpyDeviceToHost, stream_));
  synchronize();
}

void CudaBackend::copy_from_host_impl(std::span<const std::byte> src, TensorView dst) {
  if (src.empty()) return;
  DSRSQ_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data(), src.size(), cudaMemcpyHostToDevice, stream_));
  synchronize();  // the host buffer may be freed as soon as we return
}

void CudaBackend::host_tasks_impl(std::int64_t, const std::function<void(std::int64_t)>&) {
  unsupported(OpId::host_tasks);
}

// ---- model ops ------------------------------------------------------------------
void CudaBackend::embedding_fwd_impl(const EmbeddingArgs& a) {
  require_device("embedding_fwd", {&a.tokens, &a.table, &a.out});
  dispatch_float(a.table.dtype, [&](auto t) {
    using T = decltype(t);
    kern::embedding_fwd<T>(P<std::int32_t>(a.tokens), P<T>(a.table), P<T>(a.out), a.out.shape[0], a.out.shape[1], stream_);
  });
}

void CudaBackend::embedding_bwd_impl(const EmbeddingGradArgs& a) {
  require_device("embedding_bwd", {&a.tokens, &a.dout, &a.dtable});
  dispatch_float(a.dtable.dtype, [&](auto t) {
    using T = decltype(t);
    kern::embedding_bwd<T>(P<std::int32_t>(a.tokens), P<T>(a.dout), P<T>(a.dtable), a.dout.shape[0], a.dout.shape[1],
                     stream_);
  });
}

void CudaBackend::rope_impl(const RopeArgs& a, bool inverse) {
  require_device(inverse ? "rope_bwd" : "rope_fwd", {&a.x, &a.pos});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::rope<T>(P<T>(a.x), P<std::int32_t>(a.pos), a.x.shape[0], a.x.shape[1], a.x.shape[2], a.theta, a.log_base, inverse, stream_);
  });
}

void CudaBackend::layernorm_fwd_impl(const LayerNormArgs& a) {
  require_device("layernorm_fwd", {&a.x, &a.weight, &a.bias, &a.out, &a.mean, &a.rstd});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::layernorm_fwd<T>(P<T>(a.x), P<T>(a.weight), P<T>(a.bias), P<T>(a.out), P<T>(a.mean), P<T>(a.rstd), a.x.shape[0],
                     a.x.shape[1], a.eps, stream_);
  });
}

void CudaBackend::layernorm_bwd_impl(const LayerNormGradArgs& a) {
  require_device("layernorm_bwd", {&a.dout, &a.x, &a.weight, &a.mean, &a.rstd, &a.dx, &a.dweight, &a.dbias});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    const std::int64_t C = a.x.shape[1];
    Scratch scratch(*this, sizeof(T) * static_cast<std::size_t>(kern::layernorm_bwd_scratch(C)));
    kern::layernorm_bwd<T>(P<T>(a.dout), P<T>(a.x), P<T>(a.weight), P<T>(a.mean), P<T>(a.rstd), P<T>(a.dx), P<T>(a.dweight),
                     P<T>(a.dbias), a.x.shape[0], C, scratch.as<T>(), stream_);
  });
}

// Row-major c(M,N) = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: cuBLAS
// is called with the operands swapped and the same transposition flags.
void CudaBackend::matmul_fwd_impl(const MatmulArgs& a) {
  const char* op = "matmul";
  require_device(op, {&a.a, &a.b, &a.c, &a.bias});
  const int r = a.a.shape.rank, o = r - 2;
  const std::int64_t batch = r == 3 ? a.a.shape[0] : 1;
  const std::int64_t M = a.c.shape[o], N = a.c.shape[o + 1];
  const std::int64_t K = a.trans_a ? a.a.shape[o] : a.a.shape[o + 1];
  const std::int64_t lda = a.a.shape[o + 1], ldb = a.b.shape[o + 1];
  const std::int64_t sa = a.a.shape[o] * a.a.shape[o + 1], sb = a.b.shape[o] * a.b.shape[o + 1], sc = M * N;
  dispatch_float(a.a.dtype, [&](auto t) {
    using T = decltype(t);
    T* C = P<T>(a.c);
    T beta = static_cast<T>(a.beta);
    if (!a.bias.empty()) {  // the CPU twin's rule: c = bias (beta = 0, then 1), or c += bias / beta
      kern::add_bias_rows<T>(C, P<T>(a.bias), batch * M, N, beta, stream_);
      if (beta == T(0)) beta = T(1);
    }
    if (M == 0 || N == 0) return;
    if (K == 0) {
      if (beta == T(0)) kern::fill<T>(C, T(0), batch * M * N, stream_);
      else if (beta != T(1)) kern::scale<T>(C, beta, batch * M * N, stream_);
      return;
    }
    const T alpha = static_cast<T>(a.alpha);
    const cublasOperation_t ob = a.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, oa = a.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int m = as_int(op, N), n = as_int(op, M), k = as_int(op, K), ldb_ = as_int(op, ldb), lda_ = as_int(op, lda),
              ldc = as_int(op, N);
    if constexpr (sizeof(T) == 4) {
      if (batch == 1)
        DSRSQ_CUBLAS_CHECK(cublasSgemm(blas_, ob, oa, m, n, k, &alpha, P<T>(a.b), ldb_, P<T>(a.a), lda_, &beta, C, ldc));
      else
        DSRSQ_CUBLAS_CHECK(cublasSgemmStridedBatched(blas_, ob, oa, m, n, k, &alpha, P<T>(a.b), ldb_, sb, P<T>(a.a),
                                                     lda_, sa, &beta, C, ldc, sc, as_int(op, batch)));
    } else {
      if (batch == 1)
        DSRSQ_CUBLAS_CHECK(cublasDgemm(blas_, ob, oa, m, n, k, &alpha, P<T>(a.b), ldb_, P<T>(a.a), lda_, &beta, C, ldc));
      else
        DSRSQ_CUBLAS_CHECK(cublasDgemmStridedBatched(blas_, ob, oa, m, n, k, &alpha, P<T>(a.b), ldb_, sb, P<T>(a.a),
                                                     lda_, sa, &beta, C, ldc, sc, as_int(op, batch)));
    }
  });
}

void CudaBackend::gelu_fwd_impl(const GeluArgs& a) {
  require_device("gelu_fwd", {&a.x, &a.out});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::gelu_fwd<T>(P<T>(a.x), P<T>(a.out), a.x.numel(), stream_);
  });
}

void CudaBackend::gelu_bwd_impl(const GeluGradArgs& a) {
  require_device("gelu_bwd", {&a.dout, &a.x, &a.dx});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::gelu_bwd<T>(P<T>(a.dout), P<T>(a.x), P<T>(a.dx), a.x.numel(), stream_);
  });
}

namespace {
AttentionDims attention_dims(const char* op, const TensorView& q, const TensorView& k, bool causal, double scale) {
  DSRSQ_INPUT_CHECK(q.dtype == DType::f32, op, ": the CUDA kernels take f32 only, got ", dtype_name(q.dtype));
  const std::int64_t HS = q.shape[3];
  DSRSQ_INPUT_CHECK(HS <= kAttentionMaxHS, op, ": head size ", HS, " exceeds the CUDA kernels' ", kAttentionMaxHS);
  // As the CPU twin: the scale is formed in double, then rounded to f32.
  const float s = static_cast<float>(scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(HS)));
  return AttentionDims{q.shape[0], q.shape[1], k.shape[1], q.shape[2], HS, causal, s};
}
}  // namespace

void CudaBackend::attention_fwd_impl(const AttentionArgs& a) {
  require_device("attention_fwd", {&a.q, &a.k, &a.v, &a.o, &a.lse, &a.q_pos, &a.k_pos});
  const AttentionDims d = attention_dims("attention_fwd", a.q, a.k, a.causal, a.scale);
  kern::attention_fwd(P<float>(a.q), P<float>(a.k), P<float>(a.v), P<float>(a.o), P<float>(a.lse),
                P<std::int32_t>(a.q_pos), P<std::int32_t>(a.k_pos), d, stream_);
}

void CudaBackend::attention_bwd_impl(const AttentionGradArgs& a) {
  require_device("attention_bwd",
                 {&a.dout, &a.q, &a.k, &a.v, &a.o, &a.lse, &a.q_pos, &a.k_pos, &a.dq, &a.dk, &a.dv});
  const AttentionDims d = attention_dims("attention_bwd", a.q, a.k, a.causal, a.scale);
  Scratch dvec(*this, sizeof(float) * static_cast<std::size_t>(d.B * d.NH * d.T));
  kern::attention_bwd(P<float>(a.dout), P<float>(a.q), P<float>(a.k), P<float>(a.v), P<float>(a.o), P<float>(a.lse),
                P<std::int32_t>(a.q_pos), P<std::int32_t>(a.k_pos), P<float>(a.dq), P<float>(a.dk), P<float>(a.dv),
                dvec.as<float>(), d, stream_);
}

double CudaBackend::cross_entropy_fwd_impl(const CrossEntropyArgs& a) {
  require_device("cross_entropy_fwd", {&a.logits, &a.targets, &a.mask, &a.losses});
  return dispatch_float(a.logits.dtype, [&](auto t) {
    using T = decltype(t);
    kern::cross_entropy_fwd<T>(P<T>(a.logits), P<std::int32_t>(a.targets), P<T>(a.mask), P<T>(a.losses), result_,
                         a.logits.shape[0], a.logits.shape[1], stream_);
    return read_back_double(result_) * a.inv_norm;
  });
}

void CudaBackend::cross_entropy_bwd_impl(const CrossEntropyGradArgs& a) {
  require_device("cross_entropy_bwd", {&a.logits, &a.targets, &a.mask, &a.dlogits});
  dispatch_float(a.logits.dtype, [&](auto t) {
    using T = decltype(t);
    kern::cross_entropy_bwd<T>(P<T>(a.logits), P<std::int32_t>(a.targets), P<T>(a.mask), P<T>(a.dlogits), a.logits.shape[0],
                         a.logits.shape[1], a.dloss * a.inv_norm, stream_);
  });
}

void CudaBackend::adamw_impl(const AdamWArgs& a) {
  require_device("adamw", {&a.params, &a.grads, &a.m, &a.v});
  // The CPU twin's constants, formed the same way (1 - beta in double, then rounded).
  const float b1 = static_cast<float>(a.beta1), b2 = static_cast<float>(a.beta2);
  const float omb1 = static_cast<float>(1.0 - a.beta1), omb2 = static_cast<float>(1.0 - a.beta2);
  const float bc1 = static_cast<float>(1.0 - std::pow(a.beta1, static_cast<double>(a.step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(a.beta2, static_cast<double>(a.step)));
  kern::adamw(P<float>(a.params), P<float>(a.grads), P<float>(a.m), P<float>(a.v), a.params.numel(),
        static_cast<float>(a.lr), b1, b2, omb1, omb2, bc1, bc2, static_cast<float>(a.eps),
        static_cast<float>(a.weight_decay), static_cast<float>(a.grad_scale), stream_);
}

void CudaBackend::axpy_impl(const AxpyArgs& a) {
  require_device("axpy", {&a.x, &a.y});
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::axpy_t<T>(P<T>(a.x), P<T>(a.y), static_cast<T>(a.alpha), a.x.numel(), stream_);
  });
}

void CudaBackend::fill_impl(TensorView x, double value) {
  require_device("fill", {&x});
  if (value == 0.0) {  // +0.0 is all-zero bits in every dtype
    DSRSQ_CUDA_CHECK(cudaMemsetAsync(x.data, 0, x.bytes(), stream_));
    return;
  }
  if (x.dtype == DType::i32) return kern::fill<std::int32_t>(P<std::int32_t>(x), static_cast<std::int32_t>(value), x.numel(), stream_);
  dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::fill<T>(P<T>(x), static_cast<T>(value), x.numel(), stream_);
  });
}

void CudaBackend::copy_impl(TensorView src, TensorView dst) {
  require_device("copy", {&src, &dst});
  if (src.bytes() == 0) return;
  DSRSQ_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
}

double CudaBackend::sum_squares_impl(TensorView x) {
  require_device("sum_squares", {&x});
  return dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    Scratch partial(*this, sizeof(double) * static_cast<std::size_t>(kern::sum_squares_scratch()));
    kern::sum_squares<T>(P<T>(x), x.numel(), partial.as<double>(), result_, stream_);
    return read_back_double(result_);
  });
}

void CudaBackend::scale_impl(TensorView x, double s) {
  require_device("scale", {&x});
  dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::scale<T>(P<T>(x), static_cast<T>(s), x.numel(), stream_);
  });
}

void CudaBackend::bias_rows_sum_impl(TensorView dout2d, TensorView dbias) {
  require_device("bias_grad", {&dout2d, &dbias});
  dispatch_float(dout2d.dtype, [&](auto t) {
    using T = decltype(t);
    const std::int64_t C = dout2d.shape[1];
    Scratch scratch(*this, sizeof(T) * static_cast<std::size_t>(kern::bias_rows_sum_scratch(C)));
    kern::bias_rows_sum<T>(P<T>(dout2d), P<T>(dbias), dout2d.shape[0], C, scratch.as<T>(), stream_);
  });
}

// ---- the methods' ops -------------------------------------------------------------
void CudaBackend::gather_rows_impl(const GatherRowsArgs& a) {
  require_device("gather_rows", {&a.src, &a.idx, &a.dst});
  kern::gather_rows(a.src.data, P<std::int32_t>(a.idx), a.dst.data, a.dst.shape[0],
              a.dst.shape[1] * static_cast<std::int64_t>(dtype_size(a.src.dtype)), stream_);
}

void CudaBackend::scatter_add_rows_impl(const ScatterAddRowsArgs& a) {
  require_device("scatter_add_rows", {&a.src, &a.idx, &a.dst});
  dispatch_float(a.src.dtype, [&](auto t) {
    using T = decltype(t);
    kern::scatter_add_rows<T>(P<T>(a.src), P<std::int32_t>(a.idx), P<T>(a.dst), a.src.shape[0], a.src.shape[1], stream_);
  });
}

void CudaBackend::attention_merge_impl(const AttentionMergeArgs& a) {
  require_device("attention_merge", {&a.o, &a.lse, &a.o_b, &a.lse_b});
  const std::int64_t B = a.o.shape[0], T = a.o.shape[1], NH = a.o.shape[2], HS = a.o.shape[3];
  const bool f32 = a.o.dtype == DType::f32, b32 = a.o_b.dtype == DType::f32;
  if (f32 && b32)
    kern::attention_merge<float, float>(P<float>(a.o), P<float>(a.lse), P<float>(a.o_b), P<float>(a.lse_b), B, T, NH, HS, stream_);
  else if (f32)
    kern::attention_merge<float, double>(P<float>(a.o), P<float>(a.lse), P<double>(a.o_b), P<double>(a.lse_b), B, T, NH, HS,
                                   stream_);
  else if (b32)
    kern::attention_merge<double, float>(P<double>(a.o), P<double>(a.lse), P<float>(a.o_b), P<float>(a.lse_b), B, T, NH, HS,
                                   stream_);
  else
    kern::attention_merge<double, double>(P<double>(a.o), P<double>(a.lse), P<double>(a.o_b), P<double>(a.lse_b), B, T, NH,
                                    HS, stream_);
}

void CudaBackend::topk_impl(const TopKArgs& a) {
  require_device("topk", {&a.x, &a.idx});
  DSRSQ_INPUT_CHECK(a.x.dtype == DType::f32, "topk: the CUDA kernel takes f32 only, got ", dtype_name(a.x.dtype));
  const std::int64_t R = a.x.shape[0], N = a.x.shape[1], K = a.idx.shape[1];
  if (R * K == 0) return;
  const std::size_t bytes = kern::topk_scratch_bytes(R, N);
  Scratch scratch(*this, bytes);
  kern::topk(P<float>(a.x), P<std::int32_t>(a.idx), R, N, K, scratch.as<void>(), bytes, stream_);
}

void CudaBackend::kmeans_assign_impl(const KMeansAssignArgs& a) {
  require_device("kmeans_assign", {&a.x, &a.centroids, &a.assign, &a.dist});
  const std::int64_t G = a.x.shape[0], N = a.x.shape[1], D = a.x.shape[2], M = a.centroids.shape[1];
  const std::int64_t m = a.clusters > 0 ? a.clusters : M;
  double* dist = a.dist.empty() ? nullptr : P<double>(a.dist);
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    kern::kmeans_assign<T>(P<T>(a.x), P<T>(a.centroids), P<std::int32_t>(a.assign), dist, G, N, D, M, m, stream_);
  });
}

void CudaBackend::latent_attention_fwd_impl(const LatentAttentionArgs& a) {
  require_device("latent_attention_fwd", {&a.q, &a.k, &a.q_pos, &a.k_pos, &a.latent, &a.up, &a.o, &a.lse, &a.centroids,
                                          &a.assign, &a.sizes, &a.lse_other, &a.row_weight, &a.mass, &a.used});
  const bool sqa = !a.centroids.empty();
  kern::LatentAttentionDev d{};
  d.q = P<float>(a.q);
  d.k = P<float>(a.k);
  d.latent = P<float>(a.latent);
  d.up = P<float>(a.up);
  d.cent = sqa ? P<float>(a.centroids) : nullptr;
  d.lse_other = a.lse_other.empty() ? nullptr : P<float>(a.lse_other);
  d.qpos = P<std::int32_t>(a.q_pos);
  d.kpos = P<std::int32_t>(a.k_pos);
  d.assign = sqa ? P<std::int32_t>(a.assign) : nullptr;
  d.sizes = sqa ? P<std::int32_t>(a.sizes) : nullptr;
  d.rw = a.mass.empty() ? nullptr : P<double>(a.row_weight);
  d.o = P<double>(a.o);
  d.lse = P<double>(a.lse);
  d.mass = a.mass.empty() ? nullptr : P<double>(a.mass);
  d.used = a.used.empty() ? nullptr : P<double>(a.used);
  d.B = a.q.shape[0];
  d.T = a.q.shape[1];
  d.NH = a.q.shape[2];
  d.HS = a.q.shape[3];
  d.n = a.k.shape[1];
  d.Sp = a.latent.shape[1];
  d.dc = a.latent.shape[2];
  d.M = sqa ? a.centroids.shape[2] : 0;
  d.me = sqa ? a.clusters : 0;
  d.Sa = sqa ? a.assign.shape[2] : 0;
  d.kc = sqa ? std::min<std::int64_t>(a.top_clusters, std::max<std::int64_t>(d.me, 1)) : 0;
  d.scale = a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(d.HS));
  DSRSQ_INPUT_CHECK(d.dc <= kern::kLatentMaxDc, "latent_attention_fwd: latent size ", d.dc, " exceeds the CUDA kernel's ",
                    kern::kLatentMaxDc);
  kern::latent_attention(d, stream_);
}

void CudaBackend::attention_mass_impl(const AttentionMassArgs& a) {
  require_device("attention_mass", {&a.q, &a.k, &a.q_pos, &a.k_pos, &a.row_weight, &a.mass});
  const std::int64_t B = a.q.shape[0], T = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const double scale = a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(HS));
  Scratch rows(*this, sizeof(double) * static_cast<std::size_t>(2 * B * T * NH));
  kern::attention_mass(P<float>(a.q), P<float>(a.k), P<std::int32_t>(a.q_pos), P<std::int32_t>(a.k_pos),
                       P<double>(a.row_weight), P<double>(a.mass), rows.as<double>(), B, T, S, NH, HS, scale, a.divisor,
                       stream_);
}

// g = X^T X in f64: X converted to f64 (exact), then cublasDsyrk on the upper
// triangle (column-major), mirrored so g is exactly symmetric as on the CPU.
void CudaBackend::gram_impl(const GramArgs& a) {
  require_device("gram", {&a.x, &a.g});
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
  double* g = P<double>(a.g);
  DSRSQ_CUDA_CHECK(cudaMemsetAsync(g, 0, a.g.bytes(), stream_));
  if (N == 0 || C == 0) return;
  Scratch xd(*this, sizeof(double) * static_cast<std::size_t>(N * C));
  kern::f32_to_f64(P<float>(a.x), xd.as<double>(), N * C, stream_);
  const double one = 1.0, zero = 0.0;
  DSRSQ_CUBLAS_CHECK(cublasDsyrk(blas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, as_int("gram", C), as_int("gram", N), &one,
                                 xd.as<double>(), as_int("gram", C), &zero, g, as_int("gram", C)));
  kern::mirror_upper(g, C, stream_);
}

// ---- ops this backend does not implement (supports() == false) ---------------------
void CudaBackend::sym_eigen_impl(const SymEigenArgs&) { unsupported(OpId::sym_eigen); }
double CudaBackend::lowrank_recon_fwd_impl(const LowRankReconArgs&) { unsupported(OpId::lowrank_recon); }
void CudaBackend::lowrank_recon_bwd_impl(const LowRankReconGradArgs&) { unsupported(OpId::lowrank_recon); }
void CudaBackend::conv_project_fwd_impl(const ConvProjectArgs&) { unsupported(OpId::conv_project); }
void CudaBackend::conv_project_bwd_impl(const ConvProjectGradArgs&) { unsupported(OpId::conv_project); }

// ---- the process's backend ----------------------------------------------------------
Backend* backend_if_present() {
  // Built once, on first use, only when a GPU answers, on the calling thread's
  // current device (0 unless cudaSetDevice chose another first: a data-parallel
  // run picks each rank's GPU from its node-local rank before asking for the
  // backend); never destroyed (the CUDA runtime may already be torn down when
  // static destructors run).
  static Backend* be = [] () -> Backend* {
    if (device_count() == 0) return nullptr;
    int current = 0;
    DSRSQ_CUDA_CHECK(cudaGetDevice(&current));
    return new CudaBackend(current);
  }();
  return be;
}

}  // namespace dsrsq::cuda
