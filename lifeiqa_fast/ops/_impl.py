"""Which implementation of an op runs: "reference" (the authors' way), "composite" (ATen ops only, static
shapes, no host synchronisation: what CUDA graphs and torch.compile(fullgraph=True) take whole), "native"
(C++/CUDA in _C) or "triton".

`impl="auto"` picks per device and says why (`lifeiqa_fast.info()` lists every choice):
- CPU: the native C++ kernel when _C is loaded, else the reference (the loader has warned once).
- CUDA: the native CUDA kernel when it is compiled and has passed its tests on a GPU at this source
  revision (a record in validation.json), else the Triton kernel under the same rule, else composite.
  A kernel that has never been validated on a GPU is never picked by "auto"; nor is the reference,
  whose pooling loop and per-expert MoE (host synchronisations) break CUDA graphs and compile.
- any other device (mps, xpu, meta, ...): composite.
An explicit impl that cannot run raises an error saying why; nothing falls back silently.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _ext

IMPLS = ("auto", "reference", "composite", "native", "triton")
_default_impl = "auto"


def set_default_impl(impl: str) -> None:
    """Set the process-wide implementation used where an op or module is given impl=None."""
    global _default_impl
    _default_impl = _check_impl(impl)
    choose.cache_clear()


def get_default_impl() -> str:
    return _default_impl


def requested(impl: str | None) -> str:
    """The implementation asked for: impl, or the process-wide default for None."""
    return impl if impl is not None else _default_impl


# What every op but the reference computes in under torch.autocast: its floating inputs (bar float64) cast
# to float32 and autocast off inside, as autocast treats layer_norm and softmax. One dtype whatever the
# autocast dtype, and whichever implementation "auto" picks; the kernels accumulate in float32 anyway.
AUTOCAST_DTYPE = torch.float32
_AUTOCAST_DEVICES = ("cpu", "cuda")  # where the rule is registered (torch.is_autocast_enabled rejects "meta")


def _autocast_cast(value, device_type: str):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64 and value.device.type == device_type
        return value.to(AUTOCAST_DTYPE) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type) for v in value)
    return value


def autocast_rule(op):
    """Decorates a public op function op(x, ..., impl=None): under torch.autocast for x's device it runs
    on its inputs cast to AUTOCAST_DTYPE with autocast off, unless the reference is asked for (which
    follows autocast op by op, as the authors' modules do). The custom ops themselves get the same rule
    from register_autocast, for callers of torch.ops.lifeiqa_fast.* and traced graphs."""
    signature = inspect.signature(op)

    @functools.wraps(op)
    def run(x, *args, **kwargs):
        device_type = x.device.type if isinstance(x, torch.Tensor) else None
        if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
            return op(x, *args, **kwargs)
        bound = signature.bind(x, *args, **kwargs)
        if requested(bound.arguments.get("impl")) == "reference":
            return op(x, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return op(*_autocast_cast(bound.args, device_type),
                      **{k: _autocast_cast(v, device_type) for k, v in bound.kwargs.items()})

    return run


def register_autocast(op) -> None:
    """The autocast rule of autocast_rule for a custom op (a name, OpOverload or custom_op), on CPU and CUDA."""
    for device_type in _AUTOCAST_DEVICES:
        torch.library.register_autocast(op, device_type, AUTOCAST_DTYPE)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"lifeiqa_fast: impl must be one of {IMPLS}, got {impl!r}")
    return impl


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(importable, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"Triton is not installed ({exc})"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


PREFLIGHT_RECORD = _ext.PACKAGE_DIR / "preflight.json"


def _read_records(path) -> tuple[dict, ...]:
    """The "records" of validation.json or preflight.json: each names an op, a backend and the sha256 of
    the kernel source it holds for."""
    return tuple(json.loads(path.read_text())["records"]) if path.exists() else ()


@functools.lru_cache(maxsize=None)
def _validation_records() -> tuple[dict, ...]:
    return _read_records(_ext.PACKAGE_DIR / "validation.json")


@functools.lru_cache(maxsize=None)
def _preflight_records() -> tuple[dict, ...]:
    return _read_records(PREFLIGHT_RECORD)


def _record_of_current_source(records: tuple[dict, ...], op: str, backend: str) -> dict | None:
    digest = source_hash(op, backend)
    return next((r for r in records if r["op"] == op and r["backend"] == backend and r["source"] == digest), None)


@functools.lru_cache(maxsize=None)
def source_hash(op: str, backend: str) -> str | None:
    """sha256 of the kernel source that runs: the CUDA source compiled into _C, or the Triton module."""
    if backend == "cuda":
        return _ext.BUILD_INFO.get("cuda_sources", {}).get(op)
    path = _ext.PACKAGE_DIR / "triton" / f"{op}.py"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def preflight_record(op: str) -> dict | None:
    """The record of a passing Triton preflight of op's current source (python -m lifeiqa_fast.preflight
    --record): compiled for sm_80 and sm_90 in every dtype, within shared memory, no spill at Life-IQA's
    shapes. None if the source changed since."""
    return _record_of_current_source(_preflight_records(), op, "triton")


def validation(op: str, backend: str) -> dict | None:
    """The GPU validation record of this op's backend ("cuda" or "triton") at its current source, if any."""
    return _record_of_current_source(_validation_records(), op, backend)


