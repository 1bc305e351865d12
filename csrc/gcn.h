// The contract of lifeiqa_fast::gcn, checked by every backend before it launches.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace lifeiqa_fast {

// Largest token count the kernels hold per image (one accumulator per token per thread on GPU).
constexpr int64_t kGcnMaxTokens = 32;

inline void check_gcn_input(const at::Tensor& x, const std::optional<at::Tensor>& adj, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& w3, const at::Tensor& b3) {
  TORCH_CHECK(x.dim() == 3, "lifeiqa_fast.gcn: x must have shape (B, N, D), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(N >= 1 && N <= kGcnMaxTokens, "lifeiqa_fast.gcn: x must have 1 <= N <= ", kGcnMaxTokens,
              " tokens, got N=", N);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == D, "lifeiqa_fast.gcn: w1 must have shape (D, H1) with D = ", D,
              ", got ", w1.sizes());
  const int64_t H1 = w1.size(1);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == H1, "lifeiqa_fast.gcn: w2 must have shape (H1, H2) with H1 = ", H1,
              ", got ", w2.sizes());
  const int64_t H2 = w2.size(1);
  TORCH_CHECK(w3.sizes() == at::IntArrayRef({H2, D}), "lifeiqa_fast.gcn: w3 must have shape (H2, D) = (", H2,
              ", ", D, "), got ", w3.sizes());
  TORCH_CHECK(b1.sizes() == at::IntArrayRef({H1}) && b2.sizes() == at::IntArrayRef({H2}) &&
                  b3.sizes() == at::IntArrayRef({D}),
              "lifeiqa_fast.gcn: b1, b2, b3 must have shapes (", H1, ",), (", H2, ",), (", D, ",), got ", b1.sizes(),
              ", ", b2.sizes(), ", ", b3.sizes());
  if (adj.has_value()) {
    const bool shared = adj->dim() == 2 && adj->size(0) == N && adj->size(1) == N;
    const bool per_sample = adj->dim() == 3 && adj->size(0) == B && adj->size(1) == N && adj->size(2) == N;
    TORCH_CHECK(shared || per_sample, "lifeiqa_fast.gcn: adj must have shape (N, N) or (B, N, N) = (", B, ", ", N,
                ", ", N, "), got ", adj->sizes());
  }
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2, &w3, &b3}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "lifeiqa_fast.gcn: weights and biases must have x's dtype and device (", x.scalar_type(), ", ",
                x.device(), "), got ", t->scalar_type(), ", ", t->device());
  }
  TORCH_CHECK(!adj.has_value() || (adj->scalar_type() == x.scalar_type() && adj->device() == x.device()),
              "lifeiqa_fast.gcn: adj must have x's dtype and device");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lifeiqa_fast.gcn: x must be a floating tensor, got ",
              x.scalar_type());
}

// The CPU kernel (csrc/gcn.cpp), for the decoder's fused layers (csrc/attend_memory.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gcn_cpu(const at::Tensor& x, const std::optional<at::Tensor>& adj,
                                                       const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2,
                                                       const at::Tensor& w3, const at::Tensor& b3);

}  // namespace lifeiqa_fast
