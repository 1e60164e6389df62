"""Point-cloud datasets: ModelNet40, ScanObjectNN, and synthetic shapes generated on the fly.

Every dataset yields ``(points, label)`` with points a float32 tensor (num_points, 3).

- ModelNet40, ``modelnet40_ply_hdf5_2048``: ``root/ply_data_{train,test}<i>.h5`` (keys ``data``
  (M, 2048, 3) and ``label`` (M, 1)), optional ``root/shape_names.txt``.
- ModelNet40, resampled layout (``modelnet40_normal_resampled``): ``root/modelnet40_shape_names.txt``,
  ``root/modelnet40_{train,test}.txt`` listing ids such as ``airplane_0001``, and
  ``root/airplane/airplane_0001.txt`` (comma-separated x, y, z[, normals]) or ``.npy`` (N, 3+).
- ScanObjectNN h5 (``h5_files``): OBJ_BG ``main_split/{training,test}_objectdataset.h5``, OBJ_ONLY
  ``main_split_nobg/...``, PB_T50_RS ``main_split/{split}_objectdataset_augmentedrot_scale75.h5``.
- Synthetic shapes (``SyntheticShapes``): sphere, cube, cylinder, cone, torus, pyramid, plane,
  capsule, with random scale, rotation about the up axis and noise; item i is a function of (seed, i).

Point selection follows the official Point-MAE / IDPT / P2P loops: for evaluation the first
num_points of farthest point sampling; for training num_points drawn at random from the first
ceil(num_points * 1200 / 1024) FPS points (1200 for 1024, 2400 for 2048).
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.pointnet_ops import farthest_point_sample
from .common import DataError

SCANOBJECTNN_VARIANTS = {
    "obj_bg": ("main_split", ""),
    "obj_only": ("main_split_nobg", ""),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75"),
}
AUGMENTATIONS = ("scale_translate", "rotate", "jitter")


# ----------------------------------------------------------------------------- augmentations


def normalize_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre (N, 3) points at the origin and scale them into the unit sphere."""
    points = points - points.mean(dim=0)
    return points / points.norm(dim=1).max().clamp_min(1e-12)


def scale_translate(points: torch.Tensor, low: float = 2 / 3, high: float = 3 / 2, shift: float = 0.2) -> torch.Tensor:
    """Point-MAE's PointcloudScaleAndTranslate: per-axis scale U(low, high), shift U(-shift, shift)."""
    scale = torch.empty(3).uniform_(low, high)
    return points * scale + torch.empty(3).uniform_(-shift, shift)


def rotate_up(points: torch.Tensor) -> torch.Tensor:
    """Point-MAE's PointcloudRotate: a random rotation about the y (up) axis."""
    angle = torch.rand(()) * 2 * math.pi
    c, s = torch.cos(angle), torch.sin(angle)
    rotation = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return points @ rotation


def jitter(points: torch.Tensor, sigma: float = 0.01, clip: float = 0.05) -> torch.Tensor:
    """Gaussian noise N(0, sigma) per coordinate, clipped to [-clip, clip]."""
    return points + (torch.randn_like(points) * sigma).clamp(-clip, clip)


def augment(points: torch.Tensor, names) -> torch.Tensor:
    """Apply the named augmentations (see AUGMENTATIONS) in order."""
    ops = {"scale_translate": scale_translate, "rotate": rotate_up, "jitter": jitter}
    for name in names:
        if name not in ops:
            raise DataError(f"unknown point-cloud augmentation {name!r} (expected some of {', '.join(AUGMENTATIONS)})")
        points = ops[name](points)
    return points


# ----------------------------------------------------------------------------- array datasets


def train_pool_size(num_points: int, available: int) -> int:
    """FPS points to draw training samples from: ceil(n * 1200 / 1024), at most what the cloud has."""
    return min(available, math.ceil(num_points * 1200 / 1024))


