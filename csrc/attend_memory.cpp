// CPU kernel of lifeiqa_fast::attend_memory, forward: one decoder layer's attention for a few query
// rows, x + out_proj(MHA(LayerNorm(x), memory, memory)), the keys and values never formed (the queries
// are taken to the memory through W_k, the softmax weights applied to the memory, the result taken
// through W_v: lifeiqa_fast/ops/cross_attention.py, attend_memory, says why that is exact).
//
// One task per (image, block of at most 8 query rows, head) does the head's whole chain in fp32 with its
// rows in registers: q_h = LN(x) W_q,h^T + b_q,h; q_h W_k,h (the query against the memory's channels);
// the scores against each memory row and their softmax; P_h M; (P_h M) W_v,h^T + b_v,h. Each weight row
// is read once per block for all its rows, in fp32 or bf16 (few_rows.h), so at one image the layer
// streams its weights once, where the composite ATen path runs about twenty small GEMMs and copies.
// Forward only: the backward is the composite path's (ops/cross_attention.py).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu.h"
#include "few_rows.h"
#include "gcn.h"

namespace lifeiqa_fast {
namespace {

struct MemoryAttention {
  int64_t Nq, Nk, D, H, hd;
};

// Scratch floats of one task: q_h (R, hd), q_h W_k,h (R, D), scores (R, Nk), P_h M (R, D).
int64_t task_floats(const MemoryAttention& p) { return kFewRows * (p.hd + 2 * p.D + p.Nk); }

// Head h of the R rows ln (R, D) (LayerNorm(x), fp32) against memory (Nk, D): writes o[:, h*hd : (h+1)*hd]
// (R rows of stride D) = softmax((q_h W_k,h) M^T / sqrt(hd)) M W_v,h^T + b_v,h.
// Example: one memory row m gives softmax weight 1, so o_h = m W_v,h^T + b_v,h whatever the query.
template <int R, typename T>
LIFEIQA_CPU_INLINE void memory_head(const MemoryAttention& p, int64_t h, const float* __restrict__ ln,
                                    const T* __restrict__ mem, const T* __restrict__ in_w,
                                    const T* __restrict__ in_b, float* __restrict__ o, float* __restrict__ buf) {
  const int64_t D = p.D, hd = p.hd, Nk = p.Nk;
  float* __restrict__ q = buf;         // (R, hd)
  float* __restrict__ qm = q + R * hd;  // (R, D)
  float* __restrict__ s = qm + R * D;   // (R, Nk)
  float* __restrict__ pm = s + R * Nk;  // (R, D)
  few_rows_linear_r<R>(ln, D, D, in_w + h * hd * D, in_b + h * hd, hd, q, hd);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t i = 0; i < R * hd; ++i) q[i] *= scale;
  few_rows_matmul_r<R>(q, hd, hd, in_w + (D + h * hd) * D, D, D, qm, D);  // q_h W_k,h (R, D)
  few_rows_linear_r<R>(qm, D, D, mem, static_cast<const T*>(nullptr), Nk, s, Nk);  // scores, (R, Nk)
  for (int r = 0; r < R; ++r) softmax_row(s + r * Nk, Nk);
  few_rows_matmul_r<R>(s, Nk, Nk, mem, D, D, pm, D);  // P_h M (R, D)
  few_rows_linear_r<R>(pm, D, D, in_w + (2 * D + h * hd) * D, in_b + 2 * D + h * hd, hd, o + h * hd, D);
}

// memory_head for 1 <= rows <= kFewRows.
template <typename T>
LIFEIQA_CPU_INLINE void memory_task_impl(const MemoryAttention& p, int64_t rows, int64_t h, const float* ln,
                                         const T* mem, const T* in_w, const T* in_b, float* o, float* buf) {
  static_assert(kFewRows == 8, "one case per row count");
  switch (rows) {
    case 1: return memory_head<1>(p, h, ln, mem, in_w, in_b, o, buf);
    case 2: return memory_head<2>(p, h, ln, mem, in_w, in_b, o, buf);
    case 3: return memory_head<3>(p, h, ln, mem, in_w, in_b, o, buf);
    case 4: return memory_head<4>(p, h, ln, mem, in_w, in_b, o, buf);
    case 5: return memory_head<5>(p, h, ln, mem, in_w, in_b, o, buf);
    case 6: return memory_head<6>(p, h, ln, mem, in_w, in_b, o, buf);
    case 7: return memory_head<7>(p, h, ln, mem, in_w, in_b, o, buf);
    default: return memory_head<8>(p, h, ln, mem, in_w, in_b, o, buf);
  }
}
LIFEIQA_CPU_DISPATCH(memory_task)

// Rows [begin, end) of out = x + o W_o^T + b_o, o fp32 (rows, D), in blocks of kFewRows rows; y: a
// kFewRows * (end - begin) scratch. Outputs [n0, n1) of each row.
template <typename T>
LIFEIQA_CPU_INLINE void out_projection_impl(const float* o, const T* x, const T* out_w, const T* out_b, int64_t rows,
                                            int64_t D, int64_t n0, int64_t n1, T* out, float* y) {
  for (int64_t r0 = 0; r0 < rows; r0 += kFewRows) {
    const int64_t R = std::min<int64_t>(kFewRows, rows - r0);
    few_rows_linear<T>(R, o + r0 * D, D, D, out_w + n0 * D, out_b + n0, n1 - n0, y, n1 - n0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = n0; n < n1; ++n)
        out[(r0 + r) * D + n] = static_cast<T>(static_cast<float>(x[(r0 + r) * D + n]) + y[r * (n1 - n0) + n - n0]);
  }
}
LIFEIQA_CPU_DISPATCH(out_projection)

// LayerNorm of rows [begin, end) of x (rows, D) into ln in fp32, the variance biased (F.layer_norm's).
template <typename T>
void layer_norm_f32(const T* x, const T* weight, const T* bias, float eps, int64_t begin, int64_t end, int64_t D,
                    float* ln) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = x + r * D;
    float sum = 0, sq = 0;
    for (int64_t c = 0; c < D; ++c) sum += static_cast<float>(row[c]);
    const float mean = sum / static_cast<float>(D);
    for (int64_t c = 0; c < D; ++c) {
      const float d = static_cast<float>(row[c]) - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(D) + eps);
    for (int64_t c = 0; c < D; ++c)
      ln[r * D + c] = (static_cast<float>(row[c]) - mean) * rstd * static_cast<float>(weight[c]) +
                      static_cast<float>(bias[c]);
  }
}

