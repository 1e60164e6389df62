"""Mixed precision on CPU: bf16 autocast runs the dtype paths CUDA fp16/bf16 training takes.

1. every registered method x every tiny host it supports, under `torch.autocast("cpu", bfloat16)`:
   finite outputs close to the fp32 forward, gradients of each parameter's own dtype, an optimizer
   step that moves only trainable tensors;
2. SaRA and SPM on a tiny diffusers UNet under autocast (sparse updates, membranes, merge);
3. a host stored in bf16 (``unet.to(torch.bfloat16)``, a frozen UNet as diffusers users keep it)
   with SPM and SaRA, with adapter parameters in bf16 and upcast to fp32;
4. the benchmark harness with ``mixed_precision="bf16"`` on CPU.
"""
import pytest
import timm
import torch
from conftest import HOSTS, input_for, make_host
from test_sara import tiny_unet

import petl_vision as pv
from petl_vision.methods import sara, spm as spm_method
from petl_vision.models.point_mae import PointTransformer

BF16 = torch.bfloat16
REL_TOL = 5e-2  # bf16 has an 8-bit mantissa: ~0.4% per rounding, a few % through a tiny network
MIN_EFFECT = 2 * REL_TOL  # a method must move the output further than the bf16 error to be checked


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=BF16, enabled=enabled)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- hosts and inputs


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def vit_deep():
    """The tiny ViT at depth 4: HST needs one block per side stage."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4,
                             num_heads=2, num_classes=5)


def point_mae():
    return PointTransformer(num_classes=5, num_group=8, group_size=8, dim=32, depth=3, num_heads=2)


def clouds(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(seed))


IMAGE_HOSTS = {**HOSTS, "vit_deep": vit_deep}
# The hosts a method is tried on, by the method's input kind. A method whose kind has no entry here
# fails `test_every_method_runs_somewhere`: add a tiny host for it.
HOSTS_BY_KIND = {
    "image": IMAGE_HOSTS,
    "points": {**IMAGE_HOSTS, "point_mae": point_mae},  # IDPT: point transformers; P2P: image classifiers
    "latents": {"unet": tiny_unet},
}


def method_args(method: str, model: torch.nn.Module) -> dict:
    """Config overrides keeping the tiny cases tiny: P2P with 4 test views, and 32 px images on CNNs
    (whose pretrained_cfg says 224); IDPT with 4 of the 8 patch tokens as neighbours."""
    if method == "p2p":
        return {"test_views": 4, **({} if hasattr(model, "patch_embed") else {"img_size": 32})}
    return {"k": 4} if method == "idpt" else {}


# Perturbation scale per method (default 0.3). P2P's colouring ends in a sigmoid: 0.3 on its 64-channel
# convs saturates most pixels, and the gradients left are below bf16's resolution in either precision.
PERTURB_SCALE = {"p2p": 0.03}


def build(host: str, kind: str, seed: int = 0) -> torch.nn.Module:
    if host in HOSTS:
        return make_host(host, seed)
    torch.manual_seed(seed)
    return HOSTS_BY_KIND[kind][host]().eval()


def inputs(kind: str, host: str):
    if kind == "points":
        return (clouds(),)
    if kind == "latents":
        return unet_inputs()
    return (input_for("vit" if host == "vit_deep" else host),)


def run(model, x) -> torch.Tensor:
    out = model(*x)
    return out.sample if hasattr(out, "sample") else out


def _supported() -> list[tuple[str, str]]:
    cases, cache = [], {}
    for method in pv.list_methods():
        kind = pv.get_method(method).input_kind
        for host in sorted(HOSTS_BY_KIND.get(kind, {})):
            if host not in cache:
                cache[host] = build(host, kind)
            if pv.get_method(method).supports(cache[host]):
                cases.append((method, host))
    return cases


CASES = _supported()


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move trainable tensors away from their init (zero LoRA B / SPM up, unit SSF scales, ...), so
    that the method really changes the output and a path dropping it cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def backward(out: torch.Tensor) -> None:
    """A loss with a different weight per output entry (fixed), in fp32 as training loops compute it."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * weight).sum().backward()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainable(model).items() if p.grad is not None}


