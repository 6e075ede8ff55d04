"""Classical dynamical mass estimators, the baselines the networks are compared with.

Each estimator takes one diagram's galaxies (``x_proj, y_proj`` [h^-1 Mpc], ``v_los`` [km/s]
relative to the cluster centre) and returns a :class:`BaselineEstimate` whose ``log_m`` is
log10(M / h^-1 Msun), or NaN with a ``reason`` when it cannot be computed.

Interloper removal (:mod:`clustermass.membership`): the *shifting gapper* (Fadda et al. 1996, ApJ 473, 670; as used e.g. by
Wing & Blanton 2011, AJ 141, 88): galaxies are sorted by projected radius and grouped into
radial bins at least ``bin_width = 0.4 h^-1 Mpc`` wide holding at least ``min_per_bin = 15``
galaxies (a short last bin joins the previous one); in each bin the velocities are sorted and
split wherever two neighbours differ by more than ``gap = 1000 km/s``; only the group
holding the velocity closest to the cluster's (0, the central galaxy) is kept. This repeats
until no galaxy is removed.

Estimators
----------
* ``sigma_evrard``: biweight scale of the cleaned velocities (Beers, Flynn & Gebhardt 1990;
  ``astropy.stats.biweight_scale`` with c = 9 about the biweight location) turned into M200c
  with the dark-matter M-sigma relation of Evrard et al. 2008 (ApJ 672, 122),
  ``sigma = 1082.9 km/s (h(z) M200c / 1e15 Msun)^0.3361`` inverted; no velocity bias.
  With M in h^-1 Msun, ``h(z) M[Msun] = E(z) M[h^-1 Msun]``.
* ``virial``: the projected virial mass (Heisler, Tremaine & Bahcall 1985, ApJ 298, 8;
  Girardi et al. 1998, ApJ 505, 74), ``M_V = 3 pi sigma^2 R_PV / (2 G)`` with the projected
  virial radius ``R_PV = N (N-1) / sum_{i<j} 1/R_ij`` of the cleaned galaxies; no surface
  pressure term, so it measures the mass inside the window, not M200c.

* ``caustic``: the caustic mass (Diaferio & Geller 1997; Diaferio 1999; Serra et al. 2011) of
  :mod:`clustermass.caustic`: the escape-velocity envelope of the redshift diagram (an adaptive
  kernel density of all galaxies inside the window's largest annulus, thresholded where
  ``<v_esc^2> = 4 <v^2>`` of the gapper's members) turned into ``M(<r) = F_beta/G int A^2 dr``
  with ``F_beta = 0.7``, read at R200c (mean density 200 rho_c(z)).

None of the raw values is expected to equal log M200c: like a network output, it plays the role of
the summary ``d_pred`` and is calibrated with the joint-KDE posterior on the test split
(:func:`clustermass.evaluation.evaluate`).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import cosmology
from .membership import shifting_gapper

__all__ = ["BASELINES", "BaselineEstimate", "biweight_sigma", "evrard_log_m", "evrard_sigma",
           "projected_virial_radius", "run_baselines", "shifting_gapper", "velocity_dispersion_mass",
           "virial_log_m", "virial_mass"]

#: Evrard et al. 2008 M-sigma relation: sigma_15 [km/s] and slope alpha
EVRARD_SIGMA_15 = 1082.9
EVRARD_ALPHA = 0.3361

#: baseline name -> column of :func:`run_baselines` holding its raw log M
BASELINES = {"sigma_evrard": "log_m_sigma", "virial": "log_m_virial", "caustic": "log_m_caustic"}


class BaselineEstimate(NamedTuple):
    """Result of one classical estimator on one diagram."""

    log_m: float  #: log10(M / h^-1 Msun), NaN on failure
    sigma_v: float  #: biweight velocity dispersion of the cleaned galaxies [km/s]
    n_used: int  #: galaxies left after interloper removal
    reason: str  #: empty on success, why log_m is NaN otherwise


# ---------------------------------------------------------------------- M-sigma and virial
def biweight_sigma(v) -> float:
    """Biweight scale [km/s] of velocities about their biweight location (c = 9)."""
    from astropy.stats import biweight_location, biweight_scale

    v = np.asarray(v, dtype=float)
    return float(biweight_scale(v, c=9.0, M=biweight_location(v, c=6.0)))


def evrard_log_m(sigma, z, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Invert Evrard et al. 2008: log10 M200c [h^-1 Msun] from a dispersion ``sigma`` [km/s]."""
    sigma = np.asarray(sigma, dtype=float)
    ez = cosmology.hubble(z, cosmo) / 100.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return 15.0 + np.log10(sigma / EVRARD_SIGMA_15) / EVRARD_ALPHA - np.log10(ez)


