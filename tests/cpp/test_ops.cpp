// C++ test of the lifeiqa_fast ops, called through the dispatcher as any libtorch user would call
// them: checks lifeiqa_fast::grid_pool and lifeiqa_fast::grid_pool_backward on CPU against
// computations written out here, independently of csrc/grid_pool.h. Built by CMakeLists.txt as
// test_ops and run by ctest; prints each failed check and exits 1 if any failed.
//
// When built with WITH_CUDA=ON (LIFEIQA_FAST_TEST_CUDA) and run where a GPU is present, it also
// compares the CUDA kernels with the CPU ones; without a GPU that part is skipped (and says so).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#ifdef LIFEIQA_FAST_TEST_CUDA
#include <ATen/Context.h>
#endif

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Deterministic, non-constant values of the given shape (no RNG: the same on every run).
at::Tensor values(at::IntArrayRef shape, double phase) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return (at::arange(n, at::kDouble).mul(0.7371).add(phase).sin().mul(3.0)).to(at::kFloat).reshape(shape);
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return a.to(at::kDouble).cpu().sub(b.to(at::kDouble).cpu()).abs().max().item<double>();
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

void check_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  if (got.sizes() != want.sizes()) {
    check(false, what + ": shape " + shape_str(got.sizes()) + ", expected " + shape_str(want.sizes()));
    return;
  }
  const double d = max_abs_diff(got, want);
  check(d <= tol, what + ": max |got - expected| = " + std::to_string(d) + " > " + std::to_string(tol));
}

using GridPoolFn = at::Tensor(const at::Tensor&, int64_t);
using GridPoolBackwardFn = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t);

// The reference grid_pool of an NHWC tensor with the bin edges given explicitly: (B, g * g, C).
at::Tensor reference_grid_pool(const at::Tensor& x, const std::vector<int64_t>& hedges,
                               const std::vector<int64_t>& wedges) {
  const int64_t B = x.size(0), C = x.size(3);
  const int64_t g = static_cast<int64_t>(hedges.size()) - 1;
  at::Tensor xd = x.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({B, g * g, C}, xd.options());
  auto xa = xd.accessor<double, 4>();
  auto oa = out.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < C; ++c) {
          double sum = 0.0;
          int64_t count = 0;
          for (int64_t h = hedges[i]; h < hedges[i + 1]; ++h)
            for (int64_t w = wedges[j]; w < wedges[j + 1]; ++w, ++count) sum += xa[b][h][w][c];
          oa[b][i * g + j][c] = sum / static_cast<double>(count);
        }
  return out;
}

// dx = grid_pool_backward(grad, H, W, g) must spread each bin's gradient evenly over the bin:
// every cell of bin (i, j) holds grad[b, i * g + j, c] / cells, so the bin sums to the bin's grad.
void check_backward(const at::Tensor& dx_in, const at::Tensor& grad_in, const std::vector<int64_t>& hedges,
                    const std::vector<int64_t>& wedges, const std::string& what) {
  const int64_t B = grad_in.size(0), C = grad_in.size(2);
  const int64_t g = static_cast<int64_t>(hedges.size()) - 1;
  const std::vector<int64_t> want_shape = {B, hedges.back(), wedges.back(), C};
  if (dx_in.sizes() != at::IntArrayRef(want_shape)) {
    check(false, what + ": shape " + shape_str(dx_in.sizes()) + ", expected " + shape_str(want_shape));
    return;
  }
  at::Tensor dx = dx_in.to(at::kDouble).cpu().contiguous(), grad = grad_in.to(at::kDouble).cpu().contiguous();
  auto da = dx.accessor<double, 4>();
  auto ga = grad.accessor<double, 3>();
  double worst_sum = 0.0, worst_cell = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const double want = ga[b][i * g + j][c];
          const double cells = static_cast<double>((hedges[i + 1] - hedges[i]) * (wedges[j + 1] - wedges[j]));
          double sum = 0.0;
          for (int64_t h = hedges[i]; h < hedges[i + 1]; ++h)
            for (int64_t w = wedges[j]; w < wedges[j + 1]; ++w) {
              sum += da[b][h][w][c];
              worst_cell = std::max(worst_cell, std::abs(da[b][h][w][c] - want / cells));
            }
          worst_sum = std::max(worst_sum, std::abs(sum - want));
        }
  check(worst_sum <= 1e-5, what + ": a bin's gradients sum to the bin's grad +- " + std::to_string(worst_sum));
  check(worst_cell <= 1e-6, what + ": a cell differs from its bin's grad / cells by " + std::to_string(worst_cell));
}

}  // namespace

