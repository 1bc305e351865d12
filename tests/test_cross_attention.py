import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lifeiqa_fast import ops
from lifeiqa_fast.reference import cross_attention_ref, mha_ref

from helpers import (TOLERANCE, assert_forward_backward_match, assert_gradients_match, assert_matches_reference,
                     dtypes_for, float64_leaves, impl_params, randn_from, tolerance)

# (B, Nq, Nk, D, num_heads); kv is one layer's slice of a (B, Nk, 3, 2, D) all-layers tensor
CASES = [
    pytest.param((2, 6, 49, 384, 6), id="life-iqa"),  # the official layer: hd 64, a 7x7 memory
    pytest.param((3, 1, 1, 64, 2), id="Nq1-Nk1-hd32"),  # one query, one key: softmax weight 1
    pytest.param((2, 7, 50, 256, 2), id="Nq7-Nk50-hd128"),  # odd counts, the largest heads
    pytest.param((1, 64, 49, 128, 4), id="Nq64-hd32"),  # the most queries
    pytest.param((1, 6, 1024, 128, 2), id="Nk1024"),  # the most keys: online softmax over many blocks
    pytest.param((2, 6, 49, 100, 4), id="D100-hd25"),  # D and hd not powers of two
    pytest.param((257, 6, 49, 64, 2), id="B257"),  # many images per thread-pool task
    pytest.param((0, 6, 49, 64, 2), id="empty-batch"),
]
NAMES = ["x", "kv", "norm_weight", "norm_bias", "q_weight", "q_bias", "out_weight", "out_bias"]


