"""Triton kernels of moe: top-k routing of T tokens over E experts, the two expert layers of every
chosen (token, slot) pair, and the gated sum, with no host synchronisation (capturable in a CUDA graph).

Four launches. The routing kernel takes a block of tokens per program: the router's logits (a dot over
D in chunks), the top k by k rounds of argmax (ties to the lower expert index, where torch.topk
orders equal logits its own way), the softmax over the chosen logits and each token's logsumexp;
aux and z are then reduced by a few device ops.
The two expert layers run one generic kernel each, in one of two ways:
- dense: one program per (pair, column chunk), reading the rows of its pair's expert (a gathered
  matrix-vector product); every weight is read once per pair, which suits a handful of tokens;
- grouped: the pairs are sorted by expert on the device (a stable argsort, counts and offsets by
  device reductions) and each program multiplies a block of one expert's pairs by that expert's
  weights with tl.dot. The grid is sized by the bound T k pairs per expert, and a program whose block
  starts past its expert's count does nothing, so no size ever comes back to the host.
Both write hidden and expert_out at each pair's own (t, j) place. A last kernel sums gate times expert
output per token in ascending expert order, in fp32 (fp64 for fp64), rounded once. Runs on CUDA
tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from . import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; ops report impl="triton" as unavailable
    triton = None

BLOCK_T = 16  # tokens per program of the routing and combining kernels (tl.dot wants >= 16 rows)
BLOCK_M = 32  # pairs per program of the grouped expert layers
BLOCK_N = 64  # output columns per program of the expert layers and of the combining kernel
BLOCK_K = 32  # reduction chunk of every product with the weights
# Software-pipelining stages of the grouped expert layers: with 2 or 3 (Triton's default), ptxas keeps
# them to 72-80 registers in bf16/fp16 on sm_80 and spills at Life-IQA's shapes; with 1 none spills
# (python -m lifeiqa_fast.preflight).
GROUPED_STAGES = 1

if triton is not None:

    @triton.jit
    def _moe_route_kernel(x_ptr, wr_ptr, br_ptr, logits_ptr, idx_ptr, gates_ptr, lse_ptr, T, D, E,
                          TOPK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                          ACC: tl.constexpr):
        # One program per BT tokens; the experts are the columns of the tile, padded to BE >= 16 and
        # masked to -inf so that neither the top k nor the logsumexp ever sees them.
        rt = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        tok = rt < T
        re = tl.arange(0, BE)
        real = re < E
        acc = tl.zeros((BT, BE), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + rt[:, None] * D + rk[None, :], mask=tok[:, None] & (rk[None, :] < D),
                        other=0.0).to(ACC)  # (BT, BK)
            w = tl.load(wr_ptr + re[None, :] * D + rk[:, None], mask=(rk[:, None] < D) & real[None, :],
                        other=0.0).to(ACC)  # (BK, BE): Wr^T
            acc += tl.dot(a, w, input_precision="ieee")
        bias = tl.load(br_ptr + re, mask=real, other=0.0).to(ACC)
        # Rounded once to x's dtype, as F.linear rounds: the routing then sees the logits a model in
        # that dtype sees (in bf16, logits a fraction of an ulp apart become ties, resolved by index).
        logits = (acc + bias[None, :]).to(x_ptr.dtype.element_ty).to(ACC)  # (BT, BE)
        tl.store(logits_ptr + rt[:, None] * E + re[None, :], logits, mask=tok[:, None] & real[None, :])
        logits = tl.where(real[None, :], logits, float("-inf"))
        top = tl.max(logits, axis=1)  # (BT,) the largest logit, also the first chosen one
        tl.store(lse_ptr + rt, top + tl.log(tl.sum(tl.exp(logits - top[:, None]), axis=1)), mask=tok)

        # Top k: round j takes the largest logit left, the lowest expert among equal ones, and removes
        # it. The first pass sums the softmax's denominator over the chosen logits, the second stores.
        # E.g. logits (1, 3, 3, 0), k = 2 -> indices (1, 2), gates (1/2, 1/2).
        left = logits
        denom = tl.zeros((BT,), dtype=ACC)
        for j in tl.static_range(TOPK):
            v = tl.max(left, axis=1)
            e = tl.min(tl.where(left == v[:, None], re[None, :], BE), axis=1)
            denom += tl.exp(v - top)
            left = tl.where(re[None, :] == e[:, None], float("-inf"), left)
        left = logits
        for j in tl.static_range(TOPK):
            v = tl.max(left, axis=1)
            e = tl.min(tl.where(left == v[:, None], re[None, :], BE), axis=1)
            e = tl.minimum(e, E - 1)  # a NaN row matches nothing: keep the index a valid expert
            tl.store(idx_ptr + rt * TOPK + j, e.to(tl.int64), mask=tok)
            tl.store(gates_ptr + rt * TOPK + j, tl.exp(v - top) / denom, mask=tok)
            left = tl.where(re[None, :] == e[:, None], float("-inf"), left)

    @triton.jit
    def _expert_epilogue(acc, pair, valid, e, rn, N, b_ptr, mask_ptr, out_ptr,
                         RELU: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
        # out[pair, rn] = act(acc + b[e, rn]) (* mask[pair, rn]), rounded once to out's dtype; acc is
        # (BM, BN) for the BM pairs `pair` (BM,), all of expert e; the mask has out's (pairs, N) layout.
        col = rn < N
        tile = valid[:, None] & col[None, :]
        o = acc + tl.load(b_ptr + e * N + rn, mask=col, other=0.0).to(ACC)[None, :]
        if RELU:
            o = tl.maximum(o, 0.0)
        off = pair[:, None] * N + rn[None, :]
        if MASKED:
            o = o * tl.load(mask_ptr + off, mask=tile, other=0.0).to(ACC)
        tl.store(out_ptr + off, o.to(out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _moe_expert_dense_kernel(in_ptr, in_div, w_ptr, b_ptr, mask_ptr, out_ptr, idx_ptr, K, N,
                                 RELU: tl.constexpr, MASKED: tl.constexpr, BN: tl.constexpr,
                                 BK: tl.constexpr, ACC: tl.constexpr):
        # out[p, rn] = act(in[p // in_div] W[e_p, rn, :]^T + b[e_p, rn]), one program per pair p and BN
        # columns, e_p = indices.flat[p]; W is (E, N, K) row-major. The first layer reads x's row of the
        # pair's token (in_div = k), the second the pair's own hidden row (in_div = 1).
        p = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        e = tl.load(idx_ptr + p)
        in_row = in_ptr + (p // in_div) * K
        w_e = w_ptr + e * N * K
        acc = tl.zeros((BN,), dtype=ACC)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(in_row + rk, mask=rk < K, other=0.0).to(ACC)  # (BK,)
            w = tl.load(w_e + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                        other=0.0).to(ACC)  # (BN, BK)
            acc += tl.sum(w * a[None, :], axis=1)
        pair = tl.full((1,), 0, tl.int64) + p
        _expert_epilogue(acc[None, :], pair, pair >= 0, e, rn, N, b_ptr, mask_ptr, out_ptr, RELU, MASKED, ACC)

    @triton.jit
    def _moe_expert_grouped_kernel(in_ptr, in_div, w_ptr, b_ptr, mask_ptr, out_ptr, order_ptr, counts_ptr,
                                   offsets_ptr, K, N, RELU: tl.constexpr, MASKED: tl.constexpr,
                                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
        # Program (m, e, n): rows m BM .. m BM + BM - 1 of expert e's pairs (the sorted positions
        # offsets[e] + row), BN columns. The grid has T k / BM row blocks for every expert, the most
        # any expert can get; blocks past the expert's count skip all work.
        m = tl.program_id(0)
        e = tl.program_id(1).to(tl.int64)
        rn = tl.program_id(2) * BN + tl.arange(0, BN)
        count = tl.load(counts_ptr + e)
        if m * BM < count:
            rm = m * BM + tl.arange(0, BM)
            valid = rm < count
            pair = tl.load(order_ptr + tl.load(offsets_ptr + e) + rm, mask=valid, other=0)  # (BM,)
            in_rows = in_ptr + (pair // in_div) * K
            w_e = w_ptr + e * N * K
            acc = tl.zeros((BM, BN), dtype=ACC)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                a = tl.load(in_rows[:, None] + rk[None, :], mask=valid[:, None] & (rk[None, :] < K),
                            other=0.0).to(ACC)  # (BM, BK)
                w = tl.load(w_e + rn[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rn[None, :] < N),
                            other=0.0).to(ACC)  # (BK, BN): W[e]^T
                acc += tl.dot(a, w, input_precision="ieee")
            _expert_epilogue(acc, pair, valid, e, rn, N, b_ptr, mask_ptr, out_ptr, RELU, MASKED, ACC)

    @triton.jit
    def _moe_combine_kernel(eo_ptr, idx_ptr, gates_ptr, out_ptr, T, D, TOPK,
                            BT: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        # out[t, rd] = sum over the token's chosen experts, in ascending expert order, of
        # gates[t, j] expert_out[t, j, rd]. Round r takes the smallest expert above the previous one:
        # indices (2, 0, 1) -> slots 1, 2, 0.
        rt = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        tok = rt < T
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        tile = tok[:, None] & (rd[None, :] < D)
        rj = tl.arange(0, BJ)
        big = 2**62
        experts = tl.load(idx_ptr + rt[:, None] * TOPK + rj[None, :], mask=tok[:, None] & (rj[None, :] < TOPK),
                          other=big)  # (BT, BJ)
        prev = tl.full((BT,), -1, tl.int64)
        acc = tl.zeros((BT, BD), dtype=ACC)
        for r in range(0, TOPK):
            cur = tl.min(tl.where(experts > prev[:, None], experts, big), axis=1)
            slot = tl.min(tl.where(experts == cur[:, None], rj[None, :], BJ), axis=1)
            slot = tl.minimum(slot, TOPK - 1)  # repeated experts (NaN logits only): stay in the row
            g = tl.load(gates_ptr + rt * TOPK + slot, mask=tok, other=0.0).to(ACC)
            v = tl.load(eo_ptr + (rt * TOPK + slot)[:, None] * D + rd[None, :], mask=tile, other=0.0).to(ACC)
            acc += g[:, None] * v
            prev = cur
        tl.store(out_ptr + rt[:, None] * D + rd[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every tile dimension >= 16


def group_pairs(indices, num_experts):
    """The (token, choice) pairs p = t k + j grouped by expert on the device, with no host
    synchronisation: (order (P,), counts (E,), offsets (E,)), expert e's pairs being order[offsets[e] :
    offsets[e] + counts[e]], ascending. Example: indices ((2, 0), (0, 1)) -> flat (2, 0, 0, 1) ->
    order (1, 2, 3, 0), counts (2, 1, 1), offsets (0, 2, 3)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (P,) int64
    counts = (flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)).sum(dim=0)  # (E,) int64
    return order, counts, torch.cumsum(counts, dim=0) - counts