def check_gradients(model, label: str) -> None:
    """Every trainable parameter got a finite gradient of its own dtype; frozen ones got none."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{label}: trainable {name} got no gradient"
            assert p.grad.dtype == p.dtype, f"{label}: {name} is {p.dtype} but its gradient is {p.grad.dtype}"
            assert torch.isfinite(p.grad).all(), f"{label}: {name} has a non-finite gradient"
        else:
            assert p.grad is None, f"{label}: frozen {name} got a gradient"


# ----------------------------------------------------------------------------- 1. the grid


def test_every_method_runs_somewhere():
    covered = {m for m, _ in CASES}
    missing = [m for m in pv.list_methods() if m not in covered]
    assert not missing, f"no tiny host in test_autocast.HOSTS_BY_KIND supports {missing}"
    assert {"hst", "idpt", "p2p", "spm"} <= covered and len(CASES) >= 80


@pytest.mark.parametrize("method,host", CASES)
def test_bf16_autocast(method, host):
    kind = pv.get_method(method).input_kind
    label = f"{method} on {host}"
    model = build(host, kind)
    pv.apply(model, method, **method_args(method, model))
    perturb(model, scale=PERTURB_SCALE.get(method, 0.3))
    params = trainable(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    x = inputs(kind, host)

    # Eval mode (deterministic: no dropout / drop-path, fixed BatchNorm statistics): fp32 reference.
    model.eval()
    ref = run(model, x)
    backward(ref)
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)

    with autocast():
        out = run(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all(), label
    err = rel(out, ref)
    assert err < REL_TOL, f"{label}: the autocast forward is {err:.3f} (relative) away from the fp32 forward"
    if kind != "points":  # the plain host takes the same input: the method must matter (P2P / IDPT are the input path)
        with torch.no_grad():
            effect = rel(ref, run(build(host, kind), x))
        assert effect > MIN_EFFECT, f"{label}: the perturbed method moves the output by only {effect:.3f}"
    backward(out)
    check_gradients(model, label)
    flat = lambda g: torch.cat([g[n].float().flatten() for n in sorted(ref_grads)])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(grads(model)), flat(ref_grads), dim=0).item()
    assert cos > 0.98, f"{label}: autocast gradients point elsewhere than fp32 ones (cosine {cos:.4f})"

    # Train mode, as in training: gradients again, then one optimizer step.
    model.zero_grad(set_to_none=True)
    model.train()
    with autocast():
        out = run(model, x)
    assert torch.isfinite(out).all(), label
    backward(out)
    check_gradients(model, label + " (train mode)")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(params.values(), lr=0.1).step()
    for name, p in model.named_parameters():
        if name in params:  # p - lr * grad, in the parameter's dtype
            assert torch.equal(p, before[name].add(p.grad, alpha=-0.1)), f"{label}: trainable {name} did not take the step"
        else:  # raw storage: SaRA's host weights receive the new values at the next access, not here
            assert torch.equal(p, before[name]), f"{label}: the step changed frozen {name}"


# ----------------------------------------------------------------------------- point-cloud geometry


def test_p2p_projects_and_groups_in_fp32_under_autocast(monkeypatch):
    """P2P's view rotation and xyz kNN must not run in bf16: 8 bits of mantissa put points on
    neighbouring pixels and give them wrong neighbours (at the official 224 px, 41% of 1024 points
    changed pixel under bf16 autocast before the fix)."""
    from petl_vision.methods import p2p as p2p_module

    neighbours = []
    real_knn = p2p_module.knn
    monkeypatch.setattr(p2p_module, "knn", lambda q, r, k: neighbours.append(real_knn(q, r, k)) or neighbours[-1])
    model = pv.apply(make_host("vit"), "p2p", test_views=4).eval()
    canvases = []
    model.petl.p2p.img_block.register_forward_pre_hook(lambda m, a: canvases.append(a[0].detach().float()))
    points = torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(points)
        with autocast():
            out = model(points)
    assert out.dtype == BF16 and rel(out, ref) < REL_TOL
    occupied32, occupied16 = ((c != 0).any(dim=1) for c in canvases)
    assert occupied32.sum() > 500 and torch.equal(occupied16, occupied32)  # every point on the same pixels
    assert rel(canvases[1], canvases[0]) < 2e-2  # the splatted features differ by bf16 rounding only
    assert len(neighbours) == 2 and torch.equal(neighbours[1], neighbours[0])  # same xyz neighbours


def test_idpt_generator_neighbours_in_fp32_under_autocast(monkeypatch):
    """The prompt generator's feature-space kNN under autocast: fp32 distances of the same features
    give the fp32 neighbours (in bf16, |a|^2 + |b|^2 - 2ab cancels: ~10% of 20 neighbours of 64
    tokens of width 384 were wrong before the fix)."""
    from petl_vision.methods import idpt as idpt_module

    neighbours = []
    real_knn = idpt_module.knn
    monkeypatch.setattr(idpt_module, "knn", lambda q, r, k: neighbours.append(real_knn(q, r, k)) or neighbours[-1])
    torch.manual_seed(0)
    edge = idpt_module.EdgeConv(64).eval()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 64, 64, generator=g) + 3 * torch.randn(2, 64, 1, generator=g)  # (B, C, G), a shared offset
    with torch.no_grad():
        ref = edge(tokens, 20)
        with autocast():
            out = edge(tokens, 20)
    assert len(neighbours) == 2 and torch.equal(neighbours[1], neighbours[0])
    assert rel(out, ref) < REL_TOL


# ----------------------------------------------------------------------------- 2. SaRA and SPM on a UNet


def host_tensors(model) -> dict[str, torch.Tensor]:
    """The host's state_dict (SaRA's values written in by its hook) under the plain parameter names."""
    return {k.replace("parametrizations.", "").replace(".original", ""): v.detach().clone()
            for k, v in model.state_dict().items() if not k.startswith("petl.")}


def test_sara_unet_autocast_trains_only_selected_entries():
    unet = pv.apply(tiny_unet(), "sara", fraction=0.05)
    deltas = sara.sara_module(unet).deltas()
    before = host_tensors(unet)
    x = unet_inputs()
    unet.train()
    with autocast():
        out = run(unet, x)
    assert out.dtype == BF16 and torch.isfinite(out).all()
    backward(out)
    check_gradients(unet, "sara on unet")
    assert all(d.values.dtype == d.values.grad.dtype == torch.float32 for d in deltas.values())

    # The sparse gradient is the dense gradient of W at the selected entries: a twin UNet whose every
    # weight trains, at the same values and under the same autocast, gives it exactly.
    twin = tiny_unet().train()
    twin.load_state_dict(before)
    with autocast():
        backward(run(twin, x))
    dense = dict(twin.named_parameters())
    for name, delta in deltas.items():
        torch.testing.assert_close(delta.values.grad, dense[name].grad.flatten()[delta.indices.long()], rtol=1e-5, atol=1e-7)

    torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0).step()
    with torch.no_grad(), autocast():
        run(unet, x)  # writes the new values into the weights
    after = host_tensors(unet)
    assert after.keys() == before.keys()
    for name in before:
        if name not in deltas:
            assert torch.equal(after[name], before[name]), f"{name} is not sparsified but changed"
            continue
        changed = (after[name] != before[name]).flatten().nonzero().squeeze(1)
        selected = deltas[name].indices.long()
        assert torch.isin(changed, selected).all(), f"{name}: entries outside the selection changed"
        assert changed.numel() >= 0.9 * selected.numel(), f"{name}: {changed.numel()} of {selected.numel()} selected entries moved"


def test_sara_unet_merge_under_autocast():
    unet = pv.apply(tiny_unet(), "sara", fraction=0.05)
    perturb(unet, scale=0.05)
    x = unet_inputs()
    with torch.no_grad(), autocast():
        unmerged = run(unet, x)
        merged = run(pv.merge(unet), x)
    assert torch.equal(merged, unmerged)  # the same weights, the same bf16 operations
    with torch.no_grad():
        assert rel(unmerged, run(unet, x)) < REL_TOL and rel(run(tiny_unet(), x), run(unet, x)) > MIN_EFFECT


@pytest.mark.parametrize("variant", ["default", "weights", "official_transport"])
def test_spm_unet_autocast(variant):
    config = {"official_transport": True, "membranes": ("a", "b")} if variant == "official_transport" else {}
    unet = pv.apply(tiny_unet(), "spm", **config)
    spm = spm_method.spm_module(unet)
    if variant == "weights":
        spm.weights["default"] = 0.6  # strengths c != 1: the per-sample coefficient path
    perturb(unet)
    x = unet_inputs()
    with torch.no_grad():
        ref = run(unet, x)
        with spm_method.membranes_disabled(unet):
            plain = run(unet, x)
        with autocast():
            out_nograd = run(unet, x)  # in-place addmm / baddbmm path
    assert rel(ref, plain) > MIN_EFFECT
    assert out_nograd.dtype == BF16 and rel(out_nograd, ref) < REL_TOL

    unet.train()
    with autocast():
        out = run(unet, x)
    assert rel(out, ref) < REL_TOL
    backward(out)
    check_gradients(unet, f"spm ({variant})")
    membranes = [p for n, p in unet.named_parameters() if ".membranes." in n]
    assert membranes and all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in membranes)

    unet.eval()
    with torch.no_grad(), autocast():
        merged = run(pv.merge(unet), x)
    assert rel(merged, out_nograd) < REL_TOL and rel(merged, ref) < REL_TOL


# ----------------------------------------------------------------------------- 3. a host stored in bf16


def bf16_unet():
    """A frozen UNet kept in bf16, as diffusers users hold it (`.to()`, not from_pretrained(torch_dtype=...))."""
    return tiny_unet().to(BF16)


def upcast_trainable(model) -> None:
    """diffusers' `cast_training_params(unet, torch.float32)`: trainable parameters in fp32, the host in bf16."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


