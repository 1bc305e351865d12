"""Property-based tests: each op's native CPU kernel against the reference on random shapes (sizes 0
and 1 wherever the op allows them), dtypes, memory layouts and values, forward and backward.

Each example runs in a forked child process, so that a kernel that crashes on some shape (a segfault,
an abort) fails that example, with the child's signal, instead of killing the test run; hypothesis
then shrinks it like any other failure. 25 examples per op by default (conftest.py's profiles),
about 35 ms of fork each: the file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import multiprocessing
import signal
import traceback

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import helpers
from helpers import assert_each_matches_reference, float64_leaves, moe_loss, randn_from
from lifeiqa_fast import ops
from lifeiqa_fast.ops._impl import _why_not
from lifeiqa_fast.ops.cross_attention import MAX_QUERIES
from lifeiqa_fast.ops.gcn import MAX_TOKENS
from lifeiqa_fast.reference import cross_attention_ref, grid_pool_ref, mha_ref, moe_ref

# The examples' budget and seed: conftest.py's hypothesis profiles ("ci", the default: 25 examples per
# op, the same ones every run; "explore": more, new ones each run; pytest --hypothesis-profile=explore).
SETTINGS = dict(deadline=None)
CHILD_TIMEOUT_S = 120  # one example, fork to verdict; the slowest take well under a second

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="the examples run in forked children: no fork on this platform")

# (atol, rtol, slack) per op and dtype, forward and backward: each op's own table (helpers.TOLERANCE says
# why), plus float64, where kernel and reference both compute in float64 and differ by summation order
# only. Values are drawn at scales 1/4 to 4, so atol is applied per unit of the largest |truth| of the
# tensor compared (helpers.assert_each_matches_reference).
FLOAT64 = {"forward": (1e-10, 1e-10, 1.0), "backward": (1e-10, 1e-10, 1.0)}
TOLERANCE = {
    "grid_pool": {**helpers.TOLERANCE["grid_pool"], torch.float64: FLOAT64},
    "gcn": {**helpers.TOLERANCE["gcn"], torch.float64: FLOAT64},
    # random shapes include ill-conditioned layers (a LayerNorm over 2 channels of nearly equal values,
    # scores scaled by 16): both implementations' errors grow there, the kernel's up to 2.7x the
    # reference's (fp32, D = 2, Nq 64, Nk 130): 4x the reference's own error, plus atol
    "cross_attention": {**{dtype: {way: (*tol[:2], max(tol[2], 4.0)) for way, tol in table.items()}
                           for dtype, table in helpers.TOLERANCE["cross_attention"].items()}, torch.float64: FLOAT64},
    # float64 gradients: aux's flows through the authors' gates.float(), fp32 even in float64
    "moe": {**helpers.TOLERANCE["moe"], torch.float64: {"forward": FLOAT64["forward"], "backward": (1e-8, 1e-8, 1.0)}},
}
# attend_memory against the authors' module call: composite ATen ops both, the same rounding points
# up to the order of the products; fp16 too (it runs anywhere, half scores in fp32).
TOLERANCE["attend_memory"] = {**helpers.TOLERANCE["attend_memory"], torch.float64: FLOAT64}

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64])
SCALES = st.sampled_from([0.25, 1.0, 4.0])
SEEDS = st.integers(0, 2**31 - 1)
# How a tensor lies in memory: "contiguous"; "reversed": dimensions stored in reverse order (as a
# transpose leaves them); "strided": every other element of the last dimension; "offset": a storage
# offset; "broadcast": stride 0 along the first dimension (its rows all equal).
LAYOUTS = st.sampled_from(["contiguous", "reversed", "strided", "offset", "broadcast"])


def _native(op: str) -> None:
    why = _why_not(op, "native", "cpu")
    if why is not None:
        pytest.skip(why)


# ---------------------------------------------------------------- running an example in a child

class Invalid(Exception):
    """Raised by a check in the child: the example is not a fair test (hypothesis.reject in the parent)."""


REJECTED = "rejected"


def _child(send, fn, case) -> None:
    # OpenMP's thread pool does not survive fork: the child's first parallel region would wait for
    # the parent's threads forever. One thread; the other test files cover the threaded paths.
    torch.set_num_threads(1)
    try:
        fn(case)
    except Invalid:
        send.send(REJECTED)
    except BaseException:  # noqa: BLE001  (reported to the parent, whatever it is)
        send.send(traceback.format_exc())
    else:
        send.send(None)


def run_forked(fn, case) -> None:
    """fn(case) in a forked child; its exception, its death by a signal or a non-zero exit, or its
    running past CHILD_TIMEOUT_S, as an AssertionError here; its Invalid, as hypothesis.reject()."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, case), daemon=True)
    child.start()
    send.close()
    verdict, answered = None, False
    if receive.poll(CHILD_TIMEOUT_S):
        try:
            verdict, answered = receive.recv(), True
        except EOFError:  # the child died before answering
            pass
    child.join(10 if answered else 1)
    if child.is_alive():
        child.kill()
        child.join()
        raise AssertionError(f"{fn.__name__}({case}): no verdict within {CHILD_TIMEOUT_S} s (hung?)")
    if not answered:
        code = child.exitcode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise AssertionError(f"{fn.__name__}({case}): the child process died with {how}")
    if verdict == REJECTED:
        reject()
    if verdict is not None:
        raise AssertionError(f"{fn.__name__}({case}) failed in the child:\n{verdict}")


