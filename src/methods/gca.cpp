// "gca": grouped cross attention (Hu et al. 2024, arXiv 2410.01651; the DRT
// model). A model of its own (methods/gca_model.hpp), trained end to end by
// the standard Trainer with the run's data, steps and AdamW schedule, and
// evaluated by its own decoder (the prompt a block of up to W tokens at a
// time, then token by token; methods/gca_model.hpp). This file is its registry
// entry: knobs, the training hooks (the Gumbel draw of each step), the
// checkpoint marker and the evaluation plan with GCA's memory figures.
#include <algorithm>
#include <memory>
#include <sstream>
#include <string>

#include "core/error.hpp"
#include "methods/gca_model.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

// Defaults are the debug size (S 15, k 4, W 32); the paper's are S 63, k 8, W 512.
struct GcaKnobs final : MethodKnobs {
  std::int64_t chunk = 15, topk = 4, window = 32, encoder_layers = 2, encoder_d_ff = 0, lower_layers = 0;
  std::string init = "own";

  void describe(po::options_description& d) override {
    d.add_options()
      ("gca_chunk", po::value(&chunk)->default_value(chunk), "S: tokens per chunk; a landmark token follows each (paper 63)")
      ("gca_topk", po::value(&topk)->default_value(topk), "chunks each landmark retrieves (paper 8)")
      ("gca_window", po::value(&window)->default_value(window), "W: self-attention sees the W previous stream entries and itself (paper 512)")
      ("gca_encoder_layers", po::value(&encoder_layers)->default_value(encoder_layers), "bidirectional layers of the chunk encoder (paper 2)")
      ("gca_encoder_d_ff", po::value(&encoder_d_ff)->default_value(encoder_d_ff), "MLP width of the chunk encoder (0: d_ff / 4, keeping the parameter count near the standard model's)")
      ("gca_lower_layers", po::value(&lower_layers)->default_value(lower_layers), "of --n_layers, the layers below retrieval (0: n_layers / 2); the rest are upper layers with GCA")
      ("gca_init", po::value(&init)->default_value(init), "how a fresh GCA model starts: own (its own random initialisation, "
       "as DRT trains from scratch) or standard (the --init_from standard checkpoint's embedding, layers and final norm; "
       "GCA's own parts fresh, its output projections zero: GCA trained from a standard model)");
  }

  void validate(const RunShape& shape) const override {
    DSRSQ_INPUT_CHECK(chunk >= 1, "option --gca_chunk: must be >= 1, got ", chunk);
    DSRSQ_INPUT_CHECK(topk >= 1, "option --gca_topk: must be >= 1, got ", topk);
    DSRSQ_INPUT_CHECK(window >= 1, "option --gca_window: must be >= 1, got ", window);
    DSRSQ_INPUT_CHECK(encoder_layers >= 1, "option --gca_encoder_layers: must be >= 1, got ", encoder_layers);
    DSRSQ_INPUT_CHECK(encoder_d_ff >= 0, "option --gca_encoder_d_ff: must be >= 0 (0: d_ff / 4), got ", encoder_d_ff);
    DSRSQ_INPUT_CHECK(init == "own" || init == "standard", "option --gca_init: 'own' or 'standard', got '", init, "'");
    DSRSQ_INPUT_CHECK(init == "own" || shape.init_from, "option --gca_init standard: needs --init_from a standard "
                      "checkpoint (the model GCA starts from)");
    DSRSQ_INPUT_CHECK(shape.n_layers >= 2, "option --n_layers: GCA needs >= 2 layers (lower and upper), got ", shape.n_layers);
    DSRSQ_INPUT_CHECK(lower_layers >= 0 && lower_layers < shape.n_layers, "option --gca_lower_layers: must lie in [0, n_layers=",
                      shape.n_layers, "), got ", lower_layers);
  }

  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["gca_chunk"] = std::to_string(chunk);
    kv["gca_topk"] = std::to_string(topk);
    kv["gca_window"] = std::to_string(window);
    kv["gca_encoder_layers"] = std::to_string(encoder_layers);
    kv["gca_encoder_d_ff"] = std::to_string(encoder_d_ff);
    kv["gca_lower_layers"] = std::to_string(lower_layers);
    kv["gca_init"] = init;
  }

  GcaConfig config(const ModelConfig& mc) const {
    GcaConfig c;
    c.base = mc;
    c.chunk = chunk;
    c.topk = topk;
    c.window = window;
    c.n_enc = encoder_layers;
    c.enc_d_ff = encoder_d_ff > 0 ? encoder_d_ff : std::max<std::int64_t>(1, mc.d_ff / 4);
    c.n_lower = lower_layers > 0 ? lower_layers : std::max<std::int64_t>(1, mc.n_layers / 2);
    c.n_upper = mc.n_layers - c.n_lower;
    c.validate();
    return c;
  }
};

