#pragma once
// Move-only RAII owner of a C handle. Traits give the handle type, its null
// value and the destroy call; destructors never throw.
#include <utility>

namespace dsrsq {

template <class Traits>
class Handle {
 public:
  using type = typename Traits::type;
  Handle() = default;
  explicit Handle(type h) : h_(h) {}
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, Traits::null)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) reset(std::exchange(o.h_, Traits::null));
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  void reset(type h = Traits::null) noexcept {
    if (h_ != Traits::null) Traits::destroy(h_);
    h_ = h;
  }
  type get() const noexcept { return h_; }
  type release() noexcept { return std::exchange(h_, Traits::null); }
  explicit operator bool() const noexcept { return h_ != Traits::null; }

 private:
  type h_ = Traits::null;
};

}  // namespace dsrsq