@pytest.mark.parametrize("trainable_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("method", ["spm", "sara"])
def test_bf16_unet(method, trainable_dtype):
    """Forward and backward work on a bf16 host, with and without autocast, whether the adapter's
    parameters stay in the dtype they were created in (the layer's: bf16) or are upcast to fp32.
    Before the fix, SPM with fp32 membranes on the bf16 UNet failed without autocast ("Input type
    (CPUBFloat16Type) and weight type (torch.FloatTensor) should be the same")."""
    args = {"fraction": 0.05} if method == "sara" else {}
    # The fp32 reference: the same adapter values on the fp32 host.
    reference = pv.apply(tiny_unet(), method, **args)
    perturb(reference, scale=0.05 if method == "sara" else 0.3)
    x = unet_inputs()
    with torch.no_grad():
        ref = run(reference, x)

    unet = pv.apply(bf16_unet(), method, **args)
    params = trainable(unet)
    assert params and all(p.dtype == BF16 for p in params.values())  # created in the layer's dtype
    unet.load_state_dict(reference.state_dict())  # cast to bf16
    if trainable_dtype == torch.float32:
        upcast_trainable(unet)
    params = trainable(unet)
    assert all(p.dtype == trainable_dtype for p in params.values())
    host = [p for p in unet.parameters() if not p.requires_grad]
    assert host and all(p.dtype == BF16 for p in host)

    x16 = tuple(t.to(BF16) if t.is_floating_point() else t for t in x)
    for use_autocast, inputs_ in ((False, x16), (True, x)):
        label = f"{method} on a bf16 UNet, {trainable_dtype} parameters, autocast={use_autocast}"
        unet.zero_grad(set_to_none=True)
        unet.train()
        with autocast(use_autocast):
            out = run(unet, inputs_)
        assert out.dtype == BF16 and torch.isfinite(out).all(), label
        err = rel(out, ref)
        assert err < REL_TOL, f"{label}: {err:.3f} from the fp32 model"
        backward(out)
        check_gradients(unet, label)  # gradients of each parameter's own dtype

    before = host_tensors(unet)
    torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0).step()
    with torch.no_grad():
        run(unet, x16)
    after = host_tensors(unet)
    deltas = sara.sara_module(unet).deltas() if method == "sara" else {}
    moved = 0
    for name in before:
        if name in deltas:  # bf16 weights receive the values, rounded, at the selected entries only
            changed = (after[name] != before[name]).flatten().nonzero().squeeze(1)
            assert torch.isin(changed, deltas[name].indices.long()).all(), f"{name}: entries outside the selection changed"
            assert torch.equal(after[name].flatten()[deltas[name].indices.long()], deltas[name].values.detach().to(BF16))
            moved += changed.numel()
        else:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    # A step of 1e-3 is below bf16's resolution for |W| > 0.25 (GroupNorm weights near 1 stay put), not for
    # the small entries SaRA selects: most of them move.
    assert method != "sara" or moved > 0.5 * sum(d.values.numel() for d in deltas.values())
    if method == "spm":
        assert all(not torch.equal(p, reference.get_parameter(n).to(p.dtype)) for n, p in params.items())

    # Merged into the bf16 weights: close to the unmerged bf16 model.
    with torch.no_grad():
        unmerged = run(unet, x16)
        merged = run(pv.merge(unet), x16)
    assert merged.dtype == BF16 and rel(merged, unmerged) < REL_TOL
    assert all(p.dtype == BF16 for p in unet.parameters())


