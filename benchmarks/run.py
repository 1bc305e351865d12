#!/usr/bin/env python
"""The project's benchmark: each op family against the authors' eager code and torch.compile of it.

One entry of CASES per op family. For every (op, device, dtype, batch, direction) the script
1. builds the inputs and runs the eager baseline (the official code path), then checks every other
   implementation against it: a mismatch is reported and that implementation is not timed;
2. times all that passed, round-robin over samples so that drift (turbo, other processes) hits all
   alike: warm-up, then calls grouped into samples of ~budget/samples seconds each;
3. reports ms as median [p20-p80] over samples, the speed-ups vs eager and vs torch.compile, GB/s
   and GFLOP/s, and the fraction of the device's limits measured in the same run (a 2048^3 fp32
   GEMM and a 256 MB copy): limit_fraction = max(GB/s / copy GB/s, GFLOP/s / GEMM GFLOP/s).

Forward rows run under torch.no_grad(), as inference does; --backward adds rows that time forward +
backward with a fixed random output gradient. On CUDA a sample is timed with CUDA events around a
loop of calls, synchronised at its end; inputs that fit in L2 stay there between calls (as after
the backbone that just wrote them), so small batches may beat the copy bandwidth. torch.compile
runs with its defaults (graph breaks allowed); its first call is reported as compile time.

    python benchmarks/run.py --quick
    python benchmarks/run.py --json benchmarks/results/$(date +%F)-cpu.json \
                             --markdown benchmarks/results/$(date +%F)-cpu.md
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import lifeiqa_fast
from lifeiqa_fast.ops import grid_pool
from lifeiqa_fast.ops._impl import choose, triton_interpreted
from lifeiqa_fast.reference import grid_pool_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
# Max abs error allowed vs the eager output, times max(1, max |eager|). fp32 differs from eager only
# by summation order; fp16/bf16 outputs are rounded to 11/8 bits, and eager and the kernels may
# round intermediate sums differently.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BASELINES = ("eager", "compile")


@dataclass(frozen=True)
class Case:
    """One op family: its inputs, the official eager code, our implementations and its cost."""

    op: str
    make_inputs: Callable[[int, torch.dtype, torch.device], tuple]  # (batch, dtype, device) -> args
    eager: Callable  # args -> one tensor, the authors' way
    impl: Callable[[str], Callable]  # impl name -> (args -> the same tensor)
    impls: tuple[str, ...]
    cost: Callable[[tuple, torch.Tensor, bool], tuple[float, float]]  # (args, out, backward) -> (FLOP, bytes)
    batches: dict[str, tuple[int, ...]]  # per device type


GRID = 7  # Life-IQA pools the stage-3 map onto a 7 x 7 grid


def _grid_pool_inputs(batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (torch.randn(batch, 14, 14, 512, dtype=dtype, device=device),)  # stage 3, NHWC as timm emits it


def _grid_pool_eager(x):
    # The authors permute + copy the NHWC map to NCHW, then slice 49 bins with .item()-driven edges.
    return grid_pool_ref(x.permute(0, 3, 1, 2).contiguous(), GRID)  # (B, 49, 512)


def _grid_pool_cost(args, out, backward):
    # Forward: one add per input element and one divide per output; reads x, writes out.
    # Backward: one divide per input gradient; reads grad (out-sized), writes dx (x-sized).
    # The minimum any implementation must do: eager's extra permute copy is not counted.
    (x,) = args
    flop = elems = x.numel() + out.numel()
    if backward:
        flop, elems = flop + x.numel(), elems + out.numel() + x.numel()
    return flop, elems * x.element_size()


CASES = {case.op: case for case in (
    Case("grid_pool", _grid_pool_inputs, _grid_pool_eager,
         impl=lambda name: lambda x: grid_pool(x, GRID, impl=name), impls=("native", "triton"),
         cost=_grid_pool_cost, batches={"cpu": (1, 8, 32, 64), "cuda": (1, 8, 32, 64, 256)}),
)}


def _not_timed(op: str, device: torch.device, impl: str) -> str | None:
    """Why `impl` is not timed on `device` (choose()'s semantics: an impl that raises is unavailable)."""
    if impl == "triton" and device.type == "cpu":
        # Triton on CPU tensors runs only interpreted, orders of magnitude too slow to be worth timing.
        return "n/a (interpreted: too slow to time)" if triton_interpreted() else "n/a (CPU needs TRITON_INTERPRET)"
    try:
        choose(op, device.type, impl)
    except RuntimeError as exc:
        return f"unavailable: {exc}"
    return None


class ForeignLoad:
    """CPU time that other processes take while we time: on a shared machine they distort results
    (a busy core stalls every parallel region of a 2-thread pool), so each row records it."""

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        own = os.times()
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return busy, own.user + own.system, time.perf_counter()

    def __enter__(self):
        self.start, self.cores = self._read(), None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start and end and end[2] > self.start[2]:
            self.cores = max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / (end[2] - self.start[2]))