def _inputs(case, dtype, device, seed=0):
    """x, kv_all: all layers' keys and values (B, Nk, 3, 2, D), of which tests take layer 1 (a strided
    slice, read in place), and the six parameters."""
    B, Nq, Nk, D, H = case
    rnd = functools.partial(randn_from, torch.Generator().manual_seed(seed), dtype=dtype, device=device)
    params = [rnd(D, scale=0.2, shift=1.0), rnd(D, scale=0.1), rnd(D, D, scale=D**-0.5), rnd(D, scale=0.1),
              rnd(D, D, scale=D**-0.5), rnd(D, scale=0.1)]
    return rnd(B, Nq, D), rnd(B, Nk, 3, 2, D), params


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("impl_device", impl_params("cross_attention"))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(impl_device, case):
    impl, device = impl_device
    H = case[-1]
    for dtype in dtypes_for(impl, device):
        x, kv_all, params = _inputs(case, dtype, device)
        leaves = [t.requires_grad_() for t in (x, kv_all, *params)]
        leaves64 = float64_leaves(leaves)
        layer1 = lambda x, kv_all, *params: (x, kv_all[:, :, 1], *params)  # noqa: E731
        out = ops.cross_attention(*layer1(*leaves), H, impl=impl)
        ref = cross_attention_ref(*layer1(*leaves), H)
        truth = cross_attention_ref(*layer1(*leaves64), H)
        dout = randn_from(torch.Generator().manual_seed(1), *out.shape)
        assert_forward_backward_match(out, ref, truth, leaves, leaves64, NAMES, dout,
                                      tolerance("cross_attention", impl, device, dtype), f"{impl} {device} {dtype}")


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_equals_the_module(impl):
    """The op on keys and values from in_proj equals LayerNorm + torch.nn.MultiheadAttention itself
    (the authors' layer), forward and backward, the gradients reaching the module's parameters."""
    torch.manual_seed(0)
    B, Nq, Nk, D, H = 3, 6, 49, 384, 6
    norm, mha = torch.nn.LayerNorm(D), torch.nn.MultiheadAttention(D, H, batch_first=True)
    x, memory = torch.randn(B, Nq, D, requires_grad=True), torch.randn(B, Nk, D, requires_grad=True)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    kv = F.linear(memory, w[D:], b[D:]).view(B, Nk, 2, D)
    out = ops.cross_attention(x, kv, norm.weight, norm.bias, w[:D], b[:D], mha.out_proj.weight, mha.out_proj.bias,
                              H, impl=impl)
    expected = x + mha(norm(x), memory, memory, need_weights=False)[0]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    leaves = [x, memory, norm.weight, norm.bias, w, b, mha.out_proj.weight, mha.out_proj.bias]
    dout = torch.randn_like(out)
    for g, e in zip(_grads(out, leaves, dout), _grads(expected, leaves, dout)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # and the authors' per-layer call the reference model makes
    torch.testing.assert_close(mha_ref(x, memory, norm.weight, norm.bias, w, b, mha.out_proj.weight,
                                       mha.out_proj.bias, H), expected)


@pytest.mark.parametrize("impl_device", impl_params("cross_attention"))
def test_saved_outputs(impl_device):
    """What the backward reads: q, o rounded to x's dtype, the log-sum-exp and the LayerNorm stats."""
    impl, device = impl_device
    op = ops.cross_attention_op(impl)
    for dtype in (torch.float32, torch.float64):
        x, kv_all, params = _inputs((2, 7, 50, 96, 3), dtype, device)
        kv = kv_all[:, :, 2]
        out, q, o, lse, stats = op(x, kv, *params, 3, 1e-5)
        B, Nq, D = x.shape
        mean, var = x.mean(-1), x.var(-1, unbiased=False)
        q_ref = F.linear(F.layer_norm(x, (D,), params[0], params[1]), params[2], params[3])
        heads = lambda t: t.reshape(B, t.shape[1], 3, D // 3).transpose(1, 2)  # noqa: E731
        s = heads(q_ref) @ heads(kv[:, :, 0]).transpose(-1, -2) / (D // 3) ** 0.5
        o_ref = (s.softmax(-1) @ heads(kv[:, :, 1])).transpose(1, 2).reshape(B, Nq, D)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert lse.dtype == stats.dtype == acc and q.dtype == o.dtype == out.dtype == dtype
        for name, got, want in [("q", q, q_ref), ("o", o, o_ref), ("lse", lse, s.logsumexp(-1)),
                                ("mean", stats[..., 0], mean), ("rstd", stats[..., 1], (var + 1e-5).rsqrt()),
                                ("out", out, x + F.linear(o_ref, params[4], params[5]))]:
            torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=1e-5, msg=f"{impl} {dtype} {name}")


@pytest.mark.parametrize("impl_device", impl_params("cross_attention"))
def test_gradcheck_float64(impl_device):
    impl, device = impl_device
    x, kv_all, params = _inputs((2, 3, 5, 8, 2), torch.float64, device)  # few inputs: the interpreter is slow
    leaves = tuple(t.requires_grad_() for t in (x, kv_all, *params))
    # Interpreted Triton (~0.1 s a call): fast mode, the Jacobian along random directions, 2 calls an input
    # instead of one per element (80 s down to a few).
    assert torch.autograd.gradcheck(lambda x, kv_all, *p: ops.cross_attention(x, kv_all[:, :, 1], *p, 2, impl=impl),
                                    leaves, fast_mode=impl == "triton" and device == "cpu")


@pytest.mark.parametrize("impl_device", impl_params("cross_attention"))
def test_opcheck(impl_device):
    impl, device = impl_device
    x, kv_all, params = _inputs((2, 6, 9, 32, 2), torch.float32, device)
    for t in (x, kv_all, *params):
        t.requires_grad_()
    torch.library.opcheck(ops.cross_attention_op(impl), (x, kv_all[:, :, 0], *params, 2, 1e-5))


def _first_then_second_order(fn, leaves):
    """The create_graph=True gradients of <dout, fn(leaves)>, and the grad of <v, those>: the second
    derivatives along random dout and v."""
    gen = torch.Generator().manual_seed(7)
    out = fn(*leaves)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, dout, create_graph=True)
    total = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)).sum() for g in grads)
    return grads, torch.autograd.grad(total, leaves, materialize_grads=True)


