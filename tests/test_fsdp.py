"""The core on FSDP-sharded models (issue #15), CPU, 2 gloo processes: one launch of tests/fsdp_worker.py
runs every case; the tests read its results.json. Also: the Accelerate configs parse."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

FSDP2_METHODS = ["ssf", "vpt", "lora", "bitfit", "mask_tuning", "lst", "hst", "unipt", "moment_probing"]
# diffusers UNet (LoRA with train_head=False, SPM membranes, SaRA's values), Point-MAE, open_clip's image tower
# (ssf: train_head=False)
OTHER_HOSTS = ["unet_lora", "unet_spm", "unet_sara", "point_idpt", "point_vpt", "clip_ssf", "clip_mask_tuning", "p2p_p2p"]
# the same under bf16 mixed precision, but with BatchNorm (test_bf16_sharding_refuses_batchnorm)
BF16 = [f"{case}_bf16" for case in FSDP2_METHODS + OTHER_HOSTS if case not in ("point_idpt", "point_vpt", "hst", "p2p_p2p")]
SHARDED = FSDP2_METHODS + ["ssf_fsdp1", "lora_fsdp1"] + OTHER_HOSTS + BF16
EXACT = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def case_result(results, case):
    r = results[case]
    if "error" in r:
        pytest.fail(f"{case}: {r['error']}\n{r.get('trace', '')}")
    return r


@pytest.mark.parametrize("case", SHARDED)
def test_sharded_step_saves_the_unsharded_adapter(results, case):
    r = case_result(results, case)
    # bf16 forward/backward vs the fp32 reference step: within 5% of the step's own size (measured: at most
    # 2.3%); mask tuning's scores move by ~3e-3 in a step, below bf16's resolution: 25% (their masks, hence
    # the outputs, are equal)
    tol = (0.25 if "mask_tuning" in case else 0.05) * r["update"] if case.endswith("bf16") else EXACT
    assert r["adapter_diff"] <= tol, (r["adapter_diff"], r["update"])
    assert r["same_keys"] and r["same_host"]  # names, host class, shapes and fingerprint of the unsharded model
    if not case.endswith("bf16"):
        assert r["same_safetensors"]  # adapter.safetensors (and peft's file for lora) equal the unsharded save's
    assert r["out_diff"] <= (0.05 * r["out_scale"] if case.endswith("bf16") else EXACT), r["out_diff"]  # loaded onto an unsharded host


@pytest.mark.parametrize("case", SHARDED)
def test_saved_once_by_rank0(results, case):
    r = case_result(results, case)
    assert r["files"] == r["ref_files"]  # no temporary or extra files
    (writes0, file0), (writes1, file1) = r["writes_and_file_on_return"]
    assert writes0 == len(r["files"]) and writes1 == 0  # rank 0 wrote every file, rank 1 none
    assert file0 and file1  # both returned after adapter.safetensors existed


@pytest.mark.parametrize("case", SHARDED)
def test_frozen_backbone_is_sharded(results, case):
    assert case_result(results, case)["mem_ratio"] <= 0.55


@pytest.mark.parametrize("case", SHARDED + ["ssf_ddp"])
def test_summary_counts_global_numbers(results, case):
    r = case_result(results, case)
    assert [s[:2] for s in r["summary"]] == [r["ref_summary"][:2]] * 2  # (total, trainable) on both ranks


@pytest.mark.parametrize("case", ["ssf", "ssf_bf16"])
def test_fsdp2_model_reports_its_original_class(results, case):
    r = case_result(results, case)  # fully_shard re-classes the model as FSDPVisionTransformer
    assert r["host_class"] == ["timm.models.vision_transformer.VisionTransformer", "VisionTransformer"]


@pytest.mark.parametrize("case", SHARDED + ["ssf_ddp"])
def test_summary_notes_are_global(results, case):
    r = case_result(results, case)
    notes, expected = [s[2] for s in r["summary"]], [r["ref_summary"][2]] * 2  # after the step, both ranks
    assert notes == expected
    if case == "mask_tuning":  # gathered over the shards of the scores: the step masked some weights off
        assert "masked off 0 " not in notes[0]["mask_tuning"]


def test_sara_reselection_refuses_a_sharded_unet(results):
    """SaRA trains on the sharded UNet (its values put into the gathered weights out of place: see the
    SHARDED tests); its progressive re-selection, which reads whole weights and resizes the values, refuses."""
    message = case_result(results, "unet_sara")["reselect_error"]
    assert message is not None and message.startswith("sara: progressive re-selection (set progressive_fraction: null) on an FSDP2")


@pytest.mark.parametrize("case", ["ssf", "ssf_fsdp1"])
def test_merge_and_load_refuse_sharded_models(results, case):
    r = case_result(results, case)
    if case == "ssf":  # FSDP2 merges (test_fsdp2_merge_returns_the_merged_model_on_rank0)
        assert r["merge_error"] is None
    else:
        assert "sharded" in r["merge_error"] and "pv.load_adapter(<unsharded host>" in r["merge_error"]
    assert "load the adapter onto the model before sharding it" in r["load_error"]
    assert "apply('bitfit'): the model is sharded" in r["apply_error"]


@pytest.mark.parametrize("case", ["ssf", "ssf_fsdp1"])
def test_push_to_hub_uploads_once(results, case):
    r = case_result(results, case)
    url = "https://huggingface.co/user/repo/commit/0"
    assert r["hub"] == [[url, [r["files"]]], [url, []]]  # rank 0 uploaded the adapter folder once; both got the url


def test_ddp_saved_on_rank0_alone(results):
    r = case_result(results, "ssf_ddp")
    assert r["adapter_diff"] <= EXACT and r["same_safetensors"] and r["out_diff"] <= EXACT
    assert r["writes_and_file_on_return"][1][0] == 0


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_accelerate_configs_parse(name, monkeypatch):
    """The configs go through accelerate's own loader and launch-argument validation; the FSDP one
    builds accelerate's FSDP plugin from the environment `accelerate launch` would set."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = str(ROOT / "configs" / "accelerate" / f"{name}.yaml")
    config = load_config_from_file(path)
    args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "train.py"]))[0]
    assert args.num_processes == 2 and args.mixed_precision == "bf16"
    if name == "ddp":
        assert config.distributed_type == "MULTI_GPU" and args.multi_gpu and not args.use_fsdp
        return
    assert config.distributed_type == "FSDP" and args.use_fsdp
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap is None  # the trainers find each host's blocks
    from petl_vision.train.sharding import fsdp_settings
    assert fsdp_settings() == {"class_names": None, "reshard_after_forward": True}
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.reshard_after_forward is True


