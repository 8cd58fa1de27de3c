#pragma once
// Arena: one per purpose (parameters, gradients, optimizer state, activations,
// KV cache, scratch). Bump allocation from large chunks, 64-byte aligned;
// mark/rewind for scoped scratch. The high-water mark (peak_bytes) is the
// memory figure we report, next to the process's peak RSS.
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dsrsq {

// Where an arena's chunks come from (host memory, device memory).
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* p) noexcept = 0;
  virtual Device device() const = 0;
};
Allocator& host_allocator();

class Arena {
 public:
  struct Mark {
    std::size_t chunk = 0, offset = 0, used = 0;
  };

  explicit Arena(std::string name, std::size_t chunk_bytes = std::size_t{64} << 20,
                 Allocator& alloc = host_allocator());
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&&) noexcept;
  Arena& operator=(Arena&&) = delete;

  void* allocate_bytes(std::size_t bytes);
  TensorView allocate(Shape shape, DType dtype);  // uninitialised
  TensorView zeros(Shape shape, DType dtype);

  Mark mark() const { return {cur_, cur_ < chunks_.size() ? chunks_[cur_].used : 0, used_}; }
  void rewind(const Mark& m);
  void reset() { rewind(Mark{}); }

  const std::string& name() const { return name_; }
  std::size_t used_bytes() const { return used_; }
  std::size_t peak_bytes() const { return peak_; }
  std::size_t reserved_bytes() const { return reserved_; }
  void reset_peak() { peak_ = used_; }
  Device device() const { return alloc_->device(); }

 private:
  struct Chunk {
    std::byte* ptr = nullptr;
    std::size_t size = 0, used = 0;
  };
  std::string name_;
  std::size_t chunk_bytes_;
  Allocator* alloc_;
  std::vector<Chunk> chunks_;
  std::size_t cur_ = 0;
  std::size_t used_ = 0, peak_ = 0, reserved_ = 0;
};

// Scoped rewind: scratch allocated inside the scope is released at its end.
class ArenaScope {
 public:
  explicit ArenaScope(Arena& a) : a_(a), m_(a.mark()) {}
  ~ArenaScope() { a_.rewind(m_); }
  ArenaScope(const ArenaScope&) = delete;
  ArenaScope& operator=(const ArenaScope&) = delete;

 private:
  Arena& a_;
  Arena::Mark m_;
};

// Peak resident set size of this process (VmHWM), bytes; 0 if unknown.
std::size_t peak_rss_bytes();
std::size_t current_rss_bytes();

}  // namespace dsrsq
