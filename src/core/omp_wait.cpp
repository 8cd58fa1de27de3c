#include "core/omp_wait.hpp"

#include <unistd.h>

#include <cstdlib>

namespace dsrsq {

bool ensure_passive_omp_wait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return true;  // the caller's choice (or the re-executed process)
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return false;
  execv("/proc/self/exe", argv);  // returns only on failure
  unsetenv("OMP_WAIT_POLICY");
  return false;
}

}  // namespace dsrsq
