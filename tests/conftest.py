import importlib.util
import os

import pytest
import torch

# Every test runs on every machine, GPU tests aside: a package the suite needs that is missing is an
# install error, reported before any test runs, never a skipped test. module -> pip name.
TEST_PACKAGES = {"pytest": "pytest", "hypothesis": "hypothesis", "safetensors": "safetensors",
                 "skimage": "scikit-image", "scipy": "scipy", "openpyxl": "openpyxl", "matplotlib": "matplotlib",
                 "triton": "triton"}


def pytest_configure(config):
    missing = [pip for module, pip in TEST_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError(f"the test suite needs {', '.join(missing)}, not installed here: "
                                f"pip install --no-build-isolation -e \".[all]\" (README, Install)")

# Without a GPU, Triton kernels run on CPU tensors through the interpreter: that is how CI tests
# their logic. It must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import settings
except ImportError:  # test_properties.py then fails to import, saying so
    pass
else:
    # "ci" (the default): test_properties.py's examples are the same every run, so that a run's verdict
    # does not depend on its luck; "explore" draws new ones, more of them. Loaded before the hypothesis
    # plugin reads --hypothesis-profile, which therefore overrides it.
    settings.register_profile("ci", max_examples=25, derandomize=True)
    settings.register_profile("explore", max_examples=500)
    settings.load_profile("ci")

