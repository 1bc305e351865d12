// Bin arithmetic of the UPP grid pooling, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "check.h"

#if defined(__CUDACC__)
#define LIFEIQA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LIFEIQA_HOST_DEVICE inline
#endif

namespace lifeiqa_fast {

// Edge i (0 <= i <= g) of the g bins over an axis of n cells: the value that
// torch.linspace(0, n, g + 1, dtype=torch.int) holds at i. linspace steps in double, from the start
// for the first half of the points and back from the end for the second half, then truncates.
// n = 15, g = 7: step 15/7 = 2.142..., edges 0 2 4 6 | 8 10 12 15 (bins of 2, 2, 2, 2, 2, 2, 3 cells).
// n >= g makes every bin non-empty.
LIFEIQA_HOST_DEVICE int64_t bin_edge(int64_t i, int64_t n, int64_t g) {
  const double step = static_cast<double>(n) / static_cast<double>(g);
  return i < (g + 1) / 2 ? static_cast<int64_t>(step * static_cast<double>(i))
                         : static_cast<int64_t>(static_cast<double>(n) - step * static_cast<double>(g - i));
}

// The bin of cell h (0 <= h < n): the largest i with bin_edge(i) <= h. The guess h * g / n is off by
// at most one bin, so each loop runs at most once.
LIFEIQA_HOST_DEVICE int64_t bin_of(int64_t h, int64_t n, int64_t g) {
  int64_t i = h * g / n;
  while (i > 0 && bin_edge(i, n, g) > h) --i;
  while (i + 1 < g && bin_edge(i + 1, n, g) <= h) ++i;
  return i;
}

// The op's contract, checked by every backend before it launches.
inline void check_grid_pool_input(const at::Tensor& x, int64_t grid) {
  TORCH_CHECK(x.dim() == 4, "lifeiqa_fast.grid_pool: x must have shape (B, H, W, C), got ", shape_text(x.sizes()));
  check_floating("grid_pool", x);
  TORCH_CHECK(grid >= 1, "lifeiqa_fast.grid_pool: grid must be a positive int, got ", grid);
  TORCH_CHECK(x.size(1) >= grid && x.size(2) >= grid,
              "lifeiqa_fast.grid_pool: x must have H >= grid and W >= grid so that no bin is empty, got H=",
              x.size(1), ", W=", x.size(2), ", grid=", grid);
}

inline void check_grid_pool_backward_input(const at::Tensor& grad, int64_t height, int64_t width,
                                           int64_t grid) {
  TORCH_CHECK(grid >= 1 && height >= grid && width >= grid,
              "lifeiqa_fast.grid_pool_backward: need height >= grid >= 1 and width >= grid, got height=",
              height, ", width=", width, ", grid=", grid);
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) == grid * grid,
              "lifeiqa_fast.grid_pool_backward: grad must have shape (B, grid * grid, C) with grid * grid = ",
              grid * grid, ", got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "lifeiqa_fast.grid_pool_backward: grad must be a floating tensor, got ", grad.scalar_type());
}

}  // namespace lifeiqa_fast
