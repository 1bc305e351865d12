import functools

import pytest
import torch

from lifeiqa_fast import ops
from lifeiqa_fast.reference import fixed_adjacency, gcn_ref

from helpers import (assert_forward_backward_match, dtypes_for, float64_leaves, impl_params, randn_from,
                     tolerance)

# (B, N, D, H1, H2, adjacency)
CASES = [
    pytest.param((2, 6, 384, 192, 96, "fixed"), id="life-iqa"),  # the official decoder layer
    pytest.param((3, 6, 384, 192, 96, "shared"), id="dense-shared-adj"),  # a learnable (N, N) graph
    pytest.param((3, 7, 96, 48, 24, "per-sample"), id="odd-N-per-sample-adj"),  # (B, N, N), N=7 odd
    pytest.param((1, 1, 100, 50, 25, "fixed"), id="one-token-D100"),  # N=1: A = 1; D not a power of 2
    pytest.param((2, 32, 96, 48, 24, "fixed"), id="N32"),  # the largest token count
    pytest.param((0, 6, 96, 48, 24, "fixed"), id="empty-batch"),
]


def _inputs(case, dtype, device, seed=0):
    B, N, D, H1, H2, kind = case
    gen = torch.Generator().manual_seed(seed)
    rnd = functools.partial(randn_from, gen, dtype=dtype, device=device)
    x = rnd(B, N, D)
    weights = [rnd(D, H1, scale=D**-0.5), rnd(H1, scale=0.1), rnd(H1, H2, scale=H1**-0.5), rnd(H2, scale=0.1),
               rnd(H2, D, scale=H2**-0.5), rnd(D, scale=0.1)]
    adj = {"fixed": None, "shared": (N, N), "per-sample": (B, N, N)}[kind]
    if adj is not None:
        adj = (torch.rand(*adj, generator=gen, dtype=torch.float64) / N).to(device=device, dtype=dtype)
    return x, adj, weights


def _reference(x, adj, weights):
    a = adj if adj is not None else fixed_adjacency(x.shape[1], x.dtype, x.device)
    return gcn_ref(x, a, *weights)


@pytest.mark.parametrize("impl_device", impl_params("gcn"))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(impl_device, case):
    impl, device = impl_device
    for dtype in dtypes_for(impl, device):
        x, adj, weights = _inputs(case, dtype, device)
        leaves = [t.requires_grad_() for t in [x, *weights] + ([adj] if adj is not None else [])]
        out = ops.gcn(x, adj, *weights, impl=impl)
        ref = _reference(x, adj, weights)
        leaves64 = float64_leaves(leaves)
        x64, w64, adj64 = leaves64[0], leaves64[1:7], (leaves64[7] if adj is not None else None)
        truth = _reference(x64, adj64, w64)
        names = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "adj"][: len(leaves)]
        dout = randn_from(torch.Generator().manual_seed(1), *out.shape)
        assert_forward_backward_match(out, ref, truth, leaves, leaves64, names, dout,
                                      tolerance("gcn", impl, device, dtype), f"{impl} {device} {dtype}")


def test_bf16_native_cpu_uses_blas_path():
    """bf16 (and float64) take the BLAS-GEMM path of the CPU kernel; the per-dtype test covers its
    accuracy, this one a batch large enough for several thread-pool tasks."""
    x, adj, weights = _inputs((64, 6, 96, 48, 24, "per-sample"), torch.float64, "cpu")
    torch.testing.assert_close(ops.gcn(x, adj, *weights, impl="native"), _reference(x, adj, weights))


def test_non_contiguous_x():
    x, adj, weights = _inputs((3, 6, 96, 48, 24, "fixed"), torch.float32, "cpu")
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor strides
    assert not x_t.is_contiguous()
    for impl in ("native", "reference"):
        torch.testing.assert_close(ops.gcn(x_t, None, *weights, impl=impl), _reference(x, None, weights))


@pytest.mark.parametrize("kind", ["fixed", "per-sample"])
def test_large_batch_native(kind):
    """B=257: many images per thread-pool task."""
    x, adj, weights = _inputs((257, 6, 96, 48, 24, kind), torch.float32, "cpu")
    torch.testing.assert_close(ops.gcn(x, adj, *weights, impl="native"), _reference(x, adj, weights),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl_device", impl_params("gcn"))
@pytest.mark.parametrize("kind", ["fixed", "per-sample"])
def test_gradcheck_float64(impl_device, kind):
    impl, device = impl_device
    x, adj, weights = _inputs((2, 3, 4, 3, 2, kind), torch.float64, device)  # few inputs: the interpreter is slow
    leaves = [x, *weights] + ([adj] if adj is not None else [])
    for t in leaves:
        t.requires_grad_()

    def fn(x, w1, b1, w2, b2, w3, b3, *maybe_adj):
        return ops.gcn(x, maybe_adj[0] if maybe_adj else None, w1, b1, w2, b2, w3, b3, impl=impl)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def _second_order(fn, leaves):
    """create_graph=True, then a second grad: d/d leaves of <v, d<dout, fn(leaves)>/d leaves>, random dout, v."""
    gen = torch.Generator().manual_seed(7)
    out = fn(*leaves)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, dout, create_graph=True)
    total = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)).sum() for g in grads)
    return torch.autograd.grad(total, leaves, materialize_grads=True)


