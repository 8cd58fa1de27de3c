#include "core/tensor.hpp"

#include <sstream>

namespace dsrsq {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
  }
  return "?";
}

const char* device_name(Device d) {
  switch (d) {
    case Device::cpu: return "cpu";
    case Device::cuda: return "cuda";
    case Device::sim: return "sim";
  }
  return "?";
}

Shape::Shape(std::initializer_list<std::int64_t> dims) {
  DSRSQ_REQUIRE(dims.size() <= static_cast<std::size_t>(kMaxDims), "shape has ", dims.size(), " dims; at most ", kMaxDims);
  rank = static_cast<int>(dims.size());
  int i = 0;
  for (auto v : dims) {
    DSRSQ_REQUIRE(v >= 0, "negative dimension ", v, " in shape");
    d[static_cast<std::size_t>(i++)] = v;
  }
}

std::int64_t Shape::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= d[static_cast<std::size_t>(i)];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (rank != o.rank) return false;
  for (int i = 0; i < rank; ++i)
    if (d[static_cast<std::size_t>(i)] != o.d[static_cast<std::size_t>(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << '(';
  for (int i = 0; i < rank; ++i) os << (i ? ", " : "") << d[static_cast<std::size_t>(i)];
  os << ')';
  return os.str();
}

TensorView TensorView::reshaped(Shape s) const {
  DSRSQ_REQUIRE(s.numel() == numel(), "cannot reshape ", shape.str(), " to ", s.str());
  return TensorView(data, s, dtype, device);
}

TensorView TensorView::rows(std::int64_t begin, std::int64_t count) const {
  DSRSQ_REQUIRE(shape.rank >= 1 && begin >= 0 && count >= 0 && begin + count <= shape[0],
                "rows [", begin, ", ", begin + count, ") out of range for ", shape.str());
  Shape s = shape;
  s.d[0] = count;
  const std::int64_t row = shape[0] ? numel() / shape[0] : 0;
  return TensorView(static_cast<char*>(data) + static_cast<std::size_t>(begin * row) * dtype_size(dtype), s, dtype,
                    device);
}

std::string TensorView::str() const { return std::string(dtype_name(dtype)) + shape.str(); }

void check_present(const char* op, const char* arg, const TensorView& t) {
  if (t.data == nullptr && t.numel() != 0)
    raise_input_error(detail::cat(op, ": argument '", arg, "' is missing (null data for shape ", t.shape.str(), ")"));
}

void check_shape(const char* op, const char* arg, const TensorView& t, const Shape& expected) {
  check_present(op, arg, t);
  if (!(t.shape == expected))
    raise_input_error(detail::cat(op, ": argument '", arg, "' has shape ", t.shape.str(), ", expected ", expected.str()));
}

void check_dtype(const char* op, const char* arg, const TensorView& t, DType expected) {
  if (t.dtype != expected)
    raise_input_error(detail::cat(op, ": argument '", arg, "' has dtype ", dtype_name(t.dtype), ", expected ",
                                  dtype_name(expected)));
}

void check_same_dtype(const char* op, const char* arg, const TensorView& t, const TensorView& ref) {
  check_dtype(op, arg, t, ref.dtype);
}

}  // namespace dsrsq
