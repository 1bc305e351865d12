"""lifeiqa_fast.data: each dataset's reader on a tiny tree in its shipped layout (real .mat / .xlsx / CSV label
files, empty image files: the readers never open images), wrong layouts, and the split invariants.

The layouts, counts and label conventions are spelled out here, not imported from the readers, so that a wrong
constant there fails the tests."""
import csv
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from lifeiqa_fast.data import (DATASETS, Record, load_split, read_dataset, repeated_splits, save_split,
                               split_by_group)

# LIVE release 2: distortion folders in dmos_realigned.mat column order, with their image counts.
LIVE_FOLDERS = [("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174)]
LIVE_KEPT = 779  # 982 columns less the 203 undistorted originals
LIVEC_ENTRIES = 1169  # the first 7 (training images) are skipped


def touch(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_csv(path: Path, header: list[str], rows: list[list], quoting=csv.QUOTE_MINIMAL) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, quoting=quoting)
        writer.writerow(header)
        writer.writerows(rows)


def cells(strings: list[str], shape: tuple[int, int]) -> np.ndarray:
    """A MATLAB cell array of strings as savemat writes it (and loadmat returns it): an object array."""
    out = np.empty(len(strings), dtype=object)
    out[:] = strings
    return out.reshape(shape)


# Each builder writes a tiny dataset under root and returns the records read_dataset must find, in label order,
# as (path relative to root, label, group).

def build_live(root: Path) -> list[tuple[str, float, str]]:
    from scipy import io as sio
    refs = ["bikes.bmp", "buildings.bmp", "caps.bmp", "womanhat.bmp", "parrots.bmp"]
    for ref in refs:
        touch(root, f"refimgs/{ref}")
    images = [f"{folder}/img{i}.bmp" for folder, count in LIVE_FOLDERS for i in range(1, count + 1)]
    assert len(images) == 982
    originals = set(random.Random(0).sample(range(982), 982 - LIVE_KEPT))
    dmos = [0.0 if i in originals else 10.0 + 0.125 * i for i in range(982)]
    ref_of = [refs[i % len(refs)] for i in range(982)]
    for image in images:  # LIVE ships the originals' copies in the distortion folders too
        touch(root, image)
    sio.savemat(root / "dmos_realigned.mat", {
        "dmos_new": np.array(dmos).reshape(1, 982),
        "orgs": np.array([float(i in originals) for i in range(982)]).reshape(1, 982),
        "dmos_std": np.ones((1, 982))})
    sio.savemat(root / "refnames_all.mat", {"refnames_all": cells(ref_of, (1, 982))})
    expected = [(images[i], dmos[i], Path(ref_of[i]).stem) for i in range(982) if i not in originals]
    assert len(expected) == LIVE_KEPT
    return expected


def build_csiq(root: Path):
    rows = [("1600.AWGN.1.png", 0.062), ("1600.JPEG.5.png", 0.707), ("aerial_city.BLUR.2.png", 0.2),
            ("boston.fnoise.3.png", 0.4), ("boston.contrast.1.png", 0.01)]
    for ref in ("1600", "aerial_city", "boston"):
        touch(root, f"src_imgs/{ref}.png")
    for name, _ in rows:
        touch(root, f"dst_imgs_all/{name}")
    (root / "csiq_label.txt").write_text("".join(f"{name} {label}\n" for name, label in rows) + "\n")
    return [(f"dst_imgs_all/{name}", label, name.split(".")[0]) for name, label in rows]


def build_tid2013(root: Path):
    rows = [(5.51429, "i01_01_1.bmp"), (5.56757, "i01_01_2.bmp"), (4.94286, "i02_07_3.bmp"),
            (3.0, "i25_24_5.bmp"), (6.1, "i10_03_1.bmp")]
    for ref in ("I01.BMP", "I02.BMP", "I10.BMP", "i25.bmp"):
        touch(root, f"reference_images/{ref}")
    for _, name in rows:
        touch(root, f"distorted_images/{name}")
    (root / "mos_with_names.txt").write_text("".join(f"{mos} {name}\n" for mos, name in rows))
    return [(f"distorted_images/{name}", mos, name[1:3]) for mos, name in rows]


def build_kadid(root: Path, refs=("I01.png", "I02.png", "I81.png")):
    rows = [(f"{Path(ref).stem}_{d:02d}_{level:02d}.png", ref, 1.0 + 0.25 * (d + level), 0.5)
            for ref in refs for d, level in ((1, 1), (7, 3))]
    for ref in refs:
        touch(root, f"reference_images/{ref}")
    for dist, *_ in rows:
        touch(root, f"distorted_images/{dist}")
    write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], [list(row) for row in rows])
    return [(f"distorted_images/{dist}", dmos, Path(ref).stem) for dist, ref, dmos, _ in rows]


