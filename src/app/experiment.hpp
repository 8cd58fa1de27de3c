#pragma once
// The experiment driver behind `dsrsq train|eval|run`: resolve the run
// directory (run identity), build data, train (or resume), evaluate every
// requested method at the same KV budget, write the results file, print the
// task and efficiency tables.
#include "app/options.hpp"

namespace dsrsq {

// Returns the process exit code.
int run_experiment(const Options& opt, int world_rank, int world_size);

}  // namespace dsrsq
