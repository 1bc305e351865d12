"""gcn: x + three graph convolutions over the N query tokens (docs/model.md, step 4), fused.

Public function, the Triton op, fake implementations and the autograd formula. The schema of the
native op lives in csrc/library.cpp, its kernels in csrc/gcn.cpp (CPU) and kernels/gcn.cu (CUDA), the
Triton kernel in lifeiqa_fast/triton/gcn.py and the reference in lifeiqa_fast/reference.py (gcn_ref).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..reference import fixed_adjacency, gcn_ref
from ..triton import gcn as _triton
from ._impl import (agreed_size, autocast_rule, check_like_x, check_tensors, constant, register_autocast, resolve,
                    within_limits)

MAX_TOKENS = 32  # the kernels hold one accumulator per token (csrc/gcn.h, kGcnMaxTokens)


@autocast_rule
def gcn(x: Tensor, adj: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
        impl: str | None = None) -> Tensor:
    """x + A(relu(A(relu(A(x w1) + b1) w2) + b2) w3) + b3, A multiplying over the token axis.

    x: (B, N, D), 1 <= N <= 32; adj: None for the fixed official graph (J + I) / (N + 1) (computed in
    closed form: A h = (h + sum over tokens of h) / (N + 1)), or a dense (N, N) graph shared by the
    batch, or (B, N, N) per sample; weights stored (in, out) as in official checkpoints: w1 (D, H1),
    w2 (H1, H2), w3 (H2, D); biases b1 (H1,), b2 (H2,), b3 (D,). All of x's dtype (float16, bfloat16,
    float32, float64; accumulated in float32, float64 in float64) and device. Returns (B, N, D).
    Differentiable in x, adj and all weights, twice too (create_graph=True, then another grad: the
    backward is ATen ops). impl: "auto", "reference", "composite", "native", "triton", or None for the process-wide
    default.
    """
    _check(x, adj, w1, b1, w2, b2, w3, b3)
    beyond = (f"the kernels hold at most {MAX_TOKENS} tokens per image (csrc/gcn.h, kGcnMaxTokens), got "
              f"N={x.shape[1]}") if x.shape[1] > MAX_TOKENS else None
    which = within_limits("gcn", resolve("gcn", x, impl), impl, beyond)
    if which in ("reference", "composite"):  # composite: the reference's ATen ops have no host sync already
        a = adj if adj is not None else constant(fixed_adjacency, x.shape[1], x.dtype, x.device)
        return gcn_ref(x, a, w1, b1, w2, b2, w3, b3)
    op = torch.ops.lifeiqa_fast.gcn if which == "native" else gcn_triton
    return op(x, adj, w1, b1, w2, b2, w3, b3)[0]


def _check(x, adj, w1, b1, w2, b2, w3, b3) -> None:
    tensors = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, **({} if adj is None else dict(adj=adj)))
    check_tensors("gcn", tensors)
    if x.dim() != 3:
        raise ValueError(f"lifeiqa_fast.gcn: x must have shape (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    if N < 1:
        raise ValueError(f"lifeiqa_fast.gcn: x must have N >= 1 tokens, got N={N}")
    if not x.is_floating_point():
        raise TypeError(f"lifeiqa_fast.gcn: x must be a floating tensor, got {x.dtype}")
    # H1 and H2 as most of the tensors holding them say, so that the error names the one that disagrees
    size = lambda t, dim, axis: t.shape[axis] if t.dim() == dim else -1  # noqa: E731
    H1 = agreed_size(size(w1, 2, 1), size(b1, 1, 0), size(w2, 2, 0))
    H2 = agreed_size(size(w2, 2, 1), size(b2, 1, 0), size(w3, 2, 0))
    if adj is not None and tuple(adj.shape) not in ((N, N), (B, N, N)):
        raise ValueError(f"lifeiqa_fast.gcn: adj must be None or have shape (N, N) = {(N, N)} or (B, N, N) = "
                         f"{(B, N, N)}, got {tuple(adj.shape)}")
    check_like_x("gcn", x, tensors, dict(w1=("(D, H1)", (D, H1)), b1=("(H1,)", (H1,)), w2=("(H1, H2)", (H1, H2)),
                                         b2=("(H2,)", (H2,)), w3=("(H2, D)", (H2, D)), b3=("(D,)", (D,))))


@torch.library.custom_op("lifeiqa_fast::gcn_triton", mutates_args=())
def gcn_triton(x: Tensor, adj: Tensor | None, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
               b3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel as an op, with the native op's schema: -> (out, h1, h2)."""
    return _triton.gcn_forward(x, adj, w1, b1, w2, b2, w3, b3)