def build_synthetic(root: Path):
    return build_kadid(root, refs=("ref_0000.png", "ref_0001.png", "ref_0002.png", "ref_0003.png"))


def build_livec(root: Path):
    from scipy import io as sio
    names = [f"trainingImages/t{k}.bmp" for k in range(1, 8)] + [f"{k}.bmp" for k in range(3, LIVEC_ENTRIES - 4)]
    mos = [50.0 + 0.01 * k for k in range(LIVEC_ENTRIES)]
    assert len(names) == LIVEC_ENTRIES
    for name in names[7:]:  # the 7 training images are not there: the reader must not ask for them
        touch(root, f"Images/{name}")
    (root / "Data").mkdir()
    sio.savemat(root / "Data/AllImages_release.mat", {"AllImages_release": cells(names, (LIVEC_ENTRIES, 1))})
    sio.savemat(root / "Data/AllMOS_release.mat", {"AllMOS_release": np.array(mos).reshape(1, LIVEC_ENTRIES)})
    return [(f"Images/{names[k]}", mos[k], names[k]) for k in range(7, LIVEC_ENTRIES)]


def build_koniq(root: Path):
    rows = [("10004473376.jpg", 77.38), ("10007357496.jpg", 59.01), ("10033111466.jpg", 3.4)]
    for name, _ in rows:
        touch(root, f"1024x768/{name}")
    write_csv(root / "koniq10k_scores_and_distributions.csv",
              ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"],
              [[name, 0, 1, 2, 3, 4, 10, 3.9, 0.7, z] for name, z in rows], quoting=csv.QUOTE_NONNUMERIC)
    return [(f"1024x768/{name}", z, name) for name, z in rows]


def build_spaq(root: Path):
    import openpyxl
    rows = [("00001.jpg", 42.0), ("00002.jpg", 71.25), ("00010.jpg", 15)]
    for name, _ in rows:
        touch(root, f"512x384/{name}")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    for name, mos in rows:
        sheet.append([name, mos, 50, 50, 50, 50, 50])
    (root / "Annotations").mkdir()
    book.save(root / "Annotations/MOS and Image attribute scores.xlsx")
    return [(f"512x384/{name}", float(mos), name) for name, mos in rows]


def build_livefb(root: Path):
    rows = [("AVA__149.jpg", 66.3), ("EE371R/over3.jpg", 72.1), ("voc_emotic_ava/2007_000033.jpg", 58.0)]
    for name, _ in rows:
        touch(root, f"database/{name}")
    write_csv(root / "labels_image.csv", ["name", "mos", "mos_std"], [[name, mos, 1.0] for name, mos in rows])
    return [(f"database/{name}", mos, name) for name, mos in rows]


BUILDERS = {"live": build_live, "csiq": build_csiq, "tid2013": build_tid2013, "kadid": build_kadid,
            "livec": build_livec, "koniq": build_koniq, "spaq": build_spaq, "livefb": build_livefb,
            "synthetic": build_synthetic}
# What each layout needs, relative to its root (one test per entry removes it).
LAYOUT = {
    "live": ["dmos_realigned.mat", "refnames_all.mat", "refimgs"],
    "csiq": ["csiq_label.txt", "src_imgs"],
    "tid2013": ["mos_with_names.txt", "reference_images"],
    "kadid": ["dmos.csv", "reference_images"],
    "livec": ["Data/AllImages_release.mat", "Data/AllMOS_release.mat"],
    "koniq": ["koniq10k_scores_and_distributions.csv"],
    "spaq": ["Annotations/MOS and Image attribute scores.xlsx"],
    "livefb": ["labels_image.csv"],
    "synthetic": ["dmos.csv", "reference_images"],
}


def test_datasets_listed():
    assert DATASETS == ("live", "csiq", "tid2013", "kadid", "livec", "koniq", "spaq", "livefb", "synthetic")
    assert set(BUILDERS) == set(DATASETS) == set(LAYOUT)


@pytest.mark.parametrize("name", DATASETS)
def test_reader_finds_every_image(tmp_path, name):
    expected = [Record(tmp_path / rel, float(label), group) for rel, label, group in BUILDERS[name](tmp_path)]
    records = read_dataset(name, tmp_path)
    assert records == expected
    assert all(type(r.label) is float and type(r.group) is str for r in records)
    assert read_dataset(name, str(tmp_path)) == expected  # root as str


