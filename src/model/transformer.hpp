#pragma once
// Decoder-only transformer: token embedding, n_layers pre-LN blocks
//   x1 = x + Wo Attn(RoPE(Wq LN1(x)), RoPE(Wk LN1(x)), Wv LN1(x))
//   x2 = x1 + Wproj GELU(Wfc LN2(x1))
// final LayerNorm and logits = LNf(x) @ wte^T (tied) or @ lm_head^T.
// Positions are explicit (B, T) ids, so tokens selected out of a long context
// keep their original positions. Parameters and gradients are each one flat
// f32 buffer; the named views below point into them.
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "model/config.hpp"
#include "model/trainable.hpp"

namespace dsrsq {

class KVPolicy;

// Replaces the attention op of the TRAINING forward and backward: it receives
// the batch's post-RoPE q, k, v (B, T, NH, HS) with their positions, writes
// o and lse (forward) and accumulates dq, dk, dv (backward), exactly like
// Backend::attention_fwd/bwd. Sequence parallelism (ring attention over the sp
// ranks, src/dist/ring_attention.hpp) and SQA cluster attention plug in here.
class AttentionOverride {
 public:
  virtual ~AttentionOverride() = default;
  virtual void forward(std::int64_t layer, const AttentionArgs& a) = 0;
  virtual void backward(std::int64_t layer, const AttentionGradArgs& a) = 0;
};

// Key/value cache for incremental decoding: per layer k, v (B, capacity, NH, HS)
// holding post-RoPE keys, and the positions of the cached tokens. Unused slots
// carry kEmptyPos, which the causal mask hides, so a partly filled cache needs
// no special attention path.
struct KVCache {
  static constexpr std::int32_t kEmptyPos = (1 << 30) - 1;
  std::int64_t batch = 0, capacity = 0, len = 0;
  std::vector<TensorView> k, v;  // per layer
  TensorView pos;                // i32 (B, capacity)
  std::size_t bytes() const;     // allocated bytes (k, v and positions)
};

// Changes the pre-RoPE keys and values of the TRAINING forward before they are
// used (DSRSQ: RCKV's reconstruction U P x of the tokens that inference keeps
// compressed, so the model learns to read its compressed cache), with its
// backward. k, v, dk, dv are (B*T, C).
class KVTransform {
 public:
  virtual ~KVTransform() = default;
  // In place: k, v -> the transformed keys and values.
  virtual void forward(std::int64_t layer, TensorView k, TensorView v) = 0;
  // In place: gradients w.r.t. the transformed k, v -> w.r.t. the originals;
  // the transform's own parameter gradients accumulate.
  virtual void backward(std::int64_t layer, TensorView dk, TensorView dv) = 0;
};

class Transformer : public TrainableModel {
 public:
  Transformer(const ModelConfig& cfg, Backend& backend);
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() override { return be_; }

  // GPT-2 style init: N(0, 0.02) matrices, residual projections / sqrt(2 L),
  // zero biases, unit LayerNorm weights. Deterministic given the seed.
  void init_weights(std::uint64_t seed);

  std::span<Param> params() override { return params_; }
  const Param& param(const std::string& name) const;
  TensorView flat_params() override { return flat_params_; }
  TensorView flat_grads() override { return flat_grads_; }
  void zero_grad() override;

