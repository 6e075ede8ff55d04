"""Posterior and calibration figures: the joint PDF (paper Fig. 4), single-cluster posteriors,
coverage curve, PIT histogram, coverage per mass bin and the TARP curve.

Every function takes arrays (or a fitted :class:`clustermass.posterior.JointKDEPosterior`) and
returns a :class:`matplotlib.figure.Figure` built without pyplot state (backend independent);
save it with :func:`clustermass._io.save_figure`. Masses: log10(M200c / h^-1 Msun).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "plot_coverage",
    "plot_coverage_by_mass",
    "plot_joint_pdf",
    "plot_pit",
    "plot_single_posterior",
    "plot_tarp",
]

M_LABEL = r"$\log_{10} M_{\rm 200c}\ [h^{-1} M_\odot]$"
D_LABEL = r"network prediction $\tilde d$ [$\log_{10} h^{-1} M_\odot$]"


def _axes(figsize=(5.0, 4.2)):
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot(1, 1, 1)


def plot_joint_pdf(posterior, d_pred=None, log_m_true=None, n_grid: int = 120, max_points: int = 5000, seed: int = 0) -> Figure:
    """Paper Fig. 4: joint KDE density of (d_pred, log M) with the calibration pairs.

    Parameters
    ----------
    posterior : fitted JointKDEPosterior
    d_pred, log_m_true : array_like, optional
        Points to overplot; default the calibration pairs.
    n_grid : int
        Grid points per axis of the density image.
    max_points : int
        At most this many points are drawn (random subset, ``seed``).

    Returns
    -------
    Figure
    """
    d = posterior.d_ if d_pred is None else np.asarray(d_pred, float)
    m = posterior.log_m_ if log_m_true is None else np.asarray(log_m_true, float)
    pad_d, pad_m = 3 * posterior.sigma_d_, 3 * posterior.sigma_u_
    lo = min(d.min() - pad_d, m.min() - pad_m)
    hi = max(d.max() + pad_d, m.max() + pad_m)
    dg = np.linspace(lo, hi, n_grid)
    mg = np.linspace(lo, hi, n_grid)
    dens = posterior.joint_pdf(dg, mg)
    fig, ax = _axes((5.4, 4.6))
    im = ax.pcolormesh(dg, mg, dens.T, shading="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label=r"$\mathcal{P}(\tilde d, M)$ [dex$^{-2}$]")
    if d.size > max_points:
        pick = np.random.default_rng(seed).choice(d.size, max_points, replace=False)
        d, m = d[pick], m[pick]
    ax.scatter(d, m, s=1.5, c="w", alpha=0.35, lw=0, label="calibration pairs")
    ax.plot([lo, hi], [lo, hi], "--", c="0.8", lw=1, label="$\\tilde d = M$")
    for i, (a, b) in enumerate(posterior.valid_intervals_):
        ax.axvline(a, c="C3", lw=0.8, ls=":", label="covered range of $\\tilde d$" if i == 0 else None)
        ax.axvline(b, c="C3", lw=0.8, ls=":")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(D_LABEL)
    ax.set_ylabel(M_LABEL)
    ax.set_title(f"Joint KDE (bandwidth {posterior.bandwidth:g}, {posterior.n_pairs_} pairs)")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.6)
    return fig


def plot_single_posterior(posterior, d_obs, log_m_true: float | None = None, n_grid: int = 600, label: str | None = None) -> Figure:
    """Posterior of one cluster: PDF, MAP, 1- and 2-sigma limits shaded, truth if known.

    Parameters
    ----------
    posterior : fitted JointKDEPosterior
    d_obs : float or array_like (k,)
        The cluster's network prediction (with its other conditioning values when the
        posterior conditions on k > 1 variables: ``d_pred, z, log_n_gal``).
    log_m_true : float, optional
        True mass, drawn as a vertical line.
    n_grid : int
        PDF grid points.
    label : str, optional
        Title (default: the prediction).

    Returns
    -------
    Figure
    """
    row = posterior.summarize([d_obs], method="exact").iloc[0]
    width = row.log_m_hi2 - row.log_m_lo2
    grid = np.linspace(row.log_m_lo2 - 0.6 * width, row.log_m_hi2 + 0.6 * width, n_grid)
    pdf = posterior.pdf([d_obs], grid)[0]
    fig, ax = _axes()
    ax.plot(grid, pdf, c="k", lw=1.5, label="posterior")
    s2 = (grid >= row.log_m_lo2) & (grid <= row.log_m_hi2)
    s1 = (grid >= row.log_m_lo1) & (grid <= row.log_m_hi1)
    ax.fill_between(grid, 0, pdf, where=s2, color="C0", alpha=0.25, lw=0, label=r"2$\sigma$ (95.45%)")
    ax.fill_between(grid, 0, pdf, where=s1, color="C0", alpha=0.45, lw=0, label=r"1$\sigma$ (68.26%)")
    ax.axvline(row.log_m_map, c="C3", lw=1.2, label=f"MAP {row.log_m_map:.3f}")
    ax.axvline(row.log_m_median, c="C1", lw=1, ls="--", label=f"median {row.log_m_median:.3f}")
    if log_m_true is not None and np.isfinite(log_m_true):
        ax.axvline(log_m_true, c="C2", lw=1.2, ls=":", label=f"true {log_m_true:.3f}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(M_LABEL)
    ax.set_ylabel("posterior density [dex$^{-1}$]")
    flag = " (out of range: edge posterior)" if row.out_of_range else ""
    d0 = float(np.atleast_1d(np.asarray(d_obs, dtype=float))[0])
    ax.set_title(label or f"$\\tilde d$ = {d0:.3f}: "
                 f"${row.log_m_map:.2f}^{{+{row.log_m_hi1 - row.log_m_map:.2f}}}_{{-{row.log_m_map - row.log_m_lo1:.2f}}}$" + flag)
    ax.legend(fontsize=8)
    return fig


def plot_coverage(levels, coverage, n: int | None = None, label: str = "posterior") -> Figure:
    """Coverage of central credible intervals against their credibility, with the diagonal.

    Parameters
    ----------
    levels, coverage : array_like
        From :func:`clustermass.diagnostics.coverage_curve`.
    n : int, optional
        Number of clusters: draws the binomial 2-sigma band around the diagonal.
    label : str
        Legend label.

    Returns
    -------
    Figure
    """
    lv = np.asarray(levels, float)
    cov = np.asarray(coverage, float)
    fig, ax = _axes((4.6, 4.4))
    if n:
        band = 2 * np.sqrt(lv * (1 - lv) / n)
        ax.fill_between(lv, lv - band, lv + band, color="0.85", label=r"ideal $\pm 2\sigma$ (binomial)")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.plot(lv, cov, c="C0", lw=1.8, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("credibility of the central interval")
    ax.set_ylabel("fraction of true masses inside")
    ax.set_title("Coverage")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_pit(pit, bins: int = 20) -> Figure:
    """Histogram of PIT values (posterior CDF at the truth) with the uniform expectation.

    Parameters
    ----------
    pit : array_like
        From :func:`clustermass.diagnostics.pit_values`.
    bins : int

    Returns
    -------
    Figure
    """
    pit = np.asarray(pit, float)
    fig, ax = _axes()
    ax.hist(pit, bins=bins, range=(0, 1), density=True, histtype="stepfilled", color="C0", alpha=0.6, label="PIT")
    p = 1.0 / bins
    err = np.sqrt(p * (1 - p) / max(pit.size, 1)) / p
    ax.axhspan(1 - 2 * err, 1 + 2 * err, color="0.8", alpha=0.6, zorder=0, label=r"uniform $\pm 2\sigma$")
    ax.axhline(1, c="k", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT = posterior CDF at the true mass")
    ax.set_ylabel("density")
    ax.set_title(f"PIT histogram ({pit.size} clusters)")
    ax.legend(fontsize=8)
    return fig


def plot_coverage_by_mass(table) -> Figure:
    """Coverage per true-mass bin for each level, with binomial errors and nominal lines.

    Parameters
    ----------
    table : DataFrame
        From :func:`clustermass.diagnostics.coverage_by_mass`.

    Returns
    -------
    Figure
    """
    fig, ax = _axes((5.4, 4.0))
    cols = [c for c in table.columns if c.startswith("coverage_")]
    for i, col in enumerate(cols):
        key = col[len("coverage_"):]
        nominal = float(key.replace("p", ".")) / 100.0
        ax.errorbar(table["log_m_mid"], table[col], yerr=table[f"error_{key}"], fmt="o-", c=f"C{i}", ms=4,
                    capsize=2, label=f"{100 * nominal:g}% interval")
        ax.axhline(nominal, c=f"C{i}", ls="--", lw=1)
    ax.set_xlabel(r"true " + M_LABEL)
    ax.set_ylabel("coverage")
    ax.set_ylim(0, 1.02)
    ax.set_title("Coverage per mass bin")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_tarp(alpha, ecp, n: int | None = None) -> Figure:
    """TARP expected coverage against credibility level, with the diagonal.

    Parameters
    ----------
    alpha, ecp : array_like
        From :func:`clustermass.diagnostics.tarp_test`.
    n : int, optional
        Number of clusters: draws the binomial 2-sigma band.

    Returns
    -------
    Figure
    """
    fig = plot_coverage(alpha, ecp, n=n, label="TARP")
    ax = fig.axes[0]
    ax.set_xlabel(r"credibility level $1-\alpha$")
    ax.set_ylabel("expected coverage")
    ax.set_title("TARP expected-coverage test")
    return fig
