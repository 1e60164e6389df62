"""P2P: projection pixels, splatting, views, multi-view averaging, trainable set, PNG of the views."""
import math

import pytest
import timm
import torch
from PIL import Image

import petl_vision as pv
from petl_vision.methods.p2p import eval_view_rotations, pixel_coords, save_projection_png, splat, view_rotation
from petl_vision.models.point_mae import PointTransformer


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5, stem_width=8, channels=(8, 16, 24, 32)).eval()


def clouds(b=2, n=96, seed=0):
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def test_projection_puts_points_at_the_formula_pixel():
    # obj_size 11: grid = max(x range 8, y range 4) / (11 - 3) = 1, so i = floor(xy - min xy).
    # Centres c = floor((max i + min i + 2) / 2) = (5, 3); pixel = i + 11 // 2 - c = i + (0, 2).
    points = torch.tensor([[[0.0, 0.0, 5.0], [8.0, 4.0, -1.0], [4.3, 2.9, 0.0]]])
    assert pixel_coords(points, 11).tolist() == [[[0, 2], [8, 6], [4, 4]]]
    # Random clouds: the formula written out, and the 3x3 splat stays inside the square.
    xyz = clouds(3, 50)
    for obj in (8, 16, 224):
        pix = pixel_coords(xyz, obj)
        low = xyz[..., :2].amin(1, keepdim=True)
        grid = (xyz[..., :2].amax(1, keepdim=True) - low).amax(-1, keepdim=True) / (obj - 3)
        idx = torch.floor((xyz[..., :2] - low) / grid).clamp(0, obj - 3)
        center = torch.floor((idx.amax(1, keepdim=True) + idx.amin(1, keepdim=True) + 2) / 2)
        assert torch.equal(pix, (idx + obj // 2 - center).long())
        assert pix.min() >= 1 and pix.max() <= obj - 2
        widest = (xyz[..., :2].amax(1) - xyz[..., :2].amin(1)).argmax(-1)
        for b in range(3):  # the wider axis spans the square from pixel 1 to obj - 2
            assert pix[b, :, widest[b]].min() == 1 and pix[b, :, widest[b]].max() == obj - 2


def test_splat_sums_3x3_neighbourhoods_and_pads():
    pixels = torch.tensor([[[1, 1], [2, 2], [4, 3]]])
    features = torch.tensor([[[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]]])
    image = splat(features, pixels, obj_size=6, image_hw=(10, 8))  # padded by (2, 1) on top / left
    assert image.shape == (1, 2, 10, 8)
    square = image[0, :, 2:8, 1:7]
    expected = torch.zeros(2, 6, 6)
    expected[0, 0:3, 0:3] += 1
    expected[0, 1:4, 1:4] += 10  # overlapping splats add up (no z-buffer)
    expected[1, 3:6, 2:5] += 1
    assert torch.equal(square, expected) and image.sum() == square.sum()


def test_views():
    rotations = eval_view_rotations(40)
    assert rotations.shape == (40, 3, 3)
    theta, phi = torch.tensor(0.2 * math.pi * 3), torch.tensor(-0.4 * math.pi + 0.2 * math.pi / 3)
    assert torch.allclose(rotations[10 + 3], view_rotation(theta, phi), atol=1e-6)  # elevation 1, azimuth 3
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(40, 3, 3), atol=1e-6)
    # theta = pi / 2, phi = 0: a rotation by -pi/2 about z.
    r = view_rotation(torch.tensor(math.pi / 2), torch.tensor(0.0))
    assert torch.allclose(r, torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]), atol=1e-6)
    # theta = 0, phi: a rotation by -phi about (0, -1, 0), i.e. by +phi about y.
    phi = torch.tensor(-0.3 * math.pi)
    c, s = math.cos(phi), math.sin(phi)
    assert torch.allclose(view_rotation(torch.tensor(0.0), phi), torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]]), atol=1e-6)


