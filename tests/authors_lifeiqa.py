"""An independent stand-in for the authors' Life-IQA model (TANGLONG2/Life-IQA: models/Swin/GCN.py,
MOE.py and Swin_Decoder.py), written for the tests from the facts of their code and nothing of ours:
it imports no lifeiqa_fast, so it cannot share our assumptions.

What it reproduces, because optimize() reads it:
- the module tree and attribute names, with the class names of their files;
- what their modules hold outside the state dict: each decoder layer's plain tensors `adj` (the 6x6
  all-ones J, never used by their forward) and `adj_norm` (D^-1/2 (J + I) D^-1/2 in float32, which
  their forward uses), deep-copied per layer as their _get_clones does; the router's own top_k (their
  routing reads it, not SparseMoE.top_k); SparseMoE.n_exp; UPP_Layer.pool_size; Life_models.juery;
  each decoder layer's dropout1/dropout2 and the attention's dropout, batch_first, bias_k/bias_v;
  TransformerDecoder.norm (None);
- their forward's order of operations: the UPP loop over bins with int linspace edges on the NCHW
  map, the 1x1 convolution over every position and then the mean, the graph convolutions as batched
  matmuls with the bias added in place, attention through F.multi_head_attention_forward on
  sequence-first tensors, the per-expert masked MoE loop with the gates of the sparse softmax, the
  aux loss from one-hot counts under no_grad, the z loss, and in training the zero-valued sum over
  every expert parameter (which gives unchosen experts a zero gradient instead of none);
- the E == 1 head: Linear -> GELU -> Linear -> Dropout, returning integer zeros for aux and z.

Two deliberate departures: the backbone is any timm Swin given by name and arguments (theirs is
swin_base with downloaded weights, too slow for tests), and the decoder graph is moved to the input's
device (their layer calls .cuda(), which fails on a CPU-only machine).
"""
import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn


class UPP_Layer(nn.Module):
    """Means of a (B, C, H, W) map over a pool_size x pool_size grid of bins -> (B, bins, C)."""

    def __init__(self, pool_size=7):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x):
        _, _, height, width = x.shape
        rows = torch.linspace(0, height, self.pool_size + 1, dtype=torch.int)
        cols = torch.linspace(0, width, self.pool_size + 1, dtype=torch.int)
        bins = [x[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]].mean(dim=(-1, -2))
                for i in range(self.pool_size) for j in range(self.pool_size)]
        return torch.stack(bins, dim=1)


def normalize_adj(a):
    """D^-1/2 (A + I) D^-1/2 with the degrees clamped away from 0."""
    a_hat = a + torch.eye(a.size(-1), device=a.device)
    scale = a_hat.sum(-1).clamp_min(1e-6).pow(-0.5)
    return scale.unsqueeze(-1) * a_hat * scale.unsqueeze(-2)


class GraphConvolution(nn.Module):
    def __init__(self, input_dim, output_dim, use_bias=True):
        super().__init__()
        self.input_dim, self.output_dim, self.use_bias = input_dim, output_dim, use_bias
        self.weight = nn.Parameter(torch.empty(input_dim, output_dim))  # stored (in, out)
        if use_bias:
            self.bias = nn.Parameter(torch.empty(output_dim))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight)
        if use_bias:
            nn.init.zeros_(self.bias)

    def forward(self, adjacency, features):  # (B, N, N), (B, N, in)
        support = torch.bmm(features, self.weight.unsqueeze(0).expand(features.shape[0], -1, -1))
        out = torch.bmm(adjacency, support)
        if self.use_bias:
            out += self.bias
        return out


