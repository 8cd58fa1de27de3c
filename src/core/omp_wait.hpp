#pragma once
// The engine's OpenMP wait policy. libgomp reads OMP_WAIT_POLICY (and
// GOMP_SPINCOUNT) once, in a constructor that runs when libgomp is loaded,
// before main(); there is no API to change it afterwards. Its default spins
// for up to ~300000 iterations after each parallel region before sleeping, so
// on a loaded machine a team thread that lost its core burns the other
// threads' time: code with many small parallel regions (RCKV, SQA) ran 10-25x
// slower on 2 threads than on 1. PASSIVE makes waiting threads sleep at once.
//
// ensure_passive_omp_wait(argv), called first thing in main(): when the
// caller's environment does not choose a policy (OMP_WAIT_POLICY unset), it
// sets OMP_WAIT_POLICY=PASSIVE and re-executes the program (/proc/self/exe,
// same argv and environment otherwise), so the runtime starts with it. A
// policy the caller did set is kept as is (ACTIVE can win on an idle machine
// with dedicated cores). If the re-exec fails the program goes on unchanged
// (returns false); nothing else is touched, so it is safe before MPI_Init.
namespace dsrsq {

bool ensure_passive_omp_wait(char** argv);

}  // namespace dsrsq
