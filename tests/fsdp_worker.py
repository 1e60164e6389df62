"""Worker of tests/test_fsdp.py: `python tests/fsdp_worker.py OUT_DIR [METHOD ...]` spawns 2 gloo
processes on the CPU; for each method, one SGD step under FSDP2 on a global batch split over the 2
ranks, compared with the single-process step on the whole batch. Results go to OUT_DIR/results.json.

Per method (rank 0 writes the numbers; the test asserts them):
- adapter_diff: max |saved (sharded) - reference (unsharded step)| over the adapter tensors;
- same_keys / same_host: the two saved files hold the same names and host record;
- files: the files in the save folder after the sharded save (only rank 0 writes);
- out_diff: max |outputs| of the sharded save loaded onto an unsharded host vs the reference model;
- mem_ratio: max over ranks of (local frozen-parameter bytes) / (unsharded frozen-parameter bytes);
- summary: (total, trainable, notes after the step) on the sharded model on every rank, and on the
  unsharded one;
- merge_error / load_error / apply_error: the messages pv.merge (FSDP1), pv.load_adapter and pv.apply raised
  on a sharded model;
- merge_diff / merged_type: FSDP2 and a mergeable method: max |outputs| of the model pv.merge returned on
  rank 0 vs the reference model, and its class;
- host_class: [host_class_name, pv.summary's host_class] of the sharded model (rank 0);
- hub (ssf, ssf_fsdp1): per rank, [url pv.push_to_hub returned, files it uploaded] (upload faked).
- writes_and_file_on_return: per rank, [files written by this process, adapter.safetensors existed
  when save_adapter returned]; same_safetensors: every .safetensors file equals the reference's.
Extra cases: "<case>_bf16" for every method and host case (FSDP2 with MixedPrecisionPolicy(bf16 params,
fp32 reduce)), "ssf_fsdp1" and
"lora_fsdp1" (FullyShardedDataParallel, use_orig_params=True, per-block auto-wrap, device_id=cpu),
"ssf_ddp" (DistributedDataParallel, saved on rank 0 alone).
Other host families ("<family>_<method>"): "unet_lora", "unet_spm", "unet_sara" (diffusers
UNet2DConditionModel, FSDP2 units: `block_units`; SaRA applies its values out of place there), "point_idpt" / "point_vpt" (Point-MAE PointTransformer, whole batch on every rank: its
BatchNorm), "clip_ssf" / "clip_mask_tuning" (open_clip's image tower, units: its resblocks).
unet_sara also records reselect_error: the message SaRA's progressive re-selection raised on the
sharded model (rank 0).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import petl_vision as pv
import petl_vision.core.io as pv_io
from petl_vision.core.distributed import shard_model
from petl_vision.core.io import adapter_state_dict, read_adapter
from petl_vision.core.state import host_class_name

WORLD = 2
GLOBAL_BATCH = 4
LR = 0.5
METHODS = ["ssf", "vpt", "lora", "bitfit", "mask_tuning", "lst", "hst", "unipt", "moment_probing"]
HOSTS = ["unet_lora", "unet_spm", "unet_sara", "point_idpt", "point_vpt", "clip_ssf", "clip_mask_tuning", "p2p_p2p"]
# every method x host case again under FSDP2 bf16 mixed precision (MixedPrecisionPolicy: bf16 params, fp32 reduce)
# BatchNorm (Point-MAE, HST's side stems, P2P's encoder) refuses bf16 shards (test_bf16_sharding_refuses_batchnorm)
WITH_BATCHNORM = ("point_idpt", "point_vpt", "hst", "p2p_p2p")
BF16 = [f"{case}_bf16" for case in METHODS + HOSTS if case not in WITH_BATCHNORM]
EXTRA = ["ssf_fsdp1", "lora_fsdp1", "ssf_ddp", *HOSTS, *BF16]
_atomic_write = pv_io.atomic_write
# Methods with BatchNorm layers in training mode (HST's side stem and fc_norm): the statistics of a
# rank's half batch are not the global batch's (as under DDP without SyncBatchNorm), so each rank
# gets the whole batch; the gather/save path under sharding is checked the same way.
WHOLE_BATCH_ON_EVERY_RANK = {"hst", "point_idpt", "point_vpt", "p2p"}  # Point-MAE: BatchNorm in its encoder and head; P2P: in its point encoder


def make_host(depth: int = 2, family: str = "timm"):
    torch.manual_seed(0)
    if family == "unet":
        sys.path.insert(0, str(Path(__file__).parent))
        from test_sara import tiny_unet
        return tiny_unet().train()
    if family == "clip":  # open_clip's image tower (tests/test_clip.py's tiny CLIP)
        sys.path.insert(0, str(Path(__file__).parent))
        from test_clip import tiny_clip
        return tiny_clip().visual
    if family == "point":
        from petl_vision.models.point_mae import PointTransformer
        model = PointTransformer(num_classes=5, num_group=8, group_size=8, dim=32, depth=2, num_heads=2)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # the same step on one and two processes (no random masks)
        return model
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=5)


def family_of(case: str) -> str:
    return case.split("_")[0] if case.startswith(("unet_", "point_", "clip_", "p2p_")) else "timm"


def base_case(case: str) -> str:
    """The case without its sharding / precision suffix ("clip_ssf_bf16" -> "clip_ssf")."""
    return next((case.removesuffix(s) for s in ("_bf16", "_fsdp1", "_ddp") if case.endswith(s)), case)


def method_of(case: str) -> str:
    base = base_case(case)
    return base.split("_", 1)[1] if family_of(base) != "timm" else base


def fresh_host(case: str, method: str):
    return make_host(4 if method == "hst" else 2, family_of(case))  # HST needs one block group per side stage


METHOD_ARGS = {"unet_lora": {"train_head": False}, "clip_ssf": {"train_head": False}, "point_idpt": {"k": 4},
               "unet_sara": {"fraction": 0.1},  # the tiny UNet's init has few entries under SaRA's threshold
               "p2p_p2p": {"img_size": 32, "k": 8}}  # P2P: point clouds through the timm ViT


def make_model(case: str, method: str):
    model = pv.apply(fresh_host(case, method), method, **METHOD_ARGS.get(base_case(case), {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move trainable tensors off their init (LoRA's B is zero) so nothing is equal by accident
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.train()


def batch(family: str = "timm"):
    """(inputs, target): inputs a tuple of model arguments, each with the batch first."""
    g = torch.Generator().manual_seed(2)
    if family == "unet":  # (latents, timesteps, text states), target noise
        inputs = (torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=g), torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g),
                  torch.randn(GLOBAL_BATCH, 5, 32, generator=g))
        return inputs, torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=g)
    x = torch.randn(GLOBAL_BATCH, 64, 3, generator=g) if family in ("point", "p2p") else torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    return (x,), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def outputs(model, inputs):
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out


def sgd_step(model, inputs, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    out = outputs(model, inputs).float()
    loss = F.mse_loss(out, y) if out.dim() == 4 else F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def frozen_bytes(model, local: bool) -> int:
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            t = p.to_local() if local and hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def shard(model, case: str):
    if case.endswith("ddp"):
        return torch.nn.parallel.DistributedDataParallel(model)
    if case.endswith("fsdp1"):
        from timm.models.vision_transformer import Block
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu"))
    return shard_model(model, mixed_precision="bf16" if case.endswith("bf16") else "no")  # per block_units(model)


def refusals(model, case: str, method: str, folder: Path) -> list:
    """The messages of pv.merge (FSDP1 only: an FSDP2 model merges), pv.load_adapter and pv.apply on sharded models."""
    messages = []
    bare = shard(fresh_host(case, method), case)
    merge = (lambda: pv.merge(model)) if case.endswith("fsdp1") else (lambda: None)
    for call, error in ((merge, pv.MergeError), (lambda: pv.load_adapter(bare, folder), ValueError),
                        (lambda: pv.apply(bare, "bitfit"), TypeError)):
        try:
            call()
            messages.append(None)
        except error as e:
            messages.append(str(e))
    return messages


def run_case(case: str, rank: int, out: Path) -> dict:
    family = family_of(case)
    method = method_of(case)
    inputs, y = batch(family)
    x = inputs
    ref = make_model(case, method)
    unsharded_frozen = frozen_bytes(ref, local=False)
    ref_summary = pv.summary(ref)
    before = {k: v.detach().clone() for k, v in adapter_state_dict(ref).items()}
    sgd_step(ref, x, y)
    update = max((v.detach().float() - before[k].float()).abs().max().item() for k, v in adapter_state_dict(ref).items())

    model = make_model(case, method)
    model = shard(model, case)
    local_frozen = frozen_bytes(model, local=True)
    summ = pv.summary(model)
    class_names = [host_class_name(model), summ.host_class]
    per = GLOBAL_BATCH // WORLD
    if method in WHOLE_BATCH_ON_EVERY_RANK or base_case(case) in WHOLE_BATCH_ON_EVERY_RANK:
        sgd_step(model, x, y)  # the mean of equal gradients is the global batch's
    else:
        sgd_step(model, tuple(t[rank * per:(rank + 1) * per] for t in x), y[rank * per:(rank + 1) * per])
    folder = out / case
    notes = pv.summary(model).notes  # after the step, on every rank (mask_tuning counts its sharded scores)
    writes.clear()
    if rank == 0 or not case.endswith("ddp"):  # sharded: on every rank; DDP: rank 0 alone, as usual
        pv.save_adapter(model, folder)
    saved_on_return, n_writes = (folder / "adapter.safetensors").is_file(), len(writes)
    if case.endswith("ddp"):
        dist.barrier()
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    merge_diff = None  # FSDP2, mergeable methods: pv.merge on every rank gives rank 0 the merged, unsharded model
    if not case.endswith(("ddp", "fsdp1")) and pv.can_merge(ref):
        merged = pv.merge(model)
        if rank == 0:
            with torch.no_grad():
                merge_diff = (outputs(merged.eval(), x) - outputs(ref.eval(), x)).abs().max().item()
            ref.train()
    merge_error = load_error = apply_error = None
    if family == "timm":  # the refusals (tests: ssf, ssf_fsdp1)
        merge_error, load_error, apply_error = refusals(model, case, method, folder)
    reselect_error = None
    if case == "unet_sara":  # whole weights and a resized values parameter: refused on a sharded model
        from petl_vision.methods import sara
        try:
            sara.reselect(model)
        except RuntimeError as e:
            reselect_error = str(e)
    hub_url = None
    if case in ("ssf", "ssf_fsdp1"):  # push_to_hub on every rank: rank 0 uploads, every rank gets the url
        uploads.clear()
        hub_url = pv.push_to_hub(model, "user/repo")

    ratios = [None] * WORLD
    dist.all_gather_object(ratios, local_frozen / unsharded_frozen)
    summaries = [None] * WORLD
    dist.all_gather_object(summaries, [summ.total, summ.trainable, notes])
    write_counts = [None] * WORLD
    dist.all_gather_object(write_counts, [n_writes, saved_on_return])
    hub = [None] * WORLD
    dist.all_gather_object(hub, [hub_url, list(uploads)])
    if rank != 0:
        return {}
    result = {"files": files, "writes_and_file_on_return": write_counts, "mem_ratio": max(ratios), "summary": summaries,
              "ref_summary": [ref_summary.total, ref_summary.trainable, pv.summary(ref).notes], "merge_error": merge_error,
              "load_error": load_error, "host_class": class_names, "apply_error": apply_error, "hub": hub,
              "reselect_error": reselect_error, "update": update, "merge_diff": merge_diff, "merged_type": None if merge_diff is None else f"{type(merged).__module__}.{type(merged).__name__}"}
    try:  # rank 0 alone from here: an error must not leave the other rank waiting in a collective
        result.update(_compare(case, method, ref, folder, files, inputs))
    except Exception as e:
        result.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
    return result


def _compare(case: str, method: str, ref, folder: Path, files: list[str], x) -> dict:
    """The sharded save vs the unsharded step's model and its save (rank 0)."""
    ref_dir = folder.parent / f"{case}_ref"
    pv.save_adapter(ref, ref_dir)
    _, host, saved, _ = read_adapter(folder)
    _, ref_host, ref_saved, _ = read_adapter(ref_dir)
    ref_tensors = {k: v.detach() for k, v in adapter_state_dict(ref).items()}
    same_files = all(_same_tensors(folder / name, ref_dir / name) for name in files if name.endswith(".safetensors"))
    loaded = pv.load_adapter(fresh_host(case, method), folder).eval()
    with torch.no_grad():
        out_diff = (outputs(loaded, x) - outputs(ref.eval(), x)).abs().max().item()
    return {
        "adapter_diff": max((saved[k].float() - ref_tensors[k].float()).abs().max().item() for k in ref_tensors),
        "same_keys": sorted(saved) == sorted(ref_saved),
        "same_host": host == ref_host,
        "same_safetensors": same_files,
        "ref_files": sorted(p.name for p in ref_dir.iterdir()),
        "out_diff": out_diff,
        "out_scale": outputs(ref.eval(), x).abs().max().item(),
    }


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    return sorted(ta) == sorted(tb) and all(torch.allclose(ta[k].float(), tb[k].float(), atol=1e-5, rtol=0) for k in ta)


