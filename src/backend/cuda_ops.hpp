#pragma once
// The ops the CUDA backend implements: CudaBackend::supports() and the
// simulated device's (backend/sim), which must accept exactly what CUDA
// would, both answer from here. Everything else is implemented.
#include "backend/backend.hpp"

namespace dsrsq {

inline bool cuda_implements(OpId op) {
  switch (op) {
    case OpId::sym_eigen:
    case OpId::lowrank_recon:
    case OpId::conv_project:
    case OpId::host_tasks:
      return false;
    default:
      return true;
  }
}

}  // namespace dsrsq