// GCA's memory through the KVPolicy interface (the evaluator's figures); its
// decoding runs through extend(). Bytes, f32, positions not counted:
//   resident = (n_lower + n_upper) (W + 1) 2D          rings of every layer
//            + (S + 1) D                                 the open chunk's lower states
//            + chunks (S 2D + D)                         chunk memory + landmark keys
// all resident (no offload): total = resident. Read per decode step: every
// ring + the k retrieved chunks (S 2D each; read once, shared by the upper layers).
// The budget: GCA's size follows from S, k, W and the sequence; it cannot
// shrink to a budget. achieved = its resident bytes for the whole sequence
// (budget basis: prompt + new tokens); infeasible when that exceeds the request.
class GcaPolicy final : public KVPolicy {
 public:
  explicit GcaPolicy(GcaModel& m) : m_(m) {}
  std::string name() const override { return "gca"; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override {
    DSRSQ_INPUT_CHECK(info.batch == 1, "gca decoding: batch ", info.batch, " (one sequence at a time)");
    dec_ = std::make_unique<GcaDecoder>(m_, info.prompt_len + info.max_new_tokens + 1);
    requested_ = budget.resolve(m_.config().base, info.budget_basis());
    achieved_ = GcaDecoder::resident_bytes_for(m_.config(), info.budget_basis());
    prefill_ = true;
    mem_ = KVMemory{};
    steps_ = 0;
    read_sum_ = attended_sum_ = 0;
  }
  void attend(std::int64_t, TensorView, TensorView, TensorView, TensorView, TensorView) override {
    raise_input_error("method gca runs its own model (EvalPlan::extend), not the standard Transformer's layers");
  }
  void end_prefill() override {
    prefill_ = false;
    mem_.resident_after_prefill = mem_.peak_prefill = dec_->resident_bytes();
  }
  TensorView extend(TensorView tokens, TensorView pos) {
    DSRSQ_REQUIRE(dec_ != nullptr, "gca: extend() before begin()");
    DSRSQ_INPUT_CHECK(tokens.shape.rank == 2 && tokens.shape[0] == 1 && pos.shape == tokens.shape,
                      "gca decoding: tokens and positions must be (1, n), got ", tokens.str(), " and ", pos.str());
    const auto n = static_cast<std::size_t>(tokens.shape[1]);
    if (!prefill_) {
      read_sum_ += static_cast<double>(dec_->read_bytes_per_step()) * static_cast<double>(n);
      attended_sum_ += dec_->attended_keys() * static_cast<double>(n);
      steps_ += static_cast<std::int64_t>(n);
    }
    TensorView lg = dec_->extend(std::span<const std::int32_t>(tokens.ptr<std::int32_t>(), n),
                                 std::span<const std::int32_t>(pos.ptr<std::int32_t>(), n));
    if (prefill_) mem_.peak_prefill = dec_->resident_bytes();
    mem_.total = dec_->resident_bytes();
    return lg;
  }
  // GCA's own activation memory (its decoder's scratch: the call's logits and
  // one block's activations): the evaluator adds it to the backbone's.
  void reset_activation_peak() {
    if (dec_) dec_->reset_activation_peak();
  }
  std::size_t activation_peak_bytes() const { return dec_ ? dec_->activation_peak_bytes() : 0; }
  KVMemory memory() const override {
    KVMemory m = mem_;
    m.read_per_step = steps_ ? static_cast<std::size_t>(read_sum_ / static_cast<double>(steps_)) : 0;
    return m;
  }
  std::size_t budget_requested_bytes() const override { return requested_; }
  std::size_t budget_achieved_bytes() const override { return achieved_; }
  double attended_tokens() const override { return steps_ ? attended_sum_ / static_cast<double>(steps_) : 0.0; }
  bool infeasible() const override { return achieved_ > requested_; }

 private:
  GcaModel& m_;
  std::unique_ptr<GcaDecoder> dec_;
  std::size_t requested_ = 0, achieved_ = 0;
  bool prefill_ = true;
  KVMemory mem_;
  std::int64_t steps_ = 0;
  double read_sum_ = 0, attended_sum_ = 0;
};

class Gca final : public Method, public TrainingExtension {
 public:
  explicit Gca(const MethodContext& c)
      : cfg_(static_cast<const GcaKnobs*>(c.knobs)->config(c.model.config())),
        from_standard_(static_cast<const GcaKnobs*>(c.knobs)->init == "standard"),
        model_(std::make_unique<GcaModel>(cfg_, c.backend)) {
    model_->init_weights(c.seed);
  }
  TrainingExtension* training() override { return this; }
  TrainableModel* own_model() override { return model_.get(); }

