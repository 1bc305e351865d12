#!/usr/bin/env python
"""The project's benchmark: each op family, the head and the whole model against the authors' eager
code and torch.compile of it (README.md, "Benchmarks", says what is measured and how).

For every entry of CASES (one per op family, plus "head": LifeIQA.forward_head on stage maps,
"model": LifeIQA.forward on images, "scorer" and "onnx": scores of crops in [0, 1], the latter by the
model exported to ONNX and run in ONNX Runtime) and every device, dtype, batch and direction,
bench_row runs the authors' code (eager; head and model: LifeIQA(impl="reference") in eval mode),
checks every other implementation against it (compare), then times those that passed round-robin
(measure) and reports ms median [p20-p80], speed-ups vs eager and vs torch.compile, GB/s, GFLOP/s
and the fraction of the device's limits measured in the same run. --backward adds forward+backward
rows.

    python benchmarks/run.py                              # the main rows, fp32: a few minutes on 2 CPU cores
    python benchmarks/run.py --quick                      # CI-sized
    python benchmarks/run.py --full --save benchmarks/results    # everything; DATE-DEVICES.{md,json,csv,png}
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import unittest.mock
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm import tqdm  # a dependency of timm's

import lifeiqa_fast
from lifeiqa_fast.model import Decoder
from lifeiqa_fast.ops import cross_attention, gcn, grid_pool
from lifeiqa_fast.ops.moe import moe_composite, moe_triton
from lifeiqa_fast.ops._impl import choose, triton_interpreted
from lifeiqa_fast.reference import cross_attention_ref, fixed_adjacency, gcn_ref, grid_pool_ref, moe_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
BASELINES = ("eager", "compile")
MIN_SAMPLES = 5


def _gcn_flop(x, adj, w1, b1, w2, b2, w3, b3, *_):
    # per layer: the (in, out) product, then the propagation: the fixed graph in closed form (a mean over
    # the N tokens and an add: ~2 per element), a given (N, N) graph as a product
    B, N, _ = x.shape
    return sum(2 * B * N * w.shape[0] * w.shape[1] + (2 * B * N * w.shape[1] if adj is None else 2 * B * N * N * w.shape[1])
               for w in (w1, w2, w3))


def _cross_attention_flop(x, kv, *_):
    # the query and output projections, the scores and the weighted values; LayerNorm and softmax not counted
    B, Nq, D = x.shape
    return 4 * B * Nq * D * D + 4 * B * Nq * kv.shape[1] * D


def _attend_memory_flop(x, memory, norm_weight, norm_bias, in_proj_weight, in_proj_bias, out_weight, out_bias,
                        num_heads, *_):
    # per query row: the q, q W_k, W_v and out products (D x D each) and per head the scores and P M (Nk x D)
    B, Nq, D = x.shape
    return 2 * B * Nq * (4 * D * D + 2 * num_heads * memory.shape[1] * D)


def _decoder_memory_flop(x, memory, adj, weights, num_heads, *_):
    # each layer's gcn then attend_memory (12 weights per layer: csrc/library.cpp)
    return sum(_gcn_flop(x, adj[layer], *weights[12 * layer:12 * layer + 6])
               + _attend_memory_flop(x, memory, *weights[12 * layer + 6:12 * layer + 12], num_heads)
               for layer in range(len(adj)))


def _moe_flop(x, router_weight, router_bias, w1, b1, w2, b2, top_k, dropout_mask=None, dense=False, *_):
    # the router, then each token through its top_k experts (every expert when dense): two products each
    T, D = x.shape
    E, F = w1.shape[:2]
    return 2 * T * D * E + (E if dense else top_k) * T * 4 * D * F


# FLOP of our custom ops (the matmuls they execute, as flop_registry counts ATen's), so that an
# implementation's executed FLOP is counted, not eager's: the backward ops do about twice the forward's
# products (the input and the weight gradients), the attention's four products instead of two.
OUR_OP_FLOP = {
    "grid_pool": lambda x, grid: x.numel() + x.shape[0] * grid * grid * x.shape[-1],
    "grid_pool_triton": lambda x, grid: x.numel() + x.shape[0] * grid * grid * x.shape[-1],
    "grid_pool_backward": lambda grad, height, width, grid: grad.shape[0] * height * width * grad.shape[-1],
    "grid_pool_triton_backward": lambda grad, height, width, grid: grad.shape[0] * height * width * grad.shape[-1],
    "gcn": _gcn_flop, "gcn_triton": _gcn_flop,
    "cross_attention": _cross_attention_flop, "cross_attention_triton": _cross_attention_flop,
    "cross_attention_backward": lambda grad, x, kv, *_: 2 * _cross_attention_flop(x, kv) + 4 * x.shape[0] * x.shape[1]
    * kv.shape[1] * x.shape[2],
    "attend_memory": _attend_memory_flop, "decoder_memory": _decoder_memory_flop,
    "moe": _moe_flop, "moe_triton": _moe_flop,
    "moe_backward": lambda grad, grad_aux, grad_z, x, router_weight, w1, w2, dropout_mask, logits, indices, *_: 2
    * _moe_flop(x, router_weight, None, w1, None, w2, None, indices.shape[-1]),
}


class FlopCount(TorchDispatchMode):
    """FLOP of the matmuls and convolutions run inside, by torch.utils.flop_counter's formulas (its
    FlopCounterMode also tracks modules with hooks that autograd.grad on leaves does not support), and
    of lifeiqa_fast's own ops by OUR_OP_FLOP."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in flop_registry:
            self.total += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
        elif func.overloadpacket is torch.ops.aten.linear:  # under inference_mode (the Scorer) it is not decomposed
            self.total += 2 * args[0].numel() * args[1].shape[0]
        elif func.namespace == "lifeiqa_fast" and func._opname in OUR_OP_FLOP:
            self.total += OUR_OP_FLOP[func._opname](*args, **(kwargs or {}))
        return out


