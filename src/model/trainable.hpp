#pragma once
// What the trainer, the optimizer and the checkpoints need from a model: its
// parameters and gradients as named views into flat buffers, a training
// forward with a masked loss, its backward, per-row losses and a FLOP count.
// The standard Transformer is one; a method with an architecture of its own
// (GCA, methods/gca_model.hpp) is another, trained by the same Trainer.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/tensor.hpp"

namespace dsrsq {

struct Param {
  std::string name;  // "h.0.attn.wq", "wte", ...
  TensorView value, grad;
  bool decay;  // weight decay applies (matrices and embeddings, not biases or norms)
};

// A (B, T) batch on the host. targets/mask may be empty (logits only).
struct Batch {
  TensorView tokens;   // i32 (B, T)
  TensorView pos;      // i32 (B, T)
  TensorView targets;  // i32 (B, T): next token to predict at each position
  TensorView mask;     // f32 (B, T): loss weight (1 on answer tokens, 0 elsewhere)
};

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;
  // The backend its parameters, gradients and activations live on.
  virtual Backend& backend() = 0;
  virtual std::span<Param> params() = 0;
  virtual TensorView flat_params() = 0;
  virtual TensorView flat_grads() = 0;
  virtual void zero_grad() = 0;
  // Masked mean loss (sum of mask-weighted token losses * inv_norm; inv_norm
  // <= 0: 1 / sum(mask)); saves what backward needs.
  virtual double forward(const Batch& batch, double inv_norm = 0.0) = 0;
  // Gradients += d(loss)/d(params) * dloss of the last forward.
  virtual void backward(double dloss = 1.0) = 0;
  // Unweighted per-row losses (B*T) of the last training forward (on the
  // model's backend); host_row_losses() copies them to the host.
  virtual TensorView row_losses() const = 0;
  std::vector<float> host_row_losses() { return to_host<float>(backend(), row_losses()); }
  // Training FLOPs of one forward+backward over (B, T) (cost functions only).
  virtual double train_flops(std::int64_t B, std::int64_t T) const = 0;
  // "vocab=256 d_model=128 ..." (checkpoints record it).
  virtual std::string config_str() const = 0;
};

}  // namespace dsrsq
