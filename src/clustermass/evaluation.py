"""Evaluation on a held-out split: residuals, coverage, richness dependence, contamination.

Conventions (docs/design.md):

* residual ``eps = log10 M_pred - log10 M_true`` (positive = over-prediction; the paper's text
  writes the opposite sign). ``M_pred`` is the **posterior median** (``log_m_median``) of the
  calibrated joint-KDE posterior: it is defined for networks and classical baselines alike.
  ``eps_raw_*`` use the uncalibrated summary ``d_pred`` instead (the paper's point predictions;
  for the classical baselines ``d_pred`` is not an M200c estimate and ``eps_raw`` is only
  informative for the networks).
* posteriors: every model (networks and classical baselines) goes through the same
  :class:`clustermass.calibration.Calibration` and the one table builder
  :func:`clustermass.inference.posterior_table` (conditioning, prior edges, ``min_neighbours``).
* per-group calibration (``groups`` of each model): coverage (68/95), P(true < median) and PIT
  uniformity per tercile of redshift, n_gal (log10 galaxies in the window) and network output,
  and per bin of true mass (6 equal bins over the evaluated range), with bootstrap errors
  (:func:`clustermass.diagnostics.group_calibration`).
* coverage: fraction of clusters whose true mass lies inside the central 68.27% (``lo1..hi1``)
  and 95.45% (``lo2..hi2``) posterior intervals. ``max_coverage_deviation`` is the largest
  |coverage - level| over 101 levels in [0, 1] from the posterior CDF at the truth
  (:func:`clustermass.diagnostics.calibration_metrics`; NaN without a posterior);
  ``max_coverage_deviation_68_95`` is the same over the two summary intervals only.
* richness dependence (paper eq. 7): residuals about the best-fit power law
  ``d_pred = a + b log M_true``, expressed in dex of true mass (divided by ``b``), fitted with
  ``sigma^2 = sigma_N^2 (N_mem/100)^-1 + sigma_0^2`` by maximum likelihood (Gaussian residuals,
  errors from the Fisher matrix) or by a weighted fit of binned variances
  (``scipy.optimize.curve_fit``). The velocity-dispersion-only reference is
  ``3 / (sqrt(2 N_mem) ln 10)``.
* inference time (``time_per_cluster_ms`` of each model in :func:`evaluate`): wall time from a
  catalogue diagram to its posterior summary, per evaluated cluster [ms], on the evaluating
  machine: for network bundles the whole ``posterior_table`` call (window selection, KDE cube,
  network, posterior); for the classical estimators their per-diagram time on the evaluated
  rows (shared gapper included) plus their ``posterior_table`` call. Calibration is not counted.

:func:`evaluate_predictions` works on plain tables (posterior summaries per model);
:func:`evaluate` runs model bundles and the classical baselines and writes
``posteriors.parquet``, ``posteriors_<name>.parquet``, ``metrics.json`` and ``figures/*.png``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import write_json_atomic
from .diagnostics import NOMINAL_68, NOMINAL_95
from .errors import ClustermassError
from .posterior import SUMMARY_COLUMNS

log = logging.getLogger(__name__)

POINT_ESTIMATE = "log_m_median"
EPS_DEFINITION = (
    "eps = log10 M_pred - log10 M_true (positive = over-prediction), "
    "M_pred = posterior median (log_m_median)"
)
METRIC_KEYS = [
    "eps_mean", "eps_std", "coverage_68", "coverage_95", "max_coverage_deviation",
    "sigma_N", "sigma_N_err", "sigma_0", "sigma_0_err", "log_m_true_std", "n_eval",
]


# ---------------------------------------------------------------------- residual statistics
def residuals(log_m_pred, log_m_true) -> np.ndarray:
    """``eps = log_m_pred - log_m_true`` [dex] (positive = over-prediction)."""
    return np.asarray(log_m_pred, dtype=float) - np.asarray(log_m_true, dtype=float)


def mass_bins(log_m_true, width: float = 0.1, min_count: int = 5) -> np.ndarray:
    """Edges of bins of ``width`` dex spanning ``log_m_true`` (empty edge bins are dropped)."""
    x = np.asarray(log_m_true, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.array([0.0, 1.0])
    lo = math.floor(x.min() / width) * width
    hi = math.ceil(x.max() / width) * width
    edges = np.arange(lo, hi + width / 2, width)
    if len(edges) < 2:
        edges = np.array([lo, lo + width])
    counts, _ = np.histogram(x, edges)
    keep = np.flatnonzero(counts >= min_count)
    if len(keep) == 0:
        return np.array([x.min(), x.max() + 1e-9])
    return edges[keep[0]: keep[-1] + 2]


#: Bins of the posterior median [log10 h^-1 Msun] for the prior checks (docs/calibration.md)
ESTIMATE_EDGES = (13.7, 13.9, 14.1, 14.3, 14.5, 14.8, 15.2)


def bias_by_estimate_bin(estimate, log_m_true, edges=ESTIMATE_EDGES) -> pd.DataFrame:
    """Mean (estimate - true) [dex] in bins of the estimate (e.g. the posterior median).

    Zero in every bin where the posterior is right for the population the clusters come from:
    with a flat prior, clusters drawn from the steep mass function give a positive bias
    (Eddington bias) that ``--prior mass-function`` should remove. Returns ``lo, hi, n, bias,
    bias_err`` (standard error of the mean) from :func:`binned_statistics`.
    """
    est = np.asarray(estimate, float)
    st = binned_statistics(est, est - np.asarray(log_m_true, float), edges)
    return pd.DataFrame({"lo": st.x_lo, "hi": st.x_hi, "n": st.n, "bias": st["mean"],
                         "bias_err": st["std"] / np.sqrt(st.n)})


def binned_statistics(x, y, edges) -> pd.DataFrame:
    """Per-bin statistics of ``y`` in bins of ``x``.

    Returns
    -------
    DataFrame
        ``x_lo, x_hi, x_mid, n, mean, std, q02, q16, q50, q84, q98`` (quantiles at
        2.275, 15.87, 50, 84.13, 97.725 %).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    edges = np.asarray(edges, float)
    idx = np.digitize(x, edges) - 1
    idx[x == edges[-1]] = len(edges) - 2
    rows = []
    for k in range(len(edges) - 1):
        v = y[idx == k]
        q = np.percentile(v, [2.275, 15.866, 50, 84.134, 97.725]) if len(v) else [np.nan] * 5
        rows.append(
            dict(
                x_lo=edges[k], x_hi=edges[k + 1], x_mid=0.5 * (edges[k] + edges[k + 1]), n=len(v),
                mean=v.mean() if len(v) else np.nan, std=v.std(ddof=1) if len(v) > 1 else np.nan,
                q02=q[0], q16=q[1], q50=q[2], q84=q[3], q98=q[4],
            )
        )
    return pd.DataFrame(rows)