def _executed_flop(name: str, rows: dict, run: Callable[[], object]) -> float | None:
    """The FLOP implementation `name` executes: counted on a call of run (the matmuls and our ops), or
    for a compiled or graphed implementation (which cannot run under a dispatch mode) those of the one it
    compiles ("composite-compile": "composite"); None where nothing is counted (an op family whose work is
    adds, as grid_pool's composite: the case's own count stands)."""
    base = name.split("-compile")[0].split("-graph")[0]
    if base != name:
        return rows.get(base, {}).get("flop")
    with FlopCount() as executed:
        run()
    return executed.total or None


class Unavailable(Exception):
    """An implementation that cannot run on this device: reported as the row's status, not timed."""


def _counted_cost(args, outs, params, backward, counted) -> tuple[float, float]:
    """(FLOP counted on the eager call, bytes): the authors' FLOP, so an implementation that skips some
    (the head projecting after pooling) may pass 100% of the GEMM limit. Bytes, a rough figure: inputs,
    outputs and weights once; forward+backward also reads the output gradient, reads inputs and
    weights again and writes their gradients."""
    in_bytes, out_bytes, weight_bytes = (sum(t.numel() * t.element_size() for t in ts) for ts in (args, outs, params))
    if backward:
        return counted, 3 * (in_bytes + weight_bytes) + 2 * out_bytes
    return counted, in_bytes + out_bytes + weight_bytes


@dataclass(frozen=True)
class Case:
    """One op family (or the head, or the model): inputs, implementations, cost and tolerances."""

    op: str
    make_inputs: Callable[[int, torch.dtype, torch.device], tuple]  # (batch, dtype, device) -> args
    # (impl, device, dtype) -> (fn, params): fn(*args) -> a tensor or a tuple of tensors; params, the
    # parameters that backward differentiates besides the inputs. impl "eager" is the authors' code;
    # raises Unavailable when the impl cannot run there.
    build: Callable[[str, torch.device, torch.dtype], tuple[Callable, tuple]]
    impls: tuple[str, ...]  # ours, besides eager and compile
    tolerance: dict[torch.dtype, float]  # allowed max_err, see compare()
    batches: dict[str, tuple[int, ...]]  # per device type
    quick: tuple[int, ...]  # batches for --quick
    default: tuple[int, ...]  # batches of a run without --quick or --full (fp32 only)
    # (outputs) -> the gradient of each output in backward rows; made once per row, shared by all impls
    grad_outputs: Callable[[tuple], tuple] = lambda outs: tuple(torch.randn_like(o) for o in outs)
    # (args, outputs, params, backward, FlopCount of the eager call) -> (FLOP, bytes)
    cost: Callable[..., tuple[float, float]] = _counted_cost
    dtypes: tuple[str, ...] | None = None  # the row dtypes, if not DEFAULT_DTYPES
    backward: bool = True  # whether --backward adds forward+backward rows
    per_item: str | None = None  # the unit of the batch, for a throughput column ("img")


def _check_timeable(op: str, impl: str, device: torch.device) -> None:
    """Raises Unavailable, saying why, if `impl` of `op` cannot run (or is not worth timing) on device."""
    if impl == "triton" and device.type == "cpu":
        # Triton on CPU tensors runs only interpreted, orders of magnitude too slow to be worth timing.
        raise Unavailable("n/a (interpreted: too slow to time)" if triton_interpreted() else
                          "n/a (CPU needs TRITON_INTERPRET)")
    try:
        choose(op, device.type, impl)
    except RuntimeError as exc:
        raise Unavailable(f"unavailable: {exc}") from None


def _stage_maps(batch: int, dtype: torch.dtype, device: torch.device, stages=(3, 4)) -> tuple:
    """Swin-B's stage 3 and 4 maps at 224, NHWC as timm emits them."""
    shapes = {3: (batch, 14, 14, 512), 4: (batch, 7, 7, 1024)}
    return tuple(torch.randn(shapes[s], dtype=dtype, device=device) for s in stages)


GRID = 7  # Life-IQA pools the stage-3 map onto a 7 x 7 grid


def _grid_pool_build(impl: str, device: torch.device, dtype: torch.dtype):
    if impl == "eager":
        # The authors permute + copy the NHWC map to NCHW, then slice 49 bins with .item()-driven edges.
        return (lambda x: grid_pool_ref(x.permute(0, 3, 1, 2).contiguous(), GRID)), ()
    _check_timeable("grid_pool", impl, device)
    return (lambda x: grid_pool(x, GRID, impl=impl)), ()


def _grid_pool_cost(args, outs, params, backward, counted):
    # Forward: one add per input element and one divide per output; reads x, writes out.
    # Backward: one divide per input gradient; reads grad (out-sized), writes dx (x-sized).
    # The minimum any implementation must do: eager's extra permute copy is not counted.
    (x,), (out,) = args, outs
    flop = elems = x.numel() + out.numel()
    if backward:
        flop, elems = flop + x.numel(), elems + out.numel() + x.numel()
    return flop, elems * x.element_size()


QUERIES = 6  # Life-IQA's N query tokens


