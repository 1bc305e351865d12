// The contract of lifeiqa_fast::gcn, checked by every backend before it launches.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "check.h"

namespace lifeiqa_fast {

// Largest token count the kernels hold per image (one accumulator per token per thread on GPU).
constexpr int64_t kGcnMaxTokens = 32;

inline void check_gcn_input(const at::Tensor& x, const std::optional<at::Tensor>& adj, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& w3, const at::Tensor& b3) {
  TORCH_CHECK(x.dim() == 3, "lifeiqa_fast.gcn: x must have shape (B, N, D), got ", shape_text(x.sizes()));
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(N >= 1, "lifeiqa_fast.gcn: x must have N >= 1 tokens, got N=", N);
  check_floating("gcn", x);
  const int64_t H1 = agreed_size({size_if(w1, 2, 1), size_if(b1, 1, 0), size_if(w2, 2, 0)});
  const int64_t H2 = agreed_size({size_if(w2, 2, 1), size_if(b2, 1, 0), size_if(w3, 2, 0)});
  if (adj.has_value()) {
    const auto a = adj->sizes();
    TORCH_CHECK(a == at::IntArrayRef({N, N}) || a == at::IntArrayRef({B, N, N}),
                "lifeiqa_fast.gcn: adj must be None or have shape (N, N) = ", shape_text({N, N}),
                " or (B, N, N) = ", shape_text({B, N, N}), ", got ", shape_text(a));
  }
  check_shape("gcn", "w1", w1, "(D, H1)", {D, H1});
  check_shape("gcn", "b1", b1, "(H1,)", {H1});
  check_shape("gcn", "w2", w2, "(H1, H2)", {H1, H2});
  check_shape("gcn", "b2", b2, "(H2,)", {H2});
  check_shape("gcn", "w3", w3, "(H2, D)", {H2, D});
  check_shape("gcn", "b3", b3, "(D,)", {D});
  check_like_x("gcn", x, {{"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}, {"w3", &w3}, {"b3", &b3}});
  if (adj.has_value()) check_like_x("gcn", x, {{"adj", &*adj}});
  TORCH_CHECK(N <= kGcnMaxTokens, "lifeiqa_fast.gcn: the kernels hold at most ", kGcnMaxTokens,
              " tokens per image (kGcnMaxTokens), got N=", N);
}

// The CPU kernel (csrc/gcn.cpp), for the decoder's fused layers (csrc/attend_memory.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_cpu(const at::Tensor& x, const std::optional<at::Tensor>& adj,
                                                       const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3);

}  // namespace lifeiqa_fast
