"""A mock sky: halos from the mass function in a cone, populated with galaxies, flux limited.

For testing the real-data path end to end and for users to check the method: the two tables an
astronomer would bring (a galaxy survey with RA, Dec, redshift, r magnitude; a cluster list with
id, RA, Dec, redshift) plus the truth (halo masses).

Model:
- a cone (spherical cap) of ``area_deg2`` centred at (``ra0``, ``dec0``); halos uniform in
  comoving volume out to ``distance_max`` + a margin (so that windows near the far edge are
  complete), log masses drawn from the Tinker et al. (2008) mass function at z = 0 in the
  simulation cosmology (Planck 2013), no halo-halo clustering;
- halo peculiar velocities Gaussian, ``sigma_v_halo`` per component;
- galaxies from the simulator's :func:`clustermass.simulate.populate_halos` (central + CLF
  satellites on NFW orbits inside R200c), offsets proper -> comoving by (1 + z);
- observed redshift ``(1 + z_cos)(1 + v_pec,los / c) - 1``; apparent magnitude
  ``m = M_r - 5 log10 h + 5 log10(D_L / h^-1 Mpc) + 25``; flux limit ``m <= mag_limit``;
- clusters: halos with log M200c >= ``log_m_min`` inside ``distance_max``, centred on their
  central galaxy (its RA, Dec and observed redshift), whether or not it is bright enough.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import cosmology
from .._io import write_json_atomic
from ..errors import ClustermassError
from .galaxies import populate_halos
from .observe import abs_mag_limit, distance_modulus

FULL_SKY_DEG2 = 4.0 * np.pi * (180.0 / np.pi) ** 2


def cap_directions(n: int, area_deg2: float, ra0: float, dec0: float, rng) -> np.ndarray:
    """(n, 3) unit vectors uniform in a spherical cap of ``area_deg2`` around (ra0, dec0) [deg]."""
    if not 0 < area_deg2 <= FULL_SKY_DEG2:
        raise ClustermassError(f"area must be in (0, {FULL_SKY_DEG2:.0f}] deg^2, got {area_deg2}")
    cos_max = 1.0 - 2.0 * area_deg2 / FULL_SKY_DEG2  # Omega = 2 pi (1 - cos theta_c)
    cos_t = rng.uniform(cos_max, 1.0, n)
    sin_t = np.sqrt(np.maximum(0.0, 1.0 - cos_t**2))
    phi = rng.uniform(0.0, 2 * np.pi, n)
    a = np.radians(ra0)
    centre = _centre(ra0, dec0)
    east = np.array([-np.sin(a), np.cos(a), 0.0])
    north = np.cross(centre, east)
    return (sin_t * np.cos(phi))[:, None] * east + (sin_t * np.sin(phi))[:, None] * north + cos_t[:, None] * centre


def _centre(ra0: float, dec0: float) -> np.ndarray:
    a, d = np.radians(ra0), np.radians(dec0)
    return np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def _radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.linalg.norm(xyz, axis=1)
    dec = np.degrees(np.arcsin(np.clip(xyz[:, 2] / r, -1, 1)))
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    return ra, dec


def sample_log_masses(n_expected_volume: float, lo: float, hi: float, rng, z: float = 0.0,
                      cosmo: str = cosmology.SIMULATION_COSMOLOGY) -> np.ndarray:
    """Poisson sample of log10 M200c from the mass function in a volume [h^-3 Mpc^3]."""
    fine = np.linspace(lo, hi, 2001)
    dn = cosmology.mass_function(fine, z, cosmo=cosmo)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dn[1:] + dn[:-1]) * np.diff(fine))])
    n = rng.poisson(cdf[-1] * n_expected_volume)
    return np.interp(rng.uniform(0.0, cdf[-1], n), cdf, fine)


def simulate_sky(area_deg2: float = 300.0, distance_max: float = 250.0, mag_limit: float = 18.0,
                 log_m_min: float = 13.7, seed: int = 0, *, ra0: float = 180.0, dec0: float = 30.0,
                 log_m_halo_min: float = 11.3, log_m_halo_max: float = 15.6,
                 margin: float | None = None, sigma_v_halo: float = 300.0,
                 mag_abs_faintest: float = -16.0, clustered: bool = True, chunk: int = 20000,
                 survey: str = "sdss", progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate a flux-limited galaxy survey and its cluster list in a cone.

    Parameters
    ----------
    area_deg2 : float
        Survey area [deg^2] (a spherical cap).
    distance_max : float
        Largest comoving distance of the clusters [h^-1 Mpc]; halos are placed out to
        ``distance_max + margin`` (default margin: 2 x 2200 km/s / 100 = 44 h^-1 Mpc).
    mag_limit : float
        Apparent r-band flux limit [mag].
    log_m_min : float
        Smallest cluster mass in the cluster list [log10 h^-1 Msun].
    seed : int
        Seed of ``numpy.random.default_rng``.
    log_m_halo_min, log_m_halo_max : float
        Mass range of all halos placed (galaxy hosts, incl. groups and interlopers).
    sigma_v_halo : float
        1D peculiar velocity dispersion of halos [km/s].
    mag_abs_faintest : float
        Faintest absolute magnitude (M_r - 5 log10 h) generated, however near the halo.
    clustered : bool
        Add the excess of halos correlated with each cluster (the simulator's neighbour model,
        thinned to ``b_cl b xi / (1 + b_cl b xi)`` since the uniform halos supply the mean):
        the clustered interlopers of the training mocks. They are not in the cluster list.
    survey : {'sdss', 'desi-bgs', 'paper'}
        Spectroscopic selection of the flux-limited targets, as in the training mocks
        (:data:`clustermass.simulate.observe.SURVEYS`): fibre collisions (pairs closer than the
        fibre radius on the sky lose one redshift with the survey's pair-loss probability) and
        random incompleteness; the clusters' central galaxies always keep theirs.

    Returns
    -------
    galaxies : DataFrame
        ``ra, dec`` [deg], ``z`` (observed), ``mag_r`` [mag], ``abs_mag_r``, ``halo_index``,
        ``is_central``.
    clusters : DataFrame
        ``id, ra, dec, z, log_m200c_true, comoving_distance, halo_index, n_members_observed``.
    halos : DataFrame
        ``halo_index, log_m200c, ra, dec, comoving_distance, z_cos, v_pec_los``; ``attrs`` hold
        the run parameters.
    """
    if not 0 < area_deg2 <= FULL_SKY_DEG2:
        raise ClustermassError(f"area must be in (0, {FULL_SKY_DEG2:.0f}] deg^2, got {area_deg2}")
    if distance_max <= 0 or log_m_halo_max <= log_m_halo_min:
        raise ClustermassError("distance_max must be positive and log_m_halo_max > log_m_halo_min")
    rng = np.random.default_rng(seed)
    margin = 2.0 * 2200.0 / 100.0 if margin is None else float(margin)
    chi_h = distance_max + margin
    vol = area_deg2 / FULL_SKY_DEG2 * 4.0 / 3.0 * np.pi * chi_h**3
    log_m = sample_log_masses(vol, log_m_halo_min, log_m_halo_max, rng)
    nh = len(log_m)
    chi = chi_h * rng.random(nh) ** (1.0 / 3.0)
    rhat = cap_directions(nh, area_deg2, ra0, dec0, rng)
    pos = chi[:, None] * rhat
    z_h = cosmology.redshift_from_comoving(chi)
    v_h = rng.normal(0.0, sigma_v_halo, (nh, 3))
    n_background = nh
    parent = np.full(nh, -1, dtype=np.int64)
    if clustered:
        cl0 = np.flatnonzero((log_m >= log_m_min) & (chi <= distance_max))
        nb_lm, nb_pos, nb_vel = _clustered_neighbours(log_m[cl0], pos[cl0], v_h[cl0], z_h[cl0],
                                                      max(log_m_halo_min, 10.5), rng)
        parent = np.concatenate([parent, cl0[nb_lm[1]]])
        log_m = np.concatenate([log_m, nb_lm[0]])
        pos = np.concatenate([pos, nb_pos])
        v_h = np.concatenate([v_h, nb_vel])
        chi = np.linalg.norm(pos, axis=1)
        rhat = pos / chi[:, None]
        z_h = cosmology.redshift_from_comoving(chi)
        nh = len(log_m)
    # faintest absolute magnitude visible at each halo (+0.1 mag for the depth of the halo)
    m_abs_lim = np.minimum(abs_mag_limit(mag_limit, chi) + 0.1, mag_abs_faintest)
    parts = []
    for s in tqdm(range(0, nh, chunk), disable=not progress, desc="populating halos"):
        sl = slice(s, min(s + chunk, nh))
        g = populate_halos(log_m[sl], z_h[sl], rng, mag_limit_abs=m_abs_lim[sl])
        g["halo_index"] = g["halo_index"].to_numpy() + s
        parts.append(g)
    g = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["halo_index", "dx", "dy", "dz", "dvx", "dvy", "dvz", "abs_mag_r", "is_central"])
    h = g["halo_index"].to_numpy(np.int64)
    d = g[["dx", "dy", "dz"]].to_numpy(float) * (1.0 + z_h[h])[:, None]  # proper -> comoving
    gpos = pos[h] + d
    gchi = np.linalg.norm(gpos, axis=1)
    ghat = gpos / gchi[:, None]
    vel = v_h[h] + g[["dvx", "dvy", "dvz"]].to_numpy(float)
    v_los = np.sum(vel * ghat, axis=1)
    z_cos = cosmology.redshift_from_comoving(gchi)
    z_obs = (1.0 + z_cos) * (1.0 + v_los / cosmology.C_KMS) - 1.0
    mag = g["abs_mag_r"].to_numpy(float) + distance_modulus(gchi)
    ra, dec = _radec(gpos)
    central = g["is_central"].to_numpy(bool)
    # the survey footprint cuts galaxies too (halos near the edge lose part of their members)
    inside = ghat @ _centre(ra0, dec0) >= 1.0 - 2.0 * area_deg2 / FULL_SKY_DEG2
    # clusters: massive halos inside distance_max, centred on their central galaxy (the
    # Poisson sample drawn from the mass function; clustered neighbours are extra interlopers)
    is_cl = (log_m >= log_m_min) & (chi <= distance_max) & (np.arange(nh) < n_background)
    cen_row = np.full(nh, -1, dtype=np.int64)
    cen_row[h[central]] = np.flatnonzero(central)
    cl_h = np.flatnonzero(is_cl & (cen_row >= 0))
    cr = cen_row[cl_h]
    visible = (mag <= mag_limit) & inside
    protect = np.zeros(len(h), dtype=bool)
    protect[cen_row[cl_h]] = True
    visible &= _spectroscopic_selection(ra, dec, visible, protect, survey, rng)
    n_obs = np.bincount(h[visible], minlength=nh)
    clusters = pd.DataFrame({
        "id": np.arange(1, len(cl_h) + 1, dtype=np.int64),
        "ra": ra[cr], "dec": dec[cr], "z": z_obs[cr],
        "log_m200c_true": log_m[cl_h], "comoving_distance": chi[cl_h],
        "halo_index": cl_h.astype(np.int64), "n_members_observed": n_obs[cl_h].astype(np.int64),
    })
    galaxies = pd.DataFrame({
        "ra": ra[visible], "dec": dec[visible], "z": z_obs[visible], "mag_r": mag[visible],
        "abs_mag_r": g["abs_mag_r"].to_numpy(float)[visible], "halo_index": h[visible],
        "is_central": central[visible],
    })
    hra, hdec = _radec(pos)
    halos = pd.DataFrame({
        "halo_index": np.arange(nh, dtype=np.int64), "log_m200c": log_m, "ra": hra, "dec": hdec,
        "comoving_distance": chi, "z_cos": z_h, "v_pec_los": np.sum(v_h * rhat, axis=1),
        "neighbour_of": parent,
    })
    attrs = {
        "area_deg2": area_deg2, "distance_max": distance_max, "mag_limit": mag_limit,
        "log_m_min": log_m_min, "seed": seed, "ra0": ra0, "dec0": dec0,
        "log_m_halo_min": log_m_halo_min, "log_m_halo_max": log_m_halo_max, "margin": margin,
        "sigma_v_halo": sigma_v_halo, "mass_function": "tinker08", "mass_function_z": 0.0,
        "cosmology": cosmology.SIMULATION_COSMOLOGY, "n_halos": int(nh),
        "n_background_halos": int(n_background), "clustered": bool(clustered),
        "n_galaxies": int(len(galaxies)), "n_clusters": int(len(clusters)), "survey": survey,
    }
    for df in (galaxies, clusters, halos):
        df.attrs.update(attrs)
    return galaxies, clusters, halos


