// CUDA kernel of lifeiqa_fast::moe: router, top-k, gates, the experts' MLPs, their gated sum, and the
// aux and z losses, with no host synchronisation (every shape follows from the inputs' shapes, so the
// op can be captured in a CUDA graph).
//
// Launches, in stream order:
//   1. _moe_route_kernel, a warp per token: logits, logsumexp, top-k, gates; per expert its gate sum
//      and pair count (atomics into a zeroed workspace), and for "grouped" the token's pairs scattered
//      into their experts' segments of a permutation.
//   2. _moe_loss_kernel, one thread: aux and z from the workspace.
//   3. The two layers of the chosen experts, each a launch: "grouped", a tiled GEMM per expert over
//      the pairs of its segment (_moe_grouped_kernel); "dense" (few tokens), a block per pair and
//      column chunk reading the chosen expert's weight rows directly (_moe_pair_kernel).
//   4. _moe_combine_kernel: out = sum_j gate_j expert_out_j, a thread per output element.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "moe.h"
#include "common.cuh"

namespace lifeiqa_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRouteChunk = 8;  // experts whose router rows a warp reads in one pass over x
constexpr int kPairCols = 4;    // output columns per warp of _moe_pair_kernel
constexpr int kTileM = 64;      // pairs per tile of _moe_grouped_kernel
constexpr int kTileN = 64;      // output columns per tile
constexpr int kTileK = 32;      // reduction step
constexpr int kMicro = 4;       // a thread's outputs per dimension: rows ty + 16 i, columns tx + 16 j
constexpr int kLoads = kTileM * kTileK / kThreads;  // elements of each operand tile a thread loads
constexpr int kMaxGridYZ = 65535;
static_assert(kTileM == kTileN, "one loader index serves both operand tiles");
static_assert(kTileM == 16 * kMicro && kThreads == 16 * 16, "a 16 x 16 thread grid covers the tile");
static_assert(kTileM * kTileK % kThreads == 0, "every thread loads the same number of elements");

// Whether logit (va, ia) ranks before (vb, ib) in torch.topk's order: NaN first, then larger values,
// equal values by lower expert index. A strict total order, so the k-th choice is the first-ranked
// logit ranked after the (k-1)-th, and no chosen-flags are needed.
// acc[c] = sum_k a[k] * w[c * K + k] for c < rows (0 for c >= rows), on every lane of the warp: a
// vector times up to C consecutive weight rows, the lanes striding over k so that each row is read
// coalesced. Serves the router (x by kRouteChunk experts' rows) and _moe_pair_kernel.
template <int C, typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_dot_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ w,
                                              int64_t K, int rows, acc_t (&acc)[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = acc_t(0);
  for (int64_t kk = threadIdx.x % 32; kk < K; kk += 32) {
    const acc_t av = static_cast<acc_t>(a[kk]);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c < rows) acc[c] += av * static_cast<acc_t>(w[c * K + kk]);
    }
  }
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = warp_sum(acc[c]);
}

template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t va, int ia, acc_t vb, int ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

