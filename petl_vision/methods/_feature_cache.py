"""Feature cache for side networks (LST, UniPT): the frozen backbone runs once per sample.

When the training data has no random augmentation, the backbone's output for a sample never
changes, so the first epoch stores what the side network reads (the L + 1 hidden states, the pooled
feature and the label) per sample index, in half precision, in memory-mapped ``.npy`` files; later
epochs read them back and train the side network without running the backbone.

The cache directory holds ``meta.json`` (the key, the fields' shapes), ``filled.npy`` (one flag per
sample) and one ``<field>.npy`` per field, shaped (num_samples, ...). The key (`cache_key`) covers
the backbone weights (a hash of every host tensor outside the classifier head), the data (dataset
length and a hash of its file list or image array, or a user-given id) and the preprocessing (the
transform's repr). A cache whose key, sample count or dtype differs is deleted and rebuilt, never
read. Size: (L + 1) * N * D * 2 bytes per sample, about 3.9 MB for ViT-B/16 at 224 (13 x 197 x 768).

    cache = FeatureCache(out / "feature_cache", cache_key(model, train_ds), len(train_ds))
    features = side_features(model, images)            # epoch 1: backbone, no graph
    cache.write(indices, {**features, "target": labels})
    logits = side_forward_from_cache(model, features)
    ...
    batch = cache.read(indices)                        # later epochs: no backbone
    logits = side_forward_from_cache(model, batch)

`logits_with_cache(model, batch, cache)` does either, for a batch of an `IndexedDataset` loader
(epoch 1) or of a `cache.dataset()` loader (later epochs).

One process writes the cache, or several processes of one sharded (FSDP2) run on one machine, each
its own samples into the same memory-mapped files (one allocates them: `allocate`, the others `reload`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.io import atomic_write
from ..core.state import host_class_name, host_modules
from ..hosts import classifier_modules
from ._side import SideNetwork, side_features, side_forward_from_cache

FORMAT_VERSION = 1
META_NAME, FILLED_NAME = "meta.json", "filled.npy"
DTYPES = ("float16", "float32")
# Transform classes whose output is random: a cache would freeze one random view of each image.
_RANDOM_TRANSFORMS = re.compile(
    r"\b(Random\w*|RandAugment\w*|AutoAugment\w*|AugMix\w*|TrivialAugment\w*|ColorJitter|GaussianBlur|"
    r"ElasticTransform|RandomErasing|Mixup|CutMix)\b"
)


def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 of the name, shape, dtype and bytes of every host tensor (head and petl excluded)."""
    digest = hashlib.sha256(host_class_name(model).encode())
    for name, module in host_modules(model, exclude=classifier_modules(model)):
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tname, t in tensors:
            if t is None:
                continue
            t = t.detach().to("cpu").contiguous()
            digest.update(f"{name}.{tname}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset, data_id: str | None = None) -> str:
    """A hash identifying the samples of `dataset`, in order.

    data_id: a string that names the data (used as is, with the length). Otherwise datasets with
    `samples` [(path, label), ...] (ImageFolder, VTAB lists) are hashed by path, label, file size
    and modification time, and datasets with an `images` array by its bytes and `targets`.
    """
    n = len(dataset)
    if data_id is not None:
        return f"id:{data_id}:len={n}"
    digest = hashlib.sha256(f"len={n}".encode())
    samples, images = getattr(dataset, "samples", None), getattr(dataset, "images", None)
    if samples is not None:
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    elif isinstance(images, np.ndarray):
        digest.update(np.ascontiguousarray(images).tobytes())
        digest.update(json.dumps([int(t) for t in getattr(dataset, "targets", [])]).encode())
    else:
        raise ValueError(
            f"feature cache: cannot fingerprint a {type(dataset).__name__} (it has neither `samples` nor an "
            "`images` array); pass data_id='<a name that changes whenever the data changes>'"
        )
    return digest.hexdigest()


def cache_key(model: nn.Module, dataset, transform="auto", data_id: str | None = None) -> dict:
    """The key of a feature cache: backbone weights, data and preprocessing.

    transform: the preprocessing ("auto": `dataset.transform`). A transform with random
    augmentation raises ValueError: its features change every epoch and cannot be cached.
    """
    transform = getattr(dataset, "transform", None) if transform == "auto" else transform
    text = repr(transform)
    random = _RANDOM_TRANSFORMS.search(text)
    if random:
        raise ValueError(f"feature cache: the transform has random augmentation ({random.group(0)}); "
                         "train without augmentation (data.augment=false) or without the cache")
    return {
        "format": FORMAT_VERSION,
        "backbone": backbone_fingerprint(model),
        "data": data_fingerprint(dataset, data_id),
        "transform": text,
    }


class IndexedDataset(Dataset):
    """Items of `dataset` prefixed by their index: (index, inputs, target, ...)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (index, *self.dataset[index])


class FeatureCache:
    """Per-sample features on disk, memory-mapped. See the module docstring.

    directory: a folder used only by this cache (created if needed).
    key: `cache_key(...)`; a stored cache with another key is deleted and rebuilt.
    num_samples: dataset length; dtype: "float16" (default) or "float32" for floating fields.
    status: "new", "reused" (the stored key matched) or "rebuilt" (a stale cache was deleted).
    """

    def __init__(self, directory: str | os.PathLike, key: dict, num_samples: int, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"FeatureCache: dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory = Path(directory)
        self.meta = {"format": FORMAT_VERSION, "key": json.loads(json.dumps(key)), "num_samples": int(num_samples),
                     "dtype": dtype, "fields": {}}
        self._arrays: dict[str, np.ndarray] = {}
        stored = self._read_meta()
        if stored is not None and all(stored.get(k) == self.meta[k] for k in ("format", "key", "num_samples", "dtype")):
            self.meta, self.status = stored, "reused"
        else:
            self.status = "rebuilt" if stored is not None or (self.directory / FILLED_NAME).exists() else "new"
            self._wipe()
            self.directory.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.directory / FILLED_NAME, mode="w+", dtype=np.uint8, shape=(num_samples,)).flush()
            self._write_meta()
        self._filled = np.load(self.directory / FILLED_NAME, mmap_mode="r+")

    @property
    def fields(self) -> dict[str, dict]:
        return self.meta["fields"]

    def is_complete(self) -> bool:
        """True when every sample has been written."""
        return bool(self._filled.all())

    def has(self, indices) -> bool:
        """True when every sample in `indices` has been written."""
        return bool(self._filled[_as_index(indices)].all())

    def write(self, indices, features: dict[str, torch.Tensor]) -> None:
        """Store features[name][k] for sample indices[k]; every field has a leading batch dimension."""
        idx = _as_index(indices)
        if not self.fields:
            self._allocate({name: (tuple(t.shape[1:]), t.dtype) for name, t in features.items()})
        if set(features) != set(self.fields):
            raise ValueError(f"FeatureCache.write: fields {sorted(features)} differ from the cache's {sorted(self.fields)}")
        for name, t in features.items():
            array = self._array(name)
            if tuple(t.shape) != (len(idx), *array.shape[1:]):
                raise ValueError(f"FeatureCache.write: {name!r} has shape {tuple(t.shape)}, expected {(len(idx), *array.shape[1:])}")
            array[idx] = t.detach().to("cpu").numpy().astype(array.dtype, copy=False)
            array.flush()
        self._filled[idx] = 1  # flags last: a crash never leaves a flagged sample without data
        self._filled.flush()

    def allocate(self, example: dict[str, torch.Tensor]) -> None:
        """Create the field files from one example batch ({name: (B, ...)}), as the first `write` would.
        Several processes sharing a cache: one allocates, the others then call `reload`."""
        if not self.fields:
            self._allocate({name: (tuple(t.shape[1:]), t.dtype) for name, t in example.items()})

    def reload(self) -> None:
        """Re-read meta.json (the fields another process allocated)."""
        stored = self._read_meta()
        if stored is None or stored.get("key") != self.meta["key"]:
            raise ValueError(f"FeatureCache.reload: {self.directory / META_NAME} is missing or belongs to another cache")
        self.meta, self._arrays = stored, {}

    def read(self, indices) -> dict[str, torch.Tensor]:
        """{name: tensor (len(indices), ...)} of stored samples; ValueError naming missing ones."""
        idx = _as_index(indices)
        missing = idx[self._filled[idx] == 0]
        if len(missing):
            raise ValueError(f"FeatureCache.read: samples {missing[:5].tolist()} are not in the cache yet")
        return {name: torch.from_numpy(np.array(self._array(name)[idx])) for name in self.fields}

    def dataset(self) -> "CachedFeatures":
        """A Dataset over the complete cache: item i is {name: tensor} of sample i."""
        if not self.is_complete():
            raise ValueError(f"FeatureCache.dataset: the cache in {self.directory} is not complete")
        return CachedFeatures(self.directory, self.fields)

    # ------------------------------------------------------------------ files
    def _read_meta(self) -> dict | None:
        path = self.directory / META_NAME
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # unreadable: treated as stale

    def _write_meta(self) -> None:
        atomic_write(self.directory / META_NAME, lambda tmp: tmp.write_text(json.dumps(self.meta, indent=1)))

    def _wipe(self) -> None:
        """Delete this cache's files (meta.json and the .npy files) from the directory."""
        if not self.directory.is_dir():
            return
        for path in [self.directory / META_NAME, *self.directory.glob("*.npy")]:
            if path.is_file():
                path.unlink()

    def _allocate(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        n = self.meta["num_samples"]
        for name, (shape, dtype) in specs.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "filled":
                raise ValueError(f"FeatureCache: bad field name {name!r} (letters, digits, underscore; not 'filled')")
            np_dtype = self.meta["dtype"] if dtype.is_floating_point else "int64"
            np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=np_dtype, shape=(n, *shape)).flush()
            self.fields[name] = {"shape": list(shape), "dtype": np_dtype}
        self._write_meta()

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r+")
        return self._arrays[name]


class CachedFeatures(Dataset):
    """Read-only view of a complete cache; opens the memory maps lazily (safe in worker processes)."""

    def __init__(self, directory: Path, fields: dict):
        self.directory, self.names = Path(directory), sorted(fields)
        self._arrays: dict[str, np.ndarray] | None = None
        self._len = int(np.load(self.directory / FILLED_NAME, mmap_mode="r").shape[0])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = {n: np.load(self.directory / f"{n}.npy", mmap_mode="r") for n in self.names}
        return {n: torch.from_numpy(np.array(a[index])) for n, a in self._arrays.items()}

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


def uses_side_network(model: nn.Module) -> bool:
    """True when a side network (LST, UniPT) is applied to `model`: its backbone features can be cached."""
    state = getattr(model, "petl", None)
    return isinstance(state, nn.Module) and any(isinstance(m, SideNetwork) for m in state.children())


def logits_with_cache(model: nn.Module, batch, cache: FeatureCache, any_process=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of one training batch, using and filling `cache`.

    batch: (indices, images, targets) from an `IndexedDataset` loader (the backbone runs only for
    samples not yet cached, and their features are stored), or a dict from `cache.dataset()`
    (no backbone at all). `model` is the unwrapped model (not a DDP/accelerate wrapper).
    any_process: `any_process(flag) -> bool`, True when the flag is True on any process: a sharded
    backbone runs on every process or on none (its forward is collective).
    """
    if isinstance(batch, dict):
        return side_forward_from_cache(model, batch), batch["target"]
    indices, images, targets = batch
    missing = not cache.has(indices)
    if any_process is not None:
        missing = any_process(missing)
    if not missing:
        features = cache.read(indices)
    else:
        features = side_features(model, images)
        cache.write(indices, {**features, "target": targets})
    return side_forward_from_cache(model, features), targets


def _as_index(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().to("cpu").numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)
