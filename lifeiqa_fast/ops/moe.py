"""moe: the sparse mixture of experts of Life-IQA's head (docs/moe.md), fused: router, top-k, gates,
the experts' MLPs, their gated sum, and the aux and z losses.

Public function, the Triton op, fake implementations and the autograd formula. The schema of the native
op lives in csrc/library.cpp (its contract in csrc/moe.h), its kernels in csrc/moe.cpp (CPU) and
kernels/moe.cu (CUDA), the Triton kernels in lifeiqa_fast/triton/moe.py and the reference in
lifeiqa_fast/reference.py (moe_ref, the authors' per-expert loop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..reference import moe_ref
from ._impl import (acc_dtype, agreed_size, autocast_rule, check_like_x, check_tensors, faster_on_this_cpu,
                    first_order_only, is_int, register_autocast, resolve)

@autocast_rule
def moe(x: Tensor, router_weight: Tensor, router_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
        top_k: int, dropout_mask: Tensor | None = None, impl: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routed mixture of experts on tokens x (T, D), D >= 1 -> (out (T, D), aux (), z ()).

    router_weight (E, D), router_bias (E,); the experts stacked as nn.Linear stores them: w1 (E, F, D),
    b1 (E, F), w2 (E, D, F), b2 (E, D), F >= 1. Each token's top_k largest logits (torch.topk's order and
    ties) are softmaxed into its gates; expert e computes relu(x W1[e]^T + b1[e]) W2[e]^T + b2[e];
    out = sum of gate * expert output over the chosen experts. aux = E * sum_e mean_t(gate of e) *
    mean_t(count of e) (the count detached), z = mean_t logsumexp(logits_t)^2, both 0-d, fp32 (fp64
    for fp64). dropout_mask: None, or (T, top_k, F) of x's dtype multiplied into the hidden layer of
    each chosen expert (training: bernoulli(1 - p) / (1 - p)). All tensors of x's dtype and device.
    Differentiable in x and every weight, once (the fused backward is not differentiable: a second
    differentiation through it raises a RuntimeError; impl="reference" and "composite" support it); aux's gradient
    flows only through the gates.
    """
    _check(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask)
    which = faster_on_this_cpu("moe", resolve("moe", x, impl), impl, x, x.shape[0])
    if which == "reference":
        out, aux, z = moe_ref(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask=dropout_mask)
        return out, aux.to(acc_dtype(x.dtype)), z.to(acc_dtype(x.dtype))
    if which == "composite":
        return moe_composite(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask)
    weights = (t.contiguous() for t in (router_weight, router_bias, w1, b1, w2, b2))
    mask = None if dropout_mask is None else dropout_mask.contiguous()
    op = torch.ops.lifeiqa_fast.moe if which == "native" else moe_triton
    # the "grouped" strategy (dense=False): tokens grouped by expert, each expert on its own rows. The ops'
    # "dense" one (every chosen pair through its expert one by one on GPU, every expert on every token on
    # CPU) is never faster on the CPU (benchmarks/results/, moe rows "native-dense" and "native-grouped")
    # and not yet measured on GPUs.
    return op(x.contiguous(), *weights, top_k, mask, False)[:3]


