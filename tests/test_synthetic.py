"""The synthetic KADID-10k-layout dataset: layout, labels (definition, range, order), determinism,
idempotence, refusal of foreign roots, recovery from an interrupted run."""
import csv
import re
import sys

import numpy as np
import pytest

from PIL import Image

from lifeiqa_fast.data import synthetic
from lifeiqa_fast.data.synthetic import LEVELS, make_synthetic

SIZE = 64                          # small: the whole module runs in a few seconds
REFS = ("astronaut", "rocket")     # a subset whose ids are not contiguous: I01, I04
N_TYPES = len(synthetic.DISTORTIONS)


def _rows(root):
    with open(root / "dmos.csv", newline="") as f:
        return list(csv.DictReader(f))


def _snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "kadid", size=SIZE, seed=0, references=REFS)


def test_layout_and_files(root):
    assert sorted(p.name for p in root.iterdir()) == ["distorted_images", "dmos.csv", "reference_images",
                                                      "synthetic.json"]
    with open(root / "dmos.csv", newline="") as f:
        assert next(csv.reader(f)) == ["dist_img", "ref_img", "dmos"]  # KADID-10k's columns
    rows = _rows(root)
    assert len(rows) == len(REFS) * N_TYPES * LEVELS
    assert sorted({r["ref_img"] for r in rows}) == ["I01.png", "I04.png"]
    assert sorted(p.name for p in (root / "reference_images").iterdir()) == ["I01.png", "I04.png"]
    assert len(list((root / "distorted_images").iterdir())) == len(rows)
    for r in rows:
        m = re.fullmatch(r"(I\d\d)_(\d\d)_(\d\d)\.png", r["dist_img"])
        assert m and m[1] + ".png" == r["ref_img"] and 1 <= int(m[2]) <= N_TYPES and 1 <= int(m[3]) <= LEVELS
        for path in (root / "distorted_images" / r["dist_img"], root / "reference_images" / r["ref_img"]):
            with Image.open(path) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_labels_follow_the_definition_and_the_levels(root):
    labels = {}  # (ref, type) -> [dmos of levels 1..5]
    for r in _rows(root):
        ref, t, lv = r["dist_img"][:-4].split("_")
        labels.setdefault((ref, t), []).append((int(lv), float(r["dmos"])))
        # the label is the documented function of the files themselves
        dist = np.asarray(Image.open(root / "distorted_images" / r["dist_img"]))
        ref_img = np.asarray(Image.open(root / "reference_images" / r["ref_img"]))
        assert float(r["dmos"]) == pytest.approx(synthetic.dmos_from_ssim(synthetic.ssim(dist, ref_img)), abs=1e-9)
    assert len(labels) == len(REFS) * N_TYPES
    for key, levels in labels.items():
        q = [d for _, d in sorted(levels)]
        assert all(1.0 <= d <= 5.0 for d in q), (key, q)
        assert all(a > b for a, b in zip(q, q[1:])), (key, q)  # strictly worse with every level


def test_ssim_matches_skimage():
    from skimage import metrics
    ref = synthetic.load_reference("coffee", 80)
    dist = synthetic.gaussian_blur(ref, 1.2)
    expected = metrics.structural_similarity(ref, dist, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255, channel_axis=-1)
    assert synthetic.ssim(dist, ref) == pytest.approx(expected, abs=1e-9)
    assert synthetic.ssim(ref, ref) == 1.0


def test_references_are_photographs(root):
    refs = [np.asarray(Image.open(p)) for p in sorted((root / "reference_images").iterdir())]  # (SIZE, SIZE, 3)
    for img in refs:
        assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 1000
    assert not np.array_equal(refs[0], refs[1])


def test_deterministic(root, tmp_path):
    again = make_synthetic(tmp_path / "again", size=SIZE, seed=0, references=REFS)
    a, b = _snapshot(root), _snapshot(again)
    assert a.keys() == b.keys() and all(a[k][0] == b[k][0] for k in a)
    # another seed changes the noise images only (type 02) and, with them, nothing else
    other = _snapshot(make_synthetic(tmp_path / "other", size=SIZE, seed=1, references=REFS))
    changed = {k for k in a if k.endswith(".png") and a[k][0] != other[k][0]}
    assert changed == {k for k in a if re.search(r"_02_\d\d\.png$", k)}


def test_idempotent(root):
    before = _snapshot(root)
    assert make_synthetic(str(root), size=SIZE, seed=0, references=tuple(reversed(REFS))) == root
    assert _snapshot(root) == before  # same bytes, same mtimes: nothing rewritten


def test_foreign_roots_raise(root, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        make_synthetic(foreign, size=SIZE, references=REFS)
    with pytest.raises(FileExistsError, match="other parameters"):  # the same root, another seed
        make_synthetic(root, size=SIZE, seed=1, references=REFS)
    with pytest.raises(FileExistsError, match="not a directory"):
        make_synthetic(foreign / "notes.txt", size=SIZE, references=REFS)


def test_interrupted_run_is_made_again(root, tmp_path, monkeypatch):
    target = tmp_path / "cut"
    write = synthetic._write_atomic

    def cut_before_csv(path, text):
        if path.name == "dmos.csv":
            raise KeyboardInterrupt
        write(path, text)

    monkeypatch.setattr(synthetic, "_write_atomic", cut_before_csv)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(target, size=SIZE, references=REFS)
    assert not (target / "synthetic.json").exists()  # never taken for a complete dataset
    monkeypatch.setattr(synthetic, "_write_atomic", write)
    make_synthetic(target, size=SIZE, references=REFS)
    a, b = _snapshot(root), _snapshot(target)
    assert a.keys() == b.keys() and all(a[k][0] == b[k][0] for k in a)


@pytest.mark.parametrize("kwargs", [
    {"size": synthetic.MIN_SIZE - 1},  # below the size at which the labels are checked to decrease
    {"size": True},
    {"size": 64.0},
    {"seed": -1},
    {"references": ()},
    {"references": ("astronaut", "astronaut")},
    {"references": ("cat",)},          # an alias of chelsea, not a source of its own
])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="lifeiqa_fast.data.make_synthetic"):
        make_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_without_scikit_image_the_error_names_the_extra_and_no_folder_is_made(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import skimage.data now fails
    root = tmp_path / "synthetic"
    with pytest.raises(ModuleNotFoundError, match=r"needs the package scikit-image.*\[data\] extra"):
        make_synthetic(root, size=48, references=("astronaut",))
    assert not root.exists()
