#pragma once
// CPU backend: OpenBLAS for matrix products, OpenMP for everything else. Each
// kernel is templated on float (the engine) and double (the gradient tests).
// Reductions split work by a fixed partition and add partial sums in thread
// order, so results are bitwise repeatable for a fixed thread count.
#include "backend/backend.hpp"

namespace dsrsq::cpu {

class CpuBackend final : public Backend {
 public:
  std::string_view name() const override { return "cpu"; }
  Device device() const override { return Device::cpu; }
  Allocator& allocator() override { return host_allocator(); }

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
  // cpu_rows.cpp, cpu_merge.cpp, cpu_select.cpp, cpu_latent_attention.cpp,
  // cpu_linalg.cpp, cpu_conv_project.cpp: the methods' ops.
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

 public:
  bool supports(OpId) const override { return true; }
};

// Whether the linked BLAS provides LAPACK's dsyevd (weak symbol).
bool lapack_eigen_available();

// Below this many elements of light work an op runs on one thread: waking an
// OpenMP team costs more than the work, and under a spin-wait policy
// (OMP_WAIT_POLICY=active, libgomp's default spin before sleeping) many tiny
// parallel regions are 10-25x slower on a loaded machine.
constexpr std::int64_t kParallelMin = 32768;

// Attention kernels live in cpu_attention.cpp.
template <class T> void attention_fwd_kernel(const AttentionArgs& a);
template <class T> void attention_bwd_kernel(const AttentionGradArgs& a);

// Call f with a T* typed for the tensor's float dtype.
template <class F>
decltype(auto) dispatch_float(DType t, F&& f) {
  if (t == DType::f64) return f(double{});
  return f(float{});
}

}  // namespace dsrsq::cpu
