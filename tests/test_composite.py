"""impl="composite", what impl="auto" runs on GPUs until our kernels are validated there: ATen ops only,
with static shapes and no host synchronisation, so that CUDA graphs capture and torch.compile(fullgraph)
traces the whole model. Checked on the CPU by exporting each op and the model and reading the graph.
(Its numbers: the op test files, impl_params(..., composite=True), and test_golden.py.)"""
import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import lifeiqa_fast
from lifeiqa_fast import ops
from lifeiqa_fast.ops._impl import choose
from lifeiqa_fast.reference import cross_attention_ref, fixed_adjacency, gcn_ref

from test_model import TINY

# ATen ops that copy a value to the host, or give a shape that depends on values
SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.item")


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def host_syncs(fn, args) -> list[str]:
    """What in fn(*args) would synchronise with the host or make a data-dependent shape, read from its
    exported graph: the syncing ATen ops it calls, outputs of unbacked symbolic sizes, or why it could
    not be exported whole (a Python branch on a tensor's value)."""
    module = fn if isinstance(fn, torch.nn.Module) else _Call(fn)
    try:
        graph = torch.export.export(module, tuple(args), strict=False).graph
    except Exception as exc:  # noqa: BLE001  (data-dependent control flow, whatever torch calls it)
        return [f"not exportable: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and any(name in str(node.target) for name in SYNCING):
            found.append(str(node.target))
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and free_unbacked_symbols(value):
            found.append(f"{node.name}: unbacked size {tuple(value.shape)}")
    return found


def _op_calls(impl):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    B, N, D, H1, E, F, k = 2, 6, 32, 16, 4, 64, 2
    return {
        "grid_pool": (lambda x: ops.grid_pool(x, 7, impl=impl), (rnd(B, 15, 13, D),)),
        "gcn": (lambda x, *w: ops.gcn(x, None, *w, impl=impl),
                (rnd(B, N, D), rnd(D, H1), rnd(H1), rnd(H1, H1), rnd(H1), rnd(H1, D), rnd(D))),
        "cross_attention": (lambda x, kv, *w: ops.cross_attention(x, kv, *w, 2, impl=impl),
                            (rnd(B, N, D), rnd(B, 49, 2, D), rnd(D), rnd(D), rnd(D, D), rnd(D), rnd(D, D), rnd(D))),
        "moe": (lambda x, *w: ops.moe(x, *w, k, impl=impl),
                (rnd(B * N, D), rnd(E, D), rnd(E), rnd(E, F, D), rnd(E, F), rnd(E, D, F), rnd(E, D))),
    }


@pytest.mark.parametrize("op", ["grid_pool", "gcn", "cross_attention", "moe"])
def test_composite_ops_do_not_synchronise(op):
    fn, args = _op_calls("composite")[op]
    assert host_syncs(fn, args) == []


def test_the_reference_moe_does_synchronise():
    """The check can fail: the authors' per-expert loop (a branch on mask.any(), boolean indexing)."""
    fn, args = _op_calls("reference")["moe"]
    assert host_syncs(fn, args) != []


@pytest.mark.parametrize("impl", ["composite", "reference"])
def test_whole_model(impl):
    """The model (eval, static shapes) exports with no host synchronisation with the composite ops, and
    not with the reference's; the composite model traces whole under torch.compile(fullgraph=True) and
    computes what the reference model does."""
    torch.manual_seed(0)
    model = lifeiqa_fast.LifeIQA(**TINY, num_experts=4, depth=2, impl=impl).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    found = host_syncs(model, (x,))
    if impl == "reference":
        assert found != []
        return
    assert found == []
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    reference = lifeiqa_fast.LifeIQA(**TINY, num_experts=4, depth=2, impl="reference").eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), atol=1e-4, rtol=1e-4)


def test_optimized_authors_model():
    """optimize(the authors' Life_models, impl="composite"): no host synchronisation either, and their
    scores."""
    from test_optimize import authors_model

    theirs = authors_model(num_experts=4, depth=2).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(x)[0]
    ours = lifeiqa_fast.optimize(theirs, impl="composite")
    assert host_syncs(ours, (x,)) == []
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], want, atol=1e-5, rtol=1e-5)


def test_gcn_and_attention_composites_are_the_reference():
    """Their reference is ATen ops without host synchronisation already (bmm; scaled_dot_product_attention):
    composite runs it, bit for bit."""
    calls = _op_calls("composite")
    fn, (x, *weights) = calls["gcn"]
    assert torch.equal(fn(x, *weights), gcn_ref(x, fixed_adjacency(x.shape[1], x.dtype, x.device), *weights))
    fn, args = calls["cross_attention"]
    assert torch.equal(fn(*args), cross_attention_ref(*args, 2))


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu", "meta"])
def test_auto_off_the_cpu_is_a_validated_kernel_or_composite(device):
    """Never the reference off the CPU: on CUDA a kernel validated on a GPU, else composite."""
    for op in ("grid_pool", "gcn", "cross_attention", "moe"):
        impl, why = choose(op, device, "auto")
        if device == "cuda" and impl in ("native", "triton"):
            assert "validated on" in why
        else:
            assert impl == "composite", (op, device, impl, why)


def test_python_limits_are_the_kernels():
    """The limits the ops check before a kernel runs are the C++ constants the kernels are built with."""
    import importlib
    import pathlib
    import re

    gcn_module = importlib.import_module("lifeiqa_fast.ops.gcn")  # (the package attribute gcn is the function)
    attention_module = importlib.import_module("lifeiqa_fast.ops.cross_attention")

    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"

    def constant(header, name):
        return int(re.search(rf"constexpr int64_t {name} = (\d+);", (csrc / header).read_text()).group(1))

    assert gcn_module.MAX_TOKENS == constant("gcn.h", "kGcnMaxTokens")
    assert attention_module.MAX_QUERIES == constant("cross_attention.h", "kAttnMaxQueries")
    assert attention_module.MAX_HEAD_DIM == constant("cross_attention.h", "kAttnMaxHeadDim")


def test_auto_runs_sizes_beyond_the_kernels():
    """33 tokens for gcn, 65 queries and 130-channel heads for cross_attention: auto gives them to the
    composite implementation (the reference's values)."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    D, H1 = 16, 8
    x, weights = rnd(2, 33, D), (rnd(D, H1), rnd(H1), rnd(H1, H1), rnd(H1), rnd(H1, D), rnd(D))
    assert torch.equal(ops.gcn(x, None, *weights), gcn_ref(x, fixed_adjacency(33), *weights))
    for Nq, D, heads in ((65, 32, 2), (6, 260, 2)):
        args = (rnd(2, Nq, D), rnd(2, 9, 2, D), rnd(D), rnd(D), rnd(D, D), rnd(D), rnd(D, D), rnd(D))
        assert torch.equal(ops.cross_attention(*args, heads), cross_attention_ref(*args, heads))
