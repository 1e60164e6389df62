"""Data: image folders, VTAB-1k lists, digits, transforms, and the errors for bad inputs."""
import numpy as np
import pytest
import timm
from PIL import Image

from petl_vision.data import DataError, ImageFolder, VTABList, build_datasets, build_transform, load_digits_splits, load_rgb


def write_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def make_folder(root, classes=("cat", "dog", "emu"), per_class=6):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i}.png", value=40 * c + i)
    return root


def make_vtab(root, task="cifar", n_classes=3):
    """<root>/<task>/images/<split>/<i>.png and the four list files."""
    task_dir = root / task
    sizes = {"train800": 6, "val200": 3, "test": 4}
    lines = {}
    for split, n in sizes.items():
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i}.png"
            write_png(task_dir / rel, value=i)
            lines[split].append(f"{rel} {i % n_classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (task_dir / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return task_dir


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=3)


def test_image_folder_labels(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "train"))
    assert ds.classes == ["cat", "dog", "emu"]
    assert len(ds) == 18 and ds.num_classes == 3
    assert [label for _, label in ds.samples] == [0] * 6 + [1] * 6 + [2] * 6
    img, label = ds[7]
    assert label == 1 and img.mode == "RGB" and img.size == (32, 32)


def test_vtab_lists(tmp_path):
    task_dir = make_vtab(tmp_path)
    expected = {"train800": 6, "val200": 3, "train800val200": 9, "test": 4}
    for split, n in expected.items():
        ds = VTABList(tmp_path, "cifar", split)
        assert len(ds) == n and ds.num_classes == 3
    ds = VTABList(tmp_path, "cifar", "val200", num_classes=5)
    assert ds.samples[1] == (task_dir / "images/val200/1.png", 1)
    assert ds.num_classes == 5
    img, label = ds[2]
    assert label == 2 and img.size == (32, 32)


