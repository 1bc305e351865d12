// Shared by the CPU kernels: function multi-versioning and the thread-pool grain.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace lifeiqa_fast {

// Hot loops are compiled twice, for AVX2 + FMA and for the baseline x86-64 ISA, and the CPU picks at run
// time (cpu_has_avx2_fma), so one build is both fast and portable. LIFEIQA_FAST_CPU_ISA=baseline in the
// environment (read once, at load) or the op set_cpu_isa("baseline") makes every kernel take its
// baseline build on any CPU: the tests check both builds on one machine that way.
inline std::atomic<bool>& baseline_forced() {
  static std::atomic<bool> forced{[] {
    const char* isa = std::getenv("LIFEIQA_FAST_CPU_ISA");
    return isa != nullptr && std::string(isa) == "baseline";
  }()};
  return forced;
}

// Whether the kernels run their AVX2 + FMA builds: the CPU has both and the baseline is not forced.
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes && !baseline_forced().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// The body of a hot loop, inlined into each of its builds (LIFEIQA_CPU_DISPATCH).
#define LIFEIQA_CPU_INLINE __attribute__((always_inline)) inline

// LIFEIQA_CPU_DISPATCH(name) after `template <typename T> LIFEIQA_CPU_INLINE void name##_impl(...)`
// defines name<T>(args...): name##_impl<T> compiled for AVX2 + FMA or for the baseline ISA, the one
// cpu_has_avx2_fma() says. (GCC inlines a baseline body into a target("avx2,fma") function and
// compiles it with that target there.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LIFEIQA_CPU_DISPATCH(name)                                                                            \
  template <typename T, typename... Args>                                                                    \
  __attribute__((target("avx2,fma"))) void name##_avx2(const Args&... args) {                                \
    name##_impl<T>(args...);                                                                                 \
  }                                                                                                          \
  template <typename T, typename... Args>                                                                    \
  void name##_baseline(const Args&... args) {                                                                \
    name##_impl<T>(args...);                                                                                 \
  }                                                                                                          \
  template <typename T, typename... Args>                                                                    \
  void name(const Args&... args) {                                                                           \
    cpu_has_avx2_fma() ? name##_avx2<T>(args...) : name##_baseline<T>(args...);                              \
  }
#else
#define LIFEIQA_CPU_DISPATCH(name)                                                                            \
  template <typename T, typename... Args>                                                                    \
  void name(const Args&... args) {                                                                           \
    name##_impl<T>(args...);                                                                                 \
  }
#endif

// Elements one task of the thread pool should cover at least: below this, a round trip through the
// pool costs more than the work it spreads (a batch-1 Life-IQA stage map is ~100k elements).
constexpr int64_t kMinElementsPerTask = 32768;

}  // namespace lifeiqa_fast
