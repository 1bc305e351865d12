import functools
import importlib

import pytest
import torch

from lifeiqa_fast import ops
from lifeiqa_fast.loss import router_loss
from lifeiqa_fast.ops._impl import triton_status
from lifeiqa_fast.reference import moe_ref

from helpers import (assert_gradients_match, assert_matches_reference, dtypes_for, float64_leaves, impl_params,
                     moe_loss, randn_from, tolerance)

# (T, D, F, E, k, routing)
CASES = [
    pytest.param((6, 384, 1536, 8, 2, "random"), id="life-iqa-one-image"),  # E8, top-2, one image's 6 tokens
    pytest.param((1, 32, 64, 3, 1, "random"), id="T1-E3-k1"),
    pytest.param((6 * 257, 32, 64, 4, 2, "random"), id="T1542-E4"),  # 257 images
    pytest.param((6, 32, 64, 2, 2, "random"), id="k-equals-E"),
    pytest.param((6, 32, 64, 1, 1, "random"), id="E1"),
    pytest.param((12, 32, 64, 4, 1, "one-expert"), id="all-to-one-expert"),  # three experts get nothing
    pytest.param((7, 36, 64, 3, 1, "one-expert"), id="seven-rows-odd-D"),  # CPU few_rows_linear: 7 rows, a D tail
    pytest.param((8, 32, 64, 3, 1, "one-expert"), id="eight-rows"),  # its largest row block
    pytest.param((6, 32, 64, 4, 2, "tied"), id="tied-logits"),  # every logit equal: torch.topk's ties
    pytest.param((0, 32, 64, 4, 2, "random"), id="no-tokens"),
]
NAMES = ["x", "router_weight", "router_bias", "w1", "b1", "w2", "b2"]


def _inputs(case, dtype, device, seed=0):
    T, D, F, E, k, routing = case
    rnd = functools.partial(randn_from, torch.Generator().manual_seed(seed))  # float64: edited before rounding
    x = rnd(T, D)
    router_weight, router_bias = rnd(E, D, scale=D**-0.5), rnd(E, scale=0.1)
    if routing == "one-expert":  # a large bias on expert 2 wins every token
        router_bias[2] = 100.0
    if routing == "tied":
        router_weight.zero_()
        router_bias.zero_()
    weights = [router_weight, router_bias, rnd(E, F, D, scale=D**-0.5), rnd(E, F, scale=0.1),
               rnd(E, D, F, scale=F**-0.5), rnd(E, D, scale=0.1)]
    return [t.to(device=device, dtype=dtype) for t in (x, *weights)], k


def _case_params():
    """(impl_device, case) pairs. Not tied logits with the GPU kernels (Triton, anything on CUDA): they
    break ties by the lower expert index, torch.topk in an order of its own (a partial sort on CPU);
    test_gpu_kernels_break_ties_by_the_lower_index covers them."""
    for p in impl_params("moe", composite=True):
        impl, device = p.values[0]
        for case in CASES:
            if not (case.values[0][-1] == "tied" and (impl == "triton" or device == "cuda")):
                yield pytest.param(p.values[0], case.values[0], marks=p.marks, id=f"{case.id}-{p.id}")


