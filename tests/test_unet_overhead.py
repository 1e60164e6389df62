"""Per-layer overhead of SPM's live membranes and of SaRA's unmerged weights (issue #14, UNet part).

On a GPU these paths are launch / host-bound, so the tests count what costs there, machine-independently,
on the tiny UNet of test_sara:
- aten calls issued per forward (`issued_ops`: calls made outside another aten call, metadata-only ops
  such as views left out; on a GPU about one kernel each), as a bound over the merged UNet's;
- host syncs (`aten::item`, `aten::_local_scalar_dense`, `aten::nonzero`, `aten::is_nonzero`): none;
- dtype / device copies (`aten::_to_copy`): no more than the merged UNet's;
- SaRA training: bytes saved for backward and aten calls per step (AdamW included), against full fine-tuning.
"""
from collections import Counter

import pytest
import timm
import torch
import torch._dynamo
from test_sara import one_thread, tiny_unet, unet_inputs  # noqa: F401  (one_thread: module-wide fixture)

import petl_vision as pv
from petl_vision.bench.footprint import saved_bytes
from petl_vision.methods.spm import spm_module

BF16 = torch.bfloat16
SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
METADATA = {
    "aten::view", "aten::reshape", "aten::as_strided", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::view_as",
    "aten::_unsafe_view", "aten::detach", "aten::detach_", "aten::alias", "aten::empty", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::numpy_T", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::slice", "aten::select",
    "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unflatten", "aten::_reshape_alias", "aten::unbind",
    "aten::to", "aten::contiguous", "aten::result_type", "aten::size", "aten::stride", "aten::dim", "aten::is_same_size", "aten::lift_fresh",
}




def profile(fn) -> torch.profiler.profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof


def issued_ops(prof) -> Counter:
    """aten calls made outside any other aten call, metadata-only ops (views, no-op to()) left out."""
    out = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in METADATA:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            out[event.name] += 1
    return out


def all_ops(prof) -> Counter:
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def forward_profile(model, autocast=False):
    """The profile of the second forward (the first builds caches), without gradients."""
    x = unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        model(*x)
        return profile(lambda: model(*x))


