"""Calibration diagnostics of mass posteriors on evaluation pairs (d_obs, true log M).

SCIENCE.md sec. 6: a sub-optimal network may widen posteriors but must not bias them. All
functions take a posterior object with ``cdf(d_obs, log_m)`` (e.g.
:class:`clustermass.posterior.JointKDEPosterior`), the predictions ``d_obs`` and the true
``log_m_true`` [log10 h^-1 Msun] of an evaluation set, and are exact (no sampling): for a
continuous posterior, the truth lies in the central x interval iff its PIT value u = F(truth)
satisfies |u - 1/2| <= x/2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .errors import ClustermassError

__all__ = [
    "calibration_metrics",
    "coverage_by_mass",
    "coverage_curve",
    "coverage_from_pit",
    "group_calibration",
    "pit_values",
    "tarp_test",
]

#: Nominal probability inside [lo1, hi1] and [lo2, hi2] of the posterior table.
NOMINAL_68 = 0.8413 - 0.1587
NOMINAL_95 = 0.97725 - 0.02275


class DiagnosticsError(ClustermassError, ValueError):
    """Evaluation pairs are malformed (lengths differ, empty, non-finite)."""


def _pairs(d_obs, log_m_true) -> tuple[np.ndarray, np.ndarray]:
    """Finite pairs; ``d_obs`` may be (n,) or (n, k) (conditioning variables of k-D posteriors)."""
    d = np.asarray(d_obs, dtype=float)
    d = d.ravel() if d.ndim < 2 or d.shape[1] == 1 else d
    m = np.asarray(log_m_true, dtype=float).ravel()
    if d.shape[0] != m.shape[0]:
        raise DiagnosticsError(f"d_obs ({d.shape[0]}) and log_m_true ({m.size}) differ in length")
    # (n, k): a row needs its first value (d_pred); missing further ones are the posterior's business
    ok = (np.isfinite(d) if d.ndim == 1 else np.isfinite(d[:, 0])) & np.isfinite(m)
    if not ok.any():
        raise DiagnosticsError("no finite evaluation pairs")
    return d[ok], m[ok]


def pit_values(posterior, d_obs, log_m_true) -> np.ndarray:
    """Probability integral transform: the posterior CDF at the true mass, one per cluster.

    Parameters
    ----------
    posterior : object with ``cdf(d_obs, log_m)``
    d_obs, log_m_true : array_like (n,)
        Predictions and true log10 M200c [h^-1 Msun]; non-finite pairs are dropped.

    Returns
    -------
    ndarray (n_finite,)
        Uniform on [0, 1] for calibrated posteriors.
    """
    d, m = _pairs(d_obs, log_m_true)
    return np.clip(posterior.cdf(d, m), 0.0, 1.0)


def coverage_from_pit(pit, levels) -> np.ndarray:
    """Fraction of PIT values inside the central interval of each level (0..1)."""
    pit = np.asarray(pit, dtype=float)
    lv = np.asarray(levels, dtype=float)
    dist = np.sort(np.abs(pit - 0.5))
    return np.searchsorted(dist, lv / 2.0, side="right") / max(pit.size, 1)


def coverage_curve(posterior, d_obs, log_m_true, levels=None) -> np.ndarray:
    """Empirical coverage of the central credible interval of every level.

    Parameters
    ----------
    posterior : object with ``cdf(d_obs, log_m)``
    d_obs, log_m_true : array_like (n,)
    levels : array_like, default ``np.linspace(0, 1, 101)``
        Credibility of the central interval (0.68 = from the 16th to the 84th percentile).

    Returns
    -------
    ndarray like ``levels``
        Fraction of clusters whose true mass lies inside; the ideal is ``levels``.
    """
    levels = np.linspace(0, 1, 101) if levels is None else levels
    return coverage_from_pit(pit_values(posterior, d_obs, log_m_true), levels)


def coverage_by_mass(posterior, d_obs, log_m_true, bins=6, levels=(0.68, 0.95), pit=None) -> pd.DataFrame:
    """Coverage of central intervals in bins of true mass.

    Parameters
    ----------
    posterior, d_obs, log_m_true : as in :func:`coverage_curve`
    bins : int or array_like
        Number of equal-width bins over the range of ``log_m_true``, or bin edges [dex].
    levels : sequence of float
        Credibility levels.
    pit : array_like, optional
        Precomputed :func:`pit_values` of the same ``(d_obs, log_m_true)`` (one per finite
        pair); computed here if None.

    Returns
    -------
    DataFrame
        ``log_m_lo, log_m_hi, log_m_mid, n`` and ``coverage_<100*level>`` (e.g. ``coverage_68``)
        plus ``error_<...>``, the binomial standard error of each coverage.
    """
    d, m = _pairs(d_obs, log_m_true)
    if pit is None:
        pit = pit_values(posterior, d, m)
    else:
        pit = np.asarray(pit, dtype=float).ravel()
        if pit.shape != m.shape:
            raise DiagnosticsError(f"pit has {pit.size} values, expected one per finite pair ({m.size})")
    edges = np.linspace(m.min(), m.max(), int(bins) + 1) if np.ndim(bins) == 0 else np.asarray(bins, float)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise DiagnosticsError("bins must be a positive count or increasing edges")
    k = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, edges.size - 2)
    inside = (m >= edges[0]) & (m <= edges[-1])
    rows = []
    for b in range(edges.size - 1):
        sel = inside & (k == b)
        row = {"log_m_lo": edges[b], "log_m_hi": edges[b + 1], "log_m_mid": 0.5 * (edges[b] + edges[b + 1]), "n": int(sel.sum())}
        for lv in levels:
            key = f"{100 * lv:g}".replace(".", "p")
            cov = coverage_from_pit(pit[sel], [lv])[0] if sel.any() else np.nan
            row[f"coverage_{key}"] = cov
            row[f"error_{key}"] = np.sqrt(lv * (1 - lv) / sel.sum()) if sel.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def tarp_test(posterior, d_obs, log_m_true, levels=None, reference=None, seed: int = 0) -> dict:
    """Expected-coverage test TARP (Lemos et al. 2023), exact in one dimension.

    For each cluster j a reference point ``r_j`` is drawn independently of the truth (uniform
    over the range of ``log_m_true``, i.e. the prior box, unless given). The credibility of the
    truth is ``f_j = P(|M - r_j| < |M_true - r_j|)`` under the posterior, computed exactly from
    the CDF as ``F(r + a) - F(r - a)`` with ``a = |M_true - r|`` (TARP draws posterior samples; in
    1D the CDF makes that unnecessary). The expected coverage ``ECP(alpha) = mean(f_j < alpha)``
    equals ``alpha`` for calibrated posteriors.

    Parameters
    ----------
    posterior, d_obs, log_m_true : as in :func:`coverage_curve`
    levels : array_like, default ``np.linspace(0, 1, 101)``
    reference : array_like (n,) or None
        Reference points [dex]; default random uniform as above.
    seed : int
        Seed of the reference points.

    Returns
    -------
    dict
        ``alpha``, ``ecp`` (arrays), ``credibility`` (the f_j), ``max_deviation``
        (max |ECP - alpha|) and ``ks_pvalue`` (KS test of f_j against uniform).
    """
    d, m = _pairs(d_obs, log_m_true)
    levels = np.linspace(0, 1, 101) if levels is None else np.asarray(levels, float)
    if reference is None:
        rng = np.random.default_rng(seed)
        ref = rng.uniform(m.min(), m.max(), m.size)
    else:
        ref = np.asarray(reference, float).ravel()
        if ref.size != m.size:
            raise DiagnosticsError("reference needs one point per finite evaluation pair")
    a = np.abs(m - ref)
    cdf = posterior.cdf(d, np.column_stack([ref - a, ref + a]))
    f = np.clip(cdf[:, 1] - cdf[:, 0], 0.0, 1.0)
    ecp = np.searchsorted(np.sort(f), levels, side="left") / f.size
    return {
        "alpha": levels,
        "ecp": ecp,
        "credibility": f,
        "max_deviation": float(np.max(np.abs(ecp - levels))),
        "ks_pvalue": float(stats.kstest(f, "uniform").pvalue),
    }


def calibration_metrics(posterior, d_obs, log_m_true, levels=None, seed: int = 0) -> dict:
    """Summary numbers for ``metrics.json``.

    Parameters
    ----------
    posterior, d_obs, log_m_true : as in :func:`coverage_curve`
    levels : array_like, default ``np.linspace(0, 1, 101)``
        Levels over which the largest coverage deviation is taken.
    seed : int
        Seed of the TARP reference points.

    Returns
    -------
    dict
        ``n``; ``coverage_68`` and ``coverage_95``: fractions of truths inside [lo1, hi1] and
        [lo2, hi2] (nominal ``nominal_68`` = 0.6826, ``nominal_95`` = 0.9545);
        ``max_coverage_deviation`` over ``levels``; ``pit_ks_statistic``, ``pit_ks_pvalue``
        (uniformity of the PIT); ``tarp_max_deviation``. Also the arrays behind them, for
        figures (drop them before writing JSON): ``pit`` (:func:`pit_values` of the finite pairs)
        and ``tarp`` (the :func:`tarp_test` dict).
    """
    d, m = _pairs(d_obs, log_m_true)
    levels = np.linspace(0, 1, 101) if levels is None else np.asarray(levels, float)
    pit = pit_values(posterior, d, m)
    cov = coverage_from_pit(pit, levels)
    ks = stats.kstest(pit, "uniform")
    tarp = tarp_test(posterior, d, m, levels=levels, seed=seed)
    return {
        "n": int(m.size),
        "coverage_68": float(np.mean((pit >= 0.1587) & (pit <= 0.8413))),
        "coverage_95": float(np.mean((pit >= 0.02275) & (pit <= 0.97725))),
        "nominal_68": NOMINAL_68,
        "nominal_95": NOMINAL_95,
        "max_coverage_deviation": float(np.max(np.abs(cov - levels))),
        "pit_ks_statistic": float(ks.statistic),
        "pit_ks_pvalue": float(ks.pvalue),
        "tarp_max_deviation": tarp["max_deviation"],
        "pit": pit,
        "tarp": tarp,
    }


def group_calibration(pit, groups: dict, width=None, *, n_bins: int = 3, mass=None, mass_edges=None,
                      n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Calibration per group: coverage (68/95), P(true < median) and PIT uniformity per quantile
    bin (terciles by default) of each grouping variable, and per bin of true mass.

    Parameters
    ----------
    pit : array_like (n,)
        Posterior CDF at the truth of each cluster (:func:`pit_values`).
    groups : dict
        Name -> values (n,) to split by (e.g. ``{"z": z, "n_gal": n_gal, "d_pred": d_pred}``);
        non-finite values are left out of that grouping.
    width : array_like (n,), optional
        68% interval widths [dex]; adds ``width_68`` (mean per bin).
    n_bins : int
        Equal-count bins per variable (3: terciles).
    mass, mass_edges : array_like, optional
        True log masses and bin edges [dex]: adds one row per mass bin (group ``log_m_true``).
    n_boot : int
        Bootstrap resamples of each bin for the ``*_err`` columns (standard deviations).

    Returns
    -------
    DataFrame
        ``group, bin, lo, hi, n, coverage_68, coverage_68_err, coverage_95, coverage_95_err,
        p_below_median, p_below_median_err, pit_ks_pvalue`` (+ ``width_68``).
    """
    pit = np.asarray(pit, dtype=float).ravel()
    wid = None if width is None else np.asarray(width, dtype=float).ravel()
    rng = np.random.default_rng(seed)
    rows = []

    def stats_of(p):
        return (np.mean(np.abs(p - 0.5) <= NOMINAL_68 / 2), np.mean(np.abs(p - 0.5) <= NOMINAL_95 / 2),
                np.mean(p < 0.5))

    def add(name, b, lo, hi, sel):
        p = pit[sel]
        row = {"group": name, "bin": b, "lo": float(lo), "hi": float(hi), "n": int(p.size)}
        if p.size:
            c68, c95, pb = stats_of(p)
            boot = np.array([stats_of(p[rng.integers(0, p.size, p.size)]) for _ in range(n_boot)]) if n_boot else None
            err = boot.std(0, ddof=1) if boot is not None and n_boot > 1 else np.full(3, np.nan)
            row.update(coverage_68=float(c68), coverage_68_err=float(err[0]), coverage_95=float(c95),
                       coverage_95_err=float(err[1]), p_below_median=float(pb), p_below_median_err=float(err[2]),
                       pit_ks_pvalue=float(stats.kstest(p, "uniform").pvalue) if p.size > 1 else np.nan)
            if wid is not None:
                row["width_68"] = float(np.nanmean(wid[sel]))
        rows.append(row)

    fin_pit = np.isfinite(pit)
    for name, vals in groups.items():
        v = np.asarray(vals, dtype=float).ravel()
        ok = np.isfinite(v) & fin_pit
        if ok.sum() < n_bins:
            continue
        edges = np.quantile(v[ok], np.linspace(0, 1, n_bins + 1))
        k = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_bins - 1)
        for b in range(n_bins):
            add(name, b, edges[b], edges[b + 1], ok & (k == b))
    if mass is not None:
        m = np.asarray(mass, dtype=float).ravel()
        ok = np.isfinite(m) & fin_pit
        edges = np.asarray(mass_edges, float) if mass_edges is not None else np.linspace(m[ok].min(), m[ok].max(), 7)
        k = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, edges.size - 2)
        for b in range(edges.size - 1):
            add("log_m_true", b, edges[b], edges[b + 1], ok & (k == b) & (m >= edges[0]) & (m <= edges[-1]))
    return pd.DataFrame(rows)
