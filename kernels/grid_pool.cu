// CUDA kernels of lifeiqa_fast::grid_pool (UPP pooling of a stage map onto a grid x grid grid).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "grid_pool.h"

namespace lifeiqa_fast {
namespace {

constexpr int kThreads = 128;

// One block per (image, bin); the threads stride over the channels, so with NHWC input (unit
// channel stride) each warp reads 32 consecutive values of a cell.
template <typename scalar_t>
__global__ void _grid_pool_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t H,
                                      int64_t W, int64_t C, int64_t g, int64_t sB, int64_t sH, int64_t sW,
                                      int64_t sC) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t task = blockIdx.x;
  const int64_t b = task / (g * g), i = (task % (g * g)) / g, j = task % g;
  const int64_t h0 = bin_edge(i, H, g), h1 = bin_edge(i + 1, H, g);
  const int64_t w0 = bin_edge(j, W, g), w1 = bin_edge(j + 1, W, g);
  const acc_t count = static_cast<acc_t>((h1 - h0) * (w1 - w0));
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) acc += static_cast<acc_t>(x[b * sB + h * sH + w * sW + c * sC]);
    out[task * C + c] = static_cast<scalar_t>(acc / count);
  }
}

// One thread per element of dx (B, H, W, C), contiguous: dx = grad[b, bin(h) * g + bin(w), c] / count.
template <typename scalar_t>
__global__ void _grid_pool_bwd_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ dx, int64_t n,
                                      int64_t H, int64_t W, int64_t C, int64_t g, int64_t gB, int64_t gP,
                                      int64_t gC) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % C, w = (e / C) % W, h = (e / (C * W)) % H, b = e / (C * W * H);
    const int64_t i = bin_of(h, H, g), j = bin_of(w, W, g);
    const acc_t count = static_cast<acc_t>((bin_edge(i + 1, H, g) - bin_edge(i, H, g)) *
                                           (bin_edge(j + 1, W, g) - bin_edge(j, W, g)));
    dx[e] = static_cast<scalar_t>(static_cast<acc_t>(grad[b * gB + (i * g + j) * gP + c * gC]) / count);
  }
}

at::Tensor grid_pool_cuda(const at::Tensor& x, int64_t grid) {
  check_grid_pool_input(x, grid);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), grid * grid, x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (x.size(3) + 31) / 32 * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grid_pool_cuda", [&] {
    _grid_pool_fwd_kernel<scalar_t><<<x.size(0) * grid * grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3), grid,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grid_pool_backward_cuda(const at::Tensor& grad, int64_t height, int64_t width, int64_t grid) {
  check_grid_pool_backward_input(grad, height, width, grid);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dx = at::empty({grad.size(0), height, width, grad.size(2)}, grad.options());
  const int64_t n = dx.numel();
  if (n == 0) return dx;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535LL * 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "grid_pool_backward_cuda", [&] {
    _grid_pool_bwd_kernel<scalar_t><<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n, height, width, grad.size(2), grid,
        grad.stride(0), grad.stride(1), grad.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CUDA, m) {
  m.impl("grid_pool", &lifeiqa_fast::grid_pool_cuda);
  m.impl("grid_pool_backward", &lifeiqa_fast::grid_pool_backward_cuda);
}
