// The contract of lifeiqa_fast::moe, checked by every backend before it launches.
//
// Top-k routed mixture of E experts on T tokens (SPEC step 6): logits = x Wr^T + br; the k largest
// logits of a token (torch.topk's order and ties) are softmaxed into its gates; expert e is
// relu(x W1[e]^T + b1[e]) (times the dropout mask, in training) W2[e]^T + b2[e]; out = sum over the
// chosen experts of gate * expert output, summed in ascending expert order. aux = E * sum_e mean_t
// (gate of e) * mean_t (count of e), z = mean_t logsumexp(logits_t)^2. Alongside out, aux and z the
// op returns what its backward needs:
//   logits     (T, E)     fp32 (fp64 for fp64): the router's logits
//   indices    (T, k)     int64: the chosen experts, in torch.topk's order
//   gates      (T, k)     fp32 (fp64 for fp64): softmax over the chosen logits
//   hidden     (T, k, F)  x's dtype: relu(x W1^T + b1) of each chosen expert, times the dropout mask
//   expert_out (T, k, D)  x's dtype: hidden W2^T + b2 of each chosen expert, before its gate
// aux and z are 0-d, fp32 (fp64 for fp64).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace lifeiqa_fast {

inline void check_moe_input(const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& router_bias,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            int64_t top_k, const std::optional<at::Tensor>& dropout_mask) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1 && x.is_contiguous(),
              "lifeiqa_fast.moe: x must be a contiguous (T, D) tensor, got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) >= 1 && router_weight.size(1) == D,
              "lifeiqa_fast.moe: router_weight must have shape (E, D) with D = ", D, ", got ", router_weight.sizes());
  const int64_t E = router_weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "lifeiqa_fast.moe: top_k must be in [1, E = ", E, "], got ", top_k);
  TORCH_CHECK(w1.dim() == 3 && w1.size(0) == E && w1.size(2) == D && w1.size(1) >= 1,
              "lifeiqa_fast.moe: w1 must have shape (E, F, D) with E = ", E, ", D = ", D, ", got ", w1.sizes());
  const int64_t F = w1.size(1);
  TORCH_CHECK(w2.sizes() == at::IntArrayRef({E, D, F}), "lifeiqa_fast.moe: w2 must have shape (E, D, F) = (", E,
              ", ", D, ", ", F, "), got ", w2.sizes());
  TORCH_CHECK(router_bias.sizes() == at::IntArrayRef({E}) && b1.sizes() == at::IntArrayRef({E, F}) &&
                  b2.sizes() == at::IntArrayRef({E, D}),
              "lifeiqa_fast.moe: router_bias, b1, b2 must have shapes (E,), (E, F), (E, D) = (", E, ",), (", E, ", ",
              F, "), (", E, ", ", D, "), got ", router_bias.sizes(), ", ", b1.sizes(), ", ", b2.sizes());
  for (const at::Tensor* t : {&router_weight, &router_bias, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device() && t->is_contiguous(),
                "lifeiqa_fast.moe: weights and biases must be contiguous, of x's dtype and device (", x.scalar_type(),
                ", ", x.device(), "), got ", t->scalar_type(), ", ", t->device());
  }
  if (dropout_mask.has_value()) {
    TORCH_CHECK(dropout_mask->sizes() == at::IntArrayRef({T, top_k, F}) &&
                    dropout_mask->scalar_type() == x.scalar_type() && dropout_mask->device() == x.device() &&
                    dropout_mask->is_contiguous(),
                "lifeiqa_fast.moe: dropout_mask must be None or a contiguous (T, top_k, F) = (", T, ", ", top_k, ", ",
                F, ") tensor of x's dtype and device, got ", dropout_mask->sizes());
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lifeiqa_fast.moe: x must be a floating tensor, got ",
              x.scalar_type());
}

}  // namespace lifeiqa_fast
