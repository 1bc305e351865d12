// CPU kernel of lifeiqa_fast::cross_attention: one decoder layer's LayerNorm, query projection,
// attention to the projected keys and values, and output projection.
//
// The two projections are GEMMs over all B * Nq query rows (one BLAS call each, where the module runs
// them per layer on a (Nq, B, D) view); the LayerNorm and the attention are hand-written loops:
// LayerNorm one pass per row with its statistics kept for the backward, attention one task per
// (image, head) that reads each key and value once for all query rows, softmax in fp32 (in fp32 and bf16 with
// head_dim a multiple of 8, on eight-float vectors, exponentials included).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu.h"
#include "cross_attention.h"
#include "few_rows.h"

namespace lifeiqa_fast {
namespace {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for float, half and bfloat16; double for double

// Rows [begin, end) of x (rows, D): xn = (x - mean) * rstd * weight + bias in x's dtype (what
// F.layer_norm returns), stats[row] = (mean, rstd), the variance biased.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void layer_norm_rows_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                        const scalar_t* __restrict__ bias, int64_t begin, int64_t end, int64_t D,
                                        acc_type<scalar_t> eps, scalar_t* __restrict__ xn,
                                        acc_type<scalar_t>* __restrict__ stats) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict__ row = x + r * D;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < D; ++c) sum += static_cast<acc_t>(row[c]);
    const acc_t mean = sum / static_cast<acc_t>(D);
    acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < D; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - mean;
      sq += d * d;
    }
    const acc_t rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(D) + eps);
    for (int64_t c = 0; c < D; ++c) {
      const acc_t v = (static_cast<acc_t>(row[c]) - mean) * rstd;
      xn[r * D + c] = static_cast<scalar_t>(v * static_cast<acc_t>(weight[c]) + static_cast<acc_t>(bias[c]));
    }
    stats[2 * r] = mean;
    stats[2 * r + 1] = rstd;
  }
}
LIFEIQA_CPU_DISPATCH(layer_norm_rows)

struct Attend {
  int64_t Nq, Nk, D, H, hd;
  int64_t kv_b, kv_n, kv_t;  // kv strides over images, keys, and key/value
};

// One (image, head) task: o_h = softmax(q_h K_h^T / sqrt(hd)) V_h for all Nq rows, lse per row.
// q, o: the image's (Nq, D) rows; k, v: the image's first key and value, heads offset applied.
// buf: Nq * (hd + Nk + hd) accumulators (q rows, scores, output rows).
// Example, one key: every score's softmax weight is 1, so o = v and lse = that score.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void attend_head_impl(const Attend& p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                    const scalar_t* __restrict__ v, scalar_t* __restrict__ o,
                                    acc_type<scalar_t>* __restrict__ lse, acc_type<scalar_t>* __restrict__ buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Nq = p.Nq, Nk = p.Nk, hd = p.hd;
  acc_t* __restrict__ qa = buf;                // (Nq, hd)
  acc_t* __restrict__ s = buf + Nq * hd;       // (Nq, Nk)
  acc_t* __restrict__ acc = s + Nq * Nk;       // (Nq, hd)
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(hd));
  for (int64_t i = 0; i < Nq; ++i)
    for (int64_t c = 0; c < hd; ++c) qa[i * hd + c] = static_cast<acc_t>(q[i * p.D + c]);
  for (int64_t j = 0; j < Nk; ++j) {  // scores, each key read once for all rows
    const scalar_t* __restrict__ kj = k + j * p.kv_n;
    for (int64_t i = 0; i < Nq; ++i) {
      const acc_t* __restrict__ qi = qa + i * hd;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < hd; ++c) dot += qi[c] * static_cast<acc_t>(kj[c]);
      s[i * Nk + j] = dot * scale;
    }
  }
  for (int64_t i = 0; i < Nq; ++i) {  // softmax numerators in place, and the log of each row's sum
    acc_t* __restrict__ si = s + i * Nk;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < Nk; ++j) mx = std::max(mx, si[j]);
    acc_t sum = 0;
    for (int64_t j = 0; j < Nk; ++j) {
      si[j] = std::exp(si[j] - mx);
      sum += si[j];
    }
    const acc_t inv = acc_t(1) / sum;
    for (int64_t j = 0; j < Nk; ++j) si[j] *= inv;
    lse[i] = mx + std::log(sum);
  }
  std::fill(acc, acc + Nq * hd, acc_t(0));
  for (int64_t j = 0; j < Nk; ++j) {  // o = P V, each value read once for all rows
    const scalar_t* __restrict__ vj = v + j * p.kv_n;
    for (int64_t i = 0; i < Nq; ++i) {
      const acc_t pij = s[i * Nk + j];
      acc_t* __restrict__ ai = acc + i * hd;
#pragma omp simd
      for (int64_t c = 0; c < hd; ++c) ai[c] += pij * static_cast<acc_t>(vj[c]);
    }
  }
  for (int64_t i = 0; i < Nq; ++i)
    for (int64_t c = 0; c < hd; ++c) o[i * p.D + c] = static_cast<scalar_t>(acc[i * hd + c]);
}
LIFEIQA_CPU_DISPATCH(attend_head)

