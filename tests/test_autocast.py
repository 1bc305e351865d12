"""Autocast per op (lifeiqa_fast/ops/_impl.py: autocast_rule on the public functions, register_autocast
on the custom ops): under torch.autocast a fused op computes on its floating inputs cast to float32,
autocast off inside, whichever implementation runs, called alone or as a raw op; its gradients reach
inputs of any dtype."""
import pytest
import torch
from helpers import RAW_TAIL, small_args

from lifeiqa_fast import _ext, ops

OPS = ["gcn", "cross_attention", "attend_memory", "moe", "grid_pool"]


def _as_autocast_leaves_them(args):
    """The arguments as an autocast region hands them over: x (the activations) in bf16, the weights fp32."""
    return [args[0].bfloat16(), *args[1:]]


def _float32(args):
    return [a.float() if isinstance(a, torch.Tensor) else a for a in args]


def _outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("impl", ["auto", "composite"])
@pytest.mark.parametrize("op", OPS)
def test_public_op_under_autocast_computes_in_float32(op, impl):
    torch.manual_seed(0)
    args = _as_autocast_leaves_them(small_args(op))
    with torch.autocast("cpu", torch.bfloat16):
        got = _outputs(getattr(ops, op)(*args, impl=impl))
    expected = _outputs(getattr(ops, op)(*_float32(args), impl=impl))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.skipif(not _ext.LOADED, reason="the compiled ops (_C) are not loaded")
@pytest.mark.parametrize("op", OPS)
def test_raw_op_under_autocast_computes_in_float32(op):
    torch.manual_seed(0)
    args = _as_autocast_leaves_them(small_args(op)) + list(RAW_TAIL.get(op, ()))
    raw = getattr(torch.ops.lifeiqa_fast, op)
    with torch.autocast("cpu", torch.bfloat16):
        got = _outputs(raw(*args))
    expected = _outputs(raw(*_float32(args)))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_gradients_under_autocast_reach_inputs_in_their_dtype():
    torch.manual_seed(0)
    args = _as_autocast_leaves_them(small_args("gcn"))
    leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor)]
    with torch.autocast("cpu", torch.bfloat16):
        out = ops.gcn(*args)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]  # bf16 for x, fp32 for the weights
    assert all(torch.isfinite(g).all() for g in grads)