class PointCloudArray(Dataset):
    """Clouds held in memory (M, P, 3) with labels (M,); FPS orders are computed once, batched."""

    def __init__(self, points: np.ndarray, labels: np.ndarray, num_points: int, train: bool, augment=(), classes=None,
                 source: str = "array"):
        points = torch.as_tensor(np.asarray(points)[..., :3], dtype=torch.float32)
        if points.ndim != 3 or points.shape[1] < num_points:
            raise DataError(f"{source}: expected clouds (M, P >= {num_points}, 3), got {tuple(points.shape)}")
        self.labels = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long)
        if len(self.labels) != len(points):
            raise DataError(f"{source}: {len(points)} clouds but {len(self.labels)} labels")
        self.num_points, self.train, self.augment = num_points, train, tuple(augment)
        pool = train_pool_size(num_points, points.shape[1]) if train else num_points
        self.points = torch.cat([_fps_select(chunk, pool) for chunk in points.split(256)]) if len(points) else points[:, :pool]
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(self.labels.max()) + 1 if len(self.labels) else 0)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        points = self.points[i]
        if self.train:
            points = points[torch.randperm(points.shape[0])[: self.num_points]]
            points = augment(points, self.augment)
        return points, int(self.labels[i])


def _fps_select(points: torch.Tensor, num: int) -> torch.Tensor:
    """The first num FPS points (B, num, 3) of points (B, P, 3); all points, unchanged, when num >= P."""
    if num >= points.shape[1]:
        return points
    device = "cuda" if torch.cuda.is_available() else "cpu"
    idx = farthest_point_sample(points.to(device), num).cpu()
    return points.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading .h5 point clouds needs h5py: pip install h5py") from None
    return h5py