# ---------------------------------------------------------------- inputs and comparisons

def _tensor(gen, shape, dtype, layout, scale=1.0, shift=0.0):
    """shift + scale * randn(shape) in dtype, laid out as LAYOUTS says; a leaf that requires grad."""
    return _laid_out(randn_from(gen, *shape, scale=scale, shift=shift), dtype, layout)


def _laid_out(values, dtype, layout):
    """values in dtype, laid out as LAYOUTS says; a leaf that requires grad."""
    shape = tuple(values.shape)
    if layout == "broadcast" and len(shape) > 0 and shape[0] > 1:
        t = values[:1].to(dtype).expand(shape)
    elif layout == "reversed":
        t = torch.empty(shape[::-1], dtype=dtype).permute(*reversed(range(len(shape)))).copy_(values)
    elif layout == "strided" and len(shape) > 0:
        t = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2].copy_(values)
    elif layout == "offset":
        t = torch.empty(values.numel() + 3, dtype=dtype)[3:].view(shape).copy_(values)
    else:
        t = values.to(dtype)
    return t.detach().requires_grad_()


def _grads(out, leaves, dout):
    if not out.requires_grad:  # the reference's moe with no tokens: out is zeros_like(x), no graph
        return [torch.zeros_like(t) for t in leaves]
    return torch.autograd.grad(out, leaves, dout, allow_unused=True, materialize_grads=True)


def _check_against_reference(op, names, leaves, run, reference, dtype, what) -> None:
    """run(*leaves) (the native op) against reference(*leaves) in dtype and reference(*float64 leaves),
    forward and backward along one random cotangent."""
    leaves64 = float64_leaves(leaves)
    out, ref, truth = run(*leaves), reference(*leaves), reference(*leaves64)
    tol = TOLERANCE[op][dtype]
    assert_each_matches_reference(["out"], [out], [ref], [truth], tol["forward"], f"{what} forward")
    dout = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_each_matches_reference(names, _grads(out, leaves, dout.to(dtype)), _grads(ref, leaves, dout.to(dtype)),
                                  _grads(truth, leaves64, dout), tol["backward"], what)


# ---------------------------------------------------------------- grid_pool