@pytest.mark.parametrize("impl_device", impl_params("cross_attention"))
def test_double_backward_raises(impl_device):
    """The fused backward (C++ on CPU, ATen from saved q, o, lse elsewhere) is not differentiable: with
    create_graph=True the first-order gradients are still right, a second grad through them raises
    naming the op and what supports it, instead of returning wrong second derivatives."""
    impl, device = impl_device
    x, kv_all, params = _inputs((2, 3, 5, 8, 2), torch.float64, device)
    leaves = [t.requires_grad_() for t in (x, kv_all, *params)]
    fn = lambda x, kv_all, *p: ops.cross_attention(x, kv_all[:, :, 1], *p, 2, impl=impl)  # noqa: E731
    out = fn(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout, create_graph=True)
    for name, g, want in zip(NAMES, grads, _grads(fn(*leaves), leaves, dout)):
        torch.testing.assert_close(g, want, rtol=0, atol=0, msg=f"first-order d{name} under create_graph")
    with pytest.raises(RuntimeError, match=r"lifeiqa_fast.cross_attention: double backward .* not supported .*"
                                           r"impl=\"reference\" under .*SDPBackend.MATH"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


def test_double_backward_alternatives():
    """What the error recommends has a right double backward: the reference under the math attention,
    and attend_memory (composite ATen ops), both equal to mha_ref's in float64."""
    B, Nq, Nk, D, H = 2, 3, 5, 8, 2
    rnd = functools.partial(randn_from, torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_() for t in (rnd(B, Nq, D), rnd(B, Nk, D), rnd(D, scale=0.2, shift=1.0), rnd(D),
                                           rnd(3 * D, D), rnd(3 * D), rnd(D, D), rnd(D))]

    def via_kv(x, memory, nw, nb, w, b, ow, ob):
        kv = F.linear(memory, w[D:], b[D:]).view(B, Nk, 2, D)
        return ops.cross_attention(x, kv, nw, nb, w[:D], b[:D], ow, ob, H, impl="reference")

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        _, want = _first_then_second_order(lambda *a: mha_ref(*a, H), leaves)
        _, reference = _first_then_second_order(via_kv, leaves)
    _, fused = _first_then_second_order(lambda *a: ops.attend_memory(*a, H), leaves)
    for name, w, r, f in zip(MEMORY_NAMES, want, reference, fused):
        torch.testing.assert_close(r, w, rtol=1e-10, atol=1e-10, msg=f"reference: second derivative {name}")
        torch.testing.assert_close(f, w, rtol=1e-10, atol=1e-10, msg=f"attend_memory: second derivative {name}")


def test_compiles_fullgraph():
    x, kv_all, params = _inputs((2, 6, 9, 32, 2), torch.float32, "cpu")
    fn = torch.compile(lambda x, kv: ops.cross_attention(x, kv, *params, 2), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x, kv_all[:, :, 1]), ops.cross_attention(x, kv_all[:, :, 1], *params, 2))


def test_kv_with_strided_last_dimension_is_copied():
    x, kv_all, params = _inputs((2, 6, 9, 32, 2), torch.float32, "cpu")
    kv = kv_all[:, :, 0].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last dim strided
    assert kv.stride(-1) != 1
    torch.testing.assert_close(ops.cross_attention(x, kv, *params, 2, impl="native"),
                               cross_attention_ref(x, kv, *params, 2))


def _wide(case):
    """x, one layer's kv and the six parameters of case."""
    x, kv_all, params = _inputs(case, torch.float32, "cpu")
    return x, kv_all[:, :, 0], *params