def spm_unet(strengths=True, membranes=("a",), weights=None):
    unet = tiny_unet()
    pv.apply(unet, "spm", membranes=membranes)
    spm = spm_module(unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in spm.membranes.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    spm.membranes.requires_grad_(False)  # loaded membranes are frozen (pv.diffusers.load_spm)
    if weights:
        spm.weights.update(weights)
    if strengths:  # per image, as transport sets them inside a pipeline call
        spm.strengths = {n: torch.rand(2, generator=g) + 0.5 for n in membranes}
    return unet


# ----------------------------------------------------------------------------- SPM


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("case", ["transport", "static_weights", "two_membranes"])
def test_spm_live_forward_costs_two_ops_per_layer(case, autocast):
    merged = forward_profile(tiny_unet().requires_grad_(False), autocast)  # frozen, as under SPM (autocast casts its weights)
    kwargs = {"transport": {}, "static_weights": dict(strengths=False, weights={"a": 0.6}),
              "two_membranes": dict(membranes=("a", "b"), weights={"b": 1.4})}[case]
    unet = spm_unet(**kwargs)
    layers = len(spm_module(unet).layers)
    live = forward_profile(unet, autocast)
    extra = sum(issued_ops(live).values()) - sum(issued_ops(merged).values())
    # Per layer: the down-projection and one fused (batched) multiply-add of the up-projection, whose
    # per-sample strengths were folded in once per forward for all layers (two ops, not per layer).
    assert extra <= 2 * layers + 2, f"{case}: {extra} extra aten calls for {layers} layers: {(issued_ops(live) - issued_ops(merged)).most_common(6)}"
    ops = all_ops(live)
    assert not any(ops[s] for s in SYNCS), {s: ops[s] for s in SYNCS}
    # Under autocast the fp32 text states are cast once per forward for every to_k / to_v membrane.
    assert ops["aten::_to_copy"] <= all_ops(merged)["aten::_to_copy"] + autocast, "dtype / device copies beyond the merged UNet's"


def test_spm_first_forward_builds_strengths_once():
    """The strengths move to the device and tile over the batch in the first forward of a pipeline call;
    the denoising steps after it reuse them (no per-step host-to-device copy, no re-tiling)."""
    unet = spm_unet()
    x = unet_inputs()
    with torch.no_grad():
        first = all_ops(profile(lambda: unet(*x)))
        second = all_ops(profile(lambda: unet(*x)))
    assert first["aten::stack"] >= 1 and second["aten::stack"] == 0
    assert second["aten::lift_fresh"] == 0 and second["aten::copy_"] < first["aten::copy_"]


def test_spm_fast_path_matches_the_reference_arithmetic():
    """The batched path equals the per-layer reference (`membrane_delta`, the general path)."""
    unet = spm_unet(membranes=("a", "b"), weights={"b": 0.7})
    x = unet_inputs()
    spm = spm_module(unet)
    with torch.no_grad():
        fast = unet(*x).sample
        spm.begin = lambda batch, device: setattr(spm, "run", None)  # every layer on the general path
        reference = unet(*x).sample
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert (fast - tiny_unet()(*x).sample).abs().max() > 1e-3  # the membranes act


def test_spm_state_changes_reach_the_next_forward():
    unet = spm_unet(membranes=("a", "b"))
    x = unet_inputs()
    spm = spm_module(unet)
    with torch.no_grad():
        both = unet(*x).sample
        spm.weights["b"] = 0.0
        only_a = unet(*x).sample
        spm.inactive = spm.inactive | {"b"}
        torch.testing.assert_close(unet(*x).sample, only_a, rtol=1e-5, atol=1e-6)
        spm.strengths = {"a": torch.zeros(2)}
        torch.testing.assert_close(unet(*x).sample, tiny_unet()(*x).sample, rtol=1e-5, atol=1e-6)
    assert (both - only_a).abs().max() > 1e-3


def test_compiled_live_spm_and_unmerged_sara_match_eager():
    """torch.compile (aot_eager) of a UNet with live per-sample membranes and unmerged SaRA weights:
    no graph break, and the eager outputs."""
    unet = spm_unet()
    pv.apply(unet, "sara", threshold=5e-2)
    with torch.no_grad():
        for p in pv.methods.sara.sara_module(unet).parameters():
            p.add_(0.05)
    x = unet_inputs()
    with torch.no_grad():
        ref = unet(*x).sample
        torch._dynamo.reset()
        explained = torch._dynamo.explain(unet)(*x)
        assert explained.graph_break_count == 0, explained.break_reasons[:3]
        torch._dynamo.reset()
        out = torch.compile(unet, backend="aot_eager")(*x).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- SaRA


def sara_unet(train=False):
    unet = tiny_unet()
    pv.apply(unet, "sara", threshold=5e-2)
    with torch.no_grad():
        for p in pv.methods.sara.sara_module(unet).parameters():
            p.add_(0.05)
    return unet.train(train)


@pytest.mark.parametrize("autocast", [False, True])
def test_sara_unmerged_forward_runs_the_merged_ops(autocast):
    unet = sara_unet()
    merged = sara_unet()
    pv.merge(merged)
    a, b = forward_profile(unet, autocast), forward_profile(merged, autocast)
    assert issued_ops(a) == issued_ops(b)
    ops = all_ops(a)
    assert not any(ops[s] for s in SYNCS) and not ops["aten::index_put_"]
    x = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(*x).sample, merged(*x).sample, rtol=0, atol=0)


