#include "kv/snapkv.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <span>

#include "core/error.hpp"
#include "kv/kv_detail.hpp"

namespace dsrsq::snapkv {

std::vector<double> pool1d(const std::vector<double>& x, std::int64_t kernel, Pool pool) {
  DSRSQ_INPUT_CHECK(kernel >= 1 && kernel % 2 == 1, "SnapKV pooling: the kernel must be odd and >= 1, got ", kernel);
  const auto n = static_cast<std::int64_t>(x.size()), half = kernel / 2;
  std::vector<double> y(x.size());
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t lo = std::max<std::int64_t>(0, j - half), hi = std::min<std::int64_t>(n - 1, j + half);
    double acc = pool == Pool::max ? -std::numeric_limits<double>::infinity() : 0.0;
    for (std::int64_t t = lo; t <= hi; ++t)
      acc = pool == Pool::max ? std::max(acc, x[static_cast<std::size_t>(t)]) : acc + x[static_cast<std::size_t>(t)];
    // avg: zero padding counted (PyTorch's avg_pool1d default, the references' call).
    y[static_cast<std::size_t>(j)] = pool == Pool::max ? acc : acc / static_cast<double>(kernel);
  }
  return y;
}

std::vector<double> window_scores(Backend& be, Arena& scratch, const TensorView& q, const TensorView& k,
                                  const TensorView& pos, std::int64_t w, std::int64_t kernel, Pool pool) {
  const std::int64_t B = q.shape[0], Tn = q.shape[1], NH = q.shape[2], HS = q.shape[3], R = B * NH;
  DSRSQ_INPUT_CHECK(w >= 1 && w < Tn, "SnapKV: observation window ", w, " must lie in [1, ", Tn, ")");
  ArenaScope scope(scratch);
  // Heads as batch rows: transpose the window queries and every key to (R, *, 1, HS).
  std::vector<std::int32_t> qi(static_cast<std::size_t>(R * w)), ki(static_cast<std::size_t>(R * Tn));
  std::vector<std::int32_t> qp(qi.size()), kp(ki.size());
  const auto* pp = pos.ptr<std::int32_t>();  // host positions (EvictingPolicy::LayerPrefill)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const std::int64_t r = b * NH + h;
      for (std::int64_t j = 0; j < Tn; ++j) {
        ki[static_cast<std::size_t>(r * Tn + j)] = static_cast<std::int32_t>((b * Tn + j) * NH + h);
        kp[static_cast<std::size_t>(r * Tn + j)] = pp[b * Tn + j];
      }
      for (std::int64_t i = 0; i < w; ++i) {
        const std::int64_t j = Tn - w + i;
        qi[static_cast<std::size_t>(r * w + i)] = static_cast<std::int32_t>((b * Tn + j) * NH + h);
        qp[static_cast<std::size_t>(r * w + i)] = pp[b * Tn + j];
      }
    }
  TensorView qidx = scratch.allocate(Shape{R * w}, DType::i32), kidx = scratch.allocate(Shape{R * Tn}, DType::i32);
  be.copy_from_host(std::as_bytes(std::span(qi)), qidx);
  be.copy_from_host(std::as_bytes(std::span(ki)), kidx);
  TensorView qt = scratch.allocate(Shape{R * w, HS}, DType::f32), kt = scratch.allocate(Shape{R * Tn, HS}, DType::f32);
  be.gather_rows(GatherRowsArgs{q.reshaped(Shape{B * Tn * NH, HS}), qidx, qt});
  be.gather_rows(GatherRowsArgs{k.reshaped(Shape{B * Tn * NH, HS}), kidx, kt});
  std::vector<double> rw(static_cast<std::size_t>(w), 1.0);
  TensorView mass = scratch.allocate(Shape{R, Tn}, DType::f64);
  be.attention_mass(AttentionMassArgs{qt.reshaped(Shape{R, w, 1, HS}), kt.reshaped(Shape{R, Tn, 1, HS}),
                                      kvdetail::op_arg(be, scratch, qp.data(), Shape{R, w}),
                                      kvdetail::op_arg(be, scratch, kp.data(), Shape{R, Tn}),
                                      kvdetail::op_arg(be, scratch, rw.data(), Shape{w}), mass, 1.0, 0.0});
  std::vector<double> all(static_cast<std::size_t>(R * Tn));
  be.copy_to_host(mass, std::as_writable_bytes(std::span(all)));
  const std::int64_t P = Tn - w;
  std::vector<double> out(static_cast<std::size_t>(R * P));
  for (std::int64_t r = 0; r < R; ++r) {
    std::vector<double> row(all.begin() + r * Tn, all.begin() + r * Tn + P);
    const std::vector<double> pooled = pool1d(row, kernel, pool);
    std::copy(pooled.begin(), pooled.end(), out.begin() + r * P);
  }
  be.count_flops(static_cast<double>(R * P * kernel));  // the pooling (host)
  return out;
}

std::vector<std::int32_t> top_in_order(const double* scores, std::int64_t size, std::int64_t n) {
  DSRSQ_INPUT_CHECK(n >= 0 && n <= size, "SnapKV: cannot keep ", n, " of ", size, " tokens");
  std::vector<std::int32_t> idx(static_cast<std::size_t>(size));
  std::iota(idx.begin(), idx.end(), 0);
  // Larger score first, ties to the lower index; NaN counts as smallest.
  auto better = [scores](std::int32_t a, std::int32_t b) {
    const double x = scores[a], y = scores[b];
    const bool xn = std::isnan(x), yn = std::isnan(y);
    if (xn != yn) return yn;
    if (!xn && x != y) return x > y;
    return a < b;
  };
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), better);
  idx.resize(static_cast<std::size_t>(n));
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<std::int32_t> keep_with_window(const double* scores, std::int64_t tn, std::int64_t w, std::int64_t keep) {
  DSRSQ_INPUT_CHECK(w >= 0 && w <= tn && keep >= w, "SnapKV: a keep of ", keep, " tokens cannot hold the window of ",
                    w, " (", tn, " tokens)");
  std::vector<std::int32_t> out;
  if (keep >= tn) {
    out.resize(static_cast<std::size_t>(tn));
    std::iota(out.begin(), out.end(), 0);
    return out;
  }
  out = top_in_order(scores, tn - w, keep - w);
  for (std::int64_t j = tn - w; j < tn; ++j) out.push_back(static_cast<std::int32_t>(j));
  return out;
}

std::int64_t default_window(std::int64_t query_len, std::int64_t tn) {
  return std::max<std::int64_t>(1, std::min<std::int64_t>(std::max<std::int64_t>(query_len, 8), tn - 1));
}

}  // namespace dsrsq::snapkv