@on_tensor_device
def moe_forward(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask, dense):
    """x (T, D) contiguous; router_weight (E, D), router_bias (E,); w1 (E, F, D), b1 (E, F), w2 (E, D, F),
    b2 (E, D), all of x's dtype; top_k in [1, E]; dropout_mask None or (T, top_k, F) of x's dtype; dense:
    one program per pair (True) or pairs grouped by expert (False), the same results either way ->
    (out (T, D), aux (), z (), logits (T, E), indices (T, k) int64, gates (T, k), hidden (T, k, F),
    expert_out (T, k, D)): out, hidden, expert_out of x's dtype, the rest fp32 (fp64 for fp64)."""
    T, D = x.shape
    E, F, k = w1.shape[0], w1.shape[1], top_k
    P = T * k  # (token, slot) pairs, pair p = t k + j
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ACC = tl.float64 if x.dtype == torch.float64 else tl.float32
    dev = x.device
    logits = torch.empty(T, E, dtype=acc, device=dev)
    indices = torch.empty(T, k, dtype=torch.int64, device=dev)
    gates = torch.empty(T, k, dtype=acc, device=dev)
    lse = torch.empty(T, dtype=acc, device=dev)
    out = torch.empty(T, D, dtype=x.dtype, device=dev)
    hidden = torch.empty(T, k, F, dtype=x.dtype, device=dev)
    expert_out = torch.empty(T, k, D, dtype=x.dtype, device=dev)
    if T > 0:
        _moe_route_kernel[(triton.cdiv(T, BLOCK_T),)](
            x, router_weight, router_bias, logits, indices, gates, lse, T, D, E,
            TOPK=k, BT=BLOCK_T, BE=_pow2(E), BK=BLOCK_K, ACC=ACC,
        )

    # aux = E sum_e (sum of e's gates / T) (count of e / T); z = mean_t lse_t^2. Device reductions, so
    # T = 0 gives NaN for both, as the reference's means over no tokens do.
    hit = indices.reshape(P, 1) == torch.arange(E, device=dev)  # (P, E): pair p chose expert e
    order, counts, offsets = group_pairs(indices, E)
    aux = E * ((hit * gates.reshape(P, 1)).sum(dim=0) / T * (counts.to(acc) / T)).sum()
    z = (lse * lse).mean()
    if T == 0:
        return out, aux, z, logits, indices, gates, hidden, expert_out

    masked = dropout_mask is not None
    mask = dropout_mask if masked else hidden  # any pointer: unused unless MASKED
    layers = ((x, k, w1, b1, mask, hidden, D, F, True, masked),  # hidden = relu(x W1^T + b1) * mask
              (hidden, 1, w2, b2, hidden, expert_out, F, D, False, False))  # expert_out = hidden W2^T + b2
    if dense:
        for inp, div, w, b, msk, dst, K, N, relu, use_mask in layers:
            _moe_expert_dense_kernel[(P, triton.cdiv(N, BLOCK_N))](
                inp, div, w, b, msk, dst, indices, K, N,
                RELU=relu, MASKED=use_mask, BN=BLOCK_N, BK=BLOCK_K, ACC=ACC,
            )
    else:
        for inp, div, w, b, msk, dst, K, N, relu, use_mask in layers:
            _moe_expert_grouped_kernel[(triton.cdiv(P, BLOCK_M), E, triton.cdiv(N, BLOCK_N))](
                inp, div, w, b, msk, dst, order, counts, offsets, K, N,
                RELU=relu, MASKED=use_mask, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, ACC=ACC, num_stages=GROUPED_STAGES,
            )

    _moe_combine_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_N))](
        expert_out, indices, gates, out, T, D, k,
        BT=BLOCK_T, BJ=max(2, triton.next_power_of_2(k)), BD=BLOCK_N, ACC=ACC,
    )
    return out, aux, z, logits, indices, gates, hidden, expert_out