def evrard_sigma(log_m, z, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Evrard et al. 2008 dark-matter dispersion [km/s] of halos of log10 M200c [h^-1 Msun]."""
    ez = cosmology.hubble(z, cosmo) / 100.0
    return EVRARD_SIGMA_15 * (ez * 10.0 ** (np.asarray(log_m, dtype=float) - 15.0)) ** EVRARD_ALPHA


def projected_virial_radius(x, y) -> float:
    """R_PV = N (N-1) / sum_{i<j} 1/R_ij [h^-1 Mpc] (coincident pairs are skipped)."""
    from scipy.spatial.distance import pdist

    pts = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    n = len(pts)
    if n < 2:
        return float("nan")
    inv = pdist(pts)
    with np.errstate(divide="ignore"):
        np.reciprocal(inv, out=inv)
    total = float(inv.sum())
    if not np.isfinite(total):  # coincident galaxies
        total = float(inv[np.isfinite(inv)].sum())
    if total <= 0:
        return float("nan")
    return n * (n - 1) / total


def virial_log_m(sigma, r_pv):
    """log10 of M_V = 3 pi sigma^2 R_PV / (2 G) [h^-1 Msun]; sigma [km/s], R_PV [h^-1 Mpc]."""
    m = 3.0 * np.pi * np.asarray(sigma, float) ** 2 * np.asarray(r_pv, float) / (2.0 * cosmology.G_KMS2_MPC_MSUN)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(m)


def _clean(points, gapper: bool, min_galaxies: int, gapper_kw: dict | None):
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError("points must be an (N, 3) array of x_proj, y_proj, v_los")
    if len(pts) < min_galaxies:
        return None, f"too few galaxies ({len(pts)} < {min_galaxies})"
    if gapper:
        keep = shifting_gapper(np.hypot(pts[:, 0], pts[:, 1]), pts[:, 2], **(gapper_kw or {}))
        pts = pts[keep]
        if len(pts) < min_galaxies:
            return None, f"too few galaxies after the gapper ({len(pts)} < {min_galaxies})"
    return pts, ""


def velocity_dispersion_mass(
    points, redshift: float, gapper: bool = True, min_galaxies: int = 5,
    gapper_kw: dict | None = None, cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> BaselineEstimate:
    """Biweight velocity dispersion + Evrard et al. 2008 M-sigma mass of one diagram.

    Parameters
    ----------
    points : (N, 3) array
        ``x_proj, y_proj`` [h^-1 Mpc], ``v_los`` [km/s].
    redshift : float
        Cluster redshift (for h(z)).
    gapper : bool
        Remove interlopers with :func:`shifting_gapper` first.
    min_galaxies : int
        Fewest galaxies (before and after the gapper) for an estimate.
    gapper_kw : dict, optional
        Keyword arguments of :func:`shifting_gapper`.

    Returns
    -------
    BaselineEstimate
    """
    pts, reason = _clean(points, gapper, min_galaxies, gapper_kw)
    if pts is None:
        return BaselineEstimate(float("nan"), float("nan"), 0, reason)
    s = biweight_sigma(pts[:, 2])
    if not np.isfinite(s) or s <= 0:
        return BaselineEstimate(float("nan"), s, len(pts), "zero velocity dispersion")
    return BaselineEstimate(float(evrard_log_m(s, redshift, cosmo)), s, len(pts), "")


def virial_mass(
    points, gapper: bool = True, min_galaxies: int = 5, gapper_kw: dict | None = None
) -> BaselineEstimate:
    """Projected virial mass (Heisler et al. 1985) of one diagram; same inputs as
    :func:`velocity_dispersion_mass` (no redshift needed)."""
    pts, reason = _clean(points, gapper, min_galaxies, gapper_kw)
    if pts is None:
        return BaselineEstimate(float("nan"), float("nan"), 0, reason)
    s = biweight_sigma(pts[:, 2])
    r_pv = projected_virial_radius(pts[:, 0], pts[:, 1])
    if not (np.isfinite(s) and s > 0 and np.isfinite(r_pv)):
        return BaselineEstimate(float("nan"), s, len(pts), "degenerate positions or velocities")
    return BaselineEstimate(float(virial_log_m(s, r_pv)), s, len(pts), "")


def run_baselines(catalogue, rows=None, progress: bool = True, min_galaxies: int = 5,
                  gapper_kw: dict | None = None, methods=None, window=None) -> pd.DataFrame:
    """The classical estimators on the given cluster rows of a catalogue.

    Parameters
    ----------
    catalogue : Catalogue
    rows : array_like, optional
        Cluster rows (default all).
    progress : bool
        Show a progress bar.
    min_galaxies : int
        Fewest galaxies (before and after the gapper) for ``sigma_evrard`` and ``virial``
        (the caustic's own minimum is :func:`clustermass.caustic.caustic_mass`'s ``min_galaxies``).
    gapper_kw : dict, optional
        Keyword arguments of :func:`shifting_gapper` (its members are shared by all three).
    methods : iterable of str, optional
        Names of :data:`BASELINES` to compute (default all); the others' columns are NaN.
    window : WindowConfig, optional
        Window of the diagrams (``r_max`` [h^-1 Mpc], ``v_max`` [km/s]: the caustic's redshift
        diagram); default 1.6 h^-1 Mpc and 2200 km/s.

    Returns
    -------
    DataFrame
        ``diagram_id, sigma_v`` [km/s], ``log_m_sigma``, ``log_m_virial``, ``log_m_caustic``
        (raw log10 M [h^-1 Msun], NaN on failure), ``r200_caustic`` [h^-1 Mpc],
        ``caustic_extrapolated`` (R200c beyond r_max), ``n_clean``, ``reason`` (sigma/virial) and
        ``reason_caustic`` (empty on success), and ``time_ms_<name>`` (wall time of each
        estimator on each diagram [ms], the shared gapper included).
        ``attrs["failures"]``: ``{name: {reason: count}}`` of the diagrams without an estimate.
    """
    from tqdm.auto import tqdm

    from .caustic import caustic_mass

    methods = list(BASELINES) if methods is None else list(methods)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown classical estimator(s) {unknown}; one of {list(BASELINES)}")
    r_max = float(getattr(window, "r_max", 1.6))
    v_max = float(getattr(window, "v_max", 2200.0))
    rows = np.arange(len(catalogue)) if rows is None else np.asarray(rows)
    z = catalogue.clusters["redshift"].to_numpy(float)
    ids = catalogue.clusters["diagram_id"].to_numpy()
    nan_cols = ("sigma_v", "log_m_sigma", "log_m_virial", "log_m_caustic", "r200_caustic")
    out = {k: np.full(len(rows), np.nan) for k in nan_cols}
    times = {m: np.zeros(len(rows)) for m in BASELINES}
    extrap = np.zeros(len(rows), dtype=bool)
    n_clean = np.zeros(len(rows), dtype=np.int64)
    reasons = [""] * len(rows)
    reasons_c = [""] * len(rows)
    want_sv = "sigma_evrard" in methods or "virial" in methods
    for k, row in enumerate(tqdm(rows, desc="baselines", disable=not progress)):
        t0 = time.perf_counter()
        pts = np.asarray(catalogue.points(int(row)), dtype=float)
        keep = (shifting_gapper(np.hypot(pts[:, 0], pts[:, 1]), pts[:, 2], **(gapper_kw or {}))
                if len(pts) >= 2 else np.ones(len(pts), dtype=bool))
        t_gap = time.perf_counter() - t0
        if "caustic" in methods:
            t1 = time.perf_counter()
            try:
                est = caustic_mass(pts, z[row], r_max=r_max, v_max=v_max, members=keep)
                out["log_m_caustic"][k], out["r200_caustic"][k] = est.log_m, est.r200
                extrap[k], reasons_c[k] = est.extrapolated, est.reason
            except (ValueError, FloatingPointError, ZeroDivisionError) as exc:  # counted, not fatal
                reasons_c[k] = f"numerical failure: {type(exc).__name__}"
            times["caustic"][k] = t_gap + time.perf_counter() - t1
        if not want_sv:
            continue
        t1 = time.perf_counter()
        if len(pts) < min_galaxies:
            reasons[k] = f"too few galaxies ({len(pts)} < {min_galaxies})"
            continue
        cln = pts[keep]
        if len(cln) < min_galaxies:
            reasons[k] = f"too few galaxies after the gapper ({len(cln)} < {min_galaxies})"
            continue
        s = biweight_sigma(cln[:, 2])
        n_clean[k] = len(cln)
        out["sigma_v"][k] = s
        if not (np.isfinite(s) and s > 0):
            reasons[k] = "zero velocity dispersion"
            continue
        t_s = time.perf_counter() - t1
        if "sigma_evrard" in methods:
            out["log_m_sigma"][k] = evrard_log_m(s, z[row])
            times["sigma_evrard"][k] = t_gap + t_s
        if "virial" in methods:
            t2 = time.perf_counter()
            r_pv = projected_virial_radius(cln[:, 0], cln[:, 1])
            out["log_m_virial"][k] = virial_log_m(s, r_pv) if np.isfinite(r_pv) else np.nan
            times["virial"][k] = t_gap + t_s + time.perf_counter() - t2
    df = pd.DataFrame({"diagram_id": ids[rows], **out, "caustic_extrapolated": extrap, "n_clean": n_clean,
                       "reason": reasons, "reason_caustic": reasons_c,
                       **{f"time_ms_{m}": 1e3 * t for m, t in times.items()}})
    failures = {}
    for name, col in BASELINES.items():
        if name in methods:
            why = df["reason_caustic" if name == "caustic" else "reason"]
            bad = ~np.isfinite(df[col].to_numpy(float))
            failures[name] = dict(Counter(str(r) or "non-finite estimate" for r in why[bad]))
    df.attrs["failures"] = failures
    return df
