#pragma once
// Model configuration: decoder-only transformer, pre-LayerNorm, RoPE, GELU MLP,
// tied (or separate) output embedding.
#include <cstdint>
#include <string>

namespace dsrsq {

struct ModelConfig {
  std::int64_t vocab = 256;
  std::int64_t d_model = 128;
  std::int64_t n_heads = 4;
  std::int64_t n_layers = 2;
  std::int64_t d_ff = 512;
  std::int64_t max_pos = 4096;  // positions must lie in [0, max_pos)
  bool tied_embedding = true;
  double rope_theta = 10000.0;
  // > 1: queries at position p are scaled by max(1, ln(p+1)/ln(attn_log_base))
  // (log-length attention scaling; RopeArgs::log_base). 0: off.
  double attn_log_base = 0.0;
  double ln_eps = 1e-5;

  std::int64_t head_size() const { return d_model / n_heads; }
  // Throws dsrsq::Error naming the offending field and values.
  void validate() const;
  std::int64_t num_parameters() const;
  std::string str() const;  // "vocab=256 d_model=128 ..."
};

}  // namespace dsrsq