def _gcn_inputs(batch: int, dtype: torch.dtype, device: torch.device, dim=384) -> tuple:
    """One decoder layer's GCN: x (B, 6, 384), then w1 (384, 192), b1, w2 (192, 96), b2, w3 (96, 384), b3."""
    sizes = (dim, dim // 2, dim // 4, dim)
    weights = [t for i, o in zip(sizes, sizes[1:]) for t in (torch.randn(i, o) * i**-0.5, torch.randn(o) * 0.1)]
    return tuple(t.to(device, dtype) for t in (torch.randn(batch, QUERIES, dim), *weights))


def _gcn_build(impl: str, device: torch.device, dtype: torch.dtype):
    if impl == "eager":  # the dense fixed graph (J + I) / (N + 1), made once, applied with bmm as the authors do
        adj = fixed_adjacency(QUERIES, dtype, device)
        return (lambda x, *weights: gcn_ref(x, adj, *weights)), ()
    _check_timeable("gcn", impl, device)
    return (lambda x, *weights: gcn(x, None, *weights, impl=impl)), ()  # None: the same graph, in closed form


DIM, HEADS, MEMORY, DEPTH = 384, 6, GRID * GRID, 4  # Life-IQA's decoder: D, heads, Nk, layers


def _attention_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """One decoder layer's attention: x (B, 6, 384), kv (B, 49, 2, 384), then the LayerNorm, q and out
    projection parameters."""
    d = DIM
    params = (1 + 0.1 * torch.randn(d), 0.1 * torch.randn(d), torch.randn(d, d) * d**-0.5, 0.1 * torch.randn(d),
              torch.randn(d, d) * d**-0.5, 0.1 * torch.randn(d))
    return tuple(t.to(device, dtype) for t in (torch.randn(batch, QUERIES, d), torch.randn(batch, MEMORY, 2, d),
                                                  *params))


def _attention_build(impl: str, device: torch.device, dtype: torch.dtype):
    if impl == "eager":  # what nn.MultiheadAttention runs after its input projection
        return (lambda x, kv, *params: cross_attention_ref(x, kv, *params, HEADS)), ()
    _check_timeable("cross_attention", impl, device)
    return (lambda x, kv, *params: cross_attention(x, kv, *params, HEADS, impl=impl)), ()


def _decoder_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """The decoder's inputs: the query tokens x (B, 6, 384) and the memory (B, 49, 384)."""
    return tuple(torch.randn(shape, dtype=dtype, device=device) for shape in ((batch, QUERIES, DIM),
                                                                              (batch, MEMORY, DIM)))


# Our decoder stacks by label: LifeIQA's Decoder arguments, one row per strategy (the model takes the
# one lifeiqa_fast.model.DECODER_STRATEGY gives its device): "-kv", the single K/V GEMM then the
# fused cross_attention op; "-memory", ops.attend_memory.
DECODER_IMPLS = {"native-memory": dict(impl="native", strategy="memory"),
                 "native-kv": dict(impl="native", strategy="kv"), "triton-kv": dict(impl="triton", strategy="kv")}


@functools.lru_cache(maxsize=None)
def _decoder(impl: str, device: torch.device, dtype: torch.dtype) -> Decoder:
    """Life-IQA's decoder stack, all impls with one state dict; eager is the authors' (impl="reference":
    per layer the GCN with a dense graph, LayerNorm and MultiheadAttention's own K/V projection)."""
    torch.manual_seed(0)
    kwargs = dict(impl="reference") if impl == "eager" else DECODER_IMPLS[impl]
    return Decoder(DEPTH, DIM, HEADS, QUERIES, learnable=False, **kwargs).to(device, dtype).eval()


def _decoder_build(impl: str, device: torch.device, dtype: torch.dtype):
    if impl != "eager":
        for op in ("gcn", "cross_attention"):
            _check_timeable(op, DECODER_IMPLS[impl]["impl"], device)
    decoder = _decoder(impl, device, dtype)
    return decoder, tuple(decoder.parameters())


EXPERTS, TOP_K = 8, 2  # Life-IQA's default mixture: 8 experts of 384 -> 1536 -> 384, top-2


def _moe_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """The MoE of a batch: its 6 B tokens x (6 B, 384), the router (8, 384), (8,) and the experts
    stacked as nn.Linear stores them: w1 (8, 1536, 384), b1 (8, 1536), w2 (8, 384, 1536), b2 (8, 384)."""
    e, d, f = EXPERTS, DIM, 4 * DIM
    weights = (torch.randn(e, d) * d**-0.5, 0.1 * torch.randn(e), torch.randn(e, f, d) * d**-0.5,
               0.1 * torch.randn(e, f), torch.randn(e, d, f) * f**-0.5, 0.1 * torch.randn(e, d))
    return tuple(t.to(device, dtype) for t in (torch.randn(QUERIES * batch, d), *weights))


MOE_IMPLS = {"composite": ("composite", True), "native-grouped": ("native", False), "native-dense": ("native", True),
             "triton-grouped": ("triton", False), "triton-dense": ("triton", True)}  # label: (impl, dense)


def _moe_build(impl: str, device: torch.device, dtype: torch.dtype):
    if impl == "eager":  # the authors' module: a masked loop over the experts, a host sync per expert
        return (lambda x, *weights: moe_ref(x, *weights, TOP_K)), ()
    which, dense = MOE_IMPLS[impl]
    _check_timeable("moe", which, device)
    if which == "composite":
        return (lambda x, *weights: moe_composite(x, *weights, TOP_K)), ()
    op = torch.ops.lifeiqa_fast.moe if which == "native" else moe_triton
    return (lambda x, *weights: op(x, *weights, TOP_K, None, dense)[:3]), ()


# The model of the head and model rows: the default Swin-B backbone (random weights) and head.
# MODEL_IMPLS: our implementations of it by label, as LifeIQA arguments (an impl="auto" LifeIQA is
# what lifeiqa_fast.optimize makes of the authors' model); eager is impl="reference".
MODEL_CONFIG = dict(num_experts=8, top_k=2, depth=4)
MODEL_IMPLS = {"optimized": dict(impl="auto"), "composite": dict(impl="composite"),
               "composite-compile": dict(impl="composite"), "composite-graph": dict(impl="composite")}
# "-compile": torch.compile(fullgraph=True) of it; "-graph": replayed as a CUDA graph (CUDA, forward rows)


@functools.lru_cache(maxsize=None)
def _lifeiqa(impl: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """LifeIQA in eval mode for "eager" or a MODEL_IMPLS label; all share one state dict, made once."""
    if (device.type, dtype) != ("cpu", torch.float32):
        return copy.deepcopy(_lifeiqa(impl, torch.device("cpu"), torch.float32)).to(device, dtype)
    if impl == "eager":
        torch.manual_seed(0)
        return lifeiqa_fast.LifeIQA(**MODEL_CONFIG, impl="reference").eval()
    model = lifeiqa_fast.LifeIQA(**MODEL_CONFIG, **MODEL_IMPLS[impl]).eval()
    model.load_state_dict(_lifeiqa("eager", device, dtype).state_dict())
    return model


def _lifeiqa_build(impl, device, dtype, head: bool):
    """forward_head and the head's parameters, or the model and all of them."""
    if impl.endswith("-graph") and device.type != "cuda":
        raise Unavailable("n/a (CUDA graphs: CUDA only)")
    model = _lifeiqa(impl, device, dtype)
    backbone = {id(p) for p in model.pretrain_model.parameters()} if head else set()
    fn = model.forward_head if head else model
    if impl.endswith("-compile"):
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    elif impl.endswith("-graph"):
        fn = _graphed(fn)
    return fn, tuple(p for p in model.parameters() if id(p) not in backbone)


def _graphed(fn):
    """fn replayed as a CUDA graph (lifeiqa_fast.scorer.CudaGraph), one per set of input shapes; forward
    rows only (a replay records no autograd)."""
    graphs = {}

    def run(*args):
        if torch.is_grad_enabled():
            raise Unavailable("n/a (forward only: a CUDA graph replay records no autograd)")
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in graphs:
            graphs[key] = lifeiqa_fast.scorer.CudaGraph(fn, *args)
        return graphs[key](*args)

    return run


# The scorer rows: images in [0, 1] to one score each, by the authors' model in fp32 (eager, and
# torch.compile of it) and by lifeiqa_fast.Scorer in each precision, whatever the row's dtype (the
# dtype of the images): the question they answer is how much faster than the official fp32 model a
# Scorer is, and how far its scores are from it (max err). On CUDA the official model under fp16
# autocast is a baseline too (the usual way to run it fast there).
SCORER_IMPLS = {"scorer-fp32": dict(dtype="fp32"), "scorer-bf16": dict(dtype="bf16"),
                "scorer-bf16-compiled": dict(dtype="bf16", compile=True), "scorer-fp16": dict(dtype="fp16"),
                "autocast-fp16": None}


def _scorer_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (torch.rand(batch, 3, 224, 224, device=device, dtype=dtype),)


def _scorer_build(impl: str, device: torch.device, dtype: torch.dtype):
    """(images in [0, 1] (B, 3, 224, 224) -> scores (B, 1)), no parameters (forward rows only)."""
    official = _lifeiqa("eager", device, torch.float32)
    mean = torch.tensor(lifeiqa_fast.scorer.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(lifeiqa_fast.scorer.STD, device=device).view(1, 3, 1, 1)
    if impl == "eager" or impl == "autocast-fp16":
        if impl == "autocast-fp16" and device.type != "cuda":
            raise Unavailable("n/a (CUDA only)")

        def run(x):
            with torch.autocast(device.type, torch.float16, enabled=impl == "autocast-fp16"):
                return official((x.float() - mean) / std)[0].float()

        return run, ()
    kwargs = SCORER_IMPLS[impl]
    if kwargs["dtype"] == "fp16" and device.type != "cuda" or kwargs.get("compile") and device.type == "cuda":
        raise Unavailable("n/a (fp16 is for CUDA; on CUDA the Scorer replays CUDA graphs instead)")
    scorers = {}  # per batch size, made on the first (untimed, checked) call: batch_size = the row's batch

    def run(x):
        if x.shape[0] not in scorers:
            scorers[x.shape[0]] = lifeiqa_fast.Scorer(official, device=device, batch_size=x.shape[0], resize=None, **kwargs)
        return scorers[x.shape[0]](x).view(-1, 1).to(device)

    return run, ()


# The onnx rows: the model of the model rows exported by lifeiqa_fast.export_onnx (a dynamic batch,
# the composite head) and run by ONNX Runtime on the CPU, beside the authors' model (eager) and the
# optimised model that lifeiqa_fast.Scorer runs (impl="auto"), on the same crops in [0, 1], fp32: the
# PyTorch rows normalise them as the Scorer does, the file normalises inside. ONNX Runtime is given
# torch's thread count, so that both use the same cores. max err: against eager's scores.
ONNX_IMPLS = ("optimized", "onnxruntime")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # pyproject.toml's [onnx] extra


@functools.lru_cache(maxsize=None)
def _onnx_session():
    """An ONNX Runtime CPU session of the model rows' model, exported once per run; the file is removed
    once loaded (the weights are inside it, and the session holds them)."""
    from lifeiqa_fast.export import onnx_session

    with tempfile.TemporaryDirectory() as folder:
        model = _lifeiqa("eager", torch.device("cpu"), torch.float32)
        path = lifeiqa_fast.export_onnx(model, pathlib.Path(folder) / "lifeiqa.onnx")
        return onnx_session(path, threads=torch.get_num_threads())


def _onnx_build(impl: str, device: torch.device, dtype: torch.dtype):
    """(crops in [0, 1] (B, 3, 224, 224) -> scores (B,)), no parameters (forward rows only)."""
    if impl == "onnxruntime":
        missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
        if missing:
            raise Unavailable(f"n/a ({', '.join(missing)} not installed: pip install --no-build-isolation -e "
                              f"\".[onnx]\")")
        if device.type != "cpu":
            raise Unavailable("n/a (ONNX Runtime's CPU provider: CPU rows only)")
        from lifeiqa_fast.export import onnx_scores

        session = _onnx_session()
        return (lambda x: torch.from_numpy(onnx_scores(session, x))), ()
    model = _lifeiqa("eager" if impl == "eager" else "optimized", device, torch.float32)
    mean = torch.tensor(lifeiqa_fast.scorer.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(lifeiqa_fast.scorer.STD, device=device).view(1, 3, 1, 1)
    return (lambda x: model((x.float() - mean) / std)[0].view(-1)), ()


def _loss_gradients(outs):
    # (score, aux, z) -> d(score.sum() + 0.01 * aux + 0.001 * z) / d(each): the authors' training loss
    score, aux, z = outs
    return torch.ones_like(score), torch.full_like(aux, 0.01), torch.full_like(z, 0.001)


# Tolerances of max_err (see compare()). grid_pool: fp32 differs from eager only by summation order;
# fp16/bf16 means are rounded to 11/8 bits, and eager and the kernels may round intermediate sums
# differently. gcn, cross_attention, decoder, head, model: fp32 sums in another order (the graph in
# closed form, projecting after pooling, attending to the memory) through three layers or four
# decoder layers (seen: 1e-6 for gcn, 3e-6 for the head's scores and gradients). In bf16 a weight
# gradient summed over tokens in another order may be off by a few % of its largest element (seen:
# 3.5% for torch.compile's head, at batch 1).
GRID_POOL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
GCN_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
ATTENTION_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

OP_BATCHES = {"cpu": (1, 8, 32, 64), "cuda": (1, 8, 32, 64, 256)}  # 32: the project's targets are quoted there

CASES = {case.op: case for case in (
    Case("grid_pool", functools.partial(_stage_maps, stages=(3,)), _grid_pool_build, ("composite", "native", "triton"),
         GRID_POOL_TOLERANCE, OP_BATCHES, quick=(1, 32), default=(1, 32), cost=_grid_pool_cost),
    Case("gcn", _gcn_inputs, _gcn_build, ("native", "triton"), GCN_TOLERANCE, OP_BATCHES, quick=(1, 32),
         default=(1, 32)),
    Case("cross_attention", _attention_inputs, _attention_build, ("native", "triton"), ATTENTION_TOLERANCE,
         OP_BATCHES, quick=(1, 32), default=(1, 32)),
    Case("decoder", _decoder_inputs, _decoder_build, tuple(DECODER_IMPLS), MODEL_TOLERANCE, OP_BATCHES,
         quick=(1, 32), default=(1, 32)),
    Case("moe", _moe_inputs, _moe_build, tuple(MOE_IMPLS), MODEL_TOLERANCE, OP_BATCHES, quick=(1, 32),
         default=(1, 32)),
    Case("head", _stage_maps, functools.partial(_lifeiqa_build, head=True), tuple(MODEL_IMPLS), MODEL_TOLERANCE,
         {"cpu": (1, 8, 32, 64), "cuda": (1, 8, 32, 64, 256)}, quick=(1,), default=(1, 8),
         grad_outputs=_loss_gradients),
    # Swin-B costs ~0.2 s per image on a 2-core CPU and torch.compile of it ~1 min per shape there.
    Case("model", lambda b, dt, dev: (torch.randn(b, 3, 224, 224, dtype=dt, device=dev),),
         functools.partial(_lifeiqa_build, head=False), tuple(MODEL_IMPLS), MODEL_TOLERANCE,
         {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}, quick=(), default=(1,), grad_outputs=_loss_gradients,
         per_item="img"),
    # max err here is the Scorer's score deviation from the official fp32 model (5e-2 lets bf16 pass;
    # tests/test_scorer.py holds the fp32 Scorer to the model's output within 1e-5).
    Case("scorer", _scorer_inputs, _scorer_build, tuple(SCORER_IMPLS), {dt: 5e-2 for dt in DTYPES.values()},
         {"cpu": (1, 8), "cuda": (1, 8, 64)}, quick=(), default=(1,), dtypes=("fp32",), backward=False,
         per_item="img"),
    # Not in --quick: exporting Swin-B takes ~40 s on a 2-core CPU (a 387 MiB file), besides torch.compile's minute.
    Case("onnx", _scorer_inputs, _onnx_build, ONNX_IMPLS, MODEL_TOLERANCE, {"cpu": (1, 8), "cuda": (1, 8)},
         quick=(), default=(1,), dtypes=("fp32",), backward=False, per_item="img"),
)}


def _busy_s() -> tuple[float, float] | None:
    """(CPU seconds all processes used, of which this one's), from /proc/stat (Linux), else None."""
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        own = os.times()
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system
    return None


@contextlib.contextmanager
def foreign_load():
    """Yields a dict whose "cores" becomes the cores other processes kept busy meanwhile: on a shared
    machine they distort results (a busy core stalls every parallel region of a 2-thread pool)."""
    load, start, t0 = {"cores": None}, _busy_s(), time.perf_counter()
    yield load
    end, elapsed = _busy_s(), time.perf_counter() - t0
    if start and end and elapsed > 0:
        load["cores"] = max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / elapsed)


def _seconds(fn: Callable, number: int, device: torch.device) -> float:
    """Seconds taken by `number` calls of fn, synchronised with the device."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fns: dict[str, Callable], device: torch.device, budget_s: float, samples: int) -> dict[str, list[float]]:
    """ms per call of each fn, one value per sample, samples taken round-robin over the fns.

    Each fn is warmed up, then calibrated on >= 10 ms of calls (well above timer resolution) to pick
    how many calls make one sample of about budget_s / samples: one fn costs about budget_s in all.
    A fn slower than that per call gets single-call samples, as many as budget_s allows but at least
    MIN_SAMPLES (and at most `samples`).
    """
    run, numbers, counts = functools.partial(_seconds, device=device), {}, {}
    for name, fn in fns.items():
        run(fn, 1)  # warm-up: lazy initialisation, allocator, caches
        number, elapsed = 1, run(fn, 1)
        while elapsed < 0.01:
            number *= 2
            elapsed = run(fn, number)
        per_call = elapsed / number
        numbers[name] = max(1, round(budget_s / samples / per_call))
        counts[name] = min(samples, max(MIN_SAMPLES, round(budget_s / per_call)))
    times = {name: [] for name in fns}
    for i in range(max(counts.values(), default=0)):
        for name, fn in fns.items():
            if i < counts[name]:
                times[name].append(run(fn, numbers[name]) / numbers[name] * 1e3)
    return times


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    q = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return tuple(torch.tensor(values, dtype=torch.float64).quantile(q).tolist())


def measure_limits(device: torch.device, dtypes: list[str], budget_s: float, samples: int) -> dict:
    """The device's GEMM GFLOP/s per dtype and copy GB/s, the denominators of limit_fraction."""
    mats = {name: torch.randn(2, 2048, 2048, device=device).to(DTYPES[name]) for name in dtypes}
    # copy_ into a buffer allocated once: clone() would time page faults of a fresh 256 MB on CPU.
    src = torch.ones(64 * 2**20, device=device)  # 256 MB, pages touched
    dst = torch.empty_like(src)
    fns = {name: functools.partial(torch.matmul, *ab) for name, ab in mats.items()}
    t = measure({**fns, "copy": lambda: dst.copy_(src)}, device, budget_s, samples)
    return {"gemm_gflops": {name: 2 * 2048**3 / quantiles(t[name])[0] / 1e6 for name in dtypes},
            "copy_gbps": 2 * src.nbytes / quantiles(t["copy"])[0] / 1e6}


def compare(got: tuple, ref: tuple, eager: tuple, tolerance: float) -> tuple[float, bool]:
    """(max_err, ok): max_err is the max over outputs (and gradients) of |got - ref| / max(1, max |ref|).

    In fp32 rows ref and eager are the eager outputs: ok if max_err <= tolerance. In fp16/bf16 rows ref
    is eager in fp32 on the same inputs and weights, and each output may be off by the tolerance plus
    twice eager's own error on it (the eager row thus shows the reference's own error).
    """
    worst, ok = 0.0, True
    for g, r, e in zip(got, ref, eager, strict=True):
        r = r.float()
        scale = max(1.0, r.abs().max().item())
        err = (g.float() - r).abs().max().item() / scale
        own = (e.float() - r).abs().max().item() / scale  # the reference's own error in this precision
        worst, ok = max(worst, err), ok and err <= tolerance + 2 * own
    return worst, ok


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def bench_row(case: Case, device: torch.device, dtype: torch.dtype, batch: int, backward: bool,
              impls: list[str], budget_s: float, samples: int) -> list[dict]:
    """Check, then time, every implementation on one (device, dtype, batch, direction)."""
    base = {"op": case.op, "device": device.type, "dtype": DTYPE_NAMES[dtype], "batch": batch,
            "direction": "forward+backward" if backward else "forward", "other_load_cores": None}
    torch.manual_seed(0)
    inputs = case.make_inputs(batch, dtype, device)
    if backward:
        inputs = tuple(t.detach().requires_grad_() for t in inputs)
    grad_outputs = []  # made from the eager outputs on the first call, then the same for every impl

    def call(fn, params, args=inputs):
        """One timed call: (fn's outputs, and in backward rows the gradients of args and params)."""
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if not backward:
            return outs, ()
        if not grad_outputs:
            grad_outputs.extend(case.grad_outputs(outs))
        grads = torch.autograd.grad(outs, (*args, *params), [g.to(o.dtype) for g, o in zip(grad_outputs, outs)],
                                    allow_unused=True, materialize_grads=True)  # an expert may get no token
        return outs, grads

    with torch.no_grad() if not backward else contextlib.nullcontext():
        try:
            eager, params = case.build("eager", device, dtype)
            with FlopCount() as counter:
                want = call(eager, params)
            ref = want
            if dtype != torch.float32:  # the fp32 truth that low-precision outputs are measured against
                fn32, params32 = case.build("eager", device, torch.float32)
                ref = call(fn32, params32, tuple(t.detach().float().requires_grad_(backward) for t in inputs))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported in the table, the run goes on
            return [{**base, "impl": name, "status": f"not run: eager {_failure(exc)}", "max_err": None}
                    for name in impls]
        flop, nbytes = case.cost(inputs, want[0], params, backward, counter.total)
        ref, want_all = ref[0] + ref[1], want[0] + want[1]
        fns, rows = {}, {}
        for name in impls:
            row = rows[name] = {"impl": name, "status": "ok", "max_err": None}
            try:
                fn, fn_params = eager, params
                if name == "eager":
                    got = want
                elif name == "compile":
                    torch._dynamo.reset()  # a fresh compile per row: no shared cache, no recompile limit
                    torch._dynamo.utils.counters.clear()
                    fn, start = torch.compile(eager, dynamic=False), time.perf_counter()
                    got = call(fn, fn_params)
                    row["compile_s"] = time.perf_counter() - start
                    row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                else:
                    fn, fn_params = case.build(name, device, dtype)
                    got = call(fn, fn_params)
                    row["flop"] = _executed_flop(name, rows, lambda: call(fn, fn_params))
            except Unavailable as exc:
                row["status"] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                row["status"] = f"{'compile failed' if name == 'compile' else 'error'}: {_failure(exc)}"
                continue
            row["max_err"], ok = compare(got[0] + got[1], ref, want_all, case.tolerance[dtype])
            if not ok:
                own = " + 2 x eager's own error" if dtype != torch.float32 else ""
                row["status"] = f"mismatch (err {row['max_err']:.2e} > {case.tolerance[dtype]:.1e}{own})"
                continue
            # Forward: fn alone, no wrapper, so a microsecond kernel's time is not ours.
            fns[name] = functools.partial(call, fn, fn_params) if backward else functools.partial(fn, *inputs)
        with foreign_load() as load:
            times = measure(fns, device, budget_s, samples) if fns else {}

    base["other_load_cores"] = load["cores"]
    medians, limits = {name: quantiles(t)[0] for name, t in times.items()}, LIMITS[device.type]
    result = []
    for name, row in rows.items():
        row = {**base, **row}
        if name in times:
            median, p20, p80 = quantiles(times[name])
            gflops, gbps = flop / median / 1e6, nbytes / median / 1e6
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, samples=len(times[name]), gflops=gflops,
                       gbps=gbps, speedup_vs_eager=medians["eager"] / median if "eager" in medians else None,
                       speedup_vs_compile=medians["compile"] / median if "compile" in medians else None,
                       limit_fraction=max(gbps / limits["copy_gbps"], gflops / limits["gemm_gflops"][base["dtype"]]))
            # The floor: the time the bytes it must move take at the copy bandwidth, or the FLOP it executes
            # at the GEMM rate in its dtype, whichever is longer (eager's FLOP for eager and compile)
            executed = row.pop("flop", None) or flop
            floor = max(nbytes / limits["copy_gbps"] / 1e6, executed / limits["gemm_gflops"][base["dtype"]] / 1e6)
            row.update(flop_executed=executed, floor_ms=floor, of_floor=floor / median)
        else:
            row.pop("flop", None)
        result.append(row)
    return result


LIMITS: dict[str, dict] = {}  # device type -> measure_limits(), filled before any row runs
CSV_FIELDS = ("op", "impl", "device", "dtype", "batch", "direction", "median_ms", "p20_ms", "p80_ms", "samples",
              "speedup_vs_eager", "speedup_vs_compile", "gflops", "gbps", "limit_fraction", "flop_executed",
              "floor_ms", "of_floor", "max_err", "status", "compile_s", "graphs", "other_load_cores")


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),  # lifeiqa_fast imports it if present
            "onnxruntime": _installed_version("onnxruntime"),  # imported later, by the onnx rows
            "lifeiqa_fast": lifeiqa_fast.__version__, "git": git, "limits": LIMITS}


