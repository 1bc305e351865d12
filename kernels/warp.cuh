// Warp-wide reductions shared by the CUDA kernels: every lane of a full warp gets the result.
#pragma once

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

}  // namespace lifeiqa_fast
