#pragma once
// The experiment driver behind `dsrsq train|eval|run`: resolve the run
// directory (run identity), build data, train (or resume), evaluate every
// requested method at the same KV budget, write the results file, print the
// task and efficiency tables.
#include "app/options.hpp"
#include "core/error.hpp"

namespace dsrsq {

// Process exit codes (also printed at the end of --help).
inline constexpr int kExitDone = 0;
inline constexpr int kExitFailed = 1;     // the run started and failed (recorded in run.h5), or a method failed
inline constexpr int kExitBadInput = 2;   // bad input or refused before anything ran; nothing was written
inline constexpr int kExitStopped = 3;    // stopped by a signal, --stop_after or --max_walltime: rerun to resume

// An error after the run directory exists; run.h5 already says "failed".
class RunFailed : public Error {
 public:
  using Error::Error;
};

// Returns the process exit code.
int run_experiment(const Options& opt, int world_rank, int world_size);

}  // namespace dsrsq
