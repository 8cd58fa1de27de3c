// "sliding_window" (StreamingLLM, ALGORITHMS.md section 8): attention sinks
// plus a window of the most recent tokens, sized from the KV budget, with
// positions inside the cache. Training-free, on the standard checkpoint.
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

class SlidingWindow final : public Method {
 public:
  explicit SlidingWindow(const MethodContext& c) : mc_(c.model.config()), be_(c.backend) {}
  EvalPlan plan(const std::string&) override {
    EvalPlan p;
    p.policy = make_kv_policy(KVPolicySpec{"window"}, mc_, be_);
    return p;
  }

 private:
  ModelConfig mc_;
  Backend& be_;
};

std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<SlidingWindow>(c); }

}  // namespace

const MethodInfo& sliding_window_method() {
  static const MethodInfo info{"sliding_window", "attention sinks + recent window (StreamingLLM), sized from --kv_budget",
                               "ATSKV study", Backbone::standard, false, {}, true, {}, nullptr, &make};
  return info;
}

}  // namespace dsrsq::methods
