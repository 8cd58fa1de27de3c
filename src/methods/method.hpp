#pragma once
// A method is one registry entry (DESIGN.md section 4): a name, a line for
// --help, its own knobs, and a factory. It composes parts that live once
// elsewhere: a context selector (which prompt tokens enter the model), a KV
// policy (kv/: what the cache keeps from prefill into decoding) and, for a
// trained method, a training extension (extra modules, loss terms, checkpoint
// state). The table (methods/registry.cpp, all_methods()) is explicit: no
// self-registration, which static libraries drop. Option validation, --help,
// the --dry-run plan, the experiment loop and the report's method order all
// come from it; a method's name appears as a string only in its own file.
//
// Adding a method: one file in src/methods/ defining `const MethodInfo&
// <name>_method()` and one line in registry.cpp's table.
#include <boost/program_options/options_description.hpp>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.hpp"
#include "dist/communicator.hpp"
#include "eval/context_selector.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"
#include "train/optimizer.hpp"
#include "train/trainer.hpp"

namespace dsrsq::methods {

namespace po = boost::program_options;

// What a method's knobs are checked against (the run's shape; no Options).
struct RunShape {
  std::int64_t d_model = 0, n_heads = 0, n_layers = 0, max_seq_len = 0;
  bool init_from = false;  // --init_from names a checkpoint
};

// A method's own settings: bound to options under the method's heading in
// --help and settable in .ini files like every option. One object per run,
// shared by every copy of the run's options.
class MethodKnobs {
 public:
  virtual ~MethodKnobs() = default;
  // Adds the options, bound to this object's fields, to `d`.
  virtual void describe(po::options_description& d) = 0;
  // Input errors name the option (called for the methods a run uses).
  virtual void validate(const RunShape& shape) const {}
  // Resolved "key = value" entries: part of the run's identity when the run uses the method.
  virtual void resolved(std::map<std::string, std::string>& kv) const {}
};

// One evaluation of a method (or of one of its variants).
struct EvalPlan {
  std::unique_ptr<KVPolicy> policy;
  // Prompt indices that enter the model and, optionally, the positions they
  // take (eval/context_selector.hpp). Null: the whole prompt.
  ContextSelector select;
  // A method with an architecture of its own (GCA) runs its own model: tokens
  // (1, n) at positions (1, n) -> their logits (n, V), after policy->begin();
  // the policy then only reports its memory. Null: the backbone runs through the policy.
  std::function<TensorView(TensorView tokens, TensorView pos)> extend;
  // With extend: that model's activation memory, counted as the backbone's
  // activation arena is (reset_activation_peak starts a new high-water mark,
  // activation_peak_bytes reads it). Null: none beside the backbone's.
  std::function<void()> reset_activation_peak;
  std::function<std::size_t()> activation_peak_bytes;
};

// Where a trained method plugs into the trainer and the checkpoints.
struct TrainEnv {
  dist::Communicator* world = nullptr;    // null: one process
  dist::Communicator* sp_comm = nullptr;  // null: sp = 1
  bool sp_lead = true;                    // this rank computes per-sequence terms (sp rank 0)
  bool attention_taken = false;           // the model's attention override is already set (ring attention)
  double global_batch = 1;                // sequences per step over all ranks
  std::uint64_t seed = 0;
  std::int32_t pad_id = 0;
  std::function<double(std::int64_t step)> lr_at;  // the scheduled learning rate of a step
};

class TrainingExtension {
 public:
  virtual ~TrainingExtension() = default;
  // Checkpoint state beside the backbone's (parameters, optimizer state, exact bits).
  virtual void save(std::map<std::string, std::vector<float>>& extra) const = 0;
  // Resume from a checkpoint of this run: false when it holds none of this method's state.
  virtual bool restore(const std::map<std::string, std::vector<float>>& extra) = 0;
  // --init_from: parameters only; false when the checkpoint has none of them.
  virtual bool load_params(const std::map<std::string, std::vector<float>>& extra) = 0;
  // A fresh start with no state of this method: data-dependent initialisation.
  virtual void init_from_data(const std::vector<const Encoded*>& calib, std::int32_t pad_id) {}
  // A method with an architecture of its own whose setting asks it to start
  // what it shares with the standard model from the --init_from standard
  // checkpoint: true, and at a fresh start (no state of this method loaded)
  // the run calls start_from_standard with that model.
  virtual bool starts_from_standard() const { return false; }
  virtual void start_from_standard(Transformer& standard) {}
  // Every rank takes rank 0's state.
  virtual void broadcast(dist::Communicator& world, int root) = 0;
  // Installs hooks and model overrides for training; detach() removes them.
  virtual void attach(MethodHooks& hooks, const TrainEnv& env) = 0;
  virtual void detach() = 0;
};

class Method {
 public:
  virtual ~Method() = default;
  virtual TrainingExtension* training() { return nullptr; }
  // A method with an architecture of its own (MethodInfo::own_architecture):
  // the model the run trains, checkpoints and evaluates in place of the
  // standard Transformer. Null: the method runs on the Transformer.
  virtual TrainableModel* own_model() { return nullptr; }
  // variant "": the method itself; else one of MethodInfo::variants.
  virtual EvalPlan plan(const std::string& variant) = 0;
};

// Which weights a method runs on (DESIGN.md section 9, "Backbones").
enum class Backbone {
  standard,  // the trained standard checkpoint (every training-free method)
  own,       // its own trained weights (DSRSQ, GCA, the ATSKV predictor)
};

struct MethodContext {
  Transformer& model;          // the backbone the method runs on
  Backend& backend;
  const MethodKnobs* knobs;    // its own (null when it has none)
  AdamWConfig adam;            // hyper-parameters for extra parameters
  std::uint64_t seed = 0;
};

// A training-free method that is one KV-policy kind over the whole prompt
// (full, sliding_window): no selector, no training.
class KVPolicyMethod final : public Method {
 public:
  KVPolicyMethod(const MethodContext& c, std::string kind)
      : mc_(c.model.config()), be_(c.backend), kind_(std::move(kind)) {}
  EvalPlan plan(const std::string&) override;

