#pragma once
// The process grid (DESIGN.md section 5): world = dp x sp.
//   dp index = world rank / sp,  sp index = world rank % sp,
// so the sp ranks of one data-parallel replica are neighbours (consecutive
// world ranks, usually on one node) and a dp group strides by sp.
// The dp communicator joins the ranks with the same sp index (gradient
// all-reduce); the sp communicator joins the ranks of one replica (ring
// attention). Both are split from the parent with MPI_Comm_split and owned by
// mpi::Comm; the parent (normally MPI_COMM_WORLD) is never freed.
#include <mpi.h>

#include "dist/communicator.hpp"
#include "dist/mpi.hpp"

namespace dsrsq::dist {

class ProcessGrid {
 public:
  // Throws dsrsq::Error (an input error naming --dp, --sp and the world size)
  // unless dp >= 1, sp >= 1 and dp * sp equals the size of `world`.
  // Collective over `world`: every rank must construct it with the same dp, sp.
  ProcessGrid(MPI_Comm world, int dp, int sp, double comm_timeout = MpiCommunicator::kDefaultTimeout);
  ProcessGrid(const ProcessGrid&) = delete;
  ProcessGrid& operator=(const ProcessGrid&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  int dp() const { return dp_; }
  int sp() const { return sp_; }
  int dp_rank() const { return world_rank_ / sp_; }
  int sp_rank() const { return world_rank_ % sp_; }

  MpiCommunicator& world() { return world_comm_; }
  MpiCommunicator& dp_comm() { return dp_comm_; }
  MpiCommunicator& sp_comm() { return sp_comm_; }

 private:
  int world_rank_ = 0, world_size_ = 1, dp_ = 1, sp_ = 1;
  mpi::Comm dp_handle_, sp_handle_;  // declared before the communicators that use them
  MpiCommunicator world_comm_, dp_comm_, sp_comm_;
};

// Validates a (dp, sp) request against a world size without MPI (the CLI can
// call it before building the grid). Throws an input error naming --dp/--sp.
void validate_grid(int dp, int sp, int world_size);

}  // namespace dsrsq::dist