@pytest.mark.parametrize("impl_device, case", list(_case_params()))
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout-mask"])
def test_matches_reference(impl_device, case, dropout):
    impl, device = impl_device
    for dtype in dtypes_for(impl, device):
        tensors, k = _inputs(case, dtype, device)
        T, F = case[0], case[2]
        mask = None
        if dropout:
            keep = torch.rand(T, k, F, generator=torch.Generator().manual_seed(2)) > 0.1
            mask = (keep / 0.9).to(device=device, dtype=dtype)
        leaves = [t.requires_grad_() for t in tensors]
        leaves64 = float64_leaves(leaves)
        got = ops.moe(*leaves, k, mask, impl=impl)
        ref = moe_ref(*leaves, k, dropout_mask=mask)
        truth = moe_ref(*leaves64, k, dropout_mask=None if mask is None else mask.double())
        tol = tolerance("moe", impl, device, dtype)
        what = f"{impl} {device} {dtype}"
        for name, a, r, t in zip(("out", "aux", "z"), got, ref, truth):
            if name != "out":  # 0-d losses: fp32 (fp64 for fp64) in the kernels
                a, r = a.to(dtype), r.to(dtype)
            if T == 0:
                assert a.shape == t.shape, f"{what} {name}: shape {tuple(a.shape)}"
                continue
            assert_matches_reference(a, r, t, tol["forward"], f"{what} {name}")
        if T == 0:
            continue
        dout = randn_from(torch.Generator().manual_seed(1), *got[0].shape)
        grads = torch.autograd.grad(moe_loss(*got, dout.to(device, dtype)), leaves)
        grads_ref = torch.autograd.grad(moe_loss(*ref, dout.to(device, dtype)), leaves)
        grads_truth = torch.autograd.grad(moe_loss(*truth, dout.to(device)), leaves64)
        assert_gradients_match(NAMES, grads, grads_ref, grads_truth, tol["backward"], what)


@pytest.mark.parametrize("impl_device", [p for p in impl_params("moe") if p.id == "triton-cpu" or "cuda" in p.id])
def test_gpu_kernels_break_ties_by_the_lower_index(impl_device):
    """Every logit equal: each token takes experts 0 .. k-1 with equal gates."""
    impl, device = impl_device
    tensors, k = _inputs((6, 16, 32, 4, 2, "tied"), torch.float64, device)
    out, aux, z = ops.moe(*tensors, k, impl=impl)
    x, _, _, w1, b1, w2, b2 = tensors
    experts = [torch.relu(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e] for e in range(k)]
    torch.testing.assert_close(out, sum(experts) / k)
    torch.testing.assert_close(aux, torch.tensor(4 * (6 / k / 6) * (6 / 6) * k, dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor(4.0, dtype=torch.float64).log() ** 2)


@pytest.mark.parametrize("dense", [False, True], ids=["grouped", "dense"])
def test_strategies_agree(dense):
    """The CPU kernel's two strategies give the reference's routing and values."""
    tensors, k = _inputs((48, 32, 64, 8, 2, "random"), torch.float64, "cpu")
    out, aux, z, logits, indices, gates, hidden, expert_out = torch.ops.lifeiqa_fast.moe(*tensors, k, None, dense)
    ref = moe_ref(*tensors, k)
    torch.testing.assert_close((out, aux, z), ref, check_dtype=False)  # the authors' aux is fp32 even in fp64
    torch.testing.assert_close(indices, logits.topk(k).indices)
    counts = torch.bincount(indices.flatten(), minlength=8)
    assert counts.sum() == 48 * k and bool((indices[:, 0] != indices[:, 1]).all())  # k distinct experts a token
    x, _, _, w1, b1, w2, b2 = tensors
    e = indices[5, 1]
    torch.testing.assert_close(hidden[5, 1], torch.relu(w1[e] @ x[5] + b1[e]))
    torch.testing.assert_close(expert_out[5, 1], w2[e] @ hidden[5, 1] + b2[e])
    torch.testing.assert_close(gates.sum(-1), torch.ones(48, dtype=torch.float64))


@pytest.mark.parametrize("impl_device", impl_params("moe", composite=True))
def test_gradcheck_float64(impl_device):
    impl, device = impl_device
    tensors, k = _inputs((5, 4, 6, 3, 2, "random"), torch.float64, device)
    leaves = tuple(t.requires_grad_() for t in tensors)
    mask = (torch.rand(5, k, 6, generator=torch.Generator().manual_seed(3)) > 0.2).double().to(device) / 0.8

    def fn(*args):
        out, aux, z = ops.moe(*args, k, mask, impl=impl)
        return out, aux, z

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=impl == "triton" and device == "cpu")  # see test_cross_attention


