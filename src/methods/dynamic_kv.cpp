// "dynamic_kv" (DynamicKV, ALGORITHMS.md section 9; reference DreamMr/DynamicKV):
// SnapKV window scores, large per-layer candidate sets and a cross-layer
// top-k that reallocates the layers' shares every few layers and at the last
// (kv/dynamic_kv.hpp). Training-free, on the standard checkpoint, sized from
// --kv_budget.
#include <memory>
#include <sstream>

#include "core/error.hpp"
#include "kv/dynamic_kv.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

struct DynamicKVKnobs final : MethodKnobs {
  DynamicKVConfig c;
  std::string pool = "avg";

  void describe(po::options_description& d) override {
    d.add_options()
      ("dynamic_kv_window", po::value(&c.window)->default_value(c.window), "DynamicKV: observation window (0: max(question length, 8); the reference scripts use 8)")
      ("dynamic_kv_kernel", po::value(&c.kernel)->default_value(c.kernel), "DynamicKV: pooling kernel of the window scores (odd)")
      ("dynamic_kv_pool", po::value(&pool)->default_value(pool), "DynamicKV: pooling of the window scores, avg (Llama runs) or max (Mistral, Qwen2 runs)")
      ("dynamic_kv_r_max", po::value(&c.r_max)->default_value(c.r_max, "10"), "DynamicKV: candidates per layer before reallocation, r_max * (C - w)")
      ("dynamic_kv_interval", po::value(&c.interval)->default_value(c.interval), "DynamicKV: layers between cross-layer reallocations (the last layer always reallocates)");
  }
  void validate(const RunShape&) const override {
    DSRSQ_INPUT_CHECK(pool == "avg" || pool == "max", "option --dynamic_kv_pool: avg or max, got '", pool, "'");
    c.validate();
  }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["dynamic_kv_window"] = std::to_string(c.window);
    kv["dynamic_kv_kernel"] = std::to_string(c.kernel);
    kv["dynamic_kv_pool"] = pool;
    kv["dynamic_kv_r_max"] = exact_str(c.r_max);
    kv["dynamic_kv_interval"] = std::to_string(c.interval);
  }
  DynamicKVConfig settings() const {
    validate(RunShape{});
    DynamicKVConfig out = c;
    out.pool = pool == "max" ? snapkv::Pool::max : snapkv::Pool::avg;
    return out;
  }
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<DynamicKVKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<SettingsPolicyMethod<DynamicKVPolicy, DynamicKVKnobs>>(c); }

}  // namespace

const MethodInfo& dynamic_kv_method() {
  static const MethodInfo info{.name = "dynamic_kv",
                               .summary = "DynamicKV: SnapKV scores, per-layer shares reallocated by a cross-layer top-k, sized from --kv_budget",
                               .source = "ATSKV study (Zhou et al. 2024, DreamMr/DynamicKV)",
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
