#pragma once
// Host-memory front for a device backend, for the op tests (ggml's
// test-backend-ops habit: the same case, with host buffers and guard zones,
// runs on every backend). `on_host(be)` returns `be` itself when it works on
// host memory; for a device backend it returns a StagingBackend that takes
// host tensors, copies each one to device memory framed by guard zones, runs
// the op on the device backend, copies every tensor back and checks that the
// device guard zones are intact (an out-of-bounds write on the device raises
// dsrsq::Error naming the op). Nothing here computes: every op runs on the
// device backend, through its public (boundary-checked) entry point.
//
// Used by tests/ops, which also runs every case through a StagingBackend over
// the CPU backend: that checks this front's plumbing (every argument staged,
// copied back, guard zones) on machines without a GPU.
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/error.hpp"

namespace ref {

class StagingBackend final : public dsrsq::Backend {
 public:
  explicit StagingBackend(dsrsq::Backend& dev) : dev_(dev), name_(std::string(dev.name()) + "(staged)") {}
  std::string_view name() const override { return name_; }
  dsrsq::Device device() const override { return dsrsq::Device::cpu; }
  dsrsq::Allocator& allocator() override { return dsrsq::host_allocator(); }
  void synchronize() override { dev_.synchronize(); }
  bool supports(dsrsq::OpId op) const override { return dev_.supports(op); }

 private:
  using TV = dsrsq::TensorView;
  static constexpr std::size_t kGuard = 256;  // bytes on each side
  static constexpr std::int32_t kPattern = 0x5A5AA5A5;

  // One host tensor staged on the device: [guard | data | guard].
  struct Mirror {
    dsrsq::Backend* dev;
    TV host, whole, view;
    void* base;
    Mirror(dsrsq::Backend& d, const TV& h) : dev(&d), host(h) {
      const std::size_t bytes = h.bytes(), total = bytes + 2 * kGuard;
      base = d.allocator().allocate(total);
      const auto words = static_cast<std::int64_t>(total / 4);
      whole = TV(base, dsrsq::Shape{words}, dsrsq::DType::i32, d.device());
      std::vector<std::int32_t> img(static_cast<std::size_t>(words), kPattern);
      std::memcpy(reinterpret_cast<std::byte*>(img.data()) + kGuard, h.data, bytes);
      d.copy_from_host(std::as_bytes(std::span<const std::int32_t>(img)), whole);
      view = TV(static_cast<std::byte*>(base) + kGuard, h.shape, h.dtype, d.device());
    }
    void copy_back(const char* op) {
      std::vector<std::int32_t> img(static_cast<std::size_t>(whole.numel()));
      dev->copy_to_host(whole, std::as_writable_bytes(std::span<std::int32_t>(img)));
      const std::size_t gw = kGuard / 4, n = img.size();
      for (std::size_t i = 0; i < gw; ++i)
        DSRSQ_REQUIRE(img[i] == kPattern && img[n - 1 - i] == kPattern, op, ": device guard zone around ",
                      host.str(), " overwritten");
      std::memcpy(host.data, reinterpret_cast<const std::byte*>(img.data()) + kGuard, host.bytes());
    }
    ~Mirror() { dev->allocator().deallocate(base); }
    Mirror(const Mirror&) = delete;
    Mirror& operator=(const Mirror&) = delete;
  };

  // The tensors of one op call; the same host buffer staged twice shares one mirror.
  class Stage {
   public:
    Stage(dsrsq::Backend& dev, const char* op) : dev_(dev), op_(op) {}
    void operator()(TV& t) {
      if (t.empty() || t.device != dsrsq::Device::cpu) return;
      for (auto& m : mirrors_)
        if (m->host.data == t.data && m->host.bytes() == t.bytes()) {
          t = TV(m->view.data, t.shape, t.dtype, dev_.device());
          return;
        }
      mirrors_.push_back(std::make_unique<Mirror>(dev_, t));
      t = mirrors_.back()->view;
    }
    template <class... Ts>
    void all(Ts&... ts) {
      ((*this)(ts), ...);
    }
    void finish() {
      for (auto& m : mirrors_) m->copy_back(op_);
    }

   private:
    dsrsq::Backend& dev_;
    const char* op_;
    std::vector<std::unique_ptr<Mirror>> mirrors_;
  };

  dsrsq::Backend& dev_;
  std::string name_;

