// CUDA kernel of lifeiqa_fast::cross_attention: one decoder layer's LayerNorm, query projection,
// attention to the given keys and values and output projection, in one launch. A block takes up to
// kRows query rows of one image; the rows stay in shared memory from x to out, and each block reads
// q_weight and out_weight once.
#include <cmath>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cross_attention.h"
#include "common.cuh"

namespace lifeiqa_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kKeys = 32;    // keys per online-softmax step: one per lane of a row's warp
constexpr int kUnroll = 4;   // 32-wide k steps whose weights a projection loads before using them
static_assert(kKeys == 32, "the softmax update gives each key of a chunk to one lane");

// One halving exchange of warp_transpose_sum: a lane keeps the half of its first 2S values selected by
// bit S of its lane id and adds its partner's (lane ^ S) copy of that half.
template <int S, typename T>
__device__ __forceinline__ void transpose_sum_step(T (&v)[32], int lane) {
  const bool upper = lane & S;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const T send = upper ? v[i] : v[i + S];
    const T keep = upper ? v[i + S] : v[i];
    v[i] = keep + __shfl_xor_sync(kFullMask, send, S);
  }
}

// Sums each of 32 per-lane values over the warp and leaves lane l with the sum of v[l]: 31 shuffles in
// all instead of 5 per value. After the steps S = 16, 8, 4, 2, 1, lane l holds the index
// (l & 16) + (l & 8) + (l & 4) + (l & 2) + (l & 1) = l, summed over all 32 lanes.
template <typename T>
__device__ __forceinline__ T warp_transpose_sum(T (&v)[32]) {
  const int lane = threadIdx.x % 32;
  transpose_sum_step<16>(v, lane);
  transpose_sum_step<8>(v, lane);
  transpose_sum_step<4>(v, lane);
  transpose_sum_step<2>(v, lane);
  transpose_sum_step<1>(v, lane);
  return v[0];
}

// y(r, n) = sum_k in[r * D + k] W[n * D + k] for the kRows rows of in (shared memory, rows >= `rows`
// zero) and every output feature n < D, W (D, D) in nn.Linear layout, handed to epilogue(r, n, y) for
// r < rows. A warp takes kFeat = 32 / kRows consecutive features, its lanes striding over k so that each
// W row is read coalesced; lane l accumulates (feature f, row r) in acc[f * kRows + r] and
// warp_transpose_sum leaves it with f = l / kRows, r = l % kRows (kRows = 8: lane 13 holds feature
// n0 + 1, row 5).
template <int kRows, typename acc_t, typename scalar_t, typename Epilogue>
__device__ __forceinline__ void project(const acc_t* __restrict__ in, const scalar_t* __restrict__ W, int D,
                                        int rows, Epilogue epilogue) {
  static_assert(32 % kRows == 0, "a warp's lanes hold kFeat features of kRows rows");
  constexpr int kFeat = 32 / kRows;
  const int lane = threadIdx.x % 32;
  for (int n0 = threadIdx.x / 32 * kFeat; n0 < D; n0 += blockDim.x / 32 * kFeat) {
    acc_t acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = acc_t(0);
    for (int k0 = 0; k0 < D; k0 += 32 * kUnroll) {
      acc_t w[kUnroll][kFeat];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * 32 + lane;
#pragma unroll
        for (int f = 0; f < kFeat; ++f) {
          const int n = n0 + f;
          w[u][f] = k < D && n < D ? static_cast<acc_t>(W[static_cast<int64_t>(n) * D + k]) : acc_t(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * 32 + lane;
        if (k < D) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const acc_t a = in[r * D + k];
#pragma unroll
            for (int f = 0; f < kFeat; ++f) acc[f * kRows + r] += a * w[u][f];
          }
        }
      }
    }
    const acc_t y = warp_transpose_sum(acc);
    const int n = n0 + lane / kRows, r = lane % kRows;
    if (n < D && r < rows) epilogue(r, n, y);
  }
}

// Shared memory of one block, in the accumulation type: xo and qs (kRows, D), the key and value chunk
// (kKeys, hd + 1) and (kKeys, hd), the scores (kRows, kKeys) and three per-row softmax scalars.
template <int kRows, typename acc_t>
size_t smem_bytes(int64_t D, int64_t hd) {
  return sizeof(acc_t) * static_cast<size_t>(2 * kRows * D + kKeys * (2 * hd + 1) + kRows * kKeys + 3 * kRows);
}