@st.composite
def grid_pool_cases(draw):
    grid = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
    return dict(B=draw(st.integers(0, 3)), H=grid + draw(st.integers(0, 9)), W=grid + draw(st.integers(0, 9)),
                C=draw(st.integers(0, 20) | st.sampled_from([127, 128, 129])), grid=grid,
                layout=draw(st.sampled_from(["nhwc", "nchw"])), memory=draw(LAYOUTS), dtype=draw(DTYPES),
                scale=draw(SCALES), seed=draw(SEEDS))


def _check_grid_pool(c) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    shape = (c["B"], c["H"], c["W"], c["C"]) if c["layout"] == "nhwc" else (c["B"], c["C"], c["H"], c["W"])
    x = _tensor(gen, shape, c["dtype"], c["memory"], c["scale"])
    to_nchw = (lambda t: t.permute(0, 3, 1, 2)) if c["layout"] == "nhwc" else (lambda t: t)
    _check_against_reference("grid_pool", ["dx"], [x],
                             lambda x: ops.grid_pool(x, c["grid"], layout=c["layout"], impl="native"),
                             lambda x: grid_pool_ref(to_nchw(x), c["grid"]), c["dtype"], "grid_pool")


@settings(**SETTINGS)
@given(case=grid_pool_cases())
def test_grid_pool(case):
    _native("grid_pool")
    run_forked(_check_grid_pool, case)


# ---------------------------------------------------------------- gcn

@st.composite
def gcn_cases(draw):
    return dict(B=draw(st.integers(0, 4)), N=draw(st.integers(1, MAX_TOKENS)),
                D=draw(st.integers(0, 40)), H1=draw(st.integers(0, 24)), H2=draw(st.integers(0, 24)),
                adj=draw(st.sampled_from(["fixed", "shared", "per-sample"])),
                memory=draw(st.lists(LAYOUTS, min_size=8, max_size=8)), dtype=draw(DTYPES), scale=draw(SCALES),
                seed=draw(SEEDS))


def _check_gcn(c) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    B, N, D, H1, H2, dtype, layouts = c["B"], c["N"], c["D"], c["H1"], c["H2"], c["dtype"], c["memory"]
    shapes = [(B, N, D), (D, H1), (H1,), (H1, H2), (H2,), (H2, D), (D,)]
    scales = [c["scale"], max(D, 1) ** -0.5, 0.1, max(H1, 1) ** -0.5, 0.1, max(H2, 1) ** -0.5, 0.1]
    leaves = [_tensor(gen, s, dtype, m, k) for s, m, k in zip(shapes, layouts, scales)]
    names = ["dx", "dw1", "db1", "dw2", "db2", "dw3", "db3"]
    if c["adj"] != "fixed":
        adj_shape = (N, N) if c["adj"] == "shared" else (B, N, N)
        leaves.append(_tensor(gen, adj_shape, dtype, layouts[7], 1.0 / N, shift=0.5 / N))
        names.append("dadj")

    def run(x, *weights_and_adj):
        return ops.gcn(x, *(weights_and_adj[6:] or [None]), *weights_and_adj[:6], impl="native")

    # the fixed graph (J + I) / (N + 1) exact in float64 (reference.fixed_adjacency forms it in fp32)
    fixed = (torch.ones(N, N, dtype=torch.float64) + torch.eye(N, dtype=torch.float64)) / (N + 1)
    adj64 = leaves[7].detach().double() if len(leaves) > 7 else fixed
    w64 = [t.detach().double() for t in leaves[1:7]]
    # A ReLU whose input is within rounding of 0 may fall either way in the kernel, the reference and the
    # float64 truth, and its gradient then differs by a whole term. So: the kernel's decisions may differ
    # from the truth's only there; the gradients are then compared with the kernel's decisions imposed.
    with torch.no_grad():
        adj = leaves[7].detach() if len(leaves) > 7 else None
        _, *hidden = torch.ops.lifeiqa_fast.gcn(leaves[0].detach(), adj, *(t.detach() for t in leaves[1:7]))
    decisions = [h.double() > 0 for h in hidden]
    h = leaves[0].detach().double()
    for (w, b), decided in zip(((w64[0], w64[1]), (w64[2], w64[3])), decisions):
        pre = adj64 @ (h @ w) + b
        bound = adj64.abs() @ (h.abs() @ w.abs()) + b.abs()  # the scale of the rounding errors in pre
        flipped = decided != (pre > 0)
        margin = 32 * torch.finfo(dtype).eps * bound
        assert bool((pre.abs()[flipped] <= margin[flipped]).all()), f"gcn: a ReLU decided otherwise, far from 0"
        h = pre * decided

    def reference(x, *weights_and_adj):
        adj = weights_and_adj[6] if len(weights_and_adj) > 6 else fixed.to(x.dtype)
        return gcn_with_decisions(x, adj, *weights_and_adj[:6], [d.to(x.dtype) for d in decisions])

    _check_against_reference("gcn", names, leaves, run, reference, dtype, f"gcn {c['adj']}")