@pytest.mark.parametrize("impl_device", impl_params("moe"))
def test_double_backward_raises(impl_device):
    """The fused backward (C++ on CPU, ATen from saved routing and activations elsewhere) is not
    differentiable: with create_graph=True the first-order gradients are still right, a second grad
    through them raises naming the op and impl="reference", which supports it."""
    impl, device = impl_device
    tensors, k = _inputs((5, 4, 6, 3, 2, "random"), torch.float64, device)
    leaves = [t.requires_grad_() for t in tensors]
    dout = torch.randn(5, 4, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(moe_loss(*ops.moe(*leaves, k, impl=impl), dout), leaves, create_graph=True)
    wants = torch.autograd.grad(moe_loss(*ops.moe(*leaves, k, impl=impl), dout), leaves)
    for name, g, want in zip(NAMES, grads, wants):
        torch.testing.assert_close(g, want, rtol=0, atol=0, msg=f"first-order d{name} under create_graph")
    with pytest.raises(RuntimeError, match=r"lifeiqa_fast.moe: double backward .* not supported .*impl=\"reference\""):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    out = lambda *args: ops.moe(*args, k, impl="reference")[0]  # noqa: E731  (aux is fp32 in the reference)
    assert torch.autograd.gradgradcheck(out, tuple(leaves))


@pytest.mark.parametrize("dense", [False, True], ids=["grouped", "dense"])
def test_opcheck(dense):
    tensors, k = _inputs((6, 16, 32, 4, 2, "random"), torch.float32, "cpu")
    for t in tensors:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lifeiqa_fast.moe.default, (*tensors, k, None, dense))


def test_compiles_fullgraph():
    tensors, k = _inputs((6, 16, 32, 4, 2, "random"), torch.float32, "cpu")
    fn = torch.compile(lambda x: ops.moe(x, *tensors[1:], k), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(tensors[0]), ops.moe(*tensors, k))


def _bad(**change):
    tensors, k = _inputs((6, 16, 32, 4, 2, "random"), torch.float32, "cpu")
    args = dict(zip(NAMES, tensors), top_k=k)
    args.update(change)
    return lambda: ops.moe(**args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (_bad(x=torch.randn(2, 6, 16)), ValueError, r"x must be a floating \(T, D\) tensor"),
        (_bad(top_k=5), ValueError, r"top_k must be an int in \[1, E=4\], got 5"),
        (_bad(top_k=0), ValueError, r"top_k must be an int in \[1, E=4\], got 0"),
        (_bad(top_k=True), ValueError, r"top_k must be an int in \[1, E=4\], got True"),
        (_bad(top_k=2.0), ValueError, r"top_k must be an int in \[1, E=4\], got 2\.0"),
        (_bad(w1=torch.randn(4, 16, 32)), ValueError, r"w1 must have shape \(E, F, D\) = \(4, 32, 16\)"),
        # E read from router_weight alone would blame router_bias, which the five expert tensors agree with
        (_bad(router_weight=torch.randn(5, 16)), ValueError, r"router_weight must have shape \(E, D\) = \(4, 16\)"),
        (_bad(b1=torch.randn(4, 16)), ValueError, r"b1 must have shape \(E, F\) = \(4, 32\), got \(4, 16\)"),
        (_bad(x=torch.randn(6, 0)), ValueError, r"x must be a floating \(T, D\) tensor, D >= 1"),
        (_bad(w1=torch.randn(4, 0, 16), b1=torch.randn(4, 0), w2=torch.randn(4, 16, 0)), ValueError,
         r"w1 must have shape \(E, F, D\) with F >= 1, got \(4, 0, 16\)"),
        (_bad(w2=torch.randn(4, 32, 16)), ValueError, r"w2 must have shape \(E, D, F\) = \(4, 16, 32\)"),
        (_bad(router_bias=torch.randn(3)), ValueError, r"router_bias must have shape \(E,\) = \(4,\)"),
        (_bad(dropout_mask=torch.ones(6, 1, 32)), ValueError, r"dropout_mask must have shape \(T, top_k, F\)"),
        (_bad(b2=torch.randn(4, 16, dtype=torch.float64)), ValueError, "b2 must have x's dtype and device"),
        (_bad(b1=None), TypeError, "b1 must be a torch.Tensor"),
    ],
    ids=["3-d-x", "top-k-above-E", "top-k-zero", "top-k-bool", "top-k-float", "w1-shape", "router-weight-E",
         "b1-F", "D0", "F0", "w2-shape", "router-bias", "mask-shape", "dtype", "missing-bias"],
)
def test_bad_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_native_op_checks_its_contract():
    tensors, k = _inputs((6, 16, 32, 4, 2, "random"), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"lifeiqa_fast.moe: top_k must be an int in \[1, E=4\], got 7"):
        torch.ops.lifeiqa_fast.moe(*tensors, 7, None, False)


