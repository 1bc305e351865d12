"""IQA datasets: labelled image records in each dataset's shipped layout, and reproducible splits by group."""
from .readers import DATASETS, Record, read_dataset
from .splits import load_split, repeated_splits, save_split, split_by_group
from .synthetic import make_synthetic

__all__ = ["DATASETS", "Record", "load_split", "make_synthetic", "read_dataset", "repeated_splits", "save_split",
           "split_by_group"]
