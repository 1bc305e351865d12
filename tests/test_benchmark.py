"""benchmarks/run.py (with harness.py, cases.py and report.py) runs, checks every implementation against
eager before timing, and reports."""
import importlib
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
MODULES = ("harness", "cases", "report", "run")  # benchmarks/*.py, imported by name from their folder
# Made-up machine limits for the toy rows (a run measures them: harness.measure_limits)
TOY_LIMITS = {"gemm_gflops": {"fp32": 100.0, "bf16": 100.0}, "copy_gbps": 10.0}


@pytest.fixture(scope="module")
def bench():
    """benchmarks/{harness,cases,report,run}.py as modules (bench.harness, ...), imported as
    `python benchmarks/run.py` imports them: with their folder first on sys.path."""
    assert not set(MODULES) & set(sys.modules), "a module of the same name is already imported"
    sys.path.insert(0, str(BENCHMARKS))
    try:
        modules = {name: importlib.import_module(name) for name in MODULES}
        assert all(pathlib.Path(m.__file__).parent == BENCHMARKS for m in modules.values())
        yield types.SimpleNamespace(**modules)
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in MODULES:
            sys.modules.pop(name, None)


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    plot = ["--plot", str(png)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--ops", "grid_pool,head", "--batch", "1",
         "--device", "cpu", "--json", str(out), *plot],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = {(r["op"], r["impl"]): r for r in json.loads(out.read_text())["results"]}
    # Triton runs on CPU tensors only interpreted: never timed (conftest sets TRITON_INTERPRET=1).
    assert set(rows) == {("grid_pool", i) for i in ("eager", "compile", "composite", "native", "triton")} | {
        ("head", i) for i in ("eager", "compile", "optimized", "composite", "composite-compile", "composite-graph")}
    assert rows[("head", "composite-graph")]["status"] == "n/a (CUDA graphs: CUDA only)"
    assert rows[("grid_pool", "triton")]["status"].startswith("n/a") and "median_ms" not in rows[("grid_pool", "triton")]
    for op in ("grid_pool", "head"):
        eager, compiled = rows[(op, "eager")], rows[(op, "compile")]
        assert compiled["compile_s"] > 0 and compiled["graphs"] >= 1
        for (row_op, impl), r in rows.items():
            if row_op != op or impl in ("triton", "composite-graph"):
                continue
            assert (r["device"], r["dtype"], r["batch"], r["direction"]) == ("cpu", "fp32", 1, "forward")
            assert r["status"] == "ok" and r["max_err"] < 1e-5, r
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] >= 5
            assert r["gflops"] > 0 and r["gbps"] > 0 and r["limit_fraction"] > 0
            assert r["floor_ms"] > 0 and math.isclose(r["of_floor"], r["floor_ms"] / r["median_ms"], rel_tol=1e-9)
            assert math.isclose(r["speedup_vs_eager"], eager["median_ms"] / r["median_ms"], rel_tol=1e-9)
            assert math.isclose(r["speedup_vs_compile"], compiled["median_ms"] / r["median_ms"], rel_tol=1e-9)
    assert "summary / cpu / fp32 / forward" in result.stdout and "head / cpu / fp32 / forward" in result.stdout
    assert not plot or png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_without_matplotlib_names_the_option_and_the_extra(bench, monkeypatch, capsys, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit):
        bench.run.main(["--save", str(tmp_path), "--quick", "--ops", "grid_pool"])
    err = capsys.readouterr().err
    assert "--save writes a PNG plot and needs matplotlib" in err and "[bench]" in err


