"""optimize(): a model of the authors' classes (or a LifeIQA) switched to lifeiqa_fast's fused head, in
place: its head modules take this package's classes, its parameters stay the same objects."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import reference
from .model import MLP, Decoder, DecoderLayer, FusedForward, GridPool, SparseMoE, _fast_class
from .ops._impl import _check_impl


# The attributes optimize() reads, as the authors' Life_models has them (docs/model.md).
_LAYOUT = ("backbone_stages", "bunch_embedding", "proj_layer3", "proj_layer4", "UPP_layer3", "bunch_decoder.layers",
           "norm3", "gamma", "dropout3", "fc", "MOE")
_LAYER_LAYOUT = ("GCN.gcn1.weight", "GCN.gcn1.bias", "GCN.gcn2.weight", "GCN.gcn2.bias", "GCN.gcn3.weight",
                 "GCN.gcn3.bias", "norm2.weight", "norm2.bias", "multihead_attn.in_proj_weight",
                 "multihead_attn.in_proj_bias", "multihead_attn.out_proj.weight", "multihead_attn.out_proj.bias")
_MOE_LAYOUT = ("router.linear.weight", "router.linear.bias", "experts")


def _missing(module, paths) -> list[str]:
    missing = []
    for path in paths:
        obj = module
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is None:
            missing.append(path)
    return missing


def _layer_graph(layer: nn.Module, where: str, num_queries: int) -> Tensor | None:
    """The graph a decoder layer's GCN multiplies by, read from what the layer holds: None for the fixed
    graph D^-1/2 (J + I) D^-1/2, else an (N, N) tensor.

    - `adj` an nn.Parameter: lifeiqa_fast's learnable variant, used as it is.
    - `adj_norm` a plain tensor: the authors' layer, whose forward uses adj_norm (their `adj` is the
      unnormalised all-ones J, which their forward never multiplies by). The fixed graph when it equals
      it to float rounding (their normalize_adj in float32), else used as given.
    - neither: the fixed graph. A plain `adj` tensor without `adj_norm` is ambiguous (normalised or not?)
      and refused.
    """
    adj = getattr(layer, "adj", None)
    if isinstance(adj, nn.Parameter):
        return adj
    graph = getattr(layer, "adj_norm", None)
    if graph is None:
        if adj is not None:
            raise ValueError(f"lifeiqa_fast.optimize: {where}.adj is a tensor but not a parameter and there is no "
                             f"{where}.adj_norm: cannot tell which graph the layer's forward uses")
        return None
    if not isinstance(graph, Tensor) or tuple(graph.shape) != (num_queries, num_queries):
        shape = tuple(graph.shape) if isinstance(graph, Tensor) else type(graph).__name__
        raise ValueError(f"lifeiqa_fast.optimize: {where}.adj_norm must be an (N, N) = {(num_queries, num_queries)} "
                         f"tensor (N: bunch_embedding's queries), got {shape}")
    fixed = reference.fixed_adjacency(num_queries, torch.float64)
    if torch.allclose(graph.detach().to("cpu", torch.float64), fixed, rtol=0, atol=1e-6):
        return None
    return graph.detach()


def _unsupported(model: nn.Module) -> list[str]:
    """Settings of an authors'-layout model that its own forward honours and FusedForward does not (the
    authors' configuration has none of them): optimize() refuses them instead of computing something else."""
    found = []
    if getattr(model.bunch_decoder, "norm", None) is not None:
        found.append("bunch_decoder.norm is set (the fused decoder ends without a norm, as the authors' does)")
    conv = model.proj_layer4
    if isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != (
            (1, 1), (1, 1), (0, 0), (1, 1), 1):
        found.append("proj_layer4 is not a plain 1x1 convolution")
    for i, layer in enumerate(model.bunch_decoder.layers):
        where, attn = f"bunch_decoder.layers.{i}", layer.multihead_attn
        for name in ("dropout1", "dropout2"):
            p = getattr(getattr(layer, name, None), "p", 0.0)
            if p:
                found.append(f"{where}.{name}.p = {p} (the fused decoder layer has no dropout; the authors' is 0)")
        if getattr(attn, "dropout", 0.0):
            found.append(f"{where}.multihead_attn.dropout = {attn.dropout} (attention dropout must be 0)")
        if not getattr(attn, "batch_first", True):
            found.append(f"{where}.multihead_attn.batch_first is False (the decoder's tokens are batch first)")
        if (getattr(attn, "bias_k", None) is not None or getattr(attn, "bias_v", None) is not None
                or getattr(attn, "add_zero_attn", False)):
            found.append(f"{where}.multihead_attn has bias_k/bias_v or add_zero_attn")
    moe = model.MOE
    if hasattr(moe, "net"):
        act = moe.net[1] if len(moe.net) == 4 else None
        if not (isinstance(act, nn.GELU) and act.approximate == "none" and isinstance(moe.net[3], nn.Dropout)):
            found.append("MOE.net is not Linear -> GELU -> Linear -> Dropout")
        return found
    experts = len(moe.experts)
    if getattr(moe, "n_exp", experts) != experts:
        found.append(f"MOE.n_exp = {moe.n_exp} but MOE.experts has {experts} experts")
    top_k = _moe_top_k(moe)
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        found.append(f"MOE.router.top_k must be an int in [1, {experts}], got {top_k!r}")
    for e, expert in enumerate(moe.experts):
        net = getattr(expert, "net", None)
        if not (isinstance(net, nn.Sequential) and len(net) == 4 and isinstance(net[0], nn.Linear)
                and isinstance(net[1], nn.ReLU) and isinstance(net[2], nn.Dropout) and isinstance(net[3], nn.Linear)):
            found.append(f"MOE.experts.{e}.net is not Linear -> ReLU -> Dropout -> Linear")
        elif net[2].p != moe.experts[0].net[2].p:
            found.append(f"MOE.experts.{e}.net.2.p = {net[2].p} differs from expert 0's {moe.experts[0].net[2].p}")
    return found


