#pragma once
// GCA, grouped cross attention (Hu et al., arXiv 2410.01651; the DRT model of
// ant-research/long-context-modeling, model/DRT.py; ALGORITHMS.md section 5
// and its "Further corrections"). A model of its own:
//
//  * the token stream gets a landmark entry after every S tokens (chunks of
//    S + 1 entries); positions (RoPE, masks) count the landmarks;
//  * lower layers: pre-LN blocks whose self-attention sees the W previous
//    stream entries and itself (W + 1 keys, a ring of W + 1 at decode);
//  * a chunk encoder: each complete chunk's lower-stack states, LayerNorm-ed,
//    through n_enc bidirectional blocks and a final LayerNorm: E_c (S+1, D).
//    The landmark row e_c = E_c[S] is the chunk's key; K/V memory
//    Wk E_c, Wv E_c is shared by every upper layer, its landmark slot zeroed:
//    that zero key/value is the "+1" of each chunk's softmax (applied once);
//  * retrieval: landmark c's lower-stack state through the landmark norm
//    scores every strictly earlier chunk, s = norm(h_c) . e_c' / sqrt(D); the
//    top k are chosen (Gumbel noise added only for choosing, in training);
//    weights = softmax of the chosen clean scores; chunk c+1 reads them
//    (chunks 0 and 1 read nothing: GCA output 0);
//  * upper layers: x1 = x + SA(N1 x); y = x1 + GCA(x1); out = x1 + MLP(N2 y),
//    GCA(x1) = Wo sum_i w_i softmax1(q K_i^T / sqrt(d)) V_i, q = Wq Ng(x1);
//  * final LayerNorm, logits tied to the token embedding (the landmark has
//    its own embedding row V, never predicted).
// The project's blocks use LayerNorm with bias, RoPE and GELU where DRT uses
// RMSNorm, ALiBi and SwiGLU, so GCA and `standard` differ only by GCA.
//
// Every tensor op runs through the Backend; the model runs in f32 (training,
// decoding) or f64 (the gradient tests). Host code only builds index lists,
// chooses the top k and computes the k-way softmax of the chosen scores.
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "kv/kv_policy.hpp"
#include "model/config.hpp"
#include "model/trainable.hpp"
#include "model/transformer.hpp"

namespace dsrsq {

struct GcaConfig {
  ModelConfig base;            // vocab, d_model, n_heads, d_ff, max_pos, rope_theta, ln_eps
  std::int64_t chunk = 15;     // S: tokens per chunk; a landmark follows each
  std::int64_t topk = 4;       // chunks retrieved per landmark
  std::int64_t window = 32;    // W: self-attention keys before the query (W + 1 with itself)
  std::int64_t n_lower = 1, n_upper = 1, n_enc = 2;
  std::int64_t enc_d_ff = 128;  // the chunk encoder's MLP width
  void validate() const;        // input errors name the --gca_* option
  std::int64_t num_parameters() const;
  // Stream index of token position p (landmarks counted).
  std::int64_t stream_index(std::int64_t p) const { return p + p / chunk; }
};

class GcaModel final : public TrainableModel {
 public:
  GcaModel(const GcaConfig& cfg, Backend& backend, DType dtype = DType::f32);
  GcaModel(const GcaModel&) = delete;
  GcaModel& operator=(const GcaModel&) = delete;

  const GcaConfig& config() const { return cfg_; }
  Backend& backend() override { return be_; }
  DType dtype() const { return dt_; }
  // GPT-2 style: N(0, 0.02) matrices, residual projections / sqrt(2 L), unit norms.
  void init_weights(std::uint64_t seed);
  // Starts what GCA shares with a standard Transformer of the same shape
  // (ModelConfig equal but for max_pos; n_layers = n_lower + n_upper) from
  // its weights: the token embedding (the landmark row keeps its own), layer
  // l's norms, self-attention and MLP as lower layer l, then upper layer
  // l - n_lower, and the final norm. GCA's own parts (landmark row, chunk
  // encoder, memory projections, landmark norm, each upper layer's GCA norm
  // and Wq) keep their initialisation; each GCA output projection Wo is set
  // to zero, so the upper layers start as the standard layers (a zero-gated
  // new branch: it adds nothing until training moves Wo). What still differs
  // at the start: self-attention sees W + 1 stream entries, and landmarks
  // enter the stream. Input errors name the mismatching field.
  void init_from_standard(Transformer& standard);