@pytest.mark.parametrize("dtype, backward", [
    (torch.float32, False),
    (torch.float32, True),  # the gradients are right, the output is not
    (torch.bfloat16, False),  # compared with eager in fp32, beside eager's own bf16 error
], ids=["fp32-forward", "fp32-forward+backward", "bf16-forward"])
def test_wrong_implementation_is_reported_and_not_timed(bench, dtype, backward):
    def build(impl, device, dtype):
        eager = lambda x: x.mean(dim=(1, 2))  # noqa: E731
        if impl == "off_by_one":
            return (lambda x: eager(x) + 1), ()
        if impl == "raises":
            def fail(x):
                raise ValueError("no kernel for this shape")
            return fail, ()
        if impl == "missing":
            raise bench.harness.Unavailable("unavailable: not built")
        return eager, ()

    case = bench.harness.Case("toy", lambda b, dtype, device: (torch.randn(b, 4, 4, 8, dtype=dtype, device=device),),
                              build, ("off_by_one", "raises", "missing"), bench.cases.GRID_POOL_TOLERANCE,
                              batches={"cpu": (2,)}, quick=(2,), default=(2,))
    rows = {r["impl"]: r for r in bench.harness.bench_row(case, torch.device("cpu"), dtype, 2, backward,
                                                           ["eager", "off_by_one", "raises", "missing"], 0.01, 5,
                                                           limits=TOY_LIMITS)}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["median_ms"] > 0 and rows["eager"]["max_err"] < 1e-2
    assert rows["off_by_one"]["status"].startswith("mismatch")
    assert rows["off_by_one"]["max_err"] == pytest.approx(1.0, abs=1e-2)
    assert rows["raises"]["status"] == "error: ValueError: no kernel for this shape"
    assert rows["missing"]["status"] == "unavailable: not built"
    for impl in ("off_by_one", "raises", "missing"):
        assert "median_ms" not in rows[impl], rows[impl]


def test_failing_eager_reports_the_row_and_the_run_goes_on(bench):
    def build(impl, device, dtype):
        def fail(x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")
        return fail, ()

    case = bench.harness.Case("toy", lambda b, dtype, device: (torch.randn(b, 3, dtype=dtype, device=device),), build,
                              ("native",), bench.cases.GRID_POOL_TOLERANCE, batches={"cpu": (1,)}, quick=(1,),
                              default=(1,))
    rows = bench.harness.bench_row(case, torch.device("cpu"), torch.float32, 1, False, ["eager", "compile", "native"],
                                   0.01, 5, limits=TOY_LIMITS)
    assert [r["impl"] for r in rows] == ["eager", "compile", "native"]
    for r in rows:
        assert r["status"] == "not run: eager RuntimeError: CUDA out of memory. Tried to allocate 9 GiB"
        assert "median_ms" not in r and r["batch"] == 1 and r["op"] == "toy"


def test_onnx_row_without_onnxruntime_says_why_and_is_not_timed(bench, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    with pytest.raises(bench.harness.Unavailable, match=r"^n/a \(onnxruntime not installed: .*\[onnx\]"):
        bench.cases.CASES["onnx"].build("onnxruntime", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("op, ours, theirs", [("gcn", "native", "composite"), ("moe", "native-grouped", "eager"),
                                              ("cross_attention", "native", None)])
def test_our_ops_flop_formulas_match_the_aten_count(bench, op, ours, theirs):
    """The FLOP counted for our custom ops (OUR_OP_FLOP, the floors' numerator) against torch's own count
    of an ATen implementation of the same work: the same to the terms the formulas leave out (gcn: the
    closed-form graph instead of the (N, N) product; moe: the same products). cross_attention's eager
    attention is not counted by torch (its fused SDPA call), so its formula is checked by hand."""
    case, cpu = bench.cases.CASES[op], torch.device("cpu")
    inputs = case.make_inputs(8, torch.float32, cpu)

    def count(impl):
        fn, _ = case.build(impl, cpu, torch.float32)
        with torch.no_grad(), bench.harness.FlopCount() as counter:
            fn(*inputs)
        return counter.total

    if theirs is not None:
        assert count(ours) == pytest.approx(count(theirs), rel=0.05)
    else:  # (B, Nq, D) = (8, 6, 384), 49 keys: 2 (D x D) projections and 2 (Nq x Nk x D) products per image
        assert count(ours) == 8 * (2 * 2 * 6 * 384 * 384 + 2 * 2 * 6 * 49 * 384)


def test_decoder_memory_flop_formula_matches_the_aten_count(bench):
    """The native decoder stack (decoder_memory, taken without autograd) is counted as its layers'
    composite path counts under autograd: attend_memory's batched GEMMs as torch counts them, the same
    gcn op."""
    case, cpu = bench.cases.CASES["decoder"], torch.device("cpu")
    inputs = case.make_inputs(2, torch.float32, cpu)
    fn, _ = case.build("native-memory", cpu, torch.float32)
    counts = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof, bench.harness.FlopCount() as counter:
            fn(*inputs)
        ran = {e.key for e in prof.key_averages()}
        assert ("lifeiqa_fast::decoder_memory" in ran) != grad, "one count through the stack op, one without it"
        counts.append(counter.total)
    assert counts[0] == pytest.approx(counts[1], rel=1e-6)

