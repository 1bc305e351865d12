"""Shared test helpers: which (device, impl) pairs exist here, the ops' tolerances, random inputs, and
comparison against the reference."""
from __future__ import annotations

import pytest
import torch

from lifeiqa_fast.loss import router_loss
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


# ---------------------------------------------------------------- tolerances

# (atol, rtol, slack) per op, per dtype, forward and backward, as assert_matches_reference reads them: the
# kernel within atol + rtol * |truth| of the float64 truth or, in low precision, no further from it than
# slack times the reference's own error in that precision.
TOLERANCE = {
    # A bin mean is a short fp32 sum rounded once: fp32 differs from the float64 truth by summation order
    # only; in bf16/fp16 the kernels round once where the reference (sum, round, divide, round) rounds
    # twice, so they must be no worse than it.
    "grid_pool": {
        torch.float32: {"forward": (1e-6, 1e-6, 1.0), "backward": (1e-7, 1e-6, 1.0)},
        torch.bfloat16: {"forward": (1e-3, 4e-3, 1.0), "backward": (1e-4, 4e-3, 1.0)},
        torch.float16: {"forward": (1e-4, 5e-4, 1.0), "backward": (1e-5, 5e-4, 1.0)},
    },
    # fp32: the kernels sum in another order than the reference's bmm (and the fixed graph in closed
    # form), a few ulps through three layers. bf16/fp16: the kernels keep h1, h2 in fp32 where the
    # reference rounds them, so they must be no further from the float64 truth than the reference is in
    # that precision (slack 1.5 for rounding luck).
    "gcn": {
        torch.float32: {"forward": (1e-5, 1e-5, 1.0), "backward": (1e-4, 1e-4, 1.0)},
        torch.bfloat16: {"forward": (2e-2, 2e-2, 1.5), "backward": (5e-2, 5e-2, 1.5)},
        torch.float16: {"forward": (2e-3, 2e-3, 1.5), "backward": (5e-3, 5e-3, 1.5)},
    },
    # fp32: the kernels sum the LayerNorm, the scores and P V in another order than ATen, a few ulps
    # through two projections. bf16/fp16: q and o are rounded to the dtype as the module rounds them,
    # the rest is fp32; the kernel must be no further from the float64 truth than twice the reference's
    # own error in that precision.
    "cross_attention": {
        torch.float32: {"forward": (2e-5, 2e-5, 1.0), "backward": (1e-4, 1e-4, 1.0)},
        torch.bfloat16: {"forward": (2e-2, 2e-2, 2.0), "backward": (5e-2, 5e-2, 2.0)},
        torch.float16: {"forward": (2e-3, 2e-3, 2.0), "backward": (5e-3, 5e-3, 2.0)},
    },
    # fp32: the kernels sum the gated expert outputs in fp32 and in another order than the reference's
    # per-expert loop. bf16/fp16: the kernels round once where the reference rounds each expert's
    # product; no further from the float64 truth than twice the reference's error.
    "moe": {
        torch.float32: {"forward": (1e-5, 1e-5, 1.0), "backward": (1e-4, 1e-4, 1.0)},
        torch.bfloat16: {"forward": (2e-2, 2e-2, 2.0), "backward": (5e-2, 5e-2, 2.0)},
        torch.float16: {"forward": (2e-3, 2e-3, 2.0), "backward": (5e-3, 5e-3, 2.0)},
    },
}
# attend_memory computes cross_attention's layer from the memory itself (the queries taken to it): the
# same roundings, against the authors' module call.
TOLERANCE["attend_memory"] = TOLERANCE["cross_attention"]

# Where Triton runs interpreted on CPU tensors; on a GPU TOLERANCE applies. The interpreter converts to
# bf16/fp16 by truncation, where GPUs round to nearest.
INTERPRETER_TOLERANCE = {
    # up to one ulp (2^-7 relative in bf16, 2^-10 in fp16) instead of half of one
    "grid_pool": {
        torch.bfloat16: {"forward": (1e-3, 2**-7, 1.0), "backward": (1e-4, 2**-7, 1.0)},
        torch.float16: {"forward": (1e-4, 2**-10, 1.0), "backward": (1e-5, 2**-10, 1.0)},
    },
    # h1 and h2, stored in bf16 between layers, are biased toward zero, which flips ReLU masks near zero
    # and moves the gradients further from the truth than the reference's own bf16 error
    "gcn": {torch.bfloat16: {"forward": (2e-2, 2e-2, 3.0), "backward": (5e-2, 5e-2, 8.0)}},
    # q and o, stored in bf16, are biased toward zero
    "cross_attention": {torch.bfloat16: {"forward": (2e-2, 2e-2, 4.0), "backward": (5e-2, 5e-2, 4.0)}},
    "moe": {torch.bfloat16: {"forward": (2e-2, 2e-2, 4.0), "backward": (5e-2, 5e-2, 4.0)}},
}