  std::span<Param> params() override { return params_; }
  const Param& param(const std::string& name) const;
  TensorView flat_params() override { return flat_params_; }
  TensorView flat_grads() override { return flat_grads_; }
  void zero_grad() override;
  // Rows of a batch must hold positions 0..T-1 (chunks are counted from the
  // sequence start).
  double forward(const Batch& batch, double inv_norm = 0.0) override;
  void backward(double dloss = 1.0) override;
  TensorView row_losses() const override { return losses_; }
  TensorView logits() const { return logits_; }  // (B*T, V) of the last forward
  double train_flops(std::int64_t B, std::int64_t T) const override;
  std::string config_str() const override;

  // Gumbel noise on the choice of the next training forwards (seeded), or none.
  void set_noise(std::optional<std::uint64_t> seed) { noise_ = seed; }
  // The last forward's retrieval: for batch row b and landmark c, slot i < k:
  // the chosen chunk (-1: none) and its weight.
  std::int32_t selected(std::int64_t b, std::int64_t c, std::int64_t i) const;
  double weight(std::int64_t b, std::int64_t c, std::int64_t i) const;
  std::int64_t landmarks() const { return NC_; }
  // For tests: landmark c's score of chunk j (batch row b); the encoder's
  // output (B*NC*(S+1), D); upper layer l's weighted chunk attention before
  // Wo (stream rows B*Tp, then a sink row); the stream length per row.
  double score(std::int64_t b, std::int64_t c, std::int64_t j) const;
  TensorView encoder_output() const { return E_; }
  TensorView gca_attention(std::int64_t l) const { return uacts_.at(static_cast<std::size_t>(l)).gatt; }
  std::int64_t stream_rows() const { return Tp_; }

 private:
  friend class GcaDecoder;
  struct Block {
    TensorView ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, wfc, bfc, wproj, bproj;
    TensorView lng_w, lng_b, gwq, gwo;  // upper blocks only
  };
  struct Acts {
    TensorView x_in, ln1, m1, r1, q, k, v, kprev, vprev, att, lse, x1;
    TensorView lng, mg, rg, qg, qrep, go, glse, gcomb, gatt, y;  // upper
    TensorView ln2, m2, r2, fc, fca;
  };
  enum class Kind { window, chunk };
  void build();
  void block_fwd(Arena& ar, const Block& p, Acts& A, TensorView x, TensorView out, Kind kind, bool upper,
                 std::int64_t nrows, std::int64_t F);
  void block_bwd(Arena& ar, const Block& p, const Block& g, const Acts& A, TensorView dx, Kind kind, bool upper,
                 std::int64_t nrows, std::int64_t F);
  void self_attn_fwd(Arena& ar, Acts& A, Kind kind);
  void self_attn_bwd(Arena& ar, const Acts& A, TensorView datt, TensorView dq, TensorView dk, TensorView dv, Kind kind);
  void gca_fwd(Arena& ar, const Block& p, Acts& A);
  void gca_bwd(Arena& ar, const Block& p, const Block& g, const Acts& A, TensorView dy, TensorView dx1);
  void retrieve(Arena& ar);

  GcaConfig cfg_;
  Backend& be_;
  DType dt_;
  Arena param_arena_, grad_arena_, act_arena_;
  TensorView flat_params_, flat_grads_;
  std::vector<Param> params_;
  TensorView wte_, dwte_, lnf_w_, lnf_b_, dlnf_w_, dlnf_b_;
  TensorView enc_in_w_, enc_in_b_, enc_out_w_, enc_out_b_, memk_, memv_, lmk_w_, lmk_b_;
  TensorView denc_in_w_, denc_in_b_, denc_out_w_, denc_out_b_, dmemk_, dmemv_, dlmk_w_, dlmk_b_;
  std::vector<Block> lower_, dlower_, enc_, denc_, upper_, dupper_;
  std::optional<std::uint64_t> noise_;
  std::uint64_t noise_calls_ = 0;

