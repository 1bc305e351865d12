"""Shared test helpers: which (device, impl) pairs exist here, and comparison against the reference."""
from __future__ import annotations

import pytest
import torch

from lifeiqa_fast.ops._impl import _why_not


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def impl_params(op: str, composite: bool = False) -> list:
    """pytest params "impl-device" for every kernel of op on every device present: native and Triton where
    they can run (on CUDA whether or not validated: these tests are what validates them), and the
    composite implementation if composite (tests of what any implementation must do, not of a custom
    op's machinery). A kernel that cannot run here is skipped with its reason. Not the reference: the
    tests compare with it (it is checked against the authors' code in test_golden.py and test_optimize.py).
    """
    params = []
    for device in devices():
        for impl in ("composite", "native", "triton") if composite else ("native", "triton"):
            why = _why_not(op, impl, device)
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if why is not None:
                marks.append(pytest.mark.skip(reason=why))
            params.append(pytest.param((impl, device), id=f"{impl}-{device}", marks=marks))
            if impl == "native" and device == "cpu" and why is None and cpu_isas() == ["avx2", "baseline"]:
                # the same tests on the baseline x86-64 build of the CPU kernels (conftest's cpu_isa fixture)
                params.append(pytest.param((impl, device), id="native-baseline-cpu",
                                           marks=[*marks, pytest.mark.cpu_isa("baseline")]))
    return params


def cpu_isas() -> list[str]:
    """The builds of the CPU kernels this machine runs: ["avx2", "baseline"] on an x86 CPU with AVX2 + FMA
    (the baseline one forced by set_cpu_isa), else ["baseline"]; [] without the compiled ops."""
    ops = torch.ops.lifeiqa_fast
    if not hasattr(ops, "cpu_isa"):
        return []
    best = ops.set_cpu_isa("best")
    return ["avx2", "baseline"] if best == "avx2" else ["baseline"]


def dtypes_for(impl: str, device: str) -> list[torch.dtype]:
    """fp32 and bf16 everywhere; fp16 on CUDA and Triton (CPU half kernels are not a target)."""
    low = [torch.bfloat16] + ([torch.float16] if device == "cuda" or impl == "triton" else [])
    return [torch.float32, *low]


def tolerance(table: dict, interpreter_table: dict, impl: str, device: str, dtype: torch.dtype) -> dict:
    """The op's tolerance row for dtype: interpreter_table's where Triton runs interpreted on CPU tensors
    (its bf16 conversion truncates, see each op's table), else table's."""
    if impl == "triton" and device == "cpu" and dtype in interpreter_table:
        return interpreter_table[dtype]
    return table[dtype]


def assert_matches_reference(actual, reference_lowp, truth, tol, what: str) -> None:
    """Compare a kernel's result with the reference's.

    actual: the kernel's output in the test dtype; reference_lowp: the reference computed in that same
    dtype; truth: the reference computed in float64 from the same inputs. tol = (atol, rtol, slack):
    the kernel must be within atol + rtol * |truth| of truth, or, in low precision, no further from
    truth than slack times the reference's own error in that precision.
    """
    atol, rtol, slack = tol
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert actual.dtype == reference_lowp.dtype, f"{what}: dtype {actual.dtype} != {reference_lowp.dtype}"
    if truth.numel() == 0:
        return
    err = (actual.double() - truth).abs()
    bound = atol + rtol * truth.abs()
    if bool((err <= bound).all()):
        return
    ref_err = (reference_lowp.double() - truth).abs().max().item()
    assert err.max().item() <= slack * ref_err + atol, (
        f"{what}: max error {err.max().item():.3g} vs truth exceeds atol {atol} + rtol {rtol} and "
        f"{slack} x the reference's own error {ref_err:.3g}"
    )


def assert_gradients_match(names, grads, grads_reference_lowp, grads_truth, tol, what: str) -> None:
    """assert_matches_reference for each named gradient, atol scaled by the gradient's size: a weight
    gradient sums over every token of the batch."""
    atol, rtol, slack = tol
    for name, g, r, t in zip(names, grads, grads_reference_lowp, grads_truth, strict=True):
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        assert_matches_reference(g, r, t, (atol * scale, rtol, slack), f"{what} d{name}")