def _spectroscopic_selection(ra, dec, target, protect, survey: str, rng) -> np.ndarray:
    """Which galaxies get a redshift (mask over all rows; only ``target`` rows can): fibre
    collisions on the sky and random incompleteness of the survey setting (the training mocks'
    rule, :func:`clustermass.simulate.observe.spectroscopic_selection`, in angles)."""
    from scipy.spatial import cKDTree

    from .observe import ARCSEC, SURVEYS, collision_victims

    if survey not in SURVEYS:
        raise ClustermassError(f"unknown survey {survey!r}; one of {', '.join(SURVEYS)}")
    par = SURVEYS[survey]
    ok = np.ones(len(ra), dtype=bool)
    idx = np.flatnonzero(target)
    if len(idx) > 1 and par["fibre_arcsec"] > 0 and par["pair_loss"] > 0:
        r, d = np.radians(ra[idx]), np.radians(dec[idx])
        xyz = np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])
        pairs = cKDTree(xyz).query_pairs(2.0 * np.sin(par["fibre_arcsec"] * ARCSEC / 2.0), output_type="ndarray")
        if len(pairs):
            ok[idx[collision_victims(pairs, protect[idx], par["pair_loss"], rng)]] = False
    if par["completeness"] < 1:
        ok[idx] &= rng.random(len(idx)) < par["completeness"]
    return ok | protect


