"""Datasets: readers, preprocessing, leave-one-out split, negative sampling, content encoders."""

from gfmfr.data.dataset import Dataset, build_dataset, load_dataset
from gfmfr.data.errors import DataError

__all__ = ["Dataset", "DataError", "build_dataset", "load_dataset"]
