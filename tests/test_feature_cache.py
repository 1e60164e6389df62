"""Feature cache: training from the cache equals training without it; stale caches are rebuilt."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_host
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import petl_vision as pv
from petl_vision.data.folder import ImageFolder
from petl_vision.data.transforms import build_transform
from petl_vision.methods._feature_cache import (
    FeatureCache,
    IndexedDataset,
    cache_key,
    side_features,
    side_forward_from_cache,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NUM, BATCH, EPOCHS = 8, 4, 3


def random_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(NUM, 3, 32, 32, generator=g), torch.randint(0, 5, (NUM,), generator=g))


def batches(epoch):
    """The same shuffled order for both runs: (NUM / BATCH) index batches per epoch."""
    return torch.randperm(NUM, generator=torch.Generator().manual_seed(epoch)).view(-1, BATCH)


def setup(method):
    model = pv.apply(make_host("vit"), method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def step(optimizer, loss):
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train_plain(method, data):
    model, optimizer = setup(method)
    return [step(optimizer, F.cross_entropy(model(data[idx][0]), data[idx][1])) for e in range(EPOCHS) for idx in batches(e)]


def train_cached(method, data, directory, dtype):
    """The trainer's cached loop: epoch 1 runs the backbone and fills the cache, later epochs read it."""
    model, optimizer = setup(method)
    backbone_calls = []
    model.blocks[0].register_forward_hook(lambda *args: backbone_calls.append(1))
    cache = FeatureCache(directory, cache_key(model, data, transform=None, data_id="random-8"), len(data), dtype=dtype)
    losses, calls_per_epoch = [], []
    for epoch in range(EPOCHS):
        for idx in batches(epoch):
            if cache.has(idx):
                features = cache.read(idx)
            else:
                images, labels = data[idx]
                features = {**side_features(model, images), "target": labels}
                cache.write(idx, features)
            logits = side_forward_from_cache(model, features)
            losses.append(step(optimizer, F.cross_entropy(logits, features["target"])))
        calls_per_epoch.append(len(backbone_calls))
    assert cache.is_complete()
    return losses, calls_per_epoch


@pytest.mark.parametrize("method", ["lst", "unipt"])
def test_cached_training_gives_the_same_losses(method, tmp_path):
    data = random_data()
    plain = train_plain(method, data)
    exact, calls = train_cached(method, data, tmp_path / "fp32", "float32")
    assert calls == [NUM // BATCH] * EPOCHS  # the backbone ran in the first epoch only
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-6)
    half, _ = train_cached(method, data, tmp_path / "fp16", "float16")
    torch.testing.assert_close(half[:NUM // BATCH], plain[:NUM // BATCH], rtol=1e-5, atol=1e-6)  # epoch 1: no rounding yet
    torch.testing.assert_close(half, plain, rtol=0, atol=2e-3)
    assert np.load(tmp_path / "fp16" / "hidden.npy", mmap_mode="r").dtype == np.float16
    assert np.load(tmp_path / "fp16" / "target.npy", mmap_mode="r").dtype == np.int64


def test_layout_and_dataset_view(tmp_path):
    model = pv.apply(make_host("vit"), "unipt")
    data = random_data()
    cache = FeatureCache(tmp_path / "c", cache_key(model, data, transform=None, data_id="x"), NUM)
    assert cache.status == "new" and not cache.is_complete()
    loader = DataLoader(IndexedDataset(data), batch_size=3)
    for idx, images, labels in loader:
        cache.write(idx, {**side_features(model, images), "target": labels})
    assert cache.is_complete()
    # (B, L + 1, N, D): embedding output + 2 blocks, CLS + 16 patches, width 32; pooled (B, D)
    assert cache.fields["hidden"]["shape"] == [3, 17, 32] and cache.fields["pooled"]["shape"] == [32]
    batch = next(iter(DataLoader(cache.dataset(), batch_size=NUM)))
    read = cache.read(range(NUM))
    assert set(batch) == {"hidden", "pooled", "target"}
    assert all(torch.equal(batch[k], read[k]) for k in read)
    assert read["hidden"].dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(side_forward_from_cache(model, read), model(data.tensors[0]), rtol=2e-2, atol=2e-2)


def make_folder(root, seed=0):
    g = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(g.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def fill(cache, model, data):
    for idx, images, labels in DataLoader(IndexedDataset(data), batch_size=2):
        cache.write(idx, {**side_features(model, images), "target": labels})


def test_stale_cache_is_detected_and_rebuilt(tmp_path):
    make_folder(tmp_path / "data")
    model = pv.apply(make_host("vit"), "lst")
    data = ImageFolder(tmp_path / "data", transform=build_transform(model, train=False))
    directory = tmp_path / "cache"
    cache = FeatureCache(directory, cache_key(model, data), len(data))
    fill(cache, model, data)
    stored = cache.read(range(len(data)))["hidden"]

    same = FeatureCache(directory, cache_key(model, data), len(data))
    assert same.status == "reused" and same.is_complete() and torch.equal(same.read(range(4))["hidden"], stored)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the host's head is not read by the side network: still valid
    assert FeatureCache(directory, cache_key(model, data), len(data)).status == "reused"

    def expect_rebuilt(key):
        cache = FeatureCache(directory, key, len(data))
        assert cache.status == "rebuilt" and not cache.is_complete() and not cache.has([0])
        with pytest.raises(ValueError, match="not in the cache yet"):
            cache.read([0])
        fill(cache, model, data)
        assert cache.is_complete()
        return cache

    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] += 1e-3  # one backbone weight changed
    rebuilt = expect_rebuilt(cache_key(model, data))
    assert not torch.equal(rebuilt.read(range(4))["hidden"][:, 2], stored[:, 2])  # new features, not the old ones

    resized = build_transform(model, train=False, input_size=24)  # other preprocessing
    other = FeatureCache(directory, cache_key(model, data, transform=resized), len(data))
    assert other.status == "rebuilt" and not other.is_complete() and other.fields == {}
    expect_rebuilt(cache_key(model, data))  # and back: the cache for the first transform is gone too

    path = tmp_path / "data" / "a" / "0.png"  # same file list, one image changed
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    expect_rebuilt(cache_key(model, ImageFolder(tmp_path / "data", transform=data.transform)))
    assert FeatureCache(directory, cache_key(model, data), len(data), dtype="float32").status == "rebuilt"


def test_refuses_what_it_cannot_key(tmp_path):
    model = pv.apply(make_host("vit"), "lst")
    make_folder(tmp_path / "data")
    augmented = ImageFolder(tmp_path / "data", transform=build_transform(model, train=True, augment=True))
    with pytest.raises(ValueError, match="random augmentation \\(Random"):
        cache_key(model, augmented)
    with pytest.raises(ValueError, match="cannot fingerprint a TensorDataset.*data_id"):
        cache_key(model, random_data(), transform=None)
    assert cache_key(model, random_data(), transform=None, data_id="v1")["data"] == "id:v1:len=8"
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureCache(tmp_path / "c", {}, 4, dtype="bfloat16")
    with pytest.raises(ValueError, match="no side network"):
        side_features(pv.apply(make_host("vit"), "ssf"), torch.zeros(1, 3, 32, 32))
