"""P2P: Point-to-Pixel Prompting (Wang et al., NeurIPS 2022) with any timm image classifier.

    points (B, N, 3)
      -> point encoder on the cloud as given: Conv1d 3->8, EdgeConv (k=32 xyz neighbours,
         [f_j - f_i, f_i], conv 16->64, GroupNorm(4), LeakyReLU 0.2, max over k), Conv1d 64->64
      -> geometry-preserved projection of the cloud rotated to a view: orthographic onto x/y, grid
         size max(x/y range) / (obj_size - 3), each point's features added into the 3x3 pixels
         around its pixel (summed, no z-buffer), centred in an obj_size square, zero-padded to the
         image size                                                            (B, 64, H, W)
      -> colouring: timm BasicBlock + 1x1 conv, 1x1 conv to 3 channels, sigmoid, normalised with the
         image model's mean/std (its timm pretrained_cfg; ImageNet's for most models)
      -> the frozen image model, whose norm layers, CLS token and head train.

Training uses one random view per cloud (azimuth in [0.04, 1.94] pi, elevation in [-0.4, -0.2] pi)
and the official per-axis scale augmentation of the projected cloud; evaluation averages the
logits of `test_views` fixed views (40: 10 azimuths x 4 elevations, the official grid).

``pv.apply(timm_model, "p2p")`` keeps the same model object; a forward pre-hook on the model turns
the point clouds passed to ``model(points)`` into images (B * views, 3, H, W), and a forward hook
averages the logits over views. ``model.forward_features`` and friends still take images. The
point encoder and colouring module live in ``model.petl.p2p``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.resnet import BasicBlock
from torch import nn

from ..core.errors import UnsupportedHostError
from ..core.registry import Method, MethodConfig, register_method
from ..core.state import STATE_NAME, get_state
from ..hosts import classifier_modules, unfreeze_head
from ..models.pointnet_ops import edge_features, knn
from ._wrap import select_targets

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclasses.dataclass
class P2PConfig(MethodConfig):
    """Config of P2P.

    k: xyz neighbours per point in the encoder's EdgeConv (32).
    point_dim: width of the first point feature (Conv1d 3 -> 8).
    graph_dim: width of the EdgeConv, projected and image features (64).
    img_size: side of the images given to the image model (0 = the model's input size).
    obj_size: side of the square the object is projected into, centred in the image (0 = img_size;
        official: 224 for ModelNet40, 192 for ScanObjectNN, padded to 224). At least 4.
    test_views: views averaged at evaluation (40 = 10 azimuths x 4 elevations, official; a multiple
        of 10 gives 10 azimuths per elevation, any other n gives n azimuths at elevation -0.3 pi).
    train_scale: in training, scale the projected cloud per axis by U(2/3, 3/2) (the official
        scale-and-translate augmentation; translation does not change the projection).
    train_norms: train the image model's norm layers (LayerNorm, BatchNorm, GroupNorm).
    train_cls_token: train the image model's CLS token when it has one.
    train_head: train the classifier head.
    official: train the official parameter set instead of train_norms / train_cls_token: the image
        model's parameters whose name contains the official `update_type`, "bn" for ResNets (timm
        architecture name containing "resnet", so `downsample.1` stays frozen), "norm" otherwise,
        and the CLS token only when "vit" is in the architecture name (so not on
        deit_base_patch16_224). ResNet-50 with 40 classes: 211,083 trainable image-model parameters
        (218,763 by default). The official loss smooths labels with eps / (C - 1) on the other
        classes: torch's label_smoothing of eps * C / (C - 1) (`official_label_smoothing`; the
        point-cloud trainer applies it to its label_smoothing when official is set).
    """

    name = "p2p"
    k: int = 32
    point_dim: int = 8
    graph_dim: int = 64
    img_size: int = 0
    obj_size: int = 0
    test_views: int = 40
    train_scale: bool = True
    train_norms: bool = True
    train_cls_token: bool = True
    train_head: bool = True
    official: bool = False

    def __post_init__(self):
        if self.test_views < 1:
            raise ValueError(f"P2PConfig.test_views must be >= 1, got {self.test_views}")
        if self.obj_size and self.obj_size < 4:
            raise ValueError(f"P2PConfig.obj_size must be 0 (= img_size) or >= 4, got {self.obj_size}")


# ----------------------------------------------------------------------------- geometry


def rotation_about(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) by `angle` (...) about unit `axis` (..., 3) (Rodrigues)."""
    x, y, z = axis.unbind(-1)
    c, s = torch.cos(angle), torch.sin(angle)
    t, zero = 1 - c, torch.zeros_like(angle)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*angle.shape, 3, 3)
    outer = axis.unsqueeze(-1) * axis.unsqueeze(-2)
    eye = torch.eye(3, dtype=angle.dtype, device=angle.device)
    return c[..., None, None] * eye + s[..., None, None] * cross + t[..., None, None] * outer


