// The CUDA axpy kernel against the CPU backend's axpy on odd sizes. Skipped
// (exit 77, reason printed) when no GPU is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cuda/cuda_device.hpp"
#include "core/rng.hpp"

int main() {
  std::string why;
  if (dsrsq::cuda::device_count(&why) == 0) {
    std::printf("SKIP test_gpu_axpy: %s\n", why.c_str());
    return 77;
  }
  std::printf("device 0: %s (CUDA runtime %s)\n", dsrsq::cuda::device_name(0).c_str(),
              dsrsq::cuda::runtime_version().c_str());
  int failed = 0;
  for (long long n : {1LL, 3LL, 113LL, 1023LL, 1024LL, 1025LL, 1000003LL}) {
    dsrsq::Rng rng(1234, static_cast<std::uint64_t>(n));
    std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
    for (auto& v : x) v = static_cast<float>(rng.normal());
    for (auto& v : y) v = static_cast<float>(rng.normal());
    std::vector<float> ref = y;
    dsrsq::cpu_backend().axpy(dsrsq::AxpyArgs{dsrsq::TensorView(x.data(), dsrsq::Shape{n}),
                                              dsrsq::TensorView(ref.data(), dsrsq::Shape{n}), 0.75});
    float *dx = nullptr, *dy = nullptr;
    DSRSQ_CUDA_CHECK(cudaMalloc(&dx, sizeof(float) * n));
    DSRSQ_CUDA_CHECK(cudaMalloc(&dy, sizeof(float) * n));
    DSRSQ_CUDA_CHECK(cudaMemcpy(dx, x.data(), sizeof(float) * n, cudaMemcpyHostToDevice));
    DSRSQ_CUDA_CHECK(cudaMemcpy(dy, y.data(), sizeof(float) * n, cudaMemcpyHostToDevice));
    dsrsq::cuda::axpy(dx, dy, 0.75f, n, nullptr);
    DSRSQ_CUDA_CHECK(cudaMemcpy(y.data(), dy, sizeof(float) * n, cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dy);
    double err = 0;
    for (long long i = 0; i < n; ++i) err = std::fmax(err, std::fabs(y[static_cast<size_t>(i)] - ref[static_cast<size_t>(i)]));
    const bool ok = err <= 1e-6;
    failed += !ok;
    std::printf("axpy n=%lld max_err=%.3g %s\n", n, err, ok ? "ok" : "FAIL");
  }
  std::printf("%d failed\n", failed);
  return failed ? 1 : 0;
}