def _clustered_neighbours(log_m_cl, pos_cl, vel_cl, z_cl, log_m_floor: float, rng,
                          half_width: float = 3.0):
    """Excess halos around each cluster: the simulator's (1 + b b xi) neighbours, thinned to the
    correlated part, placed in 3D around the cluster (sky axes east/north, third along the line
    of sight). Returns ((log_m, cluster index), comoving positions, peculiar velocities)."""
    from . import halos as hal
    from .galaxies import concentration

    n = len(log_m_cl)
    if n == 0:
        return (np.zeros(0), np.zeros(0, np.int64)), np.zeros((0, 3)), np.zeros((0, 3))
    r200 = cosmology.r200c(log_m_cl, z_cl)
    v200 = cosmology.v200c(log_m_cl, z_cl, r200=r200)
    conc = concentration(log_m_cl)
    depth = (2200.0 + 1500.0) / cosmology.hubble(z_cl)
    floor = np.full(n, log_m_floor)
    nb = hal.sample_neighbours(log_m_cl, r200, v200, conc, z_cl, floor, half_width, depth, rng)
    d = nb["diagram"].to_numpy(np.int64)
    xyz = nb[["x", "y", "z"]].to_numpy(float)
    r = np.linalg.norm(xyz, axis=1)
    ex = np.maximum(hal.halo_bias(log_m_cl)[d] * hal.halo_bias(nb["log_m200c"].to_numpy(float))
                    * hal.xi_mm(r * (1 + z_cl[d])), 0.0)
    keep = rng.random(len(d)) < ex / (1.0 + ex)
    d, xyz = d[keep], xyz[keep]
    vel = nb[["vx", "vy", "vz"]].to_numpy(float)[keep]
    los = pos_cl / np.linalg.norm(pos_cl, axis=1, keepdims=True)
    east = np.stack([-los[:, 1], los[:, 0], np.zeros(n)], axis=1)
    east /= np.maximum(np.linalg.norm(east, axis=1, keepdims=True), 1e-12)
    north = np.cross(los, east)
    basis = np.stack([east, north, los], axis=1)[d]  # rows: e_x, e_y, e_los
    off = np.einsum("ni,nij->nj", xyz, basis) * (1 + z_cl[d])[:, None]  # proper -> comoving
    v = vel_cl[d] + np.einsum("ni,nij->nj", vel, basis)
    return (nb["log_m200c"].to_numpy(float)[keep], d), pos_cl[d] + off, v