def tolerance(op: str, impl: str, device: str, dtype: torch.dtype) -> dict:
    """op's tolerance row for dtype: INTERPRETER_TOLERANCE's where Triton runs interpreted on CPU tensors
    (and that table has the dtype), else TOLERANCE's."""
    if impl == "triton" and device == "cpu" and dtype in INTERPRETER_TOLERANCE[op]:
        return INTERPRETER_TOLERANCE[op][dtype]
    return TOLERANCE[op][dtype]


# ---------------------------------------------------------------- inputs

def randn_from(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """shift + scale * randn(shape) drawn from gen in float64, then rounded to dtype on device: every
    dtype a test runs sees the same values (rounded), and the float64 truth their exact ones."""
    return (shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def small_args(op: str, dtype: torch.dtype = torch.float32) -> list:
    """Valid arguments of the public op (lifeiqa_fast.ops.<op>) at small sizes, in its schema order, drawn
    from torch's global generator: B=2 images of N=6 tokens of D=16 channels, 2 heads, a memory of 7;
    moe: T=5 tokens, E=4 experts of F=12, k=2; grid_pool: a 14 x 14 map onto a 7 x 7 grid."""
    B, N, D, E, F, T = 2, 6, 16, 4, 12, 5

    def r(*shape):
        return torch.randn(*shape, dtype=dtype)

    return {
        "gcn": lambda: [r(B, N, D), None, r(D, 8), r(8), r(8, 4), r(4), r(4, D), r(D)],
        "cross_attention": lambda: [r(B, N, D), r(B, 7, 2, D), r(D), r(D), r(D, D), r(D), r(D, D), r(D), 2, 1e-5],
        "attend_memory": lambda: [r(B, N, D), r(B, 7, D), r(D), r(D), r(3 * D, D), r(3 * D), r(D, D), r(D), 2, 1e-5],
        "moe": lambda: [r(T, D), r(E, D), r(E), r(E, F, D), r(E, F), r(E, D, F), r(E, D), 2, None],
        "grid_pool": lambda: [r(B, 14, 14, D), 7],
    }[op]()


RAW_TAIL = {"moe": (False,)}  # the raw op's arguments beyond the public function's (moe: dense=False)


def float64_leaves(tensors) -> list[torch.Tensor]:
    """The same values in float64, leaves that require grad: the inputs of the float64 truth."""
    return [t.detach().double().requires_grad_() for t in tensors]


def moe_loss(out, aux, z, dout) -> torch.Tensor:
    """<dout, out> + router_loss(aux, z): one scalar through all three of moe's outputs (T, D), (), (),
    the router's losses weighed as training weighs them; its gradients are the backward under test."""
    return (out * dout).sum() + router_loss(aux, z)


# ---------------------------------------------------------------- comparison with the reference

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


def assert_each_matches_reference(names, actual, reference_lowp, truth, tol, what: str) -> None:
    """assert_matches_reference for each named tensor, atol per unit of its largest |truth| (at least 1):
    a weight gradient sums over every token of the batch, random values are drawn at any scale."""
    atol, rtol, slack = tol
    for name, a, r, t in zip(names, actual, reference_lowp, truth, strict=True):
        unit = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        assert_matches_reference(a, r, t, (atol * unit, rtol, slack), f"{what} {name}")


def assert_gradients_match(names, grads, grads_reference_lowp, grads_truth, tol, what: str) -> None:
    """assert_each_matches_reference for the gradients of the inputs named names (reported as d<name>)."""
    assert_each_matches_reference([f"d{name}" for name in names], grads, grads_reference_lowp, grads_truth, tol,
                                  what)


def assert_forward_backward_match(out, ref, truth, leaves, leaves64, names, dout, tol, what: str) -> None:
    """An op's output against the reference's, forward and backward.

    out: the op on leaves (its inputs in the test dtype); ref: the reference on leaves; truth: the
    reference on leaves64 (float64_leaves(leaves)). The forward by assert_matches_reference with
    tol["forward"]; then the gradients with respect to the leaves along the cotangent dout (float64,
    out's shape; rounded to the test dtype for out and ref) by assert_gradients_match with tol["backward"].
    """
    assert_matches_reference(out, ref, truth, tol["forward"], f"{what} forward")
    dout = dout.to(truth.device)
    dout_lowp = dout.to(ref.dtype)
    grads = torch.autograd.grad(out, leaves, dout_lowp)
    grads_ref = torch.autograd.grad(ref, leaves, dout_lowp)
    grads_truth = torch.autograd.grad(truth, leaves64, dout)
    assert_gradients_match(names, grads, grads_ref, grads_truth, tol["backward"], what)
