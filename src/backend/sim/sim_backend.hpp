#pragma once
// The simulated device (--device sim): the CPU backend behind the device
// boundary, for finding and keeping out host reads of device tensors on a
// machine without a GPU. Nothing here computes: every op re-tags its sim
// arguments as host views and calls the CPU backend's public (boundary
// checked) entry point, so results are the CPU backend's bit for bit.
//
// What makes it a device:
//  * its allocator hands out host memory whose views are tagged Device::sim,
//    so TensorView::ptr<T>() on them raises, as on CUDA;
//  * the pointers it hands out are poisoned (bit 62 set: a non-canonical
//    address on x86-64 and AArch64), so a raw host access that bypasses ptr()
//    (memcpy on .data, std::copy) faults at once instead of silently working,
//    as a device pointer read on the host would; only its own ops and
//    copy_to_host / copy_from_host take the poison off;
//  * an op given a tensor not on the sim device is refused with the message
//    CudaBackend::require_device gives (CUDA takes no host index array in any
//    op either);
//  * supports() is CudaBackend::supports(), and the CUDA kernels' input
//    limits are mirrored (attention and top-k f32 only, head size <= 256,
//    latent size <= 512), so what runs on sim is what CUDA would accept.
#include "backend/backend.hpp"

namespace dsrsq::sim {

// The process's simulated device backend.
Backend& sim_backend();

// The host address behind a sim pointer (tests and the backend itself).
void* host_address(const void* sim_ptr);

}  // namespace dsrsq::sim
