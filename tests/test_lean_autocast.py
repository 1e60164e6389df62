"""What keeps SSF, VPT, LoRA and BitFit lean under bf16 autocast (issue #14), pinned by mechanism.

test_efficiency checks the ratios to full fine-tuning; these tests fail on the regressions that
made them grow: fp32 activations kept for backward, lora_A keeping its own copy of the input,
weight gradients computed for frozen weights, a per-layer choice of SSF's form lost.
"""
import pytest
import torch
from conftest import input_for, make_host, perturb_trainable

import petl_vision as pv
from petl_vision.bench.footprint import op_counts
from petl_vision.methods.ssf import ScaleShift, SSFLayer
from petl_vision.methods.vpt import DropTokens, InsertTokens

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("one_thread")


def loss_fn(model):
    return model(input_for("vit")).float().square().mean()


def saved_by_dtype(model) -> dict[torch.dtype, int]:
    """dtype -> bytes of the distinct activation storages kept for backward under bf16 autocast."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=BF16):
            loss = loss_fn(model)
    loss.backward()
    out: dict[torch.dtype, int] = {}
    for dtype, nbytes in seen.values():
        out[dtype] = out.get(dtype, 0) + nbytes
    return out


def adapted(method, **kwargs):
    model = pv.apply(make_host("vit"), method, **kwargs)
    perturb_trainable(model)
    return model.train()


# ----------------------------------------------------------------------------- SSF


def test_ssf_form_per_layer():
    model = adapted("ssf")
    modes = {n: m.mode for n, m in model.named_modules() if isinstance(m, SSFLayer)}
    block = {"norm1": "norm", "norm2": "norm", "attn.qkv": "linear", "attn.proj": "linear", "mlp.fc1": "linear", "mlp.fc2": "input"}
    assert modes == {"patch_embed.proj": "input", "norm": "norm", **{f"blocks.{i}.{k}": v for i in range(2) for k, v in block.items()}}
    official = adapted("ssf", save_output=False)
    assert {m.mode for m in official.modules() if isinstance(m, SSFLayer)} == {"input"}


def test_ssf_keeps_no_fp32_activation_beyond_the_hosts():
    """The fp32 tensors kept are the host's own (its LayerNorms' fp32 inputs: the residual stream);
    SSF's outputs are bf16 and its scale/shift gradients fp32."""
    full = saved_by_dtype(adapted("full"))
    model = adapted("ssf")
    ssf = saved_by_dtype(model)
    activation = 2 * 17 * 32 * 4  # one fp32 (B, N, D) tensor; the folded norm affines are (D,) each
    assert ssf[torch.float32] - full[torch.float32] < activation
    assert ssf[torch.float32] + ssf[BF16] < 0.9 * (full[torch.float32] + full[BF16])
    official = saved_by_dtype(adapted("ssf", save_output=False))  # the official form: y * s + t after every layer
    assert official[torch.float32] + official[BF16] > ssf[torch.float32] + ssf[BF16]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
    with torch.autocast("cpu", dtype=BF16):
        qkv, fc2 = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc2
        assert qkv(torch.randn(2, 5, 32)).dtype == BF16 and fc2(torch.randn(2, 5, 128, dtype=BF16)).dtype == BF16


def test_ssf_lean_and_official_forms_agree_under_autocast():
    lean, official = adapted("ssf"), adapted("ssf", save_output=False)
    official.load_state_dict(lean.state_dict())
    outs, grads = [], []
    for model in (lean, official):
        with torch.autocast("cpu", dtype=BF16):
            out = model(input_for("vit"))
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert outs[0].dtype == torch.float32 and ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < 2e-2
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 3e-2


@pytest.mark.parametrize("dim,keep_output", [(-1, True), (-1, False), (1, False)])
def test_scale_shift_gradcheck(dim, keep_output):
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4) if dim == -1 else (2, 4, 3, 2)
    x = torch.randn(*shape, dtype=torch.double, generator=g, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(4, dtype=torch.double, generator=g)).requires_grad_()
    shift = torch.randn(4, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ScaleShift.apply(*a, dim, keep_output), (x, scale, shift))


