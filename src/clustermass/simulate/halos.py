"""Halo populations: the cluster sample (flat in log mass), sight lines, and the clustered
neighbour halos inside each diagram's cylinder.

Units: log10(M200c / h^-1 Msun); lengths h^-1 Mpc (proper unless said comoving); km/s.
All halo-population physics (Tinker et al. 2008 mass function, Tinker et al. 2010 bias, the
matter correlation function: halofit below 5 h^-1 Mpc, linear above) is evaluated once in the simulation cosmology (Planck 2013, as
MDPL2) at the reference redshift :data:`Z_REF` and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from .. import cosmology
from ..config import SimulationConfig

#: redshift of the halo-population tables (the mock spans z ~ 0.01-0.09)
Z_REF = 0.05
#: bin width of the flat-mass resampling [dex]
MASS_BIN = 0.05
#: neighbour halo mass grid [log10 h^-1 Msun]: lower bound (never below) and upper bound
NEIGHBOUR_LOG_M_MIN = 10.5
NEIGHBOUR_LOG_M_MAX = 15.6
NEIGHBOUR_BIN = 0.1
#: line-of-sight slab thickness for the clustered Poisson sampling [h^-1 Mpc]
SLAB = 2.0
#: small-scale (pairwise) velocity dispersion of neighbour halos far from the cluster [km/s]
SIGMA_ENV = 300.0


# ---------------------------------------------------------------------------- tables
def _use():
    return cosmology.use(cosmology.SIMULATION_COSMOLOGY)


@lru_cache(maxsize=2)
def mass_function_table(z: float = Z_REF):
    """Fine grid log M, dn/dlog10M [comoving h^3 Mpc^-3 dex^-1] and cumulative N(<M) (Tinker08)."""
    lm = np.arange(NEIGHBOUR_LOG_M_MIN - 0.1, 16.0 + 1e-9, 0.005)
    dn = cosmology.mass_function(lm, z, cosmo=cosmology.SIMULATION_COSMOLOGY)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (dn[1:] + dn[:-1]) * np.diff(lm))])
    return lm, dn, cum


def sample_mass_in_range(lo, hi, rng: np.random.Generator) -> np.ndarray:
    """log M drawn from the mass function restricted to [lo, hi] (arrays; inverse CDF)."""
    lm, _, cum = mass_function_table()
    clo, chi = np.interp(lo, lm, cum), np.interp(hi, lm, cum)
    u = clo + rng.random(np.shape(lo)) * (chi - clo)
    return np.interp(u, cum, lm)


def halo_bias(log_m) -> np.ndarray:
    """Linear halo bias b(M200c) of Tinker et al. (2010), colossus."""
    from colossus.lss import bias

    _use()
    return bias.haloBias(10 ** np.asarray(log_m, dtype=float), Z_REF, "200c", model="tinker10")


#: below this separation [comoving h^-1 Mpc] the halofit nonlinear xi replaces the linear one
XI_NONLINEAR_BELOW = 5.0


def _halofit_delta2(k, z: float):
    """Linear and nonlinear dimensionless power Delta^2(k) (halofit, Takahashi et al. 2012).

    Linear P(k) from colossus (Eisenstein & Hu 1998); flat LCDM (w = -1). k in h Mpc^-1.
    """
    c = _use()
    dl = k**3 * c.matterPowerSpectrum(k, z) / (2 * np.pi**2)
    kg = np.logspace(-4, 2, 3000)
    dg = kg**3 * c.matterPowerSpectrum(kg, z) / (2 * np.pi**2)

    def lnsig2(lnr):
        return np.log(np.trapezoid(dg * np.exp(-((kg * np.exp(lnr)) ** 2)), np.log(kg)))

    lr = np.linspace(np.log(1e-2), np.log(30.0), 300)
    ls = np.array([lnsig2(x) for x in lr])
    ln_r1 = np.interp(0.0, ls[::-1], lr[::-1])  # sigma(R1) = 1 for a Gaussian filter
    h = 0.01
    d1 = (lnsig2(ln_r1 + h) - lnsig2(ln_r1 - h)) / (2 * h)
    d2 = (lnsig2(ln_r1 + h) - 2 * lnsig2(ln_r1) + lnsig2(ln_r1 - h)) / h**2
    n, cc = -3.0 - d1, -d2
    om = c.Om(z)
    an = 10 ** (1.5222 + 2.8553 * n + 2.3706 * n**2 + 0.9903 * n**3 + 0.2250 * n**4 - 0.6038 * cc)
    bn = 10 ** (-0.5642 + 0.5864 * n + 0.5716 * n**2 - 1.5474 * cc)
    cn = 10 ** (0.3698 + 2.0404 * n + 0.8161 * n**2 + 0.5869 * cc)
    gn = 0.1971 - 0.0843 * n + 0.8460 * cc
    alpha = abs(6.0835 + 1.3373 * n - 0.1959 * n**2 - 5.5274 * cc)
    beta = 2.0379 - 0.7354 * n + 0.3157 * n**2 + 1.2490 * n**3 + 0.3980 * n**4 - 0.1682 * cc
    nu = 10 ** (5.2105 + 3.6902 * n)
    f1, f2, f3 = om**-0.0307, om**-0.0585, om**0.0743
    y = k * np.exp(ln_r1)
    fy = y / 4 + y**2 / 8
    quasi = dl * (1 + dl) ** beta / (1 + alpha * dl) * np.exp(-fy)
    halo = an * y ** (3 * f1) / (1 + bn * y**f2 + (f3 * cn * y) ** (3 - gn)) / (1 + nu / y**2)
    return dl, quasi + halo


@lru_cache(maxsize=1)
def _xi_table():
    """log r [comoving h^-1 Mpc], matter xi(r) and its volume average xibar(<r).

    xi is the linear colossus correlation function above ``XI_NONLINEAR_BELOW`` and the
    Fourier transform of the halofit power spectrum below it (smoothed on 0.05 h^-1 Mpc).
    """
    c = _use()
    lr = np.linspace(-2.0, 2.3, 200)
    r = 10**lr
    xi = c.correlationFunction(r, Z_REF)
    k = np.concatenate([np.logspace(-4, 0, 2000), np.arange(1.0, 60.0, 0.002)[1:]])
    _, d2 = _halofit_delta2(k, Z_REF)
    small = r < XI_NONLINEAR_BELOW
    w = d2 * np.exp(-((0.05 * k) ** 2)) / k
    xi[small] = np.trapezoid(w[None, :] * np.sinc(k[None, :] * r[small, None] / np.pi), k, axis=1)
    # xibar(<r) = 3/r^3 int_0^r xi r'^2 dr' (xi ~ const below 0.01)
    integrand = xi * r**3 * np.log(10)
    cum = np.concatenate([[xi[0] * r[0] ** 3 / 3], np.zeros(len(r) - 1)])
    cum[1:] = cum[0] + np.cumsum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(lr))
    return lr, xi, 3 * cum / r**3


def xi_mm(r) -> np.ndarray:
    """Matter correlation function at comoving separation r [h^-1 Mpc]: halofit (Takahashi et
    al. 2012) below 5 h^-1 Mpc, linear (colossus) above."""
    lr, xi, _ = _xi_table()
    return np.interp(np.log10(np.maximum(r, 1e-2)), lr, xi, right=0.0)


def xibar_mm(r) -> np.ndarray:
    """Volume-averaged matter correlation function inside r [comoving h^-1 Mpc]."""
    lr, _, xb = _xi_table()
    return np.interp(np.log10(np.maximum(r, 1e-2)), lr, xb, right=0.0)


def halo_xi(r, b1, b2) -> np.ndarray:
    """Halo-halo correlation b1 b2 zeta(r) xi_mm(r) with the scale-dependent bias of Tinker et
    al. (2005): zeta = (1 + 1.17 xi)^1.49 / (1 + 0.69 xi)^2.09 (r comoving h^-1 Mpc).
    Increasing in xi, hence decreasing in r."""
    xi = xi_mm(r)
    xp = np.maximum(xi, 0.0)
    return b1 * b2 * xi * (1 + 1.17 * xp) ** 1.49 / (1 + 0.69 * xp) ** 2.09


@dataclass(frozen=True)
class NeighbourGrid:
    """Mass bins of the neighbour halos: edges, comoving density per bin, bias, R200c at Z_REF."""

    lo: np.ndarray
    hi: np.ndarray
    density: np.ndarray
    bias: np.ndarray
    r200: np.ndarray


@lru_cache(maxsize=1)
def neighbour_grid() -> NeighbourGrid:
    lo = np.arange(NEIGHBOUR_LOG_M_MIN, NEIGHBOUR_LOG_M_MAX - 1e-9, NEIGHBOUR_BIN)
    hi = lo + NEIGHBOUR_BIN
    lm, _, cum = mass_function_table()
    dens = np.interp(hi, lm, cum) - np.interp(lo, lm, cum)
    mid = 0.5 * (lo + hi)
    return NeighbourGrid(lo, hi, dens, halo_bias(mid), cosmology.r200c(hi, Z_REF))


# ---------------------------------------------------------------------------- cluster sample
def mass_edges(sim: SimulationConfig) -> np.ndarray:
    """Edges of the ``MASS_BIN`` bins from sim.log_m_min to sim.log_m_max (last bin may be narrower)."""
    edges = np.arange(sim.log_m_min, sim.log_m_max + 1e-9, MASS_BIN)
    if edges[-1] < sim.log_m_max - 1e-9:
        edges = np.append(edges, sim.log_m_max)
    return edges


def allocate_sightlines(avail, n_total: int, max_sightlines: int) -> list[np.ndarray]:
    """Sight lines per halo in each mass bin for a flat log-mass distribution.

    ``avail`` is the number of unique halos per bin. Every bin gets the common target T
    (capped at ``avail * max_sightlines``), with T chosen so the bins add up to ``n_total``;
    a bin uses ceil(T / avail) sight lines per halo (at least 1). Returns, per bin, the
    array of sight-line counts of its selected halos (the last one may get fewer).
    """
    avail = np.asarray(avail, dtype=float)
    cap = avail * max_sightlines
    lo_t, hi_t = 0.0, float(n_total)
    for _ in range(100):
        mid = 0.5 * (lo_t + hi_t)
        lo_t, hi_t = (mid, hi_t) if np.minimum(mid, cap).sum() < n_total else (lo_t, mid)
    target = np.minimum(hi_t, cap)
    # integer targets adding up to min(n_total, sum cap) (largest remainders)
    t_int = np.floor(target).astype(np.int64)
    short = int(min(n_total, np.floor(cap.sum())) - t_int.sum())
    if short > 0:
        room = np.flatnonzero(t_int + 1 <= cap)
        t_int[room[np.argsort(-(target - t_int)[room], kind="stable")[:short]]] += 1
    target = t_int.astype(float)
    out = []
    for b in range(avail.size):
        if target[b] < 0.5 or avail[b] <= 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        nsl = int(np.clip(np.ceil(target[b] / avail[b] - 1e-9), 1, max_sightlines))
        nh = int(np.floor(target[b] / nsl + 1e-9))
        rem = int(target[b] - nh * nsl)
        counts = np.full(nh, nsl, dtype=np.int64)
        if rem > 0 and nh < avail[b]:
            counts = np.append(counts, rem)
        out.append(counts)
    return out


def assign_splits(counts: np.ndarray, sim: SimulationConfig) -> np.ndarray:
    """Split of each halo (train/test/eval) so the diagram counts follow the preset fractions.

    Greedy: each halo in turn goes to the split furthest below its share of the diagrams
    assigned so far. Called on halos ordered by mass bin, every bin and the total follow the
    fractions to within one halo's sight lines.
    """
    fractions = np.array([sim.n_train, sim.n_test, sim.n_eval], dtype=float) / max(sim.n_total, 1)
    done = np.zeros(3)
    out = np.empty(len(counts), dtype=np.int64)
    for i, c in enumerate(np.asarray(counts)):
        k = int(np.argmax(fractions * (done.sum() + c) - done))
        out[i] = k
        done[k] += c
    return np.array(["train", "test", "eval"])[out]


def _flat_halo_sample(sim: SimulationConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Halo masses and sight-line counts, flat in log mass (:func:`cluster_sample`), by mass bin."""
    edges = mass_edges(sim)
    lm, _, cum = mass_function_table()
    avail = (np.interp(edges[1:], lm, cum) - np.interp(edges[:-1], lm, cum)) * sim.volume
    rows = []
    for b, counts in enumerate(allocate_sightlines(avail, sim.n_total, sim.max_sightlines)):
        if counts.size == 0:
            continue
        masses = sample_mass_in_range(
            np.full(counts.size, edges[b]), np.full(counts.size, edges[b + 1]), rng
        )
        counts = counts[rng.permutation(counts.size)]
        rows.append(pd.DataFrame({"log_m200c": masses, "n_sightlines": counts}))
    return pd.concat(rows, ignore_index=True)


