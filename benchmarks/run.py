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

This file is the command line; benchmarks/harness.py holds the timing, counting, checking and the
row runner, benchmarks/cases.py the cases, benchmarks/report.py the tables and the files written.

    python benchmarks/run.py                              # the main rows, fp32: a few minutes on 2 CPU cores
    python benchmarks/run.py --quick                      # CI-sized
    python benchmarks/run.py --full --save benchmarks/results    # everything; DATE-DEVICES.{md,json,csv,png}
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import pathlib
import sys
import tempfile
import time
import unittest.mock

import torch
from tqdm import tqdm  # a dependency of timm's

from cases import CASES, DEFAULT_DTYPES
from harness import BASELINES, DTYPE_NAMES, DTYPES, bench_row, measure_limits
from report import describe_machine, write_report


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

    entries = plan(args, devices)
    kind = ("every batch and dtype (--full)" if args.full else "CI-sized (--quick)" if args.quick else
            "the main rows, fp32, a few minutes on a 2-core CPU (--full: every batch and dtype)")
    print(f"benchmarks/run.py: {len(entries)} rows, {kind}", file=sys.stderr, flush=True)
    command = " ".join(["run.py", *(sys.argv[1:] if argv is None else argv)])
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings: the table reports graph counts
    with tempfile.TemporaryDirectory() as cache_dir:  # cold compiles, as on a fresh machine
        with unittest.mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir):  # read at each use
            results, machine = benchmark(entries, devices, args.quick, command)
    write_report(results, machine, args.json, args.csv, args.markdown, args.plot)


def plan(args: argparse.Namespace, devices: list[str]) -> list[tuple]:
    """The rows main's options ask for: (case, device, dtype, batch, backward, impls) per entry."""
    entries = []
    for device in devices:
        for op in args.ops:
            case = CASES[op]
            impls = [i for i in (*BASELINES, *case.impls) if args.impl is None or i in args.impl]
            for dtype in args.dtype or ((case.dtypes or DEFAULT_DTYPES[device]) if args.full else ["fp32"]):
                batches = case.batches[device] if args.full else case.quick if args.quick else case.default
                for batch in args.batch or batches:
                    for backward in (False, True) if args.backward and case.backward else (False,):
                        entries.append((case, torch.device(device), DTYPES[dtype], batch, backward, impls))
    return entries


def benchmark(entries: list[tuple], devices: list[str], quick: bool, command: str):
    """(rows of every plan entry, the machine description): each device's limits measured first, then
    every entry's rows measured against them."""
    budget_s, samples = (0.05, 5) if quick else (0.2, 10)
    start = time.perf_counter()
    limits: dict[str, dict] = {}  # device type -> measure_limits(), filled before any row runs
    machine = {**describe_machine(limits), "command": command}
    bar = tqdm(total=len(devices) + len(entries), file=sys.stderr)
    for device in devices:
        bar.set_postfix_str(f"limits on {device}")
        dtypes = list(dict.fromkeys(DTYPE_NAMES[entry[2]] for entry in entries if entry[1].type == device))
        limits[device] = measure_limits(torch.device(device), dtypes, budget_s, samples)
        bar.update()
    results = []
    for case, device, dtype, batch, backward, impls in entries:
        direction = "forward+backward" if backward else "forward"
        bar.set_postfix_str(f"{case.op} {device.type} {DTYPE_NAMES[dtype]} batch {batch} {direction}")
        results += bench_row(case, device, dtype, batch, backward, impls, budget_s, samples,
                             limits=limits[device.type])
        bar.update()
    bar.close()
    machine["wall_s"] = time.perf_counter() - start
    loads = [r["other_load_cores"] for r in results if r["other_load_cores"] is not None]
    machine["other_load_cores_max"] = max(loads, default=None)
    return results, machine


if __name__ == "__main__":
    main()
