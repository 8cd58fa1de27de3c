#include "core/arena.hpp"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string>

namespace dsrsq {
namespace {
constexpr std::size_t kAlign = 64;
std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class HostAllocator final : public Allocator {
 public:
  void* allocate(std::size_t bytes) override {
    void* p = std::aligned_alloc(kAlign, round_up(bytes ? bytes : 1));
    if (!p) throw std::bad_alloc();
    return p;
  }
  void deallocate(void* p) noexcept override { std::free(p); }
  Device device() const override { return Device::cpu; }
};

std::size_t read_status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t klen = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, klen, key) == 0) return std::stoull(line.substr(klen + 1)) * 1024;
  return 0;
}
}  // namespace

Allocator& host_allocator() {
  static HostAllocator a;
  return a;
}

Arena::Arena(std::string name, std::size_t chunk_bytes, Allocator& alloc)
    : name_(std::move(name)), chunk_bytes_(chunk_bytes), alloc_(&alloc) {}

Arena::Arena(Arena&& o) noexcept
    : name_(std::move(o.name_)), chunk_bytes_(o.chunk_bytes_), alloc_(o.alloc_), chunks_(std::move(o.chunks_)),
      cur_(o.cur_), used_(o.used_), peak_(o.peak_), reserved_(o.reserved_) {
  o.chunks_.clear();
  o.cur_ = o.used_ = o.peak_ = o.reserved_ = 0;
}

Arena::~Arena() {
  for (auto& c : chunks_) alloc_->deallocate(c.ptr);
}

void* Arena::allocate_bytes(std::size_t bytes) {
  const std::size_t need = round_up(bytes ? bytes : 1);
  while (cur_ < chunks_.size()) {
    Chunk& c = chunks_[cur_];
    if (c.size - c.used >= need) {
      void* p = c.ptr + c.used;
      c.used += need;
      used_ += need;
      if (used_ > peak_) peak_ = used_;
      return p;
    }
    // The rest of this chunk stays unused until a rewind: count it, so the
    // high-water mark never understates what the arena holds back.
    used_ += c.size - c.used;
    c.used = c.size;
    if (cur_ + 1 < chunks_.size()) ++cur_;
    else break;
  }
  const std::size_t size = need > chunk_bytes_ ? need : chunk_bytes_;
  void* raw = nullptr;
  try {
    raw = alloc_->allocate(size);
  } catch (const std::bad_alloc&) {
    raise_input_error(detail::cat("arena '", name_, "': out of memory allocating ", size, " bytes (", used_,
                                  " bytes in use)"));
  }
  chunks_.push_back(Chunk{static_cast<std::byte*>(raw), size, need});
  cur_ = chunks_.size() - 1;
  reserved_ += size;
  used_ += need;
  if (used_ > peak_) peak_ = used_;
  return raw;
}

TensorView Arena::allocate(Shape shape, DType dtype) {
  const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  return TensorView(allocate_bytes(bytes), shape, dtype, alloc_->device());
}

TensorView Arena::zeros(Shape shape, DType dtype) {
  TensorView t = allocate(shape, dtype);
  DSRSQ_REQUIRE(alloc_->device() == Device::cpu, "Arena::zeros on a device arena: use the backend's fill");
  std::memset(t.data, 0, t.bytes());
  return t;
}

void Arena::rewind(const Mark& m) {
  DSRSQ_REQUIRE(m.used <= used_, "arena '", name_, "': rewind to a later mark");
  for (std::size_t i = m.chunk + 1; i < chunks_.size(); ++i) chunks_[i].used = 0;
  if (m.chunk < chunks_.size()) chunks_[m.chunk].used = m.offset;
  cur_ = m.chunk;
  used_ = m.used;
}

std::size_t peak_rss_bytes() { return read_status_kb("VmHWM:"); }
std::size_t current_rss_bytes() { return read_status_kb("VmRSS:"); }

}  // namespace dsrsq
