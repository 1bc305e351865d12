// Products of a few rows with a matrix, bound by reading the matrix: one image's query tokens, or the
// tokens one expert was given. Each row of the matrix is read once for all rows, into eight-float
// accumulators per row (BLAS packs the weight per call instead: about half the speed at a few rows).
// Weights in fp32 or bf16, arithmetic in fp32. Inlined into each ISA build of its caller (cpu.h).
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#include "cpu.h"
#include "vec8.h"

namespace lifeiqa_fast {

constexpr int kFewRows = 8;  // the most rows one call takes (the accumulators stay in registers)

// Eight bf16 values widened to fp32 (a bf16 is the high half of an fp32).
LIFEIQA_CPU_INLINE void load8(vec8& v, const c10::BFloat16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  std::memcpy(&v, &w, sizeof(v));
}

// Outputs [o, o + U) of few_rows_linear_r: U weight rows per pass, U * R accumulators, so that each
// row of x loaded serves U products.
template <int U, int R, typename T>
LIFEIQA_CPU_INLINE void few_rows_linear_block(const float* __restrict__ x, int64_t ldx, int64_t K,
                                              const T* __restrict__ W, const T* __restrict__ b, int64_t o,
                                              float* __restrict__ y, int64_t ldy) {
  vec8 acc[U][R], wv[U], xv;
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = vec8{};
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    // the same columns of the next pass's rows, one pass (~K / 8 iterations) ahead of their use
    if (c % (64 / sizeof(T)) == 0)
      for (int u = 0; u < U; ++u) __builtin_prefetch(W + (o + U + u) * K + c);
    for (int u = 0; u < U; ++u) load8(wv[u], W + (o + u) * K + c);
    for (int r = 0; r < R; ++r) {
      load8(xv, x + r * ldx + c);
      for (int u = 0; u < U; ++u) acc[u][r] += xv * wv[u];
    }
  }
  for (int u = 0; u < U; ++u) {
    const T* __restrict__ w = W + (o + u) * K;
    for (int r = 0; r < R; ++r) {
      float sum = sum8(acc[u][r]);
      for (int64_t cc = c; cc < K; ++cc) sum += x[r * ldx + cc] * static_cast<float>(w[cc]);
      y[r * ldy + o + u] = b != nullptr ? sum + static_cast<float>(b[o + u]) : sum;
    }
  }
}

// Weight rows (or columns) per pass at R rows: 2 * R accumulators fit AVX2's 16 vector registers up to
// R = 6 (Life-IQA's query tokens).
template <int R>
constexpr int kPass = R <= 6 ? 2 : 1;

// y[r * ldy + o] = x[r * ldx + :K] . W[o * K + :K] + (b ? b[o] : 0) for r < R, o < n; W (n, K) row-major:
// each weight row read once for all R rows.
// Example: R = 1, K = 2, x = (1, 2), W = ((3, 4)), b = (5) gives y = (16).
template <int R, typename T>
LIFEIQA_CPU_INLINE void few_rows_linear_r(const float* __restrict__ x, int64_t ldx, int64_t K, const T* __restrict__ W,
                                          const T* __restrict__ b, int64_t n, float* __restrict__ y, int64_t ldy) {
  constexpr int U = kPass<R>;
  int64_t o = 0;
  for (; o + U <= n; o += U) few_rows_linear_block<U, R>(x, ldx, K, W, b, o, y, ldy);
  for (; o < n; ++o) few_rows_linear_block<1, R>(x, ldx, K, W, b, o, y, ldy);
}

// Columns [c, c + 8U) of few_rows_matmul_r.
template <int U, int R, typename T>
LIFEIQA_CPU_INLINE void few_rows_matmul_block(const float* __restrict__ a, int64_t lda, int64_t J,
                                              const T* __restrict__ B, int64_t ldb, int64_t c, float* __restrict__ y,
                                              int64_t ldy) {
  vec8 acc[U][R], v[U];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = vec8{};
  for (int64_t j = 0; j < J; ++j) {
    // B's rows are read a few columns at a time: the columns two passes ahead, ahead of their use
    __builtin_prefetch(B + j * ldb + c + 16 * U);
    for (int u = 0; u < U; ++u) load8(v[u], B + j * ldb + c + 8 * u);
    for (int r = 0; r < R; ++r) {
      const float arj = a[r * lda + j];
      for (int u = 0; u < U; ++u) acc[u][r] += arj * v[u];
    }
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy + c + 8 * u, &acc[u][r], sizeof(vec8));
}

// y[r * ldy + c] = sum_j a[r * lda + j] B[j * ldb + c] for r < R, c < N: (R, J) x (J, N), B row-major,
// each row of B read once for all R rows.
// Example: R = 1, J = 2, a = (1, 2), B = ((3), (4)) gives y = (11).
template <int R, typename T>
LIFEIQA_CPU_INLINE void few_rows_matmul_r(const float* __restrict__ a, int64_t lda, int64_t J, const T* __restrict__ B,
                                          int64_t ldb, int64_t N, float* __restrict__ y, int64_t ldy) {
  constexpr int U = kPass<R>;
  int64_t c = 0;
  for (; c + 8 * U <= N; c += 8 * U) few_rows_matmul_block<U, R>(a, lda, J, B, ldb, c, y, ldy);
  for (; c + 8 <= N; c += 8) few_rows_matmul_block<1, R>(a, lda, J, B, ldb, c, y, ldy);
  for (; c < N; ++c) {
    for (int r = 0; r < R; ++r) {
      float sum = 0;
      for (int64_t j = 0; j < J; ++j) sum += a[r * lda + j] * static_cast<float>(B[j * ldb + c]);
      y[r * ldy + c] = sum;
    }
  }
}

// few_rows_linear_r for 1 <= rows <= kFewRows.
template <typename T>
LIFEIQA_CPU_INLINE void few_rows_linear(int64_t rows, const float* x, int64_t ldx, int64_t K, const T* W, const T* b,
                                        int64_t n, float* y, int64_t ldy) {
  static_assert(kFewRows == 8, "one case per row count");
  switch (rows) {
    case 1: return few_rows_linear_r<1>(x, ldx, K, W, b, n, y, ldy);
    case 2: return few_rows_linear_r<2>(x, ldx, K, W, b, n, y, ldy);
    case 3: return few_rows_linear_r<3>(x, ldx, K, W, b, n, y, ldy);
    case 4: return few_rows_linear_r<4>(x, ldx, K, W, b, n, y, ldy);
    case 5: return few_rows_linear_r<5>(x, ldx, K, W, b, n, y, ldy);
    case 6: return few_rows_linear_r<6>(x, ldx, K, W, b, n, y, ldy);
    case 7: return few_rows_linear_r<7>(x, ldx, K, W, b, n, y, ldy);
    default: return few_rows_linear_r<8>(x, ldx, K, W, b, n, y, ldy);
  }
}

}  // namespace lifeiqa_fast
