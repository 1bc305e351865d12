"""What a Life-IQA score means: the label scale of the dataset a model was trained on.

A model regresses its training set's raw labels (SPEC.md: labels are not normalised), so a score is on
that dataset's scale: its range and its direction (DMOS: higher is worse). The table below gives each
dataset's label definition, from the dataset's own documentation (cross-checked with pyiqa's
dataset_info table, an independent source). A model whose dataset is not recorded has the UNKNOWN
scale: it says so, and nothing is normalised by guess.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import Tensor


@dataclass(frozen=True)
class ScoreScale:
    """A score's scale. dataset: the training set's name (None: not recorded); label: what the model
    regresses; score_range: (low, high) of the label's definition, None if unknown; lower_better: True
    for DMOS (a higher score is a worse image), None if unknown; definition: where that comes from."""

    dataset: str | None
    label: str
    score_range: tuple[float, float] | None
    lower_better: bool | None
    definition: str

    @property
    def known(self) -> bool:
        return self.score_range is not None and self.lower_better is not None

    def normalize(self, scores: Tensor, clip: bool = True) -> Tensor:
        """scores mapped linearly to [0, 1], 1 the best end of the range whatever the direction:
        (s - low) / (high - low), or 1 minus that for a lower-better label. clip: clamp to [0, 1] (a model
        predicts a little past its label range now and then); without it the map stays linear (and
        differentiable everywhere, for a loss). ValueError for an unknown scale."""
        if not self.known:
            raise ValueError(f"lifeiqa_fast: cannot normalise scores of a model whose training dataset is not "
                             f"recorded ({self.definition}); name it (Scorer(..., dataset='koniq')) or use raw scores")
        low, high = self.score_range
        q = (scores - low) / (high - low)
        if self.lower_better:
            q = 1 - q
        return q.clamp(0, 1) if clip else q

    def as_dict(self) -> dict:
        """JSON-ready: every field, score_range a list (or None)."""
        d = asdict(self)
        d["score_range"] = list(self.score_range) if self.score_range else None
        return d

    def describe(self) -> str:
        """One line for a report header: 'koniq: MOS (z-scores rescaled), 1..100, higher is better'."""
        if not self.known:
            return f"{self.dataset or 'unknown dataset'}: scale unknown ({self.definition})"
        low, high = self.score_range
        return (f"{self.dataset}: {self.label}, {low:g}..{high:g}, "
                f"{'lower' if self.lower_better else 'higher'} is better")


# The label each reader of lifeiqa_fast.data returns (docs/datasets.md), on its documented scale.
DATASET_SCALES: dict[str, ScoreScale] = {s.dataset: s for s in (
    ScoreScale("live", "DMOS (realigned)", (1.0, 100.0), True,
               "LIVE Release 2: difference mean opinion scores, z-scored and rescaled to about 1..100 (higher: "
               "more distorted)"),
    ScoreScale("csiq", "DMOS", (0.0, 1.0), True,
               "CSIQ: difference mean opinion scores from ratings of the distorted images against their references, "
               "0 (no difference) to 1"),
    ScoreScale("tid2013", "MOS", (0.0, 9.0), False,
               "TID2013: mean opinion scores from pairwise comparisons, 0 to 9 (the readme's range)"),
    ScoreScale("kadid", "DMOS column (a DCR rating)", (1.0, 5.0), False,
               "KADID-10k: the 'dmos' column holds degradation category ratings, 1 (very annoying) to 5 "
               "(imperceptible): higher is better despite the name"),
    ScoreScale("livec", "MOS", (0.0, 100.0), False,
               "LIVE In the Wild Challenge: mean opinion scores from a continuous 0..100 slider"),
    ScoreScale("koniq", "MOS_zscore", (1.0, 100.0), False,
               "KonIQ-10k: the MOS_zscore column, mean z-scores of 1..5 ratings rescaled to 1..100"),
    ScoreScale("spaq", "MOS", (0.0, 100.0), False,
               "SPAQ: mean opinion scores from a continuous 0..100 scale"),
    ScoreScale("livefb", "MOS", (0.0, 100.0), False,
               "LIVE-FB (PaQ-2-PiQ): mean opinion scores from a continuous 0..100 slider"),
    ScoreScale("synthetic", "DMOS column (1 + 4 SSIM)", (1.0, 5.0), False,
               "lifeiqa_fast's synthetic set: 1 + 4 x SSIM to the reference, higher is better (data/synthetic.py)"),
)}


def scale_of(dataset: str | None) -> ScoreScale:
    """The scale of a dataset's labels; for None, or a name not in DATASET_SCALES, an unknown scale that
    says why."""
    if dataset is None:
        return ScoreScale(None, "unknown", None, None, "the model records no training dataset")
    name = str(dataset).lower()
    if name in DATASET_SCALES:
        return DATASET_SCALES[name]
    return ScoreScale(name, "unknown", None, None, f"no label scale is known for dataset {name!r}; known: "
                                                   f"{', '.join(DATASET_SCALES)}")


def dataset_of(model) -> str | None:
    """The training dataset a model records (its checkpoint config's DATA.DATASET, lower case), or None."""
    config = getattr(model, "checkpoint_config", None)
    data = config.get("DATA") if isinstance(config, Mapping) else None
    dataset = data.get("DATASET") if isinstance(data, Mapping) else None
    return str(dataset).lower() if dataset else None


def scale_of_model(model) -> ScoreScale:
    """scale_of(dataset_of(model))."""
    return scale_of(dataset_of(model))


__all__ = ["DATASET_SCALES", "ScoreScale", "dataset_of", "scale_of", "scale_of_model"]