def _why_not(op: str, impl: str, device_type: str) -> str | None:
    """None if `impl` can run `op` on this device type, else the reason it cannot. On meta tensors (no
    values, shapes only) the native and Triton ops run the fake implementations of ops/<op>.py."""
    if impl in ("reference", "composite"):
        return None
    if impl == "native":
        if not _ext.LOADED:
            return f"the compiled extension is not loaded: {_ext.LOAD_ERROR}"
        if device_type == "meta":
            return None
        if not _ext.has_kernel(op, device_type):
            built = "CUDA sources were not compiled" if device_type == "cuda" else "no kernel registered"
            return f"_C has no {device_type.upper()} kernel for {op} ({built})"
        return None
    ok, why = triton_status()
    if not ok:
        return why
    if source_hash(op, "triton") is None:
        return f"no Triton kernel of {op} (lifeiqa_fast/triton/{op}.py)"
    if device_type == "meta":
        return None
    if device_type == "cpu" and not triton_interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not run on {device_type} tensors"
    return None


@functools.lru_cache(maxsize=None)
def choose(op: str, device_type: str, impl: str | None = None) -> tuple[str, str]:
    """(implementation, reason) for `op` on a device type, from impl in IMPLS or None (the default)."""
    impl = _check_impl(requested(impl))
    if impl != "auto":
        why = _why_not(op, impl, device_type)
        if why is not None:
            raise RuntimeError(f"lifeiqa_fast.{op}: impl={impl!r} cannot run on {device_type}: {why}")
        return impl, "requested"
    if device_type == "cpu":
        why = _why_not(op, "native", "cpu")
        return ("native", "C++ CPU kernel") if why is None else ("reference", why)
    if device_type != "cuda":
        return "composite", f"no kernels for {device_type}"
    reasons = []
    for candidate, backend in (("native", "cuda"), ("triton", "triton")):
        why = _why_not(op, candidate, "cuda")
        if why is None and validation(op, backend) is None:
            kind = "CUDA kernel compiled" if backend == "cuda" else "Triton kernel available"
            why = f"{kind} but never validated on a GPU at this source revision"
        if why is None:
            return candidate, f"{backend} kernel validated on {validation(op, backend)['gpu']}"
        reasons.append(f"{candidate}: {why}")
    return "composite", "; ".join(reasons)


