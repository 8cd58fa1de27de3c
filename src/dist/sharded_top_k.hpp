#pragma once
// Exact top-k over values that every rank of `comm` holds, computed sharded
// (DESIGN.md section 5, "DSR under sp"): rank r takes its contiguous block
// [r n / P, (r + 1) n / P) of the n values, proposes its local top-k as
// (value, position) candidates, one all-gather collects the P x k candidates,
// and every rank merges them into the global top-k. The global top-k is a
// subset of the union of the local top-k's, so the result is exact: the same
// indices, in the same order (value descending, ties to the lower index), as
// a top-k over all n values on one rank. Collective: every rank calls it with
// the same n and k.
#include <cstdint>
#include <span>
#include <vector>

#include "dist/communicator.hpp"

namespace dsrsq::dist {

std::vector<std::int32_t> sharded_top_k(Communicator& comm, std::span<const double> values, std::int64_t k);

}  // namespace dsrsq::dist
