"""HST under training: recomputed side stages (activation checkpointing), matmul resize, FSDP-safe hooks."""
import pytest
import torch
import torch.nn.functional as F
from test_hst import images, tiny_vit

import petl_vision as pv
from petl_vision.bench.footprint import saved_bytes
from petl_vision.methods.hst import resize_tokens


@pytest.mark.parametrize("grid,size", [((4, 6), (16, 24)), ((4, 6), (4, 6)), ((4, 6), (2, 3)), ((4, 6), (3, 5)), ((14, 14), (28, 28)), ((14, 14), (3, 3))])
def test_resize_tokens_equals_bilinear_interpolate(grid, size):
    x = torch.randn(2, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x.transpose(1, 2).unflatten(2, grid), size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_tokens(x, grid, size), expected.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def _step(recompute: bool, autocast: bool = False):
    model = pv.apply(tiny_vit(), "hst", drop_path=0.2)  # drop-path: the recomputation replays the same random masks
    model.petl.hst.recompute = recompute
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images(batch=4))
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return model, out, grads


def test_recomputed_side_stages_match_stored_activations():
    """Outputs, every gradient and the stem BatchNorm's running statistics are those of the plain
    forward (nn.BatchNorm2d updating its statistics once per step, not again in the recomputation)."""
    plain, ref, ref_grads = _step(recompute=False)
    model, out, grads = _step(recompute=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    bn, ref_bn = model.petl.hst.stages[0].embed[1], plain.petl.hst.stages[0].embed[1]
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-7)


def test_recomputation_keeps_less_for_backward():
    """Under bf16 autocast the recomputed side network keeps only the bridges' inputs and outputs:
    at least 40% fewer bytes than with its activations stored (about 2 ViT blocks' worth at stride 4)."""
    def bytes_(recompute):
        model = pv.apply(tiny_vit(), "hst")
        model.petl.hst.recompute = recompute
        return saved_bytes(model.train(), lambda m: m(images(batch=4)).float().square().mean(), torch.bfloat16)
    assert bytes_(True) < 0.6 * bytes_(False)


def test_side_network_runs_inside_the_forward_from_the_tokens_the_last_block_returns():
    """The side network runs in the final norm's pre-hook (inside the root's forward, where FSDP keeps
    the root's parameters gathered), on the tensor the last block returned (where FSDP2 hooks the
    block's pre-backward), and the norm gets the tokens without the meta token."""
    model = pv.apply(tiny_vit(), "hst").train()
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, a, o: seen.update(block_out=o))
    model.norm.register_forward_hook(lambda m, a, o: seen.update(norm_in=a[0]))
    model.petl.hst.stages[-1].register_forward_hook(lambda m, a, o: seen.update(side_inside=model.petl.hst._run is not None))
    out = model(images())
    assert seen["side_inside"] and seen["block_out"].shape[1] == seen["norm_in"].shape[1] + 1
    assert seen["norm_in"]._base is seen["block_out"]  # a view of the returned tensor, not of the raw output
    assert out.shape == (2, 5) and out.requires_grad and model.petl.hst._run is None