// fp32 and bf16 with head_dim a multiple of 8: the same task on eight-float vectors (GCC/Clang vector
// extensions, as in gcn.cpp; bf16 widened as it is loaded), the softmax's exponentials included.
template <typename T>
LIFEIQA_CPU_INLINE void attend_head_vec_impl(const Attend& p, const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse,
                                             float* __restrict__ buf) {
  const int64_t Nq = p.Nq, Nk = p.Nk, hd = p.hd;
  float* __restrict__ s = buf;            // (Nq, Nk)
  float* __restrict__ acc = s + Nq * Nk;  // (Nq, hd)
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t j = 0; j < Nk; ++j) {
    const T* __restrict__ kj = k + j * p.kv_n;
    for (int64_t i = 0; i < Nq; ++i) {
      vec8 dot = vec8{}, a, b;
      for (int64_t c = 0; c < hd; c += 8) {
        load8(a, q + i * p.D + c);
        load8(b, kj + c);
        dot += a * b;
      }
      s[i * Nk + j] = sum8(dot) * scale;
    }
  }
  for (int64_t i = 0; i < Nq; ++i) lse[i] = softmax_row(s + i * Nk, Nk);
  std::fill(acc, acc + Nq * hd, 0.0f);
  for (int64_t j = 0; j < Nk; ++j) {
    const T* __restrict__ vj = v + j * p.kv_n;
    for (int64_t i = 0; i < Nq; ++i) {
      const float pij = s[i * Nk + j];
      vec8 a, b;
      for (int64_t c = 0; c < hd; c += 8) {
        load8(a, acc + i * hd + c);
        load8(b, vj + c);
        a += pij * b;
        std::memcpy(acc + i * hd + c, &a, sizeof(a));
      }
    }
  }
  for (int64_t i = 0; i < Nq; ++i)
    for (int64_t c = 0; c < hd; ++c) o[i * p.D + c] = static_cast<T>(acc[i * hd + c]);
}
LIFEIQA_CPU_DISPATCH(attend_head_vec)

