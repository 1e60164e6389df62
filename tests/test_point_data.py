"""Point-cloud data: synthetic shapes, ModelNet40 (h5 and resampled), ScanObjectNN, augmentations, configs."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from petl_vision.data.common import DataError
from petl_vision.data.pointcloud import (
    SHAPES, ModelNet40Resampled, SyntheticShapes, modelnet40_h5, rotate_up, scale_translate, scanobjectnn,
)
from petl_vision.models.pointnet_ops import fps_points
from petl_vision.train.config import ConfigError
from petl_vision.train.pointcloud import load_point_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_synthetic_shapes_are_seeded_and_normalised():
    a, b = SyntheticShapes(3, 128, seed=5, train=False), SyntheticShapes(3, 128, seed=5, train=False)
    assert len(a) == 3 * len(SHAPES) and a.classes == list(SHAPES)
    for i in (0, 7, 13):
        (pa, la), (pb, lb) = a[i], b[i]
        assert pa.shape == (128, 3) and pa.dtype == torch.float32 and torch.equal(pa, pb) and la == lb == i % len(SHAPES)
        assert pa.norm(dim=1).max() <= 1 + 1e-5 and pa.mean(0).abs().max() < 1e-5
    assert not torch.equal(SyntheticShapes(3, 128, seed=6)[0][0], a[0][0])
    labels = [a[i][1] for i in range(len(a))]
    assert all(labels.count(c) == 3 for c in range(len(SHAPES)))
    plane = a[a.classes.index("plane")][0]
    assert torch.linalg.svdvals(plane - plane.mean(0))[-1] < 0.2 * torch.linalg.svdvals(plane - plane.mean(0))[0]  # flat


def test_augmentations():
    torch.manual_seed(0)
    points = torch.randn(50, 3)
    rotated = rotate_up(points)
    assert torch.allclose(rotated[:, 1], points[:, 1]) and torch.allclose(rotated.norm(dim=1), points.norm(dim=1), atol=1e-5)
    moved = scale_translate(points)
    scale = (moved[1] - moved[0]) / (points[1] - points[0])
    shift = moved[0] - points[0] * scale
    assert ((scale >= 2 / 3) & (scale <= 1.5)).all() and (shift.abs() <= 0.2 + 1e-6).all()


def write_h5(path, data, labels):
    h5py = pytest.importorskip("h5py")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["data"], f["label"] = data, labels


def test_modelnet40_h5(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 40, (7, 1)).astype(np.uint8)
    write_h5(tmp_path / "ply_data_train0.h5", data[:4], labels[:4])
    write_h5(tmp_path / "ply_data_train1.h5", data[4:6], labels[4:6])
    write_h5(tmp_path / "ply_data_test0.h5", data[6:], labels[6:])
    train, test = modelnet40_h5(tmp_path, "train", 16), modelnet40_h5(tmp_path, "test", 16)
    assert len(train) == 6 and len(test) == 1 and [train[i][1] for i in range(6)] == labels[:6, 0].tolist()
    assert torch.equal(test[0][0], fps_points(torch.from_numpy(data[6:]), 16)[0])  # evaluation: FPS
    pool = fps_points(torch.from_numpy(data[:1]), math.ceil(16 * 1200 / 1024))[0]  # training: 16 of the first 19
    sample = train[0][0]
    assert sample.shape == (16, 3) and all((pool == p).all(1).any() for p in sample)
    with pytest.raises(DataError, match="ply_data_val"):
        modelnet40_h5(tmp_path, "val", 16)


@pytest.mark.parametrize("variant,folder,suffix", [("obj_bg", "main_split", ""), ("obj_only", "main_split_nobg", ""),
                                                    ("pb_t50_rs", "main_split", "_augmentedrot_scale75")])
def test_scanobjectnn_variants(tmp_path, variant, folder, suffix):
    data = np.random.default_rng(1).standard_normal((3, 40, 3)).astype(np.float32)
    write_h5(tmp_path / folder / f"training_objectdataset{suffix}.h5", data, np.array([0, 14, 3]))
    write_h5(tmp_path / folder / f"test_objectdataset{suffix}.h5", data[:1], np.array([2]))
    train, test = scanobjectnn(tmp_path, variant, "train", 32), scanobjectnn(tmp_path, variant, "test", 32)
    assert [train[i][1] for i in range(3)] == [0, 14, 3] and test[0][1] == 2 and test[0][0].shape == (32, 3)
    with pytest.raises(DataError, match="variant 'hardest'"):
        scanobjectnn(tmp_path, "hardest", "train", 32)


def test_modelnet40_resampled_layout(tmp_path):
    (tmp_path / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\n")
    (tmp_path / "modelnet40_train.txt").write_text("airplane_0001\nbathtub_0002\n")
    (tmp_path / "modelnet40_test.txt").write_text("bathtub_0003\n")
    rng = np.random.default_rng(2)
    for name in ("airplane_0001", "bathtub_0002", "bathtub_0003"):
        (tmp_path / name.split("_")[0]).mkdir(exist_ok=True)
        points = rng.standard_normal((30, 6)).astype(np.float32) * 3 + 1
        if name == "bathtub_0002":
            np.save(tmp_path / "bathtub" / f"{name}.npy", points)
        else:
            np.savetxt(tmp_path / name.split("_")[0] / f"{name}.txt", points, delimiter=",")
    train, test = ModelNet40Resampled(tmp_path, "train", 16), ModelNet40Resampled(tmp_path, "test", 16)
    assert train.classes == ["airplane", "bathtub"] and [train[i][1] for i in range(2)] == [0, 1] and test[0][1] == 1
    full = test.load(0)
    assert full.shape == (30, 3) and abs(full.norm(dim=1).max().item() - 1) < 1e-5  # normalised into the unit sphere
    assert torch.equal(test[0][0], fps_points(full[None], 16)[0])


def test_point_config(tmp_path):
    cfg = load_point_config(CONFIGS / "pointcloud_synthetic_idpt.yaml", ["data.num_points=128", "optim.lr=0.01", "method.k=4"])
    assert cfg.data.num_points == 128 and cfg.train.optim.lr == 0.01 and cfg.train.method.overrides["k"] == 4
    assert cfg.train.method.name == "idpt" and cfg.train.optim.weight_decay == 0.05  # from configs/methods/idpt.yaml
    p2p = load_point_config(CONFIGS / "pointcloud_synthetic_p2p.yaml")
    assert p2p.train.method.name == "p2p" and p2p.train.label_smoothing == 0.2
    with pytest.raises(ConfigError, match="data.npoints"):
        load_point_config(None, ["data.npoints=3"])
    with pytest.raises(ConfigError, match="flip"):
        load_point_config(None, ["data.augment=[flip]"])
    with pytest.raises(ConfigError, match="idpt.*bogus"):
        load_point_config(None, ["method=idpt", "method.bogus=1"])