def write_mock_sky(out, area_deg2: float = 300.0, sim=None, seed: int = 0, progress: bool = True,
                   **kwargs) -> list[Path]:
    """Simulate a mock sky and write ``sky_galaxies.parquet``, ``sky_clusters.parquet``
    (with the true masses), ``sky_halos.parquet`` and ``mock_sky.json`` into ``out``.

    ``sim`` (a :class:`~clustermass.config.SimulationConfig`) supplies ``distance_max``,
    ``mag_limit`` and ``log_m_min``; ``kwargs`` go to :func:`simulate_sky`. Returns the paths.
    """
    from ..catalog import write_parquet

    opts = {}
    if sim is not None:
        opts = {"distance_max": sim.distance_max, "mag_limit": sim.mag_limit, "log_m_min": sim.log_m_min,
                "survey": sim.survey}
    opts.update(kwargs)
    gal, cl, halos = simulate_sky(area_deg2=area_deg2, seed=seed, progress=progress, **opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(cl.attrs)
    paths = [
        write_parquet(gal, out / "sky_galaxies.parquet", meta),
        write_parquet(halos, out / "sky_halos.parquet", meta),
        write_parquet(cl, out / "sky_clusters.parquet", meta),
        write_json_atomic(out / "mock_sky.json", meta),
    ]
    return paths
