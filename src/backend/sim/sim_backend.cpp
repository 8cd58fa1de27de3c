#include "backend/sim/sim_backend.hpp"

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "backend/cuda_ops.hpp"

namespace dsrsq::sim {
namespace {

// Bit 62 set makes any user-space address non-canonical: a dereference faults.
// Offsets added to a poisoned pointer (views of rows, arena bumps) keep the
// bit, since no host allocation reaches 2^62.
constexpr std::uintptr_t kPoison = std::uintptr_t{1} << 62;

void* poison(void* p) { return reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) | kPoison); }

// Limits of the CUDA kernels (backend/cuda/kernels/kernels.hpp), mirrored.
constexpr std::int64_t kCudaAttentionMaxHS = 256;
constexpr std::int64_t kCudaLatentMaxDc = 512;

class SimAllocator final : public Allocator {
 public:
  void* allocate(std::size_t bytes) override { return poison(host_allocator().allocate(bytes)); }
  void deallocate(void* p) noexcept override {
    if (p) host_allocator().deallocate(host_address_unchecked(p));
  }
  Device device() const override { return Device::sim; }
  static void* host_address_unchecked(const void* p) {
    return reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) & ~kPoison);
  }
};

class SimBackend final : public Backend {
 public:
  std::string_view name() const override { return "sim"; }
  Device device() const override { return Device::sim; }
  Allocator& allocator() override { return alloc_; }
  // CudaBackend::supports(): the same list.
  bool supports(OpId op) const override { return cuda_implements(op); }

 private:
  SimAllocator alloc_;
  Backend& cpu_ = cpu_backend();

  [[noreturn]] void unsupported(OpId op) const {
    raise_input_error(detail::cat("backend sim does not implement op '", op_name(op),
                                  "' (supports() is false, as on CUDA); run this method with --device cpu"));
  }
  // The host view of a sim tensor; a tensor on another device is refused as
  // CudaBackend::require_device refuses it.
  static TensorView host(const char* op, const TensorView& t) {
    if (t.empty()) return t;
    if (t.device != Device::sim)
      raise_input_error(detail::cat(op, ": backend sim got a tensor on ", device_name(t.device), " (", t.str(),
                                    "); copy it to the device with copy_from_host first"));
    return TensorView(host_address(t.data), t.shape, t.dtype, Device::cpu);
  }
  template <class... Ts>
  static void on_host(const char* op, Ts&... ts) {
    ((ts = host(op, ts)), ...);
  }
  static void f32_only(const char* op, const TensorView& t) {
    DSRSQ_INPUT_CHECK(t.dtype == DType::f32, op, ": the CUDA kernels take f32 only, got ", dtype_name(t.dtype),
                      " (sim mirrors CUDA's limits)");
  }
  static void attention_limits(const char* op, const TensorView& q) {
    f32_only(op, q);
    DSRSQ_INPUT_CHECK(q.shape[3] <= kCudaAttentionMaxHS, op, ": head size ", q.shape[3], " exceeds the CUDA kernels' ",
                      kCudaAttentionMaxHS, " (sim mirrors CUDA's limits)");
  }

