"""LifeIQA: the Life-IQA model with the authors' module structure and state-dict keys (docs/model.md).

The head calls the op families of lifeiqa_fast.ops with the module's impl; impl="reference" computes
everything the authors' way (lifeiqa_fast.reference). FusedForward is that forward pass for any module
with the authors' layout; checkpoints are read and written by lifeiqa_fast.checkpoint, and
lifeiqa_fast.optimize converts a model of the authors' classes.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .ops import attend_memory, cross_attention, gcn, grid_pool, moe
from .ops._impl import _check_impl, is_int, linear, requested, resolve
from .ops.cross_attention import native_attend_pays
from .ops.gcn import MAX_TOKENS as GCN_MAX_TOKENS


def _built_once(owner: nn.Module, params: list[Tensor], build):
    """build(), a function of params, made once and kept on owner while autograd does not record and
    until a parameter changes, in place (an optimizer step, load_state_dict: its version moves) or by
    replacement (.to(), .half(): its storage moves); rebuilt on every call while autograd records (the
    gradients must flow back to params) and under torch.compile (traced into the graph)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return build()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    if owner._cache is None or owner._cache[0] != key:
        owner._cache = (key, build())
    return owner._cache[1]


def _is_reference(impl: str | None) -> bool:
    """Whether a module with this impl computes the authors' way (None: the process-wide default)."""
    return requested(impl) == "reference"


class GridPool(nn.Module):
    """The UPP layer: (B, H, W, C) stage map -> (B, grid * grid, C) bin means."""

    def __init__(self, grid: int = 7, impl: str | None = None):
        super().__init__()
        self._init_state(grid, impl)

    def _init_state(self, grid: int = 7, impl: str | None = None) -> None:
        """What the module holds beside its parameters and submodules (here, everything), set by
        __init__ and by lifeiqa_fast.optimize on a module it converts; likewise in the classes below."""
        self.grid, self.impl = grid, impl

    def forward(self, x: Tensor) -> Tensor:
        return grid_pool(x, self.grid, layout="nhwc", impl=self.impl)


