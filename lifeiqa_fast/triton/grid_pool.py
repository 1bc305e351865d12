"""Triton kernels of grid_pool (UPP pooling onto a grid x grid grid), forward and backward.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests the logic).
"""
from __future__ import annotations

import torch

from . import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; ops report impl="triton" as unavailable
    triton = None

MAX_BLOCK_C = 512  # channels per program: all of a Life-IQA stage-3 cell (512 channels) at once

if triton is not None:

    @triton.jit
    def _bin_edge(i, n, g):
        # torch.linspace(0, n, g + 1, dtype=int)[i]: double steps from the start for the first half
        # of the points, back from the end for the rest, truncated (csrc/grid_pool.h, bin_edge).
        # tl.cast, not .to: a launch turns an int argument equal to 1 into a Python constant.
        step = tl.cast(n, tl.float64) / tl.cast(g, tl.float64)
        first = tl.cast(step * tl.cast(i, tl.float64), tl.int64)
        last = tl.cast(tl.cast(n, tl.float64) - step * tl.cast(g - i, tl.float64), tl.int64)
        return tl.where(i < (g + 1) // 2, first, last)

    @triton.jit
    def _grid_pool_fwd_kernel(x_ptr, out_ptr, H, W, C, G, sB, sH, sW, sC,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
        task = tl.program_id(0).to(tl.int64)  # (image, bin)
        cs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b = task // (G * G)
        i = (task % (G * G)) // G
        j = task % G
        h0 = _bin_edge(i, H, G)
        h1 = _bin_edge(i + 1, H, G)
        w0 = _bin_edge(j, W, G)
        w1 = _bin_edge(j + 1, W, G)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for h in range(h0, h1):
            for w in range(w0, w1):
                acc += tl.load(x_ptr + b * sB + h * sH + w * sW + cs * sC, mask=cs < C, other=0.0).to(ACC)
        count = ((h1 - h0) * (w1 - w0)).to(ACC)
        tl.store(out_ptr + task * C + cs, (acc / count).to(out_ptr.dtype.element_ty), mask=cs < C)

    @triton.jit
    def _grid_pool_bwd_kernel(grad_ptr, dx_ptr, H, W, C, G, gB, gP, gC,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (image, row) of dx
        cs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        h = row % H
        b = row // H
        # bin of h: the guess h * G // H is at most one bin low (csrc/grid_pool.h, bin_of)
        i = h * G // H
        i = tl.where((i + 1 < G) & (_bin_edge(i + 1, H, G) <= h), i + 1, i)
        height = _bin_edge(i + 1, H, G) - _bin_edge(i, H, G)
        for w in range(0, W):
            j = w * G // W
            j = tl.where((j + 1 < G) & (_bin_edge(j + 1, W, G) <= w), j + 1, j)
            count = (height * (_bin_edge(j + 1, W, G) - _bin_edge(j, W, G))).to(ACC)
            g = tl.load(grad_ptr + b * gB + (i * G + j) * gP + cs * gC, mask=cs < C, other=0.0).to(ACC)
            tl.store(dx_ptr + (row * W + w) * C + cs, (g / count).to(dx_ptr.dtype.element_ty), mask=cs < C)


def _block(channels: int) -> int:
    return min(MAX_BLOCK_C, triton.next_power_of_2(channels))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@on_tensor_device
def grid_pool_forward(x: torch.Tensor, grid: int) -> torch.Tensor:
    """x: (B, H, W, C) any strides -> (B, grid * grid, C) contiguous, x's dtype."""
    B, H, W, C = x.shape
    out = torch.empty(B, grid * grid, C, dtype=x.dtype, device=x.device)
    if out.numel():
        block = _block(C)
        launch = (B * grid * grid, triton.cdiv(C, block))
        _grid_pool_fwd_kernel[launch](x, out, H, W, C, grid, *x.stride(), BLOCK=block, ACC=_acc_dtype(x.dtype))
    return out


@on_tensor_device
def grid_pool_backward(grad: torch.Tensor, height: int, width: int, grid: int) -> torch.Tensor:
    """grad: (B, grid * grid, C) any strides -> dx (B, height, width, C) contiguous."""
    B, _, C = grad.shape
    dx = torch.empty(B, height, width, C, dtype=grad.dtype, device=grad.device)
    if dx.numel():
        block = _block(C)
        launch = (B * height, triton.cdiv(C, block))
        _grid_pool_bwd_kernel[launch](grad, dx, height, width, C, grid, *grad.stride(), BLOCK=block,
                                      ACC=_acc_dtype(grad.dtype))
    return dx
