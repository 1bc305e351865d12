"""Dataset readers: the (image path, label, group) records of each IQA dataset, read from its label files in the
layout the dataset ships in (lifeiqa_fast.data.read_dataset).

Layouts, label keys and row selections follow the authors' loaders (Life-IQA, IQA/iqa_dataset.py); where this
module differs from them, the reader's docstring says so. Labels are the raw MOS / DMOS as stored (Python floats,
not the float32 the authors cast to, and not normalised). ``group`` is what an 80/20 split keeps on one side: the
reference image for the synthetically distorted sets, the image itself for the authentic ones.

Images are not opened here (a corrupt image is the loader's business); a label row that names a missing file makes
the whole dataset a wrong layout (FileNotFoundError listing the first few).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .._optional import require

# LIVE (release 2): the distortion folders in the order of the 982 columns of dmos_realigned.mat, each holding
# img1.bmp .. imgN.bmp (the authors enumerate the names from these counts rather than listing the folders).
LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
# LIVE Challenge: the authors skip the first 7 entries of the .mat files (the 7 training images of the release).
LIVEC_ENTRIES = slice(7, 1169)
MISSING_SHOWN = 5  # how many missing images a FileNotFoundError lists


@dataclass(frozen=True)
class Record:
    """One labelled image. ``path`` is ``root / <folder> / <name>`` as listed in the label file (not resolved);
    ``label`` the raw MOS / DMOS; ``group`` the split unit (reference image id, or the image's own name)."""
    path: Path
    label: float
    group: str


# A label-file row on its way to a Record: (where it came from, image path relative to root, label, group).
Row = tuple[str, str, object, str]


@dataclass(frozen=True)
class _Layout:
    """A dataset root being read: checks paths and parses tables, with errors that name dataset, file and root."""
    dataset: str
    root: Path

    def _error(self, message: str) -> str:
        return f"lifeiqa_fast.data.read_dataset({self.dataset!r}): {message}"

    def file(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_file():
            raise FileNotFoundError(self._error(f"expected the file {rel!r} in root {str(self.root)!r}, not found "
                                                f"(is root the dataset's top folder?)"))
        return path

    def folder(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_dir():
            raise FileNotFoundError(self._error(f"expected the folder {rel!r}/ in root {str(self.root)!r}, "
                                                f"not found (is root the dataset's top folder?)"))
        return path

    def columns(self, rel: str, names: Iterable[object], wanted: tuple[str, ...]) -> list[int]:
        """Indices of the ``wanted`` column names in a header row."""
        header = [str(name).strip() if name is not None else "" for name in names]
        absent = [name for name in wanted if name not in header]
        if absent:
            raise ValueError(self._error(f"{rel} has no column(s) {absent}; its columns are {header}"))
        return [header.index(name) for name in wanted]

    def csv(self, rel: str, *wanted: str) -> list[tuple[str, list[str]]]:
        """The ``wanted`` columns of a CSV file with a header row: [(where, [value, ...]), ...]."""
        with open(self.file(rel), newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(self._error(f"{rel} is empty"))
        index = self.columns(rel, rows[0], wanted)
        return [(f"{rel} line {n}", [row[i] for i in index]) for n, row in enumerate(rows[1:], start=2)
                if any(cell.strip() for cell in row)]

    def text(self, rel: str, fields: int) -> list[tuple[str, list[str]]]:
        """A whitespace-separated text file with ``fields`` fields a line, no header: [(where, fields), ...]."""
        out = []
        with open(self.file(rel), encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                words = line.split()
                if not words:
                    continue
                if len(words) != fields:
                    raise ValueError(self._error(f"{rel} line {n}: expected {fields} fields, got {line.strip()!r}"))
                out.append((f"{rel} line {n}", words))
        return out

    def xlsx(self, rel: str, *wanted: str) -> list[tuple[str, list[object]]]:
        """The ``wanted`` columns of the first sheet of an .xlsx file (header in row 1), as pandas.read_excel reads
        them in the authors' code: [(where, [value, ...]), ...]."""
        path = self.file(rel)
        openpyxl = require("openpyxl", "openpyxl", "data", self._error(f"reading {rel}"))
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            rows = list(book.worksheets[0].iter_rows(values_only=True))
        finally:
            book.close()
        if not rows:
            raise ValueError(self._error(f"{rel} is empty"))
        index = self.columns(rel, rows[0], wanted)
        return [(f"{rel} row {n}", [row[i] if i < len(row) else None for i in index])
                for n, row in enumerate(rows[1:], start=2) if any(cell is not None for cell in row)]

    def mat(self, rel: str, *keys: str) -> list:
        """The ``keys`` arrays of a MATLAB .mat file (scipy.io.loadmat, as the authors read it)."""
        path = self.file(rel)
        io = require("scipy.io", "scipy", "data", self._error(f"reading {rel}"))
        data = io.loadmat(str(path))
        absent = [key for key in keys if key not in data]
        if absent:
            found = sorted(key for key in data if not key.startswith("__"))
            raise ValueError(self._error(f"{rel} has no variable(s) {absent}; it holds {found}"))
        return [data[key] for key in keys]

    def records(self, rows: Iterable[Row]) -> list[Record]:
        """Records from label rows; every image must exist (checked with a stat, not opened)."""
        records, missing = [], []
        for where, rel, label, group in rows:
            try:
                value = float(label)
            except (TypeError, ValueError):
                raise ValueError(self._error(f"{where}: label {label!r} is not a number")) from None
            if not math.isfinite(value):
                raise ValueError(self._error(f"{where}: label {label!r} is not finite"))
            path = self.root / rel
            if not path.is_file():
                missing.append(rel)
                continue
            records.append(Record(path, value, str(group)))
        if missing:
            shown = ", ".join(repr(rel) for rel in missing[:MISSING_SHOWN])
            more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            raise FileNotFoundError(self._error(f"{len(missing)} image(s) named in the label file are missing "
                                                f"under root {str(self.root)!r}: {shown}{more}"))
        if not records:
            raise ValueError(self._error(f"the label file lists no images (root {str(self.root)!r})"))
        return records


def _mat_strings(cells) -> list[str]:
    """A MATLAB cell array of strings as loadmat returns it (an object array, (1, N) or (N, 1), of 1-element
    '<U' arrays) as a flat list: ``[array(['a.bmp']), array(['b.bmp'])] -> ['a.bmp', 'b.bmp']``."""
    import numpy as np
    return [str(np.ravel(cell)[0]) for cell in np.ravel(cells)]


def _same_lengths(ds: _Layout, **lengths: int) -> None:
    if len(set(lengths.values())) > 1:
        raise ValueError(ds._error(f"the label arrays disagree in length: {lengths}"))


def _read_live(ds: _Layout) -> list[Record]:
    """LIVE release 2. As the authors: the 982 columns of ``dmos_realigned.mat`` (``dmos_new``, ``orgs``) and
    ``refnames_all.mat`` (``refnames_all``) are jp2k/img1..227, jpeg/img1..233, wn, gblur, fastfading/img1..174 in
    that order; columns with ``orgs == 1`` (the undistorted originals) are dropped, leaving 779 images. Group: the
    reference image named in ``refnames_all`` without its extension (the authors match the full name against
    ``refimgs/*.bmp``; same partition)."""
    ds.folder("refimgs")
    dmos, orgs = (a.ravel() for a in ds.mat("dmos_realigned.mat", "dmos_new", "orgs"))
    refs = _mat_strings(ds.mat("refnames_all.mat", "refnames_all")[0])
    images = [f"{folder}/img{i}.bmp" for folder, count in LIVE_FOLDERS for i in range(1, count + 1)]
    _same_lengths(ds, images=len(images), dmos_new=len(dmos), orgs=len(orgs), refnames_all=len(refs))
    return ds.records((f"dmos_realigned.mat column {i + 1}", image, label, Path(ref).stem)
                      for i, (image, label, original, ref) in enumerate(zip(images, dmos, orgs, refs))
                      if not original)


def _read_csiq(ds: _Layout) -> list[Record]:
    """CSIQ: ``csiq_label.txt`` lines ``name label``, images in ``dst_imgs_all/``. Group: the name before the first
    dot (``1600.AWGN.1.png -> 1600``; the authors use ``1600.png`` to match ``src_imgs/``, same partition)."""
    ds.folder("src_imgs")
    return ds.records((where, f"dst_imgs_all/{name}", label, name.split(".")[0])
                      for where, (name, label) in ds.text("csiq_label.txt", 2))


def _read_tid2013(ds: _Layout) -> list[Record]:
    """TID2013: ``mos_with_names.txt`` lines ``MOS name``, images in ``distorted_images/``. Group: characters
    [1:3] of the name (``i01_01_1.bmp -> 01``), as the authors (they match it against ``reference_images/``)."""
    ds.folder("reference_images")
    return ds.records((where, f"distorted_images/{name}", mos, name[1:3])
                      for where, (mos, name) in ds.text("mos_with_names.txt", 2))


def _read_kadid(ds: _Layout) -> list[Record]:
    """KADID-10k (and the synthetic set, which ships in its layout): ``dmos.csv`` columns dist_img, ref_img, dmos;
    images in ``distorted_images/``. Group: ref_img without its extension (``I01.png -> I01``; the authors take
    ref_img[1:3], the same partition for KADID's I01..I81 but not for other reference names)."""
    ds.folder("reference_images")
    return ds.records((where, f"distorted_images/{dist}", dmos, Path(ref).stem)
                      for where, (dist, ref, dmos) in ds.csv("dmos.csv", "dist_img", "ref_img", "dmos"))


def _read_livec(ds: _Layout) -> list[Record]:
    """LIVE Challenge: ``Data/AllImages_release.mat`` (``AllImages_release``, a 1169 x 1 cell of names) and
    ``Data/AllMOS_release.mat`` (``AllMOS_release``, 1 x 1169), entries 7..1168 (0-based) as the authors, who skip
    the 7 training images; images in ``Images/``. Group: the image name."""
    names = _mat_strings(ds.mat("Data/AllImages_release.mat", "AllImages_release")[0])
    mos = ds.mat("Data/AllMOS_release.mat", "AllMOS_release")[0].ravel()
    _same_lengths(ds, AllImages_release=len(names), AllMOS_release=len(mos))
    entries = range(len(names))[LIVEC_ENTRIES]
    return ds.records((f"AllImages_release.mat entry {i}", f"Images/{names[i]}", mos[i], names[i]) for i in entries)


def _authentic(label_file: str, name_column: str, label_column: str, folder: str) -> Callable[[_Layout], list]:
    """A reader for an authentic set with one table (CSV or .xlsx) naming each image and its label."""
    def read(ds: _Layout) -> list[Record]:
        table = ds.xlsx if label_file.endswith(".xlsx") else ds.csv
        return ds.records((where, f"{folder}/{name}", label, str(name))
                          for where, (name, label) in table(label_file, name_column, label_column))
    read.__doc__ = (f"{label_file} columns {name_column}, {label_column}; images in {folder}/ (as the authors). "
                    f"Group: the image name.")
    return read


# name -> reader. KonIQ-10k, SPAQ and LIVEFB follow the authors' file, column and folder names: KonIQ's
# MOS_zscore, SPAQ's pre-resized 512x384/ copy (made by their IQA/spaq_downsample.py), LIVEFB's labels_image.csv.
READERS: dict[str, Callable[[_Layout], list[Record]]] = {
    "live": _read_live,
    "csiq": _read_csiq,
    "tid2013": _read_tid2013,
    "kadid": _read_kadid,
    "livec": _read_livec,
    "koniq": _authentic("koniq10k_scores_and_distributions.csv", "image_name", "MOS_zscore", "1024x768"),
    "spaq": _authentic("Annotations/MOS and Image attribute scores.xlsx", "Image name", "MOS", "512x384"),
    "livefb": _authentic("labels_image.csv", "name", "mos", "database"),
    "synthetic": _read_kadid,
}
DATASETS = tuple(READERS)


def read_dataset(name: str, root: str | Path) -> list[Record]:
    """All labelled images of dataset ``name`` (one of DATASETS) under ``root``, in label-file order.

    Raises ValueError for an unknown name or a malformed label file, FileNotFoundError (naming the dataset, the
    expected file and root) for a wrong layout, including label rows whose image is missing.
    """
    if name not in READERS:
        raise ValueError(f"lifeiqa_fast.data.read_dataset: name must be one of {list(DATASETS)}, got {name!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"lifeiqa_fast.data.read_dataset({name!r}): root {str(root)!r} is not a folder")
    return READERS[name](_Layout(name, root))
