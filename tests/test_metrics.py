"""lifeiqa_fast.metrics: srcc, plcc and krcc match scipy.stats (spearmanr, pearsonr, kendalltau) on
random, tied, monotone and constant data, whatever the input type; plcc_logistic matches a logistic
fit done here by hand with scipy; bad input fails loudly, naming the function and the argument."""
import math
import warnings

import numpy as np
import pytest
import torch

from lifeiqa_fast.metrics import evaluate, krcc, plcc, plcc_logistic, srcc

from scipy import stats

# The metrics are float64 like scipy's, so they agree to ~1e-15; 1e-6 is the bar that matters for
# a reported correlation (papers print 3 or 4 decimals).
ATOL = 1e-6
METRICS = {"srcc": (srcc, stats.spearmanr), "plcc": (plcc, stats.pearsonr), "krcc": (krcc, stats.kendalltau)}


def scipy_value(name: str, x, y) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning / small-sample warnings
        return float(METRICS[name][1](x, y)[0])


def noisy(rng, n, slope=1.0):
    x = rng.normal(size=n)
    return x, slope * x + rng.normal(size=n)


CASES = {  # name -> rng -> (pred, target)
    "n=2": lambda rng: noisy(rng, 2),  # the smallest input: always +-1
    "n=3": lambda rng: noisy(rng, 3),
    "n=10": lambda rng: noisy(rng, 10),
    "n=1000": lambda rng: noisy(rng, 1000),
    "negative correlation": lambda rng: noisy(rng, 500, slope=-0.7),
    "rounded, ties in both": lambda rng: tuple(np.round(v) for v in noisy(rng, 1000)),
    "MOS 1-5 labels": lambda rng: (lambda x: (x, np.clip(np.round(3 + x), 1, 5)))(rng.normal(size=800)),
    "both 1-5, joint ties": lambda rng: (lambda x: (x, np.clip(x + rng.integers(-1, 2, 300), 1, 5)))(
        rng.integers(1, 6, 300)),
    "ties in pred only": lambda rng: (rng.integers(0, 4, 200), rng.normal(size=200)),
    "monotone, nonlinear": lambda rng: (lambda x: (x, np.exp(3 * x)))(rng.normal(size=100)),
    "anti-monotone": lambda rng: (lambda x: (x, -(x ** 3)))(rng.normal(size=100)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", METRICS)
def test_matches_scipy(name, case):
    x, y = CASES[case](np.random.default_rng(0))
    ours = METRICS[name][0](x, y)
    assert type(ours) is float
    assert ours == pytest.approx(scipy_value(name, x, y), abs=ATOL)


@pytest.mark.parametrize("case, expected", [("monotone, nonlinear", 1.0), ("anti-monotone", -1.0)])
def test_monotone_ranks_are_exact(case, expected):
    x, y = CASES[case](np.random.default_rng(0))
    assert srcc(x, y) == pytest.approx(expected, abs=1e-12)
    assert krcc(x, y) == pytest.approx(expected, abs=1e-12)
    assert abs(plcc(x, y)) < 0.99  # the relation is not linear


@pytest.mark.parametrize("fn", [srcc, plcc, krcc, plcc_logistic], ids=lambda f: f.__name__)
def test_constant_input_is_nan(fn):
    varying, constant = [1.0, 3.0, 2.0, 5.0], [4.0] * 4
    assert math.isnan(fn(varying, constant)) and math.isnan(fn(constant, varying))
    if fn.__name__ in METRICS:
        assert math.isnan(scipy_value(fn.__name__, varying, constant))
    assert all(math.isnan(v) for v in evaluate(constant, varying).values())


CONVERSIONS = {
    "list": lambda a: a.tolist(),
    "(N, 1) float32 tensor, requires grad": lambda a: torch.tensor(a, dtype=torch.float32).view(-1, 1).requires_grad_(),
    "(N, 1) numpy": lambda a: a.reshape(-1, 1),
    "int tensor": lambda a: torch.from_numpy(a).long(),
}


@pytest.mark.parametrize("convert", CONVERSIONS)
def test_input_types(convert):
    x, y = CASES["both 1-5, joint ties"](np.random.default_rng(0))  # integers: exact in float32
    for name, (fn, _) in METRICS.items():
        assert fn(CONVERSIONS[convert](x), CONVERSIONS[convert](y)) == pytest.approx(scipy_value(name, x, y), abs=ATOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors():
    x, y = noisy(np.random.default_rng(0), 100)
    assert evaluate(torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda")) == evaluate(x, y)


def test_evaluate_logs_plain_floats():
    x, y = CASES["MOS 1-5 labels"](np.random.default_rng(0))
    x_before = x.copy()
    result = evaluate(x, y)
    assert list(result) == ["srcc", "plcc", "krcc"] and all(type(v) is float for v in result.values())
    assert result == {"srcc": srcc(x, y), "plcc": plcc(x, y), "krcc": krcc(x, y)}
    np.testing.assert_array_equal(x, x_before)  # the caller's array is not modified


BAD_INPUTS = {  # name -> (pred, target, what the message must say)
    "different lengths": ([1.0, 2.0, 3.0], [1.0, 2.0], "pred and target must have the same length, got 3 and 2"),
    "one element": ([1.0], [2.0], "at least 2 elements, got 1"),
    "empty": ([], [], "at least 2 elements, got 0"),
    "NaN in pred": ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "pred must be finite, got 1 NaN or inf"),
    "inf in target": (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, float("inf")]), "target must be finite"),
    "strings": (["a", "b", "c"], [1.0, 2.0, 3.0], "pred must be real numbers"),
    "None in target": ([1.0, 2.0, 3.0], [1.0, None, 3.0], "target must be real numbers"),
    "complex tensor": (torch.ones(3, dtype=torch.complex64), [1.0, 2.0, 3.0], "pred must be real numbers"),
    "(N, 2)": (np.zeros((3, 2)), [1.0, 2.0, 3.0], r"pred must have shape \(N,\) or \(N, 1\), got \(3, 2\)"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("fn", [srcc, plcc, krcc, plcc_logistic, evaluate], ids=lambda f: f.__name__)
def test_bad_input_fails_loudly(fn, bad):
    pred, target, message = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=rf"lifeiqa_fast\.{fn.__name__}: .*{message}"):
        fn(pred, target)


def test_plcc_logistic_matches_a_hand_fit():
    from scipy import optimize
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, 400)
    y = 1 + 4 / (1 + np.exp(-2.5 * x)) + rng.normal(0, 0.1, 400)  # a MOS that saturates at both ends

    def logistic(v, b1, b2, b3, b4):  # VQEG's 4-parameter logistic, spelled out here
        return (b1 - b2) / (1 + np.exp(-(v - b3) / abs(b4))) + b2

    params, _ = optimize.curve_fit(logistic, x, y, p0=[y.max(), y.min(), x.mean(), x.std() / 4], maxfev=100_000)
    expected = stats.pearsonr(logistic(x, *params), y)[0]
    assert plcc_logistic(x, y) == pytest.approx(expected, abs=ATOL)
    assert plcc_logistic(x, y) > plcc(x, y) + 0.05  # the fit straightens the sigmoid
    assert plcc_logistic(torch.tensor(x).view(-1, 1), y.tolist()) == plcc_logistic(x, y)


def test_krcc_size_20000_matches_scipy():
    # KonIQ / KADID test sets have ~2000 images, LIVEFB ~8000: O(N log N) makes this milliseconds.
    x, y = noisy(np.random.default_rng(0), 20_000)
    x = np.round(x, 1)  # ties too
    assert krcc(x, y) == pytest.approx(scipy_value("krcc", x, y), abs=ATOL)
