"""Point-cloud operations in plain PyTorch: farthest point sampling, kNN, grouping, EdgeConv features.

These replace the CUDA extensions of the official code (pointnet2_ops' furthest_point_sample,
KNN_CUDA) with batched tensor code that runs on any device. Shapes: B clouds of N points.
"""
from __future__ import annotations

import torch


def farthest_point_sample(xyz: torch.Tensor, num: int, skip_below: float | None = 1e-3) -> torch.Tensor:
    """Indices (B, num) of farthest point sampling on xyz (B, N, 3), starting at point 0.

    Each step picks the point whose distance to the already chosen set is largest (ties: the lowest
    index), as pointnet2_ops' furthest_point_sample does. Like that kernel, points with
    |p|^2 <= skip_below are never picked after the first (clouds are centred, so these are points at
    the centroid); when no other point remains, point 0 is picked again. skip_below=None keeps every point.
    """
    batch, n, _ = xyz.shape
    if not 0 < num <= n:
        raise ValueError(f"farthest_point_sample: num must be in [1, {n}] (the number of points), got {num}")
    xyz = xyz.float()
    idx = torch.zeros(batch, num, dtype=torch.long, device=xyz.device)
    dist = torch.full((batch, n), float("inf"), device=xyz.device)
    skipped = xyz.square().sum(-1) <= skip_below if skip_below is not None else torch.zeros(batch, n, dtype=torch.bool, device=xyz.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(num):
        idx[:, i] = farthest
        centroid = xyz[rows, farthest].unsqueeze(1)  # (B, 1, 3)
        dist = torch.minimum(dist, (xyz - centroid).square().sum(-1))
        candidates = dist.masked_fill(skipped, -1.0)  # the kernel's best starts at -1 with index 0
        farthest = torch.where(candidates.amax(-1) >= 0, candidates.argmax(-1), 0)
    return idx


def square_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, M, N) between a (B, M, C) and b (B, N, C)."""
    d = -2 * a @ b.transpose(1, 2)
    d += a.square().sum(-1, keepdim=True) + b.square().sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, M, k) of the k nearest points of ref (B, N, C) to each query (B, M, C), nearest first."""
    if not 0 < k <= ref.shape[1]:
        raise ValueError(f"knn: k must be in [1, {ref.shape[1]}] (the number of reference points), got {k}")
    return square_distance(query, ref).topk(k, dim=-1, largest=False, sorted=True).indices


def index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather points (B, N, C) at idx (B, *S) -> (B, *S, C)."""
    batch = points.shape[0]
    flat = idx.reshape(batch, -1)
    out = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*idx.shape, points.shape[-1])


def fps_points(xyz: torch.Tensor, num: int) -> torch.Tensor:
    """The num farthest-point-sampled points (B, num, 3) of xyz (B, N, 3)."""
    return index_points(xyz, farthest_point_sample(xyz, num))


def group_points(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-MAE grouping: FPS centres, then the group_size nearest points of each centre.

    xyz (B, N, 3) -> neighbourhoods (B, G, M, 3) relative to their centre, centres (B, G, 3).
    """
    xyz = xyz.float()
    center = fps_points(xyz, num_group)
    neighborhood = index_points(xyz, knn(center, xyz, group_size))
    return neighborhood - center.unsqueeze(2), center


def edge_features(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """EdgeConv (DGCNN) features [x_j - x_i, x_i] (B, 2C, N, k) of x (B, C, N) over neighbours idx (B, N, k)."""
    points = x.transpose(1, 2)  # (B, N, C)
    neighbours = index_points(points, idx)  # (B, N, k, C)
    center = points.unsqueeze(2).expand_as(neighbours)
    return torch.cat([neighbours - center, center], dim=-1).permute(0, 3, 1, 2)
