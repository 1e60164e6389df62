"""scikit-learn's bundled handwritten digits (8x8, 10 classes) as small RGB image datasets."""
from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class ArrayImageDataset(Dataset):
    """Images held in memory. `images`: uint8 array (N, H, W, 3); items are `(transform(PIL), label)`."""

    def __init__(self, images: np.ndarray, labels, classes: list[str], transform=None):
        self.images = images
        self.targets = [int(y) for y in labels]
        self.classes = list(classes)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])  # (H, W, 3) uint8 -> RGB
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def load_digits_splits(test_fraction: float = 0.3, seed: int = 0):
    """Return `(train, test)` ArrayImageDatasets of the 1,797 digits, stratified and deterministic.

    Each image is 8x8 RGB with pixel value `v / 16 * 255` (the data set's values are 0..16).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError('the digits demo needs scikit-learn (the "demo" extra): pip install -e ".[demo]" or pip install scikit-learn') from e

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    digits = load_digits()
    gray = np.round(digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    x_tr, x_te, y_tr, y_te = train_test_split(
        rgb, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    classes = [str(i) for i in range(10)]
    return ArrayImageDataset(x_tr, y_tr, classes), ArrayImageDataset(x_te, y_te, classes)
