// C++ test of every lifeiqa_fast op, called through the dispatcher as any libtorch user would call
// them, independently of csrc/: each op's CPU kernel against its formula (lifeiqa_fast/reference.py)
// written out here in float64 ATen primitives, each backward op against ATen autograd through that
// formula, and one malformed argument per op, which must raise a c10::Error that names it. The CPU
// checks run twice, with the kernels' best build and with their baseline build (set_cpu_isa). Built
// by CMakeLists.txt as test_ops and run by ctest; prints each failed check and exits 1 if any failed.
//
// Ops without a C++ backward: gcn (ops/gcn.py differentiates from the h1, h2 it returns, checked here),
// attend_memory and decoder_memory (forward only).
//
// When built with WITH_CUDA=ON (LIFEIQA_FAST_TEST_CUDA) and run where a GPU is present, it also
// compares the CUDA kernels with the CPU ones; without a GPU that part is skipped (and says so).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#ifdef LIFEIQA_FAST_TEST_CUDA
#include <ATen/Context.h>
#endif

namespace {

using Tensor = at::Tensor;
using CT = const at::Tensor&;
using OptTensor = std::optional<at::Tensor>;
using Tensors = std::vector<at::Tensor>;

// The ops' C++ signatures, as their CPU kernels declare them.
using GridPoolFn = Tensor(CT, int64_t);
using GridPoolBackwardFn = Tensor(CT, int64_t, int64_t, int64_t);
using GcnFn = std::tuple<Tensor, Tensor, Tensor>(CT, const OptTensor&, CT, CT, CT, CT, CT, CT);
using CrossAttentionFn =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(CT, CT, CT, CT, CT, CT, CT, CT, int64_t, double);
using CrossAttentionBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, CT, int64_t);
using AttendMemoryFn = Tensor(CT, CT, CT, CT, CT, CT, CT, CT, int64_t, double);
using DecoderMemoryFn = Tensor(CT, CT, const c10::List<OptTensor>&, at::TensorList, int64_t, double);
using MoeFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    CT, CT, CT, CT, CT, CT, CT, int64_t, const OptTensor&, bool);
using MoeBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    CT, CT, CT, CT, CT, CT, CT, const OptTensor&, CT, CT, CT, CT, CT);
using BuildInfoFn = std::string();
using SetCpuIsaFn = std::string(std::string);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("lifeiqa_fast::" + name).c_str(), "").typed<Fn>();
}

// |got - want| <= atol + rtol |want| elementwise, got an fp32 op's output, want the float64 truth.
struct Tol {
  double atol, rtol;
};
// grid_pool: a mean of at most 6 cells, a few ulps.
constexpr Tol kGridPoolTol{1e-6, 1e-6};
// gcn, moe forward: fp32 sums in another order than the formula's, a few ulps through three layers
// (tests/test_gcn.py and tests/test_moe.py use the same).
constexpr Tol kForwardTol{1e-5, 1e-5};
// cross_attention, attend_memory: a few ulps through a LayerNorm, two projections and a softmax.
constexpr Tol kAttentionTol{2e-5, 2e-5};
// decoder_memory: two layers of gcn then attention, the errors of each carried into the next.
constexpr Tol kDecoderTol{5e-5, 5e-5};
// Backward ops: the adjoint's products and sums in fp32, as in the Python tests.
constexpr Tol kBackwardTol{1e-4, 1e-4};
#ifdef LIFEIQA_FAST_TEST_CUDA
// A CUDA kernel against the CPU one: both fp32, --use_fast_math exponentials and divisions on the GPU.
constexpr Tol kCudaTol{1e-4, 1e-4};
#endif

int g_failures = 0;
std::string g_isa;  // the CPU kernels' build under test (set_cpu_isa), named in each failure

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL [cpu_isa %s]: %s\n", g_isa.c_str(), what.c_str());
  }
}

// Deterministic, non-constant values in [-scale, scale] of the given shape (no RNG: the same on
// every run).
Tensor values(at::IntArrayRef shape, double phase, double scale = 3.0) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return (at::arange(n, at::kDouble).mul(0.7371).add(phase).sin().mul(scale)).to(at::kFloat).reshape(shape);
}