def gcn_with_decisions(x, adj, w1, b1, w2, b2, w3, b3, decisions):
    """gcn_ref with its two ReLUs' decisions given (0/1 tensors multiplied in instead), in the reference's
    order of operations."""
    B = x.shape[0]
    adj_b = adj.expand(B, -1, -1) if adj.dim() == 2 else adj
    h = x
    for w, b, decided in ((w1, b1, decisions[0]), (w2, b2, decisions[1]), (w3, b3, None)):
        h = torch.bmm(adj_b, torch.bmm(h, w.unsqueeze(0).expand(B, -1, -1))) + b
        h = h if decided is None else h * decided
    return x + h


@settings(**SETTINGS)
@given(case=gcn_cases())
def test_gcn(case):
    _native("gcn")
    run_forked(_check_gcn, case)


# ---------------------------------------------------------------- cross_attention

ATTENTION_NAMES = ["dx", "dkv", "dnorm_weight", "dnorm_bias", "dq_weight", "dq_bias", "dout_weight", "dout_bias"]


@st.composite
def cross_attention_cases(draw):
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 24) | st.sampled_from([64, 127, 128]))
    return dict(B=draw(st.integers(0, 3)), Nq=draw(st.integers(1, 8) | st.sampled_from([MAX_QUERIES - 1, MAX_QUERIES])),
                Nk=draw(st.integers(1, 40) | st.just(130)), heads=heads if head_dim <= 24 else 1,
                head_dim=head_dim, memory=draw(st.lists(LAYOUTS, min_size=8, max_size=8)), dtype=draw(DTYPES),
                scale=draw(SCALES), seed=draw(SEEDS))


def _check_cross_attention(c) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    B, Nq, Nk, H, dtype, layouts = c["B"], c["Nq"], c["Nk"], c["heads"], c["dtype"], c["memory"]
    D = H * c["head_dim"]
    shapes = [(B, Nq, D), (B, Nk, 2, D), (D,), (D,), (D, D), (D,), (D, D), (D,)]
    scales = [c["scale"], c["scale"], 0.2, 0.1, D**-0.5, 0.1, D**-0.5, 0.1]
    shifts = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # norm_weight near 1
    leaves = [_tensor(gen, *args) for args in zip(shapes, [dtype] * 8, layouts, scales, shifts)]
    _require_determined_scores(leaves, H, dtype)
    _check_against_reference("cross_attention", ATTENTION_NAMES, leaves,
                             lambda *t: ops.cross_attention(*t, H, impl="native"),
                             lambda *t: cross_attention_ref(*t, H), dtype, "cross_attention")


