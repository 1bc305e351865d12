"""Triton kernel of gcn: x + three graph convolutions over the N query tokens, one program per image.

The forward is one launch: the tokens of an image form the rows of every tile (padded to 16 for
tl.dot), each layer is a dot with the weights followed by a dot with the graph, in chunks of output
columns. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from . import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; ops report impl="triton" as unavailable
    triton = None

BLOCK_K = 32  # reduction chunk of every product with the weights
BLOCK_C = 64  # output columns per step: each layer runs in column chunks, so tiles stay small

if triton is not None:

    @triton.jit
    def _graph_conv(in_ptr, s_in_n, s_in_k, K, w_ptr, C, b_ptr, A, rn, tok, out_ptr, res_ptr, s_res_n, s_res_c,
                    RELU: tl.constexpr, RESIDUAL: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
                    ACC: tl.constexpr):
        # out[:, c] = act(A (in W[:, c]) + b[c]) (+ res[:, c]) for one image, BC columns at a time;
        # the graph mixes tokens only, so each column chunk is complete on its own.
        for c0 in range(0, C, BC):
            rc = c0 + tl.arange(0, BC)
            s = tl.zeros((rn.shape[0], BC), dtype=ACC)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                a = tl.load(in_ptr + rn[:, None] * s_in_n + rk[None, :] * s_in_k,
                            mask=tok[:, None] & (rk[None, :] < K), other=0.0).to(ACC)
                w = tl.load(w_ptr + rk[:, None] * C + rc[None, :], mask=(rk[:, None] < K) & (rc[None, :] < C),
                            other=0.0).to(ACC)
                s += tl.dot(a, w, input_precision="ieee")
            bias = tl.load(b_ptr + rc, mask=rc < C, other=0.0).to(ACC)
            o = tl.dot(A, s, input_precision="ieee") + bias[None, :]
            if RELU:
                o = tl.maximum(o, 0.0)
            mask = tok[:, None] & (rc[None, :] < C)
            if RESIDUAL:
                o += tl.load(res_ptr + rn[:, None] * s_res_n + rc[None, :] * s_res_c, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + rn[:, None] * C + rc[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gcn_fwd_kernel(x_ptr, adj_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, h1_ptr, h2_ptr,
                        N, D, H1, H2, sxb, sxn, sxd, sab,
                        FIXED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
                        ACC: tl.constexpr):
        # One program per image. The tokens are the rows of every tile, padded to BN >= 16 for tl.dot;
        # padded rows and columns of A are zero, so they never reach a real token. h1 and h2 go to
        # global memory (the backward needs them) and are read back by the next layer, L2-hot.
        b = tl.program_id(0).to(tl.int64)
        rn = tl.arange(0, BN)
        tok = rn < N
        pair = tok[:, None] & tok[None, :]
        if FIXED:  # (J + I) / (N + 1)
            A = tl.where(pair, tl.where(rn[:, None] == rn[None, :], 2.0, 1.0) / (N + 1), 0.0).to(ACC)
        else:
            A = tl.load(adj_ptr + b * sab + rn[:, None] * N + rn[None, :], mask=pair, other=0.0).to(ACC)
        x_b = x_ptr + b * sxb
        h1_b = h1_ptr + b * N * H1
        h2_b = h2_ptr + b * N * H2
        _graph_conv(x_b, sxn, sxd, D, w1_ptr, H1, b1_ptr, A, rn, tok, h1_b, x_b, 0, 0,
                    True, False, BK, BC, ACC)
        tl.debug_barrier()  # h1 complete before any thread reads it
        _graph_conv(h1_b, H1, 1, H1, w2_ptr, H2, b2_ptr, A, rn, tok, h2_b, x_b, 0, 0,
                    True, False, BK, BC, ACC)
        tl.debug_barrier()
        _graph_conv(h2_b, H2, 1, H2, w3_ptr, D, b3_ptr, A, rn, tok, out_ptr + b * N * D, x_b, sxn, sxd,
                    False, True, BK, BC, ACC)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every tile dimension >= 16


@on_tensor_device
def gcn_forward(x, adj, w1, b1, w2, b2, w3, b3):
    """x (B, N, D); adj None (fixed graph), (N, N) or (B, N, N) -> (out (B, N, D), h1 (B, N, H1), h2 (B, N, H2))."""
    B, N, D = x.shape
    H1, H2 = w1.shape[1], w2.shape[1]
    out, h1, h2 = (torch.empty(B, N, n, dtype=x.dtype, device=x.device) for n in (D, H1, H2))
    if B == 0:
        return out, h1, h2
    w1, b1, w2, b2, w3, b3 = (t.contiguous() for t in (w1, b1, w2, b2, w3, b3))
    a = adj.contiguous() if adj is not None else x  # any pointer: unused when FIXED
    _gcn_fwd_kernel[(B,)](
        x, a, w1, b1, w2, b2, w3, b3, out, h1, h2, N, D, H1, H2, *x.stride(),
        a.stride(0) if adj is not None and adj.dim() == 3 else 0,
        FIXED=adj is None, BN=_pow2(N), BK=BLOCK_K, BC=BLOCK_C,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )
    return out, h1, h2