// Block (b, c): image b, query rows row0 = c * kRows .. row0 + rows - 1 of it. Phases, separated by
// barriers: x -> LayerNorm (a warp per row) -> q = xn Wq^T + bq rounded to scalar_t -> per head, per
// chunk of kKeys keys: stage K and V, scores (a thread per (row, key)), online-softmax update (a warp
// per row), O = alpha O + P V (a thread per (row, channel)), the last chunk dividing by the running sum
// and rounding to scalar_t -> out = x + o Wo^T + bo. Rows past Nq are zero and never stored.
// Launch bounds (kThreads, 1): with the thread count alone ptxas kept 64 registers and spilled the
// projection's 32 accumulators; fp32 takes ~96, two blocks per SM.
template <typename scalar_t, int kRows>
__global__ void __launch_bounds__(kThreads, 1)
    _cross_attention_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ kv, int64_t skB,
                                int64_t skN, int64_t skT, const scalar_t* __restrict__ norm_weight,
                                const scalar_t* __restrict__ norm_bias, const scalar_t* __restrict__ q_weight,
                                const scalar_t* __restrict__ q_bias, const scalar_t* __restrict__ out_weight,
                                const scalar_t* __restrict__ out_bias, scalar_t* __restrict__ out,
                                scalar_t* __restrict__ q_out, scalar_t* __restrict__ o_out,
                                at::opmath_type<scalar_t>* __restrict__ lse,
                                at::opmath_type<scalar_t>* __restrict__ stats, int Nq, int Nk, int D, int H,
                                at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hd = D / H;
  acc_t* xo = reinterpret_cast<acc_t*>(smem);  // (kRows, D): x, then LayerNorm(x), then o
  acc_t* qs = xo + kRows * D;                  // (kRows, D): q, then out
  acc_t* ks = qs + kRows * D;                  // (kKeys, hd + 1): padded, so key j of a warp hits bank j
  acc_t* vs = ks + kKeys * (hd + 1);           // (kKeys, hd)
  acc_t* ps = vs + kKeys * hd;                 // (kRows, kKeys): scores, then exp(score - running max)
  acc_t* m_run = ps + kRows * kKeys;           // (kRows,): running max of the scores
  acc_t* l_run = m_run + kRows;                // (kRows,): running sum of exp(score - running max)
  acc_t* alpha = l_run + kRows;                // (kRows,): exp(old max - new max) of this chunk

  const int64_t b = blockIdx.x;
  const int row0 = blockIdx.y * kRows, rows = min(kRows, Nq - row0);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t base = (b * Nq + row0) * D;  // of the block's first row in x, out, q_out, o_out
  const scalar_t* kvb = kv + b * skB;

  for (int i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    xo[i] = i < rows * D ? static_cast<acc_t>(x[base + i]) : acc_t(0);
  }
  __syncthreads();

  // LayerNorm, biased variance, two passes over the row in shared memory.
  for (int r = warp; r < rows; r += warps) {
    acc_t* xr = xo + r * D;
    acc_t sum = 0;
    for (int c = lane; c < D; c += 32) sum += xr[c];
    const acc_t mean = warp_sum(sum) / D;
    acc_t sq = 0;
    for (int c = lane; c < D; c += 32) sq += (xr[c] - mean) * (xr[c] - mean);
    const acc_t rstd = acc_t(1) / std::sqrt(warp_sum(sq) / D + eps);
    for (int c = lane; c < D; c += 32) {
      xr[c] = (xr[c] - mean) * rstd * static_cast<acc_t>(norm_weight[c]) + static_cast<acc_t>(norm_bias[c]);
    }
    if (lane == 0) {
      stats[(b * Nq + row0 + r) * 2] = mean;
      stats[(b * Nq + row0 + r) * 2 + 1] = rstd;
    }
  }
  __syncthreads();

  project<kRows>(xo, q_weight, D, rows, [&](int r, int n, acc_t y) {
    qs[r * D + n] = static_cast<acc_t>(static_cast<scalar_t>(y + static_cast<acc_t>(q_bias[n])));
  });
  __syncthreads();
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) q_out[base + i] = static_cast<scalar_t>(qs[i]);

  for (int h = 0; h < H; ++h) {
    for (int j0 = 0; j0 < Nk; j0 += kKeys) {
      const int keys = min(kKeys, Nk - j0);
      const bool first = j0 == 0, last = j0 + kKeys >= Nk;
      for (int i = threadIdx.x; i < keys * hd; i += blockDim.x) {
        const int j = i / hd, c = i % hd;
        const scalar_t* kj = kvb + (j0 + j) * skN + h * hd + c;
        ks[j * (hd + 1) + c] = static_cast<acc_t>(kj[0]);
        vs[j * hd + c] = static_cast<acc_t>(kj[skT]);
      }
      __syncthreads();

      for (int p = threadIdx.x; p < rows * kKeys; p += blockDim.x) {
        const int r = p / kKeys, j = p % kKeys;
        if (j < keys) {
          const acc_t* qr = qs + r * D + h * hd;
          const acc_t* kj = ks + j * (hd + 1);
          acc_t s = 0;
          for (int c = 0; c < hd; ++c) s += qr[c] * kj[c];
          ps[p] = s * scale;
        }
      }
      __syncthreads();

      // Online softmax: m' = max(m, max_j s_j), p_j = exp(s_j - m'), l' = l exp(m - m') + sum_j p_j.
      for (int r = warp; r < rows; r += warps) {
        acc_t* pr = ps + r * kKeys;
        const acc_t s = lane < keys ? pr[lane] : pr[0];
        const acc_t chunk_max = warp_max(s);
        const acc_t m_old = first ? chunk_max : m_run[r];
        const acc_t l_old = first ? acc_t(0) : l_run[r];
        const acc_t m_new = max(m_old, chunk_max);
        const acc_t e = lane < keys ? std::exp(s - m_new) : acc_t(0);
        if (lane < keys) pr[lane] = e;
        const acc_t rescale = std::exp(m_old - m_new);
        const acc_t l_new = l_old * rescale + warp_sum(e);
        __syncwarp();  // every lane has read m_run[r] and l_run[r] before lane 0 replaces them
        if (lane == 0) {
          m_run[r] = m_new;
          l_run[r] = l_new;
          alpha[r] = rescale;
          if (last) lse[(b * H + h) * Nq + row0 + r] = m_new + std::log(l_new);
        }
      }
      __syncthreads();

      for (int p = threadIdx.x; p < rows * hd; p += blockDim.x) {
        const int r = p / hd, c = p % hd;
        acc_t* o = xo + r * D + h * hd + c;
        const acc_t* pr = ps + r * kKeys;
        acc_t acc = first ? acc_t(0) : *o * alpha[r];
        for (int j = 0; j < keys; ++j) acc += pr[j] * vs[j * hd + c];
        *o = last ? static_cast<acc_t>(static_cast<scalar_t>(acc / l_run[r])) : acc;
      }
      __syncthreads();
    }
  }

  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) o_out[base + i] = static_cast<scalar_t>(xo[i]);
  project<kRows>(xo, out_weight, D, rows, [&](int r, int n, acc_t y) {
    qs[r * D + n] = static_cast<acc_t>(x[base + r * D + n]) + (y + static_cast<acc_t>(out_bias[n]));
  });
  __syncthreads();
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) out[base + i] = static_cast<scalar_t>(qs[i]);
}

