"""The benchmark's report: the machine a run measured on (describe_machine, machine_lines), the
headline per device, dtype and direction (summary), one table per op (tables), as text or markdown
(render), the speed-ups as a PNG (plot), and the files a run writes (write_report: JSON, CSV,
markdown, PNG).
"""
from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch

import lifeiqa_fast
from cases import CASES
from harness import BASELINES

CSV_FIELDS = ("op", "impl", "device", "dtype", "batch", "direction", "median_ms", "p20_ms", "p80_ms", "samples",
              "speedup_vs_eager", "speedup_vs_compile", "gflops", "gbps", "limit_fraction", "flop_executed",
              "floor_ms", "of_floor", "max_err", "status", "compile_s", "graphs", "other_load_cores")


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(limits: dict) -> dict:
    """The machine and the software a run measures on, with limits: device type -> its
    harness.measure_limits() of this run (the caller's dict, filled as the run measures them)."""
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
            "lifeiqa_fast": lifeiqa_fast.__version__, "git": git, "limits": limits}


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


def write_report(results: list[dict], machine: dict, json_path: pathlib.Path | None = None,
                 csv_path: pathlib.Path | None = None, markdown_path: pathlib.Path | None = None,
                 plot_path: pathlib.Path | None = None) -> None:
    """Print the machine and the tables; write each file whose path is given."""
    text = "\n".join(machine_lines(machine))
    if (machine["other_load_cores_max"] or 0) > 0.2:
        text += f"\nWARNING: other processes used up to {machine['other_load_cores_max']:.1f} cores while timing"
    all_tables = summary(results) + tables(results)
    print(text + "\n\n" + "\n\n".join(render(*t, markdown=False) for t in all_tables))
    for path in filter(None, (json_path, csv_path, markdown_path, plot_path)):
        path.parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        json_path.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    if csv_path:
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
    if markdown_path:
        header = "\n".join(f"- {line}" for line in text.splitlines())
        markdown_path.write_text(header + "\n\n" + "\n\n".join(render(*t, markdown=True) for t in all_tables) + "\n")
    if plot_path:
        plot(results, plot_path, f"{machine['gpu'] or machine['cpu']}, {machine['date']}")