 private:
  ModelConfig mc_;
  Backend& be_;
  std::string kind_;
};

// A training-free method that is one KV policy built from its knobs'
// settings (pyramid, dynamic_kv, rocket_kv): Knobs::settings() (validated)
// gives what Policy(model config, backend, settings) takes.
template <class Policy, class Knobs>
class SettingsPolicyMethod final : public Method {
 public:
  explicit SettingsPolicyMethod(const MethodContext& c)
      : mc_(c.model.config()), be_(c.backend),
        s_(c.knobs ? static_cast<const Knobs*>(c.knobs)->settings() : Knobs{}.settings()) {}
  EvalPlan plan(const std::string&) override {
    EvalPlan p;
    p.policy = std::make_unique<Policy>(mc_, be_, s_);
    return p;
  }

 private:
  ModelConfig mc_;
  Backend& be_;
  decltype(std::declval<const Knobs&>().settings()) s_;
};

// A number with 17 significant digits (it round-trips exactly): knob values in
// the run's identity, figures in meta.
std::string exact_str(double v);

struct MethodInfo {
  std::string_view name;
  std::string_view summary;    // one line for --help and --dry-run
  std::string_view source;     // where it comes from (paper, study), for --help
  Backbone backbone = Backbone::standard;
  bool trainable = false;      // --model accepts it: the run trains it
  std::vector<std::string> variants{};  // ablation variants (--ablation)
  // Runs under the query-agnostic protocol (--protocol context_only); if not, why.
  bool query_agnostic = true;
  std::string_view needs_question{};
  std::shared_ptr<MethodKnobs> (*knobs)() = nullptr;  // its settings; null: none
  std::unique_ptr<Method> (*make)(const MethodContext&) = nullptr;
  // Its own architecture, not the standard Transformer (GCA): it decodes
  // through EvalPlan::extend, and at a full budget it is NOT the full cache
  // of the standard model (the registry's identity check exempts it).
  bool own_architecture = false;
  // Its training and evaluation read no device tensor on the host: checked on
  // the simulated device (--device sim, tests/e2e/test_device_sim.py), so
  // --device cuda and --device sim accept it (single rank). False: still
  // refused there, by name.
  bool device_ready = false;
  // Not device-ready: what stands in the way, beyond host reads (for the
  // refusal message). Empty: nothing more to say.
  std::string_view device_note{};
};

// The table, in report order.
const std::vector<const MethodInfo*>& all_methods();
// The entry named `name`; an input error listing the table otherwise.
// `option` names the option being checked (for the message).
const MethodInfo& find_method(std::string_view name, std::string_view option = "--methods");
// The table's names, comma-separated (for messages and --help).
std::string method_names(bool trainable_only = false);
// The device-ready methods' names, comma-separated.
std::string device_ready_names();

}  // namespace dsrsq::methods