def test_sara_writes_after_every_change():
    """Skipped writes never serve stale weights: optimizer steps, loaded values and overwritten
    host weights all reach the next forward."""
    unet, x = sara_unet(), unet_inputs()
    deltas = pv.methods.sara.sara_module(unet).deltas()
    with torch.no_grad():
        before = unet(*x).sample
        for d in deltas.values():
            d.values.add_(0.1)  # as an optimizer step does
        after = unet(*x).sample
        assert (after - before).abs().max() > 1e-4
        unet.load_state_dict(tiny_unet().state_dict() | {k: v for k, v in unet.state_dict().items() if k.startswith("petl.")}, strict=False)
        torch.testing.assert_close(unet(*x).sample, after, rtol=0, atol=0)
    merged = sara_unet()
    with torch.no_grad():
        for (n, d), m in zip(deltas.items(), pv.methods.sara.sara_module(merged).deltas().values()):
            m.values.copy_(d.values)
    pv.merge(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(*x).sample, after, rtol=0, atol=0)


def unet_loss(model):
    latents, t, text = unet_inputs()
    return model(latents, t, text).sample.float().square().mean()


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def vit_loss(model):
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.arange(4) % 5)


def step_ops(model, loss_fn) -> Counter:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    for _ in range(2):  # the first step creates the optimizer state: count a later one
        def step():
            with torch.autocast("cpu", dtype=BF16):
                loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        prof = profile(step)
    return issued_ops(prof)


@pytest.mark.parametrize("host", ["unet", "vit"])
def test_sara_training_step_against_full(host):
    """Bytes saved for backward: at most full's (the selected entries ride on W itself). aten calls per
    step: full's plus one write (index_put_) and one gradient gather (index_select) per adapted tensor,
    the floor of the sparse update (full's AdamW is a few foreach calls whatever the tensor count; on a
    GPU its traffic over every weight and moment is what SaRA saves)."""
    build, loss_fn = (tiny_unet, unet_loss) if host == "unet" else (vit, vit_loss)

    def adapted(method, **kw):
        model = build()
        pv.apply(model, method, **kw)
        return model.train()

    kw = dict(threshold=5e-2) if host == "unet" else dict(threshold=2e-2, train_head=False)
    full_bytes, sara_bytes = saved_bytes(adapted("full"), loss_fn, BF16), saved_bytes(adapted("sara", **kw), loss_fn, BF16)
    assert sara_bytes <= full_bytes, f"sara saves {sara_bytes / full_bytes:.3f}x full's bytes for backward"
    sara_model = adapted("sara", **kw)
    tensors = len(pv.methods.sara.sara_module(sara_model).deltas())
    full_ops, sara_ops = step_ops(adapted("full"), loss_fn), step_ops(sara_model, loss_fn)
    extra = sara_ops - full_ops
    assert sum(extra.values()) <= 2 * tensors and set(extra) <= {"aten::index_put_", "aten::index_select"}, extra.most_common(6)
    assert all(sara_ops[s] <= full_ops[s] for s in SYNCS)  # AdamW's own (its step counts), no more


def test_spm_deepcopy_keeps_its_own_state():
    import copy

    unet = spm_unet()
    x = unet_inputs()
    with torch.no_grad():
        ref = unet(*x).sample
        twin = copy.deepcopy(unet)
        torch.testing.assert_close(twin(*x).sample, ref, rtol=0, atol=0)
        spm_module(twin).weights["a"] = 0.0  # reaches the copy's next forward, not the original's
        torch.testing.assert_close(twin(*x).sample, tiny_unet()(*x).sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unet(*x).sample, ref, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_spm_under_inference_mode(autocast):
    """Strengths and activations made under torch.inference_mode carry no version counter: the forward
    works, equals the no_grad forward, and nothing derived from inference tensors is reused stale."""
    unet = spm_unet()
    spm = spm_module(unet)
    x = unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        expected = unet(*x).sample
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        spm.strengths = {"a": spm.strengths["a"].clone()}  # an inference tensor
        torch.testing.assert_close(unet(*x).sample, expected)
        spm.strengths["a"].mul_(0)  # changed in place: must not be served from the cache
        off = unet(*x).sample
    spm.strengths = {"a": torch.zeros(2)}
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        torch.testing.assert_close(off, unet(*x).sample)
