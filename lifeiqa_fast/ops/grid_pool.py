"""grid_pool: UPP pooling of a stage map onto a grid x grid grid (docs/model.md, step 3).

Public function, the Triton op, fake implementations and the autograd formula. The schema of the
native op lives in csrc/library.cpp, its kernels in csrc/grid_pool.cpp (CPU) and
kernels/grid_pool.cu (CUDA), the Triton kernels in lifeiqa_fast/triton/grid_pool.py and the
reference in lifeiqa_fast/reference.py (grid_pool_ref).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..reference import grid_pool_ref
from ..triton import grid_pool as _triton
from ._impl import acc_dtype, autocast_rule, constant, is_int, register_autocast, resolve

_LAYOUTS = ("nhwc", "nchw")


@autocast_rule
def grid_pool(x: Tensor, grid: int = 7, layout: str = "nhwc", impl: str | None = None) -> Tensor:
    """Mean of x over each of grid x grid bins, bins row-major (the authors' UPP layer).

    x: (B, H, W, C) for layout="nhwc" (as timm emits stage maps: no permute copy is made) or
    (B, C, H, W) for layout="nchw"; H >= grid, W >= grid; float16, bfloat16, float32 or float64
    (accumulated in float32, float64 in float64); any strides. Returns (B, grid * grid, C),
    contiguous, x's dtype. Bin edges per axis are torch.linspace(0, H, grid + 1, dtype=int).
    Differentiable to any order (the backward is linear in the gradient, its adjoint the pooling).
    A meta tensor gives a meta result of the right shape, with every impl.
    impl: "auto", "reference", "composite", "native", "triton", or None for the process-wide default.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"lifeiqa_fast.grid_pool: x must be a torch.Tensor, got {type(x).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"lifeiqa_fast.grid_pool: layout must be one of {_LAYOUTS}, got {layout!r}")
    if x.dim() != 4:
        shape = "(B, H, W, C)" if layout == "nhwc" else "(B, C, H, W)"
        raise ValueError(f"lifeiqa_fast.grid_pool: x must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"lifeiqa_fast.grid_pool: x must be a floating tensor, got {x.dtype}")
    if not is_int(grid) or grid < 1:
        raise ValueError(f"lifeiqa_fast.grid_pool: grid must be a positive int, got {grid!r}")
    nhwc = x if layout == "nhwc" else x.permute(0, 2, 3, 1)  # a view: the kernels read any strides
    if nhwc.shape[1] < grid or nhwc.shape[2] < grid:
        raise ValueError(
            f"lifeiqa_fast.grid_pool: x must have H >= grid and W >= grid so that no bin is empty, "
            f"got H={nhwc.shape[1]}, W={nhwc.shape[2]}, grid={grid}"
        )
    which = resolve("grid_pool", x, impl)
    if which == "reference":
        return grid_pool_ref(nhwc.permute(0, 3, 1, 2), grid)
    if which == "composite":
        return grid_pool_composite(nhwc, grid)
    if which == "native":
        return torch.ops.lifeiqa_fast.grid_pool(nhwc, grid)
    return grid_pool_triton(nhwc, grid)


def grid_pool_composite(x: Tensor, grid: int) -> Tensor:
    """The composite implementation: x (B, H, W, C), any strides -> (B, grid * grid, C) as one GEMM with
    a constant pooling matrix (pooling_matrix, made once: _impl.constant), in float32 (float64 for
    float64), x's dtype out. No host synchronisation, static shapes; differentiable to any order."""
    B, H, W, C = x.shape
    pool = constant(pooling_matrix, H, W, grid, x.device, acc_dtype(x.dtype))
    return torch.matmul(pool, x.reshape(B, H * W, C).to(pool.dtype)).to(x.dtype)


def pooling_matrix(height: int, width: int, grid: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(grid * grid, H * W): row i * grid + j holds 1 / count on the cells of bin (i, j), 0 elsewhere; the
    bin edges torch.linspace's (bin_edges). Example: H = W = 2, grid = 1 gives [[0.25, 0.25, 0.25, 0.25]]."""
    rows = _bin_indicator(height, grid)  # (grid, H)
    cols = _bin_indicator(width, grid)  # (grid, W)
    cells = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(grid * grid, height * width)
    return (cells / cells.sum(dim=1, keepdim=True)).to(device=device, dtype=dtype)


def bin_edges(n: int, grid: int) -> list[int]:
    """torch.linspace(0, n, grid + 1, dtype=torch.int).tolist() in Python arithmetic, as csrc/grid_pool.h's
    bin_edge: ATen steps n / grid in double from the start for the first half of the points and back from
    the end for the rest, then truncates. No tensor, so nothing for a tracer to read back. 15, 7: 0 2 4 6
    | 8 10 12 15. (From grid 150 up ATen's vectorised loop can put an edge one lower; test_grid_pool
    checks the equality for every grid of Life-IQA's sizes.)"""
    step = n / grid
    return [int(step * i) if i < (grid + 1) // 2 else int(n - step * (grid - i)) for i in range(grid + 1)]


def _bin_indicator(n: int, grid: int) -> Tensor:
    """(grid, n) float64: row i is 1 on the positions of bin i along an axis of n."""
    edges = bin_edges(n, grid)
    return torch.tensor([[1.0 if edges[i] <= p < edges[i + 1] else 0.0 for p in range(n)] for i in range(grid)],
                        dtype=torch.float64)


@torch.library.custom_op("lifeiqa_fast::grid_pool_triton", mutates_args=())
def grid_pool_triton(x: Tensor, grid: int) -> Tensor:
    """The Triton kernel as an op: x (B, H, W, C) -> (B, grid * grid, C)."""
    return _triton.grid_pool_forward(x, grid)


@torch.library.custom_op("lifeiqa_fast::grid_pool_triton_backward", mutates_args=())
def grid_pool_triton_backward(grad: Tensor, height: int, width: int, grid: int) -> Tensor:
    """The Triton backward kernel as an op: grad (B, grid * grid, C) -> (B, height, width, C)."""
    return _triton.grid_pool_backward(grad, height, width, grid)


def _fake_forward(x: Tensor, grid: int) -> Tensor:
    return x.new_empty(x.shape[0], grid * grid, x.shape[3])


def _fake_backward(grad: Tensor, height: int, width: int, grid: int) -> Tensor:
    return grad.new_empty(grad.shape[0], height, width, grad.shape[2])


def _setup_context(ctx, inputs, output):
    x, grid = inputs
    ctx.grid, ctx.height, ctx.width = grid, x.shape[1], x.shape[2]


def _setup_context_backward(ctx, inputs, output):
    _, height, width, grid = inputs
    ctx.grid = grid


def _register(forward_op, backward_op) -> None:
    """Fake implementations and the autograd formulas of one forward/backward op pair.

    Adjoint: out = S x with S the pooling, out[b, bin, c] = sum over the bin's cells of x / count, so
    dx = S^T grad, dx[b, h, w, c] = grad[b, bin(h, w), c] / count(bin(h, w)): the backward op. It is
    linear in grad, so its own adjoint is S again: d(grad) = S d(dx), the forward op. Registered on
    the backward op, that makes double backward (and every higher order) exact: create_graph=True
    then a second grad flows through the two kernels in turn.
    """
    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)

    def backward(ctx, grad):
        return backward_op(grad, ctx.height, ctx.width, ctx.grid), None

    def backward_of_backward(ctx, grad_dx):
        return forward_op(grad_dx, ctx.grid), None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)
    register_autocast(forward_op)
    torch.library.register_autograd(backward_op, backward_of_backward, setup_context=_setup_context_backward)


_register(grid_pool_triton, grid_pool_triton_backward)
if _ext.LOADED:
    _register(torch.ops.lifeiqa_fast.grid_pool.default, torch.ops.lifeiqa_fast.grid_pool_backward.default)
