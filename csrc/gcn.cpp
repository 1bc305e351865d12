// CPU kernel of lifeiqa_fast::gcn: x + three graph convolutions over the N query tokens.
//
// A(h W) = (A h) W, so each layer is a product with the weights followed by the graph, the bias, the
// ReLU and (last layer) the residual. fp32 and bf16 run a register-blocked kernel that does all of that
// per block of output columns in one pass (bf16 widened as it is loaded, fp32 arithmetic); other dtypes
// run one BLAS GEMM over all B * N tokens (where the authors' bmm with expanded weights runs B tiny
// products) and then one fused pass per image.
#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "cpu.h"
#include "few_rows.h"
#include "gcn.h"

namespace lifeiqa_fast {
namespace {

// One image: h (N, C) <- act(A h + bias) + residual, in place; buf holds (N + 1) * C accumulators.
// A == nullptr is the fixed graph (J + I) / (N + 1): A h = (h + sum over tokens of h) / (N + 1).
// Example, N = 2, C = 1, h = [1, 3]: sum 4, A h = [5, 7] / 3.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void propagate_image_impl(scalar_t* __restrict__ h, const scalar_t* __restrict__ A,
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
LIFEIQA_CPU_DISPATCH(propagate_image)

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
        propagate_image<scalar_t>(hp + i * N * C, ap == nullptr ? nullptr : ap + i * a_stride, bp,
                        rp == nullptr ? nullptr : rp + i * N * C, N, C, relu, buf.data());
      }
    });
  });
}

// ---- fp32 and bf16: each layer is one parallel pass over blocks of 24 output columns (no separate GEMM: at
// Life-IQA's sizes BLAS pays overheads on 6-row products, and loses even at batch 64: benchmarks/results/,
// gcn rows). A task computes its columns for every token of an
// image with a register-blocked kernel (3 rows x 24 columns of accumulators), then applies the graph,
// the bias, the ReLU and the residual to them before storing: one pass per layer, nothing in between.

constexpr int kCols = 24;  // output columns per task: three AVX2 vectors
constexpr int kRows = 3;   // token rows per register block: 9 vector accumulators, 3 weight vectors and a
                           // broadcast fit the 16 AVX2 registers, and 9 independent multiply-adds
                           // per k cover the FMA latency

// acc (R, kCols) = in (R, K; row stride K) @ W[:, c0:c0 + kCols] (row stride ldw): R x 3 vector
// accumulators, one broadcast multiply-add each per k.
template <int R, typename T>
__attribute__((always_inline)) inline void row_block(const T* __restrict__ in, int64_t K, const T* __restrict__ W,
                                                     int64_t ldw, float* __restrict__ acc_out) {
  static_assert(kCols == 24, "three vectors of accumulators per row");
  vec8 acc[R][3];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = vec8{};
  for (int64_t k = 0; k < K; ++k) {
    vec8 w0, w1, w2;  // separate variables, not an array: GCC keeps them (and acc) in registers
    load8(w0, W + k * ldw);
    load8(w1, W + k * ldw + 8);
    load8(w2, W + k * ldw + 16);
    for (int r = 0; r < R; ++r) {
      const float a = static_cast<float>(in[r * K + k]);
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
      acc[r][2] += a * w2;
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(acc_out + r * kCols, acc[r], sizeof(acc[r]));
}

// One graph convolution on columns [c0, c0 + kCols) of one image: out = act(A (in W) + bias) + res.
// cols < kCols only for the last block of a C that is not a multiple of kCols (then plain loops).
template <typename T>
__attribute__((always_inline)) inline void conv_block(const T* __restrict__ in, int64_t N, int64_t K,
                                                      const T* __restrict__ W, int64_t C, int64_t c0, int64_t cols,
                                                      const T* __restrict__ A, const T* __restrict__ bias, bool relu,
                                                      const T* __restrict__ res, T* __restrict__ out) {
  float s[kGcnMaxTokens][kCols];  // in W for this block
  if (cols == kCols) {
    int64_t r0 = 0;
    for (; r0 + kRows <= N; r0 += kRows) row_block<kRows>(in + r0 * K, K, W + c0, C, s[r0]);
    if (N - r0 == 2) row_block<2>(in + r0 * K, K, W + c0, C, s[r0]);
    if (N - r0 == 1) row_block<1>(in + r0 * K, K, W + c0, C, s[r0]);
  } else {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < cols; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(in[n * K + k]) * static_cast<float>(W[k * C + c0 + c]);
        s[n][c] = acc;
      }
  }
  float total[kCols] = {};
  if (A == nullptr)
    for (int64_t m = 0; m < N; ++m)
      for (int c = 0; c < kCols; ++c) total[c] += s[m][c];
  const float denom = static_cast<float>(N + 1);
  for (int64_t n = 0; n < N; ++n) {
    float v[kCols];
    if (A == nullptr) {
      for (int c = 0; c < kCols; ++c) v[c] = (s[n][c] + total[c]) / denom;
    } else {
      for (int c = 0; c < kCols; ++c) v[c] = 0.f;
      for (int64_t m = 0; m < N; ++m)
        for (int c = 0; c < kCols; ++c) v[c] += static_cast<float>(A[n * N + m]) * s[m][c];
    }
    for (int64_t c = 0; c < cols; ++c) {
      float o = v[c] + static_cast<float>(bias[c0 + c]);
      o = relu ? std::max(o, 0.f) : o;
      out[n * C + c0 + c] = static_cast<T>(res == nullptr ? o : o + static_cast<float>(res[n * C + c0 + c]));
    }
  }
}

// One graph convolution of the batch: out (B * N, C) from in (B * N, K), all contiguous, of one dtype.
template <typename T>
struct Conv {
  const T* in;
  int64_t N, K;
  const T* W;  // (K, C)
  int64_t C;
  const T* A;  // nullptr (fixed graph), or (N, N) per image at A + b * a_stride
  int64_t a_stride;
  const T* bias;
  bool relu;
  const T* res;  // nullptr, or (B * N, C)
  T* out;
};

// Tasks [begin, end) of (image, column block) pairs.
template <typename T>
LIFEIQA_CPU_INLINE void conv_tasks_impl(const Conv<T>& p, int64_t begin, int64_t end) {
  const int64_t blocks = (p.C + kCols - 1) / kCols;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / blocks, c0 = (t % blocks) * kCols;
    conv_block(p.in + b * p.N * p.K, p.N, p.K, p.W, p.C, c0, std::min<int64_t>(kCols, p.C - c0),
               p.A == nullptr ? nullptr : p.A + b * p.a_stride, p.bias, p.relu,
               p.res == nullptr ? nullptr : p.res + b * p.N * p.C, p.out + b * p.N * p.C);
  }
}

