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

#include "check.h"

namespace lifeiqa_fast {

inline void check_moe_input(const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& router_bias,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            int64_t top_k, const std::optional<at::Tensor>& dropout_mask) {
  const char* op = "moe";
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()) && x.size(1) >= 1,
              "lifeiqa_fast.moe: x must be a floating (T, D) tensor, D >= 1, got ", dtype_text(x.scalar_type()), " ",
              shape_text(x.sizes()));
  const int64_t T = x.size(0), D = x.size(1);
  const int64_t E = agreed_size({size_if(router_weight, 2, 0), size_if(router_bias, 1, 0), size_if(w1, 3, 0),
                                 size_if(b1, 2, 0), size_if(w2, 3, 0), size_if(b2, 2, 0)});
  const int64_t F = agreed_size({size_if(w1, 3, 1), size_if(b1, 2, 1), size_if(w2, 3, 2)});
  TORCH_CHECK(top_k >= 1 && top_k <= E, "lifeiqa_fast.moe: top_k must be an int in [1, E=", E, "], got ", top_k);
  TORCH_CHECK(F != 0, "lifeiqa_fast.moe: w1 must have shape (E, F, D) with F >= 1, got ", shape_text(w1.sizes()));
  check_shape(op, "router_weight", router_weight, "(E, D)", {E, D});
  check_shape(op, "router_bias", router_bias, "(E,)", {E});
  check_shape(op, "w1", w1, "(E, F, D)", {E, F, D});
  check_shape(op, "b1", b1, "(E, F)", {E, F});
  check_shape(op, "w2", w2, "(E, D, F)", {E, D, F});
  check_shape(op, "b2", b2, "(E, D)", {E, D});
  if (dropout_mask.has_value()) check_shape(op, "dropout_mask", *dropout_mask, "(T, top_k, F)", {T, top_k, F});
  check_like_x(op, x, {{"router_weight", &router_weight}, {"router_bias", &router_bias}, {"w1", &w1}, {"b1", &b1},
                       {"w2", &w2}, {"b2", &b2}});
  if (dropout_mask.has_value()) check_like_x(op, x, {{"dropout_mask", &*dropout_mask}});
  check_contiguous(op, {{"x", &x}, {"router_weight", &router_weight}, {"router_bias", &router_bias}, {"w1", &w1},
                        {"b1", &b1}, {"w2", &w2}, {"b2", &b2}});
  if (dropout_mask.has_value()) check_contiguous(op, {{"dropout_mask", &*dropout_mask}});
}

}  // namespace lifeiqa_fast
