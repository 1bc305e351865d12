// Shared by the CPU kernels: function multi-versioning and the thread-pool grain.
#pragma once

#include <cstdint>

namespace lifeiqa_fast {

// Hot loops are compiled twice, for AVX2 and for the baseline x86-64 ISA, and picked at load time by
// the CPU (GCC/Clang function multi-versioning), so one build is both fast and portable.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LIFEIQA_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LIFEIQA_CPU_CLONES
#endif

// Whether this CPU runs the kernels' AVX2 + FMA builds (target("avx2,fma") functions, picked at
// run time where target_clones cannot be used, e.g. for functions with vector arguments).
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// Elements one task of the thread pool should cover at least: below this, a round trip through the
// pool costs more than the work it spreads (a batch-1 Life-IQA stage map is ~100k elements).
constexpr int64_t kMinElementsPerTask = 32768;

}  // namespace lifeiqa_fast
