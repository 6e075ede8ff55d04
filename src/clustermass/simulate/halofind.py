"""Halos of a particle box: friends-of-friends groups, spherical-overdensity M200c, and
abundance matching to the Tinker et al. (2008) mass function.

Units: positions comoving h^-1 Mpc in a periodic box; velocities km/s; masses h^-1 Msun
(``log_*`` columns log10); R200c proper h^-1 Mpc.

- FoF (Davis et al. 1985): particles closer than b times the mean interparticle separation are
  friends; groups are the connected components (``scipy.spatial.cKDTree.query_pairs`` on the
  periodic box, ``scipy.sparse.csgraph.connected_components``). b = 0.2.
- Centre: the member with the most members within the linking length (the density peak); bulk
  velocity: the members' mean.
- M200c from the particles: mass inside the largest radius around the centre where the mean
  enclosed density is 200 rho_c(z) (all particles, not only FoF members).
- Abundance matching: the PM mesh softens halos (force resolution box/n_mesh ~ R200c), so their
  particle M200c is biased low. Ranked by FoF mass, halo i gets the M200c at which the Tinker08
  cumulative abundance n(>M) times the box volume equals its rank (+1/2): the mass function is
  Tinker08 by construction, the ranking (which halo is more massive, where it sits, how its
  particles move) comes from the simulation.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .. import cosmology
from ..errors import ConfigError

#: FoF linking length in units of the mean interparticle separation (Davis et al. 1985)
LINKING_LENGTH = 0.2


def fof_groups(pos: np.ndarray, box_size: float, n_per_side: int, b: float = LINKING_LENGTH,
               min_members: int = 20, tree: cKDTree | None = None):
    """Friends-of-friends groups of particles in a periodic box.

    Parameters
    ----------
    pos : (n, 3) positions [h^-1 Mpc comoving] in [0, box_size)
    box_size : float [h^-1 Mpc]
    n_per_side : int
        Particles per side (mean separation box_size / n_per_side).
    b : float
        Linking length in mean separations.
    min_members : int
        Smallest group kept.

    Returns
    -------
    group : (n,) int64, the group index of each particle (-1: field, or a group below
    ``min_members``); groups are numbered by decreasing size.
    """
    if min_members < 2:
        raise ConfigError("min_members must be at least 2")
    ll = b * box_size / n_per_side
    tree = tree if tree is not None else cKDTree(pos, boxsize=box_size)
    pairs = tree.query_pairs(ll, output_type="ndarray")
    n = len(pos)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    size = np.bincount(label)
    big = np.flatnonzero(size >= min_members)
    big = big[np.argsort(-size[big], kind="stable")]
    remap = np.full(size.size, -1, dtype=np.int64)
    remap[big] = np.arange(big.size)
    return remap[label]


def _rel(p, c, box_size):
    return (p - c + box_size / 2) % box_size - box_size / 2


def find_halos(pos: np.ndarray, vel: np.ndarray, particle_mass: float, box_size: float,
               n_per_side: int, redshift: float = 0.0, min_members: int = 20,
               b: float = LINKING_LENGTH, progress: bool = True):
    """FoF halos with centres, bulk velocities, FoF masses and particle M200c.

    Returns
    -------
    halos : DataFrame with ``halo_id`` (0.. by decreasing FoF mass), ``x, y, z`` [h^-1 Mpc
        comoving], ``vx, vy, vz`` [km/s], ``n_fof``, ``log_m_fof``, ``log_m200c_so`` (particle
        SO mass; NaN when the centre is below 200 rho_c), ``r200c_so`` [h^-1 Mpc proper].
    group : (n,) the halo index of every particle (-1: not in a halo)
    timings : dict [s]
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tree = cKDTree(pos, boxsize=box_size)
    group = fof_groups(pos, box_size, n_per_side, b, min_members, tree=tree)
    t_fof = time.perf_counter() - t0
    ng = int(group.max()) + 1 if group.size and group.max() >= 0 else 0
    ll = b * box_size / n_per_side
    order = np.argsort(group, kind="stable")
    gs = group[order]
    starts = np.searchsorted(gs, np.arange(ng))
    ends = np.searchsorted(gs, np.arange(ng), side="right")
    centre = np.zeros((ng, 3))
    vbulk = np.zeros((ng, 3))
    n_fof = ends - starts
    m_so = np.full(ng, np.nan)
    # comoving density threshold of 200 rho_c(z), in particles per (h^-1 Mpc)^3 comoving
    a = 1.0 / (1.0 + redshift)
    thresh = 200.0 * cosmology.rho_c(redshift) * a**3 / particle_mass
    for g in tqdm(range(ng), desc="halo centres", disable=not progress, leave=False):
        idx = order[starts[g]:ends[g]]
        p = pos[idx]
        # density peak: the member with the most neighbours within the linking length
        sub = cKDTree(_rel(p, p[0], box_size))
        nn = np.asarray(sub.query_ball_point(_rel(p, p[0], box_size), ll, return_length=True))
        c = p[np.argmax(nn)]
        centre[g] = c
        vbulk[g] = vel[idx].mean(axis=0)
        # SO mass: all particles within a generous radius (FoF extent is a few R200c)
        r_fof = (3 * n_fof[g] / (4 * np.pi * thresh)) ** (1 / 3)
        near = tree.query_ball_point(c, 2.5 * r_fof)
        d = np.sort(np.linalg.norm(_rel(pos[near], c, box_size), axis=1))
        d = np.maximum(d, 1e-6)
        dens = np.arange(1, d.size + 1) / (4 / 3 * np.pi * d**3)
        above = np.flatnonzero(dens >= thresh)
        if above.size:
            m_so[g] = (above[-1] + 1) * particle_mass
    halos = pd.DataFrame({
        "halo_id": np.arange(ng, dtype=np.int64),
        "x": centre[:, 0], "y": centre[:, 1], "z": centre[:, 2],
        "vx": vbulk[:, 0], "vy": vbulk[:, 1], "vz": vbulk[:, 2],
        "n_fof": n_fof.astype(np.int64),
        "log_m_fof": np.log10(n_fof * particle_mass),
        "log_m200c_so": np.log10(m_so),
    })
    halos["r200c_so"] = (3 * 10 ** halos["log_m200c_so"] / (4 * np.pi * 200 * cosmology.rho_c(redshift))) ** (1 / 3)
    return halos, group, {"fof_s": t_fof, "centres_s": time.perf_counter() - t0 - t_fof}


