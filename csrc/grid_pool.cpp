// CPU kernels of lifeiqa_fast::grid_pool (UPP pooling of a stage map onto a grid x grid grid).
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "grid_pool.h"

namespace lifeiqa_fast {
namespace {

// Channels are summed in blocks of this many accumulators, kept in L1 (and in registers once the
// compiler vectorises the unit-stride loop).
constexpr int64_t kChannelBlock = 256;
// Elements one task of the thread pool should cover at least: below this, a round trip through
// the pool costs more than the work it spreads (a batch-1 Life-IQA map is ~100k elements).
constexpr int64_t kMinElementsPerTask = 32768;

// out[b, i * g + j, c] = mean of x[b, h, w, c] over h in [edge(i), edge(i+1)), w in [edge(j), edge(j+1)).
// One task = one (image, bin) pair; the unit-stride channel loop is the vectorised one.
template <typename scalar_t>
void grid_pool_cpu_impl(const at::Tensor& x, at::Tensor& out, int64_t g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t sB = x.stride(0), sH = x.stride(1), sW = x.stride(2), sC = x.stride(3);
  const scalar_t* __restrict__ xp = x.const_data_ptr<scalar_t>();
  scalar_t* __restrict__ op = out.mutable_data_ptr<scalar_t>();
  const int64_t bins = g * g;
  const int64_t per_task = std::max<int64_t>(1, (H / g + 1) * (W / g + 1) * C);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / per_task);

  at::parallel_for(0, B * bins, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bins, i = (task % bins) / g, j = task % g;
      const int64_t h0 = bin_edge(i, H, g), h1 = bin_edge(i + 1, H, g);
      const int64_t w0 = bin_edge(j, W, g), w1 = bin_edge(j + 1, W, g);
      const acc_t count = static_cast<acc_t>((h1 - h0) * (w1 - w0));
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t n = std::min(kChannelBlock, C - c0);
        std::fill(acc, acc + n, acc_t(0));
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const scalar_t* __restrict__ p = xp + b * sB + h * sH + w * sW + c0 * sC;
            if (sC == 1) {
              for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<acc_t>(p[c]);
            } else {
              for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<acc_t>(p[c * sC]);
            }
          }
        }
        scalar_t* __restrict__ o = op + task * C + c0;
        for (int64_t c = 0; c < n; ++c) o[c] = static_cast<scalar_t>(acc[c] / count);
      }
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
  const scalar_t* __restrict__ gp = grad.const_data_ptr<scalar_t>();
  scalar_t* __restrict__ dp = dx.mutable_data_ptr<scalar_t>();
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
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* __restrict__ src = gp + b * gB + (i * g + col_bin[w]) * gP;
        scalar_t* __restrict__ dst = dp + (row * W + w) * C;
        const acc_t count = height * col_width[w];
        if (gC == 1) {
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) / count);
        } else {
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c * gC]) / count);
        }
      }
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
