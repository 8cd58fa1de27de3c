#include "train/optimizer.hpp"

#include <cmath>
#include <numbers>

namespace dsrsq {

AdamW::AdamW(std::span<Param> params, TensorView flat_params, AdamWConfig cfg, Backend& backend)
    : params_(params), cfg_(cfg), be_(backend), arena_("optimizer", 1 << 20, backend.allocator()) {
  DSRSQ_INPUT_CHECK(cfg.lr >= 0, "optimizer: learning rate must be >= 0, got ", cfg.lr);
  DSRSQ_INPUT_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1,
                    "optimizer: betas must lie in [0, 1), got ", cfg.beta1, ", ", cfg.beta2);
  DSRSQ_INPUT_CHECK(cfg.eps > 0, "optimizer: eps must be > 0");
  DSRSQ_INPUT_CHECK(cfg.weight_decay >= 0, "optimizer: weight_decay must be >= 0, got ", cfg.weight_decay);
  m_ = arena_.allocate(flat_params.shape, DType::f32);
  v_ = arena_.allocate(flat_params.shape, DType::f32);
  be_.fill(m_, 0.0);
  be_.fill(v_, 0.0);
  base_ = static_cast<const float*>(flat_params.data);  // offsets only: never read on the host
}

double AdamW::grad_norm() {
  double s = 0;
  for (auto& p : params_) s += be_.sum_squares(p.grad);
  return std::sqrt(s);
}

double AdamW::step(double lr) {
  const double norm = grad_norm();
  step_with_norm(lr, norm);
  return norm;
}

void AdamW::step_with_norm(double lr, double norm) {
  ++t_;
  const double scale = (cfg_.clip_norm > 0 && norm > cfg_.clip_norm) ? cfg_.clip_norm / (norm + 1e-6) : 1.0;
  for (auto& p : params_) {
    const std::int64_t off = static_cast<const float*>(p.value.data) - base_;
    const std::int64_t n = p.value.numel();
    AdamWArgs a;
    a.params = p.value.reshaped(Shape{n});
    a.grads = p.grad.reshaped(Shape{n});
    a.m = m_.rows(off, n);
    a.v = v_.rows(off, n);
    a.lr = lr;
    a.beta1 = cfg_.beta1;
    a.beta2 = cfg_.beta2;
    a.eps = cfg_.eps;
    a.weight_decay = p.decay ? cfg_.weight_decay : 0.0;
    a.grad_scale = scale;
    a.step = t_;
    be_.adamw(a);
  }
}

double lr_schedule(std::int64_t step, std::int64_t total_steps, std::int64_t warmup, double peak_lr,
                   double min_lr_frac) {
  if (warmup > 0 && step < warmup) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (total_steps <= warmup) return peak_lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup)));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return peak_lr * (min_lr_frac + (1.0 - min_lr_frac) * cosine);
}

}  // namespace dsrsq