@pytest.mark.parametrize("method", ["spm", "sara"])
def test_fp32_adapter_loads_onto_bf16_unet(method, tmp_path):
    """Trained on the fp32 UNet, used on a bf16 pipeline: the adapter loads (SaRA's saved base values,
    rounded to bf16, match the bf16 weights), its tensors take the host's dtype, outputs stay close."""
    args = {"fraction": 0.05} if method == "sara" else {}
    trained = pv.apply(tiny_unet(), method, **args)
    perturb(trained, scale=0.05 if method == "sara" else 0.3)
    x = unet_inputs()
    with torch.no_grad():
        ref = run(trained, x)
    pv.save_adapter(trained, tmp_path / "adapter")
    unet = pv.load_adapter(bf16_unet(), tmp_path / "adapter")
    assert all(p.dtype == BF16 for p in unet.parameters())
    x16 = tuple(t.to(BF16) if t.is_floating_point() else t for t in x)
    with torch.no_grad():
        out = run(unet, x16)
        assert out.dtype == BF16 and rel(out, ref) < REL_TOL
        assert rel(run(bf16_unet(), x16), ref) > MIN_EFFECT  # without the adapter: far


# ----------------------------------------------------------------------------- 4. the benchmark


def test_bench_bf16_on_cpu(monkeypatch):
    """`--mixed-precision bf16` runs on CPU (fp16 stays CUDA-only); the worker trains and infers under
    CPU bf16 autocast (measured in-process: the harness runs the same `measure` in a child process)."""
    from petl_vision.bench import BenchOptions
    from petl_vision.bench import worker
    from petl_vision.bench.harness import check_options

    cpu = torch.device("cpu")
    check_options(BenchOptions(mixed_precision="bf16", device="cpu"), cpu)
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        check_options(BenchOptions(mixed_precision="fp16", device="cpu"), cpu)

    workload = worker.get_workload("timm-classifier")
    seen = []
    real_loss, real_infer = workload.loss, workload.infer

    def loss(self, model, batch):
        seen.append(("loss", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_loss(self, model, batch)

    def infer(self, model, batch):
        out = real_infer(self, model, batch)
        seen.append(("infer", torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(workload, "loss", loss)
    monkeypatch.setattr(workload, "infer", infer)
    spec = {"workload": "timm-classifier", "model": "vit_tiny_patch16_224", "num_classes": 5,
            "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "batch_size": 2, "steps": 1, "warmup": 0, "device": "cpu", "mixed_precision": "bf16", "seed": 0, "imports": []}
    for method in ("ssf", "lora"):
        seen.clear()
        result = worker.measure({**spec, "method": method, "method_args": {}})
        assert result["error"] is None and result["train_step_ms"] > 0 and result["infer_merged_ms"] > 0
        assert result["mergeable"] and 0 < result["merge_max_abs_diff"] < 0.1  # bf16 outputs: no longer bit-close
        assert ("loss", True, BF16) in seen and ("infer", True, BF16) in seen
        assert all(flag for _, flag, _ in seen)
