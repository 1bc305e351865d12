"""benchmarks/run.py runs, checks every implementation against eager before timing, and reports."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--batch", "1", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = {(r["op"], r["impl"]): r for r in json.loads(out.read_text())["results"]}
    native = rows[("grid_pool", "native")]
    assert native["status"] == "ok" and native["max_abs_err"] < 1e-5
    assert native["median_ms"] > 0 and native["speedup_vs_eager"] > 0 and native["speedup_vs_compile"] > 0
    assert "grid_pool / cpu / fp32 / forward" in result.stdout
