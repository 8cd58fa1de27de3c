// "rocket_kv" (RocketKV, ALGORITHMS.md section 10; reference NVlabs/RocketKV,
// the inf_llm path): SnapKV++ at prefill keeps the prompt budget, and every
// decode step attends exactly to the top tokens of an approximate page-bound
// score (kv/rocket_kv.hpp). Training-free, on the standard checkpoint; the
// byte budget fixes what is resident (kept tokens + page bounds).
#include <memory>

#include "core/error.hpp"
#include "kv/rocket_kv.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

struct RocketKVKnobs final : MethodKnobs {
  RocketKVConfig c;

  void describe(po::options_description& d) override {
    d.add_options()
      ("rocket_kv_window", po::value(&c.window)->default_value(c.window), "RocketKV: stage-1 observation window (the reference's 32; at most N - 1 and, on small budgets, half the kept tokens, never below max(question, 8))")
      ("rocket_kv_kernel", po::value(&c.kernel)->default_value(c.kernel), "RocketKV: stage-1 max-pool kernel (odd; 0: odd(clamp(N/128, 3, 63)))");
  }
  void validate(const RunShape&) const override { c.validate(); }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["rocket_kv_window"] = std::to_string(c.window);
    kv["rocket_kv_kernel"] = std::to_string(c.kernel);
  }
  RocketKVConfig settings() const {
    c.validate();
    return c;
  }
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<RocketKVKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<SettingsPolicyMethod<RocketKVPolicy, RocketKVKnobs>>(c); }

}  // namespace

const MethodInfo& rocket_kv_method() {
  static const MethodInfo info{.name = "rocket_kv",
                               .summary = "RocketKV: SnapKV++ prompt eviction + page-bound top-k sparse decode attention, sized from --kv_budget",
                               .source = "ATSKV study (Behnam et al. 2025, NVlabs/RocketKV)",
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
