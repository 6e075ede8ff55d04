"""Phase-space KDE grids: the network input (SCIENCE.md sec. 4), on CPU (numpy) and GPU (torch).

A diagram's galaxies ``(x_proj, y_proj, v_los)`` [h^-1 Mpc, h^-1 Mpc, km/s] become a Gaussian KDE
evaluated on a regular grid, normalised to sum 1. The kernel covariance is
``bandwidth**2 * cov(points)`` (scipy's ``gaussian_kde(points.T, bw_method=bandwidth)``).

Algorithm (exact, not binned)
-----------------------------
With ``P`` the kernel precision, a grid point ``g`` and a tile centre ``c``, each galaxy's kernel
is

    exp(-1/2 (g-p)^T P (g-p)) = exp(-C(g-c)) * prod_j F_pj(g_j),

where ``C(u) = sum_{j<k} P_jk u_j u_k`` holds the grid-only cross terms and each ``F_pj`` is a
1-D Gaussian in ``g_j`` (a completed square; the per-galaxy constant is fixed exactly by the
maximum over the tile and shared equally between the axes). The sum over galaxies is therefore
one matrix product (axis 0 x galaxies) @ (galaxies x axes 1..d-1), followed by multiplication
with the 2-D tables ``exp(-P_jk u_j u_k)``; BLAS / cuBLAS does the heavy part at full speed. Every
term is a product of exponentials, so the result keeps full relative precision (no
cancellation). To keep every exponential inside the floating-point range the grid is cut into
tiles on which ``|C| <= C_MAX`` (360 in float64, 25 in float32); for the weak correlations of
real clusters one tile covers the grid. Galaxies farther than ``r`` kernel widths from a tile
(or from a slab of grid planes along axis 0) are skipped, with ``r`` chosen from N, the grid
size and ``rtol`` so that the skipped mass is provably below ``rtol`` (default 1e-6) of the
cube maximum; the bound is re-checked on the result (and the cube recomputed with a larger
``r`` when it fails). Pathological cases (huge tile counts, results out of range) use an exact
log-space direct sum instead. 1-D grids always use the direct sum.

Degenerate input (documented answers, never a linear-algebra crash)
-------------------------------------------------------------------
* 0 galaxies: an all-zero cube, flagged (``DegenerateKDEWarning``; ``info["empty"]``).
* Fewer than d+1 galaxies, a zero-variance axis, duplicated or collinear galaxies (a sample
  covariance that scipy cannot invert: a variance below ``(1e-6 * spacing / bandwidth)^2`` or a
  correlation-matrix eigenvalue below 1e-10): the kernel covariance is regularised in grid-cell
  units: its degenerate eigenvalues (below 1e-6 of the largest) are set to 1 cell^2
  (``floor_cells**2``); the other directions keep scipy's width. One galaxy, or duplicates of
  one, give a kernel one grid cell wide along every axis.
  Flagged with ``DegenerateKDEWarning`` and ``info["regularised"]``.
* NaN/inf coordinates: :class:`clustermass.errors.CatalogueError` naming ``label``.
* Galaxies outside the window shape the covariance (as in scipy) and add their kernel tails
  to the grid, but are not themselves on it. If every kernel is negligible on the whole grid
  (all galaxies many kernel widths outside it), the cube is still normalised: it then shows
  the shape of the tails (evaluated in log space), where scipy would give 0/0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .config import KIND_DIMS, KDEConfig, WindowConfig
from .errors import CatalogueError, ClustermassError

KINDS = tuple(KIND_DIMS)
#: largest cross-term exponent |C| on one tile, per dtype (keeps every factor in range)
_C_MAX = {"float64": 360.0, "float32": 25.0}
_DEFAULT_RTOL = 1e-6
_SLAB = 1.0  # slab width along axis 0, in kernel reaches


class DegenerateKDEWarning(UserWarning):
    """A diagram had no galaxies or a singular covariance; a documented fallback was used."""


# ---------------------------------------------------------------------- helpers
def grid_shape(kind: str, n_grid: int) -> tuple[int, ...]:
    """Shape of the grid of representation ``kind``: (n,n,n), (n,n) or (n,).

    Parameters
    ----------
    kind : "cnn3d", "cnn2d" or "cnn1d".
    n_grid : grid points per axis.

    >>> grid_shape("cnn3d", 4), grid_shape("cnn1d", 50)
    ((4, 4, 4), (50,))
    """
    return (n_grid,) * _kind_dim(kind)


def _kind_dim(kind: str) -> int:
    if kind not in KINDS:
        raise ClustermassError(f"unknown diagram kind {kind!r}; choose one of {', '.join(KINDS)}")
    return KIND_DIMS[kind]


def diagram_limits(kind: str, window: WindowConfig) -> tuple[np.ndarray, np.ndarray]:
    """Grid limits (lows, highs) of representation ``kind``.

    cnn3d: (x, y, v) over [-r_max, r_max]^2 x [-v_max, v_max];
    cnn2d: (R_proj, v) over [0, r_max] x [-v_max, v_max] (R_max = r_max: the largest radius whose
    annulus lies entirely inside the square window; galaxies in the corners, R > r_max, still
    shape the covariance); cnn1d: v over [-v_max, v_max].

    Parameters
    ----------
    kind : "cnn3d", "cnn2d" or "cnn1d".
    window : :class:`clustermass.config.WindowConfig`: ``r_max`` [h^-1 Mpc], ``v_max`` [km/s].

    Returns
    -------
    (lows, highs) : (d,) arrays in h^-1 Mpc (positions) and km/s (velocities).

    >>> from clustermass.config import WindowConfig
    >>> lo, hi = diagram_limits("cnn2d", WindowConfig(r_max=1.6, v_max=2200.0))
    >>> lo.tolist(), hi.tolist()
    ([0.0, -2200.0], [1.6, 2200.0])
    """
    r, v = float(window.r_max), float(window.v_max)
    if kind == "cnn3d":
        return np.array([-r, -r, -v]), np.array([r, r, v])
    if kind == "cnn2d":
        return np.array([0.0, -v]), np.array([r, v])
    _kind_dim(kind)
    return np.array([-v]), np.array([v])


def grid_axes(kind: str, window: WindowConfig, n_grid: int) -> list[np.ndarray]:
    """The grid axes of representation ``kind`` (``linspace`` over :func:`diagram_limits`)."""
    lo, hi = diagram_limits(kind, window)
    return [np.linspace(a, b, n_grid) for a, b in zip(lo, hi, strict=True)]


def diagram_points(points_xyv: np.ndarray, kind: str) -> np.ndarray:
    """Columns of ``points_xyv`` (N, 3) used by ``kind``: (x, y, v), (R_proj, v) or (v,).

    Parameters
    ----------
    points_xyv : (N, 3) x_proj, y_proj [h^-1 Mpc], v_los [km/s].
    kind : "cnn3d", "cnn2d" or "cnn1d".

    >>> diagram_points(np.array([[3.0, 4.0, 100.0]]), "cnn2d").tolist()
    [[5.0, 100.0]]
    """
    p = np.asarray(points_xyv, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ClustermassError(f"points_xyv must have shape (N, 3), got {p.shape}")
    if kind == "cnn3d":
        return p
    if kind == "cnn2d":
        return np.column_stack([np.hypot(p[:, 0], p[:, 1]), p[:, 2]])
    _kind_dim(kind)
    return p[:, 2:3]


def _name(label) -> str:
    return f"cluster {label}" if label is not None else "diagram"


def _check_points(points, label=None) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or not 1 <= p.shape[1] <= 3:
        raise ClustermassError(f"points must have shape (N, d) with d in 1..3, got {np.shape(points)}")
    if not np.isfinite(p).all():
        bad = np.flatnonzero(~np.isfinite(p).all(axis=1))
        raise CatalogueError(
            f"{_name(label)}: {len(bad)} galaxy coordinate row(s) are NaN/inf (first rows {bad[:5].tolist()})"
        )
    return p


def _check_limits(lows, highs, n, d) -> tuple[np.ndarray, np.ndarray]:
    lo = np.atleast_1d(np.asarray(lows, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(highs, dtype=np.float64))
    if lo.shape != (d,) or hi.shape != (d,):
        raise ClustermassError(f"lows/highs must have {d} entries for {d}-dimensional points")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (hi > lo).all()):
        raise ClustermassError(f"grid limits must be finite with highs > lows, got {lo} .. {hi}")
    if int(n) < 2:
        raise ClustermassError(f"grid size n must be >= 2, got {n}")
    return lo, hi


def kernel_covariance(
    points: np.ndarray,
    bandwidth: float,
    spacing: np.ndarray,
    floor_cells: float = 1.0,
) -> tuple[np.ndarray, bool]:
    """Kernel covariance ``bandwidth**2 * cov(points)`` and whether it had to be regularised.

    Parameters
    ----------
    points : (N, d) finite coordinates.
    bandwidth : scipy ``bw_method`` factor.
    spacing : (d,) grid spacing per axis (same units as the points).
    floor_cells : in the degenerate case, the kernel std given to the degenerate directions, in
        grid cells (eigenvalues below 1e-6 of the largest, in cell units, become ``floor_cells**2``).

    Returns
    -------
    K : (d, d) positive-definite kernel covariance.
    regularised : True when the sample covariance was singular (see module docstring).
    """
    n, d = points.shape
    spacing = np.asarray(spacing, dtype=np.float64)
    h2 = float(bandwidth) ** 2
    cov = np.cov(points, rowvar=False, ddof=1).reshape(d, d) if n >= 2 else np.zeros((d, d))
    degenerate = n <= d
    if not degenerate:
        var = np.diag(cov)
        if (var <= (1e-6 * spacing) ** 2 / h2).any():
            degenerate = True
        else:
            s = np.sqrt(var)
            corr = cov / np.outer(s, s)
            if np.linalg.eigvalsh(corr).min() < 1e-10:
                degenerate = True
    K = h2 * cov
    if not degenerate:
        return K, False
    Kc = K / np.outer(spacing, spacing)  # cell units
    Kc = 0.5 * (Kc + Kc.T)
    w, V = np.linalg.eigh(Kc)
    f2 = float(floor_cells) ** 2
    w = np.where(w < 1e-6 * max(w.max(), f2), f2, w)
    K = (V * w) @ V.T * np.outer(spacing, spacing)
    return 0.5 * (K + K.T), True


def _precision(K: np.ndarray) -> np.ndarray:
    # scale to unit diagonal first for conditioning
    s = np.sqrt(np.diag(K))
    Pn = np.linalg.inv(K / np.outer(s, s))
    P = Pn / np.outer(s, s)
    return 0.5 * (P + P.T)


# ---------------------------------------------------------------------- tiling
_SIGNS = {
    d: np.array([[1.0] + [1.0 - 2.0 * s for s in sg] for sg in np.ndindex(*(2,) * (d - 1))])
    for d in (1, 2, 3)
}


def _cross_abs(P: np.ndarray, half: np.ndarray) -> float:
    """max over a box (half-widths ``half``) of |sum_{j<k} P_jk u_j u_k| (multilinear: a corner)."""
    u = _SIGNS[len(half)] * half
    off = P - np.diag(np.diag(P))
    return 0.5 * float(np.abs(np.einsum("ki,ij,kj->k", u, off, u)).max())


def _choose_tiles(P: np.ndarray, ns: list[int], spacing: np.ndarray, c_max: float) -> list[int]:
    """Tiles per axis so that every tile's cross-term exponent obeys |C| <= c_max."""
    d = len(ns)
    k = [1] * d
    absoff = np.abs(P - np.diag(np.diag(P)))
    while True:
        cells = np.array([-(-ns[j] // k[j]) for j in range(d)])
        half = (cells - 1) / 2.0 * spacing
        if _cross_abs(P, half) <= c_max:
            return k
        score = half * (absoff @ half)
        score[[k[j] >= ns[j] for j in range(d)]] = -1.0
        j = int(np.argmax(score))
        if score[j] <= 0:  # single cells everywhere: cannot split further
            return k
        k[j] += 1


def _tiles(ns: list[int], k: list[int]) -> tuple[list[tuple], list[list[np.ndarray]]]:
    if all(kj == 1 for kj in k):
        return [(0,) * len(ns)], [[np.arange(nj)] for nj in ns]
    per_axis = [np.array_split(np.arange(ns[j]), k[j]) for j in range(len(ns))]
    return list(np.ndindex(*k)), per_axis


# ---------------------------------------------------------------------- numpy core
def _factors(dp: np.ndarray, dg: list[np.ndarray], P: np.ndarray) -> list[np.ndarray]:
    """Per-axis factors F_j (N, n_j) with prod_j F_j = exp(-1/2 |g-p|_P^2 + C(g-c)).

    ``dp = p - c``, ``dg[j] = g_j - c_j``; C is the cross (off-diagonal) part of the grid form.
    Each axis is a completed square, -1/2 P_jj (dg_j - mu_j)^2, with
    mu_j = dp_j + sum_{k!=j} P_jk dp_k / P_jj; the per-galaxy constant is fixed exactly by the
    maximum over the tile, M = -1/2 |g*-p|^2 + C(g*-c) at the per-axis argmax g*, and shared
    equally between the axes (so every factor is <= exp(max C / d)).
    """
    d = len(dg)
    diag = np.diag(P)
    mu = dp + (dp @ (P - np.diag(diag))) / diag
    psi, star = [], np.empty_like(dp)
    for j in range(d):
        r = np.subtract.outer(-mu[:, j], -dg[j])  # dg_j - mu_j, (N, n_j)
        r *= r
        r *= -0.5 * diag[j]
        am = np.argmax(r, axis=1)
        star[:, j] = dg[j][am]
        r -= r[np.arange(len(r)), am][:, None]
        psi.append(r)
    u = star - dp
    cross = 0.5 * np.einsum("ij,jk,ik->i", star, P - np.diag(diag), star)
    share = (-0.5 * np.einsum("ij,jk,ik->i", u, P, u) + cross) / d
    for r in psi:
        r += share[:, None]
        np.exp(r, out=r)
    return psi


def _cross_tables(dg: list[np.ndarray], P: np.ndarray) -> dict:
    """exp(-P_jk dg_j dg_k) for j < k: the grid-only cross terms of the kernel."""
    d = len(dg)
    return {(j, k): np.exp(-P[j, k] * np.multiply.outer(dg[j], dg[k]))
            for j in range(d) for k in range(j + 1, d)}


def _tile_sum(pts: np.ndarray, gs: list[np.ndarray], c: np.ndarray, P: np.ndarray,
              reach0: float) -> np.ndarray:
    """sum_p exp(-1/2 (g-p)^T P (g-p)) on the outer grid ``gs`` (one tile, centre ``c``).

    ``pts`` sorted by column 0; galaxies farther than ``reach0`` along axis 0 from a slab of
    grid planes are skipped for that slab (their kernel there is below exp(-r^2/2)).
    """
    d = len(gs)
    F = _factors(pts - c, [g - cj for g, cj in zip(gs, c, strict=True)], P)
    E = _cross_tables([g - cj for g, cj in zip(gs, c, strict=True)], P)
    n0, N = len(gs[0]), len(pts)
    if d == 2:
        right = F[1]
        post = [(E[(0, 1)], True)]  # (table, indexed by the axis-0 slab)
    else:
        right = F[1][:, :, None] * F[2][:, None, :]
        post = [(E[(0, 1)][:, :, None], True), (E[(0, 2)][:, None, :], True)]
        if N <= n0:  # cheaper to fold the (1, 2) cross term into the galaxy side
            right *= E[(1, 2)]
        else:
            post.append((E[(1, 2)][None, :, :], False))
        right = right.reshape(N, -1)
    shape = tuple(len(g) for g in gs)
    S = np.empty((n0, right.shape[1]))
    S3 = S.reshape(shape)
    g0 = gs[0]
    cells = reach0 / (g0[1] - g0[0]) if n0 > 1 else math.inf
    width = max(4, math.ceil(_SLAB * cells)) if cells < n0 else n0
    left = F[0].T  # (n0, N)
    p0 = pts[:, 0]
    for a in range(0, n0, width):  # slabs of grid planes along axis 0, post-processed in cache
        b = min(n0, a + width)
        if width < n0:
            i0 = int(np.searchsorted(p0, g0[a] - reach0, side="left"))
            i1 = int(np.searchsorted(p0, g0[b - 1] + reach0, side="right"))
        else:
            i0, i1 = 0, N
        if i1 <= i0:
            S[a:b] = 0.0
            continue
        np.matmul(left[a:b, i0:i1], right[i0:i1], out=S[a:b])
        blk = S3[a:b]
        for tab, rowwise in post:
            blk *= tab[a:b] if rowwise else tab
    return S3


def _direct_log(pts: np.ndarray, axes: list[np.ndarray], P: np.ndarray) -> np.ndarray:
    """Exact log of the unnormalised KDE on the grid (log-sum-exp over galaxies), chunked."""
    d = len(axes)
    L = np.linalg.cholesky(P)  # |x|_P = |x @ L|
    G = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
    zg, zp = G @ L, pts @ L
    out = np.empty(len(G))
    step = max(1, (1 << 21) // max(1, len(pts) * d))
    for s in range(0, len(G), step):
        diff = zg[s : s + step, None, :] - zp[None, :, :]
        e = -0.5 * np.einsum("gnd,gnd->gn", diff, diff)
        m = e.max(axis=1)
        out[s : s + step] = m + np.log(np.exp(e - m[:, None]).sum(axis=1))
    return out.reshape(tuple(len(a) for a in axes))


def _normalise_log(logc: np.ndarray) -> np.ndarray:
    c = np.exp(logc - logc.max())
    return c / c.sum()


def _cube_numpy(pts: np.ndarray, axes: list[np.ndarray], K: np.ndarray, P: np.ndarray,
                rtol: float) -> np.ndarray:
    """Normalised cube (sum 1) for finite ``pts`` (N>=1), kernel covariance K = P^-1."""
    d = len(axes)
    ns = [len(a) for a in axes]
    if d == 1:
        return _normalise_log(_direct_log(pts, axes, P))
    N = len(pts)
    spacing = np.array([a[1] - a[0] for a in axes])
    n_cells = int(np.prod(ns))
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    sk = np.sqrt(np.diag(K))
    k = _choose_tiles(P, ns, spacing, _C_MAX["float64"])
    tiles, per_axis = _tiles(ns, k)
    # Skipping a galaxy where its kernel is < exp(-r^2/2) changes each cell by < N exp(-r^2/2) =: e
    # and the sum by < n_cells * e; requiring n_cells * e <= rtol * S bounds the error of the
    # normalised cube by rtol * max (since max >= S / n_cells). S is first estimated (kernels
    # fully on the grid, /4 for safety), then checked on the result and, if needed, recomputed.
    s_lb = 0.25 * N * (2 * np.pi) ** (d / 2) * math.sqrt(np.linalg.det(K)) / float(np.prod(spacing))
    if len(tiles) == 1:
        t_lo = np.array([[a[0] for a in axes]])
        t_hi = np.array([[a[-1] for a in axes]])
    else:
        tix = np.indices(k).reshape(d, -1).T  # (T, d) tile index per axis
        t_lo = np.stack([np.array([axes[j][ch[0]] for ch in per_axis[j]])[tix[:, j]] for j in range(d)], 1)
        t_hi = np.stack([np.array([axes[j][ch[-1]] for ch in per_axis[j]])[tix[:, j]] for j in range(d)], 1)
    centres, halfw = 0.5 * (t_lo + t_hi), 0.5 * (t_hi - t_lo)
    for _attempt in range(3):
        r = math.sqrt(2.0 * math.log(max(2.0 * N * n_cells / (rtol * s_lb), 2.0)))
        # |u|_P >= |u_j| / sqrt(K_jj): skip galaxies farther than r from a tile along an axis
        gap = (np.maximum(np.abs(pts[None] - centres[:, None]) - halfw[:, None], 0.0) / sk).max(axis=2)
        sel_all = gap <= r  # (T, N)
        active = np.flatnonzero(sel_all.any(axis=1))
        if len(active) * 1e-4 > 2e-8 * N * n_cells:  # many small tiles: the direct sum is cheaper
            break
        cube = np.zeros(ns) if len(tiles) > 1 else None
        for ti in active:
            t = tiles[ti]
            idx = [per_axis[j][t[j]] for j in range(d)]
            gs = [axes[j][idx[j]] for j in range(d)]
            part = _tile_sum(pts[sel_all[ti]], gs, centres[ti], P, r * sk[0])
            if cube is None:
                cube = part
            else:
                cube[tuple(slice(ix[0], ix[-1] + 1) for ix in idx)] = part
        if cube is None:
            cube = np.zeros(ns)
        S = float(cube.sum())
        if not (math.isfinite(S) and S > n_cells * math.exp(-40.0)):
            break  # out of range: exact log-space fallback below
        if n_cells * N * math.exp(-0.5 * r * r) <= rtol * S:
            cube *= 1.0 / S
            return cube
        s_lb = S
    return _normalise_log(_direct_log(pts, axes, P))


# ---------------------------------------------------------------------- public API
def _prepare(points, lows, highs, n, bandwidth, label, floor_cells):
    p = _check_points(points, label)
    d = p.shape[1]
    lo, hi = _check_limits(lows, highs, n, d)
    if not float(bandwidth) > 0:
        raise ClustermassError(f"bandwidth must be > 0, got {bandwidth}")
    axes = [np.linspace(lo[j], hi[j], int(n)) for j in range(d)]
    spacing = (hi - lo) / (int(n) - 1)
    info: dict[str, Any] = {"n_points": len(p), "empty": len(p) == 0, "regularised": False}
    if len(p) == 0:
        warnings.warn(
            DegenerateKDEWarning(f"{_name(label)} has no galaxies: returning an all-zero grid"),
            stacklevel=3,
        )
        return p, axes, None, info
    K, reg = kernel_covariance(p, bandwidth, spacing, floor_cells)
    if reg:
        info["regularised"] = True
        warnings.warn(
            DegenerateKDEWarning(
                f"{_name(label)}: singular covariance ({len(p)} galaxies in {d}D); its "
                f"degenerate directions get a kernel {floor_cells:g} grid cell(s) wide"
            ),
            stacklevel=3,
        )
    info["kernel_cov"] = K
    return p, axes, _precision(K), info


def gaussian_kde_grid(
    points,
    lows,
    highs,
    n: int = 50,
    bandwidth: float = 0.175,
    *,
    label=None,
    rtol: float = _DEFAULT_RTOL,
    floor_cells: float = 1.0,
    return_info: bool = False,
):
    """Gaussian KDE of ``points`` on a regular grid, normalised to sum 1.

    Equal, within ``rtol`` of the maximum (in practice ~1e-10), to
    ``scipy.stats.gaussian_kde(points.T, bw_method=bandwidth)`` evaluated on the grid and
    divided by its sum; 50-100x faster on one core for 100 galaxies on 50^3 (``benchmarks/kde.py``).
    Algorithm and guarantees: module docstring.

    Parameters
    ----------
    points : (N, d) array, d in 1..3 (a 1-D array is one column). Units of the grid axes.
    lows, highs : (d,) grid limits; axis j is ``linspace(lows[j], highs[j], n)``.
    n : grid points per axis.
    bandwidth : scipy ``bw_method`` factor h0: kernel covariance ``h0**2 * cov(points)``.
    label : cluster name used in error and warning messages (e.g. the diagram_id).
    rtol : bound on the error from skipping far galaxy/tile pairs, relative to the cube
        maximum (the floating-point error is ~1e-13).
    floor_cells : kernel width floor, in grid cells, used only for degenerate input.
    return_info : also return a dict (``n_points``, ``empty``, ``regularised``, ``kernel_cov``).

    Returns
    -------
    cube : (n,)*d float64 array, axis order = column order, sum 1 (all zeros when N = 0).
    info : dict, only with ``return_info=True``.

    Raises
    ------
    CatalogueError : NaN/inf coordinates (the message names ``label``).
    ClustermassError : malformed shapes or limits.

    Notes
    -----
    Degenerate input: see the module docstring (0 galaxies -> zeros; singular covariance ->
    kernel regularised to >= ``floor_cells`` cells; both flagged with DegenerateKDEWarning).

    Examples
    --------
    The cube is scipy's ``gaussian_kde`` on the grid, divided by its sum:

    >>> from scipy.stats import gaussian_kde
    >>> pts = np.random.default_rng(0).normal(size=(200, 2))
    >>> cube = gaussian_kde_grid(pts, [-3, -3], [3, 3], n=25)
    >>> cube.shape, bool(np.isclose(cube.sum(), 1.0))
    ((25, 25), True)
    >>> g = np.linspace(-3, 3, 25)
    >>> ref = gaussian_kde(pts.T, bw_method=0.175)(np.stack(np.meshgrid(g, g, indexing="ij")).reshape(2, -1))
    >>> bool(np.abs(cube.ravel() - ref / ref.sum()).max() < 1e-8 * cube.max())
    True
    """
    p, axes, P, info = _prepare(points, lows, highs, n, bandwidth, label, floor_cells)
    if P is None:
        cube = np.zeros((int(n),) * len(axes))
    else:
        cube = _cube_numpy(p, axes, info["kernel_cov"], P, float(rtol))
    return (cube, info) if return_info else cube


def gaussian_kde_grid_batch(
    list_of_points,
    lows,
    highs,
    n: int = 50,
    bandwidth: float = 0.175,
    *,
    labels=None,
    backend: str = "numpy",
    device=None,
    **kwargs,
) -> np.ndarray:
    """:func:`gaussian_kde_grid` for many diagrams sharing one grid.

    Parameters
    ----------
    list_of_points : sequence of (N_b, d) arrays (N_b may differ; 0 gives an all-zero grid).
    lows, highs, n, bandwidth : as in :func:`gaussian_kde_grid`.
    labels : (B,) names of the diagrams for messages.
    backend : "numpy" (one core per call, exact to ``rtol``) or "torch" (one batched
        :func:`gaussian_kde_grid_torch` call, on ``device``; GPU when available).
    **kwargs : passed on (``rtol``, ``floor_cells`` for numpy; ``dtype`` for torch).

    Returns
    -------
    (B, n, ...) float64 array, each grid summing to 1 (or all zeros).
    """
    list_of_points = list(list_of_points)
    labels = [None] * len(list_of_points) if labels is None else list(labels)
    if backend == "torch":
        out = gaussian_kde_grid_torch(
            list_of_points, lows, highs, n, bandwidth, labels=labels, device=device, **kwargs
        )
        return out.double().cpu().numpy()
    if backend != "numpy":
        raise ClustermassError(f"unknown backend {backend!r}; choose numpy or torch")
    d = np.atleast_1d(np.asarray(lows)).shape[0]
    out = np.empty((len(list_of_points),) + (int(n),) * d)
    for i, (pts, lab) in enumerate(zip(list_of_points, labels, strict=True)):
        out[i] = gaussian_kde_grid(pts, lows, highs, n, bandwidth, label=lab, **kwargs)
    return out


# ---------------------------------------------------------------------- torch
def gaussian_kde_grid_torch(
    points,
    lows,
    highs,
    n: int = 50,
    bandwidth: float = 0.175,
    *,
    device=None,
    dtype=None,
    labels=None,
    floor_cells: float = 1.0,
):
    """Torch (GPU when present) KDE grids: same definition as :func:`gaussian_kde_grid`.

    Parameters
    ----------
    points : one (N, d) array or a list of them (a batch sharing the grid).
    lows, highs, n, bandwidth : as in :func:`gaussian_kde_grid`.
    device : torch device; default "cuda" when available, else "cpu".
    dtype : torch.float32 (default on GPU) or torch.float64 (default on CPU). Tables and
        exponents are formed in float64; the big products run in ``dtype``, so float32 agrees
        with the float64 answer to ~1e-6 of the maximum.
    labels : names of the diagrams for messages.

    Returns
    -------
    torch.Tensor (n,)*d for one array, (B, n, ...) for a list, each cube summing to 1
    (all zeros for an empty diagram).
    """
    import torch

    single = isinstance(points, np.ndarray) or (
        hasattr(points, "shape") and not isinstance(points, list | tuple)
    )
    plist = [np.asarray(points)] if single else [np.asarray(p) for p in points]
    labels = [None] * len(plist) if labels is None else list(labels)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cuda" else torch.float64
    preps = [
        _prepare(p, lows, highs, n, bandwidth, lab, floor_cells)
        for p, lab in zip(plist, labels, strict=True)
    ]
    if not preps:
        raise ClustermassError("empty batch")
    axes = preps[0][1]
    d, n = len(axes), int(n)
    out = torch.zeros((len(plist),) + (n,) * d, dtype=dtype, device=device)
    spacing = np.array([a[1] - a[0] for a in axes])
    # route each diagram: few tiles in dtype -> batched in dtype; else few tiles in float64 ->
    # batched in float64; else (pathological covariance) -> the numpy path on the CPU
    groups: dict[str, list[int]] = {"native": [], "float64": [], "numpy": []}
    for i, (_, _, P, _) in enumerate(preps):
        if P is None:
            continue
        if np.prod(_choose_tiles(P, [n] * d, spacing, _C_MAX[_dname(dtype)])) <= _MAX_TILES_TORCH:
            groups["native"].append(i)
        elif np.prod(_choose_tiles(P, [n] * d, spacing, _C_MAX["float64"])) <= _MAX_TILES_TORCH:
            groups["float64"].append(i)
        else:
            groups["numpy"].append(i)
    for name, cdtype in (("native", dtype), ("float64", torch.float64)):
        live = groups[name]
        if live:
            res = _torch_core([preps[i][0] for i in live], [preps[i][2] for i in live], axes,
                              cdtype, device)
            out[torch.as_tensor(live, device=device)] = res.to(dtype)
    for i in groups["numpy"]:
        cube = _cube_numpy(preps[i][0], axes, preps[i][3]["kernel_cov"], preps[i][2], _DEFAULT_RTOL)
        out[i] = torch.as_tensor(cube, device=device).to(dtype)
    return out[0] if single else out


_MAX_TILES_TORCH = 8


def _dname(dtype) -> str:
    import torch

    return "float32" if dtype == torch.float32 else "float64"


def _torch_core(plist, Plist, axes, dtype, device):
    """Batched normalised cubes for finite point sets sharing one grid (see module docstring)."""
    import torch

    d, n = len(axes), len(axes[0])
    spacing = np.array([a[1] - a[0] for a in axes])
    ks = [_choose_tiles(P, [n] * d, spacing, _C_MAX[_dname(dtype)]) for P in Plist]
    k = [max(kk[j] for kk in ks) for j in range(d)]
    tiles, per_axis = _tiles([n] * d, k)
    nmax = max(len(p) for p in plist)
    B = len(plist)
    pts = np.zeros((B, nmax, d))
    mask = np.zeros((B, nmax))
    for b, p in enumerate(plist):
        pts[b, : len(p)], mask[b, : len(p)] = p, 1.0
    f64 = dict(dtype=torch.float64, device=device)
    pts_t = torch.as_tensor(pts, **f64)
    P_t = torch.as_tensor(np.stack(Plist), **f64)
    diag = torch.diagonal(P_t, dim1=1, dim2=2)  # (B, d)
    off = P_t - torch.diag_embed(diag)
    mask_t = torch.as_tensor(mask, **f64)
    axes_t = [torch.as_tensor(a, **f64) for a in axes]
    res = torch.zeros((B,) + (n,) * d, dtype=dtype, device=device)
    for t in tiles:
        idx = [per_axis[j][t[j]] for j in range(d)]
        sl = tuple(slice(int(ix[0]), int(ix[-1]) + 1) for ix in idx)
        gs = [axes_t[j][sl[j]] for j in range(d)]
        c = torch.stack([(g[0] + g[-1]) / 2 for g in gs])
        dg = [g - c[j] for j, g in enumerate(gs)]
        dp = pts_t - c  # (B, N, d)
        mu = dp + torch.bmm(dp, off) / diag[:, None, :]
        psi, stars = [], []
        for j in range(d):
            r = dg[j][None, None, :] - mu[:, :, j, None]  # (B, N, n_j)
            r = -0.5 * diag[:, j, None, None] * r * r
            am = torch.argmax(r, dim=2, keepdim=True)
            stars.append(dg[j][am[..., 0]])
            psi.append(r - torch.gather(r, 2, am))
        star = torch.stack(stars, dim=-1)  # (B, N, d)
        u = star - dp
        m = -0.5 * torch.einsum("bni,bij,bnj->bn", u, P_t, u)
        m = m + 0.5 * torch.einsum("bni,bij,bnj->bn", star, off, star)
        share = (m / d)[:, :, None]
        F = [torch.exp(r + share) for r in psi]
        F[0] = F[0] * mask_t[:, :, None]
        F = [f.to(dtype) for f in F]

        def cross(j, m_, dg=dg):
            return torch.exp(-P_t[:, j, m_, None, None] * torch.outer(dg[j], dg[m_])).to(dtype)

        if d == 1:
            S = F[0].sum(1)
        elif d == 2:
            S = torch.bmm(F[0].transpose(1, 2), F[1]) * cross(0, 1)
        else:
            V = (F[1][:, :, :, None] * F[2][:, :, None, :]).reshape(B, nmax, -1)
            S = torch.bmm(F[0].transpose(1, 2), V).reshape(B, *(len(g) for g in gs))
            S = S * cross(0, 1)[:, :, :, None] * cross(0, 2)[:, :, None, :] * cross(1, 2)[:, None, :, :]
        res[(slice(None),) + sl] = S
    sums = res.reshape(B, -1).sum(1)
    maxs = res.reshape(B, -1).amax(1)
    bad = ~(torch.isfinite(sums) & (maxs > torch.finfo(dtype).tiny * 1e6))
    res = res / sums.reshape((B,) + (1,) * d)
    for b in torch.nonzero(bad).flatten().tolist():  # out-of-range: exact CPU fallback
        res[b] = torch.as_tensor(_normalise_log(_direct_log(plist[b], axes, Plist[b])), device=device)
    return res


# ---------------------------------------------------------------------- diagrams
def diagram_grid(points_xyv, kind: str, window: WindowConfig, kde: KDEConfig, *, label=None) -> np.ndarray:
    """The KDE grid of representation ``kind`` for one diagram, unscaled (sum 1).

    Parameters
    ----------
    points_xyv : (N, 3) columns (x_proj, y_proj [h^-1 Mpc], v_los [km/s]).
    kind : "cnn3d" (x, y, v), "cnn2d" (R_proj, v), "cnn1d" (v); limits in :func:`diagram_limits`.
    window, kde : the window and KDE settings (``kde.n_grid``, ``kde.bandwidth``).
    label : cluster name for messages.

    Returns
    -------
    (n,)*d float64 array summing to 1 (zeros when there are no galaxies).
    """
    pts = _check_points(points_xyv, label)
    pts = diagram_points(pts, kind)
    lo, hi = diagram_limits(kind, window)
    return gaussian_kde_grid(pts, lo, hi, kde.n_grid, kde.bandwidth, label=label)


def augment_points(points_xyv: np.ndarray, rng: np.random.Generator, mode: str = "rotate") -> np.ndarray:
    """Randomly rotate the sky plane about the line of sight and reflect x -> -x.

    ``mode="rotate"``: angle uniform in [0, 2 pi), reflection with probability 1/2. Rotations
    move galaxies across the corners of the square window; they keep shaping the covariance
    like any galaxy outside the window. ``mode="d4"``: the 8 symmetries of the square window
    only (exact). The mass is unchanged by both; v_los is untouched.
    """
    p = np.array(points_xyv, dtype=np.float64, copy=True)
    if mode == "d4":
        theta = 0.5 * np.pi * rng.integers(4)
    elif mode == "rotate":
        theta = rng.uniform(0.0, 2.0 * np.pi)
    else:
        raise ClustermassError(f"unknown augmentation mode {mode!r}; choose rotate or d4")
    flip = rng.random() < 0.5
    cs, sn = math.cos(theta), math.sin(theta)
    x, y = p[:, 0].copy(), p[:, 1].copy()
    if flip:
        x = -x
    p[:, 0], p[:, 1] = cs * x - sn * y, sn * x + cs * y
    return p


__all__ = [
    "KINDS",
    "DegenerateKDEWarning",
    "augment_points",
    "diagram_grid",
    "diagram_limits",
    "diagram_points",
    "gaussian_kde_grid",
    "gaussian_kde_grid_batch",
    "gaussian_kde_grid_torch",
    "grid_axes",
    "grid_shape",
    "kernel_covariance",
]