void check_attend_memory_input(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, const at::Tensor& in_proj_weight,
                               const at::Tensor& in_proj_bias, const at::Tensor& out_weight,
                               const at::Tensor& out_bias, int64_t num_heads) {
  const char* op = "attend_memory";
  TORCH_CHECK(x.dim() == 3 && at::isFloatingType(x.scalar_type()),
              "lifeiqa_fast.attend_memory: x must be a floating (B, Nq, D) tensor, got ", dtype_text(x.scalar_type()),
              " ", shape_text(x.sizes()));
  const int64_t B = x.size(0), D = x.size(2);
  TORCH_CHECK(D >= 1 && num_heads >= 1 && D % num_heads == 0,
              "lifeiqa_fast.attend_memory: num_heads must be an int dividing D=", D, ", got ", num_heads);
  TORCH_CHECK(memory.dim() == 3 && memory.size(0) == B && memory.size(1) >= 1 && memory.size(2) == D,
              "lifeiqa_fast.attend_memory: memory must have shape (B, Nk, D) with B=", B, ", Nk >= 1, D=", D,
              ", got ", shape_text(memory.sizes()));
  check_shape(op, "norm_weight", norm_weight, "(D,)", {D});
  check_shape(op, "norm_bias", norm_bias, "(D,)", {D});
  check_shape(op, "in_proj_weight", in_proj_weight, "(3D, D)", {3 * D, D});
  check_shape(op, "in_proj_bias", in_proj_bias, "(3D,)", {3 * D});
  check_shape(op, "out_weight", out_weight, "(D, D)", {D, D});
  check_shape(op, "out_bias", out_bias, "(D,)", {D});
  const NamedTensors tensors = {{"memory", &memory}, {"norm_weight", &norm_weight}, {"norm_bias", &norm_bias},
                                {"in_proj_weight", &in_proj_weight}, {"in_proj_bias", &in_proj_bias},
                                {"out_weight", &out_weight}, {"out_bias", &out_bias}};
  check_like_x(op, x, tensors);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lifeiqa_fast.attend_memory: the CPU kernel takes float32 and bfloat16, got ",
              dtype_text(x.scalar_type()));
  check_contiguous(op, {{"x", &x}});
  check_contiguous(op, tensors);
}

}  // namespace