def _fake(x, adj, w1, b1, w2, b2, w3, b3):
    B, N, D = x.shape
    return x.new_empty(B, N, D), x.new_empty(B, N, w1.shape[1]), x.new_empty(B, N, w2.shape[1])


def _graph(adj: Tensor | None, h: Tensor) -> Tensor:
    """A h over the token axis: h (B, N, C). The fixed graph in closed form."""
    if adj is None:
        return (h + h.sum(dim=1, keepdim=True)) / (h.shape[1] + 1)
    return adj @ h


def _graph_t(adj: Tensor | None, h: Tensor) -> Tensor:
    """A^T h over the token axis: h (B, N, C). The fixed graph is symmetric."""
    return _graph(None if adj is None else adj.transpose(-1, -2), h)


def _setup_context(ctx, inputs, output):
    x, adj, w1, b1, w2, b2, w3, b3 = inputs
    _, h1, h2 = output
    ctx.mark_non_differentiable(h1, h2)
    ctx.save_for_backward(x, adj, w1, b1, w2, b2, w3, h1, h2)
    ctx.fixed = adj is None


def _backward(ctx, grad, _grad_h1, _grad_h2):
    """Adjoint of out = x + A s3 + b3, s3 = h2 w3, h2 = relu(A s2 + b2), s2 = h1 w2, h1 = relu(A s1 + b1),
    s1 = x w1. With g3 = A^T dout: dw3 = h2^T g3, db3 = sum dout, dh2 = g3 w3^T; dp2 = dh2 [h2 > 0],
    g2 = A^T dp2, dw2 = h1^T g2, db2 = sum dp2, and so on down; dx = dout + g1 w1^T;
    dA = dout s3^T + dp2 s2^T + dp1 s1^T (summed over the batch for a shared graph). Composite ATen
    ops: GEMMs over all B * N tokens at once, so differentiable again; under create_graph=True (grad
    mode on here) h1 and h2 are recomputed from the inputs, the saved ones being non-differentiable
    outputs of the kernel, so that second derivatives also flow through them."""
    x, adj, w1, b1, w2, b2, w3, h1, h2 = ctx.saved_tensors
    adj = None if ctx.fixed else adj
    if torch.is_grad_enabled():
        h1 = torch.relu(_graph(adj, x @ w1) + b1)  # (B, N, H1)
        h2 = torch.relu(_graph(adj, h1 @ w2) + b2)  # (B, N, H2)
    flat = lambda t: t.flatten(0, 1)  # noqa: E731  (B, N, C) -> (B * N, C); reshape(-1, C) fails for B = C = 0
    g3 = _graph_t(adj, grad)
    dp2 = (g3 @ w3.T) * (h2 > 0)
    g2 = _graph_t(adj, dp2)
    dp1 = (g2 @ w2.T) * (h1 > 0)
    g1 = _graph_t(adj, dp1)
    dx = grad + g1 @ w1.T
    dadj = None
    if adj is not None and ctx.needs_input_grad[1]:
        s1, s2, s3 = x @ w1, h1 @ w2, h2 @ w3
        dadj = grad @ s3.transpose(1, 2) + dp2 @ s2.transpose(1, 2) + dp1 @ s1.transpose(1, 2)  # (B, N, N)
        dadj = dadj.sum(0) if adj.dim() == 2 else dadj
    return (dx, dadj, flat(x).T @ flat(g1), flat(dp1).sum(0), flat(h1).T @ flat(g2), flat(dp2).sum(0),
            flat(h2).T @ flat(g3), flat(grad).sum(0))


def _register(forward_op) -> None:
    torch.library.register_fake(forward_op)(_fake)
    torch.library.register_autograd(forward_op, _backward, setup_context=_setup_context)
    register_autocast(forward_op)


_register(gcn_triton)
if _ext.LOADED:
    _register(torch.ops.lifeiqa_fast.gcn.default)
