// CPU kernel of lifeiqa_fast::gcn: x + three graph convolutions over the N query tokens.
//
// Each layer is one GEMM over all B * N tokens at once (at::mm: BLAS-sized, where the authors' bmm
// with expanded weights runs B tiny products), then one fused pass per image that applies the
// graph, the bias, the ReLU and (last layer) the residual, in place. A(h W) = (A h) W, so the graph
// may come after the GEMM.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "cpu.h"
#include "gcn.h"

namespace lifeiqa_fast {
namespace {

// One image: h (N, C) <- act(A h + bias) + residual, in place; buf holds (N + 1) * C accumulators.
// A == nullptr is the fixed graph (J + I) / (N + 1): A h = (h + sum over tokens of h) / (N + 1).
// Example, N = 2, C = 1, h = [1, 3]: sum 4, A h = [5, 7] / 3.
template <typename scalar_t>
LIFEIQA_CPU_CLONES void propagate_image(scalar_t* __restrict__ h, const scalar_t* __restrict__ A,
                                        const scalar_t* __restrict__ bias, const scalar_t* __restrict__ residual,
                                        int64_t N, int64_t C, bool relu, at::opmath_type<scalar_t>* __restrict__ buf) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* __restrict__ rows = buf;          // (N, C): the image's h before the update
  acc_t* __restrict__ acc = buf + N * C;   // (C,): one output row, or the token sum
  for (int64_t i = 0; i < N * C; ++i) rows[i] = static_cast<acc_t>(h[i]);
  if (A == nullptr) {
    std::fill(acc, acc + C, acc_t(0));
    for (int64_t m = 0; m < N; ++m)
      for (int64_t c = 0; c < C; ++c) acc[c] += rows[m * C + c];
  }
  const acc_t denom = static_cast<acc_t>(N + 1);
  for (int64_t n = 0; n < N; ++n) {
    scalar_t* __restrict__ out = h + n * C;
    const scalar_t* __restrict__ res = residual == nullptr ? nullptr : residual + n * C;
    if (A == nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = (rows[n * C + c] + acc[c]) / denom + static_cast<acc_t>(bias[c]);
        v = relu ? std::max(v, acc_t(0)) : v;
        out[c] = static_cast<scalar_t>(res == nullptr ? v : v + static_cast<acc_t>(res[c]));
      }
      continue;
    }
    for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<acc_t>(bias[c]);
    for (int64_t m = 0; m < N; ++m) {
      const acc_t a = static_cast<acc_t>(A[n * N + m]);
      for (int64_t c = 0; c < C; ++c) acc[c] += a * rows[m * C + c];
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = relu ? std::max(acc[c], acc_t(0)) : acc[c];
      out[c] = static_cast<scalar_t>(res == nullptr ? v : v + static_cast<acc_t>(res[c]));
    }
  }
}

// h: (B * N, C) contiguous, updated image by image; adj: undefined (fixed), (N, N) or (B, N, N)
// contiguous; residual: undefined or (B, N, C) contiguous.
void propagate(at::Tensor& h, const at::Tensor& adj, const at::Tensor& bias, bool relu, const at::Tensor& residual,
               int64_t B, int64_t N) {
  const int64_t C = h.size(1);
  const at::Tensor b = bias.contiguous();
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, N * C));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gcn_propagate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    const scalar_t* ap = adj.defined() ? adj.const_data_ptr<scalar_t>() : nullptr;
    const int64_t a_stride = adj.defined() && adj.dim() == 3 ? N * N : 0;
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf((N + 1) * C);
      for (int64_t i = begin; i < end; ++i) {
        propagate_image(hp + i * N * C, ap == nullptr ? nullptr : ap + i * a_stride, bp,
                        rp == nullptr ? nullptr : rp + i * N * C, N, C, relu, buf.data());
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_cpu(const at::Tensor& x, const std::optional<at::Tensor>& adj,
                                                       const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3) {
  check_gcn_input(x, adj, w1, b1, w2, b2, w3, b3);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const at::Tensor xc = x.contiguous();
  const at::Tensor a = adj.has_value() ? adj->contiguous() : at::Tensor();
  at::Tensor h1 = at::mm(xc.view({B * N, D}), w1);  // (B * N, H1)
  propagate(h1, a, b1, /*relu=*/true, at::Tensor(), B, N);
  at::Tensor h2 = at::mm(h1, w2);  // (B * N, H2)
  propagate(h2, a, b2, /*relu=*/true, at::Tensor(), B, N);
  at::Tensor out = at::mm(h2, w3);  // (B * N, D)
  propagate(out, a, b3, /*relu=*/false, xc, B, N);
  return {out.view({B, N, D}), h1.view({B, N, w1.size(1)}), h2.view({B, N, w2.size(1)})};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) { m.impl("gcn", &lifeiqa_fast::gcn_cpu); }
