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

namespace lifeiqa_fast {

constexpr int64_t kAttnMaxQueries = 64;   // query tokens per image
constexpr int64_t kAttnMaxHeadDim = 128;  // D / num_heads

inline void check_cross_attention_input(const at::Tensor& x, const at::Tensor& kv, const at::Tensor& norm_weight,
                                        const at::Tensor& norm_bias, const at::Tensor& q_weight,
                                        const at::Tensor& q_bias, const at::Tensor& out_weight,
                                        const at::Tensor& out_bias, int64_t num_heads) {
  TORCH_CHECK(x.dim() == 3, "lifeiqa_fast.cross_attention: x must have shape (B, Nq, D), got ", x.sizes());
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2);
  TORCH_CHECK(Nq >= 1 && Nq <= kAttnMaxQueries, "lifeiqa_fast.cross_attention: x must have 1 <= Nq <= ",
              kAttnMaxQueries, " query tokens, got Nq=", Nq);
  TORCH_CHECK(D >= 1 && num_heads >= 1 && D % num_heads == 0 && D / num_heads <= kAttnMaxHeadDim,
              "lifeiqa_fast.cross_attention: num_heads must divide D = ", D, " into heads of at most ",
              kAttnMaxHeadDim, " channels, got num_heads=", num_heads);
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == B && kv.size(1) >= 1 && kv.size(2) == 2 && kv.size(3) == D,
              "lifeiqa_fast.cross_attention: kv must have shape (B, Nk, 2, D) with B = ", B, ", Nk >= 1, D = ", D,
              ", got ", kv.sizes());
  TORCH_CHECK(kv.stride(3) == 1, "lifeiqa_fast.cross_attention: kv must be contiguous in its last dimension");
  TORCH_CHECK(x.is_contiguous(), "lifeiqa_fast.cross_attention: x must be contiguous");
  for (const at::Tensor* t : {&norm_weight, &norm_bias, &q_bias, &out_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == D && t->is_contiguous(),
                "lifeiqa_fast.cross_attention: norm_weight, norm_bias, q_bias, out_bias must be contiguous (D,) = (",
                D, ",), got ", t->sizes());
  }
  for (const at::Tensor* t : {&q_weight, &out_weight}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == D && t->size(1) == D && t->is_contiguous(),
                "lifeiqa_fast.cross_attention: q_weight and out_weight must be contiguous (D, D) = (", D, ", ", D,
                "), got ", t->sizes());
  }
  for (const at::Tensor* t : {&kv, &norm_weight, &norm_bias, &q_weight, &q_bias, &out_weight, &out_bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "lifeiqa_fast.cross_attention: kv, weights and biases must have x's dtype and device (",
                x.scalar_type(), ", ", x.device(), "), got ", t->scalar_type(), ", ", t->device());
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lifeiqa_fast.cross_attention: x must be a floating tensor, got ",
              x.scalar_type());
}

}  // namespace lifeiqa_fast
