import importlib.util
import os
import pathlib
import re
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter: that is how CI tests
# their logic. It must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test runs on every machine, GPU tests aside: a package the suite needs that is missing is an
# install error, reported before any test runs, never a skipped test. module -> pip name.
TEST_PACKAGES = {"pytest": "pytest", "hypothesis": "hypothesis", "huggingface_hub": "huggingface_hub",
                 "skimage": "scikit-image", "scipy": "scipy", "openpyxl": "openpyxl", "matplotlib": "matplotlib",
                 "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
                 **({"triton": "triton"} if sys.platform == "linux" else {})}  # pyproject's extras: Triton on Linux


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a finder refusing it, or a module set to None in sys.modules
        return True


MISSING = [module for module in TEST_PACKAGES if _absent(module)]
# Except on a lent GPU machine (benchmarks/gpu_check.sh sets this), which has only torch, Triton, timm and
# pytest and no network: there the test files that import a missing package at their top, themselves or
# through another test file they import there (test_scale.py imports test_cli.py's fixture), are left out
# of collection, and the run says which (a test importing one in its body fails alone, if it is run).
MISSING_OK = os.environ.get("LIFEIQA_FAST_TESTS_MISSING_OK", "0") == "1"
collect_ignore = []
if MISSING and MISSING_OK:
    _top = re.compile(r"^(?:from|import)\s+(\w+)", re.M)
    _names = {f.stem: set(_top.findall(f.read_text())) for f in pathlib.Path(__file__).parent.glob("test_*.py")}
    _left_out = {name for name, imported in _names.items() if imported & set(MISSING)}
    while True:  # and the files importing those, until none is added
        more = {name for name, imported in _names.items() if imported & _left_out} - _left_out
        if not more:
            break
        _left_out |= more
    collect_ignore = sorted(f"{name}.py" for name in _left_out)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_isa(isa): run the CPU kernels' build for isa (helpers.impl_params)")
    if MISSING and not MISSING_OK:
        raise pytest.UsageError(f"the test suite needs {', '.join(TEST_PACKAGES[m] for m in MISSING)}, not "
                                f"installed here: pip install --no-build-isolation -e \".[all]\" (README, Install)")


def pytest_report_header(config):
    if collect_ignore:
        return f"LIFEIQA_FAST_TESTS_MISSING_OK: without {', '.join(MISSING)}, not collected: {', '.join(collect_ignore)}"
    return None


try:
    from hypothesis import settings
except ImportError:  # pytest_configure refuses the run, or on a GPU machine test_properties.py is left out
    pass
else:
    # "ci" (the default): test_properties.py's examples are the same every run, so that a run's verdict
    # does not depend on its luck; "explore" draws new ones, more of them. Loaded before the hypothesis
    # plugin reads --hypothesis-profile, which therefore overrides it.
    settings.register_profile("ci", max_examples=25, derandomize=True)
    settings.register_profile("explore", max_examples=500)
    settings.load_profile("ci")



@pytest.fixture(autouse=True)
def cpu_isa(request):
    """For a test marked cpu_isa("baseline"): the CPU kernels run their baseline x86-64 build (the op
    set_cpu_isa), whatever this CPU has; the best build again after it."""
    marker = request.node.get_closest_marker("cpu_isa")
    if marker is None:
        yield None
        return
    isa = marker.args[0]
    assert torch.ops.lifeiqa_fast.set_cpu_isa(isa) == isa
    try:
        yield isa
    finally:
        torch.ops.lifeiqa_fast.set_cpu_isa("best")