class GcnModel(nn.Module):
    def __init__(self, input_dim=384, output_dim=384):
        super().__init__()
        self.gcn1 = GraphConvolution(input_dim, input_dim // 2)
        self.gcn2 = GraphConvolution(input_dim // 2, input_dim // 4)
        self.gcn3 = GraphConvolution(input_dim // 4, output_dim)

    def forward(self, adjacency, features):
        h = F.relu(self.gcn1(adjacency, features))
        h = F.relu(self.gcn2(adjacency, h))
        return self.gcn3(adjacency, h)


class MultiheadAttention(nn.Module):
    """torch's MultiheadAttention attributes (their file carries its own copy of the class); packed q/k/v."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False):
        super().__init__()
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self.register_parameter(name, None)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, need_weights=False):
        # The decoder never passes the same tensor as query and key, so torch's fused fast path is never
        # taken: the general function on (L, B, D) tensors.
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, need_weights=need_weights)
        return (out.transpose(0, 1) if self.batch_first else out), weights


class TransformerDecoderLayer(nn.Module):
    """GCN over the queries, then attention from the normed queries to the memory; both residual."""

    def __init__(self, d_model, nhead, dropout=0.1, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
                 bias=True):
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first)
        self.GCN = GcnModel(d_model, d_model)
        self.adj = torch.ones(6, 6)  # plain tensors, outside the state dict
        self.adj_norm = normalize_adj(self.adj)
        self.norm_first = norm_first
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, tgt, memory):
        graph = self.adj_norm.unsqueeze(0).expand(tgt.shape[0], -1, -1).to(tgt.device)
        x = tgt + self.dropout1(self.GCN(graph, tgt))  # norm_first or not: their two branches are the same
        attended = self.multihead_attn(self.norm2(x), memory, memory, need_weights=False)[0]
        return x + self.dropout2(attended)


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers, self.norm = num_layers, norm

    def forward(self, tgt, memory):
        out = tgt
        for layer in self.layers:
            out = layer(out, memory)
        return self.norm(out) if self.norm is not None else out


class TopkRouter(nn.Module):
    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.linear = nn.Linear(n_embed, num_experts)

    def forward(self, x):
        logits = self.linear(x)
        kept, chosen = logits.topk(self.top_k, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, chosen, kept)
        return F.softmax(sparse, dim=-1), chosen, logits


class Expert(nn.Module):
    def __init__(self, n_embd, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        return self.net(x)


class SparseMoE(nn.Module):
    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.n_exp = num_experts
        self.router = TopkRouter(n_embed, num_experts, top_k)
        self.experts = nn.ModuleList(Expert(n_embed) for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x):  # (B, T, D)
        gates, chosen, logits = self.router(x)
        with torch.no_grad():  # per expert: the mean over tokens of how many of a token's picks it is
            counts = F.one_hot(chosen, num_classes=self.n_exp).float().sum(dim=2).mean(dim=(0, 1))
        aux = self.n_exp * torch.sum(gates.float().mean(dim=(0, 1)) * counts)
        z = (torch.logsumexp(logits, dim=-1) ** 2.0).mean()

        out = torch.zeros_like(x)
        tokens = x.view(-1, x.shape[-1])
        token_gates = gates.view(-1, gates.shape[-1])
        for e, expert in enumerate(self.experts):
            picked = (chosen == e).any(dim=-1)  # (B, T)
            rows = picked.view(-1)
            if rows.any():
                y = expert(tokens[rows]) * token_gates[rows, e].unsqueeze(1)
                out[picked] += y.squeeze(1)
        if self.training:  # zero-valued, but every expert parameter gets a gradient
            zero = 0.0
            for expert in self.experts:
                for p in expert.parameters():
                    zero = zero + 0.0 * p.sum()
            out = out + zero
        return out, aux, z


class MLP(nn.Module):
    """The single-expert head of Swin_Decoder.py (GELU, dropout last); aux and z are the int 0."""

    def __init__(self, n_embd=384, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x), 0, 0


class Life_models(nn.Module):
    def __init__(self, embed_dim=384, juery_nums=6, num_experts=8, top_k=2, depth=4,
                 backbone="swin_base_patch4_window7_224", backbone_kwargs=None):
        super().__init__()
        self.pretrain_model = timm.create_model(backbone, pretrained=False, **(backbone_kwargs or {}))
        m = self.pretrain_model
        self.backbone_stages = nn.ModuleList([nn.Sequential(m.patch_embed, m.layers[0]), m.layers[1], m.layers[2],
                                              m.layers[3]])
        del m.norm
        del m.head
        channels = [info["num_chs"] for info in m.feature_info]  # 512 and 1024 for their swin_base
        self.UPP_layer3 = UPP_Layer(pool_size=7)
        self.proj_layer3 = nn.Linear(channels[2], embed_dim)
        self.proj_layer4 = nn.Conv2d(channels[3], embed_dim, kernel_size=1)
        self.juery = juery_nums
        layer = TransformerDecoderLayer(embed_dim, 6, dropout=0.0, batch_first=True, norm_first=True)
        self.bunch_decoder = TransformerDecoder(layer, num_layers=depth)  # every layer starts as a copy
        self.bunch_embedding = nn.Parameter(torch.randn(1, self.juery, embed_dim))
        nn.init.trunc_normal_(self.bunch_embedding, std=0.02)
        self.MOE = MLP(embed_dim) if num_experts == 1 else SparseMoE(embed_dim, num_experts, top_k)
        self.norm3 = nn.LayerNorm(embed_dim, eps=1e-5, bias=True)
        self.dropout3 = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.tensor(0.1))
        self.fc = nn.Linear(embed_dim, 1)

    def forward(self, x):
        batch = x.shape[0]
        queries = self.bunch_embedding.expand(batch, -1, -1)
        maps = []
        for stage in self.backbone_stages:
            x = stage(x)
            maps.append(x.permute(0, 3, 1, 2).contiguous())  # timm's NHWC -> NCHW
        stage4 = self.proj_layer4(maps[3]).flatten(2).permute(0, 2, 1)  # (B, h*w, D)
        queries = queries + stage4.mean(dim=1, keepdim=True)
        memory = self.proj_layer3(self.UPP_layer3(maps[2]))
        y = self.norm3(self.bunch_decoder(queries, memory))
        moe_out, aux, z = self.MOE(y)
        y = self.dropout3(y + self.gamma * moe_out)
        return self.fc(y).view(batch, -1).mean(dim=1, keepdim=True), aux, z
