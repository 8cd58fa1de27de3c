// Level 5 (mpi): the sharded exact top-k of DSR under sequence parallelism
// (src/dist/sharded_top_k.hpp) equals the one-rank ordered top-k, indices and
// order, on 1, 2 and 4 ranks: random values, heavy ties (ties go to the lower
// index), k larger than a rank's block, k = n, k = 0, n smaller than the rank count.
#define BOOST_TEST_MODULE dsrsq_mpi_topk
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <vector>

#include "core/rng.hpp"
#include "dist/grid.hpp"
#include "dist/sharded_top_k.hpp"
#include "retrieval/dsr_policy.hpp"

namespace dd = dsrsq::dist;

BOOST_AUTO_TEST_CASE(equals_one_rank_top_k) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  dd::ProcessGrid grid(MPI_COMM_WORLD, 1, world, 30.0);
  for (std::int64_t n : {1, 3, 7, 64, 1000}) {
    for (int ties : {0, 1}) {
      dsrsq::Rng rng(static_cast<std::uint64_t>(n), static_cast<std::uint64_t>(ties));  // the same on every rank
      std::vector<double> v(static_cast<std::size_t>(n));
      for (auto& x : v) x = ties ? std::floor(rng.uniform() * 4) : rng.normal();
      for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, std::int64_t{5}, n / 2, n}) {
        const auto got = dd::sharded_top_k(grid.sp_comm(), v, k);
        const auto want = dsrsq::retrieval::top_k(v, k);
        BOOST_TEST(got == want, "n " << n << " k " << k << " ties " << ties);
      }
    }
  }
}