// One (image, head) task of any dtype: the vector path for fp32 and bf16 when head_dim is a multiple of 8.
template <typename scalar_t>
void attend(const Attend& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* o,
            acc_type<scalar_t>* lse, acc_type<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (p.hd % 8 == 0) return attend_head_vec<scalar_t>(p, q, k, v, o, lse, buf);
  }
  attend_head<scalar_t>(p, q, k, v, o, lse, buf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& x, const at::Tensor& kv, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
    const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
    int64_t num_heads, double eps) {
  check_cross_attention_input(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads);
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2), H = num_heads;
  const at::ScalarType acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xn = at::empty({B * Nq, D}, x.options());
  at::Tensor o = at::empty({B, Nq, D}, x.options());
  at::Tensor lse = at::empty({B, H, Nq}, x.options().dtype(acc_dtype));
  at::Tensor stats = at::empty({B, Nq, 2}, x.options().dtype(acc_dtype));
  if (B == 0) return {at::empty({B, Nq, D}, x.options()), xn.view({B, Nq, D}), o, lse, stats};
  const Attend p{Nq, kv.size(1), D, H, D / H, kv.stride(0), kv.stride(1), kv.stride(2)};
  at::Tensor q;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lifeiqa_fast_cross_attention", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t rows = B * Nq;
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinElementsPerTask / D), [&](int64_t begin, int64_t end) {
      layer_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(), norm_weight.const_data_ptr<scalar_t>(),
                                norm_bias.const_data_ptr<scalar_t>(), begin, end, D, static_cast<acc_t>(eps),
                                xn.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    });
    q = at::addmm(q_bias, xn, q_weight.t());  // (B * Nq, D), rounded to x's dtype as the module's
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kvp = kv.const_data_ptr<scalar_t>();
    scalar_t* op = o.mutable_data_ptr<scalar_t>();
    acc_t* lsep = lse.mutable_data_ptr<acc_t>();
    const int64_t work = Nq * p.Nk * p.hd;  // multiply-adds of one (image, head) task, per product
    at::parallel_for(0, B * H, std::max<int64_t>(1, kMinElementsPerTask / work), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(Nq * (2 * p.hd + p.Nk));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / H, h = t % H;
        const scalar_t* k = kvp + b * p.kv_b + h * p.hd;
        attend<scalar_t>(p, qp + b * Nq * D + h * p.hd, k, k + p.kv_t, op + b * Nq * D + h * p.hd, lsep + t * Nq,
                         buf.data());
      }
    });
  });
  at::Tensor out = at::addmm(out_bias, o.view({B * Nq, D}), out_weight.t()).view({B, Nq, D});
  out.add_(x);
  return {out, q.view({B, Nq, D}), o, lse, stats};
}

// One (image, head) task of the backward, P recomputed from q, K and the saved log-sum-exp:
// dV_j = sum_i P_ij do_i; dS_ij = P_ij (do_i . v_j - do_i . o_i) / sqrt(hd); dq_i = sum_j dS_ij k_j;
// dK_j = sum_i dS_ij q_i. q, o: the image's (Nq, D) rows; k, v: its first key and value; dout, dq:
// its (Nq, D) rows of do and dq; dk: its first row of dkv ((Nk, 2, D) contiguous, dV at dk + D); all
// with the head's offset applied. buf: Nq * (hd + Nk + 1) accumulators.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void attend_head_backward_impl(const Attend& p, const scalar_t* __restrict__ q,
                                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                             const scalar_t* __restrict__ o, const acc_type<scalar_t>* __restrict__ lse,
                                             const acc_type<scalar_t>* __restrict__ dout,
                                             acc_type<scalar_t>* __restrict__ dq, acc_type<scalar_t>* __restrict__ dk,
                                             acc_type<scalar_t>* __restrict__ buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Nq = p.Nq, Nk = p.Nk, hd = p.hd, D = p.D;
  acc_t* __restrict__ qa = buf;               // (Nq, hd)
  acc_t* __restrict__ s = qa + Nq * hd;       // (Nq, Nk): P, then dS
  acc_t* __restrict__ delta = s + Nq * Nk;    // (Nq,)
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(hd));
  for (int64_t i = 0; i < Nq; ++i) {
    acc_t d = 0;
    for (int64_t c = 0; c < hd; ++c) {
      qa[i * hd + c] = static_cast<acc_t>(q[i * D + c]);
      d += dout[i * D + c] * static_cast<acc_t>(o[i * D + c]);
    }
    delta[i] = d;
  }
  for (int64_t j = 0; j < Nk; ++j) {
    const scalar_t* __restrict__ kj = k + j * p.kv_n;
    const scalar_t* __restrict__ vj = v + j * p.kv_n;
    acc_t* __restrict__ dvj = dk + j * 2 * D + D;
    std::fill(dvj, dvj + hd, acc_t(0));
    for (int64_t i = 0; i < Nq; ++i) {
      const acc_t* __restrict__ qi = qa + i * hd;
      const acc_t* __restrict__ di = dout + i * D;
      acc_t dot = 0, dp = 0;
#pragma omp simd reduction(+ : dot, dp)
      for (int64_t c = 0; c < hd; ++c) {
        dot += qi[c] * static_cast<acc_t>(kj[c]);
        dp += di[c] * static_cast<acc_t>(vj[c]);
      }
      const acc_t pij = std::exp(dot * scale - lse[i]);
#pragma omp simd
      for (int64_t c = 0; c < hd; ++c) dvj[c] += pij * di[c];
      s[i * Nk + j] = pij * (dp - delta[i]) * scale;
    }
  }
  for (int64_t i = 0; i < Nq; ++i) {
    acc_t* __restrict__ dqi = dq + i * D;
    std::fill(dqi, dqi + hd, acc_t(0));
    for (int64_t j = 0; j < Nk; ++j) {
      const acc_t ds = s[i * Nk + j];
      const scalar_t* __restrict__ kj = k + j * p.kv_n;
#pragma omp simd
      for (int64_t c = 0; c < hd; ++c) dqi[c] += ds * static_cast<acc_t>(kj[c]);
    }
  }
  for (int64_t j = 0; j < Nk; ++j) {
    acc_t* __restrict__ dkj = dk + j * 2 * D;
    std::fill(dkj, dkj + hd, acc_t(0));
    for (int64_t i = 0; i < Nq; ++i) {
      const acc_t ds = s[i * Nk + j];
      const acc_t* __restrict__ qi = qa + i * hd;
#pragma omp simd
      for (int64_t c = 0; c < hd; ++c) dkj[c] += ds * qi[c];
    }
  }
}
LIFEIQA_CPU_DISPATCH(attend_head_backward)

