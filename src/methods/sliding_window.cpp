// "sliding_window" (StreamingLLM, ALGORITHMS.md section 8): attention sinks
// plus a window of the most recent tokens, sized from the KV budget, with
// positions inside the cache (KV policy kind "window"). Training-free, on the
// standard checkpoint.
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<KVPolicyMethod>(c, "window"); }

}  // namespace

const MethodInfo& sliding_window_method() {
  static const MethodInfo info{.name = "sliding_window",
                               .summary = "attention sinks + recent window (StreamingLLM), sized from --kv_budget",
                               .source = "ATSKV study",
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