Tensors f64(const Tensors& ts) {  // float64 copies
  Tensors r;
  for (const Tensor& t : ts) r.push_back(t.to(at::kDouble));
  return r;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

void check_close(const Tensor& got, const Tensor& want, Tol tol, const std::string& what) {
  if (got.sizes() != want.sizes()) {
    check(false, what + ": shape " + shape_str(got.sizes()) + ", expected " + shape_str(want.sizes()));
    return;
  }
  if (want.numel() == 0) return;
  const Tensor g = got.to(at::kDouble).cpu(), w = want.to(at::kDouble).cpu();
  const Tensor diff = g.sub(w).abs();
  const double excess = diff.sub(w.abs().mul(tol.rtol)).sub(tol.atol).max().item<double>();
  check(excess <= 0.0, what + ": max |got - expected| = " + num(diff.max().item<double>()) + " > " + num(tol.atol) +
                           " + " + num(tol.rtol) + " |expected|");
}

void check_all_close(const Tensors& got, const Tensors& want, Tol tol, const std::string& what,
                     const std::vector<std::string>& names) {
  for (size_t i = 0; i < names.size(); ++i) check_close(got[i], want[i], tol, what + ", " + names[i]);
}

template <typename... Ts>
Tensors as_list(const std::tuple<Ts...>& t) {
  return std::apply([](const auto&... v) { return Tensors{v...}; }, t);
}
Tensors as_list(const Tensor& t) { return {t}; }

// The gradients of loss(leaves) with respect to each leaf, leaves being float64 copies of inputs:
// ATen autograd through the formula, the truth each backward op is checked against.
Tensors gradients(const std::function<Tensor(const Tensors&)>& loss, const Tensors& inputs) {
  Tensors leaves;
  for (const Tensor& t : inputs) leaves.push_back(t.to(at::kDouble).detach().requires_grad_());
  loss(leaves).backward();
  Tensors grads;
  for (const Tensor& t : leaves) grads.push_back(t.grad());
  return grads;
}

// call() must throw a c10::Error whose message contains needle (the op and the argument it blames).
void check_throws(const std::function<void()>& call, const std::string& needle, const std::string& what) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    check(message.find(needle) != std::string::npos,
          what + ": the error does not say '" + needle + "': " + message);
    return;
  }
  check(false, what + ": no c10::Error");
}

// Where a GPU is present, the op on the inputs moved to it must match the op on the CPU.
#ifdef LIFEIQA_FAST_TEST_CUDA
Tensor to_cuda(const Tensor& t) { return t.to(at::kCUDA); }
OptTensor to_cuda(const OptTensor& t) { return t.has_value() ? OptTensor(t->to(at::kCUDA)) : std::nullopt; }
template <typename V>
const V& to_cuda(const V& v) {  // int64_t, double, bool
  return v;
}
#endif
template <typename Fn, typename... Args>
void check_cuda_matches_cpu(const c10::TypedOperatorHandle<Fn>& f, const std::string& what,
                            const std::vector<std::string>& names, const Args&... args) {
#ifdef LIFEIQA_FAST_TEST_CUDA
  if (at::hasCUDA()) {
    check_all_close(as_list(f.call(to_cuda(args)...)), as_list(f.call(args...)), kCudaTol, "CUDA " + what + " vs CPU",
                    names);
  }
#endif
}

// ---[ grid_pool

// The reference grid_pool of an NHWC tensor with the bin edges given explicitly: (B, g * g, C).
Tensor reference_grid_pool(const Tensor& x, const std::vector<int64_t>& hedges, const std::vector<int64_t>& wedges) {
  const int64_t B = x.size(0), C = x.size(3);
  const int64_t g = static_cast<int64_t>(hedges.size()) - 1;
  Tensor xd = x.to(at::kDouble).contiguous();
  Tensor out = at::empty({B, g * g, C}, xd.options());
  auto xa = xd.accessor<double, 4>();
  auto oa = out.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < C; ++c) {
          double sum = 0.0;
          int64_t count = 0;
          for (int64_t h = hedges[i]; h < hedges[i + 1]; ++h)
            for (int64_t w = wedges[j]; w < wedges[j + 1]; ++w, ++count) sum += xa[b][h][w][c];
          oa[b][i * g + j][c] = sum / static_cast<double>(count);
        }
  return out;
}