template <typename scalar_t, int kRows>
void launch(const at::Tensor& x, const at::Tensor& kv, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
            const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& out_weight,
            const at::Tensor& out_bias, int64_t num_heads, double eps, at::Tensor& out, at::Tensor& q, at::Tensor& o,
            at::Tensor& lse, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2), hd = D / num_heads;
  const size_t smem = smem_bytes<kRows, acc_t>(D, hd);
  const int optin = max_smem_optin();
  TORCH_CHECK(smem <= static_cast<size_t>(optin), "lifeiqa_fast.cross_attention: D = ", D, " and head_dim = ", hd,
              " need ", smem, " bytes of shared memory per block (", kRows, " query rows of D values twice, ",
              kKeys, " keys and values of one head); this GPU allows ", optin);
  auto kernel = _cross_attention_fwd_kernel<scalar_t, kRows>;
  if (smem > 48 * 1024) allow_max_smem(kernel);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((Nq + kRows - 1) / kRows));
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), kv.const_data_ptr<scalar_t>(), kv.stride(0), kv.stride(1), kv.stride(2),
      norm_weight.const_data_ptr<scalar_t>(), norm_bias.const_data_ptr<scalar_t>(),
      q_weight.const_data_ptr<scalar_t>(), q_bias.const_data_ptr<scalar_t>(), out_weight.const_data_ptr<scalar_t>(),
      out_bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), q.mutable_data_ptr<scalar_t>(),
      o.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(),
      static_cast<int>(Nq), static_cast<int>(kv.size(1)), static_cast<int>(D), static_cast<int>(num_heads),
      static_cast<acc_t>(eps), static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(hd))));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_cuda(
    const at::Tensor& x, const at::Tensor& kv, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
    int64_t num_heads, double eps) {
  check_cross_attention_input(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, Nq, D}, x.options());
  at::Tensor q = at::empty({B, Nq, D}, x.options());
  at::Tensor o = at::empty({B, Nq, D}, x.options());
  at::Tensor lse = at::empty({B, num_heads, Nq}, x.options().dtype(acc_type));
  at::Tensor stats = at::empty({B, Nq, 2}, x.options().dtype(acc_type));
  if (B == 0) return {out, q, o, lse, stats};
  // 16 rows a block for Nq > 8 where their shared memory fits (fp64 from D = 768 at head_dim 64 does not),
  // else 8 rows a block and more blocks an image.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_attention_cuda", [&] {
    const size_t smem16 = smem_bytes<16, at::opmath_type<scalar_t>>(D, D / num_heads);
    if (Nq > 8 && smem16 <= static_cast<size_t>(max_smem_optin())) {
      launch<scalar_t, 16>(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps,
                           out, q, o, lse, stats);
    } else {
      launch<scalar_t, 8>(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps, out,
                          q, o, lse, stats);
    }
  });
  return {out, q, o, lse, stats};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CUDA, m) { m.impl("cross_attention", &lifeiqa_fast::cross_attention_cuda); }