def test_dense_backward_equals_the_grouped_one():
    """The composite backward that GPU kernels use (one-hot selection, no host synchronisation) against
    the CPU kernel's grouped one, on the same saved tensors, with a dropout mask and unused experts."""
    moe_module = importlib.import_module("lifeiqa_fast.ops.moe")
    tensors, k = _inputs((20, 16, 32, 5, 2, "random"), torch.float64, "cpu")
    mask = (torch.rand(20, k, 32, generator=torch.Generator().manual_seed(4)) > 0.1).double() / 0.9
    x, router_weight, _, w1, _, w2, _ = tensors
    _, _, _, *saved = torch.ops.lifeiqa_fast.moe(*tensors, k, mask, False)
    grads = (torch.randn(20, 16, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64),
             torch.tensor(-0.3, dtype=torch.float64))
    args = (*grads, x, router_weight, w1, w2, mask, *saved)
    torch.testing.assert_close(moe_module._dense_backward(*args), torch.ops.lifeiqa_fast.moe_backward(*args))


@pytest.mark.skipif(triton_status()[0] is False, reason="Triton is not installed")
def test_grouping_plumbing():
    """The device-side grouping of the Triton kernels: the order is a bijection on the pairs, each
    expert's segment holds exactly its pairs in ascending order, offsets are the counts' exclusive sums."""
    from lifeiqa_fast.triton.moe import group_pairs

    indices = torch.randint(0, 8, (257 * 6, 2), generator=torch.Generator().manual_seed(5))
    indices[:, 1] = (indices[:, 0] + 1 + indices[:, 1] % 7) % 8  # two distinct experts per token
    order, counts, offsets = group_pairs(indices, 8)
    flat = indices.flatten()
    assert torch.equal(order.sort().values, torch.arange(flat.numel()))
    assert torch.equal(counts, torch.bincount(flat, minlength=8))
    assert torch.equal(offsets, torch.cumsum(counts, 0) - counts)
    for e in range(8):
        segment = order[offsets[e] : offsets[e] + counts[e]]
        assert bool((flat[segment] == e).all()) and bool((segment.diff() > 0).all())
    assert group_pairs(indices[:0], 8)[1].sum() == 0  # no tokens


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["native", "triton"])
def test_no_host_synchronisation_on_gpu(impl):
    """Forward and backward of the GPU kernels under torch.cuda's sync debug mode "error": any
    device-to-host synchronisation raises."""
    tensors, k = _inputs((6 * 64, 384, 1536, 8, 2, "random"), torch.float32, "cuda")
    leaves = [t.requires_grad_() for t in tensors]
    mask = (torch.rand(6 * 64, k, 1536, device="cuda") > 0.1).float() / 0.9
    ops.moe(*leaves, k, mask, impl=impl)  # compile and warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, aux, z = ops.moe(*leaves, k, mask, impl=impl)
        torch.autograd.backward((out.sum() + router_loss(aux, z),))
    finally:
        torch.cuda.set_sync_debug_mode("default")
