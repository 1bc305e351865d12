"""Triton kernel of gcn: x + three graph convolutions over the N query tokens, one program per image.

The forward is one launch: the tokens of an image form the rows of every tile (padded to 16 for
tl.dot), each layer is a dot with the weights followed by a dot with the graph, and h1, h2 stay in
registers. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; ops report impl="triton" as unavailable
    triton = None

BLOCK_K = 32  # reduction chunk of the first layer's x @ w1
BLOCK_OUT = 64  # output columns per step of the last layer

if triton is not None:

    @triton.jit
    def _gcn_fwd_kernel(x_ptr, adj_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, h1_ptr, h2_ptr,
                        N, D, H1, H2, sxb, sxn, sxd, sab,
                        FIXED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BH1: tl.constexpr,
                        BH2: tl.constexpr, BO: tl.constexpr, ACC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rn = tl.arange(0, BN)
        tok = rn < N  # padded token rows stay zero
        pair = tok[:, None] & tok[None, :]
        if FIXED:  # (J + I) / (N + 1)
            A = tl.where(pair, tl.where(rn[:, None] == rn[None, :], 2.0, 1.0) / (N + 1), 0.0).to(ACC)
        else:
            A = tl.load(adj_ptr + b * sab + rn[:, None] * N + rn[None, :], mask=pair, other=0.0).to(ACC)

        # layer 1: h1 = relu(A (x w1) + b1)
        r1 = tl.arange(0, BH1)
        s1 = tl.zeros((BN, BH1), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + b * sxb + rn[:, None] * sxn + rk[None, :] * sxd,
                         mask=tok[:, None] & (rk[None, :] < D), other=0.0).to(ACC)
            wk = tl.load(w1_ptr + rk[:, None] * H1 + r1[None, :], mask=(rk[:, None] < D) & (r1[None, :] < H1),
                         other=0.0).to(ACC)
            s1 += tl.dot(xk, wk, input_precision="ieee")
        bias1 = tl.load(b1_ptr + r1, mask=r1 < H1, other=0.0).to(ACC)
        h1 = tl.maximum(tl.dot(A, s1, input_precision="ieee") + bias1[None, :], 0.0)
        h1 = tl.where(tok[:, None], h1, 0.0)
        tl.store(h1_ptr + (b * N + rn[:, None]) * H1 + r1[None, :], h1.to(h1_ptr.dtype.element_ty),
                 mask=tok[:, None] & (r1[None, :] < H1))

        # layer 2: h2 = relu(A (h1 w2) + b2)
        r2 = tl.arange(0, BH2)
        w2 = tl.load(w2_ptr + r1[:, None] * H2 + r2[None, :], mask=(r1[:, None] < H1) & (r2[None, :] < H2),
                     other=0.0).to(ACC)
        bias2 = tl.load(b2_ptr + r2, mask=r2 < H2, other=0.0).to(ACC)
        s2 = tl.dot(h1, w2, input_precision="ieee")
        h2 = tl.maximum(tl.dot(A, s2, input_precision="ieee") + bias2[None, :], 0.0)
        h2 = tl.where(tok[:, None], h2, 0.0)
        tl.store(h2_ptr + (b * N + rn[:, None]) * H2 + r2[None, :], h2.to(h2_ptr.dtype.element_ty),
                 mask=tok[:, None] & (r2[None, :] < H2))

        # layer 3 and the residual, BO output columns at a time: out = x + A (h2 w3) + b3
        for o0 in range(0, D, BO):
            ro = o0 + tl.arange(0, BO)
            cols = ro[None, :] < D
            w3 = tl.load(w3_ptr + r2[:, None] * D + ro[None, :], mask=(r2[:, None] < H2) & cols, other=0.0).to(ACC)
            bias3 = tl.load(b3_ptr + ro, mask=ro < D, other=0.0).to(ACC)
            xo = tl.load(x_ptr + b * sxb + rn[:, None] * sxn + ro[None, :] * sxd, mask=tok[:, None] & cols,
                         other=0.0).to(ACC)
            s3 = tl.dot(h2, w3, input_precision="ieee")
            out = xo + tl.dot(A, s3, input_precision="ieee") + bias3[None, :]
            tl.store(out_ptr + (b * N + rn[:, None]) * D + ro[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=tok[:, None] & cols)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every tile dimension >= 16


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
        FIXED=adj is None, BN=_pow2(N), BK=BLOCK_K, BH1=_pow2(H1), BH2=_pow2(H2), BO=BLOCK_OUT,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )
    return out, h1, h2