// dx = grid_pool_backward(grad, H, W, g) must spread each bin's gradient evenly over the bin:
// every cell of bin (i, j) holds grad[b, i * g + j, c] / cells, so the bin sums to the bin's grad.
void check_grid_pool_backward(const Tensor& dx_in, const Tensor& grad_in, const std::vector<int64_t>& hedges,
                              const std::vector<int64_t>& wedges, const std::string& what) {
  const int64_t B = grad_in.size(0), C = grad_in.size(2);
  const int64_t g = static_cast<int64_t>(hedges.size()) - 1;
  const std::vector<int64_t> want_shape = {B, hedges.back(), wedges.back(), C};
  if (dx_in.sizes() != at::IntArrayRef(want_shape)) {
    check(false, what + ": shape " + shape_str(dx_in.sizes()) + ", expected " + shape_str(want_shape));
    return;
  }
  Tensor dx = dx_in.to(at::kDouble).cpu().contiguous(), grad = grad_in.to(at::kDouble).cpu().contiguous();
  auto da = dx.accessor<double, 4>();
  auto ga = grad.accessor<double, 3>();
  double worst_sum = 0.0, worst_cell = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const double want = ga[b][i * g + j][c];
          const double cells = static_cast<double>((hedges[i + 1] - hedges[i]) * (wedges[j + 1] - wedges[j]));
          double sum = 0.0;
          for (int64_t h = hedges[i]; h < hedges[i + 1]; ++h)
            for (int64_t w = wedges[j]; w < wedges[j + 1]; ++w) {
              sum += da[b][h][w][c];
              worst_cell = std::max(worst_cell, std::abs(da[b][h][w][c] - want / cells));
            }
          worst_sum = std::max(worst_sum, std::abs(sum - want));
        }
  check(worst_sum <= 1e-5, what + ": a bin's gradients sum to the bin's grad +- " + num(worst_sum));
  check(worst_cell <= 1e-6, what + ": a cell differs from its bin's grad / cells by " + num(worst_cell));
}

void test_grid_pool() {
  const auto grid_pool = op<GridPoolFn>("grid_pool");
  const auto grid_pool_backward = op<GridPoolBackwardFn>("grid_pool_backward");
  constexpr int64_t g = 7;

  // (2, 14, 14, 5), grid 7: the bins are the 2 x 2 blocks, i.e. a 2 x 2 average pool.
  const Tensor x14 = values({2, 14, 14, 5}, 0.1);
  const Tensor want14 =
      at::avg_pool2d(x14.permute({0, 3, 1, 2}), {2, 2}).permute({0, 2, 3, 1}).reshape({2, g * g, 5});
  check_close(grid_pool.call(x14, g), want14, kGridPoolTol, "grid_pool (2, 14, 14, 5) vs avg_pool2d");
  // The same values in an NCHW tensor permuted to NHWC (non-unit channel stride), read in place.
  const Tensor x14_strided = x14.permute({0, 3, 1, 2}).contiguous().permute({0, 2, 3, 1});
  check_close(grid_pool.call(x14_strided, g), want14, kGridPoolTol, "grid_pool (2, 14, 14, 5) channel-strided");

  // Bin edges of n cells on the 7-bin grid: torch.linspace(0, n, 8, dtype=torch.int), n = 14, 15, 13.
  const std::vector<int64_t> edges14 = {0, 2, 4, 6, 8, 10, 12, 14};
  const std::vector<int64_t> edges15 = {0, 2, 4, 6, 8, 10, 12, 15};
  const std::vector<int64_t> edges13 = {0, 1, 3, 5, 7, 9, 11, 13};
  // (1, 15, 13, 3), grid 7: uneven bins, checked against explicit loops over those edges.
  const Tensor x15 = values({1, 15, 13, 3}, 0.4);
  check_close(grid_pool.call(x15, g), reference_grid_pool(x15, edges15, edges13), kGridPoolTol,
              "grid_pool (1, 15, 13, 3) vs explicit bins");

  // Backward: each bin's gradient spread evenly over its cells.
  const Tensor grad14 = values({2, g * g, 5}, 1.3);
  check_grid_pool_backward(grid_pool_backward.call(grad14, 14, 14, g), grad14, edges14, edges14,
                           "grid_pool_backward (2, 49, 5) -> 14 x 14");
  const Tensor grad15 = values({1, g * g, 3}, 2.2);
  check_grid_pool_backward(grid_pool_backward.call(grad15, 15, 13, g), grad15, edges15, edges13,
                           "grid_pool_backward (1, 49, 3) -> 15 x 13");

  check_throws([&] { grid_pool.call(values({2, 14, 14}, 0.0), g); }, "lifeiqa_fast.grid_pool: x must have shape",
               "grid_pool: x (2, 14, 14)");
  check_throws([&] { grid_pool_backward.call(values({2, g * g + 1, 5}, 0.0), 14, 14, g); },
               "lifeiqa_fast.grid_pool_backward: grad must have shape", "grid_pool_backward: grad (2, 50, 5)");

  for (const Tensor& x : {x14, x14_strided, x15}) {
    check_cuda_matches_cpu(grid_pool, "grid_pool " + shape_str(x.sizes()), {"out"}, x, g);
  }
  check_cuda_matches_cpu(grid_pool_backward, "grid_pool_backward -> 14 x 14", {"dx"}, grad14, int64_t{14},
                         int64_t{14}, g);
  check_cuda_matches_cpu(grid_pool_backward, "grid_pool_backward -> 15 x 13", {"dx"}, grad15, int64_t{15},
                         int64_t{13}, g);
}