def test_live_columns_map_to_folders(tmp_path):
    """Column c (1-based) of dmos_realigned.mat is jp2k/img1..227, then jpeg/img1..233, ...: e.g. column 228 is
    jpeg/img1.bmp and column 982 fastfading/img174.bmp (dmos of column c is 10 + 0.125 (c - 1) here)."""
    build_live(tmp_path)
    label = {r.path.relative_to(tmp_path).as_posix(): r.label for r in read_dataset("live", tmp_path)}
    assert len(label) == LIVE_KEPT
    columns = {"jp2k/img1.bmp": 1, "jp2k/img227.bmp": 227, "jpeg/img1.bmp": 228, "wn/img1.bmp": 461,
               "gblur/img1.bmp": 635, "fastfading/img1.bmp": 809, "fastfading/img174.bmp": 982}
    checked = [rel for rel in columns if rel in label]  # originals are dropped
    assert len(checked) >= 4
    for rel in checked:
        assert label[rel] == 10.0 + 0.125 * (columns[rel] - 1)
    assert {r.group for r in read_dataset("live", tmp_path)} == {"bikes", "buildings", "caps", "womanhat", "parrots"}


@pytest.mark.parametrize("name,missing", [(name, rel) for name in DATASETS for rel in LAYOUT[name]])
def test_wrong_layout_names_dataset_and_file(tmp_path, name, missing):
    BUILDERS[name](tmp_path)
    target = tmp_path / missing
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError) as info:
        read_dataset(name, tmp_path)
    message = str(info.value)
    assert repr(name) in message and missing in message and str(tmp_path) in message


@pytest.mark.parametrize("name", DATASETS)
def test_missing_images_listed(tmp_path, name):
    expected = BUILDERS[name](tmp_path)
    gone = [rel for rel, _, _ in expected[:2]]
    for rel in gone:
        (tmp_path / rel).unlink()
    with pytest.raises(FileNotFoundError, match="2 image") as info:
        read_dataset(name, tmp_path)
    assert repr(name) in str(info.value) and all(rel in str(info.value) for rel in gone)


def test_many_missing_images_list_the_first_few(tmp_path):
    build_kadid(tmp_path)
    for path in (tmp_path / "distorted_images").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"6 image\(s\).*and 1 more"):
        read_dataset("kadid", tmp_path)


def test_unknown_name_and_bad_root(tmp_path):
    with pytest.raises(ValueError, match="name must be one of .*'koniq'.*got 'konIQ'"):
        read_dataset("konIQ", tmp_path)
    with pytest.raises(FileNotFoundError, match="'csiq'.*is not a folder"):
        read_dataset("csiq", tmp_path / "nowhere")


def test_malformed_label_files(tmp_path):
    build_kadid(tmp_path / "kadid")
    write_csv(tmp_path / "kadid/dmos.csv", ["dist_img", "ref", "dmos"], [["I01_01_01.png", "I01.png", 1.0]])
    with pytest.raises(ValueError, match="dmos.csv has no column.*'ref_img'"):
        read_dataset("kadid", tmp_path / "kadid")

    build_csiq(tmp_path / "csiq")
    (tmp_path / "csiq/csiq_label.txt").write_text("1600.AWGN.1.png 0.06\n1600.JPEG.5.png n/a\n")
    with pytest.raises(ValueError, match="csiq_label.txt line 2: label 'n/a' is not a number"):
        read_dataset("csiq", tmp_path / "csiq")
    (tmp_path / "csiq/csiq_label.txt").write_text("1600.AWGN.1.png\n")
    with pytest.raises(ValueError, match="line 1: expected 2 fields"):
        read_dataset("csiq", tmp_path / "csiq")

    from scipy import io as sio
    build_livec(tmp_path / "livec")
    sio.savemat(tmp_path / "livec/Data/AllMOS_release.mat", {"AllMOS": np.zeros((1, LIVEC_ENTRIES))})
    with pytest.raises(ValueError, match="no variable.*'AllMOS_release'.*holds \\['AllMOS'\\]"):
        read_dataset("livec", tmp_path / "livec")
    sio.savemat(tmp_path / "livec/Data/AllMOS_release.mat", {"AllMOS_release": np.zeros((1, 100))})
    with pytest.raises(ValueError, match="disagree in length"):
        read_dataset("livec", tmp_path / "livec")


def test_spaq_without_openpyxl(tmp_path, monkeypatch):
    build_spaq(tmp_path)
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # makes `import openpyxl` raise ImportError
    with pytest.raises(ImportError, match="pip install openpyxl"):
        read_dataset("spaq", tmp_path)


