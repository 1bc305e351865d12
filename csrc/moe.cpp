// CPU kernel of lifeiqa_fast::moe: router, top-k, gates, the experts' MLPs, their gated sum, and the
// aux and z losses, forward and backward.
//
// The routing is host code (on the CPU a data-dependent shape costs no synchronisation): the (token,
// choice) pairs are grouped by expert, and each expert with pairs runs its two layers as BLAS GEMMs
// on just its rows, reading only the experts that were chosen ("grouped"). "dense" runs every
// expert on every token instead (gates zero where not chosen): more FLOP, the same answer.
#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu.h"
#include "few_rows.h"
#include "moe.h"

namespace lifeiqa_fast {
namespace {

// The pairs (token, choice) of each expert, as flat pair ids t * k + j and token ids, ascending.
struct Groups {
  std::vector<std::vector<int64_t>> pairs, tokens;
};

Groups group_by_expert(const at::Tensor& indices, int64_t E) {
  const at::Tensor idx = indices.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t k = idx.size(1);
  Groups g{std::vector<std::vector<int64_t>>(E), std::vector<std::vector<int64_t>>(E)};
  for (int64_t i = 0; i < idx.numel(); ++i) {
    g.pairs[p[i]].push_back(i);
    g.tokens[p[i]].push_back(i / k);
  }
  return g;
}

// An expert chosen by at most kFewRows tokens runs its layers as few_rows_linear (fp32): a handful of
// rows is bound by reading the weights, which BLAS GEMMs stream at about half the speed (one image's 6
// tokens give each chosen expert one to six rows).
// With more than this many rows per expert on average, the experts are dealt to the threads (each
// expert's GEMMs on one thread); with fewer, one expert after another, its layers split over the threads.
constexpr int64_t kThreadPerExpertRows = 4;

// y (rows, N) = x (rows, K) W^T + b for outputs [begin, end).
template <typename T>
LIFEIQA_CPU_INLINE void expert_rows_impl(const float* x, int64_t rows, int64_t K, const float* W, const float* b,
                                         int64_t begin, int64_t end, int64_t N, float* y) {
  few_rows_linear<float>(rows, x, K, K, W + begin * K, b + begin, end - begin, y + begin, N);
}
LIFEIQA_CPU_DISPATCH(expert_rows)

// x (rows, K) W^T + b as a new (rows, N) tensor: few_rows_linear for a few fp32 rows, else BLAS.
at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b) {
  const int64_t rows = x.size(0), K = x.size(1), N = W.size(0);
  if (x.scalar_type() != at::kFloat || rows > kFewRows) return b.addmm(x, W.t());
  at::Tensor y = at::empty({rows, N}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = W.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kMinElementsPerTask / K), [&](int64_t begin, int64_t end) {
    expert_rows<float>(xp, rows, K, wp, bp, begin, end, N, yp);
  });
  return y;
}

// The experts dealt into `bins` lists of about equal rows, the busiest first, each to the lightest
// list so far. Example: rows (64, 59, 58, 49) into 2 -> (64, 49), (59, 58).
std::vector<std::vector<int64_t>> deal(const Groups& groups, int64_t bins) {
  const int64_t E = static_cast<int64_t>(groups.pairs.size());
  std::vector<int64_t> order(E), load(std::max<int64_t>(1, bins), 0);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return groups.pairs[a].size() > groups.pairs[b].size(); });
  std::vector<std::vector<int64_t>> lists(load.size());
  for (const int64_t e : order) {
    const auto lightest = std::min_element(load.begin(), load.end()) - load.begin();
    lists[lightest].push_back(e);
    load[lightest] += static_cast<int64_t>(groups.pairs[e].size());
  }
  return lists;
}

// (E,): the sum over the (token, choice) pairs that chose each expert of values (T, k).
at::Tensor sum_per_expert(const at::Tensor& indices, const at::Tensor& values, int64_t E) {
  return at::zeros({E}, values.options()).index_add(0, indices.flatten(), values.flatten());
}