def within_limits(op: str, which: str, impl: str | None, beyond: str | None) -> str:
    """which, the implementation resolve() chose, checked against a kernel's size limit: beyond is None
    when the input fits the native and Triton kernels, else how it exceeds them. A kernel chosen by
    "auto" gives way to "composite" (auto runs every size the reference runs); a kernel asked for by
    name raises a ValueError naming the limit."""
    if beyond is None or which not in ("native", "triton"):
        return which
    if requested(impl) == "auto":
        return "composite"
    raise ValueError(f"lifeiqa_fast.{op}: impl={which!r} cannot run this input: {beyond}; impl='auto' or "
                     f"'composite' run any size")


def _cpu_kind() -> str:
    cpu = torch.cpu
    for kind, has in (("amx", cpu._is_amx_tile_supported), ("avx512_bf16", cpu._is_avx512_bf16_supported),
                      ("avx512", cpu._is_avx512_supported), ("avx2", cpu._is_avx2_supported)):
        if has():
            return kind
    return "baseline"


_CPU_KIND = _cpu_kind()  # read once, at import: torch.compile does not trace torch.cpu's probes


def cpu_capability() -> str:
    """The kind of CPU that speed data is kept for (CPU_REFERENCE_FROM): "amx" (AMX tiles), "avx512_bf16"
    (AVX-512 with native bf16), "avx512", "avx2" or "baseline"."""
    return _CPU_KIND


# Where "auto" on the CPU gives the native kernel's place to the reference (the authors' ATen calls) because
# the reference was faster there: per CPU capability, (op, dtype) -> the fewest rows (query rows B * Nq,
# tokens T) from which it was. Measured with benchmarks/run.py, the op's rows at 1, 8, 32 and 64 images
# of 6 query tokens, native against eager, in two runs (benchmarks/results/2026-12-07-cpu-avx512bf16*.md):
# with AVX-512 and native bf16, oneDNN's bf16 GEMMs and the fused CPU attention that SDPA runs beat the
# native cross_attention from 8 images in bf16 and from 32 in fp32, and the authors' per-expert loop beats
# the native moe from 32 images in bf16. Capabilities not listed (AVX2 only, AMX) have no measured loss:
# the native kernel everywhere.
CPU_REFERENCE_FROM = {
    "avx512_bf16": {("cross_attention", torch.bfloat16): 48, ("cross_attention", torch.float32): 192,
                    ("moe", torch.bfloat16): 192},
}


def faster_on_this_cpu(op: str, which: str, impl: str | None, x: torch.Tensor, rows: int) -> str:
    """which, or "reference" where "auto" chose the native kernel on a CPU whose measured data say the
    reference is faster at this dtype and row count (CPU_REFERENCE_FROM)."""
    if which != "native" or x.device.type != "cpu" or requested(impl) != "auto":
        return which
    start = CPU_REFERENCE_FROM.get(cpu_capability(), {}).get((op, x.dtype))
    return "reference" if start is not None and statically_known_true(rows >= start) else which


@torch.compiler.assume_constant_result
def _chosen(op: str, device_type: str, impl: str | None) -> str:
    # A constant to torch.compile: the choice is made once, at trace time, not traced through.
    return choose(op, device_type, impl)[0]


def resolve(op: str, x: torch.Tensor, impl: str | None) -> str:
    """The implementation that runs `op` on x's device."""
    return _chosen(op, x.device.type, impl)


