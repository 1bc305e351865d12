"""cross_attention: one decoder layer's LayerNorm, query projection, attention to the projected memory
and output projection (docs/model.md, step 4), fused.

Public function, the Triton op, fake implementations and the autograd formula. The schema of the
native op lives in csrc/library.cpp (its contract in csrc/cross_attention.h), its kernels in
csrc/cross_attention.cpp (CPU) and kernels/cross_attention.cu (CUDA), the Triton kernel in
lifeiqa_fast/triton/cross_attention.py and the reference in lifeiqa_fast/reference.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _ext
from ..reference import cross_attention_ref, mha_ref
from ..triton import cross_attention as _triton
from ._impl import (acc_dtype, autocast_rule, check_like_x, check_tensors, faster_on_this_cpu, first_order_only,
                    is_int, linear, register_autocast, requested, resolve, within_limits)

MAX_QUERIES = 64  # csrc/cross_attention.h, kAttnMaxQueries
MAX_HEAD_DIM = 128  # csrc/cross_attention.h, kAttnMaxHeadDim


@autocast_rule
def cross_attention(x: Tensor, kv: Tensor, norm_weight: Tensor, norm_bias: Tensor, q_weight: Tensor,
                    q_bias: Tensor, out_weight: Tensor, out_bias: Tensor, num_heads: int, eps: float = 1e-5,
                    impl: str | None = None) -> Tensor:
    """x + out_proj(MHA(LayerNorm(x) q_weight^T + q_bias, K, V)): torch.nn.MultiheadAttention semantics
    (scores scaled by 1/sqrt(head_dim), softmax in fp32, dropout 0) with the keys and values given.

    x: (B, Nq, D), 1 <= Nq <= 64; kv: (B, Nk, 2, D), Nk >= 1: kv[:, :, 0] the keys and kv[:, :, 1] the
    values, already projected (memory @ the k and v rows of in_proj_weight, plus their biases; a strided
    view such as one layer's slice of all layers' keys and values is read in place when its last
    dimension is contiguous); norm_weight, norm_bias (D,): the LayerNorm; q_weight (D, D), q_bias (D,):
    the q rows of in_proj; out_weight (D, D), out_bias (D,): out_proj. num_heads divides D into heads
    of at most 128 channels. All of x's dtype (float16, bfloat16, float32, float64) and device. Returns
    (B, Nq, D), differentiable in every tensor, once: the fused backward is not differentiable, and a
    second differentiation through it (create_graph=True, then another grad) raises a RuntimeError
    (impl="reference" under the math attention backend supports it). impl: "auto", "reference",
    "native", "triton", or None for the process-wide default.
    """
    _check(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps)
    which = within_limits("cross_attention", resolve("cross_attention", x, impl), impl,
                          _beyond_kernels(x, num_heads))
    which = faster_on_this_cpu("cross_attention", which, impl, x, x.shape[0] * x.shape[1])
    args = (norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias)
    if which in ("reference", "composite"):  # the reference is the ATen calls of the module, sync-free already
        return cross_attention_ref(x, kv, *args, num_heads, eps)
    op = cross_attention_op(which)
    if kv.stride(-1) != 1:
        # not .contiguous(): it returns as it is a tensor that counts as contiguous (empty, or D = 1)
        # whatever its last stride, which the kernels check
        kv = kv.clone(memory_format=torch.contiguous_format)
    return op(x.contiguous(), kv, *(t.contiguous() for t in args), num_heads, float(eps))[0]


@autocast_rule
def attend_memory(x: Tensor, memory: Tensor, norm_weight: Tensor, norm_bias: Tensor, in_proj_weight: Tensor,
                  in_proj_bias: Tensor, out_weight: Tensor, out_bias: Tensor, num_heads: int,
                  eps: float = 1e-5, impl: str | None = None) -> Tensor:
    """One official decoder layer's attention, x + MHA(LayerNorm(x), memory, memory) (reference.mha_ref,
    the same arguments), with the keys and values never formed: the queries go to the memory instead.

    Per head, q_h . k_j = (q_h W_k,h) . m_j + q_h . b_k,h, and the last term, the same for every key,
    cancels in the softmax; P_h V_h = (P_h M) W_v,h^T + b_v,h, the rows of P_h summing to 1. So the
    layer costs 4 Nq D^2 + 2 H Nq Nk D multiply-adds per image where the module's costs 2 (Nq + Nk) D^2
    + 2 Nq Nk D (Life-IQA: 4.9 M instead of 16.4 M, 14.5 M of which project the keys and values).
    x: (B, Nq, D); memory: (B, Nk, D), Nk >= 1; in_proj_weight (3D, D), in_proj_bias (3D,) packed q, k, v;
    out_weight (D, D); out_bias, norm_weight, norm_bias (D,); all of x's dtype and device.

    impl: "composite", ATen ops (batched GEMMs; the scores and the softmax in fp32 for half types),
    differentiable by autograd to any order; "native", the CPU kernel (csrc/attend_memory.cpp: each
    weight streamed once per image, fp32 and bf16), its backward the composite path's, once; "reference",
    reference.mha_ref; "auto" (None: the process-wide default) the native kernel on CPU for at most
    NATIVE_MAX_ROWS query rows in all (B * Nq) with no gradient recorded, where it is faster, else composite.
    """
    _check_memory_args(x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias,
                       num_heads, eps)
    args = (x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias)
    which = within_limits("attend_memory", resolve("attend_memory", x, impl), impl, _beyond_native(x))
    if which == "reference":
        return mha_ref(*args, num_heads, eps)
    if which == "native" and requested(impl) == "auto" and not native_attend_pays(x, args):
        which = "composite"
    if which == "native":
        return torch.ops.lifeiqa_fast.attend_memory(*(t.contiguous() for t in args), num_heads, float(eps))
    return _attend_memory_composite(*args, num_heads, eps)


def _beyond_native(x: Tensor) -> str | None:
    """How x exceeds the native kernel (fp32 and bf16 only), or None."""
    if x.dtype in (torch.float32, torch.bfloat16):
        return None
    return f"the native attend_memory kernel takes float32 and bfloat16, got {x.dtype}"


# "auto" takes the native kernel for at most this many query rows in all (B * Nq): it reads every weight
# once per image, where the composite path's batched GEMMs read them once per call, so its lead shrinks
# with the batch. Measured on a 2-core AMD EPYC (AVX-512, native bf16), Life-IQA's 4-layer decoder
# stack with and without it, timed in turn: 0.67x the composite path's time at 1 image, 0.84x at 4,
# 0.93x at 16 and 0.95x at 32 to 64, alike in fp32 and bf16; 32 images keeps a margin for other CPUs.
NATIVE_MAX_ROWS = 192


def native_attend_pays(x: Tensor, tensors) -> bool:
    """Whether "auto" runs attend_memory's native kernel on x: fp32 or bf16, few rows (a plain count, not a
    symbolic one) and no gradient recorded for x or tensors (its backward recomputes the composite forward)."""
    if _beyond_native(x) is not None or torch.is_grad_enabled() and (x.requires_grad or
                                                                        any(t.requires_grad for t in tensors)):
        return False
    return statically_known_true(x.shape[0] * x.shape[1] <= NATIVE_MAX_ROWS)


def _attend_memory_composite(x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias,
                             num_heads, eps) -> Tensor:
    B, Nq, D = x.shape
    Nk, H = memory.shape[1], num_heads
    hd = D // H
    acc = acc_dtype(x.dtype)
    q = linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), in_proj_weight[:D], in_proj_bias[:D])
    w_k, w_v = in_proj_weight[D : 2 * D].view(H, hd, D), in_proj_weight[2 * D :].view(H, hd, D)
    # q_mem and the scores in fp32 for half types, as the module's attention forms q . k in fp32: the
    # scores pass fp16's 65504 where q, k and the output do not (in_proj and memory scaled by 30: scores
    # near 1e5, |k| near 3500), and inf - inf is NaN in the softmax.
    q_mem = torch.bmm((q.to(acc) * hd**-0.5).view(B * Nq, H, hd).transpose(0, 1), w_k.to(acc))  # (H, B * Nq, D)
    q_mem = q_mem.view(H, B, Nq, D).transpose(0, 1).reshape(B, H * Nq, D)
    p = torch.softmax(torch.bmm(q_mem, memory.to(acc).transpose(1, 2)), dim=-1).to(x.dtype)  # (B, H * Nq, Nk)
    pm = torch.bmm(p, memory).view(B, H, Nq, D).transpose(0, 1).reshape(H, B * Nq, D)  # (H, B * Nq, D)
    o = torch.bmm(pm, w_v.transpose(1, 2)).view(H, B, Nq, hd).permute(1, 2, 0, 3).reshape(B, Nq, D)
    return x + linear(o + in_proj_bias[2 * D :], out_weight, out_bias)


def _check_memory_args(x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias,
                       num_heads, eps) -> None:
    tensors = dict(x=x, memory=memory, norm_weight=norm_weight, norm_bias=norm_bias, in_proj_weight=in_proj_weight,
                   in_proj_bias=in_proj_bias, out_weight=out_weight, out_bias=out_bias)
    check_tensors("attend_memory", tensors)
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"lifeiqa_fast.attend_memory: x must be a floating (B, Nq, D) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    B, Nq, D = x.shape
    if D < 1 or not is_int(num_heads) or num_heads < 1 or D % num_heads:
        raise ValueError(f"lifeiqa_fast.attend_memory: num_heads must be an int dividing D={D}, got {num_heads!r}")
    _check_eps("attend_memory", eps)
    if memory.dim() != 3 or memory.shape[0] != B or memory.shape[1] < 1 or memory.shape[2] != D:
        raise ValueError(f"lifeiqa_fast.attend_memory: memory must have shape (B, Nk, D) with B={B}, Nk >= 1, "
                         f"D={D}, got {tuple(memory.shape)}")
    vector, matrix = ("(D,)", (D,)), ("(D, D)", (D, D))
    check_like_x("attend_memory", x, tensors, dict(norm_weight=vector, norm_bias=vector,
                                                   in_proj_weight=("(3D, D)", (3 * D, D)),
                                                   in_proj_bias=("(3D,)", (3 * D,)), out_weight=matrix,
                                                   out_bias=vector))


def cross_attention_op(impl: str):
    """The raw op of "native" or "triton", with the schema of csrc/library.cpp: (x, kv, norm_weight,
    norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps) -> (out, q, o, lse, stats)."""
    return torch.ops.lifeiqa_fast.cross_attention.default if impl == "native" else cross_attention_triton


def _check(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps) -> None:
    tensors = dict(x=x, kv=kv, norm_weight=norm_weight, norm_bias=norm_bias, q_weight=q_weight, q_bias=q_bias,
                   out_weight=out_weight, out_bias=out_bias)
    check_tensors("cross_attention", tensors)
    if x.dim() != 3:
        raise ValueError(f"lifeiqa_fast.cross_attention: x must have shape (B, Nq, D), got {tuple(x.shape)}")
    B, Nq, D = x.shape
    if Nq < 1:
        raise ValueError(f"lifeiqa_fast.cross_attention: x must have Nq >= 1 query tokens, got Nq={Nq}")
    if not x.is_floating_point():
        raise TypeError(f"lifeiqa_fast.cross_attention: x must be a floating tensor, got {x.dtype}")
    if D < 1 or not is_int(num_heads) or num_heads < 1 or D % num_heads:
        raise ValueError(f"lifeiqa_fast.cross_attention: num_heads must be an int dividing D={D}, got {num_heads!r}")
    _check_eps("cross_attention", eps)
    if kv.dim() != 4 or kv.shape[0] != B or kv.shape[1] < 1 or kv.shape[2] != 2 or kv.shape[3] != D:
        raise ValueError(f"lifeiqa_fast.cross_attention: kv must have shape (B, Nk, 2, D) with B={B}, Nk >= 1, "
                         f"D={D}, got {tuple(kv.shape)}")
    vector, matrix = ("(D,)", (D,)), ("(D, D)", (D, D))
    check_like_x("cross_attention", x, tensors, dict(norm_weight=vector, norm_bias=vector, q_weight=matrix,
                                                     q_bias=vector, out_weight=matrix, out_bias=vector))


def _beyond_kernels(x: Tensor, num_heads: int) -> str | None:
    """How x exceeds the native and Triton kernels' limits (csrc/cross_attention.h), or None."""
    Nq, head_dim = x.shape[1], x.shape[2] // num_heads
    if Nq > MAX_QUERIES or head_dim > MAX_HEAD_DIM:
        return (f"the kernels take at most {MAX_QUERIES} query tokens (kAttnMaxQueries) and heads of at most "
                f"{MAX_HEAD_DIM} channels (kAttnMaxHeadDim), got Nq={Nq}, D / num_heads={head_dim}")
    return None


