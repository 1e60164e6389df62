"""Pretrain the demo ViT backbone on procedurally rendered strokes and shapes.

Every training image is generated on the fly: a stroke figure (one of a set of
named shapes, or one of a set of random multi-stroke "glyphs") is drawn with a
pen of random width on a 16x16 canvas, randomly rotated, sheared, scaled and wobbled,
then pooled to 8x8, quantised to 17 grey levels and upsampled back to 32x32
(bilinear), so the images look like blurry low-resolution pen strokes. The
ViT learns to name the figure; its backbone (no head) is saved as safetensors.

No real dataset is used. Usage:
    python scripts/make_demo_backbone.py [--steps N] [--batch-size B] [--seed S] [--out PATH]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from petl_vision.models.demo_vit import DEMO_VIT_KWARGS, DEMO_VIT_PATH, create_demo_vit

CANVAS = 16  # pen-drawing resolution
LOWRES = 8  # resolution the drawing is pooled to
SIZE = 32  # final image size (bilinear upsampling of the 8x8 image)
GLYPH_SEED = 1234  # fixes the random glyph templates (independent of --seed)


# ----------------------------------------------------------------------------
# Figures: each returns a list of polylines, arrays (k, 2) of (x, y) in about
# [-1, 1], y pointing down. A polyline of one point is a dot.
# ----------------------------------------------------------------------------
def arc(cx, cy, rx, ry, t0, t1, n=16):
    """Points on an elliptical arc from angle t0 to t1 (radians)."""
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def line(*pts):
    """A polyline through the given (x, y) points."""
    return np.asarray(pts, dtype=np.float64)


def _u(rng, lo, hi):
    return rng.uniform(lo, hi)


SHAPES = {
    "hline": lambda r: [line((-1, 0), (1, 0))],
    "vline": lambda r: [line((0, -1), (0, 1))],
    "slash": lambda r: [line((-0.6, 1), (0.6, -1))],
    "backslash": lambda r: [line((-0.6, -1), (0.6, 1))],
    "circle": lambda r: [arc(0, 0, 1, 1, 0, 2 * math.pi, 24)],
    "oval": lambda r: [arc(0, 0, _u(r, 0.45, 0.65), 1, 0, 2 * math.pi, 24)],
    "open_right": lambda r: [arc(0, 0, 0.8, 1, _u(r, 0.25, 0.45) * math.pi, _u(r, 1.55, 1.75) * math.pi)],
    "open_left": lambda r: [arc(0, 0, 0.8, 1, -_u(r, 0.55, 0.75) * math.pi, _u(r, 0.55, 0.75) * math.pi)],
    "cup": lambda r: [arc(0, -0.3, 1, 1.2, _u(r, -0.05, 0.1) * math.pi, _u(r, 0.9, 1.05) * math.pi)],
    "cap": lambda r: [arc(0, 0.3, 1, 1.2, _u(r, 0.95, 1.1) * math.pi, _u(r, 1.9, 2.05) * math.pi)],
    "plus": lambda r: [line((-1, 0), (1, 0)), line((0, -1), (0, 1))],
    "cross": lambda r: [line((-1, -1), (1, 1)), line((-1, 1), (1, -1))],
    "triangle": lambda r: [line((0, -1), (1, 0.8), (-1, 0.8), (0, -1))],
    "square": lambda r: [line((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1))],
    "zigzag": lambda r: [line((-1, -1), (1, -1), (-1, 1), (1, 1))],
    "spiral": lambda r: [_spiral(r)],
    "blobs": lambda r: _blobs(r),
    "tee": lambda r: [line((-1, -1), (1, -1)), line((0, -1), (0, 1))],
    "ell": lambda r: [line((-0.7, -1), (-0.7, 1), (0.7, 1))],
    "two_rings": lambda r: [arc(0, -0.5, 0.45, 0.5, 0, 2 * math.pi, 20), arc(0, 0.5, 0.55, 0.5, 0, 2 * math.pi, 20)],
    "s_curve": lambda r: [np.concatenate([arc(0, -0.5, 0.6, 0.5, 0.1 * math.pi, -1.5 * math.pi, 12),
                                          arc(0, 0.5, 0.6, 0.5, -0.5 * math.pi, 0.9 * math.pi, 12)])],
    "wave": lambda r: [_wave(r)],
    "chevron": lambda r: [line((0.7, -1), (-0.7, 0), (0.7, 1))],
    "ring_tail": lambda r: [arc(0, 0.4, 0.6, 0.6, 0, 2 * math.pi, 20), line((0.6, 0.4), (0.6, -1))],
}


def _blobs(rng):
    """2-3 short thick dashes (blobs once pooled to 8x8) at random places."""
    return [rng.uniform(-1, 1, (2, 2)) * [1, 0.15] + rng.uniform(-1, 1, (1, 2)) for _ in range(rng.integers(2, 4))]


def _wave(rng):
    phase = np.linspace(0, _u(rng, 3, 5) * math.pi, 20)
    return np.stack([np.linspace(-1, 1, 20), 0.5 * np.sin(phase)], 1)


def _spiral(rng):
    turns = _u(rng, 1.5, 2.5)
    t = np.linspace(0, turns * 2 * math.pi, 40)
    rad = np.linspace(0.1, 1, 40)
    return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)


def make_glyphs(n: int, seed: int = GLYPH_SEED) -> list[list[np.ndarray]]:
    """n random glyph templates, each 2-3 strokes (straight or curved) on a 3x3 grid."""
    rng = np.random.default_rng(seed)
    grid = np.array([(x, y) for y in (-1, 0, 1) for x in (-0.8, 0, 0.8)], dtype=np.float64)
    glyphs = []
    for _ in range(n):
        strokes = []
        for _ in range(rng.integers(2, 4)):
            a, b = grid[rng.choice(9, 2, replace=False)]
            if rng.random() < 0.5:
                strokes.append(line(a, b))
            else:  # quadratic curve bulging sideways
                mid = (a + b) / 2 + rng.choice([-1, 1]) * 0.6 * np.array([-(b - a)[1], (b - a)[0]]) / 2
                t = np.linspace(0, 1, 10)[:, None]
                strokes.append((1 - t) ** 2 * a + 2 * t * (1 - t) * mid + t**2 * b)
        glyphs.append(strokes)
    return glyphs


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------
def random_pose(polys, rng, glyph: bool):
    """Wobble, rotate, shear and fit the figure into the canvas; returns segments (S, 4)."""
    if glyph:  # the template itself varies between samples
        polys = [p + rng.normal(0, 0.08, p.shape) for p in polys]
    ang = rng.normal(0, 0.2)
    sh = rng.normal(0, 0.15)
    c, s = math.cos(ang), math.sin(ang)
    stretch = np.diag([rng.uniform(0.55, 1.15), rng.uniform(0.85, 1.15)])  # often narrower than tall
    mat = np.array([[c, -s], [s, c]]) @ np.array([[1, sh], [0, 1]]) @ stretch
    polys = [p @ mat.T for p in polys]
    pts = np.concatenate(polys)
    lo, hi = pts.min(0), pts.max(0)
    span = max((hi - lo).max(), 1e-6)
    size = rng.uniform(0.65, 0.95) * CANVAS
    centre = CANVAS / 2 + rng.normal(0, 0.6, 2)
    segs = []
    for p in polys:
        q = (p - (lo + hi) / 2) / span * size + centre
        q = q + rng.normal(0, 0.2, q.shape)  # hand tremor, in canvas pixels
        if len(q) == 1:
            q = np.concatenate([q, q])
        segs.append(np.concatenate([q[:-1], q[1:]], 1))
    return np.concatenate(segs)


def render(segments: list[np.ndarray], widths: np.ndarray) -> torch.Tensor:
    """Draw segment lists (each (S, 4) in canvas pixels) with pens of given widths -> (B, 1, 16, 16) in [0, 1]."""
    n_max = max(len(s) for s in segments)
    seg = np.zeros((len(segments), n_max, 4))
    valid = np.zeros((len(segments), n_max), dtype=bool)
    for i, s in enumerate(segments):
        seg[i, : len(s)] = s
        valid[i, : len(s)] = True
    seg = torch.from_numpy(seg).float()[..., None]  # (B, S, 4, 1)
    ax, ay, ux, uy = seg[:, :, 0], seg[:, :, 1], seg[:, :, 2] - seg[:, :, 0], seg[:, :, 3] - seg[:, :, 1]
    pix = torch.arange(CANVAS, dtype=torch.float32) + 0.5
    gx, gy = pix.repeat(CANVAS), pix.repeat_interleave(CANVAS)  # pixel centres, row-major (P,)
    dx, dy = gx - ax, gy - ay  # (B, S, P)
    t = ((dx * ux + dy * uy) / (ux * ux + uy * uy).clamp_min(1e-6)).clamp_(0, 1)
    d2 = (dx - t * ux).square_() + (dy - t * uy).square_()
    dist = d2.masked_fill_(~torch.from_numpy(valid)[..., None], float("inf")).amin(1).sqrt()  # (B, P)
    half = torch.from_numpy(widths).float()[:, None] / 2
    ink = (half - dist + 0.5).clamp(0, 1)  # anti-aliased pen
    return ink.reshape(-1, 1, CANVAS, CANVAS)


def degrade(ink: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pool to 8x8, add noise, quantise to 17 levels, upsample to 32x32 and map to 3-channel [-1, 1]."""
    low = F.avg_pool2d(ink, CANVAS // LOWRES)
    gain = torch.empty(len(ink), 1, 1, 1).uniform_(0.9, 1.3, generator=gen)
    low = low * gain + 0.03 * torch.randn(low.shape, generator=gen)
    low = (low.clamp(0, 1) * 16).round() / 16
    img = F.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    return ((img - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


class FigureTask:
    """Generator of (images (B, 3, 32, 32), labels (B,)) batches over named shapes + random glyphs."""

    def __init__(self, n_glyphs: int, seed: int):
        self.figures = [(fn, False) for fn in SHAPES.values()]
        self.figures += [((lambda r, g=g: g), True) for g in make_glyphs(n_glyphs)]
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def num_classes(self) -> int:
        return len(self.figures)

    def batch(self, size: int):
        labels = self.rng.integers(0, self.num_classes, size)
        segs = []
        for k in labels:
            fn, glyph = self.figures[k]
            segs.append(random_pose(fn(self.rng), self.rng, glyph))
        widths = self.rng.uniform(1.5, 3.5, size)  # 3-7 pixels at 32x32
        return degrade(render(segs, widths), self.gen), torch.from_numpy(labels)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def init_for_pretraining(model) -> None:
    """Start from larger weights than timm's default so the tiny budget is not spent escaping a plateau.

    Linear layers get xavier init (timm's 'jax' scheme) and the learned position
    embedding starts as a 2-D sine-cosine grid; the architecture is unchanged.
    """
    model.init_weights("jax")
    side = model.patch_embed.grid_size[0]
    quarter = model.embed_dim // 4
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    freqs = 100.0 ** (-torch.arange(quarter).float() / quarter)
    xs, ys = xs.reshape(-1, 1) * freqs, ys.reshape(-1, 1) * freqs
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], 1)


@torch.no_grad()
def accuracy(model, images, labels, bs=256):
    model.eval()
    preds = torch.cat([model(images[i : i + bs]).argmax(1) for i in range(0, len(images), bs)])
    model.train()
    return (preds == labels).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glyphs", type=int, default=40, help="number of random glyph classes")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEMO_VIT_PATH)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = FigureTask(args.glyphs, args.seed)
    val_x, val_y = FigureTask(args.glyphs, args.seed + 10_000).batch(2048)
    model = create_demo_vit(num_classes=task.num_classes, pretrained=False)
    init_for_pretraining(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    print(f"{task.num_classes} classes, {args.steps} steps x {args.batch_size}")
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = task.batch(args.batch_size)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f}s", flush=True)
    minutes = (time.time() - start) / 60
    acc = accuracy(model, val_x, val_y)
    print(f"pretext accuracy on 2048 fresh figures: {acc:.3f}  ({minutes:.1f} min)")

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {
        "format": "pt",
        "description": "petl_vision demo ViT backbone (timm VisionTransformer, no head)",
        "model_kwargs": repr(DEMO_VIT_KWARGS),
        "how_made": "scripts/make_demo_backbone.py: supervised classification of procedurally "
        f"rendered stroke figures ({len(SHAPES)} named shapes + {args.glyphs} random glyphs), "
        "pooled to 8x8 and upsampled to 32x32; no real data",
        "seed": str(args.seed),
        "steps": str(args.steps),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "pretext_classes": str(task.num_classes),
        "pretext_accuracy": f"{acc:.4f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=meta)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