// Warp w of block b: token t = b * kWarps + w. Logits rounded to x's dtype (F.linear's, so that
// top-k and its ties see what the reference sees), written to logits (T, E) and read back by the
// lanes after __syncwarp. Round r of top-k: each lane takes the first-ranked of its experts e = lane,
// lane + 32, ... ranked after round r - 1's choice, and a butterfly leaves the warp's first on every
// lane. Gates exp(v_r - v_0) / sum_r exp(v_r - v_0); lane r % 32 writes choice r. Per pair (t, r)
// with expert e: gate_sum[e] += gate, slot = counts[e]++, and perm[e * T + slot] = t * k + r (a token
// picks an expert at most once, so T slots an expert suffice). E.g. T = 3, k = 2, choices
// {0, 2}, {2, 1}, {0, 2} of E = 3: counts {2, 1, 3}, perm {0, 4, -, 3, -, -, 1, 2, 5} up to the order
// within each segment, which the atomics leave arbitrary (each pair's outputs are its own rows).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _moe_route_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ router_weight,
                      const scalar_t* __restrict__ router_bias, at::opmath_type<scalar_t>* logits,
                      int64_t* indices, at::opmath_type<scalar_t>* gates, at::opmath_type<scalar_t>* gate_sum,
                      at::opmath_type<scalar_t>* lse_sq_sum, int* counts, int* perm, int64_t T, int D, int E,
                      int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= T) return;  // warp-uniform; the kernel has no block barrier
  const scalar_t* xt = x + t * D;
  acc_t* lt = logits + t * E;

  for (int e0 = 0; e0 < E; e0 += kRouteChunk) {
    acc_t acc[kRouteChunk];
    warp_dot_rows(xt, router_weight + static_cast<int64_t>(e0) * D, D, E - e0, acc);
#pragma unroll
    for (int c = 0; c < kRouteChunk; ++c) {
      if (lane == c && e0 + c < E) {
        lt[e0 + c] = static_cast<acc_t>(static_cast<scalar_t>(acc[c] + static_cast<acc_t>(router_bias[e0 + c])));
      }
    }
  }
  __syncwarp();  // orders the logits' stores before every lane's loads

  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int e = lane; e < E; e += 32) m = max(m, lt[e]);
  m = warp_max(m);
  acc_t s = 0;
  for (int e = lane; e < E; e += 32) s += std::exp(lt[e] - m);
  s = warp_sum(s);
  const acc_t lse = std::isinf(m) ? m : m + std::log(s);  // all -inf, or some +inf: logsumexp's own value

  acc_t last_v = 0, top_v = 0, denom = 0;
  int last_i = -1;
  for (int r = 0; r < k; ++r) {
    acc_t best_v = 0;
    int best_i = E;  // none yet
    for (int e = lane; e < E; e += 32) {
      const acc_t v = lt[e];
      if ((last_i < 0 || ranks_before(last_v, last_i, v, e)) && (best_i == E || ranks_before(v, e, best_v, best_i))) {
        best_v = v;
        best_i = e;
      }
    }
#pragma unroll
    for (int sh = 16; sh >= 1; sh /= 2) {
      const acc_t ov = __shfl_xor_sync(kFullMask, best_v, sh);
      const int oi = __shfl_xor_sync(kFullMask, best_i, sh);
      if (oi != E && (best_i == E || ranks_before(ov, oi, best_v, best_i))) {
        best_v = ov;
        best_i = oi;
      }
    }
    if (r == 0) top_v = best_v;
    const acc_t g = std::exp(best_v - top_v);
    denom += g;
    if (lane == r % 32) {
      indices[t * k + r] = best_i;
      gates[t * k + r] = g;  // normalised below by the same lane
    }
    last_v = best_v;
    last_i = best_i;
  }
  for (int r = lane; r < k; r += 32) {
    const int64_t p = t * k + r;
    const acc_t g = gates[p] / denom;
    gates[p] = g;
    const int e = static_cast<int>(indices[p]);
    atomicAdd(gate_sum + e, g);
    const int slot = atomicAdd(counts + e, 1);
    if (perm != nullptr) perm[e * T + slot] = static_cast<int>(p);
  }
  if (lane == 0) atomicAdd(lse_sq_sum, lse * lse);
}

// aux = E * sum_e (gate_sum_e / T) (count_e / T), z = sum_t lse_t^2 / T; NaN for T = 0, as the
// reference's means of nothing.
template <typename acc_t>
__global__ void _moe_loss_kernel(const acc_t* __restrict__ gate_sum, const acc_t* __restrict__ lse_sq_sum,
                                 const int* __restrict__ counts, acc_t* __restrict__ aux, acc_t* __restrict__ z,
                                 int64_t T, int E) {
  const acc_t n = static_cast<acc_t>(T);
  acc_t s = 0;
  for (int e = 0; e < E; ++e) s += gate_sum[e] / n * (static_cast<acc_t>(counts[e]) / n);
  *aux = static_cast<acc_t>(E) * s;
  *z = *lse_sq_sum / n;
}