def p2p_added(point_dim=8, graph_dim=64):
    """Parameters P2P adds: point encoder, then the colouring module (timm BasicBlock, two 1x1 convs)."""
    p, g = point_dim, graph_dim
    encoder = (3 * p + p) + 2 * p * g + 2 * g + (g * g + g)  # Conv1d, EdgeConv conv + GroupNorm, Conv1d
    colouring = 2 * 9 * g * g + 2 * 2 * g + (g * g + g) + (3 * g + 3)
    return encoder + colouring


@pytest.mark.parametrize("make,graph_dim", [(tiny_vit, 64), (tiny_resnet, 16)])
def test_apply_forward_trainable_and_view_averaging(make, graph_dim, tmp_path):
    model = pv.apply(make(), "p2p", img_size=32, k=8, test_views=4, graph_dim=graph_dim)
    s = pv.summary(model)
    assert s.added["p2p"] == p2p_added(8, graph_dim) and p2p_added() == 83_683  # "about 0.08M" at the official sizes
    host_norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
    host_norms = [m for m in host_norms if all(m is not n for n in model.petl.modules())]
    norms = sum(p.numel() for m in host_norms for p in m.parameters(recurse=False))
    head = sum(p.numel() for p in model.get_classifier().parameters())
    cls = model.cls_token.numel() if hasattr(model, "cls_token") else 0
    assert norms > 0 and s.trainable == s.by_method["p2p"] == p2p_added(8, graph_dim) + norms + head + cls
    model.train()
    out = model(clouds())
    assert out.shape == (2, 5)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    model.eval()
    x = clouds(seed=1)
    projector = model.petl.p2p
    with torch.no_grad():
        images = projector(x, projector.test_rotations.expand(2, -1, -1, -1))  # (B * 4, 3, 32, 32)
        per_view = model.forward(images).reshape(2, 4, 5)  # .forward skips the hooks
        assert torch.allclose(model(x), per_view.mean(1), atol=1e-6)
    expected = model(x)
    pv.save_adapter(model, tmp_path / "p2p")
    assert torch.equal(pv.load_adapter(make(), tmp_path / "p2p")(x), expected)


def test_projection_png_and_errors(tmp_path):
    model = pv.apply(tiny_vit(), "p2p", k=8, test_views=8, obj_size=24)
    path = save_projection_png(model, clouds(1)[0], tmp_path / "views.png")
    assert Image.open(path).size == (8 * 32, 32)  # 8 azimuths at one elevation, 32 x 32 images
    model40 = pv.apply(tiny_vit(), "p2p", k=8)
    assert Image.open(save_projection_png(model40, clouds(1)[0], tmp_path / "v40.png")).size == (10 * 32, 4 * 32)
    with pytest.raises(ValueError, match=r"point clouds \(B, N, 3\); got \(2, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(pv.UnsupportedHostError, match="p2p.*timm image classifier.*PointTransformer"):
        pv.apply(PointTransformer(num_classes=5, num_group=8, group_size=8, dim=32, depth=1, num_heads=2), "p2p")
    with pytest.raises(ValueError, match="obj_size 40 is larger"):
        pv.apply(tiny_vit(), "p2p", obj_size=40)
    with pytest.raises(pv.MergeError, match="p2p"):
        pv.merge(model)


def test_learned_layers_and_images_follow_autocast():
    """Under bf16 autocast the encoder, the colouring and the images given to the image model are bf16
    (the kNN and the view rotation stay fp32, see test_autocast); without autocast, all fp32."""
    model = pv.apply(tiny_vit(), "p2p", test_views=4).train()
    seen = {}
    for name in ("encoder", "encoder.proj_layer", "img_block", "img_layer", ""):
        module = model.petl.p2p.get_submodule(name) if name else model.petl.p2p
        module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name or "images", o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clouds())
    assert seen == dict.fromkeys(["encoder.proj_layer", "encoder", "img_block", "img_layer", "images"], torch.bfloat16), seen
    assert out.dtype == torch.bfloat16
    model(clouds())
    assert set(seen.values()) == {torch.float32}
