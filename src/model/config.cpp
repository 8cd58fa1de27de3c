#include "model/config.hpp"

#include <sstream>

#include "core/error.hpp"

namespace dsrsq {

void ModelConfig::validate() const {
  auto positive = [](const char* name, std::int64_t v) {
    DSRSQ_INPUT_CHECK(v > 0, "model config: ", name, " must be > 0, got ", v);
  };
  positive("vocab", vocab);
  positive("d_model", d_model);
  positive("n_heads", n_heads);
  positive("n_layers", n_layers);
  positive("d_ff", d_ff);
  positive("max_pos", max_pos);
  DSRSQ_INPUT_CHECK(d_model % n_heads == 0, "model config: n_heads=", n_heads, " does not divide d_model=", d_model);
  DSRSQ_INPUT_CHECK(head_size() % 2 == 0, "model config: head size d_model/n_heads=", head_size(),
                    " must be even for RoPE");
  DSRSQ_INPUT_CHECK(vocab < (std::int64_t{1} << 31), "model config: vocab=", vocab, " too large");
  DSRSQ_INPUT_CHECK(max_pos <= (std::int64_t{1} << 30) - 1, "model config: max_pos=", max_pos, " too large (limit 2^30-1)");
  DSRSQ_INPUT_CHECK(rope_theta > 0, "model config: rope_theta must be > 0, got ", rope_theta);
  DSRSQ_INPUT_CHECK(attn_log_base == 0 || attn_log_base > 1, "model config: attn_log_base must be 0 (off) or > 1, got ",
                    attn_log_base);
  DSRSQ_INPUT_CHECK(ln_eps > 0, "model config: ln_eps must be > 0, got ", ln_eps);
}

std::int64_t ModelConfig::num_parameters() const {
  const std::int64_t C = d_model, F = d_ff;
  const std::int64_t per_layer = 2 * C + 4 * (C * C + C) + 2 * C + (F * C + F) + (C * F + C);
  return vocab * C + n_layers * per_layer + 2 * C + (tied_embedding ? 0 : vocab * C);
}

std::string ModelConfig::str() const {
  std::ostringstream os;
  os << "vocab=" << vocab << " d_model=" << d_model << " n_heads=" << n_heads << " n_layers=" << n_layers
     << " d_ff=" << d_ff << " max_pos=" << max_pos << " tied_embedding=" << (tied_embedding ? "true" : "false")
     << " rope_theta=" << rope_theta;
  if (attn_log_base > 0) os << " attn_log_base=" << attn_log_base;
  return os.str();
}

}  // namespace dsrsq