def machine_lines(m: dict) -> list[str]:
    lines = [f"{m['date']}  lifeiqa_fast {m['lifeiqa_fast']} (git {m['git']}): {m['command']}",
             f"CPU: {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}; GPU: {m['gpu'] or 'none'}",
             f"python {m['python']}, torch {m['torch']}, CUDA {m['cuda']}, Triton {m['triton']}, "
             f"ONNX Runtime {m.get('onnxruntime')}"]
    for dev, lim in m["limits"].items():
        gemm = ", ".join(f"{dtype} {gflops:.1f}" for dtype, gflops in lim["gemm_gflops"].items())
        lines.append(f"limits on {dev}: GEMM 2048^3 GFLOP/s {gemm}; copy 256 MB {lim['copy_gbps']:.1f} GB/s")
    if "wall_s" in m:
        lines.append(f"wall time {m['wall_s']:.0f} s (torch.compile with a fresh inductor cache)")
    return lines


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def summary(results: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """The headline per device, dtype and direction: per op and batch, eager, torch.compile and our
    fastest implementation."""
    groups: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for r in results:
        key = (r["device"], r["dtype"], r["direction"])
        groups.setdefault(key, {}).setdefault((r["op"], r["batch"]), {})[r["impl"]] = r
    out = []
    for (device, dtype, direction), cases in groups.items():
        cells = [["op", "batch", "eager ms", "compile ms", "fastest of ours", "ms", "vs eager", "vs compile",
                  "of floor"]]
        for (op, batch), impls in cases.items():
            ours = [r for name, r in impls.items() if name not in BASELINES and "median_ms" in r]
            best = min(ours, key=lambda r: r["median_ms"], default={})
            eager, compiled = impls.get("eager", {}), impls.get("compile", {})
            compile_ms = _fmt(compiled.get("median_ms"), ".4g")
            if "compile_s" in compiled:
                compile_ms += f" (compile {compiled['compile_s']:.1f} s)"
            cells.append([op, str(batch), _fmt(eager.get("median_ms"), ".4g"), compile_ms, best.get("impl", "none"),
                          _fmt(best.get("median_ms"), ".4g"), _fmt(best.get("speedup_vs_eager"), ".1f"),
                          _fmt(best.get("speedup_vs_compile"), ".1f"), _fmt(best.get("of_floor"), ".0%")])
        out.append((f"summary / {device} / {dtype} / {direction}", cells))
    return out


def tables(results: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """(title, rows of cells) per op, device, dtype and direction; the first row is the header."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["op"], r["device"], r["dtype"], r["direction"]), []).append(r)
    out = []
    for (op, device, dtype, direction), rows in groups.items():
        unit = CASES[op].per_item if op in CASES else None
        cells = [["batch", "impl", "ms median [p20-p80]", *([f"{unit}/s"] if unit else []), "vs eager", "vs compile",
                  "GB/s", "GFLOP/s", "of limit", "floor ms", "of floor", "max err", "status"]]
        for r in rows:
            ms = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]" if "median_ms" in r else ""
            rate = [_fmt(r["batch"] / r["median_ms"] * 1e3 if "median_ms" in r else None, ".3g")] if unit else []
            status = r["status"]
            if "compile_s" in r:
                status += f" (compile {r['compile_s']:.1f} s, {r['graphs']} graphs)"
            cells.append([str(r["batch"]), r["impl"], ms, *rate, _fmt(r.get("speedup_vs_eager"), ".1f"),
                          _fmt(r.get("speedup_vs_compile"), ".1f"), _fmt(r.get("gbps"), ".2f"),
                          _fmt(r.get("gflops"), ".2f"), _fmt(r.get("limit_fraction"), ".1%"),
                          _fmt(r.get("floor_ms"), ".4g"), _fmt(r.get("of_floor"), ".0%"), _fmt(r["max_err"], ".1e"),
                          status])
        load = max((r["other_load_cores"] or 0.0) for r in rows)
        warn = f"  [other processes used up to {load:.1f} cores while timing]" if load > 0.2 else ""
        out.append((f"{op} / {device} / {dtype} / {direction}{warn}", cells))
    return out


def render(title: str, cells: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
    """Speed-up vs eager by batch: one panel per op, one line per implementation (and variant)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ops = list(dict.fromkeys(r["op"] for r in results))
    variants = list(dict.fromkeys((r["device"], r["dtype"], r["direction"]) for r in results))
    varying = [len({v[i] for v in variants}) > 1 for i in range(3)]  # name only what differs
    impls = list(dict.fromkeys(r["impl"] for r in results if r["impl"] != "eager"))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        lines: dict[tuple, list] = {}
        for r in results:
            if r["op"] == op and r["impl"] != "eager" and r.get("speedup_vs_eager"):
                key = (r["impl"], (r["device"], r["dtype"], r["direction"]))
                lines.setdefault(key, []).append((r["batch"], r["speedup_vs_eager"]))
        for (impl, variant), points in lines.items():
            label = " ".join([impl, *(v for v, shown in zip(variant, varying) if shown)])
            ax.plot(*zip(*sorted(points)), marker="o", label=label, color=f"C{impls.index(impl)}",
                    linestyle=("-", "--", ":", "-.")[variants.index(variant) % 4])
        ax.axhline(1.0, color="grey", linewidth=0.8)  # eager
        batches = sorted({r["batch"] for r in results if r["op"] == op})
        ax.set(xscale="log", yscale="log", title=op, xlabel="batch", ylabel="speed-up vs eager")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))  # 0.5 2 10, not 10^0
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    def csv_list(kind=str):
        return lambda text: [kind(v) for v in text.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Filters are comma-separated lists; batch and dtype replace the defaults.")
    p.add_argument("--ops", type=csv_list(), default=list(CASES), help=f"cases (default: {','.join(CASES)})")
    p.add_argument("--impl", type=csv_list(), help="eager, compile and ours to time (default: all); eager always "
                   "runs once, as the reference")
    p.add_argument("--device", type=csv_list(), help="cpu, cuda (default: cpu, and cuda when available)")
    p.add_argument("--batch", type=csv_list(int), help="batch sizes (default: per op and device)")
    p.add_argument("--dtype", type=csv_list(), help="fp32, fp16, bf16 (default: fp32,bf16 on cpu; all on cuda)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized: few batches (no model), fp32, fewer repetitions")
    size.add_argument("--full", action="store_true", help="every batch and dtype, the model at 8 images too (about "
                      "10 min on a 2-core CPU; the default run: ops at 1 and 32, head at 1 and 8, model, scorer and "
                      "onnx at 1, fp32, a few minutes)")
    p.add_argument("--json", type=pathlib.Path, help="write the machine description and all rows as JSON")
    p.add_argument("--csv", type=pathlib.Path, help="write one row per op, impl, device, dtype, batch, direction")
    p.add_argument("--markdown", type=pathlib.Path, help="write the machine description and the tables as markdown")
    p.add_argument("--plot", type=pathlib.Path, help="write a PNG of the speed-ups vs eager by batch (matplotlib)")
    p.add_argument("--save", type=pathlib.Path, metavar="DIR", help="write all four to DIR/DATE-DEVICES.*")
    args = p.parse_args(argv)

    known = {"ops": set(CASES), "dtype": set(DTYPES), "device": {"cpu", "cuda"},
             "impl": set(BASELINES).union(*(case.impls for case in CASES.values()))}
    for key, allowed in known.items():
        if set(getattr(args, key) or ()) - allowed:
            p.error(f"--{key}: unknown {sorted(set(getattr(args, key)) - allowed)}, choose from {sorted(allowed)}")
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.save:
        stem = args.save / f"{time.strftime('%Y-%m-%d')}-{'-'.join(devices)}"
        args.json, args.csv = args.json or stem.with_suffix(".json"), args.csv or stem.with_suffix(".csv")
        args.markdown, args.plot = args.markdown or stem.with_suffix(".md"), args.plot or stem.with_suffix(".png")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail now, not after the run
        p.error(f"{'--save' if args.save else '--plot'} writes a PNG plot and needs matplotlib, which is not "
                f"installed: pip install matplotlib (or the [bench] extra: pip install --no-build-isolation -e "
                f"\".[bench]\")")

    plan = []
    for device in devices:
        for op in args.ops:
            case = CASES[op]
            impls = [i for i in (*BASELINES, *case.impls) if args.impl is None or i in args.impl]
            for dtype in args.dtype or ((case.dtypes or DEFAULT_DTYPES[device]) if args.full else ["fp32"]):
                batches = case.batches[device] if args.full else case.quick if args.quick else case.default
                for batch in args.batch or batches:
                    for backward in (False, True) if args.backward and case.backward else (False,):
                        plan.append((case, torch.device(device), DTYPES[dtype], batch, backward, impls))
    kind = ("every batch and dtype (--full)" if args.full else "CI-sized (--quick)" if args.quick else
            "the main rows, fp32, a few minutes on a 2-core CPU (--full: every batch and dtype)")
    print(f"benchmarks/run.py: {len(plan)} rows, {kind}", file=sys.stderr, flush=True)
    command = " ".join(["run.py", *(sys.argv[1:] if argv is None else argv)])
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings: the table reports graph counts
    with tempfile.TemporaryDirectory() as cache_dir:  # cold compiles, as on a fresh machine
        with unittest.mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir):  # read at each use
            results, machine = benchmark(plan, devices, args.quick, command)
    report(results, machine, args)


