"""Datasets and transforms: image folders, VTAB-1k list files, scikit-learn digits."""
from .build import DATA_KINDS, build_datasets
from .common import DataError, load_rgb
from .digits import ArrayImageDataset, load_digits_splits
from .folder import ImageFolder
from .transforms import build_transform
from .vtab import VTAB_SPLITS, VTABList

__all__ = [
    "DATA_KINDS",
    "VTAB_SPLITS",
    "ArrayImageDataset",
    "DataError",
    "ImageFolder",
    "VTABList",
    "build_datasets",
    "build_transform",
    "load_digits_splits",
    "load_rgb",
]
