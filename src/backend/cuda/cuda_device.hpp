#pragma once
// CUDA device discovery and the check macro. "No GPU" (no device, or no driver:
// cudaErrorInsufficientDriver / cudaErrorNoDevice) is a normal answer, not an error.
#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"

#define DSRSQ_CUDA_CHECK(expr)                                                                    \
  do {                                                                                            \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess)                                               \
      ::dsrsq::raise_error("CUDA", cudaGetErrorString(e_), #expr, __FILE__, __LINE__);            \
  } while (0)

namespace dsrsq::cuda {

// Number of usable devices; 0 when there is no GPU or no driver. `why` says which.
int device_count(std::string* why = nullptr);
std::string device_name(int device);
std::string runtime_version();

void axpy(const float* x, float* y, float alpha, long long n, cudaStream_t stream);

}  // namespace dsrsq::cuda