def benchmark(plan: list[tuple], devices: list[str], quick: bool, command: str):
    """(rows of every plan entry, the machine description)."""
    budget_s, samples = (0.05, 5) if quick else (0.2, 10)
    start = time.perf_counter()
    machine = {**describe_machine(), "command": command}
    bar = tqdm(total=len(devices) + len(plan), file=sys.stderr)
    for device in devices:
        bar.set_postfix_str(f"limits on {device}")
        dtypes = list(dict.fromkeys(DTYPE_NAMES[entry[2]] for entry in plan if entry[1].type == device))
        LIMITS[device] = measure_limits(torch.device(device), dtypes, budget_s, samples)
        bar.update()
    results = []
    for case, device, dtype, batch, backward, impls in plan:
        direction = "forward+backward" if backward else "forward"
        bar.set_postfix_str(f"{case.op} {device.type} {DTYPE_NAMES[dtype]} batch {batch} {direction}")
        results += bench_row(case, device, dtype, batch, backward, impls, budget_s, samples)
        bar.update()
    bar.close()
    machine["wall_s"] = time.perf_counter() - start
    loads = [r["other_load_cores"] for r in results if r["other_load_cores"] is not None]
    machine["other_load_cores_max"] = max(loads, default=None)
    return results, machine


def report(results: list[dict], machine: dict, args) -> None:
    """Print the tables; write the files asked for."""
    text = "\n".join(machine_lines(machine))
    if (machine["other_load_cores_max"] or 0) > 0.2:
        text += f"\nWARNING: other processes used up to {machine['other_load_cores_max']:.1f} cores while timing"
    all_tables = summary(results) + tables(results)
    print(text + "\n\n" + "\n\n".join(render(*t, markdown=False) for t in all_tables))
    for path in filter(None, (args.json, args.csv, args.markdown, args.plot)):
        path.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
    if args.markdown:
        header = "\n".join(f"- {line}" for line in text.splitlines())
        args.markdown.write_text(header + "\n\n" + "\n\n".join(render(*t, markdown=True) for t in all_tables) + "\n")
    if args.plot:
        plot(results, args.plot, f"{machine['gpu'] or machine['cpu']}, {machine['date']}")


if __name__ == "__main__":
    main()
