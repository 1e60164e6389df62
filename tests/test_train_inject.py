"""train() on a model and data it is given: same run as a built one, drop_last, baseline, config record."""
import copy

import pytest
import timm
import torch
import yaml
from accelerate.utils import set_seed
from test_train import TINY, image_root, tiny_config  # noqa: F401  (image_root is a fixture)
from torch.utils.data import TensorDataset

from petl_vision.data import build_datasets
from petl_vision.train import build_model, load_config, train


def tensor_data(n_train=10, n_eval=6, classes=3):
    """(train, eval, classes) of random 32x32 images with labels."""
    g = torch.Generator().manual_seed(0)
    make = lambda n: TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g))  # noqa: E731
    return make(n_train), make(n_eval), classes


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2)


def test_injected_model_and_data_train_like_built_ones(image_root, tmp_path):  # noqa: F811
    extra = ("method.name=ssf", "num_classes=3", "data.augment=true")
    built = train(tiny_config(image_root, tmp_path / "built", *extra))
    cfg = tiny_config(image_root, tmp_path / "given", *extra)
    set_seed(cfg.seed)  # the contract: seed, then build, then train() (which does not seed again)
    model = build_model(cfg)
    given = train(cfg, model=model, data=build_datasets(cfg.data, model, cfg.num_classes))
    want, got = built["model"].state_dict(), given["model"].state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [h["train_loss"] for h in given["history"]] == [h["train_loss"] for h in built["history"]]
    assert given["adapter_dir"] and given["baseline"] is None and not given["stopped_early"]


def test_model_and_data_go_together(tmp_path):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="together"):
        train(cfg, model=tiny_vit())


@pytest.mark.parametrize("drop_last, steps_per_epoch", [(True, 2), (False, 3)])
def test_drop_last_baseline_and_config_record(tmp_path, capsys, drop_last, steps_per_epoch):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "method.name=linear", "optim.lr=0.05"])
    train_ds, eval_ds, classes = tensor_data()  # 10 training samples, batch 4
    model = tiny_vit()
    before = copy.deepcopy(model).eval()
    result = train(cfg, model=model, data=(train_ds, eval_ds, classes), drop_last=drop_last, baseline="untrained",
                   config_record={"data": {"kind": "tensors", "n": 10}})
    assert [h["step"] for h in result["history"]] == [steps_per_epoch, 2 * steps_per_epoch]
    # The baseline is the model before the method was applied and before any step.
    images, labels = eval_ds.tensors
    with torch.no_grad():
        logits = before(images)
    expected_top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    assert result["baseline"]["top1"] == pytest.approx(expected_top1)
    assert result["baseline"]["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert f"untrained: top1 {expected_top1:.2f}" in capsys.readouterr().out
    assert not torch.equal(result["model"].head.weight, before.head.weight)  # the injected model trained
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["data"] == {"kind": "tensors", "n": 10} and written["epochs"] == 2 and written["method"] == {"name": "linear"}
