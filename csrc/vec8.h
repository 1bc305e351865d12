// Eight floats in one AVX2 register (two SSE registers on the baseline ISA): GCC/Clang vector
// extensions for the CPU kernels' hot loops, compiled for AVX2 + FMA and for the baseline ISA.
#pragma once

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

}  // namespace lifeiqa_fast
