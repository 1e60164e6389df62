"""Tiny random hosts shared by the tests (built offline with pretrained=False)."""
import pytest
import timm
import torch

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