# rtol = atol of second derivatives in float64 against the reference's. The Triton kernel forms the
# fixed graph's 2 / (N + 1) and 1 / (N + 1) in fp32 even for fp64 inputs (forward off by ~5e-8); a
# double backward that misses a path is off by O(1).
DOUBLE_BACKWARD_TOLERANCE = {"native": 1e-10, "triton": 1e-6}


@pytest.mark.parametrize("impl_device", impl_params("gcn"))
@pytest.mark.parametrize("kind", ["fixed", "shared", "per-sample"])
def test_double_backward_equals_the_reference(impl_device, kind):
    """The backward is ATen ops, differentiable again: with h1, h2 recomputed from the inputs under
    create_graph (the kernel's are non-differentiable outputs), every second derivative is the
    reference's, mixed ones (dw2 through h1 in x) included."""
    impl, device = impl_device
    x, adj, weights = _inputs((2, 5, 6, 4, 3, kind), torch.float64, device)
    leaves = [t.requires_grad_() for t in [x, *weights] + ([adj] if adj is not None else [])]

    N = x.shape[1]
    fixed = (torch.ones(N, N, dtype=torch.float64) + torch.eye(N, dtype=torch.float64)) / (N + 1)  # exact in fp64

    def op(x, w1, b1, w2, b2, w3, b3, *a):
        return ops.gcn(x, a[0] if a else None, w1, b1, w2, b2, w3, b3, impl=impl).tanh()  # tanh: curvature after

    def reference(x, w1, b1, w2, b2, w3, b3, *a):
        return gcn_ref(x, a[0] if a else fixed.to(device), w1, b1, w2, b2, w3, b3).tanh()

    names = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "adj"]
    for name, got, want in zip(names, _second_order(op, leaves), _second_order(reference, leaves)):
        tol = DOUBLE_BACKWARD_TOLERANCE[impl]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{impl} {kind}: second derivative {name}")


@pytest.mark.parametrize("impl_device", impl_params("gcn"))
def test_opcheck(impl_device):
    impl, device = impl_device
    op = torch.ops.lifeiqa_fast.gcn.default if impl == "native" else torch.ops.lifeiqa_fast.gcn_triton.default
    for kind in ("fixed", "shared"):
        x, adj, weights = _inputs((2, 6, 32, 16, 16, kind), torch.float32, device)
        for t in [x, *weights]:
            t.requires_grad_()
        torch.library.opcheck(op, (x, adj, *weights))


def test_compiles_fullgraph():
    x, adj, weights = _inputs((2, 6, 32, 16, 16, "fixed"), torch.float32, "cpu")
    fn = torch.compile(lambda x: ops.gcn(x, None, *weights), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), ops.gcn(x, None, *weights))


def _bad(**change):
    x, adj, weights = _inputs((2, 6, 32, 16, 8, "fixed"), torch.float32, "cpu")
    args = dict(x=x, adj=adj, w1=weights[0], b1=weights[1], w2=weights[2], b2=weights[3], w3=weights[4],
                b3=weights[5])
    args.update(change)
    return lambda: ops.gcn(**args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (_bad(x=torch.randn(6, 32)), ValueError, r"x must have shape \(B, N, D\), got \(6, 32\)"),
        (_bad(x=torch.randn(1, 33, 32), impl="native"), ValueError,
         r"impl='native' cannot run this input: the kernels hold at most 32 tokens .* got N=33"),
        (_bad(x=torch.randn(1, 0, 32)), ValueError, "N >= 1 tokens, got N=0"),
        (_bad(w1=torch.randn(16, 32)), ValueError, r"w1 must have shape \(D, H1\) = \(32, 16\), got \(16, 32\)"),
        # H1 read from w1 alone would blame b1 and w2, which agree on H1 = 16
        (_bad(w1=torch.randn(32, 20)), ValueError, r"w1 must have shape \(D, H1\) = \(32, 16\), got \(32, 20\)"),
        (_bad(w2=torch.randn(16, 12)), ValueError, r"w2 must have shape \(H1, H2\) = \(16, 8\), got \(16, 12\)"),
        (_bad(w3=torch.randn(12, 32)), ValueError, r"w3 must have shape \(H2, D\) = \(8, 32\), got \(12, 32\)"),
        (_bad(b1=torch.randn(20)), ValueError, r"b1 must have shape \(H1,\) = \(16,\), got \(20,\)"),
        (_bad(b3=torch.randn(16)), ValueError, r"b3 must have shape \(D,\) = \(32,\), got \(16,\)"),
        (_bad(adj=torch.rand(5, 5)), ValueError, r"adj must be None or have shape \(N, N\)"),
        (_bad(w3=torch.randn(8, 32, dtype=torch.float64)), ValueError, "w3 must have x's dtype and device"),
        (_bad(x=torch.ones(2, 6, 32, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
        (_bad(b1=[0.0] * 16), TypeError, "b1 must be a torch.Tensor"),
    ],
    ids=["2-d-x", "too-many-tokens-native", "no-tokens",
         "w1-shape", "w1-columns", "w2-columns", "w3-rows", "b1-shape", "b3-shape",
         "adj-shape", "dtype-mismatch", "int-x", "list-bias"],
)
def test_bad_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_native_op_checks_its_contract():
    x, adj, weights = _inputs((2, 6, 32, 16, 8, "fixed"), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"lifeiqa_fast.gcn: w2 must have shape \(H1, H2\)"):
        torch.ops.lifeiqa_fast.gcn(x, None, weights[0], weights[1], weights[4], weights[3], weights[4], weights[5])
