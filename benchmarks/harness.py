"""The benchmark's harness: interleaved round-robin timing (measure), the machine's limits measured in
the same run (measure_limits), FLOP and byte counting (FlopCount, OUR_OP_FLOP), the check of every
implementation against eager (compare) and the row runner (bench_row) that does all of it for one
Case on one (device, dtype, batch, direction). benchmarks/cases.py holds the cases, report.py the
tables, run.py the command line.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Rows and limits name their dtype; every row times the two baselines beside our implementations.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BASELINES = ("eager", "compile")
MIN_SAMPLES = 5  # per implementation, however slow its calls (measure)


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
    dtypes: tuple[str, ...] | None = None  # --full's row dtypes, if not cases.DEFAULT_DTYPES
    backward: bool = True  # whether --backward adds forward+backward rows
    per_item: str | None = None  # the unit of the batch, for a throughput column ("img")


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
              impls: list[str], budget_s: float, samples: int, *, limits: dict) -> list[dict]:
    """Check, then time, every implementation on one (device, dtype, batch, direction). limits: the
    device's measure_limits() of this run, the denominators of limit_fraction and the floor."""
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
    medians = {name: quantiles(t)[0] for name, t in times.items()}
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
