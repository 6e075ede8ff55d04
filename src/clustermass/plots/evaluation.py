"""Evaluation figures (the paper's Figs. 1, 2, 5, 6, 7, 8).

Every function draws the arrays/tables it is given (binned statistics, fits and KDE cubes are
computed by :mod:`clustermass.evaluation`, which calls these), writes one PNG with
:func:`clustermass._io.save_figure` and returns its path. Residual sign:
``eps = log10 M_pred - log10 M_true`` (positive = over-prediction), stated in the labels.
Masses: log10(M200c / h^-1 Msun).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.ticker
import numpy as np

from .._io import save_figure
from . import subplots

EPS_LABEL = r"$\epsilon = \log_{10} M_{\rm pred} - \log_{10} M_{\rm true}$ [dex]"
MTRUE_LABEL = r"$\log_{10} M_{\rm 200c,true}\ [h^{-1} M_\odot]$"
SPLIT_COLOURS = {"train": "C0", "test": "C1", "eval": "C2", "none": "C7"}


def plot_mass_distribution(clusters, path) -> Path:
    """Fig. 1: histogram of log M200c per split (counts per 0.05 dex).

    Parameters
    ----------
    clusters : the catalogue's clusters table (``log_m200c`` [log10 h^-1 Msun], ``split``).
    path : output PNG.
    """
    fig, ax = subplots(figsize=(6, 4))
    m = clusters["log_m200c"].to_numpy(float)
    fin = np.isfinite(m)
    edges = np.arange(np.floor(m[fin].min() * 20) / 20, np.ceil(m[fin].max() * 20) / 20 + 0.05, 0.05) if fin.any() else 10
    groups = dict(tuple(clusters[fin].groupby("split", sort=False)))
    for split in sorted(groups, key=lambda s: (list(SPLIT_COLOURS).index(s) if s in SPLIT_COLOURS else 9, s)):
        grp = groups[split]
        ax.hist(grp["log_m200c"], bins=edges, histtype="step", lw=1.5, label=f"{split} ({len(grp)})",
                color=SPLIT_COLOURS.get(split))
    ax.set_xlabel(MTRUE_LABEL)
    ax.set_ylabel("diagrams per 0.05 dex")
    ax.legend()
    ax.set_title("Mass distribution of the splits")
    return save_figure(fig, path)


def plot_example_diagram(points, is_member, path, *, cube=None, r_max: float = 1.6, v_max: float = 2200.0,
                         title: str = "") -> Path:
    """Fig. 2: one diagram's galaxies (members/interlopers) and slices of its 3D KDE cube.

    Parameters
    ----------
    points : (N, 3) x_proj, y_proj [h^-1 Mpc], v_los [km/s].
    is_member : (N,) bool, True for members.
    path : output PNG.
    cube : optional (n, n, n) KDE cube over [-r_max, r_max]^2 x [-v_max, v_max] (three slices
        through its centre are drawn); scatter panels only when None.
    r_max, v_max : the window [h^-1 Mpc, km/s].
    title : title of the projected phase-space panel.
    """
    pts = np.asarray(points, float)
    mem = np.asarray(is_member, bool)
    ncol = 5 if cube is not None else 2
    fig, axes = subplots(1, ncol, figsize=(3.4 * ncol, 3.4))
    ax = axes[0]
    ax.scatter(pts[~mem, 0], pts[~mem, 1], s=6, c="C3", label="interlopers")
    ax.scatter(pts[mem, 0], pts[mem, 1], s=6, c="C0", label="members")
    ax.set_xlabel(r"$x_{\rm proj}\ [h^{-1}$ Mpc]")
    ax.set_ylabel(r"$y_{\rm proj}\ [h^{-1}$ Mpc]")
    ax.legend(fontsize=7)
    ax = axes[1]
    r = np.hypot(pts[:, 0], pts[:, 1])
    ax.scatter(r[~mem], pts[~mem, 2], s=6, c="C3")
    ax.scatter(r[mem], pts[mem, 2], s=6, c="C0")
    ax.set_xlabel(r"$R_{\rm proj}\ [h^{-1}$ Mpc]")
    ax.set_ylabel(r"$v_{\rm los}$ [km/s]")
    ax.set_title(title, fontsize=8)
    if cube is not None:
        n = cube.shape[0]
        ext_xy = [-r_max, r_max, -r_max, r_max]
        ext_xv = [-r_max, r_max, -v_max, v_max]
        mid = n // 2
        for ax, img, ext, lab, ttl in (
            (axes[2], cube[:, :, mid].T, ext_xy, (r"$x$", r"$y$"), r"KDE slice $v_{\rm los}=0$"),
            (axes[3], cube[:, mid, :].T, ext_xv, (r"$x$", r"$v_{\rm los}$"), r"KDE slice $y=0$"),
            (axes[4], cube[mid, :, :].T, ext_xv, (r"$y$", r"$v_{\rm los}$"), r"KDE slice $x=0$"),
        ):
            ax.imshow(img, origin="lower", extent=ext, aspect="auto", cmap="magma")
            ax.set_xlabel(lab[0])
            ax.set_ylabel(lab[1])
            ax.set_title(ttl, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(edges, bands: dict, residual_stats, path, label: str = "cnn3d", n_clusters: int | None = None) -> Path:
    """Fig. 5: posterior bands vs truth (top) and binned residuals with 1/2-sigma bands (bottom).

    Parameters
    ----------
    edges : bin edges in log10(M200c,true / h^-1 Msun).
    bands : per-bin mean of ``log_m_median, log_m_lo1, log_m_hi1, log_m_lo2, log_m_hi2`` [log10 h^-1 Msun].
    residual_stats : :func:`clustermass.evaluation.binned_statistics` of eps [dex] in ``edges``.
    path : output PNG.
    label : model name; n_clusters : number of clusters (title).
    """
    edges = np.asarray(edges, float)
    b = {k: np.asarray(v, float) for k, v in bands.items()}
    st = residual_stats
    mid = 0.5 * (edges[1:] + edges[:-1])
    fig, (a1, a2) = subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    a1.fill_between(mid, b["log_m_lo2"], b["log_m_hi2"], color="C0", alpha=0.2, label=r"2$\sigma$ (mean bound)")
    a1.fill_between(mid, b["log_m_lo1"], b["log_m_hi1"], color="C0", alpha=0.4, label=r"1$\sigma$ (mean bound)")
    a1.plot(mid, b["log_m_median"], "C0-", label="posterior median (bin mean)")
    lims = [edges[0], edges[-1]]
    a1.plot(lims, lims, "k--", lw=1, label="truth")
    a1.set_ylabel(r"$\log_{10} M_{\rm pred}\ [h^{-1} M_\odot]$")
    a1.legend(fontsize=8)
    a1.set_title(f"{label}: posterior vs truth ({n_clusters} clusters)")
    a2.fill_between(mid, st["q02"], st["q98"], color="C1", alpha=0.2, label=r"2$\sigma$")
    a2.fill_between(mid, st["q16"], st["q84"], color="C1", alpha=0.4, label=r"1$\sigma$")
    a2.plot(mid, st["mean"], "C1-", label="mean")
    a2.axhline(0, color="k", lw=1, ls="--")
    a2.set_xlabel(MTRUE_LABEL)
    a2.set_ylabel(EPS_LABEL, fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_method_comparison(edges, stats: dict, eps_summary: dict, path) -> Path:
    """Fig. 7: binned mean residual with 1/2-sigma bands for each model/baseline.

    Parameters
    ----------
    edges : bin edges in log10(M200c,true / h^-1 Msun).
    stats : name -> :func:`clustermass.evaluation.binned_statistics` of its eps [dex].
    eps_summary : name -> (mean, std) of its finite eps [dex] (panel titles).
    path : output PNG.
    """
    edges = np.asarray(edges, float)
    mid = 0.5 * (edges[1:] + edges[:-1])
    n = len(stats)
    fig, axes = subplots(1, n, figsize=(3.6 * n, 3.6), sharey=True, squeeze=False)
    for ax, (name, st) in zip(axes[0], stats.items(), strict=True):
        ax.fill_between(mid, st["q02"], st["q98"], color="C0", alpha=0.2)
        ax.fill_between(mid, st["q16"], st["q84"], color="C0", alpha=0.4)
        ax.plot(mid, st["mean"], "k-")
        ax.axhline(0, color="k", lw=0.8, ls="--")
        mean, std = eps_summary[name]
        ax.set_title(f"{name}: mean {mean:+.3f}, std {std:.3f}", fontsize=9)
        ax.set_xlabel(MTRUE_LABEL)
    axes[0][0].set_ylabel(EPS_LABEL, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_richness(binned: dict, curves: dict, reference, path) -> Path:
    """Fig. 8: residual scatter vs N_mem per model, eq.-7 fits, and 3/(sqrt(2N) ln 10).

    Parameters
    ----------
    binned : name -> ``(n_mem, rms, rms_err)`` per richness bin (points with error bars) [-, dex,
        dex], or None for a model with too few clusters (not drawn; it keeps its colour slot).
    curves : name -> ``(n_grid, sigma, label)``, the eq.-7 fit on a grid of N_mem (omitted when
        there is no finite fit).
    reference : ``(n_grid, sigma)``, the velocity-dispersion-only scatter [dex].
    path : output PNG.

    A model's colour is its position in ``binned``.
    """
    fig, ax = subplots(figsize=(6, 4.5))
    for k, (name, points) in enumerate(binned.items()):
        if points is None:
            continue
        xs, ys, es = points
        ax.errorbar(xs, ys, es, fmt="o", color=f"C{k}", ms=4)
        if name in curves:
            grid, sigma, lab = curves[name]
            ax.plot(grid, sigma, f"C{k}-", label=lab)
    ax.plot(reference[0], reference[1], "k--", label=r"$3/(\sqrt{2N}\ln 10)$ ($\sigma_v$ only)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(r"$N_{\rm mem}$")
    ax.set_ylabel("scatter about the power law [dex]")
    ax.legend(fontsize=7)
    ax.set_title(r"Richness dependence: $\sigma^2=\sigma_N^2 (N_{\rm mem}/100)^{-1}+\sigma_0^2$", fontsize=9)
    return save_figure(fig, path)


def plot_contamination(log_m_true, eps, contamination, d_min, path, label: str = "cnn3d") -> Path:
    """Fig. 6: residual vs true mass coloured by interloper-cluster contamination (mass ratio),
    marker size ~ 1 / phase-space distance of the closest interloper cluster.

    Parameters
    ----------
    log_m_true : (N,) log10 M200c,true [h^-1 Msun].
    eps : (N,) residuals [dex].
    contamination : (N,) summed interloper-cluster mass / cluster mass (0 = clean).
    d_min : (N,) phase-space distance of the closest interloper cluster (eq. 6, dimensionless).
    path : output PNG; label : model name (title).
    """
    from matplotlib.colors import LogNorm

    t = np.asarray(log_m_true, float)
    e = np.asarray(eps, float)
    c = np.asarray(contamination, float)
    d = np.asarray(d_min, float)
    fig, ax = subplots(figsize=(6.5, 4.5))
    clean = np.isfinite(e) & ~(c > 0)
    dirty = np.isfinite(e) & (c > 0)
    ax.scatter(t[clean], e[clean], s=3, c="0.75", label=f"no interloper cluster ({clean.sum()})")
    if dirty.any():
        size = 8 + 40 / np.clip(d[dirty], 0.25, None)
        order = np.argsort(c[dirty])
        sc = ax.scatter(t[dirty][order], e[dirty][order], s=size[order], c=c[dirty][order], cmap="viridis",
                        norm=LogNorm(vmin=max(c[dirty].min(), 1e-2), vmax=max(c[dirty].max(), 1.01)),
                        edgecolors="k", linewidths=0.2, label=f"contaminated ({dirty.sum()})")
        fig.colorbar(sc, ax=ax, label=r"contamination $\sum M_{\rm int}/M_{\rm cl}$")
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(MTRUE_LABEL)
    ax.set_ylabel(EPS_LABEL, fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"{label}: interloper clusters (size ~ 1/d, eq. 6)", fontsize=9)
    return save_figure(fig, path)




def plot_group_calibration(groups, path, label: str = "cnn3d") -> Path:
    """Calibration per group (:func:`clustermass.diagnostics.group_calibration`): 68%/95% coverage
    and P(true < median) with bootstrap errors, per tercile of redshift, n_gal and network output
    and per bin of true mass; nominal values dashed.

    Parameters
    ----------
    groups : DataFrame
        ``group, bin, lo, hi, n, coverage_68(_err), coverage_95(_err), p_below_median(_err)``.
    path : path of the PNG.
    label : model name for the title.
    """
    nominal_68, nominal_95 = 0.8413 - 0.1587, 0.97725 - 0.02275  # the posterior table's intervals
    names = list(dict.fromkeys(groups["group"]))
    fig, axes = subplots(1, 3, figsize=(13, 4.0))
    for ax, (col, nominal, title) in zip(axes, (("coverage_68", nominal_68, "68% coverage"),
                                                ("coverage_95", nominal_95, "95% coverage"),
                                                ("p_below_median", 0.5, "P(true < median)")), strict=True):
        x0 = 0
        ticks, labels = [], []
        for j, name in enumerate(names):
            g = groups[groups["group"] == name]
            xs = x0 + np.arange(len(g))
            ax.errorbar(xs, g[col], yerr=g.get(f"{col}_err"), fmt="o", color=f"C{j}", ms=4, capsize=2,
                        label=name)
            ticks += list(xs)
            labels += [f"{name}\n{lo:.3g}-{hi:.3g}" if name == "log_m_true" else f"{name} {b + 1}/{len(g)}"
                       for b, lo, hi in zip(g["bin"], g["lo"], g["hi"], strict=True)]
            x0 += len(g) + 1
        ax.axhline(nominal, ls="--", c="k", lw=1)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{label}: calibration per tercile and per mass bin (bootstrap 1-sigma errors)")
    fig.tight_layout()
    return save_figure(fig, path)