def test_transform_and_build(tmp_path):
    model = tiny_vit()
    x = build_transform(model, train=False)(Image.new("RGB", (8, 8)))
    assert x.shape == (3, 32, 32)
    assert build_transform(model, train=True, augment=True)(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", per_class=2)
    train_ds, eval_ds, n = build_datasets({"kind": "imagefolder", "root": str(tmp_path)}, model)
    assert n == 3 and len(eval_ds) == 6 and train_ds[0][0].shape == (3, 32, 32)
    make_vtab(tmp_path / "vtab")
    train_ds, eval_ds, n = build_datasets({"kind": "vtab", "root": str(tmp_path / "vtab"), "task": "cifar"}, model)
    assert (len(train_ds), len(eval_ds), n) == (9, 4, 3)
    with pytest.raises(DataError, match="unknown data kind 'nope'"):
        build_datasets({"kind": "nope"}, model)


def test_digits_split():
    train, test = load_digits_splits(test_fraction=0.3, seed=0)
    assert len(train) + len(test) == 1797 and abs(len(test) - 539) <= 1
    assert sorted(set(test.targets)) == list(range(10))
    img, _ = train[0]
    assert img.mode == "RGB" and img.size == (8, 8)
    again, _ = load_digits_splits(test_fraction=0.3, seed=0)
    assert np.array_equal(again.images, train.images)
    assert int(train.images.max()) == 255


# ----------------------------------------------------------------------------- bad inputs


def test_missing_root(tmp_path):
    with pytest.raises((DataError, FileNotFoundError), match="nowhere"):
        ImageFolder(tmp_path / "nowhere")


def test_no_class_folders(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "root")


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "train")
    (root / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        ImageFolder(root)


def test_corrupt_image(tmp_path):
    root = make_folder(tmp_path / "train")
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    ds = ImageFolder(root)
    index = [str(p) for p, _ in ds.samples].index(str(root / "dog" / "bad.png"))
    with pytest.raises(DataError, match="bad.png"):
        ds[index]


def test_malformed_line(tmp_path):
    task_dir = make_vtab(tmp_path)
    (task_dir / "test.txt").write_text("images/test/0.png 0\nimages/test/1.png\n")
    with pytest.raises(DataError, match=r"test\.txt:2"):
        VTABList(tmp_path, "cifar", "test")
    (task_dir / "test.txt").write_text("images/test/0.png zero\n")
    with pytest.raises(DataError, match=r"test\.txt:1.*'zero'"):
        VTABList(tmp_path, "cifar", "test")


def test_label_out_of_range(tmp_path):
    make_vtab(tmp_path)
    with pytest.raises(DataError, match=r"train800\.txt:3: label 2 out of range.*< 2"):
        VTABList(tmp_path, "cifar", "train800", num_classes=2)


def test_missing_list_and_split(tmp_path):
    task_dir = make_vtab(tmp_path)
    (task_dir / "val200.txt").unlink()
    with pytest.raises(DataError, match=r"val200\.txt"):
        VTABList(tmp_path, "cifar", "val200")
    with pytest.raises(DataError, match="unknown VTAB split 'train1000'"):
        VTABList(tmp_path, "cifar", "train1000")
    with pytest.raises(DataError, match="svhn"):
        VTABList(tmp_path, "svhn", "test")


def test_missing_image(tmp_path):
    task_dir = make_vtab(tmp_path)
    (task_dir / "images/test/3.png").unlink()
    with pytest.raises(DataError, match=r"test\.txt.*images/test/3\.png \(line 4\)"):
        VTABList(tmp_path, "cifar", "test")


def test_mismatched_class_folders(tmp_path):
    make_folder(tmp_path / "train", per_class=1)
    make_folder(tmp_path / "val", classes=("cat", "dog", "eagle"), per_class=1)
    with pytest.raises(DataError, match=r"class folders differ.*only in train/: 'emu'; only in val/: 'eagle'"):
        build_datasets({"kind": "imagefolder", "root": str(tmp_path)}, tiny_vit())
    make_folder(tmp_path / "val", classes=("emu",), per_class=1)
    with pytest.raises(DataError, match=r"only in train/: none; only in val/: 'eagle'"):
        build_datasets({"kind": "imagefolder", "root": str(tmp_path)}, tiny_vit())


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = make_folder(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    write_png(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    write_png(root / "cat" / ".hidden.png")
    write_png(root / "dog" / "sub" / ".cache" / "x.png")
    write_png(root / "dog" / "sub" / "2.png")  # a visible sub-folder still counts
    write_png(root / ".ipynb_checkpoints" / "0.png")  # a hidden class folder
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    ds = ImageFolder(root)
    assert ds.classes == ["cat", "dog"]
    assert sorted(str(p.relative_to(root)) for p, _ in ds.samples) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/sub/2.png"]


def test_hidden_captioned_images_are_skipped(tmp_path):
    from petl_vision.data.captions import read_captions

    write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a square")
    write_png(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")  # no caption: would be refused if it were read
    (tmp_path / ".ipynb_checkpoints" / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    assert [(p.name, c) for p, c in read_captions(tmp_path)] == [("a.png", ["a square"])]


def test_worker_error_is_one_line_naming_the_file(tmp_path):
    from torch.utils.data import DataLoader

    root = make_folder(tmp_path / "train", classes=("cat",), per_class=1)
    (root / "cat" / "bad.png").write_bytes(b"not a png")
    loader = DataLoader(ImageFolder(root, transform=build_transform(tiny_vit(), train=False)), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"cannot read image {root / 'cat' / 'bad.png'}") and message.endswith("(in DataLoader worker process 0)")


def test_decompression_bomb_is_a_data_error(tmp_path):
    from test_script_errors import bomb_png

    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(DataError, match=r"bomb\.png is too large to open safely.*MAX_IMAGE_PIXELS"):
        load_rgb(tmp_path / "bomb.png")


def test_binary_list_file(tmp_path):
    task_dir = make_vtab(tmp_path)
    (task_dir / "test.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataError, match=r"test\.txt: not a text file"):
        VTABList(tmp_path, "cifar", "test")