 protected:
  void embedding_fwd_impl(const EmbeddingArgs& a0) override {
    auto a = a0;
    on_host("embedding_fwd", a.tokens, a.table, a.out);
    cpu_.embedding_fwd(a);
  }
  void embedding_bwd_impl(const EmbeddingGradArgs& a0) override {
    auto a = a0;
    on_host("embedding_bwd", a.tokens, a.dout, a.dtable);
    cpu_.embedding_bwd(a);
  }
  void rope_impl(const RopeArgs& a0, bool inverse) override {
    auto a = a0;
    on_host(inverse ? "rope_bwd" : "rope_fwd", a.x, a.pos);
    if (inverse) cpu_.rope_bwd(a);
    else cpu_.rope_fwd(a);
  }
  void layernorm_fwd_impl(const LayerNormArgs& a0) override {
    auto a = a0;
    on_host("layernorm_fwd", a.x, a.weight, a.bias, a.out, a.mean, a.rstd);
    cpu_.layernorm_fwd(a);
  }
  void layernorm_bwd_impl(const LayerNormGradArgs& a0) override {
    auto a = a0;
    on_host("layernorm_bwd", a.dout, a.x, a.weight, a.mean, a.rstd, a.dx, a.dweight, a.dbias);
    cpu_.layernorm_bwd(a);
  }
  void matmul_fwd_impl(const MatmulArgs& a0) override {
    auto a = a0;
    on_host("matmul", a.a, a.b, a.c, a.bias);
    cpu_.matmul_fwd(a);
  }
  void gelu_fwd_impl(const GeluArgs& a0) override {
    auto a = a0;
    on_host("gelu_fwd", a.x, a.out);
    cpu_.gelu_fwd(a);
  }
  void gelu_bwd_impl(const GeluGradArgs& a0) override {
    auto a = a0;
    on_host("gelu_bwd", a.dout, a.x, a.dx);
    cpu_.gelu_bwd(a);
  }
  void attention_fwd_impl(const AttentionArgs& a0) override {
    auto a = a0;
    on_host("attention_fwd", a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos);
    attention_limits("attention_fwd", a.q);
    cpu_.attention_fwd(a);
  }
  void attention_bwd_impl(const AttentionGradArgs& a0) override {
    auto a = a0;
    on_host("attention_bwd", a.dout, a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos, a.dq, a.dk, a.dv);
    attention_limits("attention_bwd", a.q);
    cpu_.attention_bwd(a);
  }
  double cross_entropy_fwd_impl(const CrossEntropyArgs& a0) override {
    auto a = a0;
    on_host("cross_entropy_fwd", a.logits, a.targets, a.mask, a.losses);
    return cpu_.cross_entropy_fwd(a);
  }
  void cross_entropy_bwd_impl(const CrossEntropyGradArgs& a0) override {
    auto a = a0;
    on_host("cross_entropy_bwd", a.logits, a.targets, a.mask, a.dlogits);
    cpu_.cross_entropy_bwd(a);
  }
  void adamw_impl(const AdamWArgs& a0) override {
    auto a = a0;
    on_host("adamw", a.params, a.grads, a.m, a.v);
    cpu_.adamw(a);
  }
  void axpy_impl(const AxpyArgs& a0) override {
    auto a = a0;
    on_host("axpy", a.x, a.y);
    cpu_.axpy(a);
  }
  void fill_impl(TensorView x, double value) override {
    on_host("fill", x);
    cpu_.fill(x, value);
  }
  void copy_impl(TensorView src, TensorView dst) override {
    on_host("copy", src, dst);
    cpu_.copy(src, dst);
  }
  double sum_squares_impl(TensorView x) override {
    on_host("sum_squares", x);
    return cpu_.sum_squares(x);
  }
  void scale_impl(TensorView x, double s) override {
    on_host("scale", x);
    cpu_.scale(x, s);
  }
  // The CPU backend's bias gradient through its linear_bwd with only dbias
  // requested (x and weight are shape-only stand-ins it never reads), as
  // tests/common/staging.hpp does.
  void bias_rows_sum_impl(TensorView dout2d, TensorView dbias) override {
    on_host("bias_grad", dout2d, dbias);
    const std::int64_t N = dout2d.shape[0], OC = dout2d.shape[1];
    const TensorView x(dout2d.data, Shape{N, 1}, dout2d.dtype, Device::cpu);
    const TensorView w(dout2d.data, Shape{OC, 1}, dout2d.dtype, Device::cpu);
    cpu_.linear_bwd(LinearGradArgs{dout2d, x, w, TensorView{}, TensorView{}, dbias, false});
  }
  void gather_rows_impl(const GatherRowsArgs& a0) override {
    auto a = a0;
    on_host("gather_rows", a.src, a.idx, a.dst);
    cpu_.gather_rows(a);
  }
  void scatter_add_rows_impl(const ScatterAddRowsArgs& a0) override {
    auto a = a0;
    on_host("scatter_add_rows", a.src, a.idx, a.dst);
    cpu_.scatter_add_rows(a);
  }
  void attention_merge_impl(const AttentionMergeArgs& a0) override {
    auto a = a0;
    on_host("attention_merge", a.o, a.lse, a.o_b, a.lse_b);
    cpu_.attention_merge(a);
  }
  void latent_attention_fwd_impl(const LatentAttentionArgs& a0) override {
    auto a = a0;
    on_host("latent_attention_fwd", a.q, a.k, a.q_pos, a.k_pos, a.latent, a.up, a.o, a.lse, a.centroids, a.assign,
            a.sizes, a.lse_other, a.row_weight, a.mass, a.used);
    DSRSQ_INPUT_CHECK(a.latent.shape[2] <= kCudaLatentMaxDc, "latent_attention_fwd: latent size ", a.latent.shape[2],
                      " exceeds the CUDA kernel's ", kCudaLatentMaxDc, " (sim mirrors CUDA's limits)");
    cpu_.latent_attention_fwd(a);
  }
  void attention_mass_impl(const AttentionMassArgs& a0) override {
    auto a = a0;
    on_host("attention_mass", a.q, a.k, a.q_pos, a.k_pos, a.row_weight, a.mass);
    cpu_.attention_mass(a);
  }
  void topk_impl(const TopKArgs& a0) override {
    auto a = a0;
    on_host("topk", a.x, a.idx);
    f32_only("topk", a.x);
    cpu_.topk(a);
  }
  void kmeans_assign_impl(const KMeansAssignArgs& a0) override {
    auto a = a0;
    on_host("kmeans_assign", a.x, a.centroids, a.assign, a.dist);
    cpu_.kmeans_assign(a);
  }
  void gram_impl(const GramArgs& a0) override {
    auto a = a0;
    on_host("gram", a.x, a.g);
    cpu_.gram(a);
  }
  // Not on CUDA, so not here: a method that needs them is refused up front.
  void sym_eigen_impl(const SymEigenArgs&) override { unsupported(OpId::sym_eigen); }
  double lowrank_recon_fwd_impl(const LowRankReconArgs&) override { unsupported(OpId::lowrank_recon); }
  void lowrank_recon_bwd_impl(const LowRankReconGradArgs&) override { unsupported(OpId::lowrank_recon); }
  void conv_project_fwd_impl(const ConvProjectArgs&) override { unsupported(OpId::conv_project); }
  void conv_project_bwd_impl(const ConvProjectGradArgs&) override { unsupported(OpId::conv_project); }
  void host_tasks_impl(std::int64_t, const std::function<void(std::int64_t)>&) override {
    unsupported(OpId::host_tasks);
  }
  void copy_to_host_impl(TensorView src, std::span<std::byte> dst) override {
    if (!dst.empty()) std::memcpy(dst.data(), host_address(src.data), dst.size());
  }
  void copy_from_host_impl(std::span<const std::byte> src, TensorView dst) override {
    if (!src.empty()) std::memcpy(host_address(dst.data), src.data(), src.size());
  }
};

}  // namespace

void* host_address(const void* sim_ptr) {
  DSRSQ_REQUIRE((reinterpret_cast<std::uintptr_t>(sim_ptr) & kPoison) != 0,
                "a tensor tagged sim whose memory is not from the sim allocator");
  return SimAllocator::host_address_unchecked(sim_ptr);
}

Backend& sim_backend() {
  static SimBackend be;
  return be;
}

}  // namespace dsrsq::sim