def cumulative_abundance(log_m, z: float = 0.0, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Tinker08 n(>M200c) [h^3 Mpc^-3] at log10 M200c [h^-1 Msun] (colossus)."""
    grid = np.arange(10.0, 16.5, 0.01)
    dn = cosmology.mass_function(grid, z, cosmo=cosmo)
    # integrate from the top: n(>M) = int_M^inf dn/dlog10M dlog10M
    cum = np.concatenate([np.cumsum(((dn[1:] + dn[:-1]) / 2 * 0.01)[::-1])[::-1], [0.0]])
    return np.interp(np.asarray(log_m, float), grid, cum)


def abundance_match(rank_mass, volume: float, z: float = 0.0,
                    cosmo: str = cosmology.SIMULATION_COSMOLOGY) -> np.ndarray:
    """log10 M200c [h^-1 Msun] by abundance matching to Tinker08.

    Parameters
    ----------
    rank_mass : array
        Any mass proxy (the FoF mass); larger = more massive. Ties keep their input order.
    volume : float
        Volume of the box [h^-3 Mpc^3].

    Returns
    -------
    log M200c with n_T08(> M_i) * volume = rank_i + 1/2 (rank 0 the most massive).
    """
    rank_mass = np.asarray(rank_mass, float)
    order = np.argsort(-rank_mass, kind="stable")
    n_target = (np.arange(rank_mass.size) + 0.5) / volume
    grid = np.arange(10.0, 16.5, 0.01)
    cum = cumulative_abundance(grid, z, cosmo)
    # cum decreases with mass: interpolate log M as a function of log n
    pos = cum > 0
    lm = np.interp(np.log(n_target), np.log(cum[pos][::-1]), grid[pos][::-1])
    out = np.empty_like(rank_mass)
    out[order] = lm
    return out


def tinker_draw(log_m_lo: float, log_m_hi: float, volume: float, rng: np.random.Generator,
                z: float = 0.0, cosmo: str = cosmology.SIMULATION_COSMOLOGY) -> np.ndarray:
    """Poisson draw of the Tinker08 halos with log10 M200c in [lo, hi) in ``volume``
    [h^-3 Mpc^3] (the halos the mesh does not resolve)."""
    if log_m_hi <= log_m_lo:
        return np.zeros(0)
    n_lo, n_hi = cumulative_abundance([log_m_lo, log_m_hi], z, cosmo)
    n = rng.poisson((n_lo - n_hi) * volume)
    u = rng.uniform(n_hi, n_lo, size=n)
    grid = np.arange(log_m_lo, log_m_hi + 0.005, 0.005)
    cum = cumulative_abundance(grid, z, cosmo)
    return np.interp(u, cum[::-1], grid[::-1])


def member_dispersion(halos: pd.DataFrame, group: np.ndarray, pos: np.ndarray, vel: np.ndarray,
                      box_size: float, redshift: float = 0.0):
    """1D velocity dispersion [km/s] of each halo's FoF members within R200c (of its
    ``log_m200c``) of the centre, and their number.

    sigma = sqrt(<|v - v_mean|^2> / 3) over the members inside R200c [comoving: R200c (1+z)].
    """
    ng = len(halos)
    order = np.argsort(group, kind="stable")
    gs = group[order]
    starts = np.searchsorted(gs, np.arange(ng))
    ends = np.searchsorted(gs, np.arange(ng), side="right")
    r200 = cosmology.r200c(halos["log_m200c"].to_numpy(float), redshift) * (1 + redshift)
    cen = halos[["x", "y", "z"]].to_numpy(float)
    sig = np.full(ng, np.nan)
    n_in = np.zeros(ng, np.int64)
    for g in range(ng):
        idx = order[starts[g]:ends[g]]
        inside = np.linalg.norm(_rel(pos[idx], cen[g], box_size), axis=1) <= r200[g]
        n_in[g] = inside.sum()
        if n_in[g] >= 3:
            v = vel[idx[inside]]
            sig[g] = np.sqrt(np.mean((v - v.mean(axis=0)) ** 2))
    return sig, n_in


def calibrate_velocities(halos: pd.DataFrame, group: np.ndarray, pos: np.ndarray, vel: np.ndarray,
                         box_size: float, redshift: float = 0.0, min_inside: int = 30):
    """Member velocities rescaled about each halo's bulk velocity so that the mean relation
    sigma(M200c) of the halos matches Evrard et al. (2008).

    The PM mesh softens gravity on the scale of R200c, so its halos are too cold; the ratio
    r(M) = sigma / sigma_Evrard is fitted as a straight line in log10 M200c (halos with at least
    ``min_inside`` members within R200c) and each halo's members get v_bulk + (v - v_bulk) / r(M).
    The scatter of sigma at fixed mass, the anisotropy and the shape of each halo's velocity
    ellipsoid stay the simulation's. Returns the new velocities (field particles unchanged) and
    the fit {slope, intercept at 10^14, n}.
    """
    from ..baselines import evrard_sigma

    sig, n_in = member_dispersion(halos, group, pos, vel, box_size, redshift)
    lm = halos["log_m200c"].to_numpy(float)
    ok = np.isfinite(sig) & (n_in >= min_inside) & np.isfinite(lm)
    if ok.sum() < 3:
        return vel.copy(), {"slope": 0.0, "ratio_at_14": 1.0, "n": int(ok.sum())}
    y = np.log(sig[ok] / evrard_sigma(lm[ok], redshift))
    b, a = np.polyfit(lm[ok] - 14.0, y, 1)
    ratio = np.exp(a + b * (np.clip(lm, lm[ok].min(), lm[ok].max()) - 14.0))
    vb = halos[["vx", "vy", "vz"]].to_numpy(float)
    out = vel.astype(np.float64, copy=True)
    inh = group >= 0
    g = group[inh]
    out[inh] = vb[g] + (out[inh] - vb[g]) / ratio[g, None]
    return out.astype(vel.dtype), {"slope": float(b), "ratio_at_14": float(np.exp(a)), "n": int(ok.sum())}


def calibrate_profiles(halos: pd.DataFrame, group: np.ndarray, pos: np.ndarray, particle_mass: float,
                       box_size: float, redshift: float = 0.0) -> np.ndarray:
    """Member positions moved radially so that each halo's profile is NFW inside R200c.

    The PM mesh cores halos on the scale of its cells (~R200c): their particle M200c falls
    ~0.4 dex below the abundance-matched one, and satellites on their particles spread too far.
    Each halo's members keep their direction from the centre and their radial order; the
    innermost fraction f200 = min(1, M200c / M_FoF) is placed on the NFW profile of the halo's
    M200c (colossus median c(M), :func:`clustermass.cosmology.concentration_200c`) inside R200c,
    the rest keeps its radial profile scaled by one factor so that it starts at R200c. Shapes,
    substructure directions and the FoF outskirts' anisotropy stay the simulation's.

    Returns new positions [h^-1 Mpc comoving] (field particles unchanged).
    """
    ng = len(halos)
    lm = halos["log_m200c"].to_numpy(float)
    ok = np.isfinite(lm)
    r200 = np.full(ng, np.nan)
    conc = np.full(ng, np.nan)
    r200[ok] = cosmology.r200c(lm[ok], redshift) * (1 + redshift)  # comoving
    conc[ok] = cosmology.concentration_200c(lm[ok], redshift)
    order = np.argsort(group, kind="stable")
    gs = group[order]
    starts = np.searchsorted(gs, np.arange(ng))
    ends = np.searchsorted(gs, np.arange(ng), side="right")
    cen = halos[["x", "y", "z"]].to_numpy(float)
    out = pos.astype(np.float64, copy=True)
    xs = np.geomspace(1e-4, 100.0, 2000)
    m_nfw = np.log1p(xs) - xs / (1 + xs)
    for g in range(ng):
        if not ok[g]:
            continue
        idx = order[starts[g]:ends[g]]
        d = _rel(pos[idx], cen[g], box_size)
        r = np.maximum(np.linalg.norm(d, axis=1), 1e-6)
        rank = np.empty(idx.size)
        srt = np.argsort(r, kind="stable")
        rank[srt] = (np.arange(idx.size) + 0.5) / idx.size
        f200 = min(1.0, 10 ** lm[g] / (idx.size * particle_mass))
        c = conc[g]
        r_new = np.empty(idx.size)
        inner = rank <= f200
        target = rank[inner] / f200 * (np.log1p(c) - c / (1 + c))
        r_new[inner] = np.interp(target, m_nfw, xs) * r200[g] / c
        if (~inner).any():
            r_f = r[srt][max(int(np.ceil(f200 * idx.size - 0.5)) - 1, 0)]
            r_new[~inner] = r[~inner] * r200[g] / max(r_f, 1e-6)
        out[idx] = cen[g] + d * (r_new / r)[:, None]
    return np.mod(out, box_size).astype(pos.dtype)
