"""The benchmark's cases: one Case per op family, the decoder stack, the head, the whole model, the
Scorer and ONNX Runtime, each with its input builder, its implementations (the authors' code as
"eager", then ours by label), its cost and its tolerances (benchmarks/harness.py runs them).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import pathlib
import tempfile

import torch

import lifeiqa_fast
from lifeiqa_fast import images
from lifeiqa_fast.loss import AUX_WEIGHT, Z_WEIGHT
from lifeiqa_fast.model import Decoder
from lifeiqa_fast.ops import cross_attention, gcn, grid_pool
from lifeiqa_fast.ops.moe import moe_composite, moe_triton
from lifeiqa_fast.ops._impl import choose, triton_interpreted
from lifeiqa_fast.reference import cross_attention_ref, fixed_adjacency, gcn_ref, grid_pool_ref, moe_ref

from harness import DTYPES, Case, Unavailable

DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}  # --full's, unless a Case names its own


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


def _imagenet(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std the Scorer normalises with (lifeiqa_fast.images), as (1, 3, 1, 1) tensors."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (images.MEAN, images.STD))


def _scorer_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (torch.rand(batch, 3, 224, 224, device=device, dtype=dtype),)


def _scorer_build(impl: str, device: torch.device, dtype: torch.dtype):
    """(images in [0, 1] (B, 3, 224, 224) -> scores (B, 1)), no parameters (forward rows only)."""
    official = _lifeiqa("eager", device, torch.float32)
    mean, std = _imagenet(device)
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
    mean, std = _imagenet(device)
    return (lambda x: model((x.float() - mean) / std)[0].view(-1)), ()


def _loss_gradients(outs):
    # (score, aux, z) -> the gradients of score.sum() + router_loss(aux, z) = score.sum() + AUX_WEIGHT *
    # aux + Z_WEIGHT * z: the authors' training loss (lifeiqa_fast.loss.training_loss), score.sum() in
    # place of its smooth L1 term
    score, aux, z = outs
    return torch.ones_like(score), torch.full_like(aux, AUX_WEIGHT), torch.full_like(z, Z_WEIGHT)


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
    # Few batches: Swin-B is ~99% of the model's FLOP, its rows the slowest and torch.compile of it the
    # longest compile of the run (times per machine in benchmarks/results/).
    Case("model", lambda b, dt, dev: (torch.randn(b, 3, 224, 224, dtype=dt, device=dev),),
         functools.partial(_lifeiqa_build, head=False), tuple(MODEL_IMPLS), MODEL_TOLERANCE,
         {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}, quick=(), default=(1,), grad_outputs=_loss_gradients,
         per_item="img"),
    # max err here is the Scorer's score deviation from the official fp32 model (5e-2 lets bf16 pass;
    # tests/test_scorer.py holds the fp32 Scorer to the model's output within 1e-5).
    Case("scorer", _scorer_inputs, _scorer_build, tuple(SCORER_IMPLS), {dt: 5e-2 for dt in DTYPES.values()},
         {"cpu": (1, 8), "cuda": (1, 8, 64)}, quick=(), default=(1,), dtypes=("fp32",), backward=False,
         per_item="img"),
    # Not in --quick: exporting Swin-B (a 387 MiB file) is slow, besides torch.compile of it (benchmarks/results/).
    Case("onnx", _scorer_inputs, _onnx_build, ONNX_IMPLS, MODEL_TOLERANCE, {"cpu": (1, 8), "cuda": (1, 8)},
         quick=(), default=(1,), dtypes=("fp32",), backward=False, per_item="img"),
)}
