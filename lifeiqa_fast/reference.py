"""Plain-PyTorch reference of every op: the executable spec (docs/model.md), written the authors' way.

Each function computes exactly what the authors' code computes, in the same order of operations,
host synchronisations included (the per-bin pooling loop, the per-expert masked loop): tests check
every kernel against these, benchmarks time them as the "eager" baseline, and impl="reference"
runs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.compiler.assume_constant_result
def _bin_edges(n: int, grid: int) -> tuple[int, ...]:
    """torch.linspace(0, n, grid + 1, dtype=torch.int), the authors' bin edges, as Python ints: computed
    on the CPU whatever the inputs' device (meta included), and a constant to torch.compile."""
    return tuple(torch.linspace(0, n, grid + 1, dtype=torch.int, device="cpu").tolist())


def grid_pool_ref(x: Tensor, grid: int = 7) -> Tensor:
    """UPP pooling: the mean of x over each of grid x grid bins, bins row-major.

    x: (B, C, H, W), H >= grid, W >= grid. Returns (B, grid * grid, C), x's dtype.
    Bin edges per axis are torch.linspace(0, H, grid + 1, dtype=int): 14 -> 0 2 4 ... 14 (a 2x2
    average pool), 15 -> 0 2 4 6 8 10 12 15 (the last bin three rows tall).
    """
    B, C, H, W = x.shape
    h_bins, w_bins = _bin_edges(H, grid), _bin_edges(W, grid)
    out = []
    for i in range(grid):
        for j in range(grid):
            patch = x[:, :, h_bins[i] : h_bins[i + 1], w_bins[j] : w_bins[j + 1]]  # (B, C, h', w')
            out.append(patch.mean(dim=(-1, -2)))  # (B, C)
    return torch.stack(out, dim=1)  # (B, grid * grid, C)


