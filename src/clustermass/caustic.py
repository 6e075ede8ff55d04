"""The caustic mass estimator (Diaferio & Geller 1997; Diaferio 1999; Serra et al. 2011).

In the redshift diagram (projected radius ``r``, rest-frame line-of-sight velocity ``v``) the
galaxies of a cluster and its infall region fill a trumpet whose edges, the *caustics*, trace the
escape velocity: ``A(r)^2 ~ <v_esc^2(r)>``. The mass inside a sphere of radius ``r`` is then
``M(<r) = F_beta / G * int_0^r A(r')^2 dr'`` with the filling factor ``F_beta = 0.7``
(Serra et al. 2011, sec. 2).

Inputs, per diagram (all already in a ``clustermass`` diagram, so no sky coordinates are needed):

* the projected radius ``r = sqrt(x_proj^2 + y_proj^2)`` [h^-1 Mpc, proper] from the cluster
  centre (the catalogue's centre: the central galaxy, or the sky position given to ``infer``);
* the rest-frame line-of-sight velocity ``v_los`` [km/s] relative to the centre, which a sky
  table gives as ``c (z - z_cl) / (1 + z_cl)`` (:func:`clustermass.sky.sky_to_catalogue`);
* the cluster redshift ``z`` (only for the critical density ``rho_c(z)`` that defines M200c);
* ``h`` is not needed: radii in h^-1 Mpc are rescaled with ``H0 = 100 h km/s/Mpc`` and masses come
  out in h^-1 Msun.

The steps (defaults in brackets):

1. *Candidate members* (for the two numbers of step 4): the shifting gapper
   (:func:`clustermass.membership.shifting_gapper`) on all the diagram's galaxies, as the other
   baselines use it; Serra et al. use a binary tree of pairwise binding energies instead, whose
   role here is the same.
2. *Density of the redshift diagram*: an adaptive kernel estimate (Diaferio 1999, sec. 4.2) of the
   galaxies in the rescaled plane ``(r H0, v / q)`` [``q = 25``], reflected about ``r = 0``, with
   local bandwidths ``h_i = h_c h_opt lambda_i``: ``h_opt = sigma N^(-1/6)`` (normal reference,
   ``sigma^2`` the mean of the two coordinates' variances), ``lambda_i = (gamma / f_pilot(i))^(1/2)``
   (``gamma`` the geometric mean of the pilot density at the galaxies) and ``h_c`` minimising the
   least-squares cross-validation score ``M_0(h_c)`` (Diaferio 1999, eq. 18). Gaussian kernels
   instead of Diaferio's triweight make ``M_0`` closed-form (pairwise sums, no integration grid)
   and the density on the grid separable (one matrix product), which is what makes the method
   cost milliseconds per cluster.
3. *Caustic amplitude at threshold kappa*: on an ``(r, v)`` grid [``n_r = 100`` radii in
   ``[0, r_max]``, ``n_v = 101`` velocities in ``[-v_max, v_max]``], ``A(r)`` is the smaller of the
   velocities above and below ``v = 0`` where the density first drops below kappa (linear
   interpolation between grid nodes); once the density at ``v = 0`` falls below kappa the contour
   has closed and ``A = 0`` outward (``A = 0`` also inside a central hole of a sparse diagram's
   density, before the contour first opens). The gradient restriction of Serra et al. (sec. 4.3):
   where ``d ln A / d ln r > 2`` the next amplitude is ``A_i (r_{i+1}/r_i)^0.25``.
4. *Threshold*: kappa solves ``<v_esc^2>_kappa = 4 <v^2>`` (Diaferio 1999, eq. 21; Serra et al.
   eq. 22), ``<v_esc^2> = int_0^R A^2 phi dr / int_0^R phi dr``, ``phi(r) = int_{-A}^{A} f dv``,
   ``R`` the mean projected radius and ``<v^2>`` the mean squared velocity of the candidate
   members; kappa is scanned on 100 steps up to the density's maximum (as CausticApp does), the
   root located by linear interpolation (the minimum of ``|S|`` where no root exists).
5. *Mass*: ``M(<r)`` as above; ``R200c`` is where the mean enclosed density
   ``M(<r) / (4/3 pi r^3)`` falls to ``200 rho_c(z)`` (``clustermass.cosmology.rho_c``). Beyond
   ``r_max`` (the largest annulus inside the square window; massive clusters' R200c can lie
   outside it) ``A(r)`` is continued at ``A(r_max)`` and the estimate is flagged ``extrapolated``.

Everything is deterministic (no random numbers): the same diagram gives the same mass. A diagram
with fewer than ``min_galaxies`` galaxies inside ``r_max`` (or fewer than ``min_members``
candidate members) gets NaN and a ``reason``, never an exception.

Like the other classical estimators, the raw mass is not expected to equal M200c on these mocks:
it is the summary ``d_pred`` that the SBI step calibrates (:func:`clustermass.evaluation.evaluate`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cosmology
from .membership import shifting_gapper

#: filling factor F_beta of M(<r) = F_beta / G int A^2 dr (Serra et al. 2011)
F_BETA = 0.7
#: rescaling of velocities in the redshift diagram, (r H0, v / q) (Diaferio 1999; Serra et al. 2011)
Q_RESCALE = 25.0
#: H0 in h km/s/Mpc: radii in h^-1 Mpc times H0 are km/s
H0_H = 100.0
#: overdensity of M200c with respect to the critical density
DELTA_C = 200.0
#: the M_0 (LSCV) scan of h_c: log-spaced values, then a parabola through the smallest three
HC_GRID = np.geomspace(0.1, 4.0, 10)
#: galaxies used to choose h_c (a fixed-seed subsample above it)
MAX_POINTS = 250


class CausticEstimate(NamedTuple):
    """Result of the caustic estimator on one diagram."""

    log_m: float  #: log10(M200c / h^-1 Msun) from the caustic mass profile, NaN on failure
    r200: float  #: R200c of that profile [h^-1 Mpc, proper], NaN on failure
    kappa: float  #: density threshold of the caustic [(h^-1 Mpc)^-1 (km/s)^-1, normalised density]
    h_c: float  #: the bandwidth factor chosen by least-squares cross-validation
    n_used: int  #: galaxies inside r_max (the density estimate's)
    n_members: int  #: candidate members (shifting gapper) giving <v^2> and the mean radius
    extrapolated: bool  #: R200c lies beyond r_max (A(r) continued at A(r_max))
    reason: str  #: empty on success, why log_m is NaN otherwise


class CausticProfile(NamedTuple):
    """Caustic amplitude and mass profile on the radial grid (for figures and checks)."""

    r: np.ndarray  #: radii [h^-1 Mpc, proper]
    amplitude: np.ndarray  #: A(r) [km/s]
    mass: np.ndarray  #: M(<r) [h^-1 Msun]
    density: np.ndarray  #: (n_r, n_v) normalised density of the redshift diagram
    v: np.ndarray  #: velocity grid [km/s]


def _failed(reason: str, n_used: int = 0, n_members: int = 0) -> CausticEstimate:
    nan = float("nan")
    return CausticEstimate(nan, nan, nan, nan, n_used, n_members, False, reason)


# ---------------------------------------------------------------------- adaptive KDE
def _gauss1(d, h):
    """1D normal density of offsets ``d`` with standard deviations ``h`` (broadcast)."""
    return np.exp(-0.5 * (d / h) ** 2) / (np.sqrt(2.0 * np.pi) * h)


def adaptive_bandwidths(x, y, hc_grid=HC_GRID, max_points: int | None = MAX_POINTS) -> tuple[np.ndarray, float]:
    """Local Gaussian bandwidths ``h_c h_opt lambda_i`` of points reflected about ``x = 0``.

    Parameters
    ----------
    x, y : ndarray
        Rescaled coordinates of the N galaxies [km/s]: ``r H0`` (>= 0) and ``v / q``.
    hc_grid : ndarray
        Values of ``h_c`` scanned for the minimum of the cross-validation score ``M_0``.
    max_points : int or None
        Above this many galaxies ``h_c`` is chosen on a fixed-seed random subsample of them (the
        pilot density and the bandwidths use all): it bounds the O(N^2) cost of the richest
        diagrams. None: all galaxies.

    Returns
    -------
    h : ndarray (N,)
        Bandwidths [km/s, rescaled units].
    h_c : float
        The chosen factor.
    """
    n_all = len(x)
    h_opt = n_all ** (-1.0 / 6.0) * np.sqrt(0.5 * (np.var(x) + np.var(y)))
    if max_points is not None and n_all > max_points:
        # h_c from a fixed-seed subsample: h_c is relative to the normal reference h_opt(N), so it
        # does not scale with N; the bandwidths below use every galaxy's own lambda.
        sub = np.sort(np.random.default_rng(0).choice(n_all, int(max_points), replace=False))
        h_c = _lscv_hc(x[sub], y[sub], hc_grid)
        pilot = _pilot(x, y, h_opt)
        lam = np.sqrt(np.exp(np.mean(np.log(pilot))) / pilot)
        return h_c * h_opt * lam, h_c
    return _lscv(x, y, hc_grid, h_opt)


def _pilot(x, y, h_opt):
    """Fixed-bandwidth (h_opt) reflected density at each point (integral 1 over x >= 0)."""
    n = len(x)
    iu, ju = np.triu_indices(n, 1)
    d2 = (x[iu] - x[ju]) ** 2 + (y[iu] - y[ju]) ** 2
    m2 = (x[iu] + x[ju]) ** 2 + (y[iu] - y[ju]) ** 2
    g = np.exp(-0.5 * d2 / h_opt**2) + np.exp(-0.5 * m2 / h_opt**2)
    return (1.0 + np.exp(-2.0 * x**2 / h_opt**2) + np.bincount(iu, g, n) + np.bincount(ju, g, n)) / (
        n * 2 * np.pi * h_opt**2)


def _lscv_hc(x, y, hc_grid):
    """h_c of points x, y with their own normal-reference h_opt."""
    n = len(x)
    return _lscv(x, y, hc_grid, n ** (-1.0 / 6.0) * np.sqrt(0.5 * (np.var(x) + np.var(y))))[1]


def _lscv(x, y, hc_grid, h_opt):
    """(bandwidths, h_c): lambda_i from the pilot, h_c minimising M_0 on the grid."""
    n = len(x)
    iu, ju = np.triu_indices(n, 1)
    d2 = (x[iu] - x[ju]) ** 2 + (y[iu] - y[ju]) ** 2  # pairs i < j
    m2 = (x[iu] + x[ju]) ** 2 + (y[iu] - y[ju]) ** 2  # i and the reflection (-x_j, y_j) of j
    self_m2 = 4.0 * x**2  # each point and its own reflection
    pilot = _pilot(x, y, h_opt)
    lam = np.sqrt(np.exp(np.mean(np.log(pilot))) / pilot)
    base = h_opt * lam
    b2 = base**2
    s_pair = b2[iu] + b2[ju]
    # M_0(h_c) = int_{x>=0} f^2 - 2/N sum_i f_{-i}(x_i) for Gaussian kernels, as a sum of
    # terms w exp(e / h_c^2) / h_c^2 (exact: the integral of a product of Gaussians is a Gaussian).
    # int f^2 = (1/N^2) sum_{a,b} [N(d_ab; s_ab) + N(m_ab; s_ab)], s_ab = h_a^2 + h_b^2; the
    # leave-one-out density at i drops i's own kernel and its reflection.
    loo = -2.0 / (n * (n - 1))
    e = np.concatenate([np.zeros(n), -0.5 * self_m2 / (2 * b2),  # a = b: d = 0, m = 2x
                        -0.5 * d2 / s_pair, -0.5 * m2 / s_pair,  # a != b, counted twice
                        -0.5 * d2 / b2[ju], -0.5 * d2 / b2[iu], -0.5 * m2 / b2[ju], -0.5 * m2 / b2[iu]])
    w = np.concatenate([1.0 / (2 * np.pi * 2 * b2) / n**2, 1.0 / (2 * np.pi * 2 * b2) / n**2,
                        2.0 / (2 * np.pi * s_pair) / n**2, 2.0 / (2 * np.pi * s_pair) / n**2,
                        loo / (2 * np.pi * b2[ju]), loo / (2 * np.pi * b2[iu]),
                        loo / (2 * np.pi * b2[ju]), loo / (2 * np.pi * b2[iu])])
    # float32 terms (float64 sums): ~4x faster exponentials; M_0's minimum needs far less precision
    e, w = e.astype(np.float32), w.astype(np.float32)
    inv = 1.0 / np.asarray(hc_grid, float) ** 2
    scores = np.array([(np.exp(e * np.float32(a)) * w).sum(dtype=np.float64) for a in inv]) * inv
    k = int(np.argmin(scores))
    lg = np.log(hc_grid)
    if 0 < k < len(hc_grid) - 1:  # parabola through the three smallest, in log h_c
        y0, y1, y2 = scores[k - 1: k + 2]
        denom = y0 - 2 * y1 + y2
        step = 0.5 * (y0 - y2) / denom if denom > 0 else 0.0
        log_hc = lg[k] + float(np.clip(step, -1, 1)) * (lg[k + 1] - lg[k])
    else:
        log_hc = lg[k]
    h_c = float(np.exp(log_hc))
    return h_c * base, h_c


def redshift_diagram_density(r, v, r_grid, v_grid, q: float = Q_RESCALE, hc_grid=HC_GRID,
                             max_points: int | None = MAX_POINTS):
    """Adaptive-kernel density of the redshift diagram on a grid.

    Parameters
    ----------
    r : ndarray
        Projected radii [h^-1 Mpc] (reflected about 0 by the estimate).
    v : ndarray
        Line-of-sight velocities [km/s].
    r_grid, v_grid : ndarray
        Grid [h^-1 Mpc], [km/s].

    Returns
    -------
    density : ndarray (len(r_grid), len(v_grid))
        Number density per h^-1 Mpc per km/s, normalised to 1 over ``r >= 0``.
    h_c : float
    """
    x, y = np.asarray(r, float) * H0_H, np.asarray(v, float) / q
    h, h_c = adaptive_bandwidths(x, y, hc_grid, max_points)
    xg, yg = np.asarray(r_grid) * H0_H, np.asarray(v_grid) / q
    kx = _gauss1(xg[:, None] - x[None, :], h) + _gauss1(xg[:, None] + x[None, :], h)
    ky = _gauss1(yg[:, None] - y[None, :], h)
    # separable Gaussians: the density is one product summed over galaxies (einsum: small
    # BLAS calls are slow when threads compete for the cores); d(x)d(y) = H0/q dr dv
    return np.einsum("ib,jb->ij", kx, ky) / len(x) * (H0_H / q), h_c


# ---------------------------------------------------------------------- caustic amplitude
def _edge(den, kappa, v_grid, j0, step):
    """|v| where the density along each column, walking from j0 by ``step``, first drops below
    kappa; den (K, n_r, n_v) against kappa (K,). Linear interpolation between grid nodes."""
    side = den[..., j0::step]  # from v = 0 outward
    above = side >= kappa[:, None, None]
    n_side = side.shape[-1]
    # consecutive nodes at or above kappa from v = 0: the first node below, or all of them
    run = np.where(above.all(-1), n_side, np.argmin(above, axis=-1))
    vs = np.abs(v_grid[j0::step])
    last = np.clip(run - 1, 0, n_side - 1)
    nxt = np.clip(run, 0, n_side - 1)
    d_a = np.take_along_axis(side, last[..., None], -1)[..., 0]
    d_b = np.take_along_axis(side, nxt[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip((d_a - kappa[:, None]) / (d_a - d_b), 0.0, 1.0)
    amp = vs[last] + np.nan_to_num(frac) * (vs[nxt] - vs[last])
    amp = np.where(run >= n_side, vs[-1], amp)  # never drops inside the grid
    return np.where(run == 0, 0.0, amp)


def caustic_amplitude(den, kappa, r_grid, v_grid, grad_limit: float = 2.0, new_grad: float = 0.25):
    """A(r) [km/s] at each threshold of ``kappa`` (K,): returns (K, n_r).

    ``v_grid`` must be symmetric with 0 at its middle node.
    """
    kappa = np.atleast_1d(np.asarray(kappa, float))
    j0 = len(v_grid) // 2
    d = np.broadcast_to(den, (len(kappa), *den.shape))
    amp = np.minimum(_edge(d, kappa, v_grid, j0, 1), _edge(d[..., ::-1], kappa, v_grid[::-1], j0, 1))
    # the contour has closed once the density at v = 0 falls below kappa: A = 0 outward. A hole
    # at the very centre (sparse diagrams) only zeroes the radii before the caustic opens.
    above0 = den[None, :, j0] >= kappa[:, None]
    closed = np.logical_or.accumulate(np.logical_or.accumulate(above0, axis=1) & ~above0, axis=1)
    open_ = above0 & ~closed
    amp = np.where(open_, amp, 0.0)
    # Serra et al. 2011 sec. 4.3: limit d ln A / d ln r to grad_limit
    # (sequential: a replaced amplitude is the next step's reference)
    amp = np.ascontiguousarray(amp.T)  # (n_r, K): rows are contiguous
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(r_grid) - 1):
            if r_grid[i] <= 0:
                continue
            a0, a1 = amp[i], amp[i + 1]
            # d ln A / d ln r > grad_limit  <=>  a1 - a0 > grad_limit a0 dr / r  (a0, a1 > 0)
            steep = (a1 - a0 > a0 * (grad_limit * (r_grid[i + 1] - r_grid[i]) / r_grid[i])) & (a0 > 0)
            if steep.any():
                amp[i + 1] = np.where(steep, a0 * (r_grid[i + 1] / r_grid[i]) ** new_grad, a1)
    return amp.T


def _v_esc2(den, amp, r_grid, v_grid, r_mean):
    """<A^2> weighted by phi(r) = int_{-A}^{A} f dv over r < r_mean, for each row of amp (K, n_r)."""
    from scipy.integrate import cumulative_trapezoid

    cum = cumulative_trapezoid(den, v_grid, axis=1, initial=0.0)  # (n_r, n_v)
    dv = v_grid[1] - v_grid[0]
    n_v = len(v_grid)

    def at(vq):  # cum(r, vq) by linear interpolation, vq (K, n_r)
        t = np.clip((vq - v_grid[0]) / dv, 0, n_v - 1)
        i0 = np.clip(np.floor(t).astype(int), 0, n_v - 2)
        w = t - i0
        cols = np.arange(len(r_grid))[None, :]
        return cum[cols, i0] * (1 - w) + cum[cols, i0 + 1] * w

    phi = at(amp) - at(-amp)
    sel = r_grid < r_mean
    if sel.sum() < 2:
        sel[:2] = True
    rr = r_grid[sel]
    norm = np.trapezoid(phi[:, sel], rr, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trapezoid(amp[:, sel] ** 2 * phi[:, sel], rr, axis=1) / norm


def find_kappa(den, r_grid, v_grid, r_mean: float, v2_mean: float, n_kappa: int = 100,
               grad_limit: float = 2.0) -> float:
    """Threshold kappa with ``<v_esc^2>_kappa = 4 <v^2>`` (Diaferio 1999 eq. 21).

    Scans ``n_kappa`` evenly spaced thresholds up to the density's maximum; returns the root
    of ``<v_esc^2> - 4 <v^2>`` by linear interpolation at its first sign change, or the
    threshold of smallest ``|S|`` where it has none.
    """
    kappas = np.linspace(0.0, float(den.max()), n_kappa + 1)[1:-1]
    amp = caustic_amplitude(den, kappas, r_grid, v_grid, grad_limit)
    g = _v_esc2(den, amp, r_grid, v_grid, r_mean) - 4.0 * v2_mean
    fin = np.isfinite(g)
    cross = np.flatnonzero(fin[:-1] & fin[1:] & (g[:-1] > 0) & (g[1:] <= 0))
    if cross.size:
        i = int(cross[0])
        return float(kappas[i] + g[i] / (g[i] - g[i + 1]) * (kappas[i + 1] - kappas[i]))
    if not fin.any():
        return float("nan")
    return float(kappas[np.nanargmin(np.abs(g))])


# ---------------------------------------------------------------------- mass
def mass_profile(amp, r_grid, f_beta: float = F_BETA):
    """M(<r) = F_beta / G int_0^r A^2 dr' [h^-1 Msun] for A [km/s] on r_grid [h^-1 Mpc]."""
    from scipy.integrate import cumulative_trapezoid

    return f_beta / cosmology.G_KMS2_MPC_MSUN * cumulative_trapezoid(np.asarray(amp) ** 2, r_grid, initial=0.0)


