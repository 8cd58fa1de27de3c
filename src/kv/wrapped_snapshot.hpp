#pragma once
// A subclass of EvictingPolicy with state of its own (host figures, blocks in
// its own arenas) snapshots it beside the base's snapshot: the pair is one
// KVSnapshot, restored only into the policy object that took it.
#include <memory>

#include "kv/kv_detail.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq::kvdetail {

template <class Extra>
struct WrappedSnapshot final : KVSnapshot {
  const void* owner = nullptr;
  std::unique_ptr<KVSnapshot> base;
  Extra extra;
  std::vector<BlockCopy> blocks;  // the subclass's own device blocks
  std::size_t extra_host_bytes = 0;
  std::size_t bytes() const override {
    std::size_t n = base->bytes() + extra_host_bytes;
    for (const auto& b : blocks) n += b.bytes();
    return n;
  }
};

template <class Extra>
const WrappedSnapshot<Extra>& wrapped_of(const KVSnapshot& snap, const void* owner, const char* policy) {
  const auto* s = dynamic_cast<const WrappedSnapshot<Extra>*>(&snap);
  DSRSQ_INPUT_CHECK(s != nullptr && s->owner == owner, "KV policy '", policy,
                    "': restore() of a snapshot this policy object did not take");
  return *s;
}

}  // namespace dsrsq::kvdetail
