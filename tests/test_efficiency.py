"""Machine-independent cost of training under bf16 autocast (issue: leaner than full fine-tuning on a GPU).

1. every method x tiny host: each module's output keeps the autocast dtype where the host's module
   of the same name does, and the modules a method adds output the autocast dtype (norms, which
   autocast runs in fp32, and parametrizations, which produce fp32 master weights, excepted);
2. bytes saved for backward in one step, as a ratio to full fine-tuning of the same model and batch,
   on a ViT shaped like ViT-B/16 per head (197 tokens, head dim 64, MLP ratio 4; one head of width
   64, so the attention / linear activation ratio H*N/D is ViT-B/16's);
3. aten operators per training step (forward, backward, AdamW step) as a ratio to full's.
"""
import pytest
import timm
import torch
from test_autocast import CASES, build, inputs, method_args, run

import petl_vision as pv
from petl_vision.bench.footprint import op_counts, saved_bytes

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("one_thread")

# Upper bounds of the ratio to full fine-tuning (issue #14); each is explained in the README.
SAVED_BYTES_MAX = {"ssf": 0.90, "vpt": 0.75, "bitfit": 0.75, "mask_tuning": 0.80, "lora": 1.02, "hst": 0.85, "lst": 0.25, "unipt": 0.25}
OPS_MAX = {"ssf": 1.5, "lora": 1.5, "vpt": 1.2, "bitfit": 1.2}


# ----------------------------------------------------------------------------- 1. dtypes


def output_dtypes(model: torch.nn.Module, x) -> dict[str, torch.dtype]:
    """Module name -> dtype of its tensor output, for one forward under bf16 autocast."""
    seen = {}

    def hook(name):
        return lambda module, args, out: seen.__setitem__(name, out.dtype) if torch.is_tensor(out) and out.is_floating_point() else None

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.autocast("cpu", dtype=BF16):
            run(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


_FP32_BY_DESIGN = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)


@pytest.mark.parametrize("method,host", CASES)
def test_activations_keep_the_autocast_dtype(method, host):
    kind = pv.get_method(method).input_kind
    x = inputs(kind, host)
    # P2P's host is an image model: its reference forward takes images (the method turns points into them).
    reference = output_dtypes(build(host, kind).train(), inputs("image", host) if method == "p2p" else x)
    model = build(host, kind)
    pv.apply(model, method, **method_args(method, model))
    model.train()
    modules = dict(model.named_modules())
    promoted = []
    for name, dtype in output_dtypes(model, x).items():
        if dtype != torch.float32 or "parametrizations" in name.split("."):
            continue
        if name in reference:
            if reference[name] != torch.float32:
                promoted.append(name)
        elif not isinstance(modules[name], _FP32_BY_DESIGN) and not name.endswith(".base"):
            promoted.append(name)
    assert not promoted, f"{method} on {host}: fp32 outputs under bf16 autocast where the host has bf16: {promoted[:8]}"


# ----------------------------------------------------------------------------- 2-3. saved bytes and op counts


def vit_b16_shaped() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=112, patch_size=8, embed_dim=64, depth=4, num_heads=1, num_classes=10)


IMAGES = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(4) % 10


def loss_fn(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(IMAGES), LABELS)


def adapted(method: str) -> torch.nn.Module:
    model = vit_b16_shaped()
    pv.apply(model, method)
    return model.train()


@pytest.fixture(scope="module")
def full_saved_bytes() -> int:
    return saved_bytes(adapted("full"), loss_fn, BF16)


@pytest.mark.parametrize("method", sorted(SAVED_BYTES_MAX))
def test_saved_bytes_ratio_to_full(method, full_saved_bytes):
    ratio = saved_bytes(adapted(method), loss_fn, BF16) / full_saved_bytes
    assert ratio <= SAVED_BYTES_MAX[method], f"{method} saves {ratio:.3f}x full fine-tuning's bytes for backward (at most {SAVED_BYTES_MAX[method]})"


def step_ops(method: str) -> int:
    model = adapted(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    loss_fn(model).backward()  # the first step creates the optimizer state: count a later one
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(op_counts(model, loss_fn, BF16, optimizer).values())


@pytest.mark.parametrize("method", sorted(OPS_MAX))
def test_op_count_ratio_to_full(method):
    ratio = step_ops(method) / step_ops("full")
    assert ratio <= OPS_MAX[method], f"{method} runs {ratio:.3f}x full fine-tuning's aten ops per step (at most {OPS_MAX[method]})"


def test_saved_bytes_counts_activations_not_weights():
    """The linear probe saves nothing (the frozen backbone runs without a graph up to the head's
    input, which the head keeps: bf16, B x D); full fine-tuning saves far more."""
    linear = saved_bytes(adapted("linear"), loss_fn, BF16)
    assert linear <= 4 * 64 * 2 + 1024
    assert saved_bytes(adapted("full"), loss_fn, BF16) > 100 * linear