// Output (pair p, column n) of a layer from its dot product: + bias; for the first layer (kHidden)
// ReLU and the dropout mask (T, k, F) = (P, N); rounded once to scalar_t.
template <bool kHidden, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_expert(acc_t acc, int64_t p, int n, int N, const scalar_t* __restrict__ bias,
                                             const scalar_t* __restrict__ mask, scalar_t* __restrict__ out) {
  acc_t v = acc + static_cast<acc_t>(bias[n]);
  if constexpr (kHidden) {
    v = v < acc_t(0) ? acc_t(0) : v;
    if (mask != nullptr) v *= static_cast<acc_t>(mask[p * N + n]);
  }
  out[p * N + n] = static_cast<scalar_t>(v);
}

// One layer of the chosen experts, grouped: out[p, n] = act(sum_k A[p, k] W[e, n, k] + bias[e, n])
// for the pairs p of expert e's segment perm[e * T ..] (counts[e] of them). A is x (row p / top_k)
// for the first layer (kHidden), hidden (row p) for the second; W (E, N, K) as nn.Linear stores it.
// Block (row tile, column tile, e): pairs row0 .. row0 + 63 of the segment (tiles past counts[e] exit
// at once: the grid covers T rows an expert) by columns n0 .. n0 + 63. Both operands are read along K,
// a warp reading one row's 32 consecutive values, and stored transposed into shared memory (padded,
// so that those 32 stores hit 32 banks); the next K step is loaded into registers while this one is
// multiplied. Thread (ty, tx) = (tid / 16, tid % 16) accumulates rows ty + 16 i, columns tx + 16 j.
template <typename scalar_t, bool kHidden>
__global__ void __launch_bounds__(kThreads)
    _moe_grouped_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ w,
                        const scalar_t* __restrict__ bias, const scalar_t* __restrict__ mask,
                        scalar_t* __restrict__ out, const int* __restrict__ counts, const int* __restrict__ perm,
                        int64_t T, int K, int N, int top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t As[kTileK][kTileM + 1];
  __shared__ acc_t Bs[kTileK][kTileN + 1];
  __shared__ int pairs[kTileM];  // pair id of each tile row, -1 past the segment's count
  const int e = blockIdx.z;
  const int count = counts[e];
  const int row0 = blockIdx.x * kTileM;
  if (row0 >= count) return;  // block-uniform, before any barrier
  const int n0 = blockIdx.y * kTileN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  if (tid < kTileM) pairs[tid] = row0 + tid < count ? perm[e * T + row0 + tid] : -1;
  __syncthreads();

  const scalar_t* we = w + static_cast<int64_t>(e) * N * K;
  acc_t ra[kLoads], rb[kLoads];
  // Loader element i = tid + l * kThreads of a tile: row (or column) i / kTileK, K offset i % kTileK.
  auto load = [&](int k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int i = tid + l * kThreads, r = i / kTileK, kg = k0 + i % kTileK;
      const int p = pairs[r];
      const int64_t arow = kHidden ? p / top_k : p;
      ra[l] = p >= 0 && kg < K ? static_cast<acc_t>(a[arow * K + kg]) : acc_t(0);
      rb[l] = n0 + r < N && kg < K ? static_cast<acc_t>(we[static_cast<int64_t>(n0 + r) * K + kg]) : acc_t(0);
    }
  };
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);

  load(0);
  for (int k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int i = tid + l * kThreads;
      As[i % kTileK][i / kTileK] = ra[l];
      Bs[i % kTileK][i / kTileK] = rb[l];
    }
    __syncthreads();
    if (k0 + kTileK < K) load(k0 + kTileK);
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t av[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }

  const scalar_t* be = bias + static_cast<int64_t>(e) * N;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int p = pairs[ty + 16 * i];
    if (p < 0) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n < N) store_expert<kHidden>(acc[i][j], p, n, N, be, mask, out);
    }
  }
}