def _read_h5(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    h5py = _h5py()
    data, labels = [], []
    for path in files:
        with h5py.File(path, "r") as f:
            if "data" not in f or "label" not in f:
                raise DataError(f"{path}: expected datasets 'data' and 'label', found {sorted(f.keys())}")
            data.append(f["data"][:].astype(np.float32))
            labels.append(f["label"][:].reshape(-1).astype(np.int64))
    return np.concatenate(data), np.concatenate(labels)


def modelnet40_h5(root: str | Path, split: str, num_points: int = 1024, train: bool | None = None, augment=()) -> PointCloudArray:
    """ModelNet40 from ``modelnet40_ply_hdf5_2048`` (split: "train" or "test")."""
    root = Path(root)
    files = sorted(root.glob(f"ply_data_{split}*.h5"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
    if not files:
        raise DataError(f"{root}: no ply_data_{split}*.h5 files (expected the modelnet40_ply_hdf5_2048 folder)")
    points, labels = _read_h5(files)
    names = root / "shape_names.txt"
    classes = names.read_text().split() if names.is_file() else None
    return PointCloudArray(points, labels, num_points, split == "train" if train is None else train, augment, classes, source=str(root))


def scanobjectnn(root: str | Path, variant: str, split: str, num_points: int = 2048, train: bool | None = None, augment=()) -> PointCloudArray:
    """ScanObjectNN h5 (variant "obj_bg", "obj_only" or "pb_t50_rs"; split "train" or "test"). Not normalised."""
    if variant not in SCANOBJECTNN_VARIANTS:
        raise DataError(f"unknown ScanObjectNN variant {variant!r} (expected one of {', '.join(SCANOBJECTNN_VARIANTS)})")
    folder, suffix = SCANOBJECTNN_VARIANTS[variant]
    name = f"{'training' if split == 'train' else 'test'}_objectdataset{suffix}.h5"
    candidates = [Path(root) / folder / name, Path(root) / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"ScanObjectNN {variant}: none of {[str(p) for p in candidates]} exists (root should be the h5_files folder)")
    points, labels = _read_h5([path])
    return PointCloudArray(points, labels, num_points, split == "train" if train is None else train, augment, source=str(path))


# ----------------------------------------------------------------------------- resampled ModelNet40


class ModelNet40Resampled(Dataset):
    """``modelnet40_normal_resampled``-style folders of per-shape .txt / .npy files, read lazily.

    Each cloud is normalised into the unit sphere; points are chosen as described in the module
    docstring (farthest point sampling of the full file, up to 10,000 points: slow on CPU, so
    selections are cached per process).
    """

    def __init__(self, root: str | Path, split: str, num_points: int = 1024, train: bool | None = None, augment=()):
        self.root = Path(root)
        names_file, list_file = self.root / "modelnet40_shape_names.txt", self.root / f"modelnet40_{split}.txt"
        for path in (names_file, list_file):
            if not path.is_file():
                raise DataError(f"{path}: missing (expected the modelnet40_normal_resampled layout)")
        self.classes = names_file.read_text().split()
        index = {c: i for i, c in enumerate(self.classes)}
        self.items = []
        for shape_id in list_file.read_text().split():
            cls = shape_id.rsplit("_", 1)[0]
            if cls not in index:
                raise DataError(f"{list_file}: {shape_id!r} names class {cls!r}, not in {names_file.name}")
            self.items.append((shape_id, index[cls]))
        self.num_points, self.augment = num_points, tuple(augment)
        self.train = split == "train" if train is None else train
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> torch.Tensor:
        """All points (P, 3) of item i, normalised."""
        shape_id, _ = self.items[i]
        folder = self.root / shape_id.rsplit("_", 1)[0]
        npy, txt = folder / f"{shape_id}.npy", folder / f"{shape_id}.txt"
        if npy.is_file():
            array = np.load(npy, allow_pickle=False)
        elif txt.is_file():
            array = np.loadtxt(txt, delimiter=",", dtype=np.float32, ndmin=2)
        else:
            raise DataError(f"{shape_id}: neither {npy} nor {txt} exists")
        return normalize_unit_sphere(torch.as_tensor(array[:, :3], dtype=torch.float32))

    def __getitem__(self, i: int):
        if i not in self._cache:
            points = self.load(i)
            if points.shape[0] < self.num_points:
                raise DataError(f"{self.items[i][0]}: {points.shape[0]} points, fewer than num_points={self.num_points}")
            pool = train_pool_size(self.num_points, points.shape[0]) if self.train else self.num_points
            self._cache[i] = _fps_select(points.unsqueeze(0), pool)[0]
        points = self._cache[i]
        if self.train:
            points = augment(points[torch.randperm(points.shape[0])[: self.num_points]], self.augment)
        return points, self.items[i][1]


# ----------------------------------------------------------------------------- synthetic shapes


def _sphere(n, g):
    p = torch.randn(n, 3, generator=g)
    return p / p.norm(dim=1, keepdim=True)


def _cube(n, g):
    p = torch.rand(n, 3, generator=g) * 2 - 1
    axis = torch.randint(0, 3, (n,), generator=g)
    p[torch.arange(n), axis] = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return p


def _disk(n, g, radius=1.0):
    r = radius * torch.rand(n, generator=g).sqrt()
    a = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)


def _cylinder(n, g):
    a, y = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 - 1
    p = torch.stack([torch.cos(a), y, torch.sin(a)], 1)
    cap = torch.rand(n, generator=g) < 1 / 3  # cap area 2 pi vs side 4 pi
    d = _disk(n, g)
    p[cap] = torch.stack([d[:, 0], torch.sign(torch.rand(n, generator=g) - 0.5), d[:, 1]], 1)[cap]
    return p


def _cone(n, g):
    h = torch.rand(n, generator=g).sqrt()  # uniform on the lateral surface
    a = torch.rand(n, generator=g) * 2 * math.pi
    p = torch.stack([h * torch.cos(a), 1 - 2 * h, h * torch.sin(a)], 1)
    base = torch.rand(n, generator=g) < 0.3
    d = _disk(n, g)
    p[base] = torch.stack([d[:, 0], -torch.ones(n), d[:, 1]], 1)[base]
    return p


def _torus(n, g, big=0.7, small=0.3):
    u, v = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    ring = big + small * torch.cos(v)
    return torch.stack([ring * torch.cos(u), small * torch.sin(v), ring * torch.sin(u)], 1)


def _pyramid(n, g):
    apex = torch.tensor([0.0, 1.0, 0.0])
    corners = torch.tensor([[-1.0, -1, -1], [1, -1, -1], [1, -1, 1], [-1, -1, 1]])
    face = torch.randint(0, 5, (n,), generator=g)
    u, v = torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    a, b = corners[face % 4], corners[(face + 1) % 4]
    p = apex + u * (a - apex) + v * (b - apex)
    base = face == 4
    p[base] = torch.stack([torch.rand(n, generator=g) * 2 - 1, -torch.ones(n), torch.rand(n, generator=g) * 2 - 1], 1)[base]
    return p


def _plane(n, g):
    p = torch.rand(n, 3, generator=g) * 2 - 1
    p[:, 1] = 0.0
    return p


def _capsule(n, g):
    p = _sphere(n, g) * 0.5
    p[:, 1] += torch.sign(p[:, 1]) * 0.5
    side = torch.rand(n, generator=g) < 0.5
    a, y = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) - 0.5
    p[side] = torch.stack([0.5 * torch.cos(a), y, 0.5 * torch.sin(a)], 1)[side]
    return p


SHAPES = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
          "pyramid": _pyramid, "plane": _plane, "capsule": _capsule}