// ---[ gcn

// w1, b1, w2, b2, w3, b3 for D -> H1 -> H2 -> D, the weights scaled by about 1/sqrt(fan-in) so that
// the activations stay of order one.
Tensors gcn_weights(int64_t D, int64_t H1, int64_t H2, double phase) {
  return {values({D, H1}, phase, 1.0 / std::sqrt(D)),   values({H1}, phase + 0.6, 0.1),
          values({H1, H2}, phase + 1.2, 1.0 / std::sqrt(H1)), values({H2}, phase + 1.8, 0.1),
          values({H2, D}, phase + 2.4, 1.0 / std::sqrt(H2)), values({D}, phase + 3.0, 0.1)};
}

// The fixed graph (J + I) / (N + 1) that adj None stands for: (N, N), float64.
Tensor fixed_graph(int64_t N) {
  return at::ones({N, N}, at::kDouble).add(at::eye(N, at::kDouble)).div(static_cast<double>(N + 1));
}

// gcn_ref: h1 = relu(A (x w1) + b1), h2 = relu(A (h1 w2) + b2), out = x + A (h2 w3) + b3, with A (N, N)
// or (B, N, N) and w = {w1, b1, w2, b2, w3, b3}. Returns {out (B, N, D), h1 (B, N, H1), h2 (B, N, H2)}.
Tensors gcn_formula(const Tensor& x, const Tensor& A, const Tensors& w) {
  const Tensor h1 = A.matmul(x.matmul(w[0])).add(w[1]).relu();
  const Tensor h2 = A.matmul(h1.matmul(w[2])).add(w[3]).relu();
  return {x.add(A.matmul(h2.matmul(w[4])).add(w[5])), h1, h2};
}

void test_gcn() {
  const auto gcn = op<GcnFn>("gcn");
  constexpr int64_t B = 2, N = 6, D = 8, H1 = 12, H2 = 10;
  const Tensor x = values({B, N, D}, 0.3, 1.0);
  const Tensors w = gcn_weights(D, H1, H2, 0.7);
  const Tensor shared = values({N, N}, 4.1, 0.4), per_image = values({B, N, N}, 4.3, 0.4);
  struct Case {
    OptTensor adj;
    Tensor A;  // the graph it stands for, float64
    std::string name;
  };
  const Case cases[] = {{std::nullopt, fixed_graph(N), "adj None (the fixed graph)"},
                        {shared, shared.to(at::kDouble), "adj (N, N) shared"},
                        {per_image, per_image.to(at::kDouble), "adj (B, N, N) per image"}};
  for (const Case& c : cases) {
    const std::string what = "gcn (2, 6, 8) " + c.name;
    // h1 and h2 are what ops/gcn.py's backward reads.
    check_all_close(as_list(gcn.call(x, c.adj, w[0], w[1], w[2], w[3], w[4], w[5])),
                    gcn_formula(x.to(at::kDouble), c.A, f64(w)), kForwardTol, what, {"out", "h1", "h2"});
    check_cuda_matches_cpu(gcn, what, {"out", "h1", "h2"}, x, c.adj, w[0], w[1], w[2], w[3], w[4], w[5]);
  }
  check_throws([&] { gcn.call(x, std::nullopt, w[0], w[1], values({H1 + 1, H2}, 0.0), w[3], w[4], w[5]); },
               "lifeiqa_fast.gcn: w2 must have shape", "gcn: w2 (13, 10)");
}

// ---[ cross_attention, attend_memory, decoder_memory