LIFEIQA_CPU_DISPATCH(conv_tasks)

template <typename T>
void conv_layer(const Conv<T>& p, int64_t B) {
  const int64_t blocks = (p.C + kCols - 1) / kCols;
  // a task is N * K * kCols multiply-adds; spread them only when each thread gets enough of them
  const int64_t grain = std::max<int64_t>(1, 4 * kMinElementsPerTask / std::max<int64_t>(1, p.N * p.K * kCols));
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) { conv_tasks<T>(p, begin, end); });
}

// The whole forward in fp32 or bf16 (fp32 arithmetic, h1, h2 and the output rounded to bf16 as the
// authors' layers round them): three conv_layer passes.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_vec(const at::Tensor& xc, const at::Tensor& a, const at::Tensor& w1,
                                                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3) {
  const int64_t B = xc.size(0), N = xc.size(1), D = xc.size(2), H1 = w1.size(1), H2 = w2.size(1);
  at::Tensor h1 = at::empty({B, N, H1}, xc.options()), h2 = at::empty({B, N, H2}, xc.options());
  at::Tensor out = at::empty({B, N, D}, xc.options());
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous(), w3c = w3.contiguous();
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous(), b3c = b3.contiguous();
  const T* A = a.defined() ? a.const_data_ptr<T>() : nullptr;
  const int64_t a_stride = a.defined() && a.dim() == 3 ? N * N : 0;
  const T* x = xc.const_data_ptr<T>();
  conv_layer<T>({x, N, D, w1c.const_data_ptr<T>(), H1, A, a_stride, b1c.const_data_ptr<T>(), true, nullptr,
                 h1.mutable_data_ptr<T>()}, B);
  conv_layer<T>({h1.const_data_ptr<T>(), N, H1, w2c.const_data_ptr<T>(), H2, A, a_stride, b2c.const_data_ptr<T>(),
                 true, nullptr, h2.mutable_data_ptr<T>()}, B);
  conv_layer<T>({h2.const_data_ptr<T>(), N, H2, w3c.const_data_ptr<T>(), D, A, a_stride, b3c.const_data_ptr<T>(),
                 false, x, out.mutable_data_ptr<T>()}, B);
  return {out, h1, h2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_cpu(const at::Tensor& x, const std::optional<at::Tensor>& adj,
                                                       const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3) {
  check_gcn_input(x, adj, w1, b1, w2, b2, w3, b3);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const at::Tensor xc = x.contiguous();
  const at::Tensor a = adj.has_value() ? adj->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) return gcn_vec<float>(xc, a, w1, b1, w2, b2, w3, b3);
  if (x.scalar_type() == at::kBFloat16) return gcn_vec<c10::BFloat16>(xc, a, w1, b1, w2, b2, w3, b3);
  // other dtypes: BLAS GEMMs over all B * N tokens (fp32 accumulation for bf16/fp16), then the graph
  at::Tensor h1 = at::mm(xc.view({B * N, D}), w1);  // (B * N, H1)
  propagate(h1, a, b1, /*relu=*/true, at::Tensor(), B, N);
  at::Tensor h2 = at::mm(h1, w2);  // (B * N, H2)
  propagate(h2, a, b2, /*relu=*/true, at::Tensor(), B, N);
  at::Tensor out = at::mm(h2, w3);  // (B * N, D)
  propagate(out, a, b3, /*relu=*/false, xc, B, N);
  return {out.view({B, N, D}), h1.view({B, N, w1.size(1)}), h2.view({B, N, w2.size(1)})};
}

}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) { m.impl("gcn", &lifeiqa_fast::gcn_cpu); }