def _bad(**change):
    x, kv_all, params = _inputs((2, 6, 9, 32, 2), torch.float32, "cpu")
    args = dict(x=x, kv=kv_all[:, :, 0], **dict(zip(NAMES[2:], params)), num_heads=2)
    args.update(change)
    return lambda: ops.cross_attention(**args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (_bad(x=torch.randn(6, 32)), ValueError, r"x must have shape \(B, Nq, D\), got \(6, 32\)"),
        (_bad(x=torch.randn(2, 65, 32), impl="native"), ValueError,
         r"impl='native' cannot run this input: the kernels take at most 64 query tokens .* got Nq=65"),
        (_bad(kv=torch.randn(2, 9, 32)), ValueError, r"kv must have shape \(B, Nk, 2, D\) with B=2, Nk >= 1, D=32"),
        (_bad(kv=torch.randn(2, 0, 2, 32)), ValueError, r"kv must have shape \(B, Nk, 2, D\)"),
        (_bad(kv=torch.randn(3, 9, 2, 32)), ValueError, r"kv must have shape \(B, Nk, 2, D\) with B=2"),
        (_bad(num_heads=3), ValueError, "num_heads must be an int dividing D=32"),
        (_bad(num_heads=0), ValueError, "num_heads must be an int dividing D=32"),
        (_bad(num_heads=True), ValueError, "num_heads must be an int dividing D=32, got True"),
        (_bad(num_heads=2.0), ValueError, r"num_heads must be an int dividing D=32, got 2\.0"),
        (_bad(**dict(zip(["x", "kv", *NAMES[2:]], _wide((2, 6, 9, 258, 1)))), num_heads=1, impl="native"),
         ValueError, r"heads of at most 128 channels \(kAttnMaxHeadDim\), got Nq=6, D / num_heads=258"),
        (_bad(q_weight=torch.randn(32, 16)), ValueError,
         r"q_weight must have shape \(D, D\) = \(32, 32\), got \(32, 16\)"),
        (_bad(out_bias=torch.randn(16)), ValueError, r"out_bias must have shape \(D,\) = \(32,\), got \(16,\)"),
        (_bad(eps=0.0), ValueError, "eps must be a positive number"),
        (_bad(eps=True), ValueError, "eps must be a positive number, got True"),
        (_bad(norm_weight=torch.randn(32, dtype=torch.float64)), ValueError, "norm_weight must have x's dtype"),
        (_bad(x=torch.ones(2, 6, 32, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
        (_bad(q_bias=[0.0] * 32), TypeError, "q_bias must be a torch.Tensor"),
    ],
    ids=["2-d-x", "too-many-queries-native", "3-d-kv", "no-keys", "kv-batch", "heads-not-dividing", "zero-heads",
         "bool-heads", "float-heads", "head-dim-too-large", "q-weight-shape", "out-bias-shape", "eps", "bool-eps",
         "dtype-mismatch", "int-x", "list-bias"],
)
def test_bad_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_native_op_checks_its_contract():
    x, kv_all, params = _inputs((2, 6, 9, 32, 2), torch.float32, "cpu")
    with pytest.raises(RuntimeError,
                       match=r"lifeiqa_fast.cross_attention: q_weight must have shape \(D, D\) = \(32, 32\)"):
        torch.ops.lifeiqa_fast.cross_attention(x, kv_all[:, :, 0], *params[:2], params[2][:, :16].contiguous(),
                                               *params[3:], 2, 1e-5)


# attend_memory's implementations on CPU: its composite ATen path and its native kernel (both ISA builds)
ATTEND_IMPLS = [p for p in impl_params("attend_memory", composite=True)
                if p.values[0] in (("composite", "cpu"), ("native", "cpu"))]
MEMORY_NAMES = ["x", "memory", "norm_weight", "norm_bias", "in_proj_weight", "in_proj_bias", "out_weight", "out_bias"]


def _attend_memory_case(case, dtype, scale=1.0, impl="composite"):
    """(generator, leaves in dtype, the same in float64, (attend_memory with impl, mha_ref and the float64
    truth's outputs)) for case (B, Nq, Nk, D, H); memory and in_proj's weights scaled by scale."""
    B, Nq, Nk, D, H = case
    gen = torch.Generator().manual_seed(0)
    rnd = functools.partial(randn_from, gen)
    values = [rnd(B, Nq, D), rnd(B, Nk, D, scale=scale), rnd(D, scale=0.2, shift=1.0), rnd(D, scale=0.1),
              rnd(3 * D, D, scale=scale * D**-0.5), rnd(3 * D, scale=0.5), rnd(D, D, scale=D**-0.5), rnd(D, scale=0.1)]
    leaves = [t.to(dtype).requires_grad_() for t in values]
    leaves64 = float64_leaves(values)
    outs = [ops.attend_memory(*leaves, H, impl=impl), mha_ref(*leaves, H), mha_ref(*leaves64, H)]
    return gen, leaves, leaves64, outs


@pytest.mark.parametrize("impl_device", ATTEND_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [(2, 6, 49, 384, 6), (3, 1, 1, 64, 2), (2, 7, 50, 100, 4), (1, 19, 9, 20, 4),
                                  (0, 6, 49, 64, 2)],
                         ids=["life-iqa", "Nq1-Nk1", "D100-hd25", "Nq19-D20", "empty-batch"])
def test_attend_memory_equals_the_official_layer(impl_device, case, dtype):
    """ops.attend_memory (queries taken to the memory, keys and values never formed) against mha_ref,
    the authors' module call, forward and backward, each against the float64 truth. The native kernel
    (rows in blocks of 8: Nq 19 takes three; D 20 and 100 leave tails past the 8-float vectors) takes
    fp32 and bf16 and refuses fp64 by name."""
    impl, _ = impl_device
    if impl == "native" and dtype == torch.float64:
        with pytest.raises(ValueError, match="impl='native' cannot run this input: the native attend_memory "
                                             "kernel takes float32 and bfloat16, got torch.float64"):
            _attend_memory_case(case, dtype, impl=impl)
        return
    gen, leaves, leaves64, (out, ref, truth) = _attend_memory_case(case, dtype, impl=impl)
    tol = TOLERANCE["attend_memory"].get(dtype, {"forward": (1e-12, 1e-12, 1.0), "backward": (1e-11, 1e-11, 1.0)})
    assert_forward_backward_match(out, ref, truth, leaves, leaves64, MEMORY_NAMES, randn_from(gen, *out.shape), tol,
                                  f"attend_memory {impl} {dtype}")


def test_attend_memory_auto_takes_the_kernel_at_few_rows_without_autograd():
    """impl="auto" on CPU: the native kernel for at most NATIVE_MAX_ROWS rows with no gradient recorded
    (bit for bit its result), else the composite path; the native op's backward is the composite's, once."""
    from lifeiqa_fast.ops.cross_attention import NATIVE_MAX_ROWS

    Nq = 6
    for B, want in ((1, "native"), (NATIVE_MAX_ROWS // Nq, "native"), (NATIVE_MAX_ROWS // Nq + 1, "composite")):
        _, leaves, _, _ = _attend_memory_case((B, Nq, 9, 32, 2), torch.float32)
        with torch.no_grad():
            auto, native, composite = (ops.attend_memory(*leaves, 2, impl=i) for i in ("auto", "native", "composite"))
        assert torch.equal(auto, native if want == "native" else composite), f"B={B}: auto should run {want}"
        assert not torch.equal(native, composite), "the two paths sum in other orders: the test cannot tell them apart"
    grad_auto, composite = (ops.attend_memory(*leaves, 2, impl=i) for i in ("auto", "composite"))
    assert torch.equal(grad_auto, composite), "with a gradient recorded auto runs the composite path"
    out = ops.attend_memory(*leaves, 2, impl="native")
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=r"lifeiqa_fast.attend_memory: double backward .* use "
                                           r"lifeiqa_fast.ops.attend_memory\(impl='composite'\)"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


def test_attend_memory_kernel_checks_its_input():
    """The native op called directly names what is wrong (ops.attend_memory checks before it)."""
    _, leaves, _, _ = _attend_memory_case((2, 6, 9, 32, 2), torch.float32)
    x, memory, nw, nb, w, b, ow, ob = (t.detach() for t in leaves)
    op = torch.ops.lifeiqa_fast.attend_memory
    with pytest.raises(RuntimeError, match=r"in_proj_weight must have shape \(3D, D\) = \(96, 32\), got \(32, 32\)"):
        op(x, memory, nw, nb, w[:32].contiguous(), b, ow, ob, 2, 1e-5)
    with pytest.raises(RuntimeError, match="the CPU kernel takes float32 and bfloat16, got torch.float64"):
        op(*(t.double() for t in (x, memory, nw, nb, w, b, ow, ob)), 2, 1e-5)
    with pytest.raises(RuntimeError, match="num_heads must be an int dividing D=32, got 3"):
        op(x, memory, nw, nb, w, b, ow, ob, 3, 1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(memory=torch.randn(2, 9, 16)), r"memory must have shape \(B, Nk, D\) with B=2, Nk >= 1, D=32"),
        (dict(memory=torch.randn(2, 0, 32)), r"memory must have shape \(B, Nk, D\)"),
        (dict(in_proj_weight=torch.randn(32, 32)), r"in_proj_weight must have shape \(3D, D\) = \(96, 32\)"),
        (dict(num_heads=5), "num_heads must be an int dividing D=32, got 5"),
        (dict(num_heads=True), "num_heads must be an int dividing D=32, got True"),
        (dict(eps=True), "eps must be a positive number, got True"),
        (dict(eps=-1e-5), "eps must be a positive number, got -1e-05"),
        (dict(x=torch.randn(2, 6, 0), memory=torch.randn(2, 9, 0), norm_weight=torch.randn(0),
              norm_bias=torch.randn(0), in_proj_weight=torch.randn(0, 0), in_proj_bias=torch.randn(0),
              out_weight=torch.randn(0, 0), out_bias=torch.randn(0), num_heads=1), "dividing D=0, got 1"),
        (dict(out_bias=torch.randn(32, dtype=torch.float64)), "out_bias must have x's dtype and device"),
    ],
    ids=["memory-D", "no-memory", "in-proj-shape", "heads", "bool-heads", "bool-eps", "negative-eps", "D0",
         "dtype-mismatch"],
)
def test_attend_memory_bad_input_errors(change, message):
    x, kv_all, (nw, nb, qw, qb, ow, ob) = _inputs((2, 6, 9, 32, 2), torch.float32, "cpu")
    args = dict(x=x, memory=kv_all[:, :, 0, 0], norm_weight=nw, norm_bias=nb, in_proj_weight=torch.cat([qw] * 3),
                in_proj_bias=torch.cat([qb] * 3), out_weight=ow, out_bias=ob, num_heads=2)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ops.attend_memory(**args)


@pytest.mark.parametrize("dtype, impl", [(torch.float16, "composite"), (torch.bfloat16, "composite"),
                                         (torch.bfloat16, "native")])
def test_attend_memory_large_scores_half(dtype, impl):
    """in_proj and memory scaled by 30: scores near 1e5, past fp16's 65504, while q, k and the output are
    finite. The module's attention forms them in fp32 and so must attend_memory (fp16 gave all NaN):
    finite, and no further from the float64 truth than twice the module's own error in that dtype,
    forward and backward."""
    gen, leaves, leaves64, (out, ref, truth) = _attend_memory_case((2, 6, 49, 64, 2), dtype, scale=30.0, impl=impl)
    assert bool(out.isfinite().all()), f"attend_memory {dtype}: {int((~out.isfinite()).sum())} non-finite outputs"
    scale = truth.abs().max().item()  # outputs near 4e3: the tolerances are relative to that
    fwd_atol, fwd_rtol, slack = TOLERANCE["attend_memory"][dtype]["forward"]
    assert_matches_reference(out, ref, truth, (fwd_atol * scale, fwd_rtol, slack), f"attend_memory {dtype} forward")
    dout = randn_from(gen, *out.shape)
    grads = _grads(out, leaves, dout.to(dtype))
    assert all(bool(g.isfinite().all()) for g in grads), f"attend_memory {dtype}: non-finite gradients"
    assert_gradients_match(MEMORY_NAMES, grads, _grads(ref, leaves, dout.to(dtype)), _grads(truth, leaves64, dout),
                           TOLERANCE["attend_memory"][dtype]["backward"], f"attend_memory {dtype}")
