"""The cluster mass function from inferred masses (paper Fig. 10) and its theoretical prediction.

Estimate: comoving number density per dex, ``dn/dlog10 M`` [h^3 Mpc^-3 dex^-1], from a
Gaussian KDE of the inferred log masses weighted by the inverse posterior width, normalised to
the number of clusters over the survey volume (``area / 41253 deg^2`` of a sphere of radius
``distance_max``), with a bootstrap 1-sigma band (Poisson bootstrap of the clusters, so the count varies). Theory:
Tinker et al. (2008) for Planck 2018 via :func:`clustermass.cosmology.mass_function`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import cosmology
from .errors import ClustermassError

FULL_SKY_DEG2 = 4.0 * np.pi * (180.0 / np.pi) ** 2


def survey_volume(area_deg2: float, distance_max: float, distance_min: float = 0.0) -> float:
    """Comoving volume [h^-3 Mpc^3] of a cone of ``area_deg2`` between two comoving distances."""
    return area_deg2 / FULL_SKY_DEG2 * 4.0 / 3.0 * np.pi * (distance_max**3 - distance_min**3)


def _weighted_kde(x: np.ndarray, w: np.ndarray, grid: np.ndarray, bw: float) -> np.ndarray:
    """sum_i w_i N(grid | x_i, bw^2) (weights not normalised)."""
    z = (grid[:, None] - x[None, :]) / bw
    return (np.exp(-0.5 * z * z) @ w) / (bw * np.sqrt(2.0 * np.pi))


def _scott_bandwidth(x: np.ndarray, w: np.ndarray) -> float:
    """Scott's rule with the effective sample size of the weights (scipy's convention)."""
    wn = w / w.sum()
    n_eff = 1.0 / np.sum(wn**2)
    mean = np.sum(wn * x)
    var = np.sum(wn * (x - mean) ** 2) / (1.0 - np.sum(wn**2))
    return float(np.sqrt(var) * n_eff ** (-1.0 / 5.0))


def mass_function_estimate(log_m, sigma, area_deg2: float, distance_max: float, grid=None, *,
                           n_boot: int = 200, seed: int = 0, bandwidth: float | None = None,
                           weighted: bool = True, distance_min: float = 0.0,
                           bootstrap: str = "poisson") -> pd.DataFrame:
    """KDE estimate of the comoving mass function with a bootstrap band.

    Parameters
    ----------
    log_m : array_like
        Inferred log10 M200c [h^-1 Msun] (e.g. the posterior MAP), one per cluster.
    sigma : array_like
        Posterior widths [dex] (e.g. ``(hi1 - lo1) / 2``); the KDE weights are ``1 / sigma``,
        renormalised so that they sum to the number of clusters.
    area_deg2 : float
        Survey area [deg^2] (SDSS Legacy: 8250).
    distance_max : float
        Maximum comoving distance of the sample [h^-1 Mpc] (paper: 250).
    grid : array_like, optional
        log10 masses at which to evaluate (default 13.5 ... 15.5, 81 points).
    n_boot : int
        Bootstrap resamplings for the band (0: none).
    bandwidth : float, optional
        Kernel standard deviation [dex]; default Scott's rule (weighted effective size), fixed
        across bootstrap samples.
    weighted : bool
        Weight by inverse posterior width (the paper); False gives every cluster weight 1.
    bootstrap : {'poisson', 'fixed'}
        'poisson' (default): each cluster enters a resampling Poisson(1) times, so the band
        includes the shot noise of the cluster count (a number density); 'fixed': n draws with
        replacement (the classic bootstrap, count fixed), which misses that noise.

    Returns
    -------
    DataFrame
        ``log_m, dn_dlogm, dn_dlogm_lo, dn_dlogm_hi, dn_dlogm_boot_std`` [h^3 Mpc^-3 dex^-1];
        the band is the 15.87 / 84.13 percentiles of the bootstrap. ``attrs`` hold the volume,
        bandwidth and number of clusters.
    """
    log_m = np.asarray(log_m, dtype=float)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), log_m.shape)
    ok = np.isfinite(log_m) & np.isfinite(sigma) & (sigma > 0)
    log_m, sigma = log_m[ok], sigma[ok]
    n = len(log_m)
    if n < 2:
        raise ClustermassError(f"the mass function needs at least 2 clusters with finite masses, got {n}")
    if area_deg2 <= 0 or distance_max <= distance_min:
        raise ClustermassError("survey area and maximum distance must be positive")
    grid = np.linspace(13.5, 15.5, 81) if grid is None else np.asarray(grid, dtype=float)
    w = 1.0 / sigma if weighted else np.ones(n)
    bw = _scott_bandwidth(log_m, w) if bandwidth is None else float(bandwidth)
    vol = survey_volume(area_deg2, distance_max, distance_min)

    def estimate(mult: np.ndarray) -> np.ndarray:
        wm = w * mult
        tot = wm.sum()
        if tot <= 0:
            return np.zeros(len(grid))
        return _weighted_kde(log_m, wm * (mult.sum() / tot), grid, bw) / vol

    est = estimate(np.ones(n))
    out = pd.DataFrame({"log_m": grid, "dn_dlogm": est})
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        if bootstrap == "poisson":  # multiplicities ~ Poisson(1): the cluster count varies too
            mults = [rng.poisson(1.0, n).astype(float) for _ in range(n_boot)]
        elif bootstrap == "fixed":  # classic: n draws with replacement, fixed total
            mults = [np.bincount(rng.integers(0, n, n), minlength=n).astype(float) for _ in range(n_boot)]
        else:
            raise ClustermassError(f"bootstrap must be 'poisson' or 'fixed', not {bootstrap!r}")
        boots = np.stack([estimate(m) for m in mults])
        out["dn_dlogm_lo"] = np.percentile(boots, 15.865, axis=0)
        out["dn_dlogm_hi"] = np.percentile(boots, 84.135, axis=0)
        out["dn_dlogm_boot_std"] = boots.std(axis=0, ddof=1)
    out.attrs.update({"volume": vol, "bandwidth": bw, "n_clusters": n, "area_deg2": area_deg2,
                      "distance_max": distance_max})
    return out


def theory_mass_function(grid, z: float = 0.0, *, cosmo: str = cosmology.MASS_FUNCTION_COSMOLOGY,
                         model: str = "tinker08") -> np.ndarray:
    """dn/dlog10 M200c [h^3 Mpc^-3 dex^-1] (Tinker et al. 2008, Planck 2018 by default)."""
    return cosmology.mass_function(np.asarray(grid, dtype=float), z, cosmo=cosmo, model=model)


def smoothed_theory(grid, bandwidth: float, z: float = 0.0, sigma: float = 0.0,
                    log_m_min: float | None = None, **kw) -> np.ndarray:
    """Theory convolved with the KDE kernel and a Gaussian mass error of ``sigma`` dex.

    ``log_m_min`` truncates the theory below a sample's mass cut before the convolution
    (a KDE leaks below the cut what the theory would have put above it).

    The unweighted KDE estimate of clusters drawn from the theory with log-normal errors
    ``sigma`` has this expectation: the forward-modelled curve to compare the estimate with
    (the steep high-mass end is lifted by both the kernel and the errors: Eddington bias).
    """
    grid = np.asarray(grid, dtype=float)
    s = float(np.hypot(bandwidth, sigma))
    if s == 0:
        return theory_mass_function(grid, z, **kw)
    fine = np.linspace(grid.min() - 5 * s, grid.max() + 5 * s, 2001)
    dn = theory_mass_function(fine, z, **kw)
    if log_m_min is not None:
        dn = np.where(fine >= log_m_min, dn, 0.0)
    k = np.exp(-0.5 * ((grid[:, None] - fine[None, :]) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    return k @ dn * (fine[1] - fine[0])


def mass_function_from_posteriors(posteriors: pd.DataFrame, area_deg2: float, distance_max: float,
                                  *, estimate: str = "log_m_map", grid=None, n_boot: int = 200,
                                  seed: int = 0, z: float = 0.0,
                                  exclude_flags: tuple[str, ...] = (),
                                  log_m_min: float | None = None) -> pd.DataFrame:
    """:func:`mass_function_estimate` on a posterior table plus the theory columns.

    Uses ``estimate`` as the mass and ``(log_m_hi1 - log_m_lo1) / 2`` as the width; rows with
    NaN (too few galaxies) are skipped, and so are clusters beyond ``distance_max`` when the
    table has ``comoving_distance`` (the volume must contain the sample) and rows flagged with
    any of ``exclude_flags``. Adds ``dn_dlogm_theory`` (Tinker08, Planck 2018) and
    ``dn_dlogm_theory_smoothed`` (the theory through the same kernel, cut below ``log_m_min``,
    the sample's completeness mass, when given).
    """
    for col in (estimate, "log_m_lo1", "log_m_hi1"):
        if col not in posteriors.columns:
            raise ClustermassError(f"posterior table has no column {col!r}")
    keep = np.ones(len(posteriors), dtype=bool)
    if "comoving_distance" in posteriors.columns:
        keep &= posteriors["comoving_distance"].to_numpy(float) <= distance_max
    for flag in exclude_flags:
        if flag in posteriors.columns:
            keep &= ~posteriors[flag].to_numpy(bool)
    posteriors = posteriors[keep]
    sig = 0.5 * (posteriors["log_m_hi1"].to_numpy(float) - posteriors["log_m_lo1"].to_numpy(float))
    table = mass_function_estimate(posteriors[estimate].to_numpy(float), sig, area_deg2, distance_max,
                                   grid, n_boot=n_boot, seed=seed)
    table["dn_dlogm_theory"] = theory_mass_function(table["log_m"], z)
    table["dn_dlogm_theory_smoothed"] = smoothed_theory(table["log_m"], table.attrs["bandwidth"], z,
                                                        log_m_min=log_m_min)
    return table


def posterior_prior(posteriors: pd.DataFrame, prior: str | None = None) -> str:
    """The mass prior a posterior table was inferred with (its ``prior`` column; tables without
    one used the flat training prior), checked against ``prior`` when given.

    A flat-prior table of a survey warns: the survey's clusters follow the steep mass function,
    so their flat-prior posterior masses are biased high at low mass (Eddington bias); infer
    with ``--prior mass-function`` instead (docs/calibration.md)."""
    import warnings

    if prior is not None and prior not in ("flat", "mass-function"):
        raise ClustermassError(f"prior must be flat or mass-function, not {prior!r}")
    used = sorted(set(posteriors["prior"].dropna().astype(str))) if "prior" in posteriors.columns else ["flat"]
    used = used or ["flat"]
    if len(used) > 1:
        raise ClustermassError(f"the posterior table mixes priors {used}")
    if prior is not None and used[0] != prior:
        raise ClustermassError(f"the posteriors were inferred with the {used[0]!r} prior, not {prior!r}: run "
                               f"`clustermass infer --prior {prior}` first")
    if used[0] == "flat":
        warnings.warn("posteriors use the flat training prior: for a survey's clusters (which follow the mass "
                      "function) low-mass posteriors are biased high (Eddington bias); use "
                      "`clustermass infer --prior mass-function`", UserWarning, stacklevel=2)
    return used[0]


def write_mass_function(posteriors: pd.DataFrame, out_dir, area_deg2: float, distance_max: float,
                        *, estimate: str = "log_m_map", n_boot: int = 200, seed: int = 0,
                        log_m_min: float | None = None, exclude_flags: tuple[str, ...] = (),
                        prior: str | None = None) -> dict:
    """Write ``mass_function.parquet`` (or .csv), ``mass_function.json`` and the figure.

    ``prior``: the mass prior the posteriors must have been inferred with (default: whatever
    the table says; see :func:`posterior_prior`).

    Returns the summary dict (volume, bandwidth, number of clusters, prior, paths).
    """
    from pathlib import Path

    from ._io import atomic_write, save_figure, write_json_atomic
    from .plots.sky import plot_mass_function

    out_dir = Path(out_dir)
    used_prior = posterior_prior(posteriors, prior)
    table = mass_function_from_posteriors(posteriors, area_deg2, distance_max, estimate=estimate,
                                          n_boot=n_boot, seed=seed, exclude_flags=exclude_flags,
                                          log_m_min=log_m_min)
    path = atomic_write(out_dir / "mass_function.csv", lambda p: table.to_csv(p, index=False))
    fig = save_figure(plot_mass_function(table, log_m_min=log_m_min), out_dir / "figures" / "mass_function.png")
    summary = {**table.attrs, "prior": used_prior, "table": str(path), "figure": str(fig)}
    write_json_atomic(out_dir / "mass_function.json", summary)
    return summary