def test_hst_sync_batchnorm_conversion_keeps_the_adapter():
    """HST's docstring offers SyncBatchNorm for split batches (GPU only in PyTorch: on one CPU process it
    acts as BatchNorm): the converted model computes the same outputs and saves the same tensors."""
    import timm
    import torch

    import petl_vision as pv
    from petl_vision.core.io import adapter_state_dict

    torch.manual_seed(0)
    host = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=4, num_heads=2, num_classes=5)
    model = pv.apply(host, "hst").train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    with torch.no_grad():
        expected = model(x)
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert len(bns) >= 2 and all(isinstance(synced.get_submodule(n), torch.nn.SyncBatchNorm) for n in bns)
    with torch.no_grad():
        assert torch.equal(synced(x), expected)
    assert sorted(adapter_state_dict(synced)) == sorted(before)  # the same adapter keys (BN statistics included)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        import torch.distributed as dist  # under a process group, PyTorch refuses CPU inputs
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            synced(x)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("variable", ["FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_VERSION"])
def test_trainer_sharding_refuses_options_it_does_not_carry_out(variable, monkeypatch):
    from petl_vision.train.sharding import fsdp_settings

    monkeypatch.setenv(variable, "1" if variable == "FSDP_VERSION" else "true")
    with pytest.raises(ValueError, match="fsdp"):
        fsdp_settings()


def test_block_units_by_host_family_and_by_class_name():
    import timm

    from petl_vision.core.distributed import block_units

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    assert block_units(vit) == list(vit.blocks)
    assert block_units(vit, ["Mlp"]) == [b.mlp for b in vit.blocks]
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), window_size=2)
    assert len(block_units(swin)) == 2 and all(type(b).__name__ == "SwinTransformerBlock" for b in block_units(swin))
    with pytest.raises(ValueError, match="no module of class"):
        block_units(vit, ["ResidualAttentionBlock"])
    import petl_vision as pv
    lst = pv.apply(vit, "lst")  # its side network is built of timm Blocks too: not host units
    assert block_units(lst, ["Block"]) == list(lst.blocks) and any(type(m).__name__ == "Block" for m in lst.petl.modules())
    with pytest.raises(ValueError, match="no block list"):
        block_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


MERGED = ["ssf", "lora", "bitfit", "mask_tuning", "unet_lora", "unet_spm", "unet_sara", "clip_ssf", "clip_mask_tuning"]
MERGED += [f"{case}_bf16" for case in MERGED]


@pytest.mark.parametrize("case", MERGED)
def test_fsdp2_merge_returns_the_merged_model_on_rank0(results, case):
    """pv.merge on every rank of an FSDP2 model: rank 0 gets the unsharded host of the original class,
    merged, with the reference model's outputs; the sharded model is left as it was (its save above)."""
    r = case_result(results, case)
    assert r["merge_diff"] is not None, "no merge ran: the method should be mergeable"
    assert r["merged_type"] == r["host_class"][0] and not r["merged_type"].startswith("FSDP")
    # bf16: the step itself differs from the fp32 reference's (test above); outputs within 5% of their size
    assert r["merge_diff"] <= (0.05 * r["out_scale"] if case.endswith("bf16") else 1e-4), r["merge_diff"]


def test_unmergeable_methods_do_not_merge(results):
    assert all(results[c]["merge_diff"] is None for c in ["vpt", "lst", "hst", "unipt", "moment_probing", "point_idpt", "point_vpt", "p2p_p2p"])


def test_bf16_sharding_refuses_batchnorm():
    """bf16 parameters next to BatchNorm's fp32 running statistics fail in the forward (and Point-MAE would
    group its points in bf16): refused before anything is sharded; fp32 shards it (tested above)."""
    import petl_vision as pv
    from petl_vision.core.distributed import shard_model
    from petl_vision.models.point_mae import PointTransformer

    model = pv.apply(PointTransformer(num_classes=5, num_group=8, group_size=8, dim=32, depth=2, num_heads=2), "idpt", k=4)
    with pytest.raises(ValueError, match="BatchNorm layers .*mixed_precision='no'"):
        shard_model(model, mixed_precision="bf16")
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="BatchNorm layers"):  # HST's side stems
        shard_model(pv.apply(vit, "hst"), mixed_precision="bf16")