def _require_determined_scores(leaves, H, dtype) -> None:
    """Invalid unless the dtype's rounding of q and k moves each score by at most 0.25 (bounded by eps
    |q_h| . |k_h| / sqrt(hd)): beyond, the softmax weights themselves (a factor up to e^0.25 each) are
    not fixed by the inputs in that dtype, and which key wins a near-tie is rounding's choice."""
    x, kv, norm_weight, norm_bias, q_weight, q_bias = (t.detach().double() for t in leaves[:6])
    B, Nq, D = x.shape
    hd = D // H
    q = F.layer_norm(x, (D,), norm_weight, norm_bias) @ q_weight.T + q_bias
    q_abs, k_abs = q.abs().reshape(B, Nq, H, hd), kv[:, :, 0].abs().reshape(B, kv.shape[1], H, hd)
    bound = torch.einsum("bqhc,bkhc->bhqk", q_abs, k_abs) * hd**-0.5 * torch.finfo(dtype).eps
    if bound.numel() and bound.max().item() > 0.25:
        raise Invalid


@settings(**SETTINGS)
@given(case=cross_attention_cases())
def test_cross_attention(case):
    _native("cross_attention")
    run_forked(_check_cross_attention, case)


# ---------------------------------------------------------------- attend_memory (composite ATen ops)

@st.composite
def attend_memory_cases(draw):
    return dict(B=draw(st.integers(0, 3)), Nq=draw(st.integers(0, 8)), Nk=draw(st.integers(1, 20)),
                heads=draw(st.integers(1, 4)), head_dim=draw(st.integers(1, 16)),
                memory=draw(st.lists(LAYOUTS, min_size=8, max_size=8)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])),
                scale=draw(SCALES), seed=draw(SEEDS))


def _check_attend_memory(c) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    B, Nq, Nk, H, dtype, layouts = c["B"], c["Nq"], c["Nk"], c["heads"], c["dtype"], c["memory"]
    D = H * c["head_dim"]
    shapes = [(B, Nq, D), (B, Nk, D), (D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,)]
    scales = [c["scale"], c["scale"], 0.2, 0.1, D**-0.5, 0.5, D**-0.5, 0.1]
    shifts = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    leaves = [_tensor(gen, *args) for args in zip(shapes, [dtype] * 8, layouts, scales, shifts)]
    names = ["dx", "dmemory", "dnorm_weight", "dnorm_bias", "din_proj_weight", "din_proj_bias", "dout_weight",
             "dout_bias"]
    _check_against_reference("attend_memory", names, leaves, lambda *t: ops.attend_memory(*t, H),
                             lambda *t: mha_ref(*t, H), dtype, "attend_memory")


@settings(**SETTINGS)
@given(case=attend_memory_cases())
def test_attend_memory(case):
    run_forked(_check_attend_memory, case)


# ---------------------------------------------------------------- moe

MOE_NAMES = ["dx", "drouter_weight", "drouter_bias", "dw1", "db1", "dw2", "db2"]


@st.composite
def moe_cases(draw):
    experts = draw(st.integers(1, 8))
    # the router's rows and bias not broadcast: equal rows tie every logit in exact arithmetic, and
    # rounding then breaks the ties (the "tied" routing tests exact ties)
    router = st.sampled_from(["contiguous", "reversed", "strided", "offset"])
    return dict(T=draw(st.integers(0, 20)), D=draw(st.integers(1, 40)), F=draw(st.integers(1, 40)), E=experts,
                k=draw(st.integers(1, experts)), routing=draw(st.sampled_from(["random", "tied", "one-expert"])),
                dropout=draw(st.booleans()),
                memory=[draw(LAYOUTS), draw(router), draw(router), *draw(st.lists(LAYOUTS, min_size=5, max_size=5))],
                dtype=draw(DTYPES), scale=draw(SCALES), seed=draw(SEEDS))