def _check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"lifeiqa_fast.{op}: eps must be a positive number, got {eps!r}")


@torch.library.custom_op("lifeiqa_fast::cross_attention_triton", mutates_args=())
def cross_attention_triton(x: Tensor, kv: Tensor, norm_weight: Tensor, norm_bias: Tensor, q_weight: Tensor,
                           q_bias: Tensor, out_weight: Tensor, out_bias: Tensor, num_heads: int,
                           eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton kernel as an op, with the native op's schema: -> (out, q, o, lse, stats)."""
    return _triton.cross_attention_forward(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias,
                                           num_heads, eps)


def _fake(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps):
    B, Nq, D = x.shape
    acc = acc_dtype(x.dtype)
    return (x.new_empty(B, Nq, D), x.new_empty(B, Nq, D), x.new_empty(B, Nq, D),
            x.new_empty(B, num_heads, Nq, dtype=acc), x.new_empty(B, Nq, 2, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps = inputs
    _, q, o, lse, stats = output
    ctx.mark_non_differentiable(q, o, lse, stats)
    ctx.save_for_backward(x, kv, norm_weight, norm_bias, q_weight, out_weight, q, o, lse, stats)
    ctx.num_heads = num_heads


# What supports double backward: the reference, with the math attention (the fused CPU and CUDA
# kernels that scaled_dot_product_attention picks have no double backward either), or attend_memory.
_DOUBLE_BACKWARD = ('impl="reference" under torch.nn.attention.sdpa_kernel(SDPBackend.MATH), or '
                    'lifeiqa_fast.ops.attend_memory')


def _backward(ctx, grad, *_unused):
    """The Triton op's backward: _composite_backward, not differentiable again (first_order_only)."""
    grads = first_order_only("cross_attention", _composite_backward, grad, *ctx.saved_tensors, ctx.num_heads,
                             instead=_DOUBLE_BACKWARD)
    return (*grads, None, None)


def _composite_backward(grad, x, kv, norm_weight, norm_bias, q_weight, out_weight, q, o, lse, stats, num_heads):
    """Adjoint of out = x + o Wo^T + bo, o_h = P_h V_h, P_h = softmax(q_h K_h^T s), q = xn Wq^T + bq,
    xn = xhat g + b, xhat = (x - mean) rstd; P recomputed from the saved log-sum-exp. With do = dout Wo:
    dV_h = P_h^T do_h, dS_h = P_h * (do_h V_h^T - rowsum(do_h * o_h)) s, dq_h = dS_h K_h, dK_h = dS_h^T q_h,
    dWq = dq^T xn, dxn = dq Wq, dx = dout + rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) with
    dxhat = dxn g. Composite ATen ops in fp32 (fp64 for fp64), batched over images and heads; with the
    arguments of the native cross_attention_backward, it returns the same 8 gradients. Reading q, o, lse
    and stats as constants, it is not differentiable again."""
    acc = acc_dtype(x.dtype)
    B, Nq, D = x.shape
    H = num_heads
    hd = D // H
    f = lambda t: t.to(acc)  # noqa: E731
    heads = lambda t: f(t).reshape(B, t.shape[1], H, hd).transpose(1, 2)  # noqa: E731  -> (B, H, N, hd)
    merge = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], D)  # noqa: E731  -> (B, N, D)
    flat = lambda t: t.reshape(-1, D)  # noqa: E731
    g = f(grad)
    do = g @ f(out_weight)
    qh, kh, vh, oh, doh = heads(q), heads(kv[:, :, 0]), heads(kv[:, :, 1]), heads(o), heads(do)
    scale = hd**-0.5
    p = torch.exp(qh @ kh.transpose(-1, -2) * scale - lse.unsqueeze(-1))  # (B, H, Nq, Nk)
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True)) * scale
    dq = merge(ds @ kh)
    dkv = torch.stack((merge(ds.transpose(-1, -2) @ qh), merge(dv)), dim=2)
    mean, rstd = stats[..., :1], stats[..., 1:]
    xhat = (f(x) - mean) * rstd
    dxn = dq @ f(q_weight)
    dxhat = dxn * f(norm_weight)
    dx = g + rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    xn = xhat * f(norm_weight) + f(norm_bias)
    grads = (dx, dkv, (dxn * xhat).sum((0, 1)), dxn.sum((0, 1)), flat(dq).T @ flat(xn), dq.sum((0, 1)),
             flat(g).T @ flat(f(o)), g.sum((0, 1)))
    return tuple(d.to(x.dtype) for d in grads)


