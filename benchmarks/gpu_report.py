"""Summarise a gpu_check.sh run, and accept its GPU validation records.

  python benchmarks/gpu_report.py OUTDIR          # writes OUTDIR/gpu_check.{md,json} from junit_*.xml etc.
  python benchmarks/gpu_report.py --accept REPORT.json   # adds its records to lifeiqa_fast/validation.json

A kernel (op, backend) is validated when its GPU tests ran and all passed: the tests whose id holds
"native-cuda" (backend "cuda") or "triton-cuda" (backend "triton") in tests/test_<op>.py. The record
names the sha256 of the kernel source that ran, so a later change makes it unvalidated again.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
VALIDATION = ROOT / "lifeiqa_fast" / "validation.json"


def _test_outcomes(outdir: pathlib.Path) -> dict[str, str]:
    """test id ("tests/test_x.py::name[params]") -> passed / failed / skipped, from every junit*.xml in
    outdir (gpu_check.sh writes one per pytest process; a process cut by its time limit leaves none)."""
    outcomes = {}
    cases = [c for junit in sorted(outdir.glob("junit*.xml")) for c in ET.parse(junit).getroot().iter("testcase")]
    for case in cases:
        module = case.get("classname", "").replace(".", "/") + ".py"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped" and status == "passed":
                status = "skipped"
        outcomes[f"{module}::{case.get('name')}"] = status
    return outcomes


def summarise(outdir: pathlib.Path) -> dict:
    import torch

    from lifeiqa_fast.info import OPS, format_info, info
    from lifeiqa_fast.ops._impl import source_hash

    outcomes = _test_outcomes(outdir)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    today = datetime.date.today().isoformat()
    records, kernels = [], []
    for op in OPS:
        for impl, backend in (("native", "cuda"), ("triton", "triton")):
            mine = {k: v for k, v in outcomes.items() if f"test_{op}.py" in k and f"{impl}-cuda" in k}
            ran = [v for v in mine.values() if v != "skipped"]
            ok = bool(ran) and all(v == "passed" for v in ran) and gpu is not None
            kernels.append(dict(op=op, backend=backend, tests_run=len(ran),
                                failed=sum(v == "failed" for v in ran), validated=ok))
            if ok:
                records.append(dict(op=op, backend=backend, source=source_hash(op, backend), gpu=gpu, date=today,
                                    torch=torch.__version__, cuda=torch.version.cuda))
    totals = {s: sum(v == s for v in outcomes.values()) for s in ("passed", "failed", "skipped")}
    report = dict(date=today, gpu=gpu, tests=totals, kernels=kernels, records=records)
    steps_file = outdir / "steps.txt"  # gpu_check.sh: "name exit-status seconds" per step
    steps = [line.split() for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
    report["steps"] = {name: {"exit": rc, "seconds": int(sec)} for name, rc, sec in steps}
    (outdir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")

    built = (outdir / "info.txt").read_text().rstrip() if (outdir / "info.txt").exists() else format_info(info())
    lines = [f"# GPU check {today}: {gpu}", "", "## Steps", "", "| step | exit status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'cut at its time limit' if rc in ('124', '137') else rc} | {sec} |"
              for name, rc, sec in steps]
    lines += ["", "## Build and environment", "", "```", built, "```", "", "## Tests", "",
             f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", "",
             "| op | backend | GPU tests run | failed | validated |", "|---|---|---|---|---|"]
    lines += [f"| {k['op']} | {k['backend']} | {k['tests_run']} | {k['failed']} | {'yes' if k['validated'] else 'NO'} |"
              for k in kernels]
    failed = [k for k, v in outcomes.items() if v == "failed"]
    if failed:
        lines += ["", "Failed tests:", ""] + [f"- `{k}`" for k in failed]
    for name, title in (("bench.md", "Benchmark (benchmarks/run.py --quick)"),
                        ("bench_model.md", "Head and model: composite, CUDA graphs")):
        if (outdir / name).exists():
            lines += ["", f"## {title}", "", (outdir / name).read_text()]
    (outdir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return report


def accept(report_path: pathlib.Path) -> None:
    report = json.loads(report_path.read_text())
    data = json.loads(VALIDATION.read_text())
    known = {(r["op"], r["backend"], r["source"]) for r in data["records"]}
    new = [r for r in report["records"] if (r["op"], r["backend"], r["source"]) not in known]
    data["records"] += new
    VALIDATION.write_text(json.dumps(data, indent=1) + "\n")
    print(f"accepted {len(new)} record(s) into {VALIDATION.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", nargs="?", type=pathlib.Path, help="a gpu_check.sh output folder")
    parser.add_argument("--accept", type=pathlib.Path, metavar="REPORT.json")
    args = parser.parse_args()
    if args.accept:
        accept(args.accept)
    elif args.outdir:
        report = summarise(args.outdir)
        print(json.dumps({k: report[k] for k in ("gpu", "tests", "kernels")}, indent=1))
    else:
        parser.error("give OUTDIR or --accept REPORT.json")


if __name__ == "__main__":
    main()