def _timer(device: torch.device) -> Callable[[Callable, int], float]:
    """run(fn, number): seconds taken by `number` calls of fn, synchronised with the device."""
    if device.type == "cuda":
        def run(fn, number):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn, number):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            return time.perf_counter() - start
    return run


def measure(fns: dict[str, Callable], device: torch.device, budget_s: float, samples: int) -> dict[str, list[float]]:
    """ms per call of each fn, `samples` values each, taken round-robin over the fns.

    Each fn is warmed up, then calibrated on >= 10 ms of calls (well above timer resolution) to pick
    how many calls make one sample of about budget_s / samples: one fn costs about budget_s in all.
    """
    run, numbers = _timer(device), {}
    for name, fn in fns.items():
        run(fn, 1)  # warm-up: lazy initialisation, allocator, caches
        number, elapsed = 1, run(fn, 1)
        while elapsed < 0.01:
            number *= 2
            elapsed = run(fn, number)
        numbers[name] = max(1, round(budget_s / samples / (elapsed / number)))
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(run(fn, numbers[name]) / numbers[name] * 1e3)
    return times


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    q = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return tuple(torch.tensor(values, dtype=torch.float64).quantile(q).tolist())


def measure_limits(device: torch.device, budget_s: float, samples: int) -> dict:
    """The device's fp32 GEMM GFLOP/s and copy GB/s, the denominators of limit_fraction."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    # copy_ into a buffer allocated once: clone() would time page faults of a fresh 256 MB on CPU.
    src = torch.ones(64 * 2**20, device=device)  # 256 MB, pages touched
    dst = torch.empty_like(src)
    t = measure({"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, device, budget_s, samples)
    return {"gemm_gflops": 2 * 2048**3 / quantiles(t["gemm"])[0] / 1e6,
            "copy_gbps": 2 * src.nbytes / quantiles(t["copy"])[0] / 1e6}


def _error(got, want) -> tuple[float, float]:
    """(max abs difference over matching tensors, max(1, max |want|): the scale of the tolerance)."""
    scale = max([1.0] + [w.abs().max().item() for w in want if w.numel()])
    return max([0.0] + [(g.float() - w.float()).abs().max().item() for g, w in zip(got, want) if w.numel()]), scale


def bench_row(case: Case, device: torch.device, dtype: torch.dtype, batch: int, backward: bool,
              impls: list[str], budget_s: float, samples: int) -> list[dict]:
    """Check, then time, every implementation on one (device, dtype, batch, direction)."""
    torch.manual_seed(0)
    inputs = case.make_inputs(batch, dtype, device)
    if backward:
        inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)
    leaves = [t for t in inputs if t.requires_grad]
    grad_out = None

    def call(fn):
        """fn on the inputs, as one timed call: (out, grads of the inputs) or (out,) forward only."""
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, leaves, grad_out)) if backward else (out,)

    with torch.no_grad() if not backward else contextlib.nullcontext():
        eager_out = case.eager(*inputs)
        grad_out = torch.randn_like(eager_out)  # fixed by the seed, the same for every impl
        want = call(case.eager)
        flop, nbytes = case.cost(inputs, eager_out, backward)
        fns, rows = {}, {}
        for name in impls:
            row = rows[name] = {"impl": name, "status": "ok", "max_abs_err": 0.0 if name == "eager" else None}
            fn = case.eager
            if name == "compile":
                torch._dynamo.reset()  # a fresh compile per row: no shared cache, no recompile limit
                torch._dynamo.utils.counters.clear()
                fn = torch.compile(case.eager, dynamic=False)
            elif name != "eager":
                row["status"] = _not_timed(case.op, device, name) or "ok"
                fn = case.impl(name)
            if row["status"] != "ok":
                continue
            try:
                start = time.perf_counter()
                got = call(fn)
                if name == "compile":
                    row["compile_s"] = time.perf_counter() - start
                    row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                first_line = (str(exc).strip().splitlines() or [""])[0][:160]
                what = "compile failed" if name == "compile" else "error"
                row["status"] = f"{what}: {type(exc).__name__}: {first_line}"
                continue
            if name != "eager":
                row["max_abs_err"], scale = _error(got, want)
                if row["max_abs_err"] > TOLERANCE[dtype] * scale:
                    row["status"] = f"mismatch (err {row['max_abs_err']:.2e} > {TOLERANCE[dtype] * scale:.1e})"
                    continue
            fns[name] = lambda fn=fn: call(fn)
        with ForeignLoad() as load:
            times = measure(fns, device, budget_s, samples) if fns else {}

    base = {"op": case.op, "device": device.type, "dtype": DTYPE_NAMES[dtype], "batch": batch,
            "direction": "forward+backward" if backward else "forward", "other_load_cores": load.cores}
    medians = {name: quantiles(t)[0] for name, t in times.items()}
    result = []
    for name, row in rows.items():
        row = {**base, **row}
        if name in times:
            median, p20, p80 = quantiles(times[name])
            gflops, gbps = flop / median / 1e6, nbytes / median / 1e6
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, gflops=gflops, gbps=gbps,
                       speedup_vs_eager=medians["eager"] / median if "eager" in medians else None,
                       speedup_vs_compile=medians["compile"] / median if "compile" in medians else None,
                       limit_fraction=max(gbps / LIMITS[device.type]["copy_gbps"],
                                          gflops / LIMITS[device.type]["gemm_gflops"]))
        result.append(row)
    return result


LIMITS: dict[str, dict] = {}  # device type -> measure_limits(), filled before any row runs
CSV_FIELDS = ("op", "impl", "device", "dtype", "batch", "direction", "median_ms", "p20_ms", "p80_ms",
              "speedup_vs_eager", "speedup_vs_compile", "gflops", "gbps", "limit_fraction", "max_abs_err",
              "status", "compile_s", "graphs", "other_load_cores")


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "lifeiqa_fast": lifeiqa_fast.__version__, "git": git, "limits": LIMITS}


def machine_lines(machine: dict) -> list[str]:
    lines = [f"{machine['date']}  lifeiqa_fast {machine['lifeiqa_fast']} (git {machine['git']}): {machine['command']}",
             f"CPU: {machine['cpu']}, {machine['cpu_cores']} cores, torch threads {machine['torch_threads']}",
             f"GPU: {machine['gpu'] or 'none'}",
             f"python {machine['python']}, torch {machine['torch']}, CUDA {machine['cuda']}, "
             f"Triton {machine['triton']}"]
    lines += [f"limits on {dev}: fp32 GEMM 2048^3 {lim['gemm_gflops']:.1f} GFLOP/s, "
              f"copy 256 MB {lim['copy_gbps']:.1f} GB/s"
              for dev, lim in machine["limits"].items()]
    return lines


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def tables(results: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """(title, rows of cells) per op, device, dtype and direction; the first row is the header."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["op"], r["device"], r["dtype"], r["direction"]), []).append(r)
    out = []
    for (op, device, dtype, direction), rows in groups.items():
        cells = [["batch", "impl", "ms median [p20-p80]", "vs eager", "vs compile", "GB/s", "GFLOP/s",
                  "of limit", "max err", "status"]]
        for r in rows:
            ms = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]" if "median_ms" in r else ""
            status = r["status"]
            if "compile_s" in r:
                status += f" (compile {r['compile_s']:.1f} s, {r['graphs']} graphs)"
            cells.append([str(r["batch"]), r["impl"], ms, _fmt(r.get("speedup_vs_eager"), ".1f"),
                          _fmt(r.get("speedup_vs_compile"), ".1f"), _fmt(r.get("gbps"), ".2f"),
                          _fmt(r.get("gflops"), ".2f"), _fmt(r.get("limit_fraction"), ".1%"),
                          _fmt(r["max_abs_err"], ".1e"), status])
        load = max((r["other_load_cores"] or 0.0) for r in rows)
        warn = f"  [other processes used up to {load:.1f} cores while timing]" if load > 0.2 else ""
        out.append((f"{op} / {device} / {dtype} / {direction}{warn}", cells))
    return out


