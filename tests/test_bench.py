"""Benchmark harness on a tiny ViT: outputs, figures, floor, spread, ratios, compile, errors. No timing is asserted."""
import json

import pytest
import torch

import petl_vision as pv
from petl_vision.bench import BenchOptions, Workload, get_workload, list_workloads, parse_method_arg, register_workload, run_benchmark
from petl_vision.bench import worker
from petl_vision.bench.footprint import op_counts, saved_bytes
from petl_vision.bench.harness import check_value, resolve_methods
from petl_vision.bench.report import COLUMNS, FIGURES, add_ratios, markdown_table

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
METHODS = ["floor", "linear", "full", "ssf", "vpt"]
STEPS, BATCH = 2, 2


def tiny_options(out_dir, **changes):
    values = dict(model="vit_tiny_patch16_224", model_kwargs=TINY_KWARGS, num_classes=5, methods=METHODS,
                  batch_size=BATCH, steps=STEPS, warmup=0, device="cpu", out_dir=str(out_dir))
    return BenchOptions(**{**values, **changes})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every method in a process of its own, as scripts/benchmark.py runs them."""
    out_dir = tmp_path_factory.mktemp("bench")
    return run_benchmark(tiny_options(out_dir, method_args={"vpt": {"num_prompts": 3}}), log=lambda _: None)


def by_method(report):
    return {r["method"]: r for r in report["methods"]}


def test_outputs_exist_and_json_matches(report):
    files = report["files"]
    with open(files["json"]) as f:
        saved = json.load(f)
    assert [r["method"] for r in saved["methods"]] == METHODS
    assert saved["args"]["model_kwargs"] == TINY_KWARGS and saved["args"]["device"] == "cpu"
    assert saved["args"]["compile"] is False and saved["args"]["compile_backend"] == "inductor"
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["cpu_cores"] >= 1
    with open(files["chart"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(files["markdown"]) as f:
        table = f.read()
    assert table == report["markdown"]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(METHODS)  # header + one row per method
    assert all(row.count("|") == len(COLUMNS) + 2 for row in rows)
    assert "Step / floor" in rows[0] and "Saved for backward (MiB)" in rows[0] and "aten ops / step" in rows[0]
    assert ", eager; median of 2 steps (perf_counter) after 0 warm-up" in table


def test_every_method_has_its_figures_and_spread(report):
    for result in report["methods"]:
        name = result["method"]
        assert result["error"] is None and result["compiled"] is False
        for key in ("peak_train_memory_mib", "memory_before_train_mib", "train_step_ms", "infer_ms", "train_images_per_s",
                    "infer_images_per_s", "aten_ops_per_step"):
            assert result[key] is not None and result[key] > 0, (name, key)
        assert result["peak_train_memory_mib"] >= result["memory_before_train_mib"] > 0
        for key in ("train_step_ms", "infer_ms"):
            times, spread = result[f"{key}_all"], result[f"{key}_spread"]
            assert len(times) == STEPS
            assert spread == {"min": min(times), "median": sum(times) / 2, "max": max(times)}
            assert result[key] == spread["median"]
        assert result["train_images_per_s"] == pytest.approx(1000.0 * BATCH * STEPS / sum(result["train_step_ms_all"]))
        assert result["infer_images_per_s"] == pytest.approx(1000.0 * BATCH * STEPS / sum(result["infer_ms_all"]))
        assert result["train_warmup"] == {"steps": 0, "steady": None}  # CPU: exactly --warmup steps
    rows = [line for line in report["markdown"].splitlines() if line.startswith("| ")][1:]
    assert all(" [" in row and "–" in row for row in rows)  # the min–max spread is shown


def test_floor_is_the_frozen_forward(report):
    results = by_method(report)
    floor, full, linear = results["floor"], results["full"], results["linear"]
    assert floor["trainable_params"] == 0 and floor["total_params"] == full["total_params"]
    assert floor["config"] == {} and floor["mergeable"] is False and floor["infer_merged_ms"] is None
    assert floor["saved_for_backward_mib"] == 0  # no autograd graph
    assert floor["aten_ops_per_step"] < linear["aten_ops_per_step"] < full["aten_ops_per_step"]
    for result in report["methods"]:
        ratios = result["ratio_to_floor"]
        assert ratios["train_step_ms"] == result["train_step_ms"] / floor["train_step_ms"]
        assert ratios["aten_ops_per_step"] == result["aten_ops_per_step"] / floor["aten_ops_per_step"]
    assert floor["ratio_to_floor"]["train_step_ms"] == 1.0
    floor_row = next(line for line in report["markdown"].splitlines() if line.startswith("| floor |"))
    assert floor_row.split(" | ")[5] == "1.00×"  # the Step / floor column


def test_machine_independent_columns_come_from_footprint(report):
    """The saved bytes and op counts in the report are footprint's, on the same model and batch."""
    result = by_method(report)["full"]
    workload = get_workload("timm-classifier")("vit_tiny_patch16_224", TINY_KWARGS, 5)
    torch.manual_seed(0)
    model = workload.build_model()
    pv.apply(model, "full")
    model.train()
    batch = workload.make_batch(model, BATCH, torch.device("cpu"), torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_fn(m):
        return workload.loss(m, batch)

    loss_fn(model).backward()  # optimizer state exists when the harness counts
    optimizer.step()
    expected = saved_bytes(model, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    assert result["saved_for_backward_mib"] * worker.MIB == expected
    assert result["aten_ops_per_step"] == sum(op_counts(model, loss_fn, None, optimizer).values())
    linear = by_method(report)["linear"]
    assert linear["ratio_to_full"]["saved_for_backward_mib"] < 0.1  # the head's input alone


def test_trainable_params_equal_summary(report):
    results = by_method(report)
    dim, classes, depth, patches = 32, 5, 2, (32 // 8) ** 2
    head = dim * classes + classes
    assert results["linear"]["trainable_params"] == head
    assert results["full"]["trainable_params"] == results["full"]["total_params"]
    assert results["vpt"]["trainable_params"] == head + depth * 3 * dim  # deep, 3 prompts (--method-arg)
    assert results["vpt"]["config"]["num_prompts"] == 3
    assert results["ssf"]["config"] == pv.SSFConfig().to_dict()
    assert results["full"]["total_params"] > head + dim * (patches + 1)


def test_ratios_to_full(report):
    results = by_method(report)
    for key in FIGURES:
        if results["full"][key] is not None:
            assert results["full"]["ratio_to_full"][key] == 1.0, key
    linear = results["linear"]
    assert linear["ratio_to_full"]["trainable_params"] == linear["trainable_params"] / results["full"]["trainable_params"]
    assert linear["ratio_to_full"]["aten_ops_per_step"] == linear["aten_ops_per_step"] / results["full"]["aten_ops_per_step"]
    full_row = next(line for line in report["markdown"].splitlines() if line.startswith("| full |"))
    assert full_row.count("(1.00×)") == 8  # every column with a ratio to full


def test_merged_inference_null_exactly_when_not_mergeable(report):
    for result in report["methods"]:
        mergeable = result["method"] != "floor" and pv.get_method(result["method"]).mergeable
        assert result["mergeable"] is mergeable
        assert (result["infer_merged_ms"] is None) is (not mergeable), result["method"]
        assert (result["infer_merged_ms_spread"] is None) is (not mergeable)
        if mergeable:
            assert result["merge_max_abs_diff"] < 1e-4, result["method"]
    vpt_row = next(line for line in report["markdown"].splitlines() if line.startswith("| vpt |"))
    assert vpt_row.split(" | ")[8] == "—"  # merged inference


def test_no_ratios_without_full_or_floor(report):
    results = [dict(r) for r in report["methods"] if r["method"] not in ("full", "floor")]
    without = {**report, "methods": add_ratios(results)}
    assert all(r["ratio_to_full"] is None and r["ratio_to_floor"] is None for r in without["methods"])
    assert "×" not in markdown_table(without).split("\n\n")[1]  # the table part


def test_compile_is_timed_and_recorded(tmp_path, one_thread):
    report = run_benchmark(tiny_options(tmp_path, methods=["floor", "ssf"], compile=True, compile_backend="aot_eager",
                                        mixed_precision="bf16", steps=1, isolate=False), log=lambda _: None)
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["args"]["compile"] is True and saved["args"]["compile_backend"] == "aot_eager"
    for result in saved["methods"]:
        assert result["error"] is None and result["compiled"] is True
        assert result["train_warmup"]["steps"] == 1  # the compiling call is never timed
        assert result["train_step_ms"] > 0 and result["aten_ops_per_step"] > 0
    assert by_method(saved)["ssf"]["merge_max_abs_diff"] < 1e-2  # bf16
    assert "bf16 autocast, torch.compile (backend aot_eager)" in report["markdown"]


def test_infer_only_and_spm_live_membranes(tmp_path, one_thread):
    """diffusers-unet: SPM's membranes run live with per-sample strengths (as transport sets them),
    which at strength 1 give the merged UNet's output."""
    report = run_benchmark(BenchOptions(model="tiny-unet", workload="diffusers-unet", imports=["petl_vision.bench.unet_workload"],
                                        methods=["spm"], batch_size=2, steps=1, warmup=0, device="cpu", infer_only=True,
                                        isolate=False, out_dir=str(tmp_path)), log=lambda _: None)
    spm = report["methods"][0]
    assert spm["error"] is None
    assert spm["train_step_ms"] is None and spm["peak_train_memory_mib"] is None and spm["aten_ops_per_step"] is None
    assert spm["infer_ms"] > 0 and spm["infer_merged_ms"] > 0 and spm["merge_max_abs_diff"] < 1e-4

    from petl_vision.bench.unet_workload import DiffusersUNet
    from petl_vision.methods.spm import spm_module

    workload = DiffusersUNet("tiny-unet", {}, 5)
    model = workload.build_model()
    pv.apply(model, "spm")
    model.eval()
    with torch.no_grad():
        workload.infer(model, workload.make_batch(model, 3, torch.device("cpu"), torch.Generator().manual_seed(0)))
    strengths = spm_module(model).strengths
    assert list(strengths) == ["default"] and torch.equal(strengths["default"], torch.ones(3))


def test_method_timeout_stops_a_method(tmp_path):
    report = run_benchmark(tiny_options(tmp_path, methods=["floor"], method_timeout=0.01), log=lambda _: None)
    assert report["methods"][0]["error"] == "stopped after --method-timeout 0.01 s"
    assert "| floor | failed: stopped after --method-timeout 0.01 s |" in report["markdown"]


def test_warm_up_runs_until_steady_on_cuda(monkeypatch):
    """CUDA warm-up: at least `minimum` turns, then until the last 3 times agree, at most `maximum`."""
    times = iter([10.0, 5.0, 1.0, 1.01, 0.99, 1.0, 1.0])
    monkeypatch.setattr(worker, "_time_turns", lambda fns, turns, device: ([[next(times)]], [None]))
    cuda = torch.device("cuda")
    assert worker.warm_up([lambda: None], cuda, 2, 30, 0.05) == (5, True)  # 1.0, 1.01, 0.99 are steady
    times = iter([1.0, 2.0] * 10)
    assert worker.warm_up([lambda: None], cuda, 0, 6, 0.05) == (6, False)  # capped
    assert worker.is_steady([1.0, 1.04, 1.0], 0.05) and not worker.is_steady([1.0, 1.06, 1.0], 0.05)
    assert not worker.is_steady([1.0, 1.0], 0.05)  # fewer than 3


def test_cuda_times_come_from_events_read_after_one_synchronize(monkeypatch):
    clock = iter(range(1000))  # one tick = 1 ms of "GPU time"

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.tick = next(clock)

        def elapsed_time(self, end):
            return float(end.tick - self.tick)

    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    calls = []

    def a():
        calls.append("a")
        next(clock)  # a takes 2 ticks between its events, b 3
        return "A"

    def b():
        calls.append("b")
        next(clock), next(clock)
        return "B"

    times, outs = worker._time_turns([a, b], 3, torch.device("cuda"))
    assert calls == ["a", "b"] * 3 and outs == ["A", "B"]
    assert times == [[0.002] * 3, [0.003] * 3]
    assert len(syncs) == 2  # once before and once after the timed calls, not per call


def test_merged_and_unmerged_inference_are_timed_in_turns():
    calls = []
    (times_a, out_a), (times_b, out_b) = worker._timed_alternately(
        lambda: calls.append("a") or len(calls), lambda: calls.append("b") or len(calls), 1, 3, torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert len(times_a) == len(times_b) == 3
    assert (out_a, out_b) == (7, 8)


def test_merged_copy_leaves_the_timed_model_adapted():
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
    merged = worker._merged_copy(model)
    x = torch.randn(3, 4)
    assert not hasattr(merged, "petl") and hasattr(model, "petl")
    torch.testing.assert_close(merged(x), model(x))


# ----------------------------------------------------------------------------- mistakes


BAD_OPTIONS = [
    (dict(methods=["linear", "nope"]), pv.UnknownMethodError, r"'nope'.*'floor'"),
    (dict(model="vit_tiny_patch16_22"), ValueError, r"unknown timm model 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224"),
    (dict(model_kwargs={"bogus": 1}), ValueError, r"--model 'vit_tiny_patch16_224' .* with --model-kwargs \{'bogus': 1\} cannot be built"),
    (dict(workload="nope"), ValueError, r"unknown workload 'nope'; registered workloads: .*timm-classifier"),
    (dict(method_args={"lora": {"r": 2}}), ValueError, r"--method-arg names method 'lora', which is not benchmarked"),
    (dict(method_args={"nope": {"r": 2}}), pv.UnknownMethodError, r"'nope'"),
    (dict(method_args={"vpt": {"prompts": 2}}), ValueError, r"--method-arg vpt.prompts: VPTConfig has no field 'prompts'"),
    (dict(method_args={"vpt": {"num_prompts": "abc"}}), ValueError, r"--method-arg vpt.num_prompts='abc': expected int"),
    (dict(method_args={"vpt": {"deep": 3}}), ValueError, r"--method-arg vpt.deep=3: expected bool"),
    (dict(method_args={"vpt": {"num_prompts": 0}}), ValueError, r"--method-arg vpt: VPTConfig.num_prompts must be >= 1"),
    (dict(method_args={"floor": {"x": 1}}), ValueError, r"'floor', which takes no arguments"),
    (dict(methods=["floor", "hst"]), pv.UnsupportedHostError, r"hst.*at least 4 blocks"),
    (dict(batch_size=0), ValueError, r"--batch-size must be an integer >= 1, got 0"),
    (dict(steps=0), ValueError, r"--steps must be an integer >= 1"),
    (dict(warmup=-1), ValueError, r"--warmup must be an integer >= 0"),
    (dict(mixed_precision="fp16"), ValueError, r"needs a CUDA device"),
    (dict(compile=True, compile_backend="nope"), ValueError, r"--compile-backend 'nope': expected one of .*inductor"),
    (dict(imports=["no_such_module_xyz"]), ValueError, r"--import 'no_such_module_xyz'"),
    (dict(device="tpu"), ValueError, r"--device 'tpu'"),
]


@pytest.mark.parametrize("changes,error,match", BAD_OPTIONS, ids=[str(c) for c, _, _ in BAD_OPTIONS])
def test_mistakes_raise_before_anything_runs(tmp_path, changes, error, match):
    out_dir = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_benchmark(tiny_options(out_dir, **changes))
    assert not out_dir.exists()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        run_benchmark(tiny_options(tmp_path / "file"))


def test_method_arg_values_are_converted_to_the_field_type():
    assert check_value(float, "1e-3") == 0.001 and check_value(float, 2) == 2.0  # YAML reads 1e-3 as a string
    assert check_value(tuple[int, ...], [1, 2]) == (1, 2)
    assert check_value(bool | None, None) is None and check_value(str | None, "qkv") == "qkv"
    with pytest.raises(TypeError, match="expected int, got True"):
        check_value(int, True)
    with pytest.raises(TypeError, match="expected int or null"):
        check_value(int | None, 1.5)
    with pytest.raises(TypeError, match="expected int"):
        check_value(tuple[int, ...], [1, "x"])
    assert parse_method_arg(["lora.r=4", "vpt.deep=false", "sara.threshold=1e-3"]) == {
        "lora": {"r": 4}, "vpt": {"deep": False}, "sara": {"threshold": "1e-3"}}
    with pytest.raises(ValueError, match="expected METHOD.FIELD=VALUE, e.g. lora.r=4"):
        parse_method_arg(["r=4"])
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_method_arg(["lora.r=[1"])


def test_default_methods_follow_registry_and_host():
    workload = get_workload("timm-classifier")("resnet10t", {"stem_width": 8, "channels": (8, 16, 24, 32)}, 5)
    names = resolve_methods(workload, None)
    model = workload.build_meta_model()
    expected = [n for n in pv.list_methods() if pv.get_method(n).input_kind == "image" and pv.get_method(n).supports(model)]
    assert names == ["floor", *expected] and "vpt" not in names and "full" in names  # VPT needs tokens
    with pytest.raises(pv.UnsupportedHostError):
        resolve_methods(workload, ["vpt"])


def test_unet_methods_that_need_a_head_are_refused_up_front():
    from petl_vision.bench import unet_workload  # noqa: F401  (registers diffusers-unet)

    workload = get_workload("diffusers-unet")("tiny-unet", {}, 5)
    with pytest.raises(pv.UnsupportedHostError, match="pass train_head=False"):
        resolve_methods(workload, ["full", "lora"])
    assert resolve_methods(workload, ["full", "lora"], {"lora": {"train_head": False}}) == ["full", "lora"]
    default = resolve_methods(workload, None)
    assert default[0] == "floor" and {"full", "spm", "sara"} <= set(default) and not {"lora", "ssf", "vpt"} & set(default)


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


def test_targets_compare_ratios_with_the_issue_bounds():
    from petl_vision.bench.targets import check

    rows = [{"method": "full", "error": None, "train_step_ms": 100.0, "peak_train_memory_mib": 1000.0},
            {"method": "ssf", "error": None, "train_step_ms": 80.0, "peak_train_memory_mib": 950.0},
            {"method": "lst", "error": "boom"}]
    checked = {(t["method"], t["figure"]): t for t in check({"args": {"workload": "timm-classifier"}, "methods": rows})}
    assert checked["ssf", "train_step_ms"]["ratio"] == 0.8 and checked["ssf", "train_step_ms"]["ok"] is True
    assert checked["ssf", "peak_train_memory_mib"]["ratio"] == 0.95 and checked["ssf", "peak_train_memory_mib"]["ok"] is False
    assert checked["lst", "train_step_ms"]["ratio"] is None and checked["lst", "train_step_ms"]["ok"] is None
    unet = check({"args": {"workload": "diffusers-unet", "compile": True},
                  "methods": [{"method": "spm", "error": None, "infer_ms": 10.4, "infer_merged_ms": 10.0}]})
    assert len(unet) == 1 and unet[0]["ratio"] == pytest.approx(1.04) and unet[0]["ok"] is True