at::Tensor ids(std::vector<int64_t>& v, const at::Tensor& like) {
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, like.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_cpu(
    const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& router_bias, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t top_k,
    const std::optional<at::Tensor>& dropout_mask, bool dense) {
  check_moe_input(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask);
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), F = w1.size(1), k = top_k;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor logits_x = router_bias.addmm(x, router_weight.t());  // (T, E) in x's dtype, as F.linear
  auto [top, indices] = logits_x.topk(k);                               // torch.topk's order and ties
  const at::Tensor logits = logits_x.to(acc);
  const at::Tensor gates = top.to(acc).softmax(-1);                    // (T, k)
  const at::Tensor lse = logits.logsumexp({-1});
  const at::Tensor z = lse.mul(lse).mean();
  // aux = E * sum_e (sum of e's gates / T) * (count_e / T), the count detached
  const at::Tensor gate_sums = sum_per_expert(indices, gates, E);
  const at::Tensor counts = sum_per_expert(indices, at::ones_like(gates), E);
  const at::Tensor aux = gate_sums.mul(counts).sum().mul(static_cast<double>(E) / (static_cast<double>(T) * T));
  at::Tensor hidden = at::empty({T, k, F}, x.options());
  at::Tensor expert_out = at::empty({T, k, D}, x.options());
  at::Tensor out = at::empty({T, D}, x.options());
  Groups groups = group_by_expert(indices, E);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lifeiqa_fast_moe", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = dropout_mask.has_value() ? dropout_mask->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = hidden.mutable_data_ptr<scalar_t>();
    scalar_t* yp = expert_out.mutable_data_ptr<scalar_t>();
    // Experts with many rows: the experts dealt to the threads, each expert's GEMMs on one thread
    // (faster than splitting every expert's small GEMMs over the threads). With a few rows each: one
    // expert after another, few_rows_linear splitting each weight matrix over the threads.
    const bool per_expert = T * k > E * kThreadPerExpertRows;
    const std::vector<std::vector<int64_t>> bins = deal(groups, per_expert ? at::get_num_threads() : 1);
    at::parallel_for(0, static_cast<int64_t>(bins.size()), 1, [&](int64_t bin_begin, int64_t bin_end) {
    for (int64_t bin = bin_begin; bin < bin_end; ++bin)
    for (const int64_t e : bins[bin]) {
      const std::vector<int64_t>& pairs = groups.pairs[e];
      const int64_t n = static_cast<int64_t>(pairs.size());
      if (n == 0) continue;
      at::Tensor xe;  // the expert's rows of x
      if (dense) {
        xe = x;
      } else {
        xe = at::empty({n, D}, x.options());
        scalar_t* xr = xe.mutable_data_ptr<scalar_t>();
        for (int64_t r = 0; r < n; ++r) std::memcpy(xr + r * D, xp + (pairs[r] / k) * D, D * sizeof(scalar_t));
      }
      // (n or T, F) with the bias, rounded once as F.linear's; then ReLU and mask into hidden's pair rows
      const at::Tensor h = expert_linear(xe, w1[e], b1[e]);
      const scalar_t* h_in = h.const_data_ptr<scalar_t>();
      at::Tensor he = at::empty({n, F}, x.options());
      scalar_t* h_out = he.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerTask / F), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t pair = pairs[r];
          const scalar_t* src = h_in + (dense ? pair / k : r) * F;
          for (int64_t f = 0; f < F; ++f) {
            acc_t v = std::max(static_cast<acc_t>(src[f]), acc_t(0));
            if (mp != nullptr) v *= static_cast<acc_t>(mp[pair * F + f]);
            h_out[r * F + f] = hp[pair * F + f] = static_cast<scalar_t>(v);
          }
        }
      });
      const at::Tensor y = expert_linear(he, w2[e], b2[e]);  // (n, D), into expert_out's pair rows
      const scalar_t* y_in = y.const_data_ptr<scalar_t>();
      for (int64_t r = 0; r < n; ++r) std::memcpy(yp + pairs[r] * D, y_in + r * D, D * sizeof(scalar_t));
    }
    });
    // out = the gated sum of each token's expert outputs, in fp32 (fp64), rounded once
    const acc_t* gp = gates.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, kMinElementsPerTask / (k * D)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t d = 0; d < D; ++d) {
          acc_t v = 0;
          for (int64_t j = 0; j < k; ++j) v += gp[t * k + j] * static_cast<acc_t>(yp[(t * k + j) * D + d]);
          op[t * D + d] = static_cast<scalar_t>(v);
        }
    });
  });
  return {out, aux, z, logits, indices, gates, hidden, expert_out};
}