def moe_composite(x: Tensor, router_weight: Tensor, router_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                  b2: Tensor, top_k: int, dropout_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The composite implementation: every expert on every token (E / top_k times the FLOP of routing,
    batched GEMMs; small at Life-IQA's sizes), each token's output the gate-weighted sum over its chosen
    experts. No host synchronisation, no data-dependent shapes (the reference's per-expert boolean
    indexing and one_hot sync on CUDA); the reference's routing (torch.topk, softmax over the top-k
    logits). Differentiable to any order by autograd; aux and z in fp32 (fp64 for fp64)."""
    T, E = x.shape[0], router_weight.shape[0]
    acc = acc_dtype(x.dtype)
    logits = F.linear(x, router_weight, router_bias)  # (T, E)
    top_logits, indices = logits.topk(top_k, dim=-1)  # (T, k)
    gates = F.softmax(torch.full_like(logits, float("-inf")).scatter(-1, indices, top_logits), dim=-1)  # (T, E)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, indices, True)  # (T, E)
    counts = chosen.to(acc).mean(dim=0)  # (E,): the fraction of tokens routed to each expert, no gradient
    aux = E * torch.sum(gates.to(acc).mean(dim=0) * counts)
    z = torch.mean(torch.logsumexp(logits, dim=-1) ** 2).to(acc)
    # each layer one batched GEMM over the experts with its bias added before rounding, as nn.Linear's
    # addmm does: in bf16 a second rounding of the pre-activations moves more ReLU inputs near 0 across it
    hidden = F.relu(torch.baddbmm(b1.unsqueeze(1), x.expand(E, T, x.shape[1]), w1.transpose(1, 2)))  # (E, T, F)
    if dropout_mask is not None:  # mask[t, j] belongs to the token's j-th choice: spread onto experts
        slots = indices.t().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (k, T, F)
        hidden = hidden * torch.zeros_like(hidden).scatter(0, slots, dropout_mask.transpose(0, 1))
    expert_out = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))  # (E, T, D)
    # where, not a product with the zero gates alone: an unchosen expert's inf or NaN stays out, as in
    # the reference, which never runs it
    expert_out = torch.where(chosen.t().unsqueeze(-1), expert_out, 0)
    return torch.einsum("te,etd->td", gates, expert_out), aux, z


def _check(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask) -> None:
    tensors = dict(x=x, router_weight=router_weight, router_bias=router_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    if dropout_mask is not None:
        tensors["dropout_mask"] = dropout_mask
    check_tensors("moe", tensors)
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] < 1:
        raise ValueError(f"lifeiqa_fast.moe: x must be a floating (T, D) tensor, D >= 1, got {x.dtype} "
                         f"{tuple(x.shape)}")
    T, D = x.shape
    # E and F as most of the tensors holding them say, so that the error names the one that disagrees
    size = lambda t, dim, axis: t.shape[axis] if t.dim() == dim else -1  # noqa: E731
    E = agreed_size(size(router_weight, 2, 0), size(router_bias, 1, 0), size(w1, 3, 0), size(b1, 2, 0),
                    size(w2, 3, 0), size(b2, 2, 0))
    F = agreed_size(size(w1, 3, 1), size(b1, 2, 1), size(w2, 3, 2))
    if not is_int(top_k) or not 1 <= top_k <= max(E, 0):
        raise ValueError(f"lifeiqa_fast.moe: top_k must be an int in [1, E={E}], got {top_k!r}")
    if F == 0:  # the kernels' contract (csrc/moe.h), kept for every impl
        raise ValueError(f"lifeiqa_fast.moe: w1 must have shape (E, F, D) with F >= 1, got {tuple(w1.shape)}")
    shapes = dict(router_weight=("(E, D)", (E, D)), router_bias=("(E,)", (E,)), w1=("(E, F, D)", (E, F, D)),
                  b1=("(E, F)", (E, F)), w2=("(E, D, F)", (E, D, F)), b2=("(E, D)", (E, D)))
    if dropout_mask is not None:
        shapes["dropout_mask"] = ("(T, top_k, F)", (T, top_k, F))
    check_like_x("moe", x, tensors, shapes)


@torch.library.custom_op("lifeiqa_fast::moe_triton", mutates_args=())
def moe_triton(x: Tensor, router_weight: Tensor, router_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
               top_k: int, dropout_mask: Tensor | None, dense: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                            Tensor, Tensor, Tensor]:
    """The Triton kernel as an op, with the native op's schema (impl="triton" is refused while
    lifeiqa_fast/triton/moe.py does not exist, see ops._impl)."""
    from ..triton import moe as _triton

    return _triton.moe_forward(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask, dense)


def _fake(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask, dense):
    T, D = x.shape
    E, F = w1.shape[:2]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(T, D), x.new_empty((), dtype=acc), x.new_empty((), dtype=acc), x.new_empty(T, E, dtype=acc),
            x.new_empty(T, top_k, dtype=torch.int64), x.new_empty(T, top_k, dtype=acc), x.new_empty(T, top_k, F),
            x.new_empty(T, top_k, D))


def _setup_context(ctx, inputs, output):
    x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask, dense = inputs
    _, _, _, logits, indices, gates, hidden, expert_out = output
    ctx.mark_non_differentiable(logits, indices, gates, hidden, expert_out)
    ctx.save_for_backward(x, router_weight, w1, w2, dropout_mask, logits, indices, gates, hidden, expert_out)


def _backward(ctx, grad, grad_aux, grad_z, *_unused):
    """The adjoint: the C++ kernel on CPU (csrc/moe.cpp, moe_backward, experts grouped on the host),
    elsewhere _dense_backward (no host synchronisation). Neither is differentiable again (the kernel, and
    the routing, hidden layer and expert outputs read as constants): first_order_only."""
    saved = ctx.saved_tensors
    zero = saved[5].new_zeros(())
    grad_aux = zero if grad_aux is None else grad_aux
    grad_z = zero if grad_z is None else grad_z
    if saved[0].device.type == "cpu" and _ext.LOADED:
        backward, grad = torch.ops.lifeiqa_fast.moe_backward, grad.contiguous()
    else:
        backward = _dense_backward
    grads = first_order_only("moe", backward, grad, grad_aux, grad_z, *saved)
    return (*grads, None, None, None)


def _dense_backward(grad, grad_aux, grad_z, x, router_weight, w1, w2, dropout_mask, logits, indices, gates, hidden,
                    expert_out):
    """moe_backward's formula with each pair's expert selected by a one-hot product instead of grouping
    (E / k times the FLOP, shapes independent of the routing). Composite ATen ops in fp32 (fp64 for fp64)."""
    acc = logits.dtype
    T, D = x.shape
    E = w1.shape[0]
    g, xa, h = grad.to(acc), x.to(acc), hidden.to(acc)
    sel = (indices.unsqueeze(-1) == torch.arange(E, device=indices.device)).to(acc)  # (T, k, E); one_hot syncs
    d_y = gates.unsqueeze(-1) * g.unsqueeze(1)  # (T, k, D)
    counts = sel.sum((0, 1))
    d_gates = (g.unsqueeze(1) * expert_out.to(acc)).sum(-1) + grad_aux.to(acc) * E / max(T, 1) ** 2 * counts[indices]
    d_h = torch.einsum("tkd,tke,edf->tkf", d_y, sel, w2.to(acc)) * (h > 0)
    if dropout_mask is not None:
        d_h = d_h * dropout_mask.to(acc)
    d_top = gates * (d_gates - (gates * d_gates).sum(-1, keepdim=True))
    d_logits = torch.zeros_like(logits).scatter_add(1, indices, d_top)
    d_logits = d_logits + logits.softmax(-1) * logits.logsumexp(-1, keepdim=True) * grad_z.to(acc) * (2.0 / max(T, 1))
    dx = torch.einsum("tkf,tke,efd->td", d_h, sel, w1.to(acc)) + d_logits @ router_weight.to(acc)
    grads = (dx, d_logits.T @ xa, d_logits.sum(0), torch.einsum("tke,tkf,td->efd", sel, d_h, xa),
             torch.einsum("tke,tkf->ef", sel, d_h), torch.einsum("tke,tkd,tkf->edf", sel, d_y, h),
             torch.einsum("tke,tkd->ed", sel, d_y))
    return tuple(t.to(x.dtype) for t in grads)


def _fake_backward(grad, grad_aux, grad_z, x, router_weight, w1, w2, dropout_mask, logits, indices, gates, hidden,
                   expert_out):
    E, F, D = w1.shape
    return (torch.empty_like(x), torch.empty_like(router_weight), x.new_empty(E), torch.empty_like(w1),
            x.new_empty(E, F), torch.empty_like(w2), x.new_empty(E, D))


torch.library.register_fake(moe_triton)(_fake)
torch.library.register_autograd(moe_triton, _backward, setup_context=_setup_context)
register_autocast(moe_triton)
if _ext.LOADED:
    torch.library.register_fake("lifeiqa_fast::moe")(_fake)
    torch.library.register_fake("lifeiqa_fast::moe_backward")(_fake_backward)
    torch.library.register_autograd("lifeiqa_fast::moe", _backward, setup_context=_setup_context)
    register_autocast("lifeiqa_fast::moe")