def view_rotation(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """The official view (..., 3, 3): rotate by -theta about z, then by -phi about (sin t, -cos t, 0)."""
    z_axis = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(*theta.shape, 3)
    tilt_axis = torch.stack([torch.sin(theta), -torch.cos(theta), torch.zeros_like(theta)], -1)
    return rotation_about(z_axis, -theta) @ rotation_about(tilt_axis, -phi)


def eval_azimuths(n: int) -> int:
    """Azimuths per elevation of the n evaluation views: 10 when n is a multiple of 10, else n."""
    return 10 if n % 10 == 0 else n


def eval_view_rotations(n: int) -> torch.Tensor:
    """(n, 3, 3) evaluation views, elevation-major: azimuths evenly spaced in [0, 2) pi (see eval_azimuths)
    at n / azimuths elevations evenly spaced in [-0.4, -0.2] pi (-0.3 pi when there is one).
    40 gives the official grid: 10 azimuths x 4 elevations."""
    n_theta = eval_azimuths(n)
    n_phi = n // n_theta
    theta = torch.linspace(0, 2, n_theta + 1, dtype=torch.float64)[:-1]
    phi = torch.linspace(-0.4, -0.2, n_phi, dtype=torch.float64) if n_phi > 1 else torch.tensor([-0.3], dtype=torch.float64)
    grid_phi, grid_theta = torch.meshgrid(phi, theta, indexing="ij")
    return view_rotation(grid_theta.reshape(-1) * math.pi, grid_phi.reshape(-1) * math.pi).float()


def random_view_rotations(batch: int, device=None) -> torch.Tensor:
    """(B, 3, 3) training views: azimuth U(0.04, 1.94) pi, elevation U(-0.4, -0.2) pi."""
    theta = (torch.rand(batch, device=device) * 1.9 + 0.04) * math.pi
    phi = (torch.rand(batch, device=device) * 0.2 - 0.4) * math.pi
    return view_rotation(theta, phi)


def pixel_coords(points: torch.Tensor, obj_size: int) -> torch.Tensor:
    """(B, N, 2) integer (row, col) of each point's centre pixel in the obj_size square.

    With grid = max(x range, y range) / (obj_size - 3) and i = floor((xy - min xy) / grid) in
    [0, obj_size - 3], the object is centred: pixel = i + 1 + obj_size // 2 - 1 - c, where
    c = floor((max i + min i + 2) / 2) per axis. The 3x3 splat then stays inside [0, obj_size).
    """
    xy = points[..., :2].float()
    low = xy.amin(dim=1, keepdim=True)
    grid = (xy.amax(dim=1, keepdim=True) - low).amax(dim=-1, keepdim=True) / (obj_size - 3)
    idx = torch.floor((xy - low) / grid.clamp_min(1e-12)).clamp(0, obj_size - 3).long()
    center = torch.div(idx.amax(dim=1, keepdim=True) + idx.amin(dim=1, keepdim=True) + 2, 2, rounding_mode="floor")
    return idx + obj_size // 2 - center


def splat(features: torch.Tensor, pixels: torch.Tensor, obj_size: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """Sum point features (B, N, C) into the 3x3 pixels around `pixels` (B, N, 2) -> (B, C, H, W), zero-padded."""
    b, n, c = features.shape
    offsets = torch.tensor([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)], device=pixels.device)
    dense = (pixels.unsqueeze(2) + offsets).reshape(b, n * 9, 2)
    flat = dense[..., 0] * obj_size + dense[..., 1]
    values = features.unsqueeze(2).expand(b, n, 9, c).reshape(b, n * 9, c)
    canvas = features.new_zeros(b, obj_size * obj_size, c).scatter_add_(1, flat.unsqueeze(-1).expand(-1, -1, c), values)
    canvas = canvas.reshape(b, obj_size, obj_size, c).permute(0, 3, 1, 2)
    top, left = (image_hw[0] - obj_size) // 2, (image_hw[1] - obj_size) // 2
    pad = (left, image_hw[1] - obj_size - left, top, image_hw[0] - obj_size - top)
    return nn.functional.pad(canvas, pad)


# ----------------------------------------------------------------------------- modules


class PointEncoder(nn.Module):
    """xyz (B, N, 3) -> per-point features (B, N, graph_dim): Conv1d, one EdgeConv, Conv1d."""

    def __init__(self, k: int = 32, point_dim: int = 8, graph_dim: int = 64):
        super().__init__()
        self.k = k
        self.input_trans = nn.Conv1d(3, point_dim, 1)
        self.graph_layer = nn.Sequential(nn.Conv2d(2 * point_dim, graph_dim, 1, bias=False), nn.GroupNorm(4, graph_dim), nn.LeakyReLU(0.2))
        self.proj_layer = nn.Conv1d(graph_dim, graph_dim, 1)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        f = self.input_trans(xyz.transpose(1, 2))  # (B, point_dim, N)
        with torch.autocast(xyz.device.type, enabled=False):  # neighbours from fp32 distances, also under fp16/bf16 autocast
            idx = knn(xyz.float(), xyz.float(), self.k)
        f = self.graph_layer(edge_features(f, idx)).amax(dim=-1)
        return self.proj_layer(f).transpose(1, 2)


class P2PProjector(nn.Module):
    """Point encoder + projection + colouring; the hooks that feed the image model (``model.petl.p2p``)."""

    def __init__(self, config: P2PConfig, image_hw: tuple[int, int], mean, std):
        super().__init__()
        self.image_hw = image_hw
        self.obj_size = config.obj_size or min(image_hw)
        if self.obj_size > min(image_hw):
            raise ValueError(f"P2PConfig.obj_size {self.obj_size} is larger than the image {image_hw}")
        self.train_scale = config.train_scale
        self.encoder = PointEncoder(config.k, config.point_dim, config.graph_dim)
        d = config.graph_dim
        self.img_block = nn.Sequential(BasicBlock(d, d), nn.Conv2d(d, d, 1))
        self.img_layer = nn.Conv2d(d, 3, 1)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("test_rotations", eval_view_rotations(config.test_views), persistent=False)
        self._views = 1  # views of the current call, set by the pre-hook, read by the forward hook

    def colour(self, points: torch.Tensor, rotations: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] (B * V, 3, H, W) of points (B, N, 3) seen through rotations (B, V, 3, 3)."""
        points = points[..., :3]
        b, v = rotations.shape[:2]
        features = self.encoder(points)  # (B, N, C): from the cloud as given, the same for every view
        # The geometry in fp32: rotated under fp16/bf16 (autocast or a half-precision model), the
        # coordinates keep 8-11 bits and many points land on a neighbouring pixel.
        with torch.autocast(points.device.type, enabled=False):
            views = torch.einsum("bvij,bnj->bvni", rotations.float(), points.float())
            if scale is not None:
                views = views * scale.float().view(b, 1, 1, 3)
        views = views.reshape(b * v, *points.shape[1:])
        features = features.repeat_interleave(v, dim=0)
        canvas = splat(features, pixel_coords(views, self.obj_size), self.obj_size, self.image_hw)
        return torch.sigmoid(self.img_layer(self.img_block(canvas)))

    def forward(self, points: torch.Tensor, rotations: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (B * V, 3, H, W) for the image model."""
        images = self.colour(points, rotations, scale)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)  # in the autocast dtype under autocast

    def points_to_images(self, model: nn.Module, args: tuple):
        """Pre-hook of the image model: points (B, N, 3) -> images (B * V, 3, H, W)."""
        points = args[0]
        if not (isinstance(points, torch.Tensor) and points.ndim == 3 and points.shape[-1] >= 3):
            shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
            raise ValueError(f"a P2P model takes point clouds (B, N, 3); got {shape}")
        b = points.shape[0]
        if model.training:
            rotations = random_view_rotations(b, points.device).unsqueeze(1)
            scale = torch.empty(b, 3, device=points.device).uniform_(2 / 3, 3 / 2) if self.train_scale else None
        else:
            rotations, scale = self.test_rotations.unsqueeze(0).expand(b, -1, -1, -1), None
        self._views = rotations.shape[1]
        return (self(points, rotations, scale),) + args[1:]

    def average_views(self, model: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the image model: logits (B * V, C) -> (B, C), the mean over views."""
        v = self._views
        return output.reshape(-1, v, *output.shape[1:]).mean(dim=1) if v > 1 else output


def model_image_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) a timm model expects: its patch embedding's img_size, else its pretrained_cfg input_size."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    return (size, size) if isinstance(size, int) else tuple(size)


def official_architecture(model: nn.Module) -> str:
    """The timm architecture name the official rules key on (`pretrained_cfg["architecture"]`, e.g.
    "resnet50", "deit_base_patch16_224"), lower case; "" when unknown."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or "").lower()


def official_label_smoothing(eps: float, num_classes: int) -> float:
    """torch's `label_smoothing` equal to the official P2P loss with smoothing eps over C classes.

    The official targets are 1 - eps on the true class and eps / (C - 1) on each other class;
    torch's are 1 - s + s / C and s / C, equal for s = eps * C / (C - 1) (0.2 -> 0.2051 for 40 classes).
    """
    if num_classes < 2:
        raise ValueError(f"official_label_smoothing: num_classes must be >= 2, got {num_classes}")
    return eps * num_classes / (num_classes - 1)


@register_method
class P2P(Method):
    name = "p2p"
    config_class = P2PConfig
    input_kind = "points"
    merge_refusal = "the point encoder and colouring module are extra modules in front of the image model"

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        if not classifier_modules(model) or not isinstance(getattr(model, "pretrained_cfg", None), dict):
            raise UnsupportedHostError(
                f"method 'p2p' needs a timm image classifier (a model with pretrained_cfg and get_classifier()); "
                f"got {type(model).__name__} (supported: any timm classification model: ViT, ResNet, ConvNeXt, Swin, ...)"
            )

    @classmethod
    def attach(cls, model: nn.Module, config: P2PConfig) -> None:
        image_hw = (config.img_size, config.img_size) if config.img_size else model_image_size(model)
        cfg = model.pretrained_cfg
        projector = P2PProjector(config, image_hw, cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
        ref = next(model.parameters())
        projector.to(device=ref.device, dtype=ref.dtype).train(model.training)
        get_state(model).add_module("p2p", projector)
        model.register_forward_pre_hook(projector.points_to_images)
        model.register_forward_hook(projector.average_views)
        if config.official:
            architecture = official_architecture(model)
            key = "bn" if "resnet" in architecture else "norm"
            for name, param in model.named_parameters():  # the image model's, not P2P's own
                if key in name and not name.startswith(STATE_NAME + "."):
                    param.requires_grad_(True)
            if "vit" in architecture and isinstance(getattr(model, "cls_token", None), nn.Parameter):
                model.cls_token.requires_grad_(True)
        else:
            if config.train_norms:
                for _, module in select_targets(model, lambda m: isinstance(m, NORM_LAYERS)):
                    module.requires_grad_(True)
            if config.train_cls_token and isinstance(getattr(model, "cls_token", None), nn.Parameter):
                model.cls_token.requires_grad_(True)
        if config.train_head:
            unfreeze_head(model, cls.name)


@torch.no_grad()
def save_projection_png(model: nn.Module, points: torch.Tensor, path: str | Path, views: int | None = None) -> Path:
    """Write the coloured images the image model sees for one cloud (N, 3) at its evaluation views.

    views: how many of the evaluation views to show (default all); one row per elevation (see
    eval_azimuths).
    Returns the path of the PNG.
    """
    from PIL import Image

    state = get_state(model)
    if state is None or not hasattr(state, "p2p"):
        raise ValueError("save_projection_png needs a model with P2P applied (pv.apply(model, 'p2p'))")
    projector: P2PProjector = state.p2p
    points = points.reshape(1, -1, points.shape[-1]) if points.ndim == 2 else points[:1]
    rotations = projector.test_rotations[:views] if views else projector.test_rotations
    ref = projector.mean
    was_training = projector.training
    projector.eval()
    images = projector.colour(points.to(ref.device, ref.dtype), rotations.unsqueeze(0)).float().cpu()  # (V, 3, H, W)
    projector.train(was_training)
    n = images.shape[0]
    cols = min(n, eval_azimuths(projector.test_rotations.shape[0]))
    rows = math.ceil(n / cols)
    h, w = images.shape[-2:]
    grid = torch.ones(3, rows * h, cols * w)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path