def check_tensors(op: str, tensors: dict) -> None:
    """A TypeError naming the first of `tensors` (argument name -> value) that is not a torch.Tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lifeiqa_fast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def is_int(value) -> bool:
    """A Python int and not a bool: True is an int to Python, but never a head count, grid size or k."""
    return isinstance(value, int) and not isinstance(value, bool)


def agreed_size(*sizes: int) -> int:
    """The size most of `sizes` agree on, the first of them on a tie; -1 (a tensor of the wrong rank)
    never wins. An inner size read from several tensors, so that a shape error names the one tensor
    that disagrees: gcn with w1 (32, 20), b1 (16,), w2 (16, 8) gives H1 = 16, and w1 is reported."""
    known = [s for s in sizes if s >= 0]
    return max(known, key=known.count) if known else -1


def check_like_x(op: str, x: torch.Tensor, tensors: dict, shapes: dict) -> None:
    """A ValueError naming the first of `shapes` (argument name -> (its shape in symbols, the expected
    shape; -1 where a size is already wrong)) whose tensor has another shape, then the first of
    `tensors` (argument name -> tensor) without x's dtype and device."""
    for name, (symbols, shape) in shapes.items():
        if tuple(tensors[name].shape) != shape or -1 in shape:
            raise ValueError(f"lifeiqa_fast.{op}: {name} must have shape {symbols} = {shape}, "
                             f"got {tuple(tensors[name].shape)}")
    for name, t in tensors.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"lifeiqa_fast.{op}: {name} must have x's dtype and device ({x.dtype}, {x.device}), "
                             f"got ({t.dtype}, {t.device})")


class _FirstOrderOnly(torch.autograd.Function):
    """Gradients from a backward that is not differentiable itself, as a node that raises when the
    gradients are differentiated again (see first_order_only)."""

    @staticmethod
    def forward(ctx, op, instead, backward, *inputs):
        ctx.op, ctx.instead = op, instead
        return backward(*inputs)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(f"lifeiqa_fast.{ctx.op}: double backward (a gradient of this op's gradient) is not "
                           f"supported by its fused backward; for higher-order gradients use {ctx.instead}")


def first_order_only(op: str, backward, *inputs, instead: str = 'impl="reference"'):
    """backward(*inputs): the gradients of `op` from a backward that is not differentiable in its inputs
    (a native kernel, or a formula reading saved outputs marked non-differentiable), so that a second
    differentiation would be silently wrong. Under create_graph=True (grad mode is on inside the
    backward) the gradients are still returned, as outputs of a node whose own backward raises a
    RuntimeError naming op and what to use `instead`: a higher-order gradient through op fails
    instead of being wrong, while create_graph=True alone still works."""
    if not torch.is_grad_enabled():
        return backward(*inputs)
    return _FirstOrderOnly.apply(op, instead, backward, *inputs)


def constant(make, *key) -> torch.Tensor:
    """make(*key): a tensor that depends only on key (sizes, dtype, device), made once per key and kept,
    so that a CUDA graph captured after a first call copies nothing from the host (a host-to-device copy
    cannot be captured); made afresh while torch.compile or torch.export traces, as a constant of the
    graph (a kept tensor would be one of their fake ones)."""
    if torch.compiler.is_compiling():
        return make(*key)
    return _kept(make, *key)


@functools.lru_cache(maxsize=256)
def _kept(make, *key) -> torch.Tensor:
    return make(*key)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in, and return statistics in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# F.linear on CPU with at most this many rows runs as W @ x^T: MKL packs the right-hand operand of a
# GEMM per call, which for x @ W^T is the whole weight (a third faster at Life-IQA's (6, 384) x (384, 384)
# with the weight not in cache; no gain from 12 rows).
FEW_ROWS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), the same value to float rounding, faster for a few rows on CPU.

    A symbolic row count (torch.export with a dynamic batch, torch.onnx.export(dynamo=True),
    torch.compile(dynamic=True)) takes F.linear: branching on it would add a guard (batch <= 8) that
    narrows the batch sizes the traced graph holds for."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    few = statically_known_true(rows > 0) and statically_known_true(rows <= FEW_ROWS)  # plain ints: as written
    if x.device.type != "cpu" or not few or weight.shape[-1] != x.shape[-1]:  # F.linear's errors
        return torch.nn.functional.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).t()
    yt = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)  # (N, rows)
    return yt.t().contiguous().view(*x.shape[:-1], weight.shape[0])
