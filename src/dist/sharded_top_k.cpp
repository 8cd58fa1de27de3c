#include "dist/sharded_top_k.hpp"

#include <algorithm>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dsrsq::dist {

std::vector<std::int32_t> sharded_top_k(Communicator& comm, std::span<const double> values, std::int64_t k) {
  const auto n = static_cast<std::int64_t>(values.size());
  k = std::clamp<std::int64_t>(k, 0, n);
  const std::int64_t P = comm.size(), r = comm.rank();
  const std::int64_t lo = r * n / P, hi = (r + 1) * n / P;
  auto better = [&](std::int64_t a, std::int64_t b) {
    const double va = values[static_cast<std::size_t>(a)], vb = values[static_cast<std::size_t>(b)];
    return va > vb || (va == vb && a < b);
  };
  std::vector<std::int64_t> mine(static_cast<std::size_t>(hi - lo));
  std::iota(mine.begin(), mine.end(), lo);
  const std::int64_t take = std::min<std::int64_t>(k, hi - lo);
  std::partial_sort(mine.begin(), mine.begin() + take, mine.end(), better);
  // k candidates per rank as (value, position); a short block pads with position -1.
  std::vector<double> cand(static_cast<std::size_t>(2 * k), 0.0);
  for (std::int64_t j = 0; j < k; ++j) {
    const bool real = j < take;
    cand[static_cast<std::size_t>(2 * j)] = real ? values[static_cast<std::size_t>(mine[static_cast<std::size_t>(j)])] : 0.0;
    cand[static_cast<std::size_t>(2 * j + 1)] = real ? static_cast<double>(mine[static_cast<std::size_t>(j)]) : -1.0;
  }
  std::vector<double> all(static_cast<std::size_t>(2 * k * P));
  comm.all_gather(std::span<const double>(cand), std::span<double>(all));
  std::vector<std::int64_t> pos;
  for (std::int64_t j = 0; j < k * P; ++j) {
    const double p = all[static_cast<std::size_t>(2 * j + 1)];
    if (p < 0) continue;
    const auto q = static_cast<std::int64_t>(p);
    // Every rank holds every value: check the gathered one (a rank that disagrees is a bug).
    DSRSQ_REQUIRE(q < n && all[static_cast<std::size_t>(2 * j)] == values[static_cast<std::size_t>(q)],
                  "sharded_top_k: ranks hold different values at position ", q);
    pos.push_back(q);
  }
  std::partial_sort(pos.begin(), pos.begin() + k, pos.end(), better);
  return std::vector<std::int32_t>(pos.begin(), pos.begin() + k);
}

}  // namespace dsrsq::dist
