"""The preflight: every Triton kernel compiled ahead of time for sm_80 and sm_90 (with the argument
specialisation of a real launch), every CUDA kernel of _C free of spills, and the host-side defects
that only a GPU would show (device guards, the shared-memory attribute, the build record) kept out.
No GPU is needed; see lifeiqa_fast/preflight.py."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lifeiqa_fast
from lifeiqa_fast import _ext, preflight
from lifeiqa_fast.ops import _impl

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("grid_pool", "gcn", "cross_attention", "moe")


def _jit_kernels(op: str) -> set[str]:
    """The @triton.jit functions of lifeiqa_fast/triton/<op>.py that are launched (a name[grid] call)."""
    source = (ROOT / "lifeiqa_fast" / "triton" / f"{op}.py").read_text()
    return set(re.findall(r"\b(_\w+_kernel)\[", source))


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory):
    """The Triton preflight for both targets, one process each (TRITON_INTERPRET unset: the interpreter
    replaces the kernels that are compiled)."""
    from triton import knobs
    try:
        knobs.nvidia.ptxas.path  # noqa: B018 - raises where no ptxas is found (Triton's own or the toolkit's)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"no ptxas to compile Triton kernels with: {exc}")
    folder = tmp_path_factory.mktemp("preflight")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = pathlib.Path(knobs.cache.dir)

    def run(target):
        out = folder / f"{target}.json"
        # A Triton cache of its own per process: two processes filling one cold cache at once lost files.
        own = {**env, "TRITON_CACHE_DIR": str(cache / f"lifeiqa-preflight-{target}")}
        proc = subprocess.run([sys.executable, "-m", "lifeiqa_fast.preflight", "--no-cuda", "--targets", target,
                               "--json", str(out)], capture_output=True, text=True, env=own, timeout=1200)
        return proc, out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, preflight.TARGETS))
    checks, logs = [], []
    for proc, out in results:
        logs.append(proc.stdout[-3000:] + proc.stderr[-3000:])
        assert out.exists(), f"the preflight wrote no report:\n{logs[-1]}"
        report = json.loads(out.read_text())
        checks += report["checks"]
    return checks, "\n".join(logs)


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm80_and_sm90(triton_report):
    checks, log = triton_report
    failed = [f"{c['target']} {c['kernel']} [{c['case']}]: {c['error']}" for c in checks if not c["ok"]]
    assert not failed, "\n".join(failed)
    for op in OPS:
        for target in preflight.TARGETS:
            compiled = {c["kernel"] for c in checks if c["op"] == op and c["target"] == target}
            assert compiled == _jit_kernels(op), f"{op} on {target}: compiled {compiled}, kernels {_jit_kernels(op)}"


@pytest.mark.slow
def test_preflight_covers_every_dtype_and_the_edge_shapes(triton_report):
    checks, _ = triton_report
    for op in OPS:
        cases = [c["case"] for c in checks if c["op"] == op]
        for dtype in preflight.DTYPES:
            assert any(case.endswith(dtype) for case in cases), (op, dtype)
        assert any(case.startswith("edge") for case in cases), op
        assert any(case.startswith("Life-IQA") for case in cases), op


def test_preflight_record_names_the_current_triton_sources():
    """lifeiqa_fast/preflight.json (what info() reports) was written by a passing preflight of the Triton
    sources as they are: a kernel edited without running the preflight again fails here."""
    for op in OPS:
        record = _impl.preflight_record(op)
        assert record is not None, (f"no preflight record for the current lifeiqa_fast/triton/{op}.py: run "
                                    f"python -m lifeiqa_fast.preflight --record")
        assert set(record["targets"]) == set(preflight.TARGETS)
        reported = lifeiqa_fast.info()["ops"][op]["preflight"]["triton"]
        assert reported["preflight"].startswith("passed") and set(reported["compiled_for"]) == set(preflight.TARGETS)


def test_judge_fails_spills_at_life_iqa_shapes_and_shared_memory_over_the_limit():
    spill = preflight.Check("triton", "moe", "k", "sm_80", "Life-IQA ..., bf16", fp64=False, spills=12, shared=10)
    preflight._judge(spill, 166912)
    assert not spill.ok and "spill" in spill.error
    edge = preflight.Check("triton", "moe", "k", "sm_80", "limit ..., bf16", fp64=False, life_iqa=False, spills=12)
    preflight._judge(edge, 166912)
    assert edge.ok and "spill" in edge.note
    fp64 = preflight.Check("triton", "moe", "k", "sm_80", "Life-IQA ..., fp64", fp64=True, spills=12)
    preflight._judge(fp64, 166912)
    assert fp64.ok
    big = preflight.Check("triton", "gcn", "k", "sm_80", "Life-IQA ..., fp64", fp64=True, shared=213504)
    preflight._judge(big, 166912)
    assert not big.ok and "213504" in big.error


@pytest.mark.skipif(not (_ext.LOADED and _ext.BUILD_INFO.get("cuda")), reason="_C was built without CUDA")
def test_cuda_kernels_built_for_every_architecture_without_spills():
    checks = preflight.cuda_checks()
    failed = [f"{c.target} {c.kernel} {c.case}: {c.error}" for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    archs = {f"sm_{a.replace('.', '')}" for a in _ext.BUILD_INFO["cuda_arch_list"].replace("+PTX", "").split(";")}
    for op in OPS:
        assert {c.target for c in checks if c.op == op} == archs, op
        assert lifeiqa_fast.info()["ops"][op]["preflight"]["cuda"]["preflight"].startswith("passed"), op


def test_build_record_is_compiled_into_the_binary():
    """The source hashes a GPU validation record names come from _C itself, not from a file written
    before compiling (a failed rebuild would leave an old _C beside new hashes)."""
    if not _ext.LOADED:
        pytest.skip(f"_C not loaded: {_ext.LOAD_ERROR}")
    info = json.loads(torch.ops.lifeiqa_fast.build_info())
    assert set(info) == {"cuda", "cuda_arch_list", "cuda_sources"}, info  # setup.py's header, not CMake's "{}"
    assert not (ROOT / "lifeiqa_fast" / "_build_info.json").exists()
    if info["cuda"]:
        assert set(info["cuda_sources"]) == set(OPS)
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in info["cuda_sources"].values())
        assert _impl.source_hash("gcn", "cuda") == info["cuda_sources"]["gcn"]  # what validation records name


def test_dynamic_shared_memory_limit_is_set_once_per_device():
    """cudaFuncSetAttribute only in allow_max_smem (kernels/common.cuh), set once per kernel and device
    to the device's maximum: a per-call set to the call's own size races with other host threads."""
    for cu in (ROOT / "kernels").glob("*.cu"):
        assert "cudaFuncSetAttribute" not in cu.read_text(), cu.name
    assert "cudaFuncSetAttribute" in (ROOT / "kernels" / "common.cuh").read_text()


def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every wrapper that launches a kernel makes its first
    tensor's device current, as the CUDA ops' device guard does."""
    import importlib
    import inspect

    for op in OPS:
        module = importlib.import_module(f"lifeiqa_fast.triton.{op}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and re.search(r"_kernel\[", inspect.getsource(fn)):
                assert getattr(fn, "on_tensor_device", False), f"lifeiqa_fast.triton.{op}.{name} launches " \
                                                               f"a kernel without @on_tensor_device"

    from lifeiqa_fast.triton import on_tensor_device

    current = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    class OnCuda1:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen = on_tensor_device(lambda x: list(current))(OnCuda1())
    assert seen == [torch.device("cuda", 1)] and current == []
    assert on_tensor_device(lambda x: list(current))(torch.zeros(1)) == []