def fixed_adjacency(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The decoder's fixed graph D^-1/2 (J + I) D^-1/2, J the n x n all-ones matrix: (n, n).

    For n = 6 every degree is 7: 2/7 on the diagonal, 1/7 off it.
    """
    a = torch.ones(n, n) + torch.eye(n)
    d = a.sum(-1).clamp_min(1e-6).pow(-0.5)
    return (d.unsqueeze(-1) * a * d.unsqueeze(-2)).to(dtype=dtype, device=device)


def gcn_ref(x: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> Tensor:
    """x + GCN(adj, x): three graph convolutions h -> adj @ (h @ w) + b, ReLU after the first two.

    x: (B, N, D); adj: (N, N) shared or (B, N, N); w1 (D, H1), w2 (H1, H2), w3 (H2, D) stored (in, out);
    biases 1-D. Returns (B, N, D). Batched with expanded weights and adjacency, as the authors wrote it.
    """
    B = x.shape[0]
    adj_b = adj.expand(B, -1, -1) if adj.dim() == 2 else adj  # (B, N, N)
    h = x
    for w, b, relu in ((w1, b1, True), (w2, b2, True), (w3, b3, False)):
        support = torch.bmm(h, w.unsqueeze(0).expand(B, -1, -1))  # (B, N, out)
        h = torch.bmm(adj_b, support) + b
        if relu:
            h = F.relu(h)
    return x + h


def mha_ref(
    x: Tensor,
    memory: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    num_heads: int,
    eps: float = 1e-5,
) -> Tensor:
    """One official decoder layer's attention: x + MHA(LayerNorm(x), memory, memory), the module's own
    call (torch.nn.MultiheadAttention semantics, dropout 0), keys and values projected from memory.

    x: (B, Nq, D); memory: (B, Nk, D), keys and values un-normed; in_proj_weight (3D, D) packed q, k, v;
    in_proj_bias (3D,); out_weight (D, D); out_bias (D,). Returns (B, Nq, D).
    """
    D = x.shape[-1]
    q = F.layer_norm(x, (D,), norm_weight, norm_bias, eps)
    mem = memory.transpose(0, 1)  # (Nk, B, D): the module's sequence-first layout
    out, _ = F.multi_head_attention_forward(
        q.transpose(0, 1), mem, mem, D, num_heads, in_proj_weight, in_proj_bias, None, None, False, 0.0,
        out_weight, out_bias, training=False, need_weights=False,
    )
    return x + out.transpose(0, 1)


def cross_attention_ref(
    x: Tensor,
    kv: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    q_weight: Tensor,
    q_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    num_heads: int,
    eps: float = 1e-5,
) -> Tensor:
    """mha_ref with the keys and values already projected: the same ATen calls MultiheadAttention
    makes after its input projection (the q projection, scaled_dot_product_attention, out_proj).

    x: (B, Nq, D); kv: (B, Nk, 2, D), kv[:, :, 0] the keys and kv[:, :, 1] the values (memory @ the k and
    v rows of in_proj_weight, plus their biases); q_weight (D, D), q_bias (D,): the q rows of in_proj.
    Returns (B, Nq, D) = x + out_proj(softmax(q k^T / sqrt(D / num_heads)) v), heads split along D.
    """
    B, Nq, D = x.shape
    hd = D // num_heads
    q = F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), q_weight, q_bias)
    heads = lambda t: t.reshape(B, t.shape[1], num_heads, hd).transpose(1, 2)  # noqa: E731  (B, H, N, hd)
    o = F.scaled_dot_product_attention(heads(q), heads(kv[:, :, 0]), heads(kv[:, :, 1]))  # (B, H, Nq, hd)
    return x + F.linear(o.transpose(1, 2).reshape(B, Nq, D), out_weight, out_bias)


def moe_ref(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Tensor,
    w1,
    b1,
    w2,
    b2,
    top_k: int,
    dropout_p: float = 0.1,
    training: bool = False,
    dropout_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse mixture of experts on tokens x: (T, D). Returns (out (T, D), aux (), z ()).

    router_weight (E, D), router_bias (E,); expert e is Linear(w1[e] (F, D), b1[e]) -> ReLU -> Dropout
    -> Linear(w2[e] (D, F), b2[e]); w1..b2 are stacked tensors or per-expert sequences. Gates: softmax
    over the top-k logits (the rest -inf). aux = E * sum_e mean(gates[:, e]) * mean(count_e), the
    count factor detached; z = mean(logsumexp(logits)^2) over the full logits. dropout_mask (T, top_k,
    F), when given, replaces the dropout: token t's hidden layer in its j-th chosen expert is
    multiplied by dropout_mask[t, j] (0 or 1 / (1 - p)), so that kernels can be compared in training.
    """
    E = router_weight.shape[0]
    logits = F.linear(x, router_weight, router_bias)  # (T, E)
    top_logits, indices = logits.topk(top_k, dim=-1)  # (T, k)
    sparse_logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, top_logits)
    gates = F.softmax(sparse_logits, dim=-1)  # (T, E), zero where not chosen
    with torch.no_grad():
        tokens_per_expert = F.one_hot(indices, num_classes=E).float().sum(dim=1).mean(dim=0)  # (E,)
    aux = E * torch.sum(gates.float().mean(dim=0) * tokens_per_expert)
    z = torch.mean(torch.logsumexp(logits, dim=-1) ** 2.0)
    out = torch.zeros_like(x)
    for e in range(E):
        mask = (indices == e).any(dim=-1)  # (T,)
        if mask.any():
            h = F.relu(F.linear(x[mask], w1[e], b1[e]))
            if dropout_mask is None:
                h = F.dropout(h, dropout_p, training)
            else:
                slot = (indices[mask] == e).int().argmax(dim=-1)  # which of the token's k choices is e
                h = h * dropout_mask[mask, slot]
            out[mask] += F.linear(h, w2[e], b2[e]) * gates[mask, e].unsqueeze(1)
    return out, aux, z
