// Fault injection for the launch-level tests (run_fault.py): a 2-rank job in
// which rank 1 misbehaves while rank 0 waits in an all-reduce.
//   stall: rank 1 sleeps 90 s and never joins; rank 0's wait times out after
//          --timeout seconds, throws, and main() calls MPI_Abort.
//   throw: rank 1 throws before the collective; its main() prints and calls
//          MPI_Abort (rank 0 waits with the default, long timeout).
//   exit:  rank 1 dies without MPI_Finalize (std::_Exit, as a crash would);
//          the launcher must take the job down.
// Usage: mpi_fault <stall|throw|exit> [timeout_seconds]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.hpp"
#include "dist/mpi.hpp"

int main(int argc, char** argv) {
  dsrsq::mpi::Environment env(argc, argv);
  try {
    const std::string mode = argc > 1 ? argv[1] : "stall";
    const double timeout = argc > 2 ? std::atof(argv[2]) : 3.0;
    dsrsq::dist::MpiCommunicator world(MPI_COMM_WORLD, "world",
                                       mode == "stall" ? timeout : dsrsq::dist::MpiCommunicator::kDefaultTimeout);
    dsrsq::dist::comm_self_test(world);  // both ranks are up and talking
    if (env.rank() == 1) {
      if (mode == "stall") std::this_thread::sleep_for(std::chrono::seconds(90));
      if (mode == "throw") throw std::runtime_error("injected fault on rank 1 before the all-reduce");
      if (mode == "exit") std::_Exit(3);
    }
    std::vector<float> x(1024, 1.0f);
    world.all_reduce_sum(std::span<float>(x));
    std::printf("rank %d: all-reduce completed (unexpected in a fault test)\n", env.rank());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "mpi_fault: rank %d: %s\n", env.rank(), e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return 0;
}
