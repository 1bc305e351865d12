"""One contract per op: the native ops' C++ checks (csrc/check.h and each op's check_*_input) and the
Python checks that the paths without a kernel run (each op's _check) reject the same bad arguments with
the same message, word for word: "lifeiqa_fast.<op>: <argument> must ..., got ...". A message changed
on one side only fails here."""
import pytest
import torch
from helpers import RAW_TAIL, small_args

from lifeiqa_fast import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="the compiled ops (_C) are not loaded")

B, N, D, E, F, T = 2, 6, 16, 4, 12, 5  # small_args' sizes


def _r(*shape, dtype=torch.float32):  # the values do not matter to a check; zeros leave torch's RNG alone
    return torch.zeros(*shape, dtype=dtype)


# Per op, the bad cases: (what is wrong, argument index into small_args(op), bad value).
OPS = {
    "gcn": [
        ("x of rank 2", 0, _r(N, D)),
        ("x with no tokens", 0, _r(B, 0, D)),
        ("x of integers", 0, torch.ones(B, N, D, dtype=torch.int32)),
        ("w1 (D + 1, H1)", 2, _r(D + 1, 8)),
        ("w1 (D, H1 + 1)", 2, _r(D, 9)),
        ("b1 (H1 + 1,)", 3, _r(9)),
        ("w2 (H1 - 3, H2)", 4, _r(5, 4)),
        ("w3 (H2, D + 1)", 6, _r(4, D + 1)),
        ("b3 of rank 2", 7, _r(1, D)),
        ("adj (5, 5)", 1, _r(5, 5)),
        ("adj float64", 1, _r(N, N, dtype=torch.float64)),
        ("w1 float64", 2, _r(D, 8, dtype=torch.float64)),
    ],
    "cross_attention": [
        ("x of rank 2", 0, _r(N, D)),
        ("x of integers", 0, torch.ones(B, N, D, dtype=torch.int32)),
        ("kv with D + 1 channels", 1, _r(B, 7, 2, D + 1)),
        ("kv of another batch", 1, _r(B + 1, 7, 2, D)),
        ("norm_weight (D + 1,)", 2, _r(D + 1)),
        ("q_weight (D, D + 1)", 4, _r(D, D + 1)),
        ("out_bias float64", 7, _r(D, dtype=torch.float64)),
        ("kv float64", 1, _r(B, 7, 2, D, dtype=torch.float64)),
        ("3 heads for D = 16", 8, 3),
    ],
    "attend_memory": [
        ("x of rank 2", 0, _r(N, D)),
        ("memory with D + 1 channels", 1, _r(B, 7, D + 1)),
        ("in_proj_weight (D, D)", 4, _r(D, D)),
        ("in_proj_bias (D,)", 5, _r(D)),
        ("out_weight float64", 6, _r(D, D, dtype=torch.float64)),
        ("3 heads for D = 16", 8, 3),
    ],
    "moe": [
        ("x of rank 1", 0, _r(T)),
        ("router_weight (E, D + 1)", 1, _r(E, D + 1)),
        ("router_bias (E + 1,)", 2, _r(E + 1)),
        ("w1 (E, F, D + 1)", 3, _r(E, F, D + 1)),
        ("b1 (E, F + 1)", 4, _r(E, F + 1)),
        ("w2 (E, D, F + 1)", 5, _r(E, D, F + 1)),
        ("w2 float64", 5, _r(E, D, F, dtype=torch.float64)),
        ("top_k > E", 7, E + 1),
        ("top_k 0", 7, 0),
        ("dropout_mask (T, 1, F)", 8, _r(T, 1, F)),
        ("dropout_mask float64", 8, _r(T, 2, F, dtype=torch.float64)),
    ],
    "grid_pool": [
        ("x of rank 3", 0, _r(B, 14, 14)),
        ("x of integers", 0, torch.ones(B, 14, 14, D, dtype=torch.int32)),
        ("grid 0", 1, 0),
        ("x smaller than the grid", 0, _r(B, 5, 5, D)),
    ],
}
def _message(call) -> str:
    with pytest.raises((RuntimeError, TypeError, ValueError)) as info:
        call()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("op, case", [(op, case) for op, cases in OPS.items() for case in cases],
                         ids=[f"{op}: {case[0]}" for op, cases in OPS.items() for case in cases])
def test_python_and_cpp_checks_say_the_same(op, case):
    _, index, bad = case
    args = small_args(op)
    args[index] = bad
    python = _message(lambda: getattr(ops, op)(*args, impl="reference"))
    native = _message(lambda: getattr(torch.ops.lifeiqa_fast, op)(*args, *RAW_TAIL.get(op, ())))
    assert python.startswith(f"lifeiqa_fast.{op}: ")
    assert native == python