# Splits ------------------------------------------------------------------------------------------------------------

def make_records(root: Path, groups: int = 25, per_group: int = 3) -> list[Record]:
    return [Record(root / "distorted_images" / f"g{g:02d}_{k}.png", float(g + k / 10), f"{g:02d}")
            for g in range(groups) for k in range(per_group)]


def group_set(records):
    return {r.group for r in records}


@pytest.mark.parametrize("groups,train_fraction,n_train", [
    (25, 0.8, 20),  # TID2013-sized
    (29, 0.8, 23),  # LIVE: 23.2 rounds down
    (81, 0.8, 65),  # KADID: 64.8 rounds up
    (2, 0.5, 1),  # smallest splittable
])
def test_split_by_group_invariants(tmp_path, groups, train_fraction, n_train):
    records = make_records(tmp_path, groups)
    train, test = split_by_group(records, train_fraction, seed=3)
    assert not group_set(train) & group_set(test)  # no group on both sides
    assert len(group_set(train)) == n_train and len(group_set(test)) == groups - n_train
    assert sorted(train + test, key=records.index) == records  # every record once, input order kept per side
    assert train == [r for r in records if r in train]


def test_split_seeds_reproduce_and_differ(tmp_path):
    records = make_records(tmp_path)
    first = split_by_group(records, seed=7)
    assert split_by_group(records, seed=7) == first
    assert split_by_group(list(reversed(records)), seed=7)[0] == list(reversed(first[0]))  # order-independent
    assert group_set(split_by_group(records, seed=8)[0]) != group_set(first[0])
    # default_rng(7).permutation of the 25 sorted groups: pinned so that a change of algorithm shows
    assert sorted(group_set(first[1])) == sorted(f"{i:02d}" for i in np.random.default_rng(7).permutation(25)[20:])


def test_repeated_splits(tmp_path):
    records = make_records(tmp_path)
    splits = list(repeated_splits(records, repeats=10, seed=5))
    assert len(splits) == 10
    assert len({frozenset(group_set(train)) for train, _ in splits}) == 10  # all different
    assert splits[3] == split_by_group(records, 0.8, seed=8)
    assert len(list(repeated_splits(records))) == 10  # defaults


def test_split_argument_errors(tmp_path):
    records = make_records(tmp_path)
    with pytest.raises(ValueError, match="train_fraction must be"):
        split_by_group(records, train_fraction=1.0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        split_by_group(records, seed=-1)
    with pytest.raises(ValueError, match="seed must be"):
        split_by_group(records, seed=1.5)
    with pytest.raises(ValueError, match="1 group.*one side empty"):
        split_by_group(make_records(tmp_path, groups=1))
    with pytest.raises(ValueError, match="0 group"):
        split_by_group([])
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        repeated_splits(records, repeats=0)  # checked at the call, not at the first next()


def test_split_csv_round_trip(tmp_path):
    records = make_records(tmp_path / "kadid")
    train, test = split_by_group(records, seed=1)

    save_split(tmp_path / "absolute.csv", train, test)
    assert load_split(tmp_path / "absolute.csv") == (train, test)

    save_split(tmp_path / "relative.csv", train, test, root=tmp_path / "kadid")
    with open(tmp_path / "relative.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "group", "side"]
    assert rows[0]["path"].startswith("distorted_images/") and {row["side"] for row in rows} == {"train", "test"}
    assert load_split(tmp_path / "relative.csv", root=tmp_path / "kadid") == (train, test)
    moved = load_split(tmp_path / "relative.csv", root=tmp_path / "elsewhere")  # another machine's root
    assert [r.path for r in moved[0]] == [tmp_path / "elsewhere" / r.path.relative_to(tmp_path / "kadid")
                                          for r in train]
    assert load_split(tmp_path / "relative.csv")[1][0].path == test[0].path.relative_to(tmp_path / "kadid")


def test_split_csv_errors(tmp_path):
    records = make_records(tmp_path / "kadid")
    with pytest.raises(ValueError, match="train record's path .* is not under root"):
        save_split(tmp_path / "s.csv", records, [], root=tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="load_split: path"):
        load_split(tmp_path / "missing.csv")
    write_csv(tmp_path / "bad_side.csv", ["path", "label", "group", "side"], [["a.png", 1.0, "a", "val"]])
    with pytest.raises(ValueError, match="line 2: side must be one of"):
        load_split(tmp_path / "bad_side.csv")
    write_csv(tmp_path / "bad_header.csv", ["path", "label"], [["a.png", 1.0]])
    with pytest.raises(ValueError, match="must have columns"):
        load_split(tmp_path / "bad_header.csv")
