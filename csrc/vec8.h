// Eight floats in one AVX2 register (two SSE registers on the baseline ISA): GCC/Clang vector
// extensions for the CPU kernels' hot loops, compiled for AVX2 + FMA and for the baseline ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lifeiqa_fast {

// The helpers take vectors by reference: a 32-byte vector passed by value has no stable ABI without AVX.
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline void load8(vec8& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }

__attribute__((always_inline)) inline float sum8(const vec8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x <= 0 (a score minus its row's maximum), within 2 ulp: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by the Cephes polynomial, 2^n put into the exponent bits. Below -87 (where exp underflows
// fp32's normal range) the result is exp(-87) ~ 1.6e-38, not 0: nothing next to a row sum >= 1.
// Example: x = -ln2 gives n = -1, r = 0, exp(r) = 1, so 0.5 exactly. In place.
__attribute__((always_inline)) inline void exp_nonpositive(vec8& x) {
  const vec8 lo = vec8{} - 87.0f;
  x = x < lo ? lo : x;
  const ivec8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec8);  // round to nearest, x <= 0
  const vec8 nf = __builtin_convertvector(n, vec8);
  const vec8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  // ln2 split in two for an exact first product
  vec8 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  ivec8 bits;
  std::memcpy(&bits, &y, sizeof(y));
  bits += n << 23;
  std::memcpy(&x, &bits, sizeof(x));
}

// s[0, n), n >= 1, replaced by its softmax in fp32, exponentials on eight-float vectors; returns the
// row's log-sum-exp. Example: s = (0, 0) becomes (0.5, 0.5) and returns log 2.
__attribute__((always_inline)) inline float softmax_row(float* __restrict__ s, int64_t n) {
  const float mx = *std::max_element(s, s + n);
  vec8 sums = vec8{}, e;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    load8(e, s + j);
    e -= mx;
    exp_nonpositive(e);
    std::memcpy(s + j, &e, sizeof(e));
    sums += e;
  }
  float sum = sum8(sums);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) s[j] *= inv;
  return mx + std::log(sum);
}

}  // namespace lifeiqa_fast