def m200c_from_profile(mass, amp, r_grid, z: float, f_beta: float = F_BETA,
                       cosmo: str = cosmology.SIMULATION_COSMOLOGY) -> tuple[float, float, bool]:
    """(M200c [h^-1 Msun], R200c [h^-1 Mpc], extrapolated) of a caustic mass profile.

    R200c is the first radius where ``M(<r) / (4/3 pi r^3) = 200 rho_c(z)`` (log-linear
    interpolation between grid nodes); beyond the grid ``A`` is held at its last value.
    """
    target = DELTA_C * float(cosmology.rho_c(z, cosmo))
    r = r_grid[1:]
    pos = mass[1:] > 0  # a central hole of the density leaves M = 0 at the first nodes
    if not pos.any():
        return float("nan"), float("nan"), False
    mean_rho = mass[1:] / (4.0 / 3.0 * np.pi * r**3)
    below = np.flatnonzero((mean_rho < target) & pos)
    if below.size:
        i = int(below[0])
        if i == int(np.argmax(pos)):  # below at the first massive node: M ~ r inside, rho ~ r^-2
            r200 = float(r[i] * np.sqrt(mean_rho[i] / target))
        else:
            lr = np.log(r[i - 1: i + 1])
            lrho = np.log(mean_rho[i - 1: i + 1])
            r200 = float(np.exp(np.interp(np.log(target), lrho[::-1], lr[::-1])))
        return 4.0 / 3.0 * np.pi * target * r200**3, r200, False
    # continue A(r) = A(r_max): M(r) = M_max + k (r - r_max), solve M(r) = 4/3 pi target r^3
    from scipy.optimize import brentq

    m_max, r_max = float(mass[-1]), float(r_grid[-1])
    k = f_beta / cosmology.G_KMS2_MPC_MSUN * float(amp[-1]) ** 2
    if m_max <= 0:
        return float("nan"), float("nan"), True
    fn = lambda rr: m_max + k * (rr - r_max) - 4.0 / 3.0 * np.pi * target * rr**3  # noqa: E731
    if fn(r_max) <= 0:
        return 4.0 / 3.0 * np.pi * target * r_max**3, r_max, False
    hi = r_max
    while fn(hi) > 0:
        hi *= 2.0
    r200 = float(brentq(fn, r_max, hi, xtol=1e-8))
    return 4.0 / 3.0 * np.pi * target * r200**3, r200, True


