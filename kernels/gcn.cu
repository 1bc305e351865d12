// CUDA kernel of lifeiqa_fast::gcn: all three graph convolutions of one image in one block, one
// launch for the batch. Intermediates stay in shared memory; each weight is read once per block.
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "common.cuh"
#include "gcn.h"

namespace lifeiqa_fast {
namespace {

constexpr int kThreads = 256;

// One graph convolution of the block's image: thread j owns output column j (striding over C) for
// all N tokens. acc[n] = sum_k in(n, k) W[k, j] in registers, then p[n] = sum_m A[n, m] acc[m],
// handed to epilogue(n, j, p). W is read once per block, a warp reading 32 consecutive columns.
template <int kMaxN, typename acc_t, typename scalar_t, typename In, typename Epilogue>
__device__ __forceinline__ void graph_conv(In in, int K, const scalar_t* __restrict__ W, int C,
                                           const acc_t* __restrict__ A, int N, Epilogue epilogue) {
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    acc_t acc[kMaxN];
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) acc[n] = acc_t(0);
    for (int k = 0; k < K; ++k) {
      const acc_t w = static_cast<acc_t>(W[static_cast<int64_t>(k) * C + j]);
#pragma unroll
      for (int n = 0; n < kMaxN; ++n)
        if (n < N) acc[n] += in(n, k) * w;
    }
    for (int n = 0; n < N; ++n) {
      acc_t p = acc_t(0);
#pragma unroll
      for (int m = 0; m < kMaxN; ++m)
        if (m < N) p += A[n * N + m] * acc[m];
      epilogue(n, j, p);
    }
  }
}

// Block b: image b. Shared memory: A (N, N), h1 (N, H1), h2 (N, H2) in the accumulation type.
// adj == nullptr is the fixed graph (J + I) / (N + 1); adj_stride is 0 for a shared (N, N) graph.
template <typename scalar_t, int kMaxN>
__global__ void _gcn_fwd_kernel(const scalar_t* __restrict__ x, int64_t sxB, int64_t sxN, int64_t sxD,
                                const scalar_t* __restrict__ adj, int64_t adj_stride,
                                const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
                                const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
                                const scalar_t* __restrict__ w3, const scalar_t* __restrict__ b3,
                                scalar_t* __restrict__ out, scalar_t* __restrict__ h1_out,
                                scalar_t* __restrict__ h2_out, int N, int D, int H1, int H2) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* A = reinterpret_cast<acc_t*>(smem);
  acc_t* h1 = A + N * N;
  acc_t* h2 = h1 + N * H1;
  const int64_t b = blockIdx.x;
  const scalar_t* xb = x + b * sxB;
  for (int i = threadIdx.x; i < N * N; i += blockDim.x) {
    A[i] = adj == nullptr ? acc_t(i / N == i % N ? 2 : 1) / acc_t(N + 1) : static_cast<acc_t>(adj[b * adj_stride + i]);
  }
  __syncthreads();
  graph_conv<kMaxN>(
      [&](int n, int k) { return static_cast<acc_t>(xb[n * sxN + k * sxD]); }, D, w1, H1, A, N,
      [&](int n, int j, acc_t p) {
        const acc_t v = max(p + static_cast<acc_t>(b1[j]), acc_t(0));
        h1[n * H1 + j] = v;
        h1_out[(b * N + n) * H1 + j] = static_cast<scalar_t>(v);
      });
  __syncthreads();
  graph_conv<kMaxN>(
      [&](int n, int k) { return h1[n * H1 + k]; }, H1, w2, H2, A, N,
      [&](int n, int j, acc_t p) {
        const acc_t v = max(p + static_cast<acc_t>(b2[j]), acc_t(0));
        h2[n * H2 + j] = v;
        h2_out[(b * N + n) * H2 + j] = static_cast<scalar_t>(v);
      });
  __syncthreads();
  graph_conv<kMaxN>(
      [&](int n, int k) { return h2[n * H2 + k]; }, H2, w3, D, A, N,
      [&](int n, int j, acc_t p) {
        out[(b * N + n) * D + j] =
            static_cast<scalar_t>(static_cast<acc_t>(xb[n * sxN + j * sxD]) + p + static_cast<acc_t>(b3[j]));
      });
}

template <typename scalar_t, int kMaxN>
void launch(const at::Tensor& x, const at::Tensor& adj, const at::Tensor& w1, const at::Tensor& b1,
            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, at::Tensor& out,
            at::Tensor& h1, at::Tensor& h2, size_t smem) {
  auto kernel = _gcn_fwd_kernel<scalar_t, kMaxN>;
  if (smem > 48 * 1024) allow_max_smem(kernel);
  kernel<<<x.size(0), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
      adj.defined() ? adj.const_data_ptr<scalar_t>() : nullptr, adj.defined() && adj.dim() == 3 ? adj.stride(0) : 0,
      w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
      b2.const_data_ptr<scalar_t>(), w3.const_data_ptr<scalar_t>(), b3.const_data_ptr<scalar_t>(),
      out.mutable_data_ptr<scalar_t>(), h1.mutable_data_ptr<scalar_t>(), h2.mutable_data_ptr<scalar_t>(),
      static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), static_cast<int>(w1.size(1)),
      static_cast<int>(w2.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_cuda(const at::Tensor& x, const std::optional<at::Tensor>& adj,
                                                        const at::Tensor& w1, const at::Tensor& b1,
                                                        const at::Tensor& w2, const at::Tensor& b2,
                                                        const at::Tensor& w3, const at::Tensor& b3) {
  check_gcn_input(x, adj, w1, b1, w2, b2, w3, b3);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), H1 = w1.size(1), H2 = w2.size(1);
  at::Tensor out = at::empty({B, N, D}, x.options());
  at::Tensor h1 = at::empty({B, N, H1}, x.options());
  at::Tensor h2 = at::empty({B, N, H2}, x.options());
  if (B == 0) return {out, h1, h2};
  const at::Tensor a = adj.has_value() ? adj->contiguous() : at::Tensor();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous(), w3c = w3.contiguous();
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous(), b3c = b3.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gcn_cuda", [&] {
    const size_t smem = sizeof(at::opmath_type<scalar_t>) * static_cast<size_t>(N * N + N * H1 + N * H2);
    const int optin = max_smem_optin();
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "lifeiqa_fast.gcn: N * (N + H1 + H2) = ", N * (N + H1 + H2),
                " activations per image need ", smem, " bytes of shared memory; this GPU has ", optin);
    if (N <= 8) {
      launch<scalar_t, 8>(x, a, w1c, b1c, w2c, b2c, w3c, b3c, out, h1, h2, smem);
    } else if (N <= 16) {
      launch<scalar_t, 16>(x, a, w1c, b1c, w2c, b2c, w3c, b3c, out, h1, h2, smem);
    } else {
      launch<scalar_t, kGcnMaxTokens>(x, a, w1c, b1c, w2c, b2c, w3c, b3c, out, h1, h2, smem);
    }
  });
  return {out, h1, h2};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CUDA, m) { m.impl("gcn", &lifeiqa_fast::gcn_cuda); }