class SyntheticShapes(Dataset):
    """Noisy surface samples of simple shapes (classes: SHAPES), generated on the fly.

    samples_per_class: clouds per class. num_points: points per cloud. noise: std of Gaussian noise
    after normalisation. seed: item i is the same for the same (seed, i); train and test use
    different seeds. Each cloud: per-axis scale U(0.6, 1.4), rotation about the up (y) axis, a small
    tilt, noise, then normalised into the unit sphere.
    """

    def __init__(self, samples_per_class: int = 50, num_points: int = 1024, noise: float = 0.02, seed: int = 0,
                 train: bool = True, augment=(), classes=None):
        self.classes = list(classes or SHAPES)
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise DataError(f"unknown synthetic shapes {unknown} (available: {', '.join(SHAPES)})")
        self.samples_per_class, self.num_points, self.noise = samples_per_class, num_points, noise
        self.seed, self.train, self.augment = seed, train, tuple(augment)

    def __len__(self) -> int:
        return self.samples_per_class * len(self.classes)

    def cloud(self, i: int) -> tuple[torch.Tensor, int]:
        label = i % len(self.classes)
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{i}".encode()))
        points = SHAPES[self.classes[label]](self.num_points, g) * (0.6 + 0.8 * torch.rand(3, generator=g))
        yaw, tilt = (torch.rand(2, generator=g) * torch.tensor([2 * math.pi, 0.4]) - torch.tensor([0.0, 0.2])).tolist()
        cy, sy, ct, st = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
        rot_y = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        rot_x = torch.tensor([[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]])
        points = normalize_unit_sphere(points @ rot_y.T @ rot_x.T)
        return normalize_unit_sphere(points + self.noise * torch.randn(points.shape, generator=g)), label

    def __getitem__(self, i: int):
        points, label = self.cloud(i)
        if self.train:
            points = augment(points, self.augment)
        return points, label


def build_point_datasets(cfg) -> tuple[Dataset, Dataset, int]:
    """(train, eval, num_classes) from a point data config (kind, root, variant, num_points, augment, ...)."""
    kind, n, aug = cfg.kind, cfg.num_points, tuple(cfg.augment)
    if kind == "synthetic":
        train = SyntheticShapes(cfg.samples_per_class, n, cfg.noise, cfg.seed, True, aug)
        test = SyntheticShapes(cfg.eval_samples_per_class, n, cfg.noise, cfg.seed + 1, False)
        return train, test, len(train.classes)
    if cfg.root is None:
        raise DataError(f"point data kind {kind!r} needs `root`")
    root = Path(cfg.root)
    if kind == "modelnet40":
        if any(root.glob("ply_data_train*.h5")):
            return modelnet40_h5(root, "train", n, augment=aug), modelnet40_h5(root, "test", n), 40
        return ModelNet40Resampled(root, "train", n, augment=aug), ModelNet40Resampled(root, "test", n), 40
    if kind == "scanobjectnn":
        variant = cfg.variant or "pb_t50_rs"
        return scanobjectnn(root, variant, "train", n, augment=aug), scanobjectnn(root, variant, "test", n), 15
    raise DataError(f"unknown point data kind {kind!r} (expected synthetic, modelnet40 or scanobjectnn)")