// The adjoint, with dY = gate * dout per pair, dgate = dout . y + daux E count_e / T^2: per expert
// with pairs, dW2 = dY^T h, dh = dY W2 * [h > 0] * mask, dW1 = dh^T x, dx += dh W1; the gates'
// softmax back to the chosen logits, z's gradient 2 lse / T softmax(logits) dz on all of them, and
// the router's linear layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_backward_cpu(
    const at::Tensor& grad, const at::Tensor& grad_aux, const at::Tensor& grad_z, const at::Tensor& x,
    const at::Tensor& router_weight, const at::Tensor& w1, const at::Tensor& w2,
    const std::optional<at::Tensor>& dropout_mask, const at::Tensor& logits, const at::Tensor& indices,
    const at::Tensor& gates, const at::Tensor& hidden, const at::Tensor& expert_out) {
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), F = w1.size(1), k = indices.size(1);
  TORCH_CHECK(grad.sizes() == x.sizes() && logits.sizes() == at::IntArrayRef({T, E}) &&
                  indices.sizes() == at::IntArrayRef({T, k}) && hidden.sizes() == at::IntArrayRef({T, k, F}) &&
                  expert_out.sizes() == at::IntArrayRef({T, k, D}),
              "lifeiqa_fast.moe_backward: grad and the saved tensors must have the forward's shapes");
  const at::ScalarType acc = logits.scalar_type();
  const at::Tensor g = grad.to(acc), xa = x.to(acc);
  const at::Tensor counts = sum_per_expert(indices, at::ones_like(gates), E);
  const at::Tensor d_y = gates.unsqueeze(-1).mul(g.unsqueeze(1)).view({T * k, D});  // (T * k, D)
  at::Tensor d_gates = g.unsqueeze(1).mul(expert_out.to(acc)).sum(-1);                // (T, k)
  d_gates = d_gates.add(counts.index_select(0, indices.flatten()).view({T, k}).mul(grad_aux.to(acc))
                            .mul(static_cast<double>(E) / (static_cast<double>(T) * T)));
  at::Tensor dx = at::zeros({T, D}, logits.options());
  at::Tensor dw1 = at::zeros({E, F, D}, logits.options()), db1 = at::zeros({E, F}, logits.options());
  at::Tensor dw2 = at::zeros({E, D, F}, logits.options()), db2 = at::zeros({E, D}, logits.options());
  const at::Tensor hidden_pairs = hidden.view({T * k, F});
  Groups groups = group_by_expert(indices, E);
  for (int64_t e = 0; e < E; ++e) {
    if (groups.pairs[e].empty()) continue;
    const at::Tensor pair_ids = ids(groups.pairs[e], x), token_ids = ids(groups.tokens[e], x);
    const at::Tensor dy = d_y.index_select(0, pair_ids), h = hidden_pairs.index_select(0, pair_ids).to(acc);
    dw2[e].copy_(dy.t().mm(h));
    db2[e].copy_(dy.sum(0));
    at::Tensor dh = dy.mm(w2[e].to(acc)).mul_(h.gt(0));
    if (dropout_mask.has_value()) dh.mul_(dropout_mask->view({T * k, F}).index_select(0, pair_ids).to(acc));
    dw1[e].copy_(dh.t().mm(xa.index_select(0, token_ids)));
    db1[e].copy_(dh.sum(0));
    dx.index_add_(0, token_ids, dh.mm(w1[e].to(acc)));
  }
  const at::Tensor d_top = gates.mul(d_gates.sub(gates.mul(d_gates).sum(-1, true)));  // softmax's adjoint
  at::Tensor d_logits = at::zeros({T, E}, logits.options()).scatter_add(1, indices, d_top);
  const at::Tensor lse = logits.logsumexp({-1}, true);
  d_logits.add_(logits.softmax(-1).mul(lse).mul(grad_z.to(acc)).mul(2.0 / static_cast<double>(T)));
  dx.add_(d_logits.mm(router_weight.to(acc)));
  const at::ScalarType dt = x.scalar_type();
  return {dx.to(dt),         d_logits.t().mm(xa).to(dt), d_logits.sum(0).to(dt), dw1.to(dt), db1.to(dt),
          dw2.to(dt),        db2.to(dt)};
}

}  // namespace
}  // namespace lifeiqa_fast

TORCH_LIBRARY_IMPL(lifeiqa_fast, CPU, m) {
  m.impl("moe", &lifeiqa_fast::moe_cpu);
  m.impl("moe_backward", &lifeiqa_fast::moe_backward_cpu);
}