def _moe_top_k(moe: nn.Module):
    """The k the MoE routes with: the authors' forward takes its router's top_k (their SparseMoE also
    stores a top_k of its own, which it never reads); ours has only MOE.top_k."""
    router_k = getattr(moe.router, "top_k", None)
    return router_k if router_k is not None else getattr(moe, "top_k", None)


def _retype(module: nn.Module, cls: type, *settings) -> None:
    """Give module the class cls in place (its parameters, buffers and children stay the same objects),
    then set what cls.__init__ sets beside them, by the method __init__ calls for it (cls._init_state,
    given settings), so that a conversion cannot miss an attribute that __init__ sets."""
    module.__class__ = cls
    init_state = getattr(cls, "_init_state", None)
    if init_state is not None:
        init_state(module, *settings)


def _set_graph(layer: nn.Module, graph: Tensor | None) -> None:
    """Make graph the layer's `adj`, which DecoderLayer.forward reads: a parameter stays as it is; a
    plain tensor (the authors' edited adj_norm) becomes a buffer outside the state dict, so that it
    follows .to() and .half() with the model; None (the fixed graph) replaces the authors' all-ones J."""
    if isinstance(graph, nn.Parameter):
        return
    if "adj" in layer.__dict__:
        del layer.__dict__["adj"]
    if graph is None:
        layer.adj = None
    else:
        weight = layer.norm2.weight
        layer.register_buffer("adj", graph.to(weight.device, weight.dtype).clone(), persistent=False)


def optimize(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Switch a Life-IQA model's head to lifeiqa_fast's fused ops, in place, and return it.

    model: a LifeIQA, or any module with the authors' attribute layout (their Life_models: the
    attributes backbone_stages, bunch_embedding, proj_layer3, proj_layer4, UPP_layer3,
    bunch_decoder.layers[i].{GCN.gcn1..3, norm2, multihead_attn}, MOE.{router.linear, router.top_k,
    experts} (or MOE.net for one expert), norm3, gamma, dropout3, fc); the authors' package need not
    be installed. Every parameter stays the same object under the same state-dict key; only the
    classes of the model and of its head modules change (the model's becomes a subclass of its own,
    so isinstance checks still hold), and the forward pass becomes FusedForward's: the same outputs,
    to float rounding, and the same gradients.

    What the authors' modules hold outside their state dict is read, not assumed: each decoder layer's
    graph from its adj_norm (the fixed graph when it is that, else the tensor as given; their
    unnormalised all-ones `adj` is replaced by it), the routing k from MOE.router.top_k, the UPP grid
    from UPP_layer3.pool_size, the expert dropout and LayerNorm eps from their modules. Settings that
    the authors' forward would honour and the fused head cannot (decoder dropout, a final decoder norm,
    attention bias_k, ...) raise a ValueError naming them. impl: as LifeIQA's ("reference" computes the
    authors' way again). On an optimised model it only sets impl.
    """
    if impl is not None:
        _check_impl(impl)
    if not isinstance(model, nn.Module):
        raise TypeError(f"lifeiqa_fast.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model, FusedForward):
        missing = _missing(model, _LAYOUT)
        layers = getattr(getattr(model, "bunch_decoder", None), "layers", None) or []
        missing += [f"bunch_decoder.layers.{i}.{p}" for i, layer in enumerate(layers)
                    for p in _missing(layer, _LAYER_LAYOUT)]
        moe = getattr(model, "MOE", None)
        if moe is not None and not hasattr(moe, "net"):
            missing += [f"MOE.{p}" for p in _missing(moe, _MOE_LAYOUT)]
        if missing:
            raise ValueError(f"lifeiqa_fast.optimize: {type(model).__name__} does not have the authors' Life-IQA "
                             f"layout; missing: {', '.join(missing)}")
        unsupported = _unsupported(model)
        if unsupported:
            raise ValueError(f"lifeiqa_fast.optimize: {type(model).__name__} computes what the fused head cannot: "
                             + "; ".join(unsupported))
        num_queries = model.bunch_embedding.shape[-2]
        graphs = [_layer_graph(layer, f"bunch_decoder.layers.{i}", num_queries)
                  for i, layer in enumerate(model.bunch_decoder.layers)]
        _retype(model.UPP_layer3, GridPool, getattr(model.UPP_layer3, "pool_size", 7))
        for layer, graph in zip(model.bunch_decoder.layers, graphs):
            _retype(layer, DecoderLayer)
            _set_graph(layer, graph)
        _retype(model.bunch_decoder, Decoder)
        if hasattr(moe, "net"):
            _retype(moe, MLP)
        else:
            _retype(moe, SparseMoE, _moe_top_k(moe))
        model.__class__ = _fast_class(type(model))
    model.impl = impl
    return model