int main() {
  try {
    const auto grid_pool = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lifeiqa_fast::grid_pool", "")
                               .typed<GridPoolFn>();
    const auto grid_pool_backward = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("lifeiqa_fast::grid_pool_backward", "")
                                        .typed<GridPoolBackwardFn>();
    constexpr int64_t g = 7;

    // (2, 14, 14, 5), grid 7: the bins are the 2 x 2 blocks, i.e. a 2 x 2 average pool.
    const at::Tensor x14 = values({2, 14, 14, 5}, 0.1);
    const at::Tensor want14 =
        at::avg_pool2d(x14.permute({0, 3, 1, 2}), {2, 2}).permute({0, 2, 3, 1}).reshape({2, g * g, 5});
    check_close(grid_pool.call(x14, g), want14, 1e-6, "grid_pool (2, 14, 14, 5) vs avg_pool2d");
    // The same values in an NCHW tensor permuted to NHWC (non-unit channel stride), read in place.
    const at::Tensor x14_strided = x14.permute({0, 3, 1, 2}).contiguous().permute({0, 2, 3, 1});
    check_close(grid_pool.call(x14_strided, g), want14, 1e-6, "grid_pool (2, 14, 14, 5) channel-strided");

    // Bin edges of n cells on the 7-bin grid: torch.linspace(0, n, 8, dtype=torch.int), n = 14, 15, 13.
    const std::vector<int64_t> edges14 = {0, 2, 4, 6, 8, 10, 12, 14};
    const std::vector<int64_t> edges15 = {0, 2, 4, 6, 8, 10, 12, 15};
    const std::vector<int64_t> edges13 = {0, 1, 3, 5, 7, 9, 11, 13};
    // (1, 15, 13, 3), grid 7: uneven bins, checked against explicit loops over those edges.
    const at::Tensor x15 = values({1, 15, 13, 3}, 0.4);
    const at::Tensor want15 = reference_grid_pool(x15, edges15, edges13);
    check_close(grid_pool.call(x15, g), want15, 1e-5, "grid_pool (1, 15, 13, 3) vs explicit bins");

    // Backward: each bin's gradient spread evenly over its cells.
    const at::Tensor grad14 = values({2, g * g, 5}, 1.3);
    check_backward(grid_pool_backward.call(grad14, 14, 14, g), grad14, edges14, edges14,
                   "grid_pool_backward (2, 49, 5) -> 14 x 14");
    const at::Tensor grad15 = values({1, g * g, 3}, 2.2);
    check_backward(grid_pool_backward.call(grad15, 15, 13, g), grad15, edges15, edges13,
                   "grid_pool_backward (1, 49, 3) -> 15 x 13");

#ifdef LIFEIQA_FAST_TEST_CUDA
    if (at::hasCUDA()) {
      const at::Device cuda(at::kCUDA, 0);
      for (const at::Tensor& x : {x14, x14_strided, x15}) {
        check_close(grid_pool.call(x.to(cuda), g), grid_pool.call(x, g), 1e-5,
                    "CUDA grid_pool " + shape_str(x.sizes()) + " vs CPU");
      }
      check_close(grid_pool_backward.call(grad14.to(cuda), 14, 14, g), grid_pool_backward.call(grad14, 14, 14, g),
                  1e-6, "CUDA grid_pool_backward -> 14 x 14 vs CPU");
      check_close(grid_pool_backward.call(grad15.to(cuda), 15, 13, g), grid_pool_backward.call(grad15, 15, 13, g),
                  1e-6, "CUDA grid_pool_backward -> 15 x 13 vs CPU");
      std::printf("CUDA kernels compared with CPU ones\n");
    } else {
      std::printf("no CUDA device: CUDA kernels not compared (built with WITH_CUDA=ON)\n");
    }
#endif
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "FAIL: c10::Error: %s\n", e.what_without_backtrace());
    if (std::string(e.what_without_backtrace()).find("Could not find schema") != std::string::npos) {
      std::fprintf(stderr, "(the ops' static registrars did not run: liblifeiqa_fast_ops is not loaded; link it "
                           "with --no-as-needed, e.g. through the CMake target lifeiqa_fast::ops)\n");
    }
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all lifeiqa_fast op checks passed\n");
  return 0;
}