// One layer of the chosen experts, a pair at a time (few tokens): block (p, c) computes columns
// c * 32 .. c * 32 + 31 of pair p with its expert e = indices[p], a warp kPairCols columns, its lanes
// striding over K so that each weight row is read coalesced. A and W as in _moe_grouped_kernel.
template <typename scalar_t, bool kHidden>
__global__ void __launch_bounds__(kThreads)
    _moe_pair_kernel(const scalar_t* __restrict__ a, const int64_t* __restrict__ indices,
                     const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                     const scalar_t* __restrict__ mask, scalar_t* __restrict__ out, int K, int N, int top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.y * kWarps + threadIdx.x / 32) * kPairCols;
  if (n0 >= N) return;  // warp-uniform; the kernel has no block barrier
  const int64_t p = blockIdx.x;
  const int64_t e = indices[p];
  const scalar_t* ap = a + (kHidden ? p / top_k : p) * K;
  const scalar_t* wn = w + (e * N + n0) * K;
  acc_t acc[kPairCols];
  warp_dot_rows(ap, wn, K, N - n0, acc);
#pragma unroll
  for (int c = 0; c < kPairCols; ++c) {
    if (lane == 0 && n0 + c < N) store_expert<kHidden>(acc[c], p, n0 + c, N, bias + e * N, mask, out);
  }
}