writes: list[str] = []  # files this process wrote through io.atomic_write


def _recording_atomic_write(path, write):
    writes.append(Path(path).name)
    return _atomic_write(path, write)


uploads: list[list[str]] = []  # per upload from this process: the files uploaded


def _fake_upload_folder(folder, repo_id, **kwargs):
    uploads.append(sorted(p.name for p in Path(folder).iterdir()))
    return f"https://huggingface.co/{repo_id}/commit/0"


def worker(rank: int, port: int, out: str, cases: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False")
    pv_io.atomic_write = _recording_atomic_write
    pv_io.upload_folder = _fake_upload_folder  # no network: records what would be uploaded
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for case in cases:
            try:
                results[case] = run_case(case, rank, Path(out))
                print(f"rank {rank}: {case} done", file=sys.stderr, flush=True)
            except Exception as e:  # recorded: the test fails naming the case and the error
                results[case] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
                dist.barrier()  # both ranks fail alike (same code, same shapes); realign before the next case
        if rank == 0:
            (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
        dist.barrier()  # leave together: a rank tearing gloo down while the other still runs can abort it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: a gloo thread destroyed at exit aborted a rank now and then
    # ("terminate called without an active exception", SIGABRT) after every result was written.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out, cases = sys.argv[1], sys.argv[2:] or METHODS + EXTRA
    Path(out).mkdir(parents=True, exist_ok=True)
    mp.spawn(functools.partial(worker), args=(free_port(), out, cases), nprocs=WORLD, join=True)
