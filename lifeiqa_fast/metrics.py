"""Correlation metrics that IQA papers report: SRCC, PLCC, KRCC, and PLCC after a logistic fit.

srcc, plcc and krcc need numpy only and match scipy.stats.spearmanr, pearsonr and kendalltau
(tau-b) to 1e-6, ties included; plcc_logistic needs scipy. Every function takes pred and target as
sequences, numpy arrays or torch tensors (any device, any real dtype), 1-D of length N or (N, 1),
computes in float64 and returns a plain Python float.

A correlation with a constant input is undefined (a zero variance in the denominator): the
functions return float('nan') for it, as scipy does. Inputs containing NaN or inf are rejected
rather than propagated, so a diverged model cannot log a silently meaningless score.

    >>> evaluate([1.0, 2.0, 3.0, 4.0], [1, 3, 2, 4])
    {'srcc': 0.8, 'plcc': 0.8, 'krcc': 0.6666666666666666}
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ._optional import require

__all__ = ["evaluate", "krcc", "plcc", "plcc_logistic", "srcc"]

# numpy dtype kinds accepted as numbers: bool, signed int, unsigned int, float (not complex, str, object).
_NUMERIC_KINDS = "biuf"


def srcc(pred, target) -> float:
    """Spearman's rank correlation (SRCC): the Pearson correlation of the ranks.

    pred, target: N >= 2 finite numbers each, 1-D or (N, 1); a sequence, numpy array or torch tensor.
    Tied values get the average of the ranks they span (scipy.stats.spearmanr). Returns a float in
    [-1, 1], or nan when either input is constant.
    """
    x, y = _pair("srcc", pred, target)
    return _srcc(x, y)


def plcc(pred, target) -> float:
    """Pearson's linear correlation (PLCC) of pred and target, without any fitted mapping.

    pred, target: N >= 2 finite numbers each, 1-D or (N, 1); a sequence, numpy array or torch tensor.
    Returns a float in [-1, 1] (scipy.stats.pearsonr), or nan when either input is constant.
    """
    x, y = _pair("plcc", pred, target)
    return _plcc(x, y)


def krcc(pred, target) -> float:
    """Kendall's rank correlation (KRCC), tau-b: the variant scipy.stats.kendalltau computes by default.

    pred, target: N >= 2 finite numbers each, 1-D or (N, 1); a sequence, numpy array or torch tensor.
    With P = N (N - 1) / 2 pairs, T_x pairs tied in pred, T_y pairs tied in target, C concordant and
    D discordant pairs: tau_b = (C - D) / sqrt((P - T_x) (P - T_y)). O(N log N) time, O(N) memory.
    Returns a float in [-1, 1], or nan when either input is constant.
    """
    x, y = _pair("krcc", pred, target)
    return _krcc(x, y)


def plcc_logistic(pred, target) -> float:
    """PLCC after the 4-parameter logistic mapping of pred onto target (VQEG), as older IQA papers report.

    Optional: needs scipy (scipy.optimize.curve_fit), unlike the other metrics here.
    pred, target: N >= 2 finite numbers each, 1-D or (N, 1); a sequence, numpy array or torch tensor.
    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 is fitted to map pred to target by least
    squares, starting from b1 = max(target), b2 = min(target), b3 = mean(pred), b4 = std(pred) / 4
    (the sigmoid's span, centre and width taken from the data); the result is plcc(f(pred), target).
    f is monotone, so the fit can only straighten a monotone but nonlinear relation, never reorder.
    Returns a float in [-1, 1], or nan when either input is constant. Raises RuntimeError when the
    fit does not converge.
    """
    x, y = _pair("plcc_logistic", pred, target)
    if _is_constant(x) or _is_constant(y):
        return math.nan
    optimize = require("scipy.optimize", "scipy", "data", "lifeiqa_fast.metrics.plcc_logistic")
    OptimizeWarning, curve_fit = optimize.OptimizeWarning, optimize.curve_fit

    p0 = [y.max(), y.min(), x.mean(), x.std() / 4]
    try:
        with warnings.catch_warnings():
            # curve_fit warns when it cannot estimate the parameters' covariance (an exact fit);
            # only the parameters are used here.
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_logistic, x, y, p0=p0, maxfev=100_000)
    except RuntimeError as exc:
        raise RuntimeError(f"lifeiqa_fast.plcc_logistic: the logistic fit of pred to target did not "
                           f"converge: {exc}") from exc
    return _plcc(_logistic(x, *params), y)


def evaluate(pred, target) -> dict[str, float]:
    """The metrics training and evaluation code logs: {"srcc": ..., "plcc": ..., "krcc": ...}.

    pred, target: N >= 2 finite numbers each, 1-D or (N, 1); a sequence, numpy array or torch tensor.
    Values are plain Python floats, as srcc, plcc and krcc return them (nan for a constant input).
    """
    x, y = _pair("evaluate", pred, target)
    return {"srcc": _srcc(x, y), "plcc": _plcc(x, y), "krcc": _krcc(x, y)}


def _srcc(x: np.ndarray, y: np.ndarray) -> float:
    return _plcc(_average_ranks(x), _average_ranks(y))


def _plcc(x: np.ndarray, y: np.ndarray) -> float:
    if _is_constant(x) or _is_constant(y):
        return math.nan
    xm = x - x.mean()
    ym = y - y.mean()
    # Scaling by the largest deviation first keeps the squares in the norms from overflowing
    # (scipy.stats.pearsonr does the same); r is invariant to it.
    xm /= np.abs(xm).max()
    ym /= np.abs(ym).max()
    r = np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym))
    return float(min(max(r, -1.0), 1.0))  # rounding can step just outside [-1, 1]


def _krcc(x: np.ndarray, y: np.ndarray) -> float:
    n = x.size
    order = np.lexsort((y, x))  # by x, ties in x by y
    xs, ys = x[order], y[order]
    pairs = n * (n - 1) // 2
    x_ties = _tied_pairs(np.unique(xs, return_counts=True)[1])
    _, y_ranks, y_counts = np.unique(ys, return_inverse=True, return_counts=True)
    y_ties = _tied_pairs(y_counts)
    if x_ties == pairs or y_ties == pairs:
        return math.nan  # a constant input
    # Runs of equal (x, y) in the lexsorted order are the pairs tied in both.
    starts = np.flatnonzero(np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1]), True])
    joint_ties = _tied_pairs(np.diff(starts))
    # Sorted by x with x-ties ascending in y, a pair i < j is discordant exactly when y_i > y_j:
    # pairs tied in x or in y are then never inversions.
    discordant = _count_inversions(y_ranks.astype(np.int64))
    # Every pair is concordant, discordant, or tied in x or y; the pairs tied in both are in
    # T_x and T_y alike, so C + D = P - T_x - T_y + T_xy.
    con_minus_dis = pairs - x_ties - y_ties + joint_ties - 2 * discordant
    tau = con_minus_dis / math.sqrt((pairs - x_ties) * (pairs - y_ties))  # exact integer product
    return float(min(max(tau, -1.0), 1.0))


def _count_inversions(y: np.ndarray) -> int:
    """The number of pairs i < j with y[i] > y[j], by bottom-up merge sort.

    y: (N,) int64 with values in [0, N). Level w merges each pair of sorted runs of width w;
    merging a right run into its left one moves each right element left past exactly the left
    elements greater than it (a stable merge keeps equal left elements in front), so the level's
    inversions are the sum of those leftward moves. A pair i < j is counted at the one level where
    i and j first share a merged block, so the sum over levels is the total.
    The merge is a stable argsort of block-offset keys (block * N + y), which numpy's timsort does
    in linear time on two sorted runs: about log2(N) linear passes in all.

    Example, y = [2, 0, 1]: w = 1 merges [2] and [0] -> [0, 2], moving 0 one place left (1 inversion),
    and [1] stays; w = 2 merges [0, 2] and [1] -> [0, 1, 2], moving 1 one place left (1 inversion).
    Total 2: the pairs (2, 0) and (2, 1).
    """
    n = y.size
    position = np.arange(n)
    inversions = 0
    width = 1
    while width < n:
        block = position // (2 * width)  # the merged block each position belongs to
        merged = np.argsort(block * n + y, kind="stable")  # merged[p]: where the p-th merged value was
        moved = merged - position  # > 0 for right-run elements moved left past larger left ones
        inversions += int(moved[moved > 0].sum())
        y = y[merged]
        width *= 2
    return inversions


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of x's values (N,) float64, ties given their average: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    is_first = np.r_[True, xs[1:] != xs[:-1]]  # the first of each run of equal sorted values
    group = np.cumsum(is_first) - 1  # (N,) the run each sorted position is in
    bounds = np.flatnonzero(np.r_[is_first, True])  # run g spans sorted positions [bounds[g], bounds[g + 1])
    # The 1-based ranks bounds[g] + 1 .. bounds[g + 1] average to (bounds[g] + bounds[g + 1] + 1) / 2.
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _tied_pairs(counts: np.ndarray) -> int:
    """The number of tied pairs, sum t (t - 1) / 2, given the sizes t of the groups of equal values."""
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _is_constant(x: np.ndarray) -> bool:
    return bool(x.min() == x.max())


def _logistic(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG 4-parameter logistic (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, x: (N,) float64."""
    # 1 / (1 + exp(-z)) == (1 + tanh(z / 2)) / 2, which cannot overflow for large |z|.
    return (b1 - b2) * 0.5 * (1.0 + np.tanh((x - b3) / (2.0 * abs(b4)))) + b2


def _pair(fn: str, pred, target) -> tuple[np.ndarray, np.ndarray]:
    """pred and target checked and converted to (N,) float64 numpy arrays, N >= 2."""
    x = _as_vector(fn, "pred", pred)
    y = _as_vector(fn, "target", target)
    if x.size != y.size:
        raise ValueError(f"lifeiqa_fast.{fn}: pred and target must have the same length, "
                         f"got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"lifeiqa_fast.{fn}: pred and target must have at least 2 elements, got {x.size}")
    return x, y


def _as_vector(fn: str, name: str, value) -> np.ndarray:
    """One input as an (N,) float64 numpy array (a copy), after checking its type, shape and values."""
    if hasattr(value, "detach"):  # a torch tensor, on any device, perhaps requiring grad
        value = value.detach().cpu()
        if value.is_complex():
            raise ValueError(f"lifeiqa_fast.{fn}: {name} must be real numbers, got a {value.dtype} tensor")
        array = value.double().numpy()
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nested sequences
            raise ValueError(f"lifeiqa_fast.{fn}: {name} must be a 1-D sequence of numbers: {exc}") from exc
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"lifeiqa_fast.{fn}: {name} must be real numbers (bool, int or float), "
                             f"got dtype {array.dtype}")
    if not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
        raise ValueError(f"lifeiqa_fast.{fn}: {name} must have shape (N,) or (N, 1), got {tuple(array.shape)}")
    array = array.astype(np.float64).reshape(-1)  # always a copy: callers' arrays are never modified
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"lifeiqa_fast.{fn}: {name} must be finite, got {bad} NaN or inf values")
    return array
