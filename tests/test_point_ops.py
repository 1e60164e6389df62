"""FPS, kNN, grouping and EdgeConv features against brute-force references on small clouds."""
import torch

from petl_vision.models.pointnet_ops import edge_features, farthest_point_sample, group_points, index_points, knn


def brute_fps(points, num):
    """Start at 0; repeatedly take the point farthest from the chosen set (lowest index on ties)."""
    chosen = [0]
    for _ in range(num - 1):
        best, best_d = None, -1.0
        for j in range(len(points)):
            d = min(sum((points[j][c] - points[i][c]) ** 2 for c in range(3)) for i in chosen)
            if d > best_d:
                best, best_d = j, d
        chosen.append(best)
    return chosen


def brute_knn(query, ref, k):
    out = []
    for q in query:
        d = [(sum((q[c] - r[c]) ** 2 for c in range(len(q))), j) for j, r in enumerate(ref)]
        out.append([j for _, j in sorted(d)[:k]])
    return out


def test_fps_matches_brute_force():
    xyz = torch.randn(3, 40, 3, generator=torch.Generator().manual_seed(0))
    idx = farthest_point_sample(xyz, 10)
    assert idx.shape == (3, 10)
    for b in range(3):
        assert idx[b].tolist() == brute_fps(xyz[b].tolist(), 10)


def test_fps_prefix_and_grid():
    # On a 1-d line, FPS from point 0 takes the far end, then the middle.
    xyz = torch.zeros(1, 11, 3)
    xyz[0, :, 0] = torch.arange(11.0)
    assert farthest_point_sample(xyz, 3)[0].tolist() == [0, 10, 5]
    # The first m of an FPS of n points are the FPS of m points (the datasets rely on it).
    cloud = torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(farthest_point_sample(cloud, 20)[:, :7], farthest_point_sample(cloud, 7))


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    query, ref = torch.randn(2, 6, 3, generator=g), torch.randn(2, 30, 3, generator=g)
    idx = knn(query, ref, 5)
    assert idx.shape == (2, 6, 5)
    for b in range(2):
        assert idx[b].tolist() == brute_knn(query[b].tolist(), ref[b].tolist(), 5)


def test_group_points_matches_brute_force():
    xyz = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(3))
    neighborhood, center = group_points(xyz, num_group=8, group_size=6)
    assert neighborhood.shape == (2, 8, 6, 3) and center.shape == (2, 8, 3)
    for b in range(2):
        centers = brute_fps(xyz[b].tolist(), 8)
        assert torch.equal(center[b], xyz[b, centers])
        for g, members in enumerate(brute_knn(xyz[b, centers].tolist(), xyz[b].tolist(), 6)):
            assert torch.allclose(neighborhood[b, g], xyz[b, members] - xyz[b, centers[g]])
    assert torch.equal(neighborhood[:, :, 0], torch.zeros(2, 8, 3))  # each centre is its own nearest point


def test_edge_features_and_index_points():
    x = torch.randn(2, 4, 7)  # (B, C, N)
    idx = knn(x.transpose(1, 2), x.transpose(1, 2), 3)
    f = edge_features(x, idx)
    assert f.shape == (2, 8, 7, 3)
    b, i, j = 1, 5, 2
    neighbour = x[b, :, idx[b, i, j]]
    assert torch.allclose(f[b, :4, i, j], neighbour - x[b, :, i]) and torch.allclose(f[b, 4:, i, j], x[b, :, i])
    points = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    assert torch.equal(index_points(points, torch.tensor([[4, 0], [1, 1]])), torch.stack([points[0, [4, 0]], points[1, [1, 1]]]))


def _kernel_fps(points: list, num: int, skip_below: float = 1e-3) -> list[int]:
    """pointnet2_ops' furthest_point_sampling kernel, one point at a time (a sequential reading)."""
    temp = [1e10] * len(points)
    chosen, old = [0], 0
    for _ in range(1, num):
        best, besti = -1.0, 0
        for k, (x, y, z) in enumerate(points):
            if x * x + y * y + z * z <= skip_below:
                continue
            ox, oy, oz = points[old]
            temp[k] = min((x - ox) ** 2 + (y - oy) ** 2 + (z - oz) ** 2, temp[k])
            if temp[k] > best:
                best, besti = temp[k], k
        chosen.append(besti)
        old = besti
    return chosen


def test_fps_skips_points_at_the_centroid_like_pointnet2_ops():
    g = torch.Generator().manual_seed(0)
    cloud = torch.randn(1, 40, 3, generator=g)
    cloud[0, 5:12] *= 0.01  # |p|^2 <= 1e-3: never picked by the kernel
    cloud[0, 7] = torch.tensor([0.0, 0.0, 2.5])  # except it would be the farthest point without the skip
    cloud[0, 7] *= 0.001
    cloud[0, 3] = torch.tensor([0.0, 0.0, 0.03])  # |p|^2 = 9e-4, would be picked early without the skip
    expected = _kernel_fps(cloud[0].tolist(), 25)
    got = farthest_point_sample(cloud, 25)[0].tolist()
    assert got == expected
    assert not set(got[1:]) & {3, *range(5, 12)}
    assert farthest_point_sample(cloud, 25, skip_below=None)[0].tolist() != got  # the old behaviour differs


def test_fps_all_points_skipped_picks_point_zero_again():
    cloud = torch.full((1, 6, 3), 0.001)
    assert farthest_point_sample(cloud, 4)[0].tolist() == [0, 0, 0, 0]
