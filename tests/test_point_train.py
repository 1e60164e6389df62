"""scripts/train_pointcloud.py: 2-epoch runs on a few dozen synthetic clouds for IDPT and P2P."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

import petl_vision as pv
from petl_vision.data.pointcloud import SyntheticShapes
from petl_vision.train.config import ConfigError
from petl_vision.train.pointcloud import build_point_model, load_point_config

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["data.num_points=256", "data.samples_per_class=3", "data.eval_samples_per_class=1", "epochs=2",
             "batch_size=8", "eval_batch_size=8", "sched.warmup_epochs=1", "progress=false"]
RUNS = {
    "idpt": ["model_kwargs={num_group: 16, group_size: 16, dim: 32, depth: 2, num_heads: 2}", "method.k=4"],
    "p2p": ["model_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "method.k=8", "method.test_views=2", "method.graph_dim=16"],
}


def script():
    spec = importlib.util.spec_from_file_location("train_pointcloud", ROOT / "scripts" / "train_pointcloud.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_overrides_of_the_data_section():
    cfg = load_point_config(None, ["data.num_points=256", "data.augment=[jitter, rotate]", "data.noise=1e-2", "optim.lr=1.0e-3"])
    assert (cfg.data.num_points, cfg.data.augment, cfg.data.noise, cfg.train.optim.lr) == (256, ["jitter", "rotate"], 0.01, 1e-3)
    assert cfg.data.kind == "synthetic" and cfg.train.data.kind == "digits"  # `data` is the point section, not TrainConfig's
    for item, message in [("data.num_points=many", r"override 'data\.num_points=many': data\.num_points must be int"),
                          ("data.points=3", r"override 'data\.points=3': unknown key\(s\) \['data\.points'\]; valid: \['data\.augment'"),
                          ("data.kind.x=1", r"override 'data\.kind\.x=1': 'data\.kind' is not a section"),
                          ("epochs=2.5", r"override 'epochs=2\.5': epochs must be int"),
                          ("data.augment=[spin]", r"config: data\.augment \['spin'\] not among")]:
        with pytest.raises(ConfigError, match=message):
            load_point_config(None, [item])


@pytest.mark.parametrize("method", sorted(RUNS))
def test_two_epoch_script_run(method, tmp_path):
    config = ROOT / "configs" / f"pointcloud_synthetic_{method}.yaml"
    overrides = TINY_DATA + RUNS[method]
    result = script().main(["--config", str(config), f"--output-dir={tmp_path}", *overrides])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(0 <= r["top1"] <= 100 and "top5" in r for r in lines)
    assert lines[-1]["step"] == 2 * (3 * 8 // 8)  # 24 clouds, batch 8, 2 epochs
    assert (tmp_path / "checkpoints" / "epoch_2").is_dir() and (tmp_path / "config.yaml").is_file()
    # The saved adapter re-applies to a fresh backbone and reproduces the trained model.
    cfg = load_point_config(config, overrides)
    set_seed(cfg.train.seed)  # the run built its random backbone right after seeding
    fresh = build_point_model(cfg.train, num_classes=8)
    loaded = pv.load_adapter(fresh, tmp_path / "adapter").eval()
    trained = result["model"].eval()
    points = torch.stack([SyntheticShapes(1, 256, seed=9, train=False)[i][0] for i in range(2)])
    expected = trained(points)
    assert torch.allclose(loaded(points), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt", "full"])
def test_script_runs_vpt_and_full_on_the_point_transformer(method, tmp_path):
    config = ROOT / "configs" / "pointcloud_synthetic_idpt.yaml"
    overrides = [f"method={method}", "data.num_points=256", "data.samples_per_class=2", "data.eval_samples_per_class=1",
                 "epochs=1", "batch_size=8", "sched.warmup_epochs=0", "progress=false", RUNS["idpt"][0]]
    result = script().main(["--config", str(config), f"--output-dir={tmp_path}", *overrides])
    assert result["metrics"]["epoch"] == 1 and (tmp_path / "adapter" / "adapter.safetensors").is_file()
    dim, depth, classes = 32, 2, 8
    head = (2 * dim * 256 + 256) + 512 + (256 * 256 + 256) + 512 + (256 * classes + classes)
    expected = head + depth * 10 * dim if method == "vpt" else result["total_params"]  # VPT-deep, 10 prompts per block
    assert result["trainable_params"] == expected


def test_resume_continues_exactly(tmp_path):
    from petl_vision.train.pointcloud import train_pointcloud

    config = ROOT / "configs" / "pointcloud_synthetic_idpt.yaml"
    overrides = TINY_DATA + RUNS["idpt"]
    full = train_pointcloud(load_point_config(config, overrides + [f"output_dir={tmp_path / 'full'}"]))
    part = train_pointcloud(load_point_config(config, overrides + [f"output_dir={tmp_path / 'part'}"]), stop_after_epoch=1)
    assert part["stopped_early"] and part["adapter_dir"] is None
    resumed = train_pointcloud(load_point_config(config, overrides + [f"output_dir={tmp_path / 'part'}"]), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [2] and resumed["history"][0]["step"] == 2 * 3  # drop_last: 24 // 8
    assert resumed["history"][0]["train_loss"] == full["history"][1]["train_loss"]
    want, got = full["model"].state_dict(), resumed["model"].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
