#pragma once
// Tensor is a non-owning view: pointer, shape (up to 4 dims, row-major,
// contiguous), dtype and device. Memory is owned by an Arena (or a Buffer).
// Dimension letters used in op comments: B batch, T query tokens, S key tokens,
// NH heads, HS head size, C channels, V vocabulary, N = B*T rows.
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/error.hpp"

namespace dsrsq {

enum class DType : std::uint8_t { f32, f64, i32 };
// sim: host memory behind the device boundary (backend/sim): every host read
// of a sim tensor fails as it would on a GPU, for checking device paths on a
// machine without one.
enum class Device : std::uint8_t { cpu, cuda, sim };

constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i32: return 4;
  }
  return 0;
}
const char* dtype_name(DType t);
const char* device_name(Device d);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<std::int32_t>() { return DType::i32; }

struct Shape {
  static constexpr int kMaxDims = 4;
  std::array<std::int64_t, kMaxDims> d{1, 1, 1, 1};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims);
  std::int64_t operator[](int i) const { return d[static_cast<std::size_t>(i)]; }
  std::int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "(4, 1024, 256)"
};

struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::f32;
  Device device = Device::cpu;

  TensorView() = default;
  TensorView(void* p, Shape s, DType t, Device dev = Device::cpu) : data(p), shape(s), dtype(t), device(dev) {}
  template <class T>
  TensorView(T* p, Shape s, Device dev = Device::cpu) : data(const_cast<std::remove_const_t<T>*>(p)), shape(s), dtype(dtype_of<std::remove_const_t<T>>()), device(dev) {}

  bool empty() const { return data == nullptr; }
  std::int64_t numel() const { return shape.numel(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  std::int64_t dim(int i) const { return shape[i]; }
  // Host access: the typed pointer, for code running on the host. Raises
  // dsrsq::Error when the view lives on a device (a CUDA tensor read on the
  // host would read garbage or crash far from the cause) or the dtype differs.
  template <class T>
  T* ptr() const {
    DSRSQ_REQUIRE(device == Device::cpu, "host access to a tensor on device ", device_name(device), " (", str(),
                  "): copy it with Backend::copy_to_host first");
    DSRSQ_REQUIRE(dtype == dtype_of<T>(), "tensor dtype is ", dtype_name(dtype), ", asked for ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  // Device access, for a backend's own kernels only: the typed pointer
  // whatever the device (never dereference it on the host unless device is cpu).
  template <class T>
  T* device_ptr() const {
    DSRSQ_REQUIRE(dtype == dtype_of<T>(), "tensor dtype is ", dtype_name(dtype), ", asked for ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  // View of the same memory with another shape of equal element count.
  TensorView reshaped(Shape s) const;
  // Rows [begin, begin + count) along dim 0.
  TensorView rows(std::int64_t begin, std::int64_t count) const;
  std::string str() const;  // "f32(4, 1024, 256)"
};

// Shape checks at op boundaries: name the op, the argument and both shapes.
void check_shape(const char* op, const char* arg, const TensorView& t, const Shape& expected);
void check_dtype(const char* op, const char* arg, const TensorView& t, DType expected);
void check_same_dtype(const char* op, const char* arg, const TensorView& t, const TensorView& ref);
void check_present(const char* op, const char* arg, const TensorView& t);

}  // namespace dsrsq