// norm_weight, norm_bias, the query (or packed q, k, v) projection's weight (rows, D) and bias (rows,),
// out_weight (D, D), out_bias (D,).
Tensors attention_weights(int64_t D, int64_t rows, double phase) {
  return {values({D}, phase, 0.5).add(1.0),        values({D}, phase + 0.6, 0.2),
          values({rows, D}, phase + 1.2, 1.0 / std::sqrt(D)), values({rows}, phase + 1.8, 0.1),
          values({D, D}, phase + 2.4, 1.0 / std::sqrt(D)), values({D}, phase + 3.0, 0.1)};
}

struct Attention {
  Tensor out, q, o, lse, stats;
};

// cross_attention_ref: q = LayerNorm(x) q_weight^T + q_bias, o = softmax(q k^T / sqrt(hd)) v per head
// (heads split along D), out = x + o out_weight^T + out_bias; p = {norm_weight, norm_bias, q_weight,
// q_bias, out_weight, out_bias}. Also what the op saves: lse (B, H, Nq) of the scaled scores, stats
// (B, Nq, 2) = LayerNorm mean and 1 / sqrt(biased var + eps).
Attention attention_formula(const Tensor& x, const Tensor& k, const Tensor& v, const Tensors& p, int64_t H,
                            double eps) {
  const int64_t B = x.size(0), Nq = x.size(1), D = x.size(2), hd = D / H;
  // (B, N, D) -> (B, H, N, hd)
  const auto heads = [&](const Tensor& t) { return t.reshape({B, t.size(1), H, hd}).transpose(1, 2); };
  const Tensor q = at::linear(at::layer_norm(x, {D}, p[0], p[1], eps), p[2], p[3]);  // (B, Nq, D)
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const Tensor s = heads(q).matmul(heads(k).transpose(-1, -2)).mul(scale);  // (B, H, Nq, Nk)
  const Tensor o = s.softmax(-1).matmul(heads(v)).transpose(1, 2).reshape({B, Nq, D});
  const Tensor stats = at::stack({x.mean({-1}), x.var({-1}, /*unbiased=*/false).add(eps).rsqrt()}, -1);
  return {x.add(at::linear(o, p[4], p[5])), q, o, s.logsumexp({-1}), stats};
}

// mha_ref: attention_formula with k and v projected from memory by the k and v rows of in_proj;
// p = {norm_weight, norm_bias, in_proj_weight (3D, D), in_proj_bias (3D,), out_weight, out_bias}.
Attention attend_memory_formula(const Tensor& x, const Tensor& memory, const Tensors& p, int64_t H, double eps) {
  const int64_t D = x.size(2);
  const auto rows = [&](const Tensor& t, int64_t i) { return t.narrow(0, i * D, D); };  // q, k, v: i = 0, 1, 2
  return attention_formula(x, at::linear(memory, rows(p[2], 1), rows(p[3], 1)),
                           at::linear(memory, rows(p[2], 2), rows(p[3], 2)),
                           {p[0], p[1], rows(p[2], 0), rows(p[3], 0), p[4], p[5]}, H, eps);
}

