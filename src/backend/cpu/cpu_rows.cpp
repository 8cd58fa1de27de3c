// Gather rows / scatter-add rows (forward and backward side by side), host
// copies and host tasks. Shapes and rules: backend/backend.hpp.
//   gather:      dst(M,C) = src[idx[m]]                     (overwrite)
//   scatter_add: dst[idx[m]] += src(M,C), rows in order m    (accumulate)
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"

namespace dsrsq::cpu {

void CpuBackend::gather_rows_impl(const GatherRowsArgs& a) {
  const std::int64_t M = a.dst.shape[0], C = a.dst.shape[1];
  const std::size_t row = static_cast<std::size_t>(C) * dtype_size(a.src.dtype);
  const auto* idx = a.idx.ptr<std::int32_t>();
  const auto* src = static_cast<const std::byte*>(a.src.data);
  auto* dst = static_cast<std::byte*>(a.dst.data);
  // A copy: no arithmetic, so threads cannot change the result.
#pragma omp parallel for schedule(static) if (M * C > kParallelMin)
  for (std::int64_t m = 0; m < M; ++m)
    std::memcpy(dst + static_cast<std::size_t>(m) * row, src + static_cast<std::size_t>(idx[m]) * row, row);
}

namespace {
template <class T>
void scatter_add_t(const ScatterAddRowsArgs& a) {
  const std::int64_t M = a.src.shape[0], C = a.src.shape[1];
  const auto* idx = a.idx.ptr<std::int32_t>();
  const T* src = a.src.ptr<T>();
  T* dst = a.dst.ptr<T>();
  // Columns split over threads, rows in order: every dst element receives its
  // terms in the order m = 0..M-1 whatever the thread count.
#pragma omp parallel for schedule(static) if (M * C > kParallelMin)
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t m = 0; m < M; ++m) dst[idx[m] * C + c] += src[m * C + c];
}
}  // namespace

void CpuBackend::scatter_add_rows_impl(const ScatterAddRowsArgs& a) {
  dispatch_float(a.src.dtype, [&](auto t) { scatter_add_t<decltype(t)>(a); });
}

void CpuBackend::copy_to_host_impl(TensorView src, std::span<std::byte> dst) {
  std::memcpy(dst.data(), src.data, dst.size());
}
void CpuBackend::copy_from_host_impl(std::span<const std::byte> src, TensorView dst) {
  std::memcpy(dst.data, src.data(), src.size());
}

void CpuBackend::host_tasks_impl(std::int64_t n, const std::function<void(std::int64_t)>& fn) {
  // One task per index, dynamically scheduled (tasks differ in cost); a single
  // task runs on the caller's thread without waking a team.
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (std::int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace dsrsq::cpu