  // Training forward over a batch; saves what backward needs. Returns the
  // masked mean loss (sum of mask-weighted token losses * inv_norm; inv_norm
  // <= 0 means 1 / sum(mask)). With no targets, computes logits only (returns 0).
  double forward(const Batch& batch, double inv_norm = 0.0) override;
  // Backward of the last forward: gradients += d(loss)/d(params) * dloss.
  void backward(double dloss = 1.0) override;
  // Gradient-ready hook (data parallel: src/dist/dp_reducer.hpp). When set,
  // backward() calls it with layer l as soon as the gradients of layer l
  // ("h.<l>.*") are final (layers finish from last to first), and once more
  // with layer = -1 at the very end, when wte, lnf.* and lm_head are final too
  // (the tied wte gets its embedding contribution last). Called on the thread
  // that runs backward; it must not modify the gradients of layers not yet done.
  std::function<void(std::int64_t layer)> on_layer_grads_ready;
  // Attention of forward()/backward() (not of extend()); null: the backend's.
  AttentionOverride* attention_override = nullptr;
  // Transform of the training forward's keys and values; null: none.
  KVTransform* kv_transform = nullptr;
  // Pre-RoPE keys and values (B*T, C) of layer l saved by the last training
  // forward (RCKV's compression loss reads them), before any kv_transform.
  // Keys are kept only while save_pre_rope_keys is set (RoPE rotates them in
  // place otherwise).
  bool save_pre_rope_keys = false;
  TensorView saved_keys(std::int64_t layer) const;
  TensorView saved_values(std::int64_t layer) const;
  // Logits of the last forward / decode call: (B*T, V).
  TensorView logits() const { return logits_; }
  // Unweighted per-row losses (B*T) of the last training forward (0 where mask is 0).
  TensorView row_losses() const override { return losses_; }

  // Incremental decoding. new_cache allocates a cache in `arena` (from the
  // backend's allocator). extend() runs the model on new tokens (B, Tn) at
  // positions pos (B, Tn) (host tensors; the model copies them to its
  // device and a KV policy receives the device copy of pos), appends
  // their keys/values to the cache and attends to everything cached; logits()
  // then holds (B*Tn, V).
  KVCache new_cache(std::int64_t batch, std::int64_t capacity, Arena& arena) const;
  void extend(KVCache& cache, TensorView tokens, TensorView pos);
  // The same through a KV-cache policy: the policy receives each layer's
  // pre-RoPE q, k, v and computes the attention (src/kv/kv_policy.hpp).
  void extend(KVPolicy& policy, TensorView tokens, TensorView pos);

  // Memory figures (bytes): arena high-water marks.
  std::size_t param_bytes() const { return param_arena_.peak_bytes(); }
  std::size_t grad_bytes() const { return grad_arena_.peak_bytes(); }
  std::size_t activation_peak_bytes() const { return act_arena_.peak_bytes(); }
  Arena& activation_arena() { return act_arena_; }

  // Training FLOPs of one forward+backward over (B, T) (cost functions only).
  double train_flops(std::int64_t B, std::int64_t T) const override;
  std::string config_str() const override { return cfg_.str(); }

 private:
  struct Layer {
    TensorView ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, wfc, bfc, wproj, bproj;
  };
  struct LayerActs {
    TensorView x_in, ln1, ln1_mean, ln1_rstd, q, k, k_pre, v, v_pre, att, lse, x_mid, ln2, ln2_mean, ln2_rstd, fc, fc_act;
  };
  void build_params();
  TensorView copy_into(Arena& arena, const TensorView& src);
  TensorView zeros(Arena& ar, Shape s);
  void device_inputs(TensorView& tokens, TensorView& pos);
  void check_batch(const TensorView& tokens, const TensorView& pos) const;
  // Runs all layers on (B, T). With a cache, keys/values are appended to it and
  // attention reads the cache; otherwise attention is over the batch itself.
  void run_forward(Arena& arena, std::int64_t B, std::int64_t T, TensorView tokens, TensorView pos, KVCache* cache,
                   KVPolicy* policy = nullptr);

  ModelConfig cfg_;
  Backend& be_;
  Arena param_arena_, grad_arena_, act_arena_, input_arena_;
  TensorView flat_params_, flat_grads_;
  std::vector<Param> params_;
  TensorView wte_, dwte_, lnf_w_, lnf_b_, dlnf_w_, dlnf_b_, head_, dhead_;
  std::vector<Layer> layers_, dlayers_;

  // Saved by the last training forward.
  std::int64_t B_ = 0, T_ = 0;
  std::vector<LayerActs> acts_;
  TensorView tokens_, pos_, targets_, mask_, x_final_, lnf_, lnf_mean_, lnf_rstd_, logits_, losses_;
  double inv_norm_ = 1.0;
  bool have_targets_ = false;
};

}  // namespace dsrsq
