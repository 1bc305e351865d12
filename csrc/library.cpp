// The schema of every lifeiqa_fast op, defined once. Each backend registers its kernels at the
// bottom of its own file: csrc/<op>.cpp for CPU, kernels/<op>.cu for CUDA. Autograd formulas and
// fake (meta) implementations are registered from Python, in lifeiqa_fast/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(lifeiqa_fast, m) {
  // x: (B, H, W, C), any strides (an NCHW tensor permuted to NHWC is read in place).
  // Returns (B, grid * grid, C): the mean of x over each UPP bin, bins row-major.
  m.def("grid_pool(Tensor x, int grid) -> Tensor");
  // grad: (B, grid * grid, C). Returns (B, height, width, C): each bin's gradient spread evenly
  // over the cells of that bin.
  m.def("grid_pool_backward(Tensor grad, int height, int width, int grid) -> Tensor");
}