def render_text(title: str, cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(title: str, cells: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


class _Counter:
    """tqdm's interface as far as used here, for when tqdm is not installed."""

    def __init__(self, total, **_):
        self.total, self.n = total, 0

    def set_postfix_str(self, text):
        print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n=1):
        self.n += n

    def close(self):
        pass


def main(argv: list[str] | None = None) -> None:
    def csv_list(kind=str):
        return lambda text: [kind(v) for v in text.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Filters are comma-separated lists; batch and dtype replace the defaults.")
    p.add_argument("--ops", type=csv_list(), default=list(CASES), help=f"op families (default: {','.join(CASES)})")
    p.add_argument("--impl", type=csv_list(), help="implementations to time, among eager, compile and each op's "
                   "(default: all); eager always runs once, as the reference output")
    p.add_argument("--device", type=csv_list(), help="cpu, cuda (default: cpu, and cuda when available)")
    p.add_argument("--batch", type=csv_list(int), help="batch sizes (default per op and device, e.g. 1,8,32,64 on cpu)")
    p.add_argument("--dtype", type=csv_list(), help="fp32, fp16, bf16 (default: fp32,bf16 on cpu; all on cuda)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--quick", action="store_true", help="CI-sized: batches 1 and 32, fp32, fewer repetitions")
    p.add_argument("--json", type=pathlib.Path, help="write the machine description and all rows as JSON")
    p.add_argument("--csv", type=pathlib.Path, help="write one row per op, impl, device, dtype, batch, direction")
    p.add_argument("--markdown", type=pathlib.Path, help="write the machine description and the tables as markdown")
    args = p.parse_args(argv)

    known = {"ops": set(CASES), "dtype": set(DTYPES), "device": {"cpu", "cuda"},
             "impl": set(BASELINES).union(*(case.impls for case in CASES.values()))}
    for key, allowed in known.items():
        if set(getattr(args, key) or ()) - allowed:
            p.error(f"--{key}: unknown {sorted(set(getattr(args, key)) - allowed)}, choose from {sorted(allowed)}")
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    budget_s, samples = (0.05, 5) if args.quick else (0.2, 10)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings: the table reports graph counts

    plan = []
    for device in devices:
        dtypes = args.dtype or (["fp32"] if args.quick else DEFAULT_DTYPES[device])
        for op in args.ops:
            case = CASES[op]
            impls = [i for i in (*BASELINES, *case.impls) if args.impl is None or i in args.impl]
            batches = args.batch or [b for b in case.batches[device] if not args.quick or b in (1, 32)]
            for dtype in dtypes:
                for batch in batches:
                    for backward in (False, True) if args.backward else (False,):
                        plan.append((case, torch.device(device), DTYPES[dtype], batch, backward, impls))

    machine = {**describe_machine(), "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
    try:
        from tqdm import tqdm as progress
    except ImportError:
        progress = _Counter
    bar = progress(total=len(devices) + len(plan), file=sys.stderr)
    for device in devices:
        bar.set_postfix_str(f"limits on {device}")
        LIMITS[device] = measure_limits(torch.device(device), budget_s, samples)
        bar.update()
    results = []
    for case, device, dtype, batch, backward, impls in plan:
        direction = "forward+backward" if backward else "forward"
        bar.set_postfix_str(f"{case.op} {device.type} {DTYPE_NAMES[dtype]} batch {batch} {direction}")
        results += bench_row(case, device, dtype, batch, backward, impls, budget_s, samples)
        bar.update()
    bar.close()

    loads = [r["other_load_cores"] for r in results if r["other_load_cores"] is not None]
    if loads:
        machine["other_load_cores_max"] = max(loads)
    text = "\n".join(machine_lines(machine))
    if loads and max(loads) > 0.2:
        text += f"\nWARNING: other processes used up to {max(loads):.1f} cores while timing: results are noisy"
    print(text + "\n\n" + "\n\n".join(render_text(*t) for t in tables(results)))
    for path in (args.json, args.csv, args.markdown):
        if path:
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
        args.markdown.write_text(header + "\n\n" + "\n\n".join(render_markdown(*t) for t in tables(results)) + "\n")


if __name__ == "__main__":
    main()
