#include "dist/grid.hpp"

#include "core/error.hpp"

namespace dsrsq::dist {

void validate_grid(int dp, int sp, int world_size) {
  DSRSQ_INPUT_CHECK(dp >= 1 && sp >= 1, "--dp and --sp must be >= 1, got --dp ", dp, " --sp ", sp);
  DSRSQ_INPUT_CHECK(static_cast<long long>(dp) * sp == world_size, "process grid: --dp ", dp, " x --sp ", sp, " = ",
                    static_cast<long long>(dp) * sp, " ranks, but the job has a world size of ", world_size,
                    " (launch dp * sp ranks, or change --dp/--sp)");
}

namespace {

int world_size_of(MPI_Comm world) {
  int n = 0;
  DSRSQ_MPI_CHECK(MPI_Comm_size(world, &n));
  return n;
}

int validated_sp(MPI_Comm world, int dp, int sp) {
  validate_grid(dp, sp, world_size_of(world));
  return sp;
}

// Split `world` by color; key orders the ranks inside each new communicator.
mpi::Comm split(MPI_Comm world, int color, int key) {
  MPI_Comm out = MPI_COMM_NULL;
  DSRSQ_MPI_CHECK(MPI_Comm_split(world, color, key, &out));
  return mpi::Comm(out);
}

int rank_of(MPI_Comm world) {
  int r = 0;
  DSRSQ_MPI_CHECK(MPI_Comm_rank(world, &r));
  return r;
}

}  // namespace

ProcessGrid::ProcessGrid(MPI_Comm world, int dp, int sp, double comm_timeout)
    : world_rank_(rank_of(world)),
      world_size_(world_size_of(world)),
      dp_(dp),
      sp_(validated_sp(world, dp, sp)),
      // Same sp index -> one dp group, ordered by dp index.
      dp_handle_(split(world, world_rank_ % sp_, world_rank_ / sp_)),
      // Same dp index -> one sp group (a replica), ordered by sp index.
      sp_handle_(split(world, world_rank_ / sp_, world_rank_ % sp_)),
      world_comm_(world, "world", comm_timeout),
      dp_comm_(dp_handle_.get(), "dp", comm_timeout),
      sp_comm_(sp_handle_.get(), "sp", comm_timeout) {
  DSRSQ_REQUIRE(dp_comm_.size() == dp_ && dp_comm_.rank() == dp_rank(), "dp communicator has rank ", dp_comm_.rank(),
                " of ", dp_comm_.size(), ", expected ", dp_rank(), " of ", dp_);
  DSRSQ_REQUIRE(sp_comm_.size() == sp_ && sp_comm_.rank() == sp_rank(), "sp communicator has rank ", sp_comm_.rank(),
                " of ", sp_comm_.size(), ", expected ", sp_rank(), " of ", sp_);
}

}  // namespace dsrsq::dist
