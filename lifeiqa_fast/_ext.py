"""Loads the compiled extension lifeiqa_fast._C and says what it holds.

If _C is missing or fails to load, the package still imports, the reference implementations serve,
and one warning says why (with the loader's message). LIFEIQA_FAST_DISABLE_EXT=1 skips loading it,
to run (and test) the package as if it had not been built.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import pathlib
import warnings

import torch

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def library_path() -> pathlib.Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / f"_C{suffix}"
        if path.exists():
            return path
    return None


def _load() -> tuple[bool, str | None]:
    if os.environ.get("LIFEIQA_FAST_DISABLE_EXT", "0") == "1":
        return False, "LIFEIQA_FAST_DISABLE_EXT=1 is set"
    path = library_path()
    if path is None:
        return False, f"no compiled extension _C in {PACKAGE_DIR} (build it: pip install --no-build-isolation -e .)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return False, f"{path.name} failed to load: {exc}"
    return True, None


LOADED, LOAD_ERROR = _load()
if not LOADED:
    warnings.warn(
        f"lifeiqa_fast: the compiled kernels are unavailable ({LOAD_ERROR}); "
        "the reference implementations serve every op",
        RuntimeWarning,
        stacklevel=2,
    )


def _read_build_info() -> dict:
    """What the loaded _C was compiled from, as compiled into it (setup.py, csrc/library.cpp): the CUDA
    source hashes name the kernels a GPU validation record applies to. {} when _C is not loaded, or was
    built from a source older than that op (it then records nothing any validation could match)."""
    if not LOADED:
        return {}
    if not hasattr(torch.ops.lifeiqa_fast, "build_info"):
        warnings.warn("lifeiqa_fast: the compiled extension _C predates its build record; rebuild it "
                      "(pip install --no-build-isolation -e .) for the GPU kernels to be recognised",
                      RuntimeWarning, stacklevel=2)
        return {}
    return json.loads(torch.ops.lifeiqa_fast.build_info())


BUILD_INFO = _read_build_info()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether _C registered a kernel of lifeiqa_fast::<op> for the device type ("cpu" or "cuda")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lifeiqa_fast::{op}", device_type.upper())
