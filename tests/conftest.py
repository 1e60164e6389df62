"""Tiny random hosts shared by the tests (built offline with pretrained=False), and shared helpers."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> builder of a tiny host; every method x host pair is tested over these.
HOSTS = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5),
    "vit_reg_avg": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        class_token=False, reg_tokens=2, global_pool="avg", fc_norm=True,
    ),
    "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5),
    "vit_rect": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(24, 40), patch_size=(4, 8), embed_dim=32, depth=2, num_heads=2, num_classes=5),
    "resnet": lambda: timm.create_model("resnet10t", pretrained=False, num_classes=5, stem_width=8, channels=(8, 16, 24, 32)),
    "convnext": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), dims=(16, 24, 32, 40)),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5),
}
TOKEN_HOSTS = ["vit", "vit_reg_avg", "deit_distilled", "vit_rect"]


def input_for(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = (24, 40) if name == "vit_rect" else (32, 32)
    return torch.randn(2, 3, *size, generator=g)


def make_host(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return HOSTS[name]().eval()


@pytest.fixture(params=sorted(HOSTS))
def host_name(request):
    return request.param


def load_script(name: str):
    """The module of scripts/<name>.py, freshly executed."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb_trainable(model, seed=1):
    """Move trainable tensors away from their init so equality tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def one_thread():
    """Tiny models: a single intra-op thread avoids contention on the shared 2-core machine.
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline (test_sara.tiny_pipeline) saved as a diffusers folder."""
    from test_sara import tiny_pipeline

    root = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(root).save_pretrained(root / "pipe")
    return root / "pipe"
