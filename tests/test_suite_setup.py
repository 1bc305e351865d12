"""The suite's own set-up (tests/conftest.py): a missing package stops the run before any test, naming
it; on a lent GPU machine (LIFEIQA_FAST_TESTS_MISSING_OK=1) the files that need it are left out instead."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import impl_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# pytest run with scikit-image made unimportable: a finder ahead of the others refuses it.
WITHOUT_SKIMAGE = """
import sys
import pytest

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "skimage":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
sys.exit(pytest.main(sys.argv[1:]))
"""


def _pytest_without_skimage(*args, missing_ok: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIFEIQA_FAST_TESTS_MISSING_OK": "1" if missing_ok else "0"}
    return subprocess.run([sys.executable, "-c", WITHOUT_SKIMAGE, "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_missing_package_stops_the_run_naming_it():
    proc = _pytest_without_skimage("--co", "-q", "tests/test_metrics.py", missing_ok=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # a usage error: no test ran
    assert "the test suite needs scikit-image" in proc.stderr and ".[all]" in proc.stderr


def test_on_a_gpu_machine_the_files_needing_it_are_left_out():
    proc = _pytest_without_skimage("--co", "-q", "tests", missing_ok=True)  # (files named on the command
    # line are collected whatever conftest says: gpu_check.sh names the folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for left_out in ("test_cli.py", "test_scorer.py"):  # they import skimage at their top
        assert f"{left_out}::" not in proc.stdout
    assert "test_synthetic.py::" in proc.stdout  # imports it in one test's body only
    assert "test_metrics.py::" in proc.stdout and "test_model.py::" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton kernels run compiled, on it")
def test_without_a_gpu_the_triton_kernels_run_interpreted_not_skipped():
    """conftest sets TRITON_INTERPRET=1 where there is no GPU, so that every Triton test runs on CPU
    tensors: no test of the suite is skipped for Triton."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for op in ("grid_pool", "gcn", "cross_attention", "moe"):
        triton_cpu = [p for p in impl_params(op) if p.id == "triton-cpu"]
        assert triton_cpu and not triton_cpu[0].marks, (op, triton_cpu)
