"""save_adapter / load_adapter: file layout, atomicity, and one clear error per bad input."""
import json

import pytest
import safetensors.torch
import timm
import torch
from conftest import input_for, make_host, perturb_trainable

import petl_vision as pv
from petl_vision.core import io


@pytest.fixture
def saved(tmp_path):
    model = pv.apply(make_host("vit"), "ssf")
    with torch.no_grad():
        model.blocks[0].norm1.scale.add_(1.0)
    pv.save_adapter(model, tmp_path / "ssf")
    return model, tmp_path / "ssf"


def untouched(model):
    return not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())


def header_meta(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["petl_vision"])


def rewrite_header(path, edit):
    """Rewrite the petl_vision metadata in the header of `path` with `edit(meta)` (tensors kept)."""
    meta, tensors = header_meta(path), safetensors.torch.load_file(path)
    edit(meta)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "petl_vision": json.dumps(meta)})


def save_format1(model, directory):
    """An adapter folder as petl_vision 0.1 wrote it: our adapter_config.json + a plain weights file."""
    directory.mkdir(parents=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in io.adapter_state_dict(model).items()}
    safetensors.torch.save_file(tensors, directory / "adapter.safetensors", metadata={"format": "pt"})
    state = model.petl
    meta = {
        "format_version": 1,
        "methods": [{"name": a.name, "config": a.config.to_dict()} for a in state.applied],
        "host": {"class": state.host_class, "fingerprint": pv.core.state.fingerprint(state.host_shapes), "shapes": state.host_shapes},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "sha256": io.file_sha256(directory / "adapter.safetensors"),
    }
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    return directory


