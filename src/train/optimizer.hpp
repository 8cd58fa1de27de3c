#pragma once
// AdamW over a model's parameters (decoupled weight decay on the tensors marked
// `decay`), global gradient-norm clipping, and the learning-rate schedule.
// Optimizer state lives in its own arena ("optimizer").
#include <cstdint>
#include <span>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "model/transformer.hpp"

namespace dsrsq {

struct AdamWConfig {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double clip_norm = 1.0;  // <= 0: no clipping
};

class AdamW {
 public:
  AdamW(std::span<Param> params, TensorView flat_params, AdamWConfig cfg, Backend& backend);
  // Global L2 norm of all gradients (before clipping).
  double grad_norm();
  // One update at learning rate `lr` (the schedule's value); clips first when
  // clip_norm > 0. Returns the pre-clip gradient norm.
  double step(double lr);
  // Same, with an externally computed norm (data-parallel: norm of the reduced gradients).
  void step_with_norm(double lr, double norm);

  std::int64_t steps() const { return t_; }
  void set_steps(std::int64_t t) { t_ = t; }
  Backend& backend() { return be_; }
  TensorView m() { return m_; }
  TensorView v() { return v_; }
  const AdamWConfig& config() const { return cfg_; }
  std::size_t state_bytes() const { return arena_.peak_bytes(); }

 private:
  std::span<Param> params_;
  AdamWConfig cfg_;
  Backend& be_;
  Arena arena_;
  TensorView m_, v_;
  const float* base_ = nullptr;
  std::int64_t t_ = 0;
};

// Linear warm-up to peak_lr over warmup steps, then cosine decay to
// min_lr_frac * peak_lr at total_steps.
double lr_schedule(std::int64_t step, std::int64_t total_steps, std::int64_t warmup, double peak_lr,
                   double min_lr_frac = 0.1);

}  // namespace dsrsq