def _check_moe(c) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    T, D, F, E, k, dtype, layouts = c["T"], c["D"], c["F"], c["E"], c["k"], c["dtype"], c["memory"]
    shapes = [(T, D), (E, D), (E,), (E, F, D), (E, F), (E, D, F), (E, D)]
    scales = [c["scale"], D**-0.5, 0.1, D**-0.5, 0.1, F**-0.5, 0.1]
    leaves = [_tensor(gen, s, dtype, m, w) for s, m, w in zip(shapes, layouts, scales)]
    if c["routing"] == "tied":  # every logit equal: torch.topk's order of ties
        leaves[1], leaves[2] = _laid_out(torch.zeros(E, D), dtype, layouts[1]), _laid_out(torch.zeros(E), dtype, "")
    if c["routing"] == "one-expert":  # a bias that wins every token for expert E - 1
        bias = leaves[2].detach().double()
        bias[E - 1] = 100.0
        leaves[2] = _laid_out(bias, dtype, layouts[2])
    if c["routing"] != "tied" and k < E:
        # a token whose k-th and (k+1)-th logits are within rounding of each other may be routed either
        # way by kernel, reference and truth: not a fair example
        x64, w64, b64 = (t.detach().double() for t in leaves[:3])
        top = torch.topk(x64 @ w64.T + b64, k + 1, dim=1).values
        bound = x64.abs() @ w64.abs().T + b64.abs()
        if bool((top[:, k - 1] - top[:, k] <= 32 * torch.finfo(dtype).eps * bound.max(dim=1).values).any()):
            raise Invalid
    mask = None
    if c["dropout"]:
        keep = torch.rand(T, k, F, generator=gen) > 0.1
        mask = (keep / 0.9).to(dtype)
    mask64 = None if mask is None else mask.double()
    leaves64 = float64_leaves(leaves)
    out, aux, z = ops.moe(*leaves, k, mask, impl="native")
    ref = moe_ref(*leaves, k, dropout_mask=mask)
    truth = moe_ref(*leaves64, k, dropout_mask=mask64)
    tol = TOLERANCE["moe"][dtype]
    what = f"moe {c['routing']}"
    if T == 0:  # no tokens: the losses are means over nothing; out and its gradients (zero) only
        assert out.shape == (0, D) and aux.shape == z.shape == (), f"{what}: shapes {out.shape} {aux.shape} {z.shape}"
        assert_each_matches_reference(MOE_NAMES, _grads(out, leaves, torch.zeros(0, D, dtype=dtype)),
                                      _grads(ref[0], leaves, torch.zeros(0, D, dtype=dtype)),
                                      _grads(truth[0], leaves64, torch.zeros(0, D, dtype=torch.float64)),
                                      tol["backward"], what)
        return
    # 0-d losses: fp32 (fp64 for fp64) in the kernel, compared in the test dtype as test_moe does
    assert_each_matches_reference(["out", "z"], [out, z.to(dtype)], [ref[0], ref[2].to(dtype)], [truth[0], truth[2]],
                                  tol["forward"], f"{what} forward")
    # the authors form aux from gates.float(): in float64 the truth's aux is only fp32-accurate
    aux_tol = TOLERANCE["moe"][torch.float32 if dtype == torch.float64 else dtype]["forward"]
    assert_each_matches_reference(["aux"], [aux.to(dtype)], [ref[1].to(dtype)], [truth[1]], aux_tol,
                                  f"{what} forward")
    dout = torch.randn(T, D, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(moe_loss(out, aux, z, dout.to(dtype)), leaves, allow_unused=True,
                                materialize_grads=True)
    grads_ref = torch.autograd.grad(moe_loss(*ref, dout.to(dtype)), leaves, allow_unused=True, materialize_grads=True)
    grads_truth = torch.autograd.grad(moe_loss(*truth, dout), leaves64, allow_unused=True, materialize_grads=True)
    assert_each_matches_reference(MOE_NAMES, grads, grads_ref, grads_truth, tol["backward"], what)


@settings(**SETTINGS)
@given(case=moe_cases())
def test_moe(case):
    _native("moe")
    run_forked(_check_moe, case)
