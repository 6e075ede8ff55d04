"""Observation: sight-line frames, projection, Hubble flow, flux limit and the window.

Shared by the mock (:mod:`.mock`) and real simulation boxes (:mod:`.box`), so both go through
exactly the same cuts. Plane-parallel projection about the cluster centre (the window spans at
most ~2 deg at the nearest observer distance). Units: h^-1 Mpc proper, km/s, mag.
"""

from __future__ import annotations

import numpy as np

from .. import cosmology
from ..config import WindowConfig

#: extra line-of-sight velocity [km/s] beyond the window that peculiar velocities can bring in
VELOCITY_MARGIN = 1200.0

#: spectroscopic-survey effects per ``SimulationConfig.survey`` (flux limits and distance ranges
#: are the config defaults in ``config.SURVEY_DEFAULTS``); references in docs/simulator.md.
#: fibre_arcsec: fibre-collision radius; pair_loss: probability that one galaxy of a collided
#: pair has no redshift; completeness: share of the remaining targets with a redshift;
#: centre: the galaxy the diagram is centred on ("bcg": brightest galaxy inside R200c;
#: "central": the halo's central galaxy, as in the paper's mock).
SURVEYS: dict[str, dict] = {
    "sdss": {"fibre_arcsec": 55.0, "pair_loss": 0.65, "completeness": 0.98, "centre": "bcg"},
    "desi-bgs": {"fibre_arcsec": 0.0, "pair_loss": 0.0, "completeness": 0.80, "centre": "bcg"},
    "paper": {"fibre_arcsec": 0.0, "pair_loss": 0.0, "completeness": 1.0, "centre": "central"},
}
ARCSEC = np.pi / 180.0 / 3600.0


def to_sightline_frame(vec: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Rotate (N, 3) vectors into frames (N, 3, 3) with rows (e_x, e_y, e_los)."""
    return np.einsum("nij,nj->ni", basis, vec)


def observer_distance(n: int, d_min: float, d_max: float, rng: np.random.Generator) -> np.ndarray:
    """Comoving observer distances [h^-1 Mpc] uniform in a 3D ball (shell d_min..d_max)."""
    u = rng.random(n)
    return (d_min**3 + u * (d_max**3 - d_min**3)) ** (1.0 / 3.0)


def distance_modulus(chi) -> np.ndarray:
    """m - (M - 5 log10 h) at comoving distance chi [h^-1 Mpc] (luminosity distance, no K-correction)."""
    chi = np.maximum(np.asarray(chi, dtype=float), 1e-3)
    z = cosmology.redshift_from_comoving(chi)
    dl = chi * (1 + z)  # flat cosmology: D_L = (1+z) chi
    return 25.0 + 5.0 * np.log10(dl)


def abs_mag_limit(mag_limit: float, chi) -> np.ndarray:
    """Faintest absolute magnitude M_r - 5 log10 h visible at comoving distance chi."""
    return mag_limit - distance_modulus(chi)


def los_depth(z, window: WindowConfig) -> np.ndarray:
    """Half-length [h^-1 Mpc, proper] of the cylinder whose galaxies can enter the window."""
    return (window.v_max + VELOCITY_MARGIN) / cosmology.hubble(z)


def observe(
    pos: np.ndarray,
    vel: np.ndarray,
    abs_mag: np.ndarray,
    diagram: np.ndarray,
    redshift: np.ndarray,
    chi: np.ndarray,
    window: WindowConfig,
    mag_limit: float,
) -> dict[str, np.ndarray]:
    """Project galaxies and apply the flux limit and the window.

    Parameters
    ----------
    pos, vel : (N, 3) position [h^-1 Mpc, proper] and peculiar velocity [km/s] relative to the
        cluster centre and its central galaxy, already in the sight-line frame (z = away from
        the observer).
    abs_mag : (N,) absolute magnitudes M_r - 5 log10 h.
    diagram : (N,) row of the diagram each galaxy is seen in (indexes ``redshift``, ``chi``).
    redshift, chi : per diagram cluster redshift and comoving observer distance [h^-1 Mpc].

    Returns
    -------
    dict with ``x_proj, y_proj, v_los`` (v_los = v_pec,los + H(z) dr_los), ``mag_r`` (apparent)
    and ``keep`` (inside the window and brighter than ``mag_limit``).
    """
    z = redshift[diagram]
    x, y = pos[:, 0], pos[:, 1]
    v = vel[:, 2] + cosmology.hubble(z) * pos[:, 2]
    chi_gal = chi[diagram] + pos[:, 2] * (1 + z)
    mag = abs_mag + distance_modulus(chi_gal)
    keep = (
        (np.abs(x) <= window.r_max)
        & (np.abs(y) <= window.r_max)
        & (np.abs(v) <= window.v_max)
        & (mag <= mag_limit)
        & (chi_gal > 0)
    )
    return {"x_proj": x, "y_proj": y, "v_los": v, "mag_r": mag, "keep": keep}


def collision_victims(pairs: np.ndarray, protect: np.ndarray, pair_loss: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Indices that lose their redshift to fibre collisions: each close pair (rows of ``pairs``)
    loses one galaxy, chosen at random but never a protected one, with probability ``pair_loss``."""
    lose = rng.random(len(pairs)) < pair_loss
    pick = np.where(rng.random(len(pairs)) < 0.5, pairs[:, 0], pairs[:, 1])
    alt = np.where(pick == pairs[:, 0], pairs[:, 1], pairs[:, 0])
    return np.where(protect[pick], alt, pick)[lose]


def spectroscopic_selection(
    x: np.ndarray,
    y: np.ndarray,
    diagram: np.ndarray,
    redshift: np.ndarray,
    chi: np.ndarray,
    survey: str,
    protect: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Which targets get a redshift: fibre collisions and random incompleteness.

    ``x, y`` [h^-1 Mpc proper] of the targets (already flux limited), ``diagram`` their row in
    ``redshift``/``chi``; ``protect`` marks galaxies that always keep their redshift (the
    diagram centre). Pairs closer than the fibre radius (angular, at the cluster distance) lose
    one redshift with probability ``pair_loss`` (the galaxy is chosen at random); every other
    target keeps its redshift with probability ``completeness``.
    """
    from scipy.spatial import cKDTree

    par = SURVEYS[survey]
    n = x.size
    ok = np.ones(n, bool)
    if n and par["fibre_arcsec"] > 0 and par["pair_loss"] > 0:
        sep = par["fibre_arcsec"] * ARCSEC * chi[diagram] / (1 + redshift[diagram])  # proper
        pts = np.stack([x / sep, y / sep, diagram * 1e7], axis=1)
        pairs = cKDTree(pts).query_pairs(1.0, output_type="ndarray")
        # the scaled distance uses each galaxy's own (equal within a diagram) radius
        ok[collision_victims(pairs, protect, par["pair_loss"], rng)] = False
    if par["completeness"] < 1:
        ok &= rng.random(n) < par["completeness"]
    return ok | protect
