// The contract of lifeiqa_fast::cross_attention, checked by every backend before it launches.
//
// out = x + out_proj(MHA(LayerNorm(x) q_weight^T + q_bias, K, V)) for one decoder layer, K = kv[:, :, 0],
// V = kv[:, :, 1] already projected, heads split along D, scores scaled by 1/sqrt(head_dim), softmax in
// fp32. Alongside out the op returns what its backward needs:
//   q     (B, Nq, D)   x's dtype: the projected query, rounded to x's dtype (the attention reads it so)
//   o     (B, Nq, D)   x's dtype: the attention output before out_proj, heads concatenated, rounded
//   lse   (B, H, Nq)   fp32 (fp64 for fp64): log-sum-exp over the keys of the scaled scores
//   stats (B, Nq, 2)   fp32 (fp64 for fp64): LayerNorm mean and 1/sqrt(var + eps) of each row of x
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "check.h"

namespace lifeiqa_fast {

constexpr int64_t kAttnMaxQueries = 64;   // query tokens per image
constexpr int64_t kAttnMaxHeadDim = 128;  // D / num_heads

inline void check_cross_attention_input(const at::Tensor& x, const at::Tensor& kv, const at::Tensor& norm_weight,
                                        const at::Tensor& norm_bias, const at::Tensor& q_weight,
                                        const at::Tensor& q_bias, const at::Tensor& out_weight,
                                        const at::Tensor& out_bias, int64_t num_heads) {
  const char* op = "cross_attention";
  TORCH_CHECK(x.dim() == 3, "lifeiqa_fast.cross_attention: x must have shape (B, Nq, D), got ", shape_text(x.sizes()));
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2);
  TORCH_CHECK(Nq >= 1, "lifeiqa_fast.cross_attention: x must have Nq >= 1 query tokens, got Nq=", Nq);
  check_floating(op, x);
  TORCH_CHECK(D >= 1 && num_heads >= 1 && D % num_heads == 0,
              "lifeiqa_fast.cross_attention: num_heads must be an int dividing D=", D, ", got ", num_heads);
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == B && kv.size(1) >= 1 && kv.size(2) == 2 && kv.size(3) == D,
              "lifeiqa_fast.cross_attention: kv must have shape (B, Nk, 2, D) with B=", B, ", Nk >= 1, D=", D,
              ", got ", shape_text(kv.sizes()));
  check_shape(op, "norm_weight", norm_weight, "(D,)", {D});
  check_shape(op, "norm_bias", norm_bias, "(D,)", {D});
  check_shape(op, "q_weight", q_weight, "(D, D)", {D, D});
  check_shape(op, "q_bias", q_bias, "(D,)", {D});
  check_shape(op, "out_weight", out_weight, "(D, D)", {D, D});
  check_shape(op, "out_bias", out_bias, "(D,)", {D});
  check_like_x(op, x, {{"kv", &kv}, {"norm_weight", &norm_weight}, {"norm_bias", &norm_bias},
                       {"q_weight", &q_weight}, {"q_bias", &q_bias}, {"out_weight", &out_weight},
                       {"out_bias", &out_bias}});
  TORCH_CHECK(Nq <= kAttnMaxQueries && D / num_heads <= kAttnMaxHeadDim, "lifeiqa_fast.cross_attention: the "
              "kernels take at most ", kAttnMaxQueries, " query tokens (kAttnMaxQueries) and heads of at most ",
              kAttnMaxHeadDim, " channels (kAttnMaxHeadDim), got Nq=", Nq, ", D / num_heads=", D / num_heads);
  TORCH_CHECK(kv.stride(3) == 1, "lifeiqa_fast.cross_attention: the kernels take a kv contiguous in its last "
              "dimension");
  check_contiguous(op, {{"x", &x}, {"norm_weight", &norm_weight}, {"norm_bias", &norm_bias}, {"q_weight", &q_weight},
                        {"q_bias", &q_bias}, {"out_weight", &out_weight}, {"out_bias", &out_bias}});
}

}  // namespace lifeiqa_fast