void test_cross_attention() {
  const auto cross_attention = op<CrossAttentionFn>("cross_attention");
  const auto cross_attention_backward = op<CrossAttentionBackwardFn>("cross_attention_backward");
  constexpr double eps = 1e-5;
  struct Case {
    int64_t B, Nq, Nk, D, H;
    std::string edge;
  };
  const Case cases[] = {{2, 6, 5, 16, 2, "head_dim 8: the eight-float vector path"},
                        {1, 3, 7, 12, 3, "one image, head_dim 4: the scalar path"}};
  for (const Case& c : cases) {
    const std::string what =
        "cross_attention " + shape_str({c.B, c.Nq, c.Nk, c.D, c.H}) + " (B, Nq, Nk, D, H), " + c.edge;
    const Tensor x = values({c.B, c.Nq, c.D}, 0.5, 1.0), kv = values({c.B, c.Nk, 2, c.D}, 0.9, 1.0);
    const Tensors p = attention_weights(c.D, c.D, 1.3);
    const auto [out, q, o, lse, stats] = cross_attention.call(x, kv, p[0], p[1], p[2], p[3], p[4], p[5], c.H, eps);
    const Tensor kv64 = kv.to(at::kDouble);
    const Attention want =
        attention_formula(x.to(at::kDouble), kv64.select(2, 0), kv64.select(2, 1), f64(p), c.H, eps);
    check_all_close({out, q, o, lse, stats}, {want.out, want.q, want.o, want.lse, want.stats}, kAttentionTol, what,
                    {"out", "q", "o", "lse", "stats"});
    check(lse.scalar_type() == at::kFloat && stats.scalar_type() == at::kFloat, what + ": lse and stats not fp32");

    // Backward: the gradients of <grad, out> with respect to x, kv and the six weights.
    const Tensor grad = values({c.B, c.Nq, c.D}, 4.4, 1.0);
    const Tensors got = as_list(
        cross_attention_backward.call(grad, x, kv, p[0], p[1], p[2], p[4], q, o, lse, stats, c.H));
    const Tensors truth = gradients(
        [&](const Tensors& l) {
          const Tensors weights(l.begin() + 2, l.end());
          return attention_formula(l[0], l[1].select(2, 0), l[1].select(2, 1), weights, c.H, eps)
              .out.mul(grad.to(at::kDouble)).sum();
        },
        {x, kv, p[0], p[1], p[2], p[3], p[4], p[5]});
    check_all_close(got, truth, kBackwardTol, "cross_attention_backward, " + what,
                    {"dx", "dkv", "dnorm_weight", "dnorm_bias", "dq_weight", "dq_bias", "dout_weight", "dout_bias"});

    check_cuda_matches_cpu(cross_attention, what, {"out", "q", "o", "lse", "stats"}, x, kv, p[0], p[1], p[2], p[3],
                           p[4], p[5], c.H, eps);
    check_throws(
        [&] {
          cross_attention.call(x, values({c.B, c.Nk, 2, c.D + 1}, 0.0), p[0], p[1], p[2], p[3], p[4], p[5], c.H, eps);
        },
        "lifeiqa_fast.cross_attention: kv must have shape", what + ": kv with D + 1 channels");
    check_throws(
        [&] {
          cross_attention_backward.call(grad.to(at::kDouble), x, kv, p[0], p[1], p[2], p[4], q, o, lse, stats, c.H);
        },
        "lifeiqa_fast.cross_attention_backward: grad, q and o must", what + ": float64 grad");
  }
}

void test_attend_memory() {
  const auto attend_memory = op<AttendMemoryFn>("attend_memory");
  constexpr int64_t B = 2, Nq = 6, Nk = 5, D = 16, H = 2;
  constexpr double eps = 1e-5;
  const Tensor x = values({B, Nq, D}, 0.5, 1.0), memory = values({B, Nk, D}, 0.9, 1.0);
  const Tensors p = attention_weights(D, 3 * D, 2.1);
  check_close(attend_memory.call(x, memory, p[0], p[1], p[2], p[3], p[4], p[5], H, eps),
              attend_memory_formula(x.to(at::kDouble), memory.to(at::kDouble), f64(p), H, eps).out, kAttentionTol,
              "attend_memory (2, 6, 16), memory (2, 5, 16), 2 heads");
  check_throws([&] { attend_memory.call(x, values({B, Nk, D + 1}, 0.0), p[0], p[1], p[2], p[3], p[4], p[5], H, eps); },
               "lifeiqa_fast.attend_memory: memory must have shape", "attend_memory: memory (2, 5, 17)");
}

void test_decoder_memory() {
  const auto decoder_memory = op<DecoderMemoryFn>("decoder_memory");
  constexpr int64_t B = 2, N = 6, Nk = 5, D = 16, H = 2;
  constexpr double eps = 1e-5;
  const Tensor x = values({B, N, D}, 0.5, 1.0), memory = values({B, Nk, D}, 0.9, 1.0);
  const Tensor shared = values({N, N}, 4.1, 0.4);
  // Layer 0 on the fixed graph, layer 1 on a given one; 12 weights per layer, gcn's then attention's.
  c10::List<OptTensor> adj;
  adj.push_back(std::nullopt);
  adj.push_back(shared);
  const Tensor graphs[] = {fixed_graph(N), shared.to(at::kDouble)};
  Tensors weights;
  Tensor want = x.to(at::kDouble);
  for (int64_t l = 0; l < 2; ++l) {
    const Tensors g = gcn_weights(D, 12, 10, 0.7 + l), a = attention_weights(D, 3 * D, 2.1 + l);
    weights.insert(weights.end(), g.begin(), g.end());
    weights.insert(weights.end(), a.begin(), a.end());
    want = attend_memory_formula(gcn_formula(want, graphs[l], f64(g))[0], memory.to(at::kDouble), f64(a), H, eps).out;
  }
  check_close(decoder_memory.call(x, memory, adj, weights, H, eps), want, kDecoderTol,
              "decoder_memory (2, 6, 16), 2 layers (adj None, (N, N))");
  const Tensors eleven(weights.begin(), weights.begin() + 11);
  c10::List<OptTensor> one_adj;
  one_adj.push_back(std::nullopt);
  check_throws([&] { decoder_memory.call(x, memory, one_adj, eleven, H, eps); },
               "lifeiqa_fast.decoder_memory: weights must hold", "decoder_memory: 11 weights for 1 layer");
}

