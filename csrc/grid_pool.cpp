// CPU kernels of lifeiqa_fast::grid_pool (UPP pooling of a stage map onto a grid x grid grid).
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu.h"
#include "grid_pool.h"

namespace lifeiqa_fast {
namespace {

// Channels summed in registers at once: two AVX2 (four SSE) vectors of fp32 accumulators, loaded
// from each cell of the bin and stored once.
constexpr int64_t kLanes = 16;
// out[c] = mean over cells (h, w) in [h0, h1) x [w0, w1) of x[h * sH + w * sW + c * sC], c < C.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void bin_mean_impl(const scalar_t* __restrict__ x, int64_t sH, int64_t sW, int64_t sC, int64_t h0,
                                 int64_t h1, int64_t w0, int64_t w1, int64_t C, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t count = static_cast<acc_t>((h1 - h0) * (w1 - w0));
  int64_t c0 = 0;
  if (sC == 1) {
    for (; c0 + kLanes <= C; c0 += kLanes) {
      acc_t acc[kLanes] = {};
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t w = w0; w < w1; ++w) {
          const scalar_t* __restrict__ p = x + h * sH + w * sW + c0;
          for (int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<acc_t>(p[k]);
        }
      for (int64_t k = 0; k < kLanes; ++k) out[c0 + k] = static_cast<scalar_t>(acc[k] / count);
    }
  }
  for (int64_t c = c0; c < C; ++c) {  // the channel tail, or every channel of a strided view
    acc_t acc = 0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) acc += static_cast<acc_t>(x[h * sH + w * sW + c * sC]);
    out[c] = static_cast<scalar_t>(acc / count);
  }
}
LIFEIQA_CPU_DISPATCH(bin_mean)

// dst[c] = src[c * sC] / count, c < C: one cell's share of its bin's gradient.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void spread_impl(const scalar_t* __restrict__ src, int64_t sC, at::opmath_type<scalar_t> count,
                               int64_t C, scalar_t* __restrict__ dst) {
  using acc_t = at::opmath_type<scalar_t>;
  if (sC == 1) {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) / count);
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c * sC]) / count);
  }
}
LIFEIQA_CPU_DISPATCH(spread)

// out[b, i * g + j, :] = mean of x[b, h, w, :] over h in [edge(i), edge(i+1)), w in [edge(j), edge(j+1)).
// One task = one (image, bin) pair.
template <typename scalar_t>
void grid_pool_cpu_impl(const at::Tensor& x, at::Tensor& out, int64_t g) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t sB = x.stride(0), sH = x.stride(1), sW = x.stride(2), sC = x.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t bins = g * g;
  const int64_t per_task = std::max<int64_t>(1, (H / g + 1) * (W / g + 1) * C);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / per_task);

  at::parallel_for(0, B * bins, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bins, i = (task % bins) / g, j = task % g;
      bin_mean<scalar_t>(xp + b * sB, sH, sW, sC, bin_edge(i, H, g), bin_edge(i + 1, H, g), bin_edge(j, W, g),
               bin_edge(j + 1, W, g), C, op + task * C);
    }
  });
}

// Adjoint of the mean: dx[b, h, w, c] = grad[b, bin(h) * g + bin(w), c] / (cells in that bin).
// One task = one row (b, h); the bin of every column is looked up once, on the host.
template <typename scalar_t>
void grid_pool_backward_cpu_impl(const at::Tensor& grad, at::Tensor& dx, int64_t g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dx.size(0), H = dx.size(1), W = dx.size(2), C = dx.size(3);
  const int64_t gB = grad.stride(0), gP = grad.stride(1), gC = grad.stride(2);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  std::vector<int64_t> col_bin(W);
  std::vector<acc_t> col_width(W);
  for (int64_t w = 0; w < W; ++w) {
    col_bin[w] = bin_of(w, W, g);
    col_width[w] = static_cast<acc_t>(bin_edge(col_bin[w] + 1, W, g) - bin_edge(col_bin[w], W, g));
  }
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, W * C));

  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H;
      const int64_t i = bin_of(h, H, g);
      const acc_t height = static_cast<acc_t>(bin_edge(i + 1, H, g) - bin_edge(i, H, g));
      for (int64_t w = 0; w < W; ++w)
        spread<scalar_t>(gp + b * gB + (i * g + col_bin[w]) * gP, gC, height * col_width[w], C, dp + (row * W + w) * C);
    }
  });
}

at::Tensor grid_pool_cpu(const at::Tensor& x, int64_t grid) {
  check_grid_pool_input(x, grid);
  at::Tensor out = at::empty({x.size(0), grid * grid, x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grid_pool_cpu",
                                  [&] { grid_pool_cpu_impl<scalar_t>(x, out, grid); });
  return out;
}

at::Tensor grid_pool_backward_cpu(const at::Tensor& grad, int64_t height, int64_t width, int64_t grid) {
  check_grid_pool_backward_input(grad, height, width, grid);
  at::Tensor dx = at::empty({grad.size(0), height, width, grad.size(2)}, grad.options());
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "grid_pool_backward_cpu",
                                  [&] { grid_pool_backward_cpu_impl<scalar_t>(grad, dx, grid); });
  return dx;
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) {
  m.impl("grid_pool", &lifeiqa_fast::grid_pool_cpu);
  m.impl("grid_pool_backward", &lifeiqa_fast::grid_pool_backward_cpu);
}
