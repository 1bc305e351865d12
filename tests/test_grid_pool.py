import sys

import pytest
import torch

from lifeiqa_fast import ops
from lifeiqa_fast.ops import _impl
from lifeiqa_fast.ops.grid_pool import bin_edges
from lifeiqa_fast.reference import grid_pool_ref

from helpers import assert_matches_reference, dtypes_for, impl_params, randn_from, tolerance

# (B, H, W, C, grid)
CASES = [
    pytest.param((2, 14, 14, 512, 7), id="life-iqa-14x14"),  # the stage-3 map at 224: a 2x2 average pool
    pytest.param((1, 7, 7, 64, 7), id="one-image-7x7"),  # one cell per bin
    pytest.param((3, 15, 13, 40, 7), id="uneven-15x13"),  # bins of 2 and 3 rows; C below one channel block
    pytest.param((2, 9, 8, 130, 7), id="tail-channels"),  # C just past one 128-channel block
    pytest.param((2, 5, 6, 3, 1), id="grid-1x1"),  # one bin: the global mean
    pytest.param((0, 14, 14, 8, 7), id="empty-batch"),
]


def _input(shape, dtype, device, layout="nhwc", seed=0):
    B, H, W, C, _ = shape
    x = randn_from(torch.Generator().manual_seed(seed), B, H, W, C)
    x = x if layout == "nhwc" else x.permute(0, 3, 1, 2).contiguous()
    return x.to(device=device, dtype=dtype)


def _nchw(x, layout):
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


@pytest.mark.parametrize("impl_device", impl_params("grid_pool", composite=True))
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])  # nchw: a non-contiguous NHWC view reaches the kernels
def test_matches_reference(impl_device, shape, layout):
    impl, device = impl_device
    grid = shape[-1]
    for dtype in dtypes_for(impl, device):
        x = _input(shape, dtype, device, layout).requires_grad_()
        out = ops.grid_pool(x, grid, layout=layout, impl=impl)
        x64 = x.detach().double().requires_grad_()
        truth = grid_pool_ref(_nchw(x64, layout), grid)
        ref = grid_pool_ref(_nchw(x.detach(), layout), grid)
        tol = tolerance("grid_pool", impl, device, dtype)
        assert_matches_reference(out, ref, truth, tol["forward"], f"{impl} {device} {dtype} forward")

        dout = randn_from(torch.Generator().manual_seed(1), *out.shape)
        (dx,) = torch.autograd.grad(out, x, dout.to(device=device, dtype=dtype))
        (dx_truth,) = torch.autograd.grad(truth, x64, dout.to(device))
        x_ref = x.detach().clone().requires_grad_()
        (dx_ref,) = torch.autograd.grad(grid_pool_ref(_nchw(x_ref, layout), grid), x_ref,
                                        dout.to(device=device, dtype=dtype))
        assert_matches_reference(dx, dx_ref, dx_truth, tol["backward"], f"{impl} {device} {dtype} backward")


@pytest.mark.parametrize("impl_device", impl_params("grid_pool", composite=True))
def test_bin_edges_match_linspace(impl_device):
    """Every map size from 7 to 40: the kernels' bin edges are those of torch.linspace(dtype=int)."""
    impl, device = impl_device
    sizes = range(7, 41) if impl != "triton" else (7, 8, 13, 20, 29, 40)  # the interpreter is slow
    for h in sizes:
        x = torch.randn(1, h, h + 3, 2, dtype=torch.float64, device=device)
        torch.testing.assert_close(ops.grid_pool(x, 7, impl=impl), grid_pool_ref(x.permute(0, 3, 1, 2), 7),
                                   rtol=1e-12, atol=1e-12, msg=f"H={h}, W={h + 3}")


def test_python_bin_edges_are_linspace():
    """The composite's edges, Python arithmetic (no tensor for a tracer to read back), are torch.linspace's
    for every map up to 300 and every grid up to 64."""
    for n in range(1, 301):
        for grid in range(1, min(n, 64) + 1):
            assert bin_edges(n, grid) == torch.linspace(0, n, grid + 1, dtype=torch.int).tolist(), (n, grid)


def test_sliced_input_strides():
    """A channel-strided NHWC view (every other channel) is read in place, not copied wrong."""
    x = torch.randn(2, 14, 14, 64)[..., ::2]
    torch.testing.assert_close(ops.grid_pool(x, 7), grid_pool_ref(x.permute(0, 3, 1, 2), 7))


@pytest.mark.parametrize("impl_device", impl_params("grid_pool", composite=True))
def test_gradcheck_float64(impl_device):
    impl, device = impl_device
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)  # W=3: bins of 1 and 2 cells
    assert torch.autograd.gradcheck(lambda t: ops.grid_pool(t, 2, impl=impl), (x,))


@pytest.mark.parametrize("impl_device", impl_params("grid_pool", composite=True))
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_double_backward_equals_the_reference(impl_device, layout):
    """create_graph=True, then a second grad through the op (squared after it, so the second derivative
    is not zero): the backward kernel's own adjoint is the forward kernel, so this equals the
    reference's in float64; and gradgradcheck holds (native)."""
    impl, device = impl_device
    x = _input((2, 9, 8, 3, 3), torch.float64, device, layout).requires_grad_()  # bins of 3 and of 2, 3 cells

    def second_order(impl):
        gen = torch.Generator().manual_seed(7)
        out = ops.grid_pool(x, 3, layout=layout, impl=impl).square()
        (dx,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=gen, dtype=out.dtype).to(device),
                                    create_graph=True)
        return torch.autograd.grad(dx, x, torch.randn(dx.shape, generator=gen, dtype=dx.dtype).to(device))[0]

    want = second_order("reference")
    assert want.abs().max() > 0.1  # the check below is not vacuous
    torch.testing.assert_close(second_order(impl), want, rtol=1e-12, atol=1e-12)
    if impl == "native":  # gradgradcheck launches the kernels some hundred times: too slow interpreted
        small = x.detach()[:1, :4, :3, :2].clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda t: ops.grid_pool(t, 2, layout=layout, impl=impl).square(),
                                            (small,))