at::Tensor attend_memory_cpu(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& norm_weight,
                             const at::Tensor& norm_bias, const at::Tensor& in_proj_weight,
                             const at::Tensor& in_proj_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
                             int64_t num_heads, double eps) {
  check_attend_memory_input(x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias,
                            num_heads);
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2), rows = B * Nq;
  const MemoryAttention p{Nq, memory.size(1), D, num_heads, D / num_heads};
  at::Tensor out = at::empty_like(x);
  if (rows == 0) return out;
  at::Tensor ln = at::empty({rows, D}, x.options().dtype(at::kFloat));
  at::Tensor o = at::empty({rows, D}, x.options().dtype(at::kFloat));
  float* lnp = ln.mutable_data_ptr<float>();
  float* op = o.mutable_data_ptr<float>();
  auto run = [&](auto zero) {
    using T = decltype(zero);  // float or c10::BFloat16
    const T* xp = x.const_data_ptr<T>();
    const T* mp = memory.const_data_ptr<T>();
    const T* wp = in_proj_weight.const_data_ptr<T>();
    const T* bp = in_proj_bias.const_data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinElementsPerTask / D), [&](int64_t begin, int64_t end) {
      layer_norm_f32(xp, norm_weight.const_data_ptr<T>(), norm_bias.const_data_ptr<T>(), static_cast<float>(eps),
                     begin, end, D, lnp);
    });
    const int64_t blocks = (Nq + kFewRows - 1) / kFewRows, H = p.H;
    at::parallel_for(0, B * blocks * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(task_floats(p));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / (blocks * H), r0 = (t / H) % blocks * kFewRows, h = t % H;
        const int64_t first = b * Nq + r0;
        memory_task<T>(p, std::min<int64_t>(kFewRows, Nq - r0), h, lnp + first * D, mp + b * p.Nk * D, wp, bp,
                       op + first * D, buf.data());
      }
    });
    const T* ow = out_weight.const_data_ptr<T>();
    const T* ob = out_bias.const_data_ptr<T>();
    T* outp = out.mutable_data_ptr<T>();
    at::parallel_for(0, D, std::max<int64_t>(1, kMinElementsPerTask / D), [&](int64_t n0, int64_t n1) {
      std::vector<float> y(kFewRows * (n1 - n0));
      out_projection<T>(op, xp, ow, ob, rows, D, n0, n1, outp, y.data());
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(0.0f);
  } else {
    run(c10::BFloat16(0.0f));
  }
  return out;
}

// The decoder's layers one after another, x = attend_memory(gcn(x)) for each, in one call: weights holds
// each layer's gcn w1, b1, w2, b2, w3, b3, then norm_weight, norm_bias, in_proj_weight, in_proj_bias,
// out_weight, out_bias (kDecoderLayerWeights per layer); adj one entry per layer (None: the fixed graph).
constexpr size_t kDecoderLayerWeights = 12;

at::Tensor decoder_memory_cpu(const at::Tensor& x, const at::Tensor& memory,
                              const c10::List<std::optional<at::Tensor>>& adj, at::TensorList weights,
                              int64_t num_heads, double eps) {
  TORCH_CHECK(weights.size() == adj.size() * kDecoderLayerWeights, "lifeiqa_fast.decoder_memory: weights must hold ",
              kDecoderLayerWeights, " tensors per layer, ", adj.size(), " layers (one adj each), got ", weights.size());
  at::Tensor out = x;
  for (size_t l = 0; l < adj.size(); ++l) {
    const at::Tensor* w = weights.data() + l * kDecoderLayerWeights;
    out = std::get<0>(gcn_cpu(out, adj.get(l), w[0], w[1], w[2], w[3], w[4], w[5]));
    out = attend_memory_cpu(out, memory, w[6].contiguous(), w[7].contiguous(), w[8].contiguous(),
                            w[9].contiguous(), w[10].contiguous(), w[11].contiguous(), num_heads, eps);
  }
  return out;
}

}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) {
  m.impl("attend_memory", &lifeiqa_fast::attend_memory_cpu);
  m.impl("decoder_memory", &lifeiqa_fast::decoder_memory_cpu);
}