def caustic_mass(
    points,
    redshift: float,
    r_max: float = 1.6,
    v_max: float = 2200.0,
    members=None,
    min_galaxies: int = 10,
    min_members: int = 5,
    n_r: int = 100,
    n_v: int = 101,
    q: float = Q_RESCALE,
    f_beta: float = F_BETA,
    grad_limit: float = 2.0,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
    return_profile: bool = False,
):
    """Caustic M200c of one diagram (see the module docstring for the method).

    Parameters
    ----------
    points : (N, 3) array
        ``x_proj, y_proj`` [h^-1 Mpc, proper], ``v_los`` [km/s, rest frame] about the centre.
    redshift : float
        Cluster redshift (for rho_c(z)).
    r_max : float
        Outer radius of the redshift diagram [h^-1 Mpc] (the window's half-width: the largest
        annulus inside the square window).
    v_max : float
        Velocity half-range of the diagram [km/s] (the window's).
    members : array of bool (N,), optional
        Candidate members giving ``<v^2>`` and the mean radius; default the shifting gapper's on
        all N galaxies (:func:`clustermass.membership.shifting_gapper`).
    min_galaxies, min_members : int
        Fewest galaxies inside ``r_max``, and candidate members, for an estimate.
    n_r, n_v : int
        Grid nodes in radius and velocity (``n_v`` odd, so that v = 0 is a node).
    q : float
        Velocity rescaling of the density estimate.
    f_beta : float
        Filling factor.
    grad_limit : float
        Largest d ln A / d ln r before the gradient restriction applies.
    return_profile : bool
        Also return the :class:`CausticProfile`.

    Returns
    -------
    CausticEstimate (and CausticProfile, or None on failure, when ``return_profile``)
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError("points must be an (N, 3) array of x_proj, y_proj, v_los")
    if n_v % 2 == 0:
        raise ValueError("n_v must be odd (v = 0 a grid node)")

    def out(est, prof=None):
        return (est, prof) if return_profile else est

    r_all = np.hypot(pts[:, 0], pts[:, 1])
    inside = (r_all < r_max) & (np.abs(pts[:, 2]) <= v_max) & np.isfinite(pts).all(1)
    r, v = r_all[inside], pts[inside, 2]
    n = len(r)
    if n < min_galaxies:
        return out(_failed(f"too few galaxies inside r_max ({n} < {min_galaxies})", n))
    if members is None:  # the gapper on the whole diagram, as run_baselines does
        members = shifting_gapper(r_all, pts[:, 2])
    mem = np.asarray(members, bool)[inside]
    n_mem = int(mem.sum())
    if n_mem < min_members:
        return out(_failed(f"too few candidate members ({n_mem} < {min_members})", n, n_mem))
    if np.ptp(v) == 0 or np.ptp(r) == 0:
        return out(_failed("degenerate redshift diagram (no spread in r or v)", n, n_mem))
    r_grid = np.linspace(0.0, r_max, n_r)
    v_grid = np.linspace(-v_max, v_max, n_v)
    den, h_c = redshift_diagram_density(r, v, r_grid, v_grid, q)
    kappa = find_kappa(den, r_grid, v_grid, float(np.mean(r[mem])), float(np.mean(v[mem] ** 2)),
                       grad_limit=grad_limit)
    if not np.isfinite(kappa):
        return out(_failed("no caustic threshold found", n, n_mem))
    amp = caustic_amplitude(den, kappa, r_grid, v_grid, grad_limit)[0]
    mass = mass_profile(amp, r_grid, f_beta)
    prof = CausticProfile(r_grid, amp, mass, den, v_grid)
    if not mass[-1] > 0:
        return out(CausticEstimate(float("nan"), float("nan"), kappa, h_c, n, n_mem, False,
                                   "caustic amplitude vanishes"), prof)
    m200, r200, extrap = m200c_from_profile(mass, amp, r_grid, redshift, f_beta, cosmo)
    if not (np.isfinite(m200) and m200 > 0):
        return out(CausticEstimate(float("nan"), float("nan"), kappa, h_c, n, n_mem, extrap,
                                   "no R200c in the caustic mass profile"), prof)
    return out(CausticEstimate(float(np.log10(m200)), r200, kappa, h_c, n, n_mem, extrap, ""), prof)