def _native_backward(ctx, grad, *_unused):
    """The native op's backward: the C++ kernel on CPU (csrc/cross_attention.cpp), _composite_backward
    elsewhere; neither differentiable again (first_order_only)."""
    x = ctx.saved_tensors[0]
    if x.device.type != "cpu":
        return _backward(ctx, grad)
    grads = first_order_only("cross_attention", torch.ops.lifeiqa_fast.cross_attention_backward, grad.contiguous(),
                             *ctx.saved_tensors, ctx.num_heads, instead=_DOUBLE_BACKWARD)
    return (*grads, None, None)


def _fake_backward(grad, x, kv, norm_weight, norm_bias, q_weight, out_weight, q, o, lse, stats, num_heads):
    return (torch.empty_like(x), kv.new_empty(kv.shape), torch.empty_like(norm_weight), torch.empty_like(norm_bias),
            torch.empty_like(q_weight), torch.empty_like(norm_bias), torch.empty_like(out_weight),
            torch.empty_like(norm_bias))


def _register(forward_op, backward) -> None:
    torch.library.register_fake(forward_op)(_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)
    register_autocast(forward_op)


_register(cross_attention_triton, _backward)
if _ext.LOADED:
    _register(torch.ops.lifeiqa_fast.cross_attention.default, _native_backward)
    torch.library.register_fake("lifeiqa_fast::cross_attention_backward")(_fake_backward)


def _memory_setup_context(ctx, inputs, output):
    *tensors, num_heads, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.num_heads, ctx.eps = num_heads, eps


def _memory_backward(ctx, grad):
    """The native attend_memory's backward: the composite forward recomputed and differentiated, once
    (first_order_only)."""
    needs = ctx.needs_input_grad[:8]

    def gradients(grad, *tensors):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
            out = _attend_memory_composite(*leaves, ctx.num_heads, ctx.eps)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return tuple(next(grads) if n else None for n in needs)

    grads = first_order_only("attend_memory", gradients, grad, *ctx.saved_tensors,
                             instead="lifeiqa_fast.ops.attend_memory(impl='composite')")
    return (*grads, None, None)


if _ext.LOADED:
    torch.library.register_fake("lifeiqa_fast::attend_memory")(lambda x, *_: torch.empty_like(x))
    torch.library.register_fake("lifeiqa_fast::decoder_memory")(lambda x, *_: torch.empty_like(x))
    torch.library.register_autograd("lifeiqa_fast::attend_memory", _memory_backward,
                                    setup_context=_memory_setup_context)
    register_autocast("lifeiqa_fast::attend_memory")
    register_autocast("lifeiqa_fast::decoder_memory")