 protected:
  void embedding_fwd_impl(const dsrsq::EmbeddingArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "embedding_fwd");
    s.all(a.tokens, a.table, a.out);
    dev_.embedding_fwd(a);
    s.finish();
  }
  void embedding_bwd_impl(const dsrsq::EmbeddingGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "embedding_bwd");
    s.all(a.tokens, a.dout, a.dtable);
    dev_.embedding_bwd(a);
    s.finish();
  }
  void rope_impl(const dsrsq::RopeArgs& a0, bool inverse) override {
    auto a = a0;
    Stage s(dev_, "rope");
    s.all(a.x, a.pos);
    if (inverse) dev_.rope_bwd(a);
    else dev_.rope_fwd(a);
    s.finish();
  }
  void layernorm_fwd_impl(const dsrsq::LayerNormArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "layernorm_fwd");
    s.all(a.x, a.weight, a.bias, a.out, a.mean, a.rstd);
    dev_.layernorm_fwd(a);
    s.finish();
  }
  void layernorm_bwd_impl(const dsrsq::LayerNormGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "layernorm_bwd");
    s.all(a.dout, a.x, a.weight, a.mean, a.rstd, a.dx, a.dweight, a.dbias);
    dev_.layernorm_bwd(a);
    s.finish();
  }
  void matmul_fwd_impl(const dsrsq::MatmulArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "matmul");
    s.all(a.a, a.b, a.c, a.bias);
    dev_.matmul_fwd(a);
    s.finish();
  }
  void gelu_fwd_impl(const dsrsq::GeluArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "gelu_fwd");
    s.all(a.x, a.out);
    dev_.gelu_fwd(a);
    s.finish();
  }
  void gelu_bwd_impl(const dsrsq::GeluGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "gelu_bwd");
    s.all(a.dout, a.x, a.dx);
    dev_.gelu_bwd(a);
    s.finish();
  }
  void attention_fwd_impl(const dsrsq::AttentionArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "attention_fwd");
    s.all(a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos);
    dev_.attention_fwd(a);
    s.finish();
  }
  void attention_bwd_impl(const dsrsq::AttentionGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "attention_bwd");
    s.all(a.dout, a.q, a.k, a.v, a.o, a.lse, a.q_pos, a.k_pos, a.dq, a.dk, a.dv);
    dev_.attention_bwd(a);
    s.finish();
  }
  double cross_entropy_fwd_impl(const dsrsq::CrossEntropyArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "cross_entropy_fwd");
    s.all(a.logits, a.targets, a.mask, a.losses);
    const double r = dev_.cross_entropy_fwd(a);
    s.finish();
    return r;
  }
  void cross_entropy_bwd_impl(const dsrsq::CrossEntropyGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "cross_entropy_bwd");
    s.all(a.logits, a.targets, a.mask, a.dlogits);
    dev_.cross_entropy_bwd(a);
    s.finish();
  }
  void adamw_impl(const dsrsq::AdamWArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "adamw");
    s.all(a.params, a.grads, a.m, a.v);
    dev_.adamw(a);
    s.finish();
  }
  void axpy_impl(const dsrsq::AxpyArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "axpy");
    s.all(a.x, a.y);
    dev_.axpy(a);
    s.finish();
  }
  void fill_impl(TV x, double value) override {
    Stage s(dev_, "fill");
    s(x);
    dev_.fill(x, value);
    s.finish();
  }
  void copy_impl(TV src, TV dst) override {
    Stage s(dev_, "copy");
    s.all(src, dst);
    dev_.copy(src, dst);
    s.finish();
  }
  double sum_squares_impl(TV x) override {
    Stage s(dev_, "sum_squares");
    s(x);
    const double r = dev_.sum_squares(x);
    s.finish();
    return r;
  }
  void scale_impl(TV x, double f) override {
    Stage s(dev_, "scale");
    s(x);
    dev_.scale(x, f);
    s.finish();
  }
  // Reached from linear_bwd / matmul_bwd on this object. The device backend's
  // bias gradient is reached through its linear_bwd with only dbias requested:
  // x and weight are shape-only stand-ins (N x 1, OC x 1) that it never reads.
  void bias_rows_sum_impl(TV dout2d, TV dbias) override {
    Stage s(dev_, "bias_grad");
    s.all(dout2d, dbias);
    const std::int64_t N = dout2d.shape[0], OC = dout2d.shape[1];
    const TV x(dout2d.data, dsrsq::Shape{N, 1}, dout2d.dtype, dout2d.device);
    const TV w(dout2d.data, dsrsq::Shape{OC, 1}, dout2d.dtype, dout2d.device);
    dev_.linear_bwd(dsrsq::LinearGradArgs{dout2d, x, w, TV{}, TV{}, dbias, false});
    s.finish();
  }
  void gather_rows_impl(const dsrsq::GatherRowsArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "gather_rows");
    s.all(a.src, a.idx, a.dst);
    dev_.gather_rows(a);
    s.finish();
  }
  void scatter_add_rows_impl(const dsrsq::ScatterAddRowsArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "scatter_add_rows");
    s.all(a.src, a.idx, a.dst);
    dev_.scatter_add_rows(a);
    s.finish();
  }
  void attention_merge_impl(const dsrsq::AttentionMergeArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "attention_merge");
    s.all(a.o, a.lse, a.o_b, a.lse_b);
    dev_.attention_merge(a);
    s.finish();
  }
  void latent_attention_fwd_impl(const dsrsq::LatentAttentionArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "latent_attention_fwd");
    s.all(a.q, a.k, a.q_pos, a.k_pos, a.latent, a.up, a.o, a.lse, a.centroids, a.assign, a.sizes, a.lse_other,
          a.row_weight, a.mass, a.used);
    dev_.latent_attention_fwd(a);
    s.finish();
  }
  void attention_mass_impl(const dsrsq::AttentionMassArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "attention_mass");
    s.all(a.q, a.k, a.q_pos, a.k_pos, a.row_weight, a.mass);
    dev_.attention_mass(a);
    s.finish();
  }
  void topk_impl(const dsrsq::TopKArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "topk");
    s.all(a.x, a.idx);
    dev_.topk(a);
    s.finish();
  }
  void kmeans_assign_impl(const dsrsq::KMeansAssignArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "kmeans_assign");
    s.all(a.x, a.centroids, a.assign, a.dist);
    dev_.kmeans_assign(a);
    s.finish();
  }
  void sym_eigen_impl(const dsrsq::SymEigenArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "sym_eigen");
    s.all(a.a, a.vals, a.vecs);
    dev_.sym_eigen(a);
    s.finish();
  }
  void gram_impl(const dsrsq::GramArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "gram");
    s.all(a.x, a.g);
    dev_.gram(a);
    s.finish();
  }
  double lowrank_recon_fwd_impl(const dsrsq::LowRankReconArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "lowrank_recon_fwd");
    s.all(a.x, a.p, a.u);
    const double r = dev_.lowrank_recon_fwd(a);
    s.finish();
    return r;
  }
  void lowrank_recon_bwd_impl(const dsrsq::LowRankReconGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "lowrank_recon_bwd");
    s.all(a.x, a.p, a.u, a.dp, a.du);
    dev_.lowrank_recon_bwd(a);
    s.finish();
  }
  void conv_project_fwd_impl(const dsrsq::ConvProjectArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "conv_project_fwd");
    s.all(a.e, a.taps, a.w, a.r);
    dev_.conv_project_fwd(a);
    s.finish();
  }
  void conv_project_bwd_impl(const dsrsq::ConvProjectGradArgs& a0) override {
    auto a = a0;
    Stage s(dev_, "conv_project_bwd");
    s.all(a.e, a.taps, a.w, a.dr, a.dw, a.dtaps);
    dev_.conv_project_bwd(a);
    s.finish();
  }
  // Host tensors on the host side of this front: plain copies.
  void copy_to_host_impl(TV src, std::span<std::byte> dst) override { std::memcpy(dst.data(), src.data, dst.size()); }
  void copy_from_host_impl(std::span<const std::byte> src, TV dst) override {
    std::memcpy(dst.data, src.data(), src.size());
  }
  void host_tasks_impl(std::int64_t n, const std::function<void(std::int64_t)>& fn) override { dev_.host_tasks(n, fn); }
};

// `be` itself for a host-memory backend, else its (process-lifetime) staging front.
inline dsrsq::Backend& on_host(dsrsq::Backend& be) {
  if (be.device() == dsrsq::Device::cpu) return be;
  static std::map<dsrsq::Backend*, std::unique_ptr<StagingBackend>> fronts;
  auto& f = fronts[&be];
  if (!f) f = std::make_unique<StagingBackend>(be);
  return *f;
}

}  // namespace ref