  EvalPlan plan(const std::string&) override {
    auto policy = std::make_unique<GcaPolicy>(*model_);
    GcaPolicy* p = policy.get();
    model_->set_noise(std::nullopt);
    EvalPlan plan;
    plan.extend = [p](TensorView tokens, TensorView pos) { return p->extend(tokens, pos); };
    plan.reset_activation_peak = [p] { p->reset_activation_peak(); };
    plan.activation_peak_bytes = [p] { return p->activation_peak_bytes(); };
    plan.policy = std::move(policy);
    return plan;
  }

  // ---- TrainingExtension ----
  // The parameters and AdamW state are the run's own (the checkpoint's main
  // arrays); the extra entry marks a GCA checkpoint and records its shape.
  void save(std::map<std::string, std::vector<float>>& extra) const override { extra["gca.config"] = shape(); }
  bool restore(const std::map<std::string, std::vector<float>>& extra) override { return check(extra); }
  bool load_params(const std::map<std::string, std::vector<float>>& extra) override { return check(extra); }
  bool starts_from_standard() const override { return from_standard_; }
  void start_from_standard(Transformer& standard) override { model_->init_from_standard(standard); }
  void broadcast(dist::Communicator&, int) override {
    raise_input_error("method gca trains in one process (--dp 1 --sp 1)");
  }
  void attach(MethodHooks& hooks, const TrainEnv& env) override {
    DSRSQ_INPUT_CHECK(env.world == nullptr, "method gca trains in one process (--dp 1 --sp 1)");
    const std::int32_t pad = env.pad_id;
    const std::uint64_t seed = env.seed;
    // The Gumbel draw of a step is a function of (seed, step): a resumed run draws what the uninterrupted one drew.
    hooks.make_batch = [this, pad, seed](const std::vector<const Encoded*>& seqs, std::int64_t step, float lm,
                                         std::int64_t mult, bool training) {
      model_->set_noise(training ? std::optional<std::uint64_t>(seed * 1000003ull + static_cast<std::uint64_t>(step))
                                 : std::nullopt);
      return make_batch(seqs, pad, lm, mult);
    };
  }
  void detach() override { model_->set_noise(std::nullopt); }

 private:
  std::vector<float> shape() const {
    return {static_cast<float>(cfg_.chunk), static_cast<float>(cfg_.topk), static_cast<float>(cfg_.window),
            static_cast<float>(cfg_.n_lower), static_cast<float>(cfg_.n_upper), static_cast<float>(cfg_.n_enc),
            static_cast<float>(cfg_.enc_d_ff)};
  }
  bool check(const std::map<std::string, std::vector<float>>& extra) const {
    const auto it = extra.find("gca.config");
    if (it == extra.end()) return false;
    DSRSQ_INPUT_CHECK(it->second == shape(), "checkpoint: a GCA model of another shape (gca_chunk, gca_topk, "
                                             "gca_window, layers, encoder) than this run's");
    return true;
  }
  GcaConfig cfg_;
  bool from_standard_;
  std::unique_ptr<GcaModel> model_;
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<GcaKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) {
  DSRSQ_REQUIRE(c.knobs != nullptr, "gca: made without its settings");
  return std::make_unique<Gca>(c);
}

}  // namespace

const MethodInfo& gca_method() {
  static const MethodInfo info{.name = "gca",
                               .summary = "grouped cross attention (DRT): landmark per chunk, windowed self-attention, top-k chunk "
                                          "retrieval read by cross attention (trains its own model)",
                               .source = "Hu et al. 2024, arXiv 2410.01651",
                               .backbone = Backbone::own,
                               .trainable = true,
                               .knobs = &knobs,
                               .make = &make,
                               .own_architecture = true,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
