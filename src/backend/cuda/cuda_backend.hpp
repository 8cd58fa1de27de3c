#pragma once
// CUDA backend: cuBLAS for every matrix product (fp32 in fp32: CUBLAS_DEFAULT_MATH,
// no TF32), kernels/ for the rest, one stream per backend. Host C++ (C++20,
// compiled by the host compiler); the kernels are reached through the plain
// launchers of kernels/kernels.hpp.
//
// Tensors it takes must live on its device (TensorView::device == cuda), in
// memory from its allocator() (cudaMalloc) or any other device allocation.
// Scalars an op returns (a loss, a sum of squares) are copied back after a
// stream synchronisation. The boundary checks in backend.cpp that read index
// tensors (positions, tokens, targets, row indices) copy them to the host
// first, which synchronises the stream: a cost paid per op call (small
// tensors), kept for the same error messages on every backend.
//
// supports() is false for the ops it does not implement (the eigensolver,
// low-rank reconstruction, convolution + projection, host tasks); calling one raises an error naming the op. It never
// runs an op on the host instead.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>

#include "backend/backend.hpp"

namespace dsrsq::cuda {

// cudaMalloc-backed allocator for one device (Arena chunks come from here).
class DeviceAllocator final : public Allocator {
 public:
  explicit DeviceAllocator(int device) : device_(device) {}
  void* allocate(std::size_t bytes) override;
  void deallocate(void* p) noexcept override;
  Device device() const override { return Device::cuda; }

 private:
  int device_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string_view name() const override { return name_; }
  Device device() const override { return Device::cuda; }
  Allocator& allocator() override { return alloc_; }
  void synchronize() override;
  bool supports(OpId op) const override;
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return blas_; }
  int device_index() const { return device_; }

 protected:
  void embedding_fwd_impl(const EmbeddingArgs& a) override;
  void embedding_bwd_impl(const EmbeddingGradArgs& a) override;
  void rope_impl(const RopeArgs& a, bool inverse) override;
  void layernorm_fwd_impl(const LayerNormArgs& a) override;
  void layernorm_bwd_impl(const LayerNormGradArgs& a) override;
  void matmul_fwd_impl(const MatmulArgs& a) override;
  void gelu_fwd_impl(const GeluArgs& a) override;
  void gelu_bwd_impl(const GeluGradArgs& a) override;
  void attention_fwd_impl(const AttentionArgs& a) override;
  void attention_bwd_impl(const AttentionGradArgs& a) override;
  double cross_entropy_fwd_impl(const CrossEntropyArgs& a) override;
  void cross_entropy_bwd_impl(const CrossEntropyGradArgs& a) override;
  void adamw_impl(const AdamWArgs& a) override;
  void axpy_impl(const AxpyArgs& a) override;
  void fill_impl(TensorView x, double value) override;
  void copy_impl(TensorView src, TensorView dst) override;
  double sum_squares_impl(TensorView x) override;
  void scale_impl(TensorView x, double s) override;
  void bias_rows_sum_impl(TensorView dout2d, TensorView dbias) override;
  void gather_rows_impl(const GatherRowsArgs& a) override;
  void scatter_add_rows_impl(const ScatterAddRowsArgs& a) override;
  void attention_merge_impl(const AttentionMergeArgs& a) override;
  void latent_attention_fwd_impl(const LatentAttentionArgs& a) override;
  void attention_mass_impl(const AttentionMassArgs& a) override;
  void topk_impl(const TopKArgs& a) override;
  void kmeans_assign_impl(const KMeansAssignArgs& a) override;
  void sym_eigen_impl(const SymEigenArgs& a) override;
  void gram_impl(const GramArgs& a) override;
  double lowrank_recon_fwd_impl(const LowRankReconArgs& a) override;
  void lowrank_recon_bwd_impl(const LowRankReconGradArgs& a) override;
  void conv_project_fwd_impl(const ConvProjectArgs& a) override;
  void conv_project_bwd_impl(const ConvProjectGradArgs& a) override;
  void copy_to_host_impl(TensorView src, std::span<std::byte> dst) override;
  void copy_from_host_impl(std::span<const std::byte> src, TensorView dst) override;
  void host_tasks_impl(std::int64_t n, const std::function<void(std::int64_t)>& fn) override;

 private:
  // Stream-ordered scratch (cudaMallocAsync), released when the scope ends.
  class Scratch {
   public:
    Scratch(CudaBackend& be, std::size_t bytes);
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <class T> T* as() const { return static_cast<T*>(p_); }

   private:
    CudaBackend& be_;
    void* p_ = nullptr;
  };
  [[noreturn]] void unsupported(OpId op) const;
  void require_device(const char* op, std::initializer_list<const TensorView*> ts) const;
  double read_back_double(const double* dev);

  int device_;
  std::string name_;
  DeviceAllocator alloc_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  double* result_ = nullptr;  // one double of device memory for scalar results
};

// The process's backend when a GPU is present (on the current device when it is
// first asked for: cudaSetDevice before that picks the GPU), else nullptr.
Backend* backend_if_present();

}  // namespace dsrsq::cuda
