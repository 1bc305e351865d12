"""Triton kernel of cross_attention: LayerNorm, query projection, attention to the projected keys and
values, output projection and residual for one decoder layer, one program per image.

The forward is one launch. The query tokens of an image form the rows of every tile (padded to 16 for
tl.dot). A first pass over D takes each row's LayerNorm statistics; then, head by head, the query
projection runs over D in chunks (normalising x on the fly), the head's q is rounded to x's dtype and
stored, and an online softmax walks the keys in blocks; each head's o is stored rounded to x's dtype,
and once all heads are written the output projection reads o back (L2-hot) in chunks of output
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

BLOCK_K = 32  # reduction chunk of both projections and of the LayerNorm passes
BLOCK_C = 64  # output columns per step of the output projection, so its tiles stay small for any D
BLOCK_KV = 32  # keys per step of the online softmax
# fp64 takes 16 keys a step: with 32, its tiles at the kernel's limit (64 queries, head_dim 128) need
# 213 KB of shared memory, over an A100's 163 KB per block, and spill at Life-IQA's shapes on sm_80.
BLOCK_KV_FP64 = 16
# q and the running output are (rows, head_dim) tiles held across the key loop: with 4 warps the
# bf16/fp16 kernel spills on sm_90 at Life-IQA's shapes (16 rows, head_dim 64); with 8 no dtype spills
# there on sm_80 or sm_90 (python -m lifeiqa_fast.preflight).
NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def _layer_norm_stats(x_b, sxn, sxd, rn, tok, D, eps, BK: tl.constexpr, ACC: tl.constexpr):
        # mean and 1/sqrt(var + eps) of each row, the biased variance taken about the mean in a second
        # pass (no cancellation of sum(x^2) - D mean^2).
        total = tl.zeros((rn.shape[0],), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_b + rn[:, None] * sxn + rk[None, :] * sxd, mask=tok[:, None] & (rk[None, :] < D),
                        other=0.0).to(ACC)
            total += tl.sum(x, axis=1)
        mean = total / D
        squares = tl.zeros((rn.shape[0],), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            mask = tok[:, None] & (rk[None, :] < D)
            x = tl.load(x_b + rn[:, None] * sxn + rk[None, :] * sxd, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - mean[:, None], 0.0)
            squares += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt((squares / D + eps).to(ACC))  # eps: fp64 compiled, a Python float interpreted
        return mean, rstd

    @triton.jit
    def _normalized(x_b, sxn, sxd, rn, tok, rk, D, mean, rstd, nw_ptr, nb_ptr, ACC: tl.constexpr):
        # xn[:, rk] = (x[:, rk] - mean) rstd g[rk] + b[rk], zero in padded rows and columns.
        mask = tok[:, None] & (rk[None, :] < D)
        x = tl.load(x_b + rn[:, None] * sxn + rk[None, :] * sxd, mask=mask, other=0.0).to(ACC)
        g = tl.load(nw_ptr + rk, mask=rk < D, other=0.0).to(ACC)
        b = tl.load(nb_ptr + rk, mask=rk < D, other=0.0).to(ACC)
        xn = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        return tl.where(mask, xn, 0.0)

    @triton.jit
    def _query_head(x_b, sxn, sxd, rn, tok, D, mean, rstd, nw_ptr, nb_ptr, wq_ptr, bq_ptr, col, dim,
                    BK: tl.constexpr, ACC: tl.constexpr):
        # q[:, col] = xn Wq[col, :]^T + bq[col] for one head's columns col = h hd + (0..hd-1), summed over D
        # in chunks of BK; Wq is (D, D) row-major, so its chunk is read transposed: w[k, d] = Wq[col[d], k].
        acc = tl.zeros((rn.shape[0], col.shape[0]), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            xn = _normalized(x_b, sxn, sxd, rn, tok, rk, D, mean, rstd, nw_ptr, nb_ptr, ACC)  # (BN, BK)
            w = tl.load(wq_ptr + col[None, :] * D + rk[:, None], mask=(rk[:, None] < D) & dim[None, :],
                        other=0.0).to(ACC)  # (BK, BD)
            acc += tl.dot(xn, w, input_precision="ieee")
        bias = tl.load(bq_ptr + col, mask=dim, other=0.0).to(ACC)
        return acc + bias[None, :]  # (BN, BD)

    @triton.jit
    def _attend(q, k_b, v_b, skn, skd, col, dim, Nk, scale, BKV: tl.constexpr, ACC: tl.constexpr):
        # Online softmax over the keys, BKV at a time: with m the running maximum of the scaled scores s
        # and l = sum_j exp(s_j - m), a new block rescales l and the unnormalised output by exp(m - m_new).
        # The first block holds key 0 (Nk >= 1), so m is finite from then on and padded keys (s = -inf)
        # contribute exp(-inf) = 0. Returns o = P V (BN, BD) and lse = m + log(l) (BN,).
        m = tl.full((q.shape[0],), float("-inf"), dtype=ACC)
        l = tl.zeros((q.shape[0],), dtype=ACC)
        o = tl.zeros(q.shape, dtype=ACC)
        for j0 in range(0, Nk, BKV):
            rj = j0 + tl.arange(0, BKV)
            key = rj < Nk
            off = rj.to(tl.int64) * skn  # (BKV,): a strided view's key offsets can pass 2^31 within one image
            kt = tl.load(k_b + off[None, :] + col[:, None] * skd, mask=dim[:, None] & key[None, :],
                         other=0.0).to(ACC)  # (BD, BKV): K^T
            v = tl.load(v_b + off[:, None] + col[None, :] * skd, mask=key[:, None] & dim[None, :],
                        other=0.0).to(ACC)  # (BKV, BD)
            s = tl.dot(q, kt, input_precision="ieee") * scale  # (BN, BKV)
            s = tl.where(key[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            o = o * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        return o / l[:, None], m + tl.log(l)

    @triton.jit
    def _out_proj(o_b, rn, tok, D, wo_ptr, bo_ptr, x_b, sxn, sxd, out_b,
                  BK: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
        # out[:, c] = x[:, c] + o Wo[c, :]^T + bo[c], BC columns at a time, o (BN, D) read back from global.
        for c0 in range(0, D, BC):
            rc = c0 + tl.arange(0, BC)
            acc = tl.zeros((rn.shape[0], BC), dtype=ACC)
            for k0 in range(0, D, BK):
                rk = k0 + tl.arange(0, BK)
                a = tl.load(o_b + rn[:, None] * D + rk[None, :], mask=tok[:, None] & (rk[None, :] < D),
                            other=0.0).to(ACC)  # (BN, BK)
                w = tl.load(wo_ptr + rc[None, :] * D + rk[:, None], mask=(rk[:, None] < D) & (rc[None, :] < D),
                            other=0.0).to(ACC)  # (BK, BC): Wo[rc, rk]^T
                acc += tl.dot(a, w, input_precision="ieee")
            mask = tok[:, None] & (rc[None, :] < D)
            bias = tl.load(bo_ptr + rc, mask=rc < D, other=0.0).to(ACC)
            res = tl.load(x_b + rn[:, None] * sxn + rc[None, :] * sxd, mask=mask, other=0.0).to(ACC)
            tl.store(out_b + rn[:, None] * D + rc[None, :], (res + acc + bias[None, :]).to(out_b.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _cross_attention_fwd_kernel(x_ptr, kv_ptr, nw_ptr, nb_ptr, wq_ptr, bq_ptr, wo_ptr, bo_ptr,
                                    out_ptr, q_ptr, o_ptr, lse_ptr, stats_ptr,
                                    Nq, Nk, D, H, HD, eps: tl.float64, sxb, sxn, sxd, skb, skn, sks, skd,
                                    BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BKV: tl.constexpr,
                                    BC: tl.constexpr, ACC: tl.constexpr):
        # One program per image. Padded query rows (rn >= Nq) see xn = 0 and finite scores, and are never
        # stored; padded head channels (rd >= hd) load as zero in q, K and V. q, o go to global memory (the
        # backward needs them); o is read back by the output projection after the barrier. eps is declared
        # fp64: a Python float argument would arrive as fp32, 1e-5 off by 2.5e-14, visible in fp64 results.
        b = tl.program_id(0).to(tl.int64)
        rn = tl.arange(0, BN)
        tok = rn < Nq
        rd = tl.arange(0, BD)
        dim = rd < HD
        x_b = x_ptr + b * sxb
        q_b = q_ptr + b * Nq * D
        o_b = o_ptr + b * Nq * D
        k_b = kv_ptr + b * skb
        v_b = k_b + sks

        mean, rstd = _layer_norm_stats(x_b, sxn, sxd, rn, tok, D, eps, BK, ACC)
        stats_b = stats_ptr + (b * Nq + rn) * 2
        tl.store(stats_b, mean, mask=tok)
        tl.store(stats_b + 1, rstd, mask=tok)

        scale = 1.0 / tl.sqrt(tl.zeros((), dtype=ACC) + HD)  # in ACC also when HD == 1 arrives as a constant
        for h in range(0, H):
            col = h * HD + rd  # (BD,) the head's channels
            tile = tok[:, None] & dim[None, :]
            q = _query_head(x_b, sxn, sxd, rn, tok, D, mean, rstd, nw_ptr, nb_ptr, wq_ptr, bq_ptr, col, dim,
                            BK, ACC).to(q_ptr.dtype.element_ty)  # rounded: the attention reads q as stored
            tl.store(q_b + rn[:, None] * D + col[None, :], q, mask=tile)
            o, lse = _attend(q.to(ACC), k_b, v_b, skn, skd, col, dim, Nk, scale, BKV, ACC)
            tl.store(o_b + rn[:, None] * D + col[None, :], o.to(o_ptr.dtype.element_ty), mask=tile)
            tl.store(lse_ptr + (b * H + h) * Nq + rn, lse, mask=tok)
        tl.debug_barrier()  # every head of o complete before any thread reads it
        _out_proj(o_b, rn, tok, D, wo_ptr, bo_ptr, x_b, sxn, sxd, out_ptr + b * Nq * D, BK, BC, ACC)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every tile dimension >= 16


@on_tensor_device
def cross_attention_forward(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps):
    """x (B, Nq, D); kv (B, Nk, 2, D) any strides, read in place; weights and biases of x's dtype ->
    (out, q, o (B, Nq, D) x's dtype, lse (B, H, Nq), stats (B, Nq, 2) (mean, rstd) fp32, fp64 for fp64)."""
    B, Nq, D = x.shape
    Nk = kv.shape[1]
    hd = D // num_heads
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out, q, o = (torch.empty(B, Nq, D, dtype=x.dtype, device=x.device) for _ in range(3))
    lse = torch.empty(B, num_heads, Nq, dtype=acc, device=x.device)
    stats = torch.empty(B, Nq, 2, dtype=acc, device=x.device)
    if B == 0:
        return out, q, o, lse, stats
    weights = (t.contiguous() for t in (norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias))
    _cross_attention_fwd_kernel[(B,)](
        x, kv, *weights, out, q, o, lse, stats, Nq, Nk, D, num_heads, hd, eps, *x.stride(), *kv.stride(),
        BN=_pow2(Nq), BD=_pow2(hd), BK=BLOCK_K, BKV=BLOCK_KV_FP64 if acc == torch.float64 else BLOCK_KV,
        BC=BLOCK_C,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=NUM_WARPS,
    )
    return out, q, o, lse, stats
