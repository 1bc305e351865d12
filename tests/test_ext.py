"""The compiled extension, its absence, the choice of implementation and what info() reports."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lifeiqa_fast
from lifeiqa_fast import _ext
from lifeiqa_fast.ops import _impl

NVCC_PRESENT = bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_extension_built_with_cpu_and_cuda():
    assert _ext.LOADED, _ext.LOAD_ERROR
    assert _ext.has_kernel("grid_pool", "cpu")
    if NVCC_PRESENT and os.environ.get("LIFEIQA_FAST_NO_CUDA") != "1":
        assert _ext.has_kernel("grid_pool", "cuda"), "nvcc is present but the CUDA kernels were not compiled"
        assert lifeiqa_fast.info()["extension"]["backends"] == ["CPU", "CUDA"]


def test_without_extension_reference_serves_and_warns_once():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lifeiqa_fast\n"
        "    from lifeiqa_fast import ops\n"
        "    out = ops.grid_pool(torch.randn(1, 14, 14, 4))\n"
        "mine = [w for w in caught if 'lifeiqa_fast' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in mine]\n"
        "assert 'LIFEIQA_FAST_DISABLE_EXT=1' in str(mine[0].message)\n"
        "assert out.shape == (1, 49, 4)\n"
        "assert lifeiqa_fast.info()['ops']['grid_pool']['auto']['cpu']['impl'] == 'reference'\n"
        "try:\n"
        "    ops.grid_pool(torch.randn(1, 14, 14, 4), impl='native')\n"
        "except RuntimeError as e:\n"
        "    assert 'compiled extension is not loaded' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('impl=native ran without the extension')\n"
    )
    env = {**os.environ, "LIFEIQA_FAST_DISABLE_EXT": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def records(monkeypatch):
    """Replace the GPU validation records; the choice cache is cleared around the test."""
    def use(*recs):
        monkeypatch.setattr(_impl, "_validation_records", lambda: tuple(recs))
        _impl.choose.cache_clear()

    yield use
    _impl.choose.cache_clear()


def test_auto_never_picks_unvalidated_gpu_kernels(records):
    records()
    impl, reason = _impl.choose("grid_pool", "cuda", "auto")
    assert impl == "composite"
    if _ext.has_kernel("grid_pool", "cuda"):
        assert "CUDA kernel compiled but never validated on a GPU" in reason


def test_auto_picks_validated_cuda_kernel(records):
    if not _ext.has_kernel("grid_pool", "cuda"):
        pytest.skip("CUDA kernels not compiled")
    source = _impl.source_hash("grid_pool", "cuda")
    records({"op": "grid_pool", "backend": "cuda", "source": "0" * 64, "gpu": "old", "date": "2026-01-01"})
    assert _impl.choose("grid_pool", "cuda", "auto")[0] == "composite"  # validated at another source revision
    records({"op": "grid_pool", "backend": "cuda", "source": source, "gpu": "NVIDIA H100", "date": "2026-11-27"})
    assert _impl.choose("grid_pool", "cuda", "auto") == ("native", "cuda kernel validated on NVIDIA H100")


def test_auto_on_cpu_is_native():
    assert _impl.choose("grid_pool", "cpu", "auto") == ("native", "C++ CPU kernel")


def test_auto_gives_way_to_the_reference_where_this_cpu_measured_it_faster(monkeypatch):
    """CPU_REFERENCE_FROM, per CPU capability: from its row count on, "auto" runs the reference instead
    of the native kernel (bit for bit the reference's result); below it, and with impl="native", the
    kernel."""
    from lifeiqa_fast.ops import moe

    assert _impl.cpu_capability() in ("amx", "avx512_bf16", "avx512", "avx2", "baseline")
    monkeypatch.setitem(_impl.CPU_REFERENCE_FROM, _impl.cpu_capability(), {("moe", torch.float32): 4})
    gen = torch.Generator().manual_seed(0)
    E, D, F = 4, 40, 48  # enough terms that the two summation orders differ
    weights = [torch.randn(*shape, generator=gen) for shape in ((E, D), (E,), (E, F, D), (E, F), (E, D, F), (E, D))]
    for tokens, want in ((3, "native"), (4, "reference")):
        x = torch.randn(tokens, D, generator=gen)
        auto = moe(x, *weights, top_k=2)[0]
        assert torch.equal(auto, moe(x, *weights, top_k=2, impl=want)[0]), f"{tokens} tokens: auto should run {want}"
        assert not torch.equal(auto, moe(x, *weights, top_k=2, impl="reference" if want == "native" else "native")[0])
    assert _impl.faster_on_this_cpu("moe", "native", "native", x, 4) == "native"
    assert _impl.faster_on_this_cpu("moe", "native", "auto", x.to(torch.bfloat16), 4) == "native"


def test_info_reports_versions_backends_and_choices():
    report = lifeiqa_fast.info()
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["lifeiqa_fast"] == lifeiqa_fast.__version__
    assert report["extension"]["loaded"]
    assert set(report["ops"]["grid_pool"]["auto"]) >= {"cpu"}
    out = subprocess.run([sys.executable, "-m", "lifeiqa_fast.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "compiled extension _C: loaded, backends CPU" in out.stdout
    assert "grid_pool" in out.stdout and "auto on cpu: native" in out.stdout
    assert out.stderr == ""


def test_cpu_kernels_builds_are_switched():
    """The CPU kernels' hot loops exist in an AVX2 + FMA build and a baseline x86-64 one; the tests of
    each native op run on both (helpers.impl_params' native-baseline-cpu params), switched in process by
    set_cpu_isa, or at start by LIFEIQA_FAST_CPU_ISA=baseline."""
    from helpers import cpu_isas

    ops = torch.ops.lifeiqa_fast
    isas = cpu_isas()
    assert ops.cpu_isa() == isas[0]
    assert ops.set_cpu_isa("baseline") == "baseline" and ops.cpu_isa() == "baseline"
    assert ops.set_cpu_isa("best") == isas[0]
    with pytest.raises(RuntimeError, match="isa must be 'baseline' or 'best', got 'sse'"):
        ops.set_cpu_isa("sse")
    started = subprocess.run([sys.executable, "-c", "import lifeiqa_fast, torch; print(torch.ops.lifeiqa_fast.cpu_isa())"],
                             capture_output=True, text=True, env={**os.environ, "LIFEIQA_FAST_CPU_ISA": "baseline"})
    assert started.stdout.strip() == "baseline", started.stderr


@pytest.mark.cpu_isa("baseline")
def test_the_cpu_isa_mark_runs_the_baseline_build():
    assert torch.ops.lifeiqa_fast.cpu_isa() == "baseline"
