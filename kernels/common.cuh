// Shared by the CUDA kernels: warp-wide reductions (every lane of a full warp gets the result) and
// the host side of dynamic shared memory.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

namespace lifeiqa_fast {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int s = 16; s >= 1; s /= 2) v += __shfl_xor_sync(kFullMask, v, s);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int s = 16; s >= 1; s /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, s));
  return v;
}

// The dynamic shared memory a block may opt in to on the current device (163 KiB on sm_80, 227 KiB on sm_90).
inline int max_smem_optin() {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin;
}

// Lets `kernel` launch on the current device with up to the device's opt-in maximum of shared memory
// (beyond the default 48 KiB of dynamic shared memory), less its static shared memory. Set once per
// (kernel, device), to the most any launch can ask: set per call to each call's size, a host thread
// could lower the limit between another thread's set and its launch.
template <typename Kernel>
void allow_max_smem(Kernel kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int dynamic = max_smem_optin() - static_cast<int>(attributes.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic));
  done.insert(key);
}

}  // namespace lifeiqa_fast
