// "standard" (the paper's baseline) and "full" (the ATSKV study's name for the
// same thing): the standard transformer reading the whole prompt, every
// token's K and V kept from prefill into decoding. `--model standard` trains
// it; `full` evaluates the trained standard checkpoint. A full cache cannot
// shrink: it records the budget it was asked for, holds the whole cache and
// reports the cell as infeasible below a budget of the full cache.
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<KVPolicyMethod>(c, "full"); }

}  // namespace

const MethodInfo& standard_method() {
  static const MethodInfo info{.name = "standard",
                               .summary = "the standard transformer, full KV cache (trains the standard backbone)",
                               .source = "DSRSQ paper",
                               .trainable = true,
                               .make = &make,
                               .device_ready = true};
  return info;
}

const MethodInfo& full_method() {
  static const MethodInfo info{.name = "full",
                               .summary = "full KV cache on the standard checkpoint",
                               .source = "ATSKV study",
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
