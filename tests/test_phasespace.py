"""Phase-space KDE grids: agreement with scipy, degenerate input, batch/torch paths, the Dataset."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from clustermass.config import KDEConfig, WindowConfig
from clustermass.datasets import PhaseSpaceDataset
from clustermass.errors import CatalogueError
from clustermass.phasespace import (
    DegenerateKDEWarning,
    augment_points,
    diagram_grid,
    gaussian_kde_grid,
    gaussian_kde_grid_batch,
    gaussian_kde_grid_torch,
    grid_shape,
)

LO3 = np.array([-1.6, -1.6, -2200.0])
SCALE3 = np.array([0.6, 0.6, 700.0])


def scipy_grid(p, lo, hi, n, bw=0.175):
    d = p.shape[1]
    axes = [np.linspace(lo[j], hi[j], n) for j in range(d)]
    g = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(d, -1)
    c = gaussian_kde(p.T, bw_method=bw)(g).reshape((n,) * d)
    return c / c.sum()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def sample(d, n, corr, seed):
    rng = np.random.default_rng(seed)
    C = np.full((d, d), corr) + (1 - corr) * np.eye(d)
    return rng.multivariate_normal(np.zeros(d), C, size=n) * SCALE3[3 - d:]


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("n_pts", [4, 60, 2000])
@pytest.mark.parametrize("corr", [0.0, 0.97])
def test_matches_scipy(d, n_pts, corr):
    if d == 3 and n_pts == 2000:
        n_pts = 500  # keep the scipy reference fast
    p = sample(d, n_pts, corr, seed=d * 100 + n_pts)
    lo = LO3[3 - d:]
    n = 50 if d < 3 else 32
    ours = gaussian_kde_grid(p, lo, -lo, n)
    assert ours.shape == (n,) * d
    assert ours.sum() == pytest.approx(1.0, abs=1e-12)
    assert rel_err(ours, scipy_grid(p, lo, -lo, n)) < 1e-5


def test_matches_scipy_cluster_like_50cube():
    # concentrated members + uniform interlopers, some galaxies outside the window
    rng = np.random.default_rng(3)
    mem = rng.normal(size=(70, 3)) * [0.3, 0.3, 600]
    bg = rng.uniform(-1, 1, size=(30, 3)) * [2.0, 2.0, 3000]
    p = np.vstack([mem, bg])
    assert (np.abs(p) > -LO3).any()
    ours = gaussian_kde_grid(p, LO3, -LO3, 50)
    assert rel_err(ours, scipy_grid(p, LO3, -LO3, 50)) < 1e-5


def test_tiled_and_pruned_paths_match_scipy():
    # very narrow kernels on a wide grid force many tiles and galaxy skipping
    rng = np.random.default_rng(4)
    p = rng.uniform(-1, 1, size=(300, 3)) * [1.5, 1.5, 2000]
    p[:5] *= 40  # far outliers: shape the covariance, invisible on the grid
    ours = gaussian_kde_grid(p, LO3, -LO3, 24, bandwidth=0.02)
    assert rel_err(ours, scipy_grid(p, LO3, -LO3, 24, bw=0.02)) < 1e-5
    # extreme correlation (exercises the out-of-range fallback or many tiles)
    q = sample(2, 200, 0.99995, seed=5)
    lo = np.array([-1.6, -1.6])
    assert rel_err(gaussian_kde_grid(q, lo, -lo, 40), scipy_grid(q, lo, -lo, 40)) < 1e-5


def test_empty_gives_zeros_and_flag():
    with pytest.warns(DegenerateKDEWarning, match="cluster 7"):
        cube, info = gaussian_kde_grid(np.zeros((0, 3)), LO3, -LO3, 10, label=7, return_info=True)
    assert cube.shape == (10, 10, 10) and not cube.any()
    assert info["empty"] and info["n_points"] == 0


@pytest.mark.parametrize("n_pts", [1, 2, 3])
def test_too_few_points_regularised(n_pts):
    p = np.random.default_rng(n_pts).normal(size=(n_pts, 3)) * [0.3, 0.3, 300]
    with pytest.warns(DegenerateKDEWarning):
        cube, info = gaussian_kde_grid(p, LO3, -LO3, 20, return_info=True)
    assert info["regularised"] and np.isfinite(cube).all()
    assert cube.sum() == pytest.approx(1.0) and cube.min() >= 0
    # the 3 - (N - 1) degenerate directions get a kernel exactly one grid cell wide
    K = info["kernel_cov"]
    spacing = 2 * -LO3 / 19
    w = np.linalg.eigvalsh(K / np.outer(spacing, spacing))
    assert np.sum(np.abs(w - 1) < 1e-9) == 3 - (n_pts - 1)
    assert np.all(w > 1e-3)


def test_single_point_peaks_at_its_cell():
    pt = np.array([[0.33, -0.5, 410.0]])
    with pytest.warns(DegenerateKDEWarning):
        cube = gaussian_kde_grid(pt, LO3, -LO3, 21)
    axes = [np.linspace(LO3[j], -LO3[j], 21) for j in range(3)]
    expect = tuple(int(np.argmin(np.abs(axes[j] - pt[0, j]))) for j in range(3))
    assert np.unravel_index(cube.argmax(), cube.shape) == expect


def test_duplicates_equal_single_point():
    pt = np.array([[0.2, 0.1, -300.0]])
    with pytest.warns(DegenerateKDEWarning):
        one = gaussian_kde_grid(pt, LO3, -LO3, 16)
        many = gaussian_kde_grid(np.repeat(pt, 12, axis=0), LO3, -LO3, 16)
    np.testing.assert_allclose(many, one, atol=1e-12)


def test_zero_variance_axis():
    p = sample(3, 40, 0.0, seed=8)
    p[:, 2] = 250.0  # all at the same velocity
    with pytest.warns(DegenerateKDEWarning):
        cube, info = gaussian_kde_grid(p, LO3, -LO3, 25, return_info=True)
    assert info["regularised"] and np.isfinite(cube).all()
    v_axis = np.linspace(-2200, 2200, 25)
    v_marg = cube.sum(axis=(0, 1))
    assert v_axis[v_marg.argmax()] == pytest.approx(v_axis[np.argmin(np.abs(v_axis - 250))])
    # non-degenerate directions keep their scipy width: the (x, y) marginal matches the 2D KDE
    xy = gaussian_kde_grid(p[:, :2], LO3[:2], -LO3[:2], 25)
    assert rel_err(cube.sum(axis=2), xy) < 1e-8


def test_nan_names_the_cluster():
    p = sample(3, 10, 0.0, seed=1)
    p[3, 1] = np.nan
    with pytest.raises(CatalogueError, match="cluster 42"):
        gaussian_kde_grid(p, LO3, -LO3, 10, label=42)
    p[3, 1] = np.inf
    with pytest.raises(CatalogueError, match="cluster 43"):
        diagram_grid(p, "cnn3d", WindowConfig(), KDEConfig(n_grid=10), label=43)


def test_batch_equals_single_and_torch_equals_numpy():
    pts = [sample(3, n, 0.3, seed=n) for n in (5, 40, 120)] + [np.zeros((0, 3))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateKDEWarning)
        batch = gaussian_kde_grid_batch(pts, LO3, -LO3, 20, 0.175)
        single = np.stack([gaussian_kde_grid(p, LO3, -LO3, 20) for p in pts])
        exact = np.stack([gaussian_kde_grid(p, LO3, -LO3, 20, rtol=1e-14) for p in pts])
        t64 = gaussian_kde_grid_torch(pts, LO3, -LO3, 20, 0.175, device="cpu", dtype=torch.float64)
        t32 = gaussian_kde_grid_torch(pts, LO3, -LO3, 20, 0.175, device="cpu", dtype=torch.float32)
        one = gaussian_kde_grid_torch(pts[1], LO3, -LO3, 20, 0.175, device="cpu")
    assert batch.shape == (4, 20, 20, 20)
    np.testing.assert_array_equal(batch, single)
    assert not batch[3].any() and not t32[3].any()
    for b in range(3):
        assert rel_err(single[b], exact[b]) < 1e-6  # the documented skipping bound
        assert rel_err(t64[b].numpy(), exact[b]) < 1e-10
        assert rel_err(t32[b].numpy(), exact[b]) < 2e-6
    assert t32.dtype == torch.float32 and one.shape == (20, 20, 20)
    assert rel_err(one.numpy(), exact[1]) < 1e-10
    # 2D and 1D through the torch path too
    for d in (1, 2):
        p = sample(d, 50, 0.5, seed=d)
        lo = LO3[3 - d:]
        t = gaussian_kde_grid_torch(p, lo, -lo, 30, device="cpu", dtype=torch.float32).numpy()
        assert rel_err(t, gaussian_kde_grid(p, lo, -lo, 30)) < 2e-6


def test_torch_routes_correlated_data():
    # float32 needs many tiles here: routed to float64 on the device, or to numpy
    pts = [sample(3, 200, 0.995, seed=3), sample(3, 200, 0.6, seed=4), sample(3, 30, 0.0, seed=5)]
    t32 = gaussian_kde_grid_torch(pts, LO3, -LO3, 24, device="cpu", dtype=torch.float32)
    for b, p in enumerate(pts):
        assert rel_err(t32[b].numpy(), scipy_grid(p, LO3, -LO3, 24)) < 1e-5


@pytest.mark.gpu
def test_torch_kde_on_cuda_matches_numpy():
    """The batched torch path on a CUDA device (float32 and float64) against the exact numpy cube."""
    pts = [sample(3, 200, 0.3, seed=21), sample(3, 40, 0.0, seed=22), sample(3, 200, 0.995, seed=23)]
    exact = [gaussian_kde_grid(p, LO3, -LO3, 24, rtol=1e-14) for p in pts]
    t32 = gaussian_kde_grid_torch(pts, LO3, -LO3, 24, device="cuda", dtype=torch.float32)
    t64 = gaussian_kde_grid_torch(pts, LO3, -LO3, 24, device="cuda", dtype=torch.float64)
    assert t32.device.type == "cuda" and t32.dtype == torch.float32
    for b in range(len(pts)):
        assert rel_err(t32[b].cpu().numpy(), exact[b]) < 2e-6
        assert rel_err(t64[b].cpu().numpy(), exact[b]) < 1e-10


def test_diagram_kinds():
    window, kde = WindowConfig(), KDEConfig(n_grid=24)
    p = sample(3, 80, 0.0, seed=11)
    c3 = diagram_grid(p, "cnn3d", window, kde)
    c2 = diagram_grid(p, "cnn2d", window, kde)
    c1 = diagram_grid(p, "cnn1d", window, kde)
    assert c3.shape == grid_shape("cnn3d", 24) == (24, 24, 24)
    assert c2.shape == grid_shape("cnn2d", 24) == (24, 24)
    assert c1.shape == grid_shape("cnn1d", 24) == (24,)
    for c in (c3, c2, c1):
        assert c.sum() == pytest.approx(1.0)
    r = np.hypot(p[:, 0], p[:, 1])
    ref2 = scipy_grid(np.column_stack([r, p[:, 2]]), [0, -2200], [1.6, 2200], 24)
    assert rel_err(c2, ref2) < 1e-5
    assert rel_err(c1, scipy_grid(p[:, 2:], [-2200], [2200], 24)) < 1e-5
    with pytest.raises(Exception, match="unknown diagram kind"):
        diagram_grid(p, "cnn4d", window, kde)


# ---------------------------------------------------------------------- dataset
def test_dataset_items_and_collate(gaussian_catalogue):
    cat = gaussian_catalogue()
    kde, window = KDEConfig(n_grid=12), WindowConfig()
    with pytest.warns(DegenerateKDEWarning):
        ds = PhaseSpaceDataset(cat, cat.rows(), "cnn3d", window, kde)
    assert len(ds) == 6 and ds.shape == (1, 12, 12, 12)
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (1, 12, 12, 12)
    assert float(x.sum()) == pytest.approx(kde.input_scale, rel=1e-5)
    np.testing.assert_allclose(x[0].numpy(), diagram_grid(cat.points(1), "cnn3d", window, kde) * 1000, rtol=1e-6, atol=1e-30)
    assert y.dtype == torch.float32 and y.shape == () and float(y) == pytest.approx(cat.clusters["log_m200c"][1])
    assert not ds[5][0].any()  # empty diagram -> zeros
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 1, 12, 12, 12) and yb.shape == (4,)
    xt, yt = ds.batch([0, 1, 4], device="cpu")  # the batched torch path gives the same items
    assert xt.shape == (3, 1, 12, 12, 12) and xt.dtype == torch.float32
    for j, i in enumerate([0, 1, 4]):
        assert rel_err(xt[j].numpy(), ds[i][0].numpy()) < 2e-6 and float(yt[j]) == float(ds[i][1])
    ds2 = PhaseSpaceDataset(cat, [2, 0], "cnn2d", window, kde)
    assert ds2[0][0].shape == (1, 12, 12) and float(ds2[1][1]) == pytest.approx(cat.clusters["log_m200c"][0])


def test_dataloader_workers_and_cache(tmp_path, gaussian_catalogue):
    cat = gaussian_catalogue()
    kde, window = KDEConfig(n_grid=8), WindowConfig()
    ds = PhaseSpaceDataset(cat, [0, 1, 2, 3], "cnn1d", window, kde, cache_dir=tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (4, 1, 8)
    plain = PhaseSpaceDataset(cat, [0, 1, 2, 3], "cnn1d", window, kde)
    assert torch.equal(xs, torch.stack([plain[i][0] for i in range(4)]))
    assert all(ds._open_cache() is None and ds._filled[i] for i in range(4))  # filled by workers


def test_augmentation_deterministic_and_mass_preserving(gaussian_catalogue):
    cat = gaussian_catalogue()
    kde, window = KDEConfig(n_grid=12), WindowConfig()
    ds = PhaseSpaceDataset(cat, [0, 1, 2], "cnn3d", window, kde, augment=True, seed=5)
    base = PhaseSpaceDataset(cat, [0, 1, 2], "cnn3d", window, kde)
    a1, y1 = ds[1]
    a2, y2 = ds[1]
    assert torch.equal(a1, a2) and float(y1) == float(y2) == float(base[1][1])
    assert not torch.allclose(a1, base[1][0])
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a1)
    ds.set_epoch(0)
    assert torch.equal(ds[1][0], a1)
    # rotations about the line of sight keep projected radii and velocities
    p = cat.points(1)
    q = ds.points(1)
    np.testing.assert_allclose(np.hypot(q[:, 0], q[:, 1]), np.hypot(p[:, 0], p[:, 1]), rtol=1e-12)
    np.testing.assert_array_equal(q[:, 2], p[:, 2])
    assert float(a1.sum()) == pytest.approx(1000.0, rel=1e-5)


def test_d4_augmentation_is_a_symmetry_of_the_cube(gaussian_catalogue):
    cat = gaussian_catalogue()
    kde, window = KDEConfig(n_grid=14), WindowConfig()
    base = PhaseSpaceDataset(cat, [0, 1, 2, 3], "cnn3d", window, kde)[2][0][0].numpy()
    syms = []
    for k in range(4):
        r = np.rot90(base, k, axes=(0, 1))
        syms += [r, r[::-1]]
    ds = PhaseSpaceDataset(cat, [0, 1, 2, 3], "cnn3d", window, kde, augment="d4", seed=1)
    for epoch in range(4):
        ds.set_epoch(epoch)
        cube = ds[2][0][0].numpy()
        assert min(np.abs(cube - s).max() for s in syms) < 1e-4 * base.max()


def test_augment_points_reflection():
    rng = np.random.default_rng(0)
    p = np.array([[1.0, 0.0, 5.0]])
    seen = {tuple(np.round(augment_points(p, rng, "d4")[0, :2], 9)) for _ in range(60)}
    assert seen == {(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)}


def test_cache_round_trip(tmp_path, gaussian_catalogue):
    cat = gaussian_catalogue()
    kde, window = KDEConfig(n_grid=10), WindowConfig()
    rows = [0, 1, 3]
    ds = PhaseSpaceDataset(cat, rows, "cnn3d", window, kde, cache_dir=tmp_path)
    ds.precompute()
    assert len(list(tmp_path.glob("grids-*"))) == 2
    fresh = PhaseSpaceDataset(cat, rows, "cnn3d", window, kde, cache_dir=tmp_path)
    plain = PhaseSpaceDataset(cat, rows, "cnn3d", window, kde)
    for i in range(3):
        assert fresh._open_cache() is None and fresh._filled[i]
        assert torch.equal(fresh[i][0], plain[i][0])
