// Test-only stand-ins for what the torch glue (csrc/cuda/sparsekern_cuda.cpp) links against on a
// CUDA build — the CUDA runtime, libc10_cuda and the kernel launchers — so that the glue can be
// linked against a CPU-only torch and loaded, to check its TORCH_LIBRARY_IMPL registrations
// against the op schemas and its argument checks (tests/test_cuda_kernels.py). Written against
// the declarations of torch 2.13's c10/cuda headers and CUDA 13's cuda_runtime_api.h. Every stub
// aborts when called: loading and the glue's argument checks never reach them.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "sparsekern_cuda.h"

namespace {
[[noreturn]] void unreachable(const char* what) {
  std::fprintf(stderr, "glue_stubs: %s called (no CUDA in this process)\n", what);
  std::abort();
}
}  // namespace

namespace c10 {
namespace cuda {
DeviceIndex device_count() noexcept { return 0; }
cudaError_t GetDevice(DeviceIndex*) { unreachable("GetDevice"); }
cudaError_t SetDevice(DeviceIndex, const bool) { unreachable("SetDevice"); }
cudaError_t MaybeSetDevice(DeviceIndex) { unreachable("MaybeSetDevice"); }
DeviceIndex ExchangeDevice(DeviceIndex) { unreachable("ExchangeDevice"); }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { unreachable("getStreamFromPool"); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { unreachable("getStreamFromPool"); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { unreachable("getDefaultCUDAStream"); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { unreachable("getCurrentCUDAStream"); }
void setCurrentCUDAStream(CUDAStream) { unreachable("setCurrentCUDAStream"); }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t,
                                   const bool) {
  unreachable("c10_cuda_check_implementation");
}
bool CUDAStream::query() const { unreachable("CUDAStream::query"); }
void CUDAStream::synchronize() const { unreachable("CUDAStream::synchronize"); }
cudaStream_t CUDAStream::stream() const { unreachable("CUDAStream::stream"); }
namespace CUDACachingAllocator {
std::atomic<CUDAAllocator*> allocator{nullptr};
}  // namespace CUDACachingAllocator
}  // namespace cuda
}  // namespace c10

cudaError_t CUDARTAPI cudaDeviceSynchronize(void) { unreachable("cudaDeviceSynchronize"); }
cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t*, unsigned int) {
  unreachable("cudaEventCreateWithFlags");
}
cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t) { unreachable("cudaEventDestroy"); }
cudaError_t CUDARTAPI cudaEventElapsedTime(float*, cudaEvent_t, cudaEvent_t) {
  unreachable("cudaEventElapsedTime");
}
cudaError_t CUDARTAPI cudaEventQuery(cudaEvent_t) { unreachable("cudaEventQuery"); }
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t, cudaStream_t) {
  unreachable("cudaEventRecord");
}
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t) { unreachable("cudaEventSynchronize"); }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { unreachable("cudaGetErrorString"); }
cudaError_t CUDARTAPI cudaGetLastError(void) { unreachable("cudaGetLastError"); }
cudaError_t CUDARTAPI cudaStreamIsCapturing(cudaStream_t, enum cudaStreamCaptureStatus*) {
  unreachable("cudaStreamIsCapturing");
}
cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) {
  unreachable("cudaStreamWaitEvent");
}

namespace sparsekern {
namespace cuda {
cudaError_t launch_bsr_mm(DType, const void*, const void*, bool, const uint8_t*, const int32_t*,
                          const int32_t*, void*, int64_t, int64_t, int64_t, int, int,
                          cudaStream_t) {
  unreachable("launch_bsr_mm");
}
cudaError_t launch_bsr_mm_t(DType, const void*, const void*, bool, const uint8_t*,
                            const int32_t*, const int32_t*, const int32_t*, void*, int64_t,
                            int64_t, int64_t, int, int, cudaStream_t) {
  unreachable("launch_bsr_mm_t");
}
size_t sddmm_workspace_bytes(int64_t) { unreachable("sddmm_workspace_bytes"); }
cudaError_t launch_sddmm(DType, const void*, const void*, const uint8_t*, const int32_t*,
                         const int32_t*, int64_t, void*, void*, int64_t, int64_t, int64_t, int,
                         int, cudaStream_t) {
  unreachable("launch_sddmm");
}
int64_t grow_topk_tiles(int64_t, int64_t, int, int) { unreachable("grow_topk_tiles"); }
cudaError_t launch_grow_topk_pass(DType, const GrowPassArgs&, cudaStream_t) {
  unreachable("launch_grow_topk_pass");
}
cudaError_t launch_decode_composites(const unsigned long long*, int64_t, int64_t*, float*,
                                     cudaStream_t) {
  unreachable("launch_decode_composites");
}
}  // namespace cuda
}  // namespace sparsekern