def coverage_from_summary(summary: pd.DataFrame, log_m_true) -> dict:
    """Empirical coverage of the 1- and 2-sigma posterior intervals of a summary table.

    Returns ``coverage_68``, ``coverage_95`` and ``max_coverage_deviation_68_95`` (the larger
    deviation from nominal of the two levels; not the all-level ``max_coverage_deviation``).
    """
    t = np.asarray(log_m_true, float)
    lo1, hi1 = summary["log_m_lo1"].to_numpy(float), summary["log_m_hi1"].to_numpy(float)
    lo2, hi2 = summary["log_m_lo2"].to_numpy(float), summary["log_m_hi2"].to_numpy(float)
    ok = np.isfinite(lo1) & np.isfinite(t)
    c68 = float(np.mean((t[ok] >= lo1[ok]) & (t[ok] <= hi1[ok]))) if ok.any() else float("nan")
    c95 = float(np.mean((t[ok] >= lo2[ok]) & (t[ok] <= hi2[ok]))) if ok.any() else float("nan")
    return {
        "coverage_68": c68,
        "coverage_95": c95,
        "max_coverage_deviation_68_95": float(max(abs(c68 - NOMINAL_68), abs(c95 - NOMINAL_95))),
    }


# ---------------------------------------------------------------------- richness dependence
def fit_power_law(log_m_true, log_m_pred) -> tuple[float, float]:
    """Least-squares ``log_m_pred = a + b log_m_true``; returns ``(a, b)``."""
    x = np.asarray(log_m_true, float)
    y = np.asarray(log_m_pred, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        return float("nan"), float("nan")
    b, a = np.polyfit(x[ok], y[ok], 1)
    return float(a), float(b)


def power_law_residuals(log_m_true, log_m_pred) -> tuple[np.ndarray, float, float]:
    """Residuals about the best-fit power law in dex of true mass, ``(y - a - b x) / b``.

    Returns ``(residuals, a, b)``.
    """
    a, b = fit_power_law(log_m_true, log_m_pred)
    r = (np.asarray(log_m_pred, float) - a - b * np.asarray(log_m_true, float)) / b
    return r, a, b


def richness_sigma(n_mem, sigma_N, sigma_0):
    """Eq. (7): total scatter [dex] ``sqrt(sigma_N^2 (N_mem/100)^-1 + sigma_0^2)``."""
    return np.sqrt(sigma_N**2 * 100.0 / np.asarray(n_mem, float) + sigma_0**2)


def velocity_dispersion_scatter(n_mem):
    """Scatter [dex] of a mass from the velocity dispersion alone: ``3 / (sqrt(2 N) ln 10)``."""
    return 3.0 / (np.sqrt(2.0 * np.asarray(n_mem, float)) * np.log(10.0))


def fit_richness_scatter(resid, n_mem, method: str = "ml", n_bins: int = 8) -> dict:
    """Fit eq. (7) to residuals.

    Parameters
    ----------
    resid : array_like
        Residuals about the mean relation [dex] (assumed zero-mean).
    n_mem : array_like
        Number of true members of each cluster (> 0).
    method : {"ml", "binned"}
        ``ml``: Gaussian maximum likelihood over clusters, errors from the Fisher matrix.
        ``binned``: variances in ``n_bins`` equal-count bins of N_mem fitted with
        ``scipy.optimize.curve_fit`` (variance errors ``var sqrt(2/(n-1))``).

    Returns
    -------
    dict
        ``sigma_N, sigma_N_err, sigma_0, sigma_0_err`` [dex], ``method``, ``n``.
    """
    r = np.asarray(resid, float)
    n = np.asarray(n_mem, float)
    ok = np.isfinite(r) & np.isfinite(n) & (n > 0)
    r, n = r[ok], n[ok]
    nan = {"sigma_N": np.nan, "sigma_N_err": np.nan, "sigma_0": np.nan, "sigma_0_err": np.nan,
           "method": method, "n": int(len(r))}
    if len(r) < 10:
        return nan
    x = 100.0 / n
    if method == "ml":
        from scipy.optimize import minimize

        # parameters: log sigma_N, log sigma_0 (unbounded; either may run towards zero)
        def nll_grad(p):
            e = np.exp(2 * np.clip(p, -30, 5))
            s2 = e[0] * x + e[1]
            w = 0.5 * (1.0 / s2 - r**2 / s2**2)
            return 0.5 * np.sum(r**2 / s2 + np.log(s2)), np.array([np.sum(w * 2 * e[0] * x), np.sum(w * 2 * e[1])])

        s = max(float(np.std(r)), 1e-6)
        best = None
        for start in ([s / 1.5, s / 1.5], [s, 1e-2 * s], [1e-2 * s, s]):
            res = minimize(nll_grad, np.log(start), jac=True, method="BFGS")
            if best is None or res.fun < best.fun:
                best = res
        best.x = np.exp(np.clip(best.x, -30, 5))
        sN, s0 = (abs(float(v)) for v in best.x)
        # Fisher matrix in (A, B) = (sigma_N^2, sigma_0^2): 1/2 sum g g^T / s^4, g = (x, 1)
        s2 = sN**2 * x + s0**2
        g = np.stack([x, np.ones_like(x)])
        fisher = 0.5 * (g / s2**2) @ g.T
        cov = np.linalg.pinv(fisher)
        err_a, err_b = np.sqrt(np.maximum(np.diag(cov), 0))
        return {
            "sigma_N": sN, "sigma_N_err": err_a / (2 * sN) if sN > 0 else math.sqrt(err_a),
            "sigma_0": s0, "sigma_0_err": err_b / (2 * s0) if s0 > 0 else math.sqrt(err_b),
            "method": "ml", "n": int(len(r)),
        }
    if method == "binned":
        from scipy.optimize import curve_fit

        edges = np.unique(np.quantile(n, np.linspace(0, 1, n_bins + 1)))
        idx = np.clip(np.searchsorted(edges, n, side="right") - 1, 0, len(edges) - 2)
        xb, vb, eb = [], [], []
        for k in range(len(edges) - 1):
            sel = idx == k
            if sel.sum() < 5:
                continue
            v = np.mean(r[sel] ** 2)
            xb.append(np.mean(x[sel]))
            vb.append(v)
            eb.append(v * math.sqrt(2.0 / (sel.sum() - 1)))
        if len(xb) < 3:
            return nan
        xb, vb, eb = map(np.asarray, (xb, vb, eb))
        popt, pcov = curve_fit(lambda xx, A, B: A * xx + B, xb, vb, p0=[vb.mean() / 2 / xb.mean(), vb.mean() / 2],
                               sigma=eb, absolute_sigma=True)
        A, B = popt
        eA, eB = np.sqrt(np.maximum(np.diag(pcov), 0))
        sN, s0 = math.sqrt(max(A, 0.0)), math.sqrt(max(B, 0.0))
        return {
            "sigma_N": sN, "sigma_N_err": eA / (2 * sN) if sN > 0 else math.sqrt(eA),
            "sigma_0": s0, "sigma_0_err": eB / (2 * s0) if s0 > 0 else math.sqrt(eB),
            "method": "binned", "n": int(len(r)),
            "bins": {"x": xb.tolist(), "var": vb.tolist(), "var_err": eb.tolist()},
        }
    raise ClustermassError(f"unknown richness-fit method {method!r} (use 'ml' or 'binned')")


# ---------------------------------------------------------------------- per-model metrics
def model_metrics(log_m_true, n_mem, summary: pd.DataFrame, posterior=None, richness_method: str = "ml",
                  features=None) -> dict:
    """Metrics of one model on one split (see the module docstring for the definitions).

    Parameters
    ----------
    log_m_true : (n,) array
        True log10 M200c [h^-1 Msun].
    n_mem : (n,) array
        True member counts (for eq. 7).
    summary : DataFrame
        Posterior summary aligned with ``log_m_true`` (``SUMMARY_COLUMNS``); rows with NaN
        ``log_m_median`` count as failures.
    posterior : Calibration or JointKDEPosterior, optional
        Anything with ``cdf(features, log_m)``. When given, ``coverage_68/95``, ``max_coverage_deviation`` (over 101 levels),
        ``pit_ks_pvalue`` and ``tarp_max_deviation`` come from its CDF at the truth
        (:func:`clustermass.diagnostics.calibration_metrics`); without it the coverages come from
        the summary intervals and ``max_coverage_deviation`` is NaN.
    features : array (n,) or (n, k), optional
        What ``posterior`` conditions on, per row (default: ``summary.d_pred``); with a
        posterior, ``groups`` (per-tercile calibration) is added.

    Returns
    -------
    dict
        ``METRIC_KEYS`` plus ``eps_median, eps_raw_mean, eps_raw_std, width_68,
        max_coverage_deviation_68_95, coverage_source, power_law_a, power_law_b,
        scatter_power_law, n_failed, binned``. With a posterior also ``_diagnostics``:
        ``{"mask", "pit", "tarp"}`` (arrays for the figures; :func:`evaluate_predictions` pops
        it before ``metrics.json`` is written).
    """
    t = np.asarray(log_m_true, float)
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise ClustermassError(f"posterior summary lacks column(s) {missing}")
    if len(summary) != len(t):
        raise ClustermassError(f"posterior summary has {len(summary)} rows, expected {len(t)}")
    med = summary[POINT_ESTIMATE].to_numpy(float)
    ok = np.isfinite(med) & np.isfinite(t)
    eps = residuals(med, t)[ok]
    d_pred = summary["d_pred"].to_numpy(float)
    raw = residuals(d_pred, t)[ok]
    out: dict = {
        "eps_mean": float(eps.mean()) if len(eps) else np.nan,
        "eps_std": float(eps.std(ddof=1)) if len(eps) > 1 else np.nan,
        "eps_median": float(np.median(eps)) if len(eps) else np.nan,
        "eps_raw_mean": float(raw.mean()) if len(raw) else np.nan,
        "eps_raw_std": float(raw.std(ddof=1)) if len(raw) > 1 else np.nan,
        "width_68": float(np.mean(summary["log_m_hi1"].to_numpy(float)[ok] - summary["log_m_lo1"].to_numpy(float)[ok]))
        if ok.any() else np.nan,
    }
    cov = coverage_from_summary(summary[ok], t[ok])
    cov["max_coverage_deviation"] = np.nan  # all-level deviation needs the posterior CDF
    cov["coverage_source"] = "summary intervals (68/95 only)"
    sel = ok & np.isfinite(d_pred)
    feats = d_pred if features is None else np.asarray(features, dtype=float)
    if posterior is not None and sel.any():
        from .diagnostics import calibration_metrics, group_calibration

        cm = calibration_metrics(posterior, feats[sel], t[sel])
        keys = ("coverage_68", "coverage_95", "max_coverage_deviation", "pit_ks_pvalue", "tarp_max_deviation")
        cov.update({k: float(cm[k]) for k in keys})
        cov["coverage_source"] = "diagnostics.calibration_metrics (posterior CDF at the truth)"
        out["_diagnostics"] = {"mask": sel, "pit": cm["pit"], "tarp": cm["tarp"]}
        width = (summary["log_m_hi1"].to_numpy(float) - summary["log_m_lo1"].to_numpy(float))[sel]
        cz = summary["cond_z"].to_numpy(float)[sel] if "cond_z" in summary else np.full(sel.sum(), np.nan)
        cn = (summary["cond_log_n_gal"].to_numpy(float)[sel] if "cond_log_n_gal" in summary
              else np.full(sel.sum(), np.nan))
        tm = t[sel]
        edges = np.linspace(tm.min(), tm.max(), 7)  # 6 equal bins over the evaluated masses
        groups = group_calibration(cm["pit"], {"z": cz, "n_gal": cn, "d_pred": d_pred[sel]}, width, mass=tm,
                                   mass_edges=edges if np.ptp(tm) > 0 else None)
        out["groups"] = groups.to_dict(orient="records")
        terc = groups[groups["group"] != "log_m_true"]
        out["worst_group_coverage_68_deviation"] = float(np.nanmax(np.abs(terc["coverage_68"] - NOMINAL_68))) \
            if len(terc) else np.nan
        out["worst_group_median_deviation"] = float(np.nanmax(np.abs(terc["p_below_median"] - 0.5))) \
            if len(terc) else np.nan
    out.update(cov)
    pl_resid, a, b = power_law_residuals(t[ok], d_pred[ok])
    fit = fit_richness_scatter(pl_resid, np.asarray(n_mem, float)[ok], method=richness_method)
    out.update({k: fit[k] for k in ("sigma_N", "sigma_N_err", "sigma_0", "sigma_0_err")})
    out.update(
        power_law_a=a, power_law_b=b,
        scatter_power_law=float(np.std(pl_resid[np.isfinite(pl_resid)], ddof=1))
        if np.isfinite(pl_resid).sum() > 1 else np.nan,
        log_m_true_std=float(np.std(t[np.isfinite(t)], ddof=1)) if np.isfinite(t).sum() > 1 else np.nan,
        n_eval=int(ok.sum()), n_failed=int((~ok).sum()),
        binned=binned_statistics(t[ok], eps, mass_bins(t[ok])).to_dict(orient="list"),
    )
    return out


def contamination_summary(contam: pd.DataFrame, diagram_ids, eps) -> dict:
    """Residual statistics of contaminated vs clean diagrams.

    ``contam``: :func:`clustermass.contamination.contamination_table` output; ``eps`` aligned
    with ``diagram_ids``.
    """
    c = contam.set_index("diagram_id").reindex(np.asarray(diagram_ids))
    frac = c["contamination"].to_numpy(float)
    eps = np.asarray(eps, float)
    ok = np.isfinite(eps) & np.isfinite(frac)
    dirty = ok & (frac > 0)
    clean = ok & (frac == 0)
    heavy = ok & (frac >= 1)

    def _m(sel, f):
        return float(f(eps[sel])) if sel.sum() > 1 else np.nan

    out = {
        "definition": "interloper cluster: more massive halo with R_proj < r_max and |dv_los| < v_max; "
                      "contamination = summed mass ratio",
        "n_diagrams": int(ok.sum()),
        "n_contaminated": int(dirty.sum()),
        "fraction_contaminated": float(dirty.sum() / max(ok.sum(), 1)),
        "eps_mean_clean": _m(clean, np.mean), "eps_std_clean": _m(clean, lambda e: np.std(e, ddof=1)),
        "eps_mean_contaminated": _m(dirty, np.mean),
        "eps_std_contaminated": _m(dirty, lambda e: np.std(e, ddof=1)),
        "n_ratio_ge_1": int(heavy.sum()),
        "eps_mean_ratio_ge_1": _m(heavy, np.mean),
        "max_contamination": float(np.nanmax(frac)) if ok.any() else np.nan,
    }
    if dirty.sum() > 3:
        from scipy.stats import spearmanr

        out["spearman_eps_vs_contamination"] = float(spearmanr(frac[dirty], eps[dirty]).statistic)
    return out


# ---------------------------------------------------------------------- orchestration
def _features(posterior, summary: pd.DataFrame):
    """What ``posterior`` conditions on, per row of a posterior table (None: ``d_pred``)."""
    if posterior is not None and hasattr(posterior, "features_of"):
        return posterior.features_of(summary)
    return None


def evaluate_predictions(
    catalogue,
    rows,
    results: dict[str, pd.DataFrame],
    out_dir=None,
    primary: str = "cnn3d",
    posteriors: dict | None = None,
    contamination: pd.DataFrame | None = None,
    figures: bool = True,
    window=None,
    kde=None,
    split: str = "eval",
    richness_method: str = "ml",
) -> dict:
    """Metrics (and figures) of several models' posterior summaries on the same clusters.

    Parameters
    ----------
    catalogue : Catalogue
        Provides ``log_m200c``, ``n_mem``, ``diagram_id`` (and galaxies for Fig. 2).
    rows : array_like
        Cluster rows evaluated; every summary in ``results`` is aligned with them.
    results : dict
        Model name -> posterior summary DataFrame (``SUMMARY_COLUMNS``).
    out_dir : path, optional
        Where ``metrics.json`` and ``figures/*.png`` go (nothing written if None).
    primary : str
        Model whose metrics go to the top level of the result.
    posteriors : dict, optional
        Model name -> fitted posterior (for the full coverage curve).
    contamination : DataFrame, optional
        Per-diagram contamination table (:mod:`clustermass.contamination`).
    figures : bool
        Write the figures.
    window, kde : optional
        ``WindowConfig``/``KDEConfig`` for the example diagram (defaults if None).

    Returns
    -------
    dict
        Top-level metrics of ``primary`` (``METRIC_KEYS`` ...), ``models: {name: metrics}``,
        ``contamination: {...}``, ``sigma_v_reference_100``, definitions.
    """
    rows = np.asarray(rows)
    if not results:
        raise ClustermassError("nothing to evaluate: no model results")
    if primary not in results:
        raise ClustermassError(f"primary model {primary!r} not among {sorted(results)}")
    cl = catalogue.clusters.iloc[rows]
    t = cl["log_m200c"].to_numpy(float)
    if not np.isfinite(t).any():
        raise ClustermassError("the evaluated clusters have no true masses (log_m200c is NaN)")
    n_mem = cl["n_mem"].to_numpy(float)
    posteriors = posteriors or {}
    models = {
        name: model_metrics(t, n_mem, s.reset_index(drop=True), posteriors.get(name), richness_method,
                            features=_features(posteriors.get(name), s.reset_index(drop=True)))
        for name, s in results.items()
    }
    # PIT/TARP arrays: reused by the figures, never written to metrics.json
    diagnostics = {name: m.pop("_diagnostics", None) for name, m in models.items()}
    metrics: dict = {
        "split": split,
        "primary": primary,
        "point_estimate": POINT_ESTIMATE,
        "eps_definition": EPS_DEFINITION,
        "richness_fit": f"eq. 7 on residuals about the power law d_pred = a + b log M_true, method {richness_method}",
        "sigma_v_reference_100": float(velocity_dispersion_scatter(100)),
        **models[primary],
        "models": models,
    }
    if contamination is not None:
        eps = residuals(results[primary][POINT_ESTIMATE].to_numpy(float), t)
        metrics["contamination"] = contamination_summary(contamination, cl["diagram_id"].to_numpy(), eps)
    else:
        metrics["contamination"] = {"available": False}
    if out_dir is not None:
        out_dir = Path(out_dir)
        if figures:
            metrics["figures"] = _make_figures(catalogue, rows, results, t, n_mem, primary, contamination,
                                               out_dir / "figures", window, kde, posteriors, models,
                                               diagnostics.get(primary))
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def _make_figures(catalogue, rows, results, t, n_mem, primary, contamination, fig_dir, window, kde, posteriors,
                  models, diag=None):
    from .plots import evaluation as pe

    made: dict[str, str] = {}

    def _try(name, fn):
        try:
            made[name] = str(fn().relative_to(fig_dir.parent))
        except Exception as exc:  # a failing figure must not lose the metrics
            log.warning("figure %s failed: %s", name, exc)

    _try("mass_distribution", lambda: pe.plot_mass_distribution(catalogue.clusters, fig_dir / "mass_distribution.png"))
    example = int(rows[np.nanargmin(np.abs(t - np.nanmedian(t)))]) if len(rows) else 0
    _try("example_diagram", lambda: _example_diagram_figure(catalogue, example, fig_dir / "example_diagram.png",
                                                           window, kde))
    s = results[primary]
    eps_all = {n: residuals(r[POINT_ESTIMATE].to_numpy(float), t) for n, r in results.items()}

    def predictions():  # computed inside _try: a failure costs the figure, not the metrics
        edges = mass_bins(t)
        bands = {k: binned_statistics(t, s[k].to_numpy(float), edges)["mean"].to_numpy()
                 for k in ("log_m_median", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2")}
        return pe.plot_predictions(edges, bands, binned_statistics(t, eps_all[primary], edges),
                                   fig_dir / "predictions.png", label=primary, n_clusters=len(t))

    def method_comparison():
        edges = mass_bins(t)
        stats = {n: binned_statistics(t, e, edges) for n, e in eps_all.items()}
        summary = {n: (np.mean(e[np.isfinite(e)]), np.std(e[np.isfinite(e)], ddof=1)) for n, e in eps_all.items()}
        return pe.plot_method_comparison(edges, stats, summary, fig_dir / "method_comparison.png")

    _try("predictions", predictions)
    _try("method_comparison", method_comparison)
    rich = {}
    for n, r in results.items():
        pl, _, _ = power_law_residuals(t, r["d_pred"].to_numpy(float))
        rich[n] = (n_mem, pl, models[n])  # the eq.-7 fit of the metrics
    _try("richness", lambda: pe.plot_richness(*_richness_figure_data(rich), fig_dir / "richness.png"))
    if contamination is not None:
        c = contamination.set_index("diagram_id").reindex(catalogue.clusters["diagram_id"].to_numpy()[rows])
        _try("contamination", lambda: pe.plot_contamination(
            t, eps_all[primary], c["contamination"].to_numpy(float), c["d_min"].to_numpy(float),
            fig_dir / "contamination.png", label=primary))
    post = posteriors.get(primary)
    if post is not None:
        feats = _features(post, s.reset_index(drop=True))
        _posterior_figures(post, s["d_pred"].to_numpy(float) if feats is None else feats, t, fig_dir, _try, diag)
    groups = models.get(primary, {}).get("groups")
    if groups:
        _try("group_calibration", lambda: pe.plot_group_calibration(pd.DataFrame(groups),
                                                                    fig_dir / "group_calibration.png", label=primary))
    return made


def _example_diagram_figure(catalogue, row: int, path, window=None, kde=None):
    """Fig. 2 of one catalogue row: its galaxies and (when it can be built) its 3D KDE cube."""
    from .config import KDEConfig, WindowConfig
    from .phasespace import diagram_grid
    from .plots import evaluation as pe

    window = window or WindowConfig()
    kde = kde or KDEConfig()
    pts = catalogue.points(row)
    s, e = catalogue.offsets[row]
    gal = catalogue.galaxies.iloc[s:e]
    mem = gal["is_member"].to_numpy(bool) if "is_member" in gal else np.ones(len(pts), bool)
    try:
        cube = np.asarray(diagram_grid(pts, "cnn3d", window, kde))
    except Exception:  # too few points for a cube: scatter panels only
        cube = None
    cl = catalogue.clusters.iloc[row]
    title = f"diagram {cl['diagram_id']}: log M = {cl['log_m200c']:.2f}, N = {len(pts)}"
    return pe.plot_example_diagram(pts, mem, path, cube=cube, r_max=window.r_max, v_max=window.v_max, title=title)


def richness_binned_scatter(n_mem, resid, n_bins: int = 8, min_count: int = 5):
    """RMS residual in quantile bins of richness (the points of the paper's Fig. 8).

    Parameters
    ----------
    n_mem : array_like
        Number of members per cluster.
    resid : array_like
        Residuals about the mean relation [dex].
    n_bins : int
        Number of quantile bins of ``n_mem``.
    min_count : int
        Bins with fewer clusters are left out.

    Returns
    -------
    (n_med, rms, rms_err) : lists
        Median N_mem, RMS residual [dex] and its error ``rms / sqrt(2 (n - 1))`` [dex] per bin.
    """
    n = np.asarray(n_mem, float)
    r = np.asarray(resid, float)
    ok = np.isfinite(n) & np.isfinite(r) & (n > 0)
    edges = np.unique(np.quantile(n[ok], np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, n[ok], side="right") - 1, 0, len(edges) - 2)
    xs, ys, es = [], [], []
    for b in range(len(edges) - 1):
        sel = r[ok][idx == b]
        if len(sel) < min_count:
            continue
        s = np.sqrt(np.mean(sel**2))
        xs.append(np.median(n[ok][idx == b]))
        ys.append(s)
        es.append(s / np.sqrt(2 * (len(sel) - 1)))
    return xs, ys, es


def _richness_figure_data(fits: dict, n_bins: int = 8):
    """Arguments ``(binned, curves, reference)`` of :func:`clustermass.plots.evaluation.plot_richness`.

    ``fits``: name -> ``(n_mem, residuals, fit dict from fit_richness_scatter)``; models with
    fewer than 10 usable clusters are not drawn.
    """
    all_n = np.concatenate([np.asarray(v[0], float) for v in fits.values()])
    all_n = all_n[np.isfinite(all_n) & (all_n > 0)]
    if len(all_n) == 0:
        all_n = np.array([10.0, 300.0])
    grid = np.geomspace(max(all_n.min(), 1), all_n.max(), 100)
    binned, curves = {}, {}
    for name, (n, r, fit) in fits.items():
        n = np.asarray(n, float)
        r = np.asarray(r, float)
        if (np.isfinite(n) & np.isfinite(r) & (n > 0)).sum() < 10:
            binned[name] = None
            continue
        binned[name] = richness_binned_scatter(n, r, n_bins)
        if np.isfinite(fit.get("sigma_N", np.nan)):
            curves[name] = (grid, richness_sigma(grid, fit["sigma_N"], fit["sigma_0"]),
                            rf"{name}: $\sigma_N$={fit['sigma_N']:.3f}, $\sigma_0$={fit['sigma_0']:.3f}")
    return binned, curves, (grid, velocity_dispersion_scatter(grid))


def _posterior_figures(post, d_pred, t, fig_dir, _try, diag=None) -> None:
    """SBI diagnostics of the primary model (paper Fig. 4, coverage, PIT, per-mass coverage, TARP).

    ``post``: a Calibration (or JointKDEPosterior); ``d_pred``: what it conditions on per cluster,
    (n,) or (n, k). ``diag``: ``model_metrics``' ``_diagnostics`` of this model (``mask`` of the
    pairs used, their ``pit`` and ``tarp``), reused instead of recomputing; computed here if None.
    """
    from . import diagnostics as dg
    from ._io import save_figure
    from .plots import posterior as pp

    x = np.asarray(d_pred, float)
    first = x if x.ndim == 1 else x[:, 0]
    ok = diag["mask"] if diag is not None else np.isfinite(first) & np.isfinite(t)
    d, m = x[ok], t[ok]
    levels = np.linspace(0.0, 1.0, 101)
    joint = getattr(post, "marginal", post)  # Fig. 4 is the (d_pred, log M) plane
    cal = joint.to_frame()
    _try("joint_pdf", lambda: save_figure(pp.plot_joint_pdf(joint, cal["d_pred"].to_numpy(), cal["log_m_true"].to_numpy()),
                                          fig_dir / "joint_pdf.png"))
    if not len(d):
        return
    pit = diag["pit"] if diag is not None else dg.pit_values(post, d, m)
    _try("coverage", lambda: save_figure(pp.plot_coverage(levels, dg.coverage_from_pit(pit, levels), n=len(d)),
                                         fig_dir / "coverage.png"))
    _try("pit", lambda: save_figure(pp.plot_pit(pit), fig_dir / "pit.png"))
    _try("coverage_by_mass", lambda: save_figure(pp.plot_coverage_by_mass(dg.coverage_by_mass(post, d, m, pit=pit)),
                                                 fig_dir / "coverage_by_mass.png"))
    tarp = diag["tarp"] if diag is not None else dg.tarp_test(post, d, m, levels=levels)
    _try("tarp", lambda: save_figure(pp.plot_tarp(tarp["alpha"], tarp["ecp"], n=len(d)), fig_dir / "tarp.png"))
    i = int(np.argmin(np.abs(m - np.median(m)))) if len(m) else None
    if i is not None:
        xi = d[i]
        one = getattr(post, "posterior", post)
        if np.ndim(xi) and not np.isfinite(xi).all():
            one, xi = joint, xi[0]
        xo = xi if getattr(one, "n_cond_", 1) > 1 else float(np.atleast_1d(xi)[0])
        _try("example_posterior", lambda: save_figure(
            pp.plot_single_posterior(one, xo, log_m_true=float(m[i]), label="example evaluation cluster"),
            fig_dir / "example_posterior.png"))


def calibrate_and_summarize(d_test, log_m_test, d_eval, bandwidth: float = 0.20, **options):
    """Calibrate an estimator on (d_test, log_m_test) and summarise ``d_eval`` (d_pred only).

    Non-finite ``d`` values are left out of the fit; non-finite ``d_eval`` get all-NaN summary
    rows flagged ``out_of_range=True`` (as for any model). ``options`` go to
    :func:`clustermass.calibration.fit_calibration` (e.g. ``prior_range``). For estimators run on
    a catalogue, :func:`evaluate` uses :func:`clustermass.inference.posterior_table` instead.

    Returns
    -------
    (DataFrame, JointKDEPosterior)
    """
    from .calibration import CalibrationError, fit_calibration

    opts = {"conditioning": ("d_pred",), "mean_degree": 1, "heteroscedastic": False, **options}
    try:
        cal = fit_calibration(d_test, log_m_test, bandwidth=bandwidth, **opts)
    except CalibrationError as exc:
        raise ClustermassError(str(exc)) from exc
    summary = cal.summarize(np.asarray(d_eval, float))
    return summary[list(SUMMARY_COLUMNS) + ["out_of_range"]], cal.posterior


def evaluate(
    bundles: dict,
    catalogue,
    out_dir,
    primary: str = "cnn3d",
    baselines: bool = True,
    split: str = "eval",
    progress: bool = True,
    calibration_split: str = "test",
    calibration_bandwidth: float | None = None,
    figures: bool = True,
    richness_method: str = "ml",
) -> dict:
    """Evaluate model bundles (and the classical baselines) on one split of a catalogue.

    Parameters
    ----------
    bundles : dict
        Name -> ``ModelBundle`` (calibrated: ``.posterior()`` works).
    catalogue : Catalogue
        Holds the evaluated split and, for the baselines, the calibration split.
    out_dir : path
        Output directory: ``posteriors.parquet`` (primary model), ``posteriors_<name>.parquet``
        (others), ``metrics.json``, ``figures/*.png``.
    primary : str
        Model reported at the top level of ``metrics.json`` (falls back to the first bundle,
        or the first baseline, if absent).
    baselines : bool
        Also run the classical estimators (:mod:`clustermass.baselines`), calibrated with a
        joint-KDE posterior on ``calibration_split``.
    split : str
        Split evaluated.
    calibration_bandwidth : float, optional
        Joint-KDE bandwidth for the baselines (default: the primary bundle's, else 0.20).
    figures : bool
        Write ``figures/*.png``.
    richness_method : {"ml", "binned"}
        How eq. 7 is fitted (:func:`fit_richness_scatter`).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    from tqdm.auto import tqdm

    from .catalog import write_parquet
    from .contamination import catalogue_contamination

    out_dir = Path(out_dir)
    rows = catalogue.rows(split)
    if len(rows) == 0:
        raise ClustermassError(f"the catalogue has no clusters in split {split!r}")
    results: dict[str, pd.DataFrame] = {}
    posteriors: dict = {}
    from .calibration import (
        CalibrationError,
        cluster_conditions,
        fit_calibration,
        validate_conditioning,
    )
    from .inference import posterior_table

    keep = [*SUMMARY_COLUMNS, "out_of_range", "conditioned_on", "cond_z", "cond_log_n_gal"]
    times: dict[str, float] = {}  # inference time per cluster [ms]: diagram -> posterior
    for name, bundle in tqdm(list(bundles.items()), desc="models", disable=not progress):
        t0 = time.perf_counter()
        table = posterior_table(bundle, catalogue, rows)
        times[name] = 1e3 * (time.perf_counter() - t0) / len(rows)
        results[name] = table[keep].reset_index(drop=True)
        posteriors[name] = bundle.calibrated()
    ref = bundles.get(primary) or (next(iter(bundles.values())) if bundles else None)
    ref_cal = ref.calibrated(required=False) if ref is not None else None
    if calibration_bandwidth is None:
        calibration_bandwidth = ref_cal.bandwidth if ref_cal is not None else 0.30
    notes, failure_notes = [], []
    window = getattr(ref, "window", None)
    if baselines:
        from .baselines import BASELINES, run_baselines
        from .bundle import BaselineBundle
        from .config import CalibrationConfig, WindowConfig

        window = window or WindowConfig()
        dflt = CalibrationConfig()
        conditioning = ref_cal.conditioning if ref_cal else dflt.conditioning
        opts = {"min_neighbours": ref_cal.min_neighbours if ref_cal else dflt.min_neighbours,
                "prior_range": ref_cal.prior_range if ref_cal else None,
                "mean_degree": ref_cal.mean_degree if ref_cal else dflt.mean_degree,
                "heteroscedastic": ref_cal.heteroscedastic if ref_cal else dflt.heteroscedastic}
        cal_rows = catalogue.rows(calibration_split)
        raw = run_baselines(catalogue, np.concatenate([cal_rows, rows]), progress=progress, window=window)
        t_cal = catalogue.clusters["log_m200c"].to_numpy(float)[cal_rows]
        cond_cal = cluster_conditions(catalogue, cal_rows, window)
        for name, why in raw.attrs.get("failures", {}).items():
            if why:  # NaN estimates are calibrated and evaluated as failures; say how many and why
                failure_notes.append(f"baseline {name}: no estimate for {sum(why.values())} of {len(raw)} diagrams ("
                             + "; ".join(f"{k}: {c}" for k, c in sorted(why.items())) + ")")
        for name, col in BASELINES.items():
            v = raw[col].to_numpy(float)
            try:  # the same calibration and table builder as the networks
                chosen = conditioning
                if chosen == "auto":
                    chosen, _ = validate_conditioning(v[: len(cal_rows)], t_cal, cond_cal,
                                                      bandwidth=calibration_bandwidth, **opts)
                cal = fit_calibration(v[: len(cal_rows)], t_cal, cond_cal, bandwidth=calibration_bandwidth,
                                      conditioning=tuple(chosen), **opts)
                t0 = time.perf_counter()
                table = posterior_table(None, catalogue, rows, calibration=cal, d_pred=v[len(cal_rows):],
                                        window=window)
                # the estimator on the evaluated diagrams (its gapper included) + their posteriors
                times[name] = (float(raw[f"time_ms_{name}"].to_numpy()[len(cal_rows):].mean())
                               + 1e3 * (time.perf_counter() - t0) / len(rows))
                results[name], posteriors[name] = table[keep].reset_index(drop=True), cal
                # the calibrated estimator as a bundle, for `infer --model OUT/models/<name>`
                BaselineBundle.write(name, window, cal, out_dir / "models" / name,
                                     training_data=(getattr(ref, "meta", None) or {}).get("training_data"))
            except (ClustermassError, CalibrationError) as exc:
                notes.append(f"baseline {name} skipped: {exc}")
    if not results:
        raise ClustermassError("nothing to evaluate: no bundles and no baselines")
    if primary not in results:
        new = next(iter(results))
        notes.append(f"primary model {primary!r} absent; using {new!r}")
        primary = new
    kde = getattr(ref, "kde", None)
    contam = catalogue_contamination(
        catalogue, rows, getattr(window, "r_max", None), getattr(window, "v_max", None))
    ids = catalogue.clusters["diagram_id"].to_numpy()[rows]
    t = catalogue.clusters["log_m200c"].to_numpy(float)[rows]
    for name, s in results.items():
        table = pd.concat([pd.DataFrame({"diagram_id": ids}), s.reset_index(drop=True)], axis=1)
        table["log_m_true"] = t
        if "out_of_range" in table.columns:
            table["out_of_range"] = table["out_of_range"].astype(bool)
        fname = "posteriors.parquet" if name == primary else f"posteriors_{name}.parquet"
        write_parquet(table, out_dir / fname, {"model": name, "split": split})
    if contam is not None:
        write_parquet(contam, out_dir / "contamination.parquet", {"split": split})
    metrics = evaluate_predictions(
        catalogue, rows, results, out_dir=None, primary=primary, posteriors=posteriors,
        contamination=contam, figures=False, split=split, richness_method=richness_method,
    )
    for name, ms in times.items():
        if name in metrics["models"]:
            metrics["models"][name]["time_per_cluster_ms"] = ms
    if primary in times:
        metrics["time_per_cluster_ms"] = times[primary]
    metrics["notes"] = notes + failure_notes
    if figures:
        metrics["figures"] = _make_figures(
            catalogue, rows, results, t, catalogue.clusters["n_mem"].to_numpy(float)[rows], primary,
            contam, out_dir / "figures", window, kde, posteriors, metrics["models"])
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