  // The last training forward (stream layout: B rows of Tp entries).
  std::int64_t B_ = 0, T_ = 0, Te_ = 0, Tp_ = 0, NC_ = 0, G_ = 0;
  std::vector<Acts> lacts_, eacts_, uacts_;
  TensorView ids_, spos_, qposB_, kposB_, epos_, zpos_;
  TensorView h_, enc_idx_, enc_x_, enc_ln_, enc_m_, enc_r_, enc_last_, E_, Em_, Er_, Eout_;
  TensorView memK_, memV_, lmk_rows_, lmk_idx_, hq_, hqn_, hq_m_, hq_r_, ekeys_, eidx_, scores_;
  TensorView krep_, vrep_, qidx_, qidx_rep_, kidx_rep_, wts_, dwts_, dkrep_, dvrep_;
  std::vector<std::int32_t> sel_;   // (B, NC, k), -1: none
  std::vector<double> selw_;        // (B, NC, k)
  TensorView tok_rows_, x_final_, xf_tok_, lnf_, lnf_m_, lnf_r_, logits_, targets_, mask_, losses_;
  double inv_norm_ = 1.0;
  bool have_targets_ = false;
};

// Decoding with GCA's own memory: per layer a ring of the last W + 1 stream
// entries' keys and values, the current chunk's lower-stack states (the
// encoder's input), the chunk memory (S keys and values per complete chunk,
// the zero landmark slot not stored) and the landmark keys. A landmark is run
// with its chunk's S-th token, and the chunk is closed (encoded, stored, the
// next retrieval chosen) right after.
//
// extend() runs its tokens in blocks inside one chunk (at most W tokens and
// the landmark): a prompt is prefilled a block at a time (every op on up to
// W + 1 rows), a decode step is a block of one. The block's self-attention is
// the training window exactly (see run_block), so the result equals the
// training forward's (tests/gca). Prefill::stepwise runs blocks of one token
// (the tests compare both). Its memory beside the KV: the step scratch (the
// call's logits and one block's activations), reported by
// activation_peak_bytes() and counted by the evaluator.
class GcaDecoder {
 public:
  enum class Prefill { batched, stepwise };
  GcaDecoder(GcaModel& model, std::int64_t max_tokens, Prefill prefill = Prefill::batched);
  void reset();
  // Tokens at positions pos (both length n; pos continues 0, 1, ...).
  // Returns the logits (n, V) (valid until the next call).
  TensorView extend(std::span<const std::int32_t> tokens, std::span<const std::int32_t> pos);
  // High-water mark of the decoder's scratch since the last reset_activation_peak().
  std::size_t activation_peak_bytes() const;
  void reset_activation_peak();
  std::int64_t tokens_seen() const { return seen_; }
  std::int64_t chunks() const { return nchunks_; }
  // The retrieval the current chunk's tokens read (chunk ids, weights).
  std::vector<std::int32_t> current_chunks() const;
  std::vector<double> current_weights() const;
  // Resident bytes now: rings + chunk memory + landmark keys + the current
  // chunk's lower states (positions not counted: the one byte rule).
  std::size_t resident_bytes() const;
  // Bytes one token's step reads: every ring + the retrieved chunks' memory.
  std::size_t read_bytes_per_step() const;
  // Resident bytes after n tokens (a formula of S, k, W: the budget rule).
  static std::size_t resident_bytes_for(const GcaConfig& c, std::int64_t n);
  // The fixed part (rings + chunk buffer): what no budget can go below.
  static std::size_t fixed_bytes(const GcaConfig& c);
  double attended_keys() const;  // keys one token's query read, mean over layers

 private:
  TensorView run_block(std::span<const std::int32_t> ids, std::int64_t e0, bool landmark);
  void close_chunk();
  void choose(std::int64_t ch);  // the chunks the tokens after landmark ch read (lmk_h_: its lower state)
  GcaModel& m_;
  Prefill prefill_mode_;
  std::int64_t cap_chunks_;
  Arena state_, scratch_;
  std::vector<TensorView> rk_, rv_;
  // The stream entry in each ring slot (kEmpty: none), the same for every layer (the rings move together);
  // host-side: run_block masks the ring by made-up positions computed from it.
  std::vector<std::int32_t> ring_pos_;
  TensorView chunk_buf_, memk_, memv_, lmk_, lmk_h_, cur_sel_, cur_w_, logits_;
  std::int64_t cur_count_ = 0, seen_ = 0, nchunks_ = 0;
};

}  // namespace dsrsq