// ---[ moe

// moe_ref with the routing's outputs: logits (T, E) = x Wr^T + br; the top-k logits' softmax are the
// gates (T, k); each (token t, choice j) pair runs expert e = indices[t, j]: hidden = relu(x_t W1[e]^T +
// b1[e]) * dropout_mask[t, j], expert_out = hidden W2[e]^T + b2[e]; out = sum_j gates[t, j] expert_out.
// aux = E sum_e mean_t(gate of e) mean_t(count of e), the count constant; z = mean_t lse(logits_t)^2.
// Returns {out, aux, z, logits, indices, gates, hidden (T, k, F), expert_out (T, k, D)}, the op's order.
Tensors moe_formula(const Tensor& x, const Tensors& w, int64_t k, const OptTensor& mask) {
  const int64_t T = x.size(0), D = x.size(1), E = w[0].size(0), F = w[2].size(1);
  const Tensor logits = at::linear(x, w[0], w[1]);  // (T, E)
  const auto [top, indices] = logits.topk(k);       // (T, k), torch.topk's order
  const Tensor gates = top.softmax(-1);              // (T, k)
  const Tensor e = indices.flatten();                // (T * k,): the expert of each pair
  const Tensor xp = x.unsqueeze(1).expand({T, k, D}).reshape({T * k, D, 1});
  Tensor hidden = w[2].index_select(0, e).matmul(xp).squeeze(-1).add(w[3].index_select(0, e)).relu();  // (T * k, F)
  if (mask.has_value()) hidden = hidden.mul(mask->reshape({T * k, F}));
  const Tensor expert_out =
      w[4].index_select(0, e).matmul(hidden.unsqueeze(-1)).squeeze(-1).add(w[5].index_select(0, e));  // (T * k, D)
  const Tensor out = gates.unsqueeze(-1).mul(expert_out.view({T, k, D})).sum(1);
  const Tensor zeros = at::zeros({T, E}, x.options());
  const Tensor counts = zeros.scatter(1, indices, 1.0);  // (T, E): 1 where chosen
  const Tensor aux = zeros.scatter(1, indices, gates).mean(0).mul(counts.mean(0)).sum().mul(static_cast<double>(E));
  const Tensor z = logits.logsumexp({-1}).pow(2).mean();
  return {out, aux, z, logits, indices, gates, hidden.view({T, k, F}), expert_out.view({T, k, D})};
}

