// dsrsq: trains, evaluates and records long-context methods (see README.md).
// With no arguments it runs the debug-size main job on embedded data.
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "app/options.hpp"
#include "core/error.hpp"
#include "core/omp_wait.hpp"
#include "app/experiment.hpp"
#include "io/h5.hpp"

int main(int argc, char** argv) {
  dsrsq::ensure_passive_omp_wait(argv);  // before anything (re-executes when OMP_WAIT_POLICY is unset)
  dsrsq::h5::take_over_shutdown();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  dsrsq::set_error_context(world > 1 ? rank : -1, host);
  int rc = 0;
  try {
    dsrsq::Options opt;
    if (dsrsq::parse_options(argc, argv, opt)) rc = dsrsq::run_experiment(opt, rank, world);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "dsrsq: %s\n", e.what());
    rc = dynamic_cast<const dsrsq::RunFailed*>(&e) ? dsrsq::kExitFailed : dsrsq::kExitBadInput;
    // An error every rank sees at once (a non-finite loss): let rank 0 record
    // the failure in run.h5 and abort the job with its code first.
    if (world > 1 && rank != 0) std::this_thread::sleep_for(std::chrono::seconds(5));
    if (world > 1) MPI_Abort(MPI_COMM_WORLD, rc);
  }
  dsrsq::h5::shutdown();
  MPI_Finalize();
  return rc;
}