def test_files_and_contents(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter.safetensors", "petl_adapter.json"]
    meta = json.loads((directory / "petl_adapter.json").read_text())
    assert [m["name"] for m in meta["methods"]] == ["ssf"] and meta["methods"][0]["config"]["init_std"] == 0.02
    assert meta["host"]["class"] == "timm.models.vision_transformer.VisionTransformer"
    assert meta["base_model"] == {"library": "timm", "name": "vit_tiny_patch16_224", "tag": "augreg_in21k_ft_in1k",
                                  "hf_hub_id": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"}
    tensors = safetensors.torch.load_file(directory / "adapter.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable == set(meta["tensors"])
    # the header holds the same metadata: the weights file alone is the adapter
    assert header_meta(directory / "adapter.safetensors") == {k: v for k, v in meta.items() if k != "tensors"}


def test_load_the_weights_file_itself(saved):
    model, directory = saved
    (directory / "petl_adapter.json").unlink()
    fresh = pv.load_adapter(make_host("vit"), directory / "adapter.safetensors")
    assert torch.equal(fresh(input_for("vit")), model(input_for("vit")))


def test_format1_folders_still_load(tmp_path):
    model = perturb_trainable(pv.apply(make_host("vit"), "ssf"))
    directory = save_format1(model, tmp_path / "old")
    for path in (directory, directory / "adapter.safetensors", directory / "adapter_config.json"):
        assert torch.equal(pv.load_adapter(make_host("vit"), path)(input_for("vit")), model(input_for("vit")))
    path = directory / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: contents do not match the sha256 in .*adapter_config.json"):
        pv.load_adapter(make_host("vit"), directory)
    # a new save over an old folder leaves no format-1 config behind
    pv.save_adapter(model, directory)
    assert not (directory / "adapter_config.json").exists()
    assert torch.equal(pv.load_adapter(make_host("vit"), directory)(input_for("vit")), model(input_for("vit")))


def test_wrong_backbone(saved):
    _, directory = saved
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5)
    with pytest.raises(pv.AdapterMismatchError, match=r"adapter.safetensors: adapter was trained on a different backbone.*shape"):
        pv.load_adapter(other, directory)
    assert untouched(other)
    with pytest.raises(pv.AdapterMismatchError, match=r"class timm.models.resnet.ResNet"):
        pv.load_adapter(make_host("resnet"), directory)
    more_classes = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    with pytest.raises(pv.AdapterMismatchError, match=r"this model differs: shape head.bias: \[7\] vs \[5\], head.weight: \[7, 32\] vs \[5, 32\] \(shapes: this model.s vs the adapter.s\)"):
        pv.load_adapter(more_classes, directory)


def test_fingerprint_mismatch_always_says_what_differs(saved):
    _, directory = saved
    rewrite_header(directory / "adapter.safetensors", lambda meta: meta["host"].update(fingerprint="0" * 64))
    with pytest.raises(pv.AdapterMismatchError, match="this model differs: the same names and shapes as recorded, but the recorded fingerprint differs"):
        pv.load_adapter(make_host("vit"), directory)


def test_missing_file(saved):
    _, directory = saved
    (directory / "adapter.safetensors").unlink()
    model = make_host("vit")
    with pytest.raises(FileNotFoundError, match="adapter.safetensors: no such file"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such adapter folder"):
        pv.load_adapter(make_host("vit"), tmp_path / "nowhere")


def test_truncated_weights(saved):
    _, directory = saved
    path = directory / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    model = make_host("vit")
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: not a readable safetensors file"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_changed_tensor_bytes_fail_the_checksum(saved):
    _, directory = saved
    path = directory / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    model = make_host("vit")
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: tensors do not match the sha256 in its header"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_foreign_and_garbage_files(saved, tmp_path):
    _, directory = saved
    path = directory / "adapter.safetensors"
    path.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: not a readable safetensors file"):
        pv.load_adapter(make_host("vit"), directory)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(pv.AdapterFileError, match="model.pt: not an adapter file"):
        pv.load_adapter(make_host("vit"), tmp_path / "model.pt")
    # a safetensors file with no petl_vision metadata and no adapter_config.json beside it
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: no such file"):
        pv.load_adapter(make_host("vit"), directory)


def test_corrupt_legacy_config(tmp_path):
    directory = save_format1(pv.apply(make_host("vit"), "ssf"), tmp_path / "old")
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(pv.AdapterFileError, match="adapter_config.json: not valid JSON"):
        pv.load_adapter(make_host("vit"), directory)
    (directory / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(pv.AdapterFileError, match="adapter_config.json: not a petl_vision adapter config"):
        pv.load_adapter(make_host("vit"), directory)


def _set(*keys, value):
    def edit(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


BAD_FIELDS = {
    "train_head_abc": (_set("methods", 0, "config", "train_head", value="abc"),
                       r"field 'methods\[0\].config' \(ssf\): method 'ssf': field 'train_head' must be true or false, got 'abc'"),
    "init_std_string": (_set("methods", 0, "config", "init_std", value="abc"), r"field 'methods\[0\].config' \(ssf\): method 'ssf': field 'init_std' must be a number"),
    "null_config": (_set("methods", 0, "config", value=None), r"field 'methods\[0\].config' must be an object of config fields, got None"),
    "null_methods": (_set("methods", value=None), r"field 'methods' must be a non-empty list"),
    "empty_methods": (_set("methods", value=[]), r"field 'methods' must be a non-empty list"),
    "method_not_object": (_set("methods", 0, value="ssf"), r"field 'methods\[0\]' must be an object"),
    "method_name_int": (_set("methods", 0, "name", value=3), r"field 'methods\[0\].name' must be a method name"),
    "missing_name": (_drop("methods", 0, "name"), r"missing field 'methods\[0\].name'"),
    "missing_config": (_drop("methods", 0, "config"), r"missing field 'methods\[0\].config'"),
    "listed_twice": (lambda meta: meta["methods"].append(meta["methods"][0]), r"field 'methods\[1\].name': method 'ssf' is listed twice"),
    "unknown_method": (_set("methods", 0, "name", value="magic"), r"field 'methods\[0\].name': unknown method 'magic'; registered methods"),
    "unknown_field": (_set("methods", 0, "config", "rank", value=3), r"field 'methods\[0\].config' \(ssf\): SSFConfig has no field\(s\) \['rank'\]"),
    "host_null": (_set("host", value=None), r"field 'host' must be an object"),
    "host_class_int": (_set("host", "class", value=1), r"field 'host.class' must be a class name"),
    "missing_fingerprint": (_drop("host", "fingerprint"), r"missing field 'host.fingerprint'"),
    "bad_fingerprint": (_set("host", "fingerprint", value="xyz"), r"field 'host.fingerprint' must be a sha256 hex digest"),
    "shapes_list": (_set("host", "shapes", value=[1]), r"field 'host.shapes' must be a mapping"),
    "shape_strings": (_set("host", "shapes", "head.weight", value=["5", 32]), r"field 'host.shapes.head.weight' must be a list of non-negative integers"),
    "missing_checksum": (_drop("tensors_sha256"), r"missing field 'tensors_sha256'"),
    "checksum_null": (_set("tensors_sha256", value=None), r"field 'tensors_sha256' must be a sha256 hex digest"),
    "base_model_list": (_set("base_model", value=[1]), r"field 'base_model' must be null or an object"),
    "version_string": (_set("format_version", value="2"), r"field 'format_version' is '2'; this petl_vision reads 2"),
    "missing_methods": (_drop("methods"), r"not a petl_vision adapter config \(missing fields \['methods'\]\)"),
    "not_object": (lambda meta: meta.clear() or meta.update(x=1), r"not a petl_vision adapter config \(missing fields \['format_version', 'host', 'methods'\]\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_every_metadata_field_is_checked(saved, case):
    _, directory = saved
    edit, match = BAD_FIELDS[case]
    rewrite_header(directory / "adapter.safetensors", edit)
    model = make_host("vit")
    with pytest.raises(pv.AdapterFileError, match=r"adapter.safetensors: " + match):
        pv.load_adapter(model, directory)
    assert untouched(model)


@pytest.mark.parametrize("case", ["train_head_abc", "listed_twice", "null_config", "missing_fingerprint"])
def test_every_legacy_config_field_is_checked(tmp_path, case):
    directory = save_format1(pv.apply(make_host("vit"), "ssf"), tmp_path / "old")
    meta = json.loads((directory / "adapter_config.json").read_text())
    edit, match = BAD_FIELDS[case]
    edit(meta)
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(pv.AdapterFileError, match=r"adapter_config.json: " + match):
        pv.load_adapter(make_host("vit"), directory)


def test_header_that_is_not_json(saved):
    _, directory = saved
    path = directory / "adapter.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata={"petl_vision": "{oops"})
    with pytest.raises(pv.AdapterFileError, match="adapter.safetensors: the petl_vision metadata in its header is not valid JSON"):
        pv.load_adapter(make_host("vit"), directory)


def test_tensors_not_matching_methods_fail_before_touching_the_model(saved):
    _, directory = saved
    # The file's tensors disagree with what the methods create (fewer SSF layers).
    rewrite_header(directory / "adapter.safetensors", _set("methods", 0, "config", "target_modules", value="norm"))
    model = make_host("vit")
    with pytest.raises(pv.AdapterMismatchError, match="adapter.safetensors: tensors do not fit.*unexpected"):
        pv.load_adapter(model, directory)
    assert untouched(model)


def test_load_onto_adapted_model_is_refused(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="already has methods"):
        pv.load_adapter(pv.apply(make_host("vit"), "linear"), directory)


def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch):
    model, directory = saved
    x = input_for("vit")
    expected = model(x)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half-written")
        raise KeyboardInterrupt

    with torch.no_grad():
        model.blocks[0].norm1.scale.add_(5.0)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pv.save_adapter(model, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter.safetensors", "petl_adapter.json"]
    assert torch.equal(pv.load_adapter(make_host("vit"), directory)(x), expected)


def test_save_without_methods_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="call pv.apply first"):
        pv.save_adapter(make_host("vit"), tmp_path)


def test_vpt_and_lora_round_trip(tmp_path):
    for method in ["vpt", "lora"]:
        model = pv.apply(make_host("vit"), method)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        pv.save_adapter(model, tmp_path / method)
        fresh = pv.load_adapter(make_host("vit"), tmp_path / method)
        assert torch.equal(fresh(input_for("vit")), model(input_for("vit")))