// out[t, d] = sum_j gates[t, j] expert_out[t, j, d], accumulated in acc_t in the order of the choices
// (the reference's ascending expert order differs only by acc_t rounding), rounded once.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _moe_combine_kernel(const at::opmath_type<scalar_t>* __restrict__ gates, const scalar_t* __restrict__ expert_out,
                        scalar_t* __restrict__ out, int64_t T, int D, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = T * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / D, d = i % D;
    acc_t acc = 0;
    for (int j = 0; j < k; ++j) {
      acc += gates[t * k + j] * static_cast<acc_t>(expert_out[(t * k + j) * D + d]);
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

unsigned blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

// Every launch of the op for T >= 0 tokens; nothing is launched with an empty grid.
template <typename scalar_t>
void moe_forward(const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& router_bias,
                 const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t k,
                 const std::optional<at::Tensor>& dropout_mask, bool dense, at::Tensor& out, at::Tensor& aux,
                 at::Tensor& z, at::Tensor& logits, at::Tensor& indices, at::Tensor& gates, at::Tensor& hidden,
                 at::Tensor& expert_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), F = w1.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Workspace: gate sums (E) and the sum of lse^2 (1), pair counts (E); zeroed by a kernel, not the host.
  const at::Tensor sums = at::zeros({E + 1}, logits.options());
  const at::Tensor counts = at::zeros({E}, x.options().dtype(at::kInt));
  const at::Tensor perm = dense ? at::Tensor() : at::empty({E * T}, x.options().dtype(at::kInt));
  acc_t* gate_sum = sums.mutable_data_ptr<acc_t>();
  acc_t* lse_sq_sum = gate_sum + E;
  int* count_ptr = counts.mutable_data_ptr<int>();
  int* perm_ptr = dense ? nullptr : perm.mutable_data_ptr<int>();

  if (T > 0) {
    _moe_route_kernel<scalar_t><<<blocks_for(T, kWarps), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), router_weight.const_data_ptr<scalar_t>(), router_bias.const_data_ptr<scalar_t>(),
        logits.mutable_data_ptr<acc_t>(), indices.mutable_data_ptr<int64_t>(), gates.mutable_data_ptr<acc_t>(),
        gate_sum, lse_sq_sum, count_ptr, perm_ptr, T, static_cast<int>(D), static_cast<int>(E),
        static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  _moe_loss_kernel<acc_t><<<1, 1, 0, stream>>>(gate_sum, lse_sq_sum, count_ptr, aux.mutable_data_ptr<acc_t>(),
                                                z.mutable_data_ptr<acc_t>(), T, static_cast<int>(E));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (T == 0) return;

  const scalar_t* mask = dropout_mask.has_value() ? dropout_mask->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* h = hidden.mutable_data_ptr<scalar_t>();
  scalar_t* y = expert_out.mutable_data_ptr<scalar_t>();
  if (dense) {
    const int64_t P = T * k;
    _moe_pair_kernel<scalar_t, true><<<dim3(static_cast<unsigned>(P), blocks_for(F, kWarps * kPairCols)), kThreads,
                                       0, stream>>>(x.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
                                                    w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(),
                                                    mask, h, static_cast<int>(D), static_cast<int>(F),
                                                    static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _moe_pair_kernel<scalar_t, false><<<dim3(static_cast<unsigned>(P), blocks_for(D, kWarps * kPairCols)),
                                        kThreads, 0, stream>>>(h, indices.const_data_ptr<int64_t>(),
                                                               w2.const_data_ptr<scalar_t>(),
                                                               b2.const_data_ptr<scalar_t>(), nullptr, y,
                                                               static_cast<int>(F), static_cast<int>(D),
                                                               static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const unsigned row_tiles = blocks_for(T, kTileM);
    _moe_grouped_kernel<scalar_t, true>
        <<<dim3(row_tiles, blocks_for(F, kTileN), static_cast<unsigned>(E)), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(), mask, h,
            count_ptr, perm_ptr, T, static_cast<int>(D), static_cast<int>(F), static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _moe_grouped_kernel<scalar_t, false>
        <<<dim3(row_tiles, blocks_for(D, kTileN), static_cast<unsigned>(E)), kThreads, 0, stream>>>(
            h, w2.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), nullptr, y, count_ptr, perm_ptr, T,
            static_cast<int>(F), static_cast<int>(D), static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t combine_blocks = std::min<int64_t>((T * D + kThreads - 1) / kThreads, int64_t{1} << 20);
  _moe_combine_kernel<scalar_t><<<static_cast<unsigned>(combine_blocks), kThreads, 0, stream>>>(
      gates.const_data_ptr<acc_t>(), y, out.mutable_data_ptr<scalar_t>(), T, static_cast<int>(D),
      static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_cuda(
    const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& router_bias, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t top_k,
    const std::optional<at::Tensor>& dropout_mask, bool dense) {
  check_moe_input(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), F = w1.size(1), k = top_k;
  // Pair ids and per-expert counts are int32; the grouped GEMM's grid holds E in z and the column
  // tiles in y, the per-pair kernel its column chunks in y (each at most 65535).
  TORCH_CHECK(T * k <= std::numeric_limits<int>::max(), "lifeiqa_fast.moe: T * top_k = ", T * k,
              " (token, expert) pairs exceed the CUDA kernel's int32 pair ids");
  TORCH_CHECK(E <= kMaxGridYZ && (std::max(D, F) + kWarps * kPairCols - 1) / (kWarps * kPairCols) <= kMaxGridYZ,
              "lifeiqa_fast.moe: the CUDA kernel takes E <= ", kMaxGridYZ, " experts and D, F <= ",
              int64_t{kMaxGridYZ} * kWarps * kPairCols, ", got E = ", E, ", D = ", D, ", F = ", F);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  at::Tensor out = at::empty({T, D}, x.options());
  at::Tensor aux = at::empty({}, acc_options);
  at::Tensor z = at::empty({}, acc_options);
  at::Tensor logits = at::empty({T, E}, acc_options);
  at::Tensor indices = at::empty({T, k}, x.options().dtype(at::kLong));
  at::Tensor gates = at::empty({T, k}, acc_options);
  at::Tensor hidden = at::empty({T, k, F}, x.options());
  at::Tensor expert_out = at::empty({T, k, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_cuda", [&] {
    moe_forward<scalar_t>(x, router_weight, router_bias, w1, b1, w2, b2, k, dropout_mask, dense, out, aux, z, logits,
                          indices, gates, hidden, expert_out);
  });
  return {out, aux, z, logits, indices, gates, hidden, expert_out};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CUDA, m) { m.impl("moe", &lifeiqa_fast::moe_cuda); }
