"""Benchmark harness on a tiny ViT: outputs, figures, ratios, merge fields, errors. No timing is asserted."""
import json

import pytest
import torch

import petl_vision as pv
from petl_vision.bench import BenchOptions, Workload, get_workload, list_workloads, parse_method_arg, register_workload, run_benchmark
from petl_vision.bench.harness import resolve_methods
from petl_vision.bench.report import FIGURES, add_ratios, markdown_table

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
METHODS = ["linear", "full", "ssf", "vpt"]


def tiny_options(out_dir, **changes):
    values = dict(model="vit_tiny_patch16_224", model_kwargs=TINY_KWARGS, num_classes=5, methods=METHODS,
                  batch_size=2, steps=1, warmup=0, device="cpu", out_dir=str(out_dir))
    return BenchOptions(**{**values, **changes})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    return run_benchmark(tiny_options(out_dir, method_args={"vpt": {"num_prompts": 3}}), log=lambda _: None)


def test_outputs_exist_and_json_matches(report):
    files = report["files"]
    with open(files["json"]) as f:
        saved = json.load(f)
    assert [r["method"] for r in saved["methods"]] == METHODS
    assert saved["args"]["model_kwargs"] == TINY_KWARGS and saved["args"]["device"] == "cpu"
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["cpu_cores"] >= 1
    with open(files["chart"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(files["markdown"]) as f:
        table = f.read()
    assert table == report["markdown"]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(METHODS)  # header + one row per method
    assert all(row.count("|") == len(FIGURES) + 2 for row in rows)


def test_every_method_has_its_figures(report):
    for result in report["methods"]:
        assert result["error"] is None
        for key in ("trainable_params", "peak_train_memory_mib", "memory_before_train_mib", "train_step_ms", "infer_ms"):
            assert result[key] is not None and result[key] > 0, (result["method"], key)
        assert result["peak_train_memory_mib"] >= result["memory_before_train_mib"] > 0
        assert len(result["train_step_ms_all"]) == 1


def test_trainable_params_equal_summary(report):
    by_method = {r["method"]: r for r in report["methods"]}
    dim, classes, depth, patches = 32, 5, 2, (32 // 8) ** 2
    head = dim * classes + classes
    assert by_method["linear"]["trainable_params"] == head
    assert by_method["full"]["trainable_params"] == by_method["full"]["total_params"]
    assert by_method["vpt"]["trainable_params"] == head + depth * 3 * dim  # deep, 3 prompts (--method-arg)
    assert by_method["vpt"]["config"]["num_prompts"] == 3
    assert by_method["ssf"]["config"] == pv.SSFConfig().to_dict()
    assert by_method["full"]["total_params"] == by_method["linear"]["total_params"]
    assert by_method["full"]["total_params"] > head + dim * (patches + 1)


def test_ratios_to_full(report):
    by_method = {r["method"]: r for r in report["methods"]}
    for key, _, _ in FIGURES:
        if by_method["full"][key] is not None:
            assert by_method["full"]["ratio_to_full"][key] == 1.0, key
    linear = by_method["linear"]
    assert linear["ratio_to_full"]["trainable_params"] == linear["trainable_params"] / by_method["full"]["trainable_params"]
    assert "(1.00×)" in next(line for line in report["markdown"].splitlines() if line.startswith("| full |"))


def test_merged_inference_null_exactly_when_not_mergeable(report):
    for result in report["methods"]:
        mergeable = pv.get_method(result["method"]).mergeable
        assert result["mergeable"] is mergeable
        assert (result["infer_merged_ms"] is None) is (not mergeable), result["method"]
        assert (result["ratio_to_full"]["infer_merged_ms"] is None) is (not mergeable)
        if mergeable:
            assert result["merge_max_abs_diff"] < 1e-4, result["method"]
    vpt_row = next(line for line in report["markdown"].splitlines() if line.startswith("| vpt |"))
    assert vpt_row.rstrip().endswith("| — |")


def test_no_ratios_without_full(report):
    results = [dict(r) for r in report["methods"] if r["method"] != "full"]
    without_full = {**report, "methods": add_ratios(results)}
    assert all(r["ratio_to_full"] is None for r in without_full["methods"])
    assert "×" not in markdown_table(without_full).split("\n\n")[1]  # the table part


def test_unknown_method_lists_registered(tmp_path):
    with pytest.raises(pv.UnknownMethodError) as info:
        run_benchmark(tiny_options(tmp_path, methods=["linear", "nope"]))
    message = str(info.value)
    assert "'nope'" in message and all(name in message for name in pv.list_methods())
    assert not (tmp_path / "benchmark.json").exists()


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="--method-arg names method 'lora'"):
        run_benchmark(tiny_options(tmp_path, method_args={"lora": {"rank": 2}}))
    with pytest.raises(ValueError, match="--method-arg vpt: VPTConfig has no field"):
        run_benchmark(tiny_options(tmp_path, method_args={"vpt": {"prompts": 2}}))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_benchmark(tiny_options(tmp_path, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="unknown workload 'nope'; registered workloads: .*timm-classifier"):
        run_benchmark(tiny_options(tmp_path, workload="nope"))
    with pytest.raises(ValueError, match="expected METHOD.FIELD=VALUE"):
        parse_method_arg(["rank=4"])
    assert parse_method_arg(["lora.rank=4", "vpt.deep=false"]) == {"lora": {"rank": 4}, "vpt": {"deep": False}}


def test_default_methods_follow_registry_and_host():
    workload = get_workload("timm-classifier")("resnet10t", {"stem_width": 8, "channels": (8, 16, 24, 32)}, 5)
    names = resolve_methods(workload, None)
    model = workload.build_meta_model()
    expected = [n for n in pv.list_methods() if pv.get_method(n).input_kind == "image" and pv.get_method(n).supports(model)]
    assert names == expected and "vpt" not in names and "full" in names  # VPT needs tokens
    with pytest.raises(pv.UnsupportedHostError):
        resolve_methods(workload, ["vpt"])


def test_workload_registry_accepts_new_workloads():
    @register_workload
    class Points(Workload):
        name = "test-points"
        input_kind = "points"

        def build_model(self):
            return torch.nn.Linear(3, self.num_classes)

    assert "test-points" in list_workloads() and get_workload("test-points") is Points
    workload = Points("any", {}, 5)
    assert not workload.accepts(pv.get_method("ssf"), workload.build_meta_model())  # image method, points workload
    with pytest.raises(ValueError, match="already registered"):
        register_workload(type("Other", (Workload,), {"name": "test-points"}))


def test_script_arguments():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    opts = script.parse_args(["--methods", "linear,full", "ssf", "--model-kwargs", '{"img_size": 32}', "--method-arg", "vpt.num_prompts=3"])
    assert opts.methods == ["linear", "full", "ssf"] and opts.model_kwargs == {"img_size": 32}
    assert opts.method_args == {"vpt": {"num_prompts": 3}} and opts.device == "auto" and opts.out_dir is None
    assert script.parse_args([]).methods is None
    with pytest.raises(SystemExit):
        script.parse_args(["--model-kwargs", "[1]"])


def test_merged_and_unmerged_inference_are_timed_in_turns():
    from petl_vision.bench.worker import _timed_alternately

    calls = []
    (times_a, out_a), (times_b, out_b) = _timed_alternately(
        lambda: calls.append("a") or len(calls), lambda: calls.append("b") or len(calls), 1, 3, torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert len(times_a) == len(times_b) == 3
    assert (out_a, out_b) == (7, 8)


def test_merged_copy_leaves_the_timed_model_adapted():
    from petl_vision.bench.worker import _merged_copy

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.fc(x))

    model = Net()
    pv.apply(model, pv.SSFConfig(train_head=False))
    for p in model.petl.parameters():
        torch.nn.init.normal_(p)
    merged = _merged_copy(model)
    x = torch.randn(3, 4)
    assert not hasattr(merged, "petl") and hasattr(model, "petl")
    torch.testing.assert_close(merged(x), model(x))