@pytest.mark.parametrize("impl", ["auto", "reference", "native", "triton"])
def test_meta_tensors_give_shapes(impl):
    """Meta tensors (no values), and the default device set to meta, give (B, grid * grid, C) on meta:
    the reference reads its bin edges from a CPU tensor; native and Triton run their fake implementations."""
    if impl in ("native", "triton") and _impl._why_not("grid_pool", impl, "meta") is not None:
        pytest.skip(_impl._why_not("grid_pool", impl, "meta"))
    for layout, shape in (("nhwc", (2, 15, 13, 8)), ("nchw", (2, 8, 15, 13))):
        out = ops.grid_pool(torch.empty(shape, device="meta"), 7, layout=layout, impl=impl)
        assert out.device.type == "meta" and out.shape == (2, 49, 8), (layout, out)
    with torch.device("meta"):
        out = ops.grid_pool(torch.empty(1, 14, 14, 3), 7, impl=impl)
    assert out.device.type == "meta" and out.shape == (1, 49, 3)


def test_reference_compiles_fullgraph():
    """The reference compiled whole (static shapes): its bin edges are constants to the compiler."""
    fn = torch.compile(lambda t: ops.grid_pool(t, 7, impl="reference"), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 15, 13, 4)
    torch.testing.assert_close(fn(x), grid_pool_ref(x.permute(0, 3, 1, 2), 7))


@pytest.mark.parametrize("impl_device", impl_params("grid_pool"))
def test_opcheck(impl_device):
    impl, device = impl_device
    if impl == "native":
        forward, backward = torch.ops.lifeiqa_fast.grid_pool.default, torch.ops.lifeiqa_fast.grid_pool_backward.default
    else:
        forward, backward = torch.ops.lifeiqa_fast.grid_pool_triton.default, torch.ops.lifeiqa_fast.grid_pool_triton_backward.default
    x = torch.randn(2, 9, 8, 5, device=device, requires_grad=True)
    torch.library.opcheck(forward, (x, 7))
    torch.library.opcheck(backward, (torch.randn(2, 49, 5, device=device), 9, 8, 7))


def test_compiles_fullgraph():
    fn = torch.compile(lambda t: ops.grid_pool(t, 7), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 14, 14, 16)
    torch.testing.assert_close(fn(x), ops.grid_pool(x, 7))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ops.grid_pool(torch.randn(2, 14, 14)), ValueError, r"x must have shape \(B, H, W, C\), got \(2, 14, 14\)"),
        (lambda: ops.grid_pool(torch.randn(1, 4, 6, 14), layout="nchw"), ValueError, "H >= grid and W >= grid"),
        (lambda: ops.grid_pool(torch.randn(1, 6, 14, 4)), ValueError, "got H=6, W=14, grid=7"),
        (lambda: ops.grid_pool(torch.ones(1, 14, 14, 4, dtype=torch.int32)), TypeError, "floating tensor"),
        (lambda: ops.grid_pool(torch.randn(1, 14, 14, 4), grid=0), ValueError, "grid must be a positive int"),
        (lambda: ops.grid_pool(torch.randn(1, 14, 14, 4), grid=True), ValueError,
         "grid must be a positive int, got True"),
        (lambda: ops.grid_pool(torch.randn(1, 14, 14, 4), grid=7.0), ValueError,
         r"grid must be a positive int, got 7\.0"),
        (lambda: ops.grid_pool(torch.randn(1, 14, 14, 4), layout="hwc"), ValueError, "layout must be one of"),
        (lambda: ops.grid_pool(torch.randn(1, 14, 14, 4), impl="fast"), ValueError, "impl must be one of"),
        (lambda: ops.grid_pool([[1.0]]), TypeError, "x must be a torch.Tensor"),
    ],
    ids=["3-d", "nchw-too-small", "nhwc-too-small", "int-dtype", "grid-0", "grid-bool", "grid-float", "bad-layout",
         "bad-impl", "not-a-tensor"],
)
def test_bad_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_native_op_checks_its_contract():
    """Direct torch.ops callers get the C++ checks, naming the op and the argument."""
    if not _impl._why_not("grid_pool", "native", "cpu") is None:
        pytest.skip("native CPU kernel not built")
    with pytest.raises(RuntimeError, match="lifeiqa_fast.grid_pool: x must have H >= grid"):
        torch.ops.lifeiqa_fast.grid_pool(torch.randn(1, 3, 14, 2), 7)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.lifeiqa_fast.grid_pool_backward(torch.randn(1, 48, 2), 14, 14, 7)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _impl.choose.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.grid_pool(torch.randn(1, 14, 14, 4), impl="triton")
    finally:
        _impl.choose.cache_clear()


def test_default_impl_applies(monkeypatch):
    calls = []
    module = sys.modules["lifeiqa_fast.ops.grid_pool"]
    monkeypatch.setattr(module, "grid_pool_ref", lambda x, g: calls.append(g) or grid_pool_ref(x, g))
    ops.set_default_impl("reference")
    try:
        ops.grid_pool(torch.randn(1, 14, 14, 4))
    finally:
        ops.set_default_impl("auto")
    assert calls == [7]