void test_moe() {
  const auto moe = op<MoeFn>("moe");
  const auto moe_backward = op<MoeBackwardFn>("moe_backward");
  constexpr int64_t T = 7, D = 8, E = 4, F = 12, k = 2;
  const Tensor x = values({T, D}, 0.2, 1.0);
  // router_weight, router_bias, w1, b1, w2, b2 as nn.Linear stores them, stacked over the experts
  const Tensors w = {values({E, D}, 0.8, 0.5),    values({E}, 1.4, 0.1),     values({E, F, D}, 2.0, 0.35),
                     values({E, F}, 2.6, 0.1),    values({E, D, F}, 3.2, 0.3), values({E, D}, 3.8, 0.1)};
  // Dropout with p = 1/4 as a mask: each hidden unit 0 or 1 / (1 - p).
  const Tensor mask = values({T, k, F}, 4.4).gt(-1.5).to(at::kFloat).mul(4.0 / 3.0);
  const Tensor grad = values({T, D}, 5.0, 1.0);
  const Tensor grad_aux = at::scalar_tensor(0.7, at::kFloat), grad_z = at::scalar_tensor(0.3, at::kFloat);
  struct Case {
    OptTensor mask;
    bool dense;
    std::string name;
  };
  const Case cases[] = {{std::nullopt, false, "grouped, no dropout"},
                        {mask, false, "grouped, dropout mask"},
                        {mask, true, "dense, dropout mask"}};
  const std::vector<std::string> names = {"out", "aux", "z", "logits", "indices", "gates", "hidden", "expert_out"};
  for (const Case& c : cases) {
    const std::string what = "moe (7, 8), 4 experts, top 2, " + c.name;
    const OptTensor mask64 = c.mask.has_value() ? OptTensor(c.mask->to(at::kDouble)) : std::nullopt;
    const Tensors got = as_list(moe.call(x, w[0], w[1], w[2], w[3], w[4], w[5], k, c.mask, c.dense));
    check_all_close(got, moe_formula(x.to(at::kDouble), f64(w), k, mask64), kForwardTol, what, names);
    check(got[4].scalar_type() == at::kLong, what + ": indices not int64");

    // Backward: the gradients of <grad, out> + grad_aux aux + grad_z z with respect to x and the weights.
    const Tensors dgot = as_list(moe_backward.call(grad, grad_aux, grad_z, x, w[0], w[2], w[4], c.mask, got[3],
                                                   got[4], got[5], got[6], got[7]));
    const Tensors truth = gradients(
        [&](const Tensors& l) {
          const Tensors r = moe_formula(l[0], Tensors(l.begin() + 1, l.end()), k, mask64);
          return r[0].mul(grad.to(at::kDouble)).sum().add(r[1].mul(0.7)).add(r[2].mul(0.3));
        },
        {x, w[0], w[1], w[2], w[3], w[4], w[5]});
    check_all_close(dgot, truth, kBackwardTol, "moe_backward, " + what,
                    {"dx", "drouter_weight", "drouter_bias", "dw1", "db1", "dw2", "db2"});

    check_cuda_matches_cpu(moe, what, names, x, w[0], w[1], w[2], w[3], w[4], w[5], k, c.mask, c.dense);
  }
  check_throws([&] { moe.call(x, w[0], w[1], values({E, F, D + 1}, 0.0), w[3], w[4], w[5], k, std::nullopt, false); },
               "lifeiqa_fast.moe: w1 must have shape", "moe: w1 (4, 12, 9)");
  check_throws(
      [&] {
        const Tensors r = as_list(moe.call(x, w[0], w[1], w[2], w[3], w[4], w[5], k, std::nullopt, false));
        moe_backward.call(values({T, D + 1}, 0.0), grad_aux, grad_z, x, w[0], w[2], w[4], std::nullopt, r[3], r[4],
                          r[5], r[6], r[7]);
      },
      "lifeiqa_fast.moe_backward: grad and the saved tensors must", "moe_backward: grad (7, 9)");
}

// ---[ build_info, cpu_isa, set_cpu_isa

void test_build_ops() {
  const std::string info = op<BuildInfoFn>("build_info").call();
  check(!info.empty() && info.front() == '{' && info.back() == '}', "build_info: not a JSON object: " + info);
  const std::string isa = op<BuildInfoFn>("cpu_isa").call();
  check(isa == g_isa, "cpu_isa: '" + isa + "', set_cpu_isa said '" + g_isa + "'");
  check_throws([] { op<SetCpuIsaFn>("set_cpu_isa").call("avx9"); }, "lifeiqa_fast.set_cpu_isa: isa must be",
               "set_cpu_isa('avx9')");
}

}  // namespace

int main() {
  try {
    const auto set_cpu_isa = op<SetCpuIsaFn>("set_cpu_isa");
    // The kernels' best build for this CPU, then the baseline x86-64 build.
    for (const char* isa : {"best", "baseline"}) {
      g_isa = set_cpu_isa.call(isa);
      test_build_ops();
      test_grid_pool();
      test_gcn();
      test_cross_attention();
      test_attend_memory();
      test_decoder_memory();
      test_moe();
    }
    g_isa = set_cpu_isa.call("best");
#ifdef LIFEIQA_FAST_TEST_CUDA
    if (at::hasCUDA()) {
      std::printf("CUDA kernels compared with CPU ones\n");
    } else {
      std::printf("no CUDA device: CUDA kernels not compared (built with WITH_CUDA=ON)\n");
    }
#endif
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "FAIL: c10::Error: %s\n", e.what_without_backtrace());
    if (std::string(e.what_without_backtrace()).find("Could not find schema") != std::string::npos) {
      std::fprintf(stderr, "(the ops' static registrars did not run: liblifeiqa_fast_ops is not loaded; link it "
                           "with --no-as-needed, e.g. through the CMake target lifeiqa_fast::ops)\n");
    }
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all lifeiqa_fast op checks passed\n");
  return 0;
}