def cluster_sample(sim: SimulationConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Unique cluster halos with their number of sight lines and split.

    The unique halos available per ``MASS_BIN`` are the Tinker08 counts in ``sim.volume``; each
    bin is filled up to a common target T (downsampling the abundant low masses), using up to
    ``sim.max_sightlines`` sight lines per halo where halos are rare. T is chosen so that the
    total is ``sim.n_total`` diagrams (flat in log mass, falling at the top as in the paper's
    Fig. 1 when the volume runs out of massive halos). Halos are assigned to splits within each
    mass bin so every split has the same mass distribution; a halo's sight lines never straddle
    two splits, so split sizes match the preset only to within a few diagrams per bin.

    With ``sim.mass_distribution == "mass-function"`` the ``sim.n_total`` halos are drawn from the
    Tinker08 mass function over [log_m_min, log_m_max] instead, one sight line each: a
    survey-like sample (the steep mass function), for checking ``--prior mass-function``.

    Returns
    -------
    DataFrame with ``halo_id, log_m200c, n_sightlines, split`` (one row per unique halo).
    """
    n_total = sim.n_total
    if sim.mass_distribution == "mass-function":
        masses = sample_mass_in_range(np.full(n_total, sim.log_m_min), np.full(n_total, sim.log_m_max), rng)
        halos = pd.DataFrame({"log_m200c": np.sort(masses), "n_sightlines": np.ones(n_total, np.int64)})
    else:
        halos = _flat_halo_sample(sim, rng)
    halos["split"] = assign_splits(halos["n_sightlines"].to_numpy(), sim)
    halos = halos.iloc[rng.permutation(len(halos))].reset_index(drop=True)
    halos.insert(0, "halo_id", np.arange(len(halos), dtype=np.int64))
    halos["n_sightlines"] = halos["n_sightlines"].astype(np.int64)
    return halos


# ---------------------------------------------------------------------------- sight lines
@lru_cache(maxsize=4)
def sightline_directions(n_max: int = 25, n_candidates: int = 4000) -> np.ndarray:
    """(n_max, 3) unit vectors, any prefix of which is a well-separated set of *lines*.

    Greedy farthest-point selection over a Fibonacci sphere: each new axis maximises its smallest
    angle arccos|u.v| to the chosen ones, so d and -d (the same line of sight up to a parity flip
    of the projected diagram) are never both used.
    """
    i = np.arange(n_candidates) + 0.5
    phi = np.arccos(1 - 2 * i / n_candidates)
    theta = np.pi * (1 + 5**0.5) * i
    cand = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    chosen = [np.array([0.0, 0.0, 1.0])]
    best = np.abs(cand @ chosen[0])
    for _ in range(n_max - 1):
        k = int(np.argmin(best))
        chosen.append(cand[k])
        best = np.maximum(best, np.abs(cand @ cand[k]))
    return np.array(chosen)


def min_separation_deg(dirs: np.ndarray) -> float:
    """Smallest angle [deg] between any two lines (axes) in ``dirs``."""
    if len(dirs) < 2:
        return 180.0
    d = np.abs(dirs @ dirs.T)
    np.fill_diagonal(d, 0.0)
    return float(np.degrees(np.arccos(np.clip(d.max(), -1, 1))))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) uniformly random rotation matrices (from random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def sightline_bases(n_sightlines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(sum n, 3, 3) orthonormal bases (rows e_x, e_y, e_los) for every diagram of every halo.

    Directions are the first n of :func:`sightline_directions`, rotated randomly per halo; the
    sky axes get a random position angle.
    """
    n_sightlines = np.asarray(n_sightlines, dtype=np.int64)
    dirs = sightline_directions(int(max(n_sightlines.max(initial=1), 1)))
    rot = random_rotations(len(n_sightlines), rng)
    halo = np.repeat(np.arange(len(n_sightlines)), n_sightlines)
    k = np.arange(halo.size) - np.repeat(np.cumsum(n_sightlines) - n_sightlines, n_sightlines)
    los = np.einsum("nij,nj->ni", rot[halo], dirs[k])
    helper = rng.normal(size=los.shape)
    ex = helper - np.sum(helper * los, axis=1, keepdims=True) * los
    ex /= np.linalg.norm(ex, axis=1, keepdims=True)
    ey = np.cross(los, ex)
    return np.stack([ex, ey, los], axis=1)


# ---------------------------------------------------------------------------- neighbours
def nfw_enclosed_mass(y):
    """NFW mass inside r = y r_s in units of 4 pi rho_s r_s^3: ln(1 + y) - y / (1 + y)."""
    return np.log1p(y) - y / (1.0 + y)


def infall_velocity(r, log_m_cl, r200_cl, v200_cl, conc_cl, z, bias=None) -> np.ndarray:
    """Mean radial peculiar velocity [km/s, < 0 = infall] of halos at proper distance r.

    Nonlinear spherical-infall approximation v = -(1/3) f H r Delta / (1 + Delta)^(1/4)
    (Lilje & Lahav 1991; Croft et al. 1999) with Delta(r) the mean matter overdensity inside r:
    the cluster's NFW mass (extended beyond R200c) plus b(M) xibar_lin(r). Capped at V200c where
    the formula overshoots inside ~2 R200c (simulated infall peaks near -V200c, e.g.
    Cuesta et al. 2008; Zu & Weinberg 2013).
    """
    c = _use()
    r = np.asarray(r, dtype=float)
    rho_m = c.rho_m(z) * 1e9 * (1 + z) ** 3  # proper h^2 Msun Mpc^-3
    m_in = 10**log_m_cl * nfw_enclosed_mass(conc_cl * r / r200_cl) / nfw_enclosed_mass(conc_cl)
    b = halo_bias(log_m_cl) if bias is None else bias
    delta = m_in / (rho_m * 4.0 / 3.0 * np.pi * r**3) + b * xibar_mm(r * (1 + z))
    f = c.Om(z) ** 0.55
    v = -(1.0 / 3.0) * f * cosmology.hubble(z) * r * delta / (1 + delta) ** 0.25
    return np.maximum(v, -v200_cl)


def exclusion_transition(x) -> np.ndarray:
    """Share of distinct halos excluded at r / R200c(cluster) = x: [1 + x^8]^-2 (1 inside,
    0.75 at R200c, 0.01 at 1.3 R200c; the DK14 transition shape with a steeper slope)."""
    u = np.asarray(x, dtype=float) ** 2
    u *= u
    d = 1.0 + u * u
    return 1.0 / (d * d)


def sample_neighbours(
    log_m_cl: np.ndarray,
    r200_cl: np.ndarray,
    v200_cl: np.ndarray,
    conc_cl: np.ndarray,
    z: np.ndarray,
    log_m_floor: np.ndarray,
    half_width: float,
    depth: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Neighbour halos in the cylinder of each diagram (vectorised over diagrams).

    Halos are a Poisson process of comoving density n(M) [1 + xi_hh(r)] [1 - e(r / R200c)],
    xi_hh = b(M_cl) b(M) zeta(r) xi_mm(r) (:func:`halo_xi`: Tinker08, Tinker10, halofit,
    Tinker05 zeta), with a soft halo exclusion e (:func:`exclusion_transition`): distinct halos
    live outside the cluster's R200c, halos inside it are its subhalos (its own galaxies and
    groups), and the boundary is smooth instead of an empty shell. Sampled by rejection in
    line-of-sight slabs of ``SLAB`` h^-1 Mpc. The sky region of a halo of mass M is
    |x|,|y| <= half_width + R200c(M) (its galaxies may reach into the window); along the sight
    line |z| <= depth (per diagram, proper).

    Parameters
    ----------
    log_m_cl, r200_cl, v200_cl, conc_cl, z : per diagram cluster mass, R200c [h^-1 Mpc],
        V200c [km/s], c200c and redshift.
    log_m_floor : per diagram smallest neighbour mass worth sampling (can host a visible galaxy).
    half_width : sky half-width of the window [h^-1 Mpc, proper].
    depth : per diagram half-length of the cylinder along the line of sight [h^-1 Mpc, proper].

    Returns
    -------
    DataFrame with ``diagram, log_m200c, x, y, z`` [h^-1 Mpc proper, sight-line frame,
    e_los = z] and ``vx, vy, vz`` [km/s, peculiar velocity relative to the cluster].
    """
    grid = neighbour_grid()
    b_cl = halo_bias(log_m_cl)
    a3 = (1 + z) ** 3
    n_slab = np.ceil(depth / SLAB).astype(int)
    kmax = int(n_slab.max(initial=1))
    k = np.arange(-kmax, kmax)  # slab [k, k+1) * SLAB
    zlo, zhi = k * SLAB, (k + 1) * SLAB
    # bins partly above the floor: clip the lower edge
    lo = np.maximum(grid.lo[None, :], log_m_floor[:, None])  # (nd, nj)
    lm, _, cum = mass_function_table()
    dens = (
        np.clip(np.interp(grid.hi, lm, cum)[None, :] - np.interp(lo, lm, cum), 0, None)
        * a3[:, None]
    )
    r_excl = np.broadcast_to(0.4 * r200_cl[:, None], (len(r200_cl), grid.r200.size))  # (nd, nj)
    zmin_abs = np.where((zlo <= 0) & (zhi >= 0), 0.0, np.minimum(np.abs(zlo), np.abs(zhi)))  # (nk,)
    rmin = np.maximum(zmin_abs[None, None, :], r_excl[:, :, None])  # (nd, nj, nk)
    xi_max = halo_xi(rmin * (1 + z)[:, None, None], b_cl[:, None, None], grid.bias[None, :, None])
    env_max = 1.0 + np.maximum(xi_max, 0.0)
    w = half_width + grid.r200  # (nj,)
    vol = (2 * w[None, :, None]) ** 2 * SLAB
    inside = (k[None, :] >= -n_slab[:, None]) & (k[None, :] < n_slab[:, None])  # (nd, nk)
    lam = dens[:, :, None] * vol * env_max * inside[:, None, :]
    counts = rng.poisson(lam).ravel()
    idx = np.repeat(np.arange(counts.size), counts)
    d, j, kk = np.unravel_index(idx, lam.shape)
    n = idx.size
    x = (rng.random(n) * 2 - 1) * w[j]
    y = (rng.random(n) * 2 - 1) * w[j]
    zz = zlo[kk] + rng.random(n) * SLAB
    r = np.sqrt(x * x + y * y + zz * zz)
    p = (1.0 + np.maximum(halo_xi(r * (1 + z[d]), b_cl[d], grid.bias[j]), 0.0)) * (
        1.0 - exclusion_transition(r / r200_cl[d])
    )
    keep = rng.random(n) * env_max[d, j, kk] < p
    d, j, x, y, zz, r = d[keep], j[keep], x[keep], y[keep], zz[keep], r[keep]
    lmass = sample_mass_in_range(lo[d, j], np.full(d.size, 1.0) * grid.hi[j], rng)
    vr = infall_velocity(r, log_m_cl[d], r200_cl[d], v200_cl[d], conc_cl[d], z[d])
    sig = np.sqrt(SIGMA_ENV**2 + (0.6 * v200_cl[d]) ** 2 * np.minimum(r200_cl[d] / r, 1.0))
    vel = vr[:, None] * np.stack([x, y, zz], axis=1) / r[:, None] + sig[:, None] * rng.normal(
        size=(d.size, 3)
    )
    out = pd.DataFrame(
        {
            "diagram": d.astype(np.int64),
            "log_m200c": lmass,
            "x": x,
            "y": y,
            "z": zz,
            "vx": vel[:, 0],
            "vy": vel[:, 1],
            "vz": vel[:, 2],
        }
    )
    return out.sort_values("diagram", kind="stable").reset_index(drop=True)