// LayerNorm rows [begin, end) given dxn, the gradient of its output: dx = dout + rstd (dxhat -
// mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dxn * weight, in x's dtype.
template <typename scalar_t>
LIFEIQA_CPU_INLINE void layer_norm_backward_rows_impl(const acc_type<scalar_t>* __restrict__ xhat,
                                                 const acc_type<scalar_t>* __restrict__ dxn,
                                                 const acc_type<scalar_t>* __restrict__ dout,
                                                 const acc_type<scalar_t>* __restrict__ stats,
                                                 const scalar_t* __restrict__ weight, int64_t begin, int64_t end,
                                                 int64_t D, scalar_t* __restrict__ dx) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    acc_t m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
    for (int64_t c = 0; c < D; ++c) {
      const acc_t dh = dxn[r * D + c] * static_cast<acc_t>(weight[c]);
      m1 += dh;
      m2 += dh * xhat[r * D + c];
    }
    m1 /= static_cast<acc_t>(D);
    m2 /= static_cast<acc_t>(D);
    const acc_t rstd = stats[2 * r + 1];
    for (int64_t c = 0; c < D; ++c) {
      const acc_t dh = dxn[r * D + c] * static_cast<acc_t>(weight[c]);
      dx[r * D + c] = static_cast<scalar_t>(dout[r * D + c] + rstd * (dh - m1 - xhat[r * D + c] * m2));
    }
  }
}
LIFEIQA_CPU_DISPATCH(layer_norm_backward_rows)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cross_attention_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& kv,
                             const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& q_weight,
                             const at::Tensor& out_weight, const at::Tensor& q, const at::Tensor& o,
                             const at::Tensor& lse, const at::Tensor& stats, int64_t num_heads) {
  check_cross_attention_input(x, kv, norm_weight, norm_bias, q_weight, norm_bias, out_weight, norm_bias, num_heads);
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2), H = num_heads, Nk = kv.size(1);
  const at::ScalarType acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad, &q, &o}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
                "lifeiqa_fast.cross_attention_backward: grad, q and o must be contiguous and of x's shape and dtype");
  }
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, Nq}) && stats.sizes() == at::IntArrayRef({B, Nq, 2}) &&
                  lse.scalar_type() == acc_dtype && stats.scalar_type() == acc_dtype && lse.is_contiguous() &&
                  stats.is_contiguous(),
              "lifeiqa_fast.cross_attention_backward: lse and stats must be the forward's (B, H, Nq) and (B, Nq, 2)");
  const at::Tensor g = grad.view({B * Nq, D}).to(acc_dtype);
  at::Tensor dkv = at::empty({B, Nk, 2, D}, x.options().dtype(acc_dtype));
  at::Tensor dq = at::empty({B * Nq, D}, x.options().dtype(acc_dtype));
  at::Tensor xhat = at::empty({B * Nq, D}, x.options().dtype(acc_dtype));
  at::Tensor xn = at::empty({B * Nq, D}, x.options().dtype(acc_dtype));  // the LayerNorm's output
  at::Tensor dx = at::empty_like(x);
  at::Tensor dxn;  // the gradient of the LayerNorm's output
  const at::Tensor dout = g.mm(out_weight.to(acc_dtype));  // d out_proj's input: (B * Nq, D)
  const Attend p{Nq, Nk, D, H, D / H, kv.stride(0), kv.stride(1), kv.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lifeiqa_fast_cross_attention_backward",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const scalar_t* kvp = kv.const_data_ptr<scalar_t>();
    const acc_t* lsep = lse.const_data_ptr<acc_t>();
    const acc_t* doutp = dout.const_data_ptr<acc_t>();
    acc_t* dqp = dq.mutable_data_ptr<acc_t>();
    acc_t* dkvp = dkv.mutable_data_ptr<acc_t>();
    const int64_t work = 3 * Nq * Nk * p.hd;  // multiply-adds of one (image, head) task, per product
    at::parallel_for(0, B * H, std::max<int64_t>(1, kMinElementsPerTask / work), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(Nq * (p.hd + Nk + 1));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / H, h = t % H, off = b * Nq * D + h * p.hd;
        const scalar_t* k = kvp + b * p.kv_b + h * p.hd;
        attend_head_backward<scalar_t>(p, qp + off, k, k + p.kv_t, op + off, lsep + t * Nq, doutp + off, dqp + off,
                                       dkvp + b * Nk * 2 * D + h * p.hd, buf.data());
      }
    });
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const scalar_t* nw = norm_weight.const_data_ptr<scalar_t>();
    const scalar_t* nb = norm_bias.const_data_ptr<scalar_t>();
    acc_t* xh = xhat.mutable_data_ptr<acc_t>();
    acc_t* xnp = xn.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * Nq * D, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / D, c = i % D;
        xh[i] = (static_cast<acc_t>(xp[i]) - st[2 * r]) * st[2 * r + 1];
        xnp[i] = xh[i] * static_cast<acc_t>(nw[c]) + static_cast<acc_t>(nb[c]);
      }
    });
    dxn = dq.mm(q_weight.to(acc_dtype));
    at::parallel_for(0, B * Nq, std::max<int64_t>(1, kMinElementsPerTask / D), [&](int64_t begin, int64_t end) {
      layer_norm_backward_rows<scalar_t>(xh, dxn.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), st, nw, begin, end,
                                         D, dx.mutable_data_ptr<scalar_t>());
    });
  });
  const auto cast = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
  return {dx,
          cast(dkv),
          cast(dxn.mul(xhat).sum(0)),
          cast(dxn.sum(0)),
          cast(dq.t().mm(xn)),
          cast(dq.sum(0)),
          cast(g.t().mm(o.view({B * Nq, D}).to(acc_dtype))),
          cast(g.sum(0))};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) {
  m.impl("cross_attention", &lifeiqa_fast::cross_attention_cpu);
  m.impl("cross_attention_backward", &lifeiqa_fast::cross_attention_backward_cpu);
}
