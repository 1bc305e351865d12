"""What a score means: each dataset's label scale, carried by the model into Scorer, the CLI and JSON."""
import json
import warnings

import pytest
import torch

import lifeiqa_fast
from lifeiqa_fast import Scorer
from lifeiqa_fast.scale import DATASET_SCALES, scale_of

from test_cli import _cli, photos  # noqa: F401 (a fixture)
from test_model import tiny
from test_scorer import photo

# The label conventions, from each dataset's own documentation (spelled out here, not imported): the
# range of the label's definition and whether a higher label is a worse image.
DOCUMENTED = {
    "live": ((1, 100), True),  # realigned DMOS: z-scores rescaled to 1..100, higher is more distorted
    "csiq": ((0, 1), True),  # DMOS in [0, 1]
    "tid2013": ((0, 9), False),  # MOS, 0..9
    "kadid": ((1, 5), False),  # the "dmos" column is a 1..5 degradation category rating: 5 is imperceptible
    "livec": ((0, 100), False),  # MOS from a 0..100 slider
    "koniq": ((1, 100), False),  # MOS_zscore, rescaled to 1..100
    "spaq": ((0, 100), False),
    "livefb": ((0, 100), False),
    "synthetic": ((1, 5), False),  # ours: 1 + 4 SSIM
}


@pytest.mark.parametrize("dataset", sorted(DOCUMENTED))
def test_every_dataset_has_its_documented_scale(dataset):
    scale = scale_of(dataset.upper())  # configs spell names in any case
    (low, high), lower_better = DOCUMENTED[dataset]
    assert scale.known and scale.dataset == dataset
    assert scale.score_range == (low, high) and scale.lower_better is lower_better
    scores = torch.tensor([low, high, low - 1.0, (low + high) / 2], dtype=torch.float64)
    best_end = low if lower_better else high  # maps to 1
    expected = torch.tensor([float(best_end == low), float(best_end == high), float(best_end == low), 0.5]).double()
    torch.testing.assert_close(scale.normalize(scores), expected)
    ends = scores
    assert scale.normalize(ends, clip=False)[2] != scale.normalize(ends)[2]  # not clipped: linear past the end


def test_every_preset_has_a_scale():
    from lifeiqa_fast.data import DATASETS
    from lifeiqa_fast.train import PRESETS

    assert set(DATASET_SCALES) == set(PRESETS) == set(DATASETS)


def test_an_unknown_scale_says_so_and_normalises_nothing():
    for scale in (scale_of(None), scale_of("imagenet")):
        assert not scale.known and scale.score_range is None and scale.lower_better is None
        assert "unknown" in scale.describe()
        with pytest.raises(ValueError, match="cannot normalise scores of a model whose training dataset"):
            scale.normalize(torch.zeros(2))


@pytest.fixture(scope="module")
def model():
    return tiny(num_experts=4, depth=2).eval()


def test_scorer_carries_the_checkpoints_scale(model, tmp_path):
    path = tmp_path / "live.pth"
    lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": "LIVE"}})
    scorer = Scorer(path, dtype="fp32")
    assert (scorer.dataset, scorer.score_range, scorer.lower_better) == ("live", (1.0, 100.0), True)
    face = photo("astronaut", 224, 300)
    raw = scorer(face)
    normalized = Scorer(path, dtype="fp32", normalize=True)
    assert (normalized.score_range, normalized.lower_better) == ((0.0, 1.0), False)
    torch.testing.assert_close(normalized(face), (1 - (raw - 1) / 99).clamp(0, 1))
    # dataset= names the set of a model that records none, and wins over a record
    assert Scorer(model, dtype="fp32", dataset="kadid").scale == DATASET_SCALES["kadid"]
    assert Scorer(path, dtype="fp32", dataset="koniq").resize == (512, 384)


def test_an_unknown_dataset_warns_instead_of_guessing_the_resize(model):
    with pytest.warns(UserWarning, match="records no training dataset, so resize='auto' does not resize"):
        assert Scorer(model, dtype="fp32").resize is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Scorer(model, dtype="fp32", resize=None)  # the caller said: no warning
        Scorer(model, dtype="fp32", dataset="livec")


def test_official_protocol_is_patch_num_seeded_crops_in_fp32(model, tmp_path):
    path = tmp_path / "koniq.pth"
    lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": "koniq"}})
    official = Scorer(path, crops="official", seed=3)
    assert (official.crops, official.resize, official.dtype) == (40, (512, 384), torch.float32)  # koniq's PATCH_NUM
    image = photo("coffee")
    spelled_out = Scorer(path, crops=40, seed=3, resize=(512, 384), dtype="fp32")
    torch.testing.assert_close(official(image), spelled_out(image), atol=0, rtol=0)
    assert Scorer(model, crops="official", dataset="tid2013").crops == 25


def test_cli_reports_the_scale(photos, tmp_path):
    root, folder, model = photos
    ckpt = tmp_path / "csiq.pth"
    lifeiqa_fast.save_checkpoint(model, ckpt, config={"DATA": {"DATASET": "csiq"}})
    out = tmp_path / "scores.json"
    result = _cli("score", folder / "astronaut.png", folder / "coffee.jpg", "-m", ckpt, "--dtype", "fp32",
                  "--device", "cpu", "-o", out, "--normalize")
    assert result.returncode == 0, result.stderr
    assert "csiq: DMOS, 0..1, lower is better; normalized to 0..1, higher is better" in result.stdout
    report = json.loads(out.read_text())
    assert report["dataset"] == "csiq" and report["normalized"] is True and report["lower_better"] is False
    assert report["score_scale"]["lower_better"] is True and report["score_scale"]["score_range"] == [0.0, 1.0]
    scores = [r["score"] for r in report["scores"]]
    assert all(0 <= s <= 1 for s in scores) and report["mean_score"] == pytest.approx(sum(scores) / 2)
    assert f"mean score {report['mean_score']:.4f} over 2 images" in result.stdout
    csv_out = tmp_path / "scores.csv"
    assert _cli("score", folder / "coffee.jpg", "-m", ckpt, "--device", "cpu", "-o", csv_out).returncode == 0
    assert csv_out.read_text().splitlines()[0] == "path,score,error"
    bad = _cli("score", folder / "coffee.jpg", "-m", ckpt, "-o", tmp_path / "scores.txt")
    assert bad.returncode == 2 and "suffix must be .json or .csv" in bad.stderr
    unknown = _cli("score", folder / "coffee.jpg", "-m", root / "ckpt.pth", "--normalize")
    assert unknown.returncode == 2 and "normalize=True needs the model's score scale" in unknown.stderr


def test_cli_lists_the_datasets():
    result = _cli("--list-datasets")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == set(DOCUMENTED)
    assert "lower" in rows["live"] and "higher" in rows["kadid"] and "512x384" in rows["koniq"]
