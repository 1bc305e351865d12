// The schema of every lifeiqa_fast op, defined once. Each backend registers its kernels at the
// bottom of its own file: csrc/<op>.cpp for CPU, kernels/<op>.cu for CUDA. Autograd formulas and
// fake (meta) implementations are registered from Python, in lifeiqa_fast/ops/<op>.py.
#include <torch/library.h>

#include <string>

#include "cpu.h"

#if __has_include("lifeiqa_fast_build_info.h")
#include "lifeiqa_fast_build_info.h"  // written by setup.py into build/generated
#else
#define LIFEIQA_FAST_BUILD_INFO "{}"  // built without setup.py (CMake): no record of the sources
#endif

TORCH_LIBRARY(lifeiqa_fast, m) {
  // JSON: {"cuda": compiled with the CUDA kernels, "cuda_arch_list": TORCH_CUDA_ARCH_LIST, "cuda_sources":
  // {op: sha256 of its CUDA sources}}, fixed when this binary was compiled (setup.py).
  m.def("build_info() -> str", []() -> std::string { return LIFEIQA_FAST_BUILD_INFO; });
  // The build of the CPU kernels' hot loops that runs (cpu.h): "avx2" (AVX2 + FMA) or "baseline".
  m.def("cpu_isa() -> str", []() -> std::string {
    return lifeiqa_fast::cpu_has_avx2_fma() ? "avx2" : "baseline";
  });
  // isa "baseline" forces the baseline x86-64 build on any CPU, "best" the best the CPU has (the
  // default; LIFEIQA_FAST_CPU_ISA=baseline starts a process with the baseline). Returns cpu_isa().
  m.def("set_cpu_isa(str isa) -> str", [](std::string isa) -> std::string {
    TORCH_CHECK(isa == "baseline" || isa == "best", "lifeiqa_fast.set_cpu_isa: isa must be 'baseline' or 'best', got '",
                isa, "'");
    lifeiqa_fast::baseline_forced().store(isa == "baseline");
    return lifeiqa_fast::cpu_has_avx2_fma() ? "avx2" : "baseline";
  });
  // x: (B, H, W, C), any strides (an NCHW tensor permuted to NHWC is read in place).
  // Returns (B, grid * grid, C): the mean of x over each UPP bin, bins row-major.
  m.def("grid_pool(Tensor x, int grid) -> Tensor");
  // grad: (B, grid * grid, C). Returns (B, height, width, C): each bin's gradient spread evenly
  // over the cells of that bin.
  m.def("grid_pool_backward(Tensor grad, int height, int width, int grid) -> Tensor");
  // x: (B, N, D); adj: (N, N), (B, N, N), or None for the fixed graph (J + I) / (N + 1); weights
  // stored (in, out): w1 (D, H1), w2 (H1, H2), w3 (H2, D); biases 1-D. Returns
  // (x + A (h2 w3) + b3, h1, h2) with h1 = relu(A (x w1) + b1), h2 = relu(A (h1 w2) + b2), the
  // activations being what the backward needs.
  m.def("gcn(Tensor x, Tensor? adj, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3)"
        " -> (Tensor, Tensor, Tensor)");
  // x: (B, Nq, D) contiguous; kv: (B, Nk, 2, D) projected keys and values, last dimension contiguous;
  // norm_weight, norm_bias, q_bias, out_bias (D,); q_weight, out_weight (D, D) nn.Linear layout.
  // Returns (x + out_proj(MHA(LayerNorm(x) q_weight^T + q_bias, K, V)), q, o, lse, stats): see
  // csrc/cross_attention.h for what the last four hold.
  m.def("cross_attention(Tensor x, Tensor kv, Tensor norm_weight, Tensor norm_bias, Tensor q_weight, "
        "Tensor q_bias, Tensor out_weight, Tensor out_bias, int num_heads, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CPU backward of cross_attention (CUDA and Triton run a composite of ATen ops, in
  // lifeiqa_fast/ops/cross_attention.py): grad (B, Nq, D) and the forward's inputs and saved
  // outputs -> the gradients of x, kv (contiguous), norm_weight, norm_bias, q_weight, q_bias,
  // out_weight, out_bias, each of its input's dtype.
  m.def("cross_attention_backward(Tensor grad, Tensor x, Tensor kv, Tensor norm_weight, Tensor norm_bias, "
        "Tensor q_weight, Tensor out_weight, Tensor q, Tensor o, Tensor lse, Tensor stats, int num_heads)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x: (B, Nq, D), memory: (B, Nk, D), norm_weight, norm_bias, out_bias (D,), in_proj_weight (3D, D) and
  // in_proj_bias (3D,) packed q, k, v, out_weight (D, D), all contiguous. Returns x + out_proj(MHA(
  // LayerNorm(x), memory, memory)), the keys and values never formed. Forward only, CPU, fp32 and bf16.
  m.def("attend_memory(Tensor x, Tensor memory, Tensor norm_weight, Tensor norm_bias, Tensor in_proj_weight, "
        "Tensor in_proj_bias, Tensor out_weight, Tensor out_bias, int num_heads, float eps) -> Tensor");
  // The decoder's layers in turn, x = attend_memory(gcn(x, adj[l], w1..b3), memory, norm_weight..out_bias)
  // for layer l, one adj per layer and 12 weights per layer in that order. Forward only, CPU.
  m.def("decoder_memory(Tensor x, Tensor memory, Tensor?[] adj, Tensor[] weights, int num_heads, float eps)"
        " -> Tensor");
  // x: (T, D); router (E, D), (E,); experts stacked as nn.Linear stores them: w1 (E, F, D), b1 (E, F),
  // w2 (E, D, F), b2 (E, D); dropout_mask None or (T, top_k, F), multiplied into the hidden layer.
  // dense: run every expert on every token (gates zero where not chosen) instead of grouping the
  // tokens by expert. Returns (out, aux, z, logits, indices, gates, hidden, expert_out): see
  // csrc/moe.h.
  m.def("moe(Tensor x, Tensor router_weight, Tensor router_bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
        "int top_k, Tensor? dropout_mask, bool dense) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  // The CPU backward of moe: the gradients of out, aux and z and the forward's inputs and saved
  // outputs -> the gradients of x, router_weight, router_bias, w1, b1, w2, b2.
  m.def("moe_backward(Tensor grad, Tensor grad_aux, Tensor grad_z, Tensor x, Tensor router_weight, Tensor w1, "
        "Tensor w2, Tensor? dropout_mask, Tensor logits, Tensor indices, Tensor gates, Tensor hidden, "
        "Tensor expert_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