@pytest.mark.parametrize("keep_output", [True, False])
def test_scale_shift_with_a_zero_scale_gives_finite_gradients(keep_output):
    """Keeping y gives autograd's gradient; keeping z has lost y in that channel and gives 0 there."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    scale = torch.tensor([1.2, 0.0, 0.9, 1.1], requires_grad=True)
    shift = torch.randn(4, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 5, 4, generator=g)
    ScaleShift.apply(y, scale, shift, -1, keep_output).backward(grad_out)
    ref = [t.detach().clone().requires_grad_() for t in (y, scale, shift)]
    (ref[0] * ref[1] + ref[2]).backward(grad_out)
    assert torch.isfinite(scale.grad).all()
    torch.testing.assert_close(y.grad, ref[0].grad)
    torch.testing.assert_close(shift.grad, ref[2].grad)
    expected = ref[1].grad.clone()
    if keep_output:
        expected[1] = 0.0
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-5)


def test_ssf_zero_scale_on_a_vit_gives_autograds_gradient():
    """Every SSF layer of a ViT folds or keeps y, so a zeroed channel still gets autograd's gradient."""
    lean, official = adapted("ssf"), adapted("ssf", save_output=False)
    with torch.no_grad():
        for model in (lean, official):
            for m in model.modules():
                if isinstance(m, SSFLayer):
                    m.scale[0] = 0.0
    official.load_state_dict(lean.state_dict())
    for model in (lean, official):
        loss_fn(model).backward()
    for (name, a), b in zip(lean.named_parameters(), official.parameters()):
        if a.requires_grad:
            assert torch.isfinite(a.grad).all(), name
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- LoRA


def test_lora_a_reads_the_base_layers_input_storage():
    model = adapted("lora")
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    seen = {}

    def record(key):
        return lambda module, args: seen.setdefault(key, []).append((args[0].untyped_storage().data_ptr(), args[0].dtype))

    for i, layer in enumerate(layers):
        layer.get_base_layer().register_forward_pre_hook(record(("base", i)))
        layer.lora_A["default"].register_forward_pre_hook(record(("lora_A", i)))
    with torch.autocast("cpu", dtype=BF16):
        model(input_for("vit"))
    assert len(layers) == 8
    for i in range(len(layers)):
        assert seen[("base", i)] == seen[("lora_A", i)] and seen[("base", i)][0][1] == BF16
    # without autocast nothing is cast: the base layer reads the caller's tensor
    seen.clear()
    x = torch.randn(2, 5, 32)
    layers[0](x)
    assert seen[("base", 0)] == seen[("lora_A", 0)] == [(x.untyped_storage().data_ptr(), torch.float32)]


def test_lora_keeps_no_more_than_full_fine_tuning():
    lora, full = saved_by_dtype(adapted("lora")), saved_by_dtype(adapted("full"))
    assert lora[torch.float32] <= full[torch.float32]
    assert sum(lora.values()) <= sum(full.values())


# ----------------------------------------------------------------------------- VPT


def test_insert_and_drop_tokens_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.double, generator=g, requires_grad=True)
    prompts = torch.randn(2, 4, 3, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: InsertTokens.apply(a, b, 1), (x, prompts))
    y = torch.randn(2, 9, 3, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: DropTokens.apply(a, 1, 4), (y,))
    out = InsertTokens.apply(x, prompts, 2)
    assert torch.equal(out[:, 2:6], prompts) and torch.equal(DropTokens.apply(out, 2, 4), x)


@pytest.mark.parametrize("project_dim", [-1, 8])
def test_vpt_prompts_in_the_autocast_dtype_and_one_copy_each_way(project_dim):
    model = adapted("vpt", num_prompts=3, project_dim=project_dim, dropout=0.1)
    vpt = model.petl.vpt
    with torch.autocast("cpu", dtype=BF16):
        assert vpt.layer_prompts(0, 2).dtype == BF16
    ops = op_counts(model, loss_fn, BF16)
    # inserting and dropping are one cat each way; autograd's backward of a cat of slices writes a
    # zero-filled copy per slice (slice_backward) and adds them
    assert ops["aten::slice_backward"] == 0
    assert ops["aten::cat"] >= 2 * 2 * 2  # deep, 2 blocks: insert and drop, forward and backward
    assert vpt.prompts.grad.dtype == torch.float32 and vpt.prompts.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- BitFit


def test_bitfit_computes_no_gradient_for_frozen_weights():
    """A BitFit step runs one matmul per linear in backward (the input gradient), none for weights."""
    def mms(method):
        ops = op_counts(adapted(method), loss_fn, BF16)
        return ops["aten::mm"] + ops["aten::addmm"]

    full, bitfit = mms("full"), mms("bitfit")
    frozen_linears = 2 * 4  # qkv, proj, fc1, fc2 per block; the head trains
    assert bitfit == full - frozen_linears
