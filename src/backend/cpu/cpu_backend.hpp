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
};

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