class GraphConvolution(nn.Module):
    """One graph convolution's parameters: weight stored (in, out) as in the authors' checkpoints."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight)
        nn.init.zeros_(self.bias)


class GcnModel(nn.Module):
    """Three graph convolutions D -> D/2 -> D/4 -> D."""

    def __init__(self, dim: int):
        super().__init__()
        self.gcn1 = GraphConvolution(dim, dim // 2)
        self.gcn2 = GraphConvolution(dim // 2, dim // 4)
        self.gcn3 = GraphConvolution(dim // 4, dim)


class DecoderLayer(nn.Module):
    """x = x + GCN(A, x); x = x + MHA(norm2(x), m, m). No self-attention, no FFN, dropout 0.

    A is the fixed graph (J + I) / (N + 1) (not a parameter, not saved), or with learnable=True the
    paper's variant: a parameter `adj` (N, N) initialised to that matrix.
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int, learnable: bool = False, impl: str | None = None):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.GCN = GcnModel(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.adj = nn.Parameter(reference.fixed_adjacency(num_queries)) if learnable else None
        self._init_state(impl)

    def _init_state(self, impl: str | None = None) -> None:  # (optimize sets adj itself: it reads the graph)
        self.impl = impl

    def forward(self, x: Tensor, memory: Tensor, kv: Tensor | None = None, out_bias: Tensor | None = None) -> Tensor:
        """kv: this layer's keys and values (B, Nk, 2, D) from the decoder's single K/V GEMM, for the fused
        op, with out_bias: out_proj's bias with the values' bias folded in (see Decoder). Without kv the
        layer attends to the memory itself: the authors' module call (impl="reference"), or
        ops.attend_memory (keys and values never formed)."""
        g = self.GCN
        x = gcn(x, self.adj, g.gcn1.weight, g.gcn1.bias, g.gcn2.weight, g.gcn2.bias, g.gcn3.weight, g.gcn3.bias,
                impl=self.impl)
        attn, norm = self.multihead_attn, self.norm2
        if kv is None:
            args = (x, memory, norm.weight, norm.bias, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                    attn.out_proj.bias, attn.num_heads, norm.eps)
            if _is_reference(self.impl):  # the authors' module call, op by op under autocast
                return reference.mha_ref(*args)
            # attend_memory has a native kernel on CPU only: impl="triton", or "native" elsewhere, take composite
            impl = self.impl if self.impl in (None, "auto", "composite") or memory.is_cpu and self.impl == "native" \
                else "composite"
            return attend_memory(*args, impl=impl)
        D = attn.embed_dim  # the q rows of in_proj: a view, so gradients reach the packed parameter
        return cross_attention(x, kv, norm.weight, norm.bias, attn.in_proj_weight[:D], attn.in_proj_bias[:D],
                               attn.out_proj.weight, out_bias, attn.num_heads, norm.eps, impl=self.impl)


# How the fused decoder attends, per device type (Decoder.strategy None): "kv", every layer's keys and
# values from one GEMM then the fused cross_attention op per layer; or "memory", ops.attend_memory per
# layer. On the CPU "memory" is faster at every batch (benchmarks/run.py's decoder rows, "native-memory"
# and "native-kv"; figures in benchmarks/results/): the K/V GEMM alone costs more than the whole stack
# does that way, in ~3x fewer FLOP. GPUs, and any other device, take "kv".
DECODER_STRATEGY = {"cpu": "memory"}


class Decoder(nn.Module):
    """L decoder layers over the N query tokens.

    Fused (impl other than "reference"), by `strategy` (None: DECODER_STRATEGY for memory's device):
    - "kv": every layer's keys and values come from one GEMM of the memory with all layers' k and v
      rows of in_proj stacked, (B, Nk, D) -> (B, Nk, L, 2, D), where the authors' layers each project
      the memory on their own; then per layer gcn and the fused cross_attention op. That GEMM adds no
      bias, which is exact: the keys' bias adds q . b_k to every score of a query row, which the
      softmax cancels; the values' bias adds b_v to every attention output row (each row of P sums to
      1), which out_proj maps to the constant W_o b_v, folded into out_proj's bias. (A biased GEMM first
      writes the bias over the whole (B * Nk, L * 2D) output: one more pass over the stack's largest
      tensor.)
    - "memory": per layer gcn and ops.attend_memory, which never forms the keys and values.
    """

    def __init__(self, depth: int, dim: int, num_heads: int, num_queries: int, learnable: bool, impl: str | None,
                 strategy: str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, num_queries, learnable, impl) for _ in range(depth))
        self._init_state(impl, strategy)

    def _init_state(self, impl: str | None = None, strategy: str | None = None) -> None:
        self.impl, self.strategy = impl, strategy
        self._cache = None  # (parameter versions, folded weights): see folded

    @property
    def strategy(self) -> str | None:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str | None) -> None:
        if value not in (None, "kv", "memory"):
            raise ValueError(f"lifeiqa_fast.Decoder: strategy must be None, 'kv' or 'memory', got {value!r}")
        self._strategy = value

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        strategy = self.strategy or DECODER_STRATEGY.get(memory.device.type, "kv")
        if strategy == "memory":
            stack = self._native_stack(x, memory)
            if stack is not None:
                return torch.ops.lifeiqa_fast.decoder_memory(x.contiguous(), memory.contiguous(), *stack)
        if _is_reference(self.impl) or strategy == "memory":
            for layer in self.layers:
                x = layer(x, memory)
            return x
        B, Nk, D = memory.shape
        kv_weight, out_biases = self.folded()
        kv = F.linear(memory, kv_weight).view(B, Nk, len(self.layers), 2, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, kv[:, :, i], out_biases[i])
        return x

    def _native_stack(self, x: Tensor, memory: Tensor) -> tuple | None:
        """The arguments after x and memory of the native decoder_memory op (gcn's and attend_memory's CPU
        kernels layer after layer in one call, csrc/attend_memory.cpp), where the "memory" strategy takes
        it: where attend_memory would run its native kernel with impl="auto" (CPU, fp32 or bf16, few rows,
        no gradient recorded), every layer alike, and the GCN's kernel holds the query tokens; else None.

        Called once per forward at a few rows, so it reads the parameters from the modules' dictionaries
        (about 50 of them: nn.Module attribute lookups would cost more than a layer's kernels)."""
        if requested(self.impl) not in ("auto", "native"):
            return None
        if memory.device.type != "cpu" or x.dim() != 3 or x.shape[1] > GCN_MAX_TOKENS or x.dtype != memory.dtype:
            return None
        adj, params, heads = [], [], set()
        for layer in self.layers._modules.values():
            parts = layer._modules
            attn, gcns, norm = parts["multihead_attn"], parts["GCN"]._modules, parts["norm2"]
            g1, g2, g3 = (gcns[name]._parameters for name in ("gcn1", "gcn2", "gcn3"))
            a, out = attn._parameters, attn._modules["out_proj"]._parameters
            params += [g1["weight"], g1["bias"], g2["weight"], g2["bias"], g3["weight"], g3["bias"],
                       norm._parameters["weight"], norm._parameters["bias"], a["in_proj_weight"],
                       a["in_proj_bias"], out["weight"], out["bias"]]
            adj.append(layer.adj)  # a parameter, a graph optimize() set, or None
            heads.add((attn.num_heads, norm.eps))
        if len(heads) != 1 or resolve("attend_memory", x, self.impl) != "native" or \
                not native_attend_pays(x, params + [p for p in adj if p is not None]):
            return None
        return (adj, params, *heads.pop())

    def folded(self) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(all layers' k and v rows of in_proj stacked (L * 2D, D), each layer's out_proj bias plus
        W_o b_v (D,)): the fused decoder's weights, see the class docstring.

        Built on every call while autograd records (the gradients flow back to each layer's parameters)
        and under torch.compile; otherwise built once and reused until a parameter changes, in place (an
        optimizer step, load_state_dict) or by replacement (.to(), .half()).
        """
        attns = [layer.multihead_attn for layer in self.layers]
        D = attns[0].embed_dim
        params = [p for a in attns for p in (a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias)]

        def build():
            return (torch.cat([a.in_proj_weight[D:] for a in attns]),
                    tuple(torch.addmv(a.out_proj.bias, a.out_proj.weight, a.in_proj_bias[2 * D:]) for a in attns))

        return _built_once(self, params, build)


class TopkRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_experts)


class Expert(nn.Module):
    """Linear(D, 4D) -> ReLU -> Dropout(0.1) -> Linear(4D, D): keys net.0.* and net.3.*."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


class SparseMoE(nn.Module):
    """Top-k routed mixture of E experts on every token; returns (out, aux, z).

    Fused (impl other than "reference"): ops.moe on the experts' weights stacked, (E, F, D) and so on;
    the parameters and their state-dict keys stay the authors' per-expert Linear layers. In training
    the expert dropout is a mask drawn here (torch's RNG) and handed to the op.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, impl: str | None = None):
        super().__init__()
        if not is_int(top_k) or not 1 <= top_k <= num_experts:
            raise ValueError(f"lifeiqa_fast.LifeIQA: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.router = TopkRouter(dim, num_experts)
        self.experts = nn.ModuleList(Expert(dim) for _ in range(num_experts))
        self._init_state(top_k, impl)

    def _init_state(self, top_k: int, impl: str | None = None) -> None:
        self.top_k, self.impl = top_k, impl
        self._cache = None  # (parameter versions, stacked weights): see stacked

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        p = self.experts[0].net[2].p
        if _is_reference(self.impl):
            nets = [e.net for e in self.experts]
            out, aux, z = reference.moe_ref(
                tokens, self.router.linear.weight, self.router.linear.bias, [n[0].weight for n in nets],
                [n[0].bias for n in nets], [n[3].weight for n in nets], [n[3].bias for n in nets], self.top_k, p,
                self.training,
            )
            return out.view_as(x), aux, z
        w1 = self.experts[0].net[0].weight
        mask = None
        if self.training and p > 0:
            keep = torch.rand(tokens.shape[0], self.top_k, w1.shape[0], device=x.device) >= p
            mask = keep.to(x.dtype) / (1 - p)
        out, aux, z = moe(tokens, *self.stacked(), self.top_k, mask, impl=self.impl)
        return out.view_as(x), aux, z

    def stacked(self) -> tuple[Tensor, ...]:
        """(router weight, router bias, w1 (E, F, D), b1 (E, F), w2 (E, D, F), b2 (E, D)): the experts'
        Linear layers stacked, built as _built_once says."""
        nets = [e.net for e in self.experts]
        layers = [(n[0].weight, n[0].bias, n[3].weight, n[3].bias) for n in nets]
        router = self.router.linear
        params = [router.weight, router.bias, *(p for layer in layers for p in layer)]

        def build():
            return (router.weight, router.bias, *(torch.stack(ts) for ts in zip(*layers)))

        return _built_once(self, params, build)


class MLP(nn.Module):
    """The E == 1 head: Linear(D, 4D) -> GELU -> Linear(4D, D) -> Dropout(0.1); aux = z = 0."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zero = x.new_zeros((), dtype=torch.float32)
        return self.net(x), zero, zero


def _create_backbone(name: str, pretrained, kwargs: dict) -> nn.Module:
    import timm

    if pretrained is True:
        tag = name if "." in name or not name.startswith("swin") else f"{name}.ms_in22k_ft_in1k"  # the authors'
        return timm.create_model(tag, pretrained=True, **kwargs)
    if pretrained is False or pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lifeiqa_fast.LifeIQA: pretrained backbone weights not found: {path}")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


def _backbone_stages(m: nn.Module, name: str) -> tuple[list[nn.Module], bool]:
    """The backbone's four stages, to be run in a chain (stage 3 at stride 16, stage 4 at stride 32), and
    whether they give NHWC maps; the classifier is removed. Swin (the authors' backbone; their keys: norm
    and head deleted) gives NHWC maps; ResNet and ConvNeXt (a CNN learns from scratch far faster on a
    small set: the synthetic preset) give NCHW ones."""
    if hasattr(m, "patch_embed") and len(getattr(m, "layers", ())) == 4:  # Swin
        del m.norm
        del m.head
        return [nn.Sequential(m.patch_embed, m.layers[0]), m.layers[1], m.layers[2], m.layers[3]], True
    if all(hasattr(m, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):  # ResNet
        m.reset_classifier(0, "")
        return [nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool, m.layer1), m.layer2, m.layer3, m.layer4], False
    if hasattr(m, "stem") and len(getattr(m, "stages", ())) == 4 and hasattr(m, "head"):  # ConvNeXt
        m.reset_classifier(0, "")
        return [nn.Sequential(m.stem, m.stages[0]), m.stages[1], m.stages[2], m.stages[3]], False
    raise ValueError(f"lifeiqa_fast.LifeIQA: backbone must be a timm Swin transformer, ResNet or ConvNeXt with "
                     f"4 stages, got {name!r}")


class FusedForward:
    """The forward pass of a Life-IQA model through lifeiqa_fast's ops, for any module with the authors'
    attribute layout (docs/model.md): LifeIQA, and models that optimize() converted. Reads only the
    attributes backbone_stages, proj_layer4, bunch_embedding, UPP_layer3, proj_layer3, bunch_decoder,
    norm3, MOE, gamma, dropout3 and fc, whose submodules are this module's classes."""

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) -> (f3 (B, H/16, W/16, C3), f4 (B, H/32, W/32, C4)): NHWC stage maps, no final norm."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"lifeiqa_fast.LifeIQA: x must be an image batch of shape (B, 3, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"lifeiqa_fast.LifeIQA: x must be a floating tensor of ImageNet-normalised images, got "
                            f"{x.dtype} (lifeiqa_fast.Scorer takes uint8 images and normalises them)")
        if x.shape[0] == 0:
            raise ValueError(f"lifeiqa_fast.LifeIQA: x holds no images, got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        feats = []
        for stage in self.backbone_stages:
            x = stage(x)
            feats.append(x)
        f3, f4 = feats[2], feats[3]
        if not getattr(self, "nhwc_stages", True):  # a CNN backbone's NCHW maps
            f3, f4 = f3.permute(0, 2, 3, 1), f4.permute(0, 2, 3, 1)
        grid = self.UPP_layer3.grid
        if f3.shape[1] < grid or f3.shape[2] < grid:
            raise ValueError(f"lifeiqa_fast.LifeIQA: images of {size[0]}x{size[1]} pixels give a stage-3 feature map "
                             f"of {f3.shape[1]}x{f3.shape[2]}, smaller than the {grid}x{grid} grid it is pooled to: "
                             f"the images must be at least {16 * grid}x{16 * grid} (the authors crop 224x224)")
        return f3, f4

    def forward_head(self, f3: Tensor, f4: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f3 (B, h3, w3, C3), f4 (B, h4, w4, C4)) NHWC -> (score (B, 1), aux (), z ())."""
        B = f4.shape[0]
        if _is_reference(self.impl):  # the authors' order: 1x1 conv over every position, then the mean
            g = self.proj_layer4(f4.permute(0, 3, 1, 2)).flatten(2).mean(dim=2)  # (B, D)
        else:  # the same value: the mean commutes with the 1x1 conv, so pool first
            w = self.proj_layer4.weight
            g = linear(f4.mean(dim=(1, 2)), w.view(w.shape[0], w.shape[1]), self.proj_layer4.bias)  # (B, D)
        x = self.bunch_embedding + g.unsqueeze(1)  # (B, N, D)
        memory = self.proj_layer3(self.UPP_layer3(f3))  # (B, 49, D)
        x = self.bunch_decoder(x, memory)
        y = self.norm3(x)
        moe_out, aux, z = self.MOE(y)
        y = self.dropout3(y + self.gamma * moe_out)
        score = self.fc(y).view(B, -1).mean(dim=1, keepdim=True)  # (B, 1)
        return score, aux, z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.forward_head(*self.forward_features(x))

    def __reduce_ex__(self, protocol):
        base = type(self).__bases__[-1]
        if _FAST_CLASSES.get(base) is type(self):  # made by optimize(): rebuilt from the model's own class
            return _new_fast, (base,), self.__dict__
        return super().__reduce_ex__(protocol)

    @property
    def impl(self) -> str | None:
        return self._impl

    @impl.setter
    def impl(self, value: str | None) -> None:
        if value is not None:
            _check_impl(value)
        self._impl = value
        self.UPP_layer3.impl = self.bunch_decoder.impl = value
        if isinstance(self.MOE, SparseMoE):
            self.MOE.impl = value
        for layer in self.bunch_decoder.layers:
            layer.impl = value


class LifeIQA(FusedForward, nn.Module):
    """Life-IQA (Tang et al., CVPR 2026): Swin backbone + GCN / cross-attention decoder + sparse MoE head.

    Args:
        num_experts: E; 1 replaces the MoE by a plain GELU MLP (aux = z = 0).
        top_k: experts per token, 1 <= top_k <= num_experts.
        depth: decoder layers L. num_queries: query tokens N. embed_dim: D. num_heads: attention heads.
        backbone: a timm Swin transformer name (stage 3 and 4 maps feed the head; the authors' backbone),
            or a timm ResNet or ConvNeXt name (ours: they learn from scratch far faster on small sets).
        pretrained: False (random backbone), True (timm's weights: ms_in22k_ft_in1k for Swin; needs a network)
            or a path to local backbone weights (a timm, safetensors or torch file).
        impl: implementation of the head ops: "auto", "reference", "composite", "native", "triton", or None for
            the process-wide default.
        adjacency: "fixed" (the authors' code: the graph (J + I) / (N + 1), not in the state dict) or
            "learnable" (the paper: a per-layer (N, N) parameter `bunch_decoder.layers.{l}.adj`
            initialised to that matrix).
        backbone_kwargs: extra arguments for timm.create_model (e.g. a smaller Swin for experiments).

    forward(x (B, 3, H, W), ImageNet-normalised) returns (score (B, 1), aux (), z ()); the state dict
    has exactly the authors' keys, so official checkpoints load strictly.
    """

    def __init__(
        self,
        num_experts: int = 8,
        top_k: int = 2,
        depth: int = 4,
        num_queries: int = 6,
        embed_dim: int = 384,
        num_heads: int = 6,
        backbone: str = "swin_base_patch4_window7_224",
        pretrained=False,
        impl: str | None = "auto",
        backbone_kwargs: dict | None = None,
        adjacency: str = "fixed",
    ):
        super().__init__()
        if impl is not None:
            _check_impl(impl)
        for name, value in (("num_experts", num_experts), ("top_k", top_k), ("depth", depth),
                            ("num_queries", num_queries), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not is_int(value) or value < 1:
                raise ValueError(f"lifeiqa_fast.LifeIQA: {name} must be a positive int, got {value!r}")
        # num_experts=1 has no router (an MLP): top_k is unused there, and the authors' configs keep their
        # default 2 beside it
        if top_k > max(num_experts, 2):
            raise ValueError(f"lifeiqa_fast.LifeIQA: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"lifeiqa_fast.LifeIQA: embed_dim must be divisible by num_heads and 4, "
                             f"got embed_dim={embed_dim}, num_heads={num_heads}")
        if adjacency not in ("fixed", "learnable"):
            raise ValueError(f"lifeiqa_fast.LifeIQA: adjacency must be 'fixed' or 'learnable', got {adjacency!r}")
        self.config = dict(num_experts=num_experts, top_k=top_k, depth=depth, num_queries=num_queries,
                           embed_dim=embed_dim, num_heads=num_heads, backbone=backbone,
                           backbone_kwargs=dict(backbone_kwargs or {}), adjacency=adjacency)
        self.bunch_embedding = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        nn.init.trunc_normal_(self.bunch_embedding, std=0.02)
        self.gamma = nn.Parameter(torch.tensor(0.1))

        self.pretrain_model = _create_backbone(backbone, pretrained, self.config["backbone_kwargs"])
        stages, self.nhwc_stages = _backbone_stages(self.pretrain_model, backbone)
        self.backbone_stages = nn.ModuleList(stages)
        if not self.nhwc_stages:  # oneDNN and cuDNN convolutions run faster in NHWC
            self.pretrain_model.to(memory_format=torch.channels_last)
        stage_channels = [info["num_chs"] for info in self.pretrain_model.feature_info][-2:]

        self.UPP_layer3 = GridPool(7, impl)
        self.proj_layer3 = nn.Linear(stage_channels[0], embed_dim)
        self.proj_layer4 = nn.Conv2d(stage_channels[1], embed_dim, kernel_size=1)
        self.bunch_decoder = Decoder(depth, embed_dim, num_heads, num_queries, adjacency == "learnable", impl)
        self.MOE = MLP(embed_dim) if num_experts == 1 else SparseMoE(embed_dim, num_experts, top_k, impl)
        self.norm3 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.dropout3 = nn.Dropout(0.1)
        self.fc = nn.Linear(embed_dim, 1)
        self.impl = impl

    def save_pretrained(self, directory, dataset: str | None = None):
        """lifeiqa_fast.pretrained.save_pretrained(self, directory, dataset)."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, dataset)

    @classmethod
    def from_pretrained(cls, name_or_dir, **kwargs) -> LifeIQA:
        """lifeiqa_fast.pretrained.from_pretrained(name_or_dir, **kwargs): a local folder or Hub repo id."""
        from .pretrained import from_pretrained

        return from_pretrained(name_or_dir, **kwargs)


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(cls: type) -> type:
    """The class optimize() gives a model of class cls: Fast<cls>, a subclass of FusedForward and cls."""
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (FusedForward, cls), {"__module__": cls.__module__})
    return _FAST_CLASSES[cls]


def _new_fast(cls: type):
    """Unpickling an optimised model: an empty instance of _fast_class(cls), which pickle cannot find by
    name (it is made at run time); its state is set by pickle afterwards."""
    return object.__new__(_fast_class(cls))

