"""Train/test splits by group (lifeiqa_fast.data.split_by_group) and their CSV form (save_split / load_split).

The protocol (docs/training.md): 80/20 at random, by reference image for the synthetically distorted sets
and by image for the authentic ones (``Record.group`` already encodes which), 10 random splits. A split depends only
on the set of groups and the seed, not on the order of ``records``: the groups are sorted, then permuted by
``numpy.random.default_rng(seed)``. NumPy does not promise that Generator streams never change between versions,
so a run that must be reproduced exactly elsewhere should ship its split as a CSV (save_split).
"""
from __future__ import annotations

import csv
import numbers
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .readers import Record

SPLIT_COLUMNS = ("path", "label", "group", "side")
SIDES = ("train", "test")


def _check_fraction(fn: str, train_fraction: float) -> None:
    if not isinstance(train_fraction, numbers.Real) or not 0.0 < train_fraction < 1.0:
        raise ValueError(f"lifeiqa_fast.data.{fn}: train_fraction must be a number in (0, 1), got {train_fraction!r}")


def _check_count(fn: str, arg: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"lifeiqa_fast.data.{fn}: {arg} must be an int >= {minimum}, got {value!r}")


def split_by_group(records: Iterable[Record], train_fraction: float = 0.8,
                   seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, test): round(train_fraction * n_groups) groups, drawn at random, go to train, the rest to test;
    every record of a group lands on the same side. Records keep their input order within each side.

    Example: groups a, b, c, d, e (sorted) with train_fraction 0.8 give 4 train groups, chosen as the first 4 of
    default_rng(seed).permutation(5) applied to that sorted list.
    """
    records = list(records)
    _check_fraction("split_by_group", train_fraction)
    _check_count("split_by_group", "seed", seed, 0)
    groups = sorted({record.group for record in records})
    n_train = round(train_fraction * len(groups))
    if not 0 < n_train < len(groups):
        raise ValueError(f"lifeiqa_fast.data.split_by_group: records has {len(records)} record(s) in {len(groups)} "
                         f"group(s); train_fraction={train_fraction} puts {n_train} group(s) in train, which leaves "
                         f"one side empty")
    order = np.random.default_rng(int(seed)).permutation(len(groups))
    train_groups = {groups[i] for i in order[:n_train]}
    train = [record for record in records if record.group in train_groups]
    test = [record for record in records if record.group not in train_groups]
    return train, test


def repeated_splits(records: Iterable[Record], repeats: int = 10, seed: int = 0,
                    train_fraction: float = 0.8) -> Iterator[tuple[list[Record], list[Record]]]:
    """``repeats`` splits by group, for seeds seed, seed + 1, ..., seed + repeats - 1 (arguments are checked now,
    not at the first ``next``)."""
    records = list(records)
    _check_count("repeated_splits", "repeats", repeats, 1)
    _check_count("repeated_splits", "seed", seed, 0)
    _check_fraction("repeated_splits", train_fraction)
    return (split_by_group(records, train_fraction, seed + i) for i in range(repeats))


def save_split(path: str | Path, train: Iterable[Record], test: Iterable[Record],
               root: str | Path | None = None) -> None:
    """Write a split as CSV with columns path,label,group,side (side: train or test). With ``root``, paths are
    written relative to it (POSIX separators), so the file is valid on any machine holding the dataset; labels are
    written with repr, so they read back exactly."""
    base = None if root is None else Path(root).expanduser()
    rows = []
    for side, records in zip(SIDES, (train, test)):
        for record in records:
            if not isinstance(record, Record):
                raise TypeError(f"lifeiqa_fast.data.save_split: {side} must hold Records, got {type(record).__name__}")
            file = Path(record.path)
            if base is not None:
                try:
                    file = file.relative_to(base)
                except ValueError:
                    raise ValueError(f"lifeiqa_fast.data.save_split: a {side} record's path {str(file)!r} is not "
                                     f"under root {str(base)!r}") from None
            rows.append((file.as_posix(), repr(float(record.label)), record.group, side))
    with open(Path(path).expanduser(), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(rows)


def load_split(path: str | Path, root: str | Path | None = None) -> tuple[list[Record], list[Record]]:
    """(train, test) from a CSV written by save_split; relative paths are joined to ``root`` when given."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"lifeiqa_fast.data.load_split: path {str(path)!r} is not a file")
    base = None if root is None else Path(root).expanduser()
    sides: dict[str, list[Record]] = {side: [] for side in SIDES}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(SPLIT_COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"lifeiqa_fast.data.load_split: {str(path)!r} must have columns {list(SPLIT_COLUMNS)}, "
                             f"got {reader.fieldnames}")
        for row in reader:
            where = f"{str(path)!r} line {reader.line_num}"
            if row["side"] not in sides:
                raise ValueError(f"lifeiqa_fast.data.load_split: {where}: side must be one of {list(SIDES)}, "
                                 f"got {row['side']!r}")
            try:
                label = float(row["label"])
            except (TypeError, ValueError):
                raise ValueError(f"lifeiqa_fast.data.load_split: {where}: label {row['label']!r} is not a number") \
                    from None
            file = Path(row["path"])
            sides[row["side"]].append(Record(file if base is None else base / file, label, row["group"]))
    return sides["train"], sides["test"]
