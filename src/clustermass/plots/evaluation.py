"""Evaluation figures (the paper's Figs. 1, 2, 5, 6, 7, 8) and a coverage curve.

Every function takes plain arrays/tables, writes one PNG with
:func:`clustermass._io.save_figure` and returns its path. Residual sign:
``eps = log10 M_pred - log10 M_true`` (positive = over-prediction), stated in the labels.
Masses: log10(M200c / h^-1 Msun).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._io import save_figure  # noqa: E402

EPS_LABEL = r"$\epsilon = \log_{10} M_{\rm pred} - \log_{10} M_{\rm true}$ [dex]"
MTRUE_LABEL = r"$\log_{10} M_{\rm 200c,true}\ [h^{-1} M_\odot]$"
SPLIT_COLOURS = {"train": "C0", "test": "C1", "eval": "C2", "none": "C7"}


def _bins(x, width=0.1, min_count=5):
    from ..evaluation import mass_bins

    return mass_bins(x, width, min_count)


def plot_mass_distribution(clusters, path) -> Path:
    """Fig. 1: histogram of log M200c per split (counts per 0.05 dex)."""
    fig, ax = plt.subplots(figsize=(6, 4))
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


def plot_example_diagram(catalogue, row: int, path, window=None, kde=None) -> Path:
    """Fig. 2: one diagram's galaxies (members/interlopers) and slices of its 3D KDE cube."""
    from ..config import KDEConfig, WindowConfig

    window = window or WindowConfig()
    kde = kde or KDEConfig()
    pts = catalogue.points(row)
    s, e = catalogue.offsets[row]
    gal = catalogue.galaxies.iloc[s:e]
    mem = gal["is_member"].to_numpy(bool) if "is_member" in gal else np.ones(len(pts), bool)
    cube = None
    try:
        from ..phasespace import diagram_grid

        cube = np.asarray(diagram_grid(pts, "cnn3d", window, kde))
    except Exception:  # phasespace absent or too few points: scatter panels only
        cube = None
    ncol = 5 if cube is not None else 2
    fig, axes = plt.subplots(1, ncol, figsize=(3.4 * ncol, 3.4))
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
    cl = catalogue.clusters.iloc[row]
    ax.set_title(f"diagram {cl['diagram_id']}: log M = {cl['log_m200c']:.2f}, N = {len(pts)}", fontsize=8)
    if cube is not None:
        n = cube.shape[0]
        ext_xy = [-window.r_max, window.r_max, -window.r_max, window.r_max]
        ext_xv = [-window.r_max, window.r_max, -window.v_max, window.v_max]
        mid = n // 2
        for ax, img, ext, lab, title in (
            (axes[2], cube[:, :, mid].T, ext_xy, (r"$x$", r"$y$"), r"KDE slice $v_{\rm los}=0$"),
            (axes[3], cube[:, mid, :].T, ext_xv, (r"$x$", r"$v_{\rm los}$"), r"KDE slice $y=0$"),
            (axes[4], cube[mid, :, :].T, ext_xv, (r"$y$", r"$v_{\rm los}$"), r"KDE slice $x=0$"),
        ):
            ax.imshow(img, origin="lower", extent=ext, aspect="auto", cmap="magma")
            ax.set_xlabel(lab[0])
            ax.set_ylabel(lab[1])
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(log_m_true, summary, path, label: str = "cnn3d") -> Path:
    """Fig. 5: posterior bands vs truth (top) and binned residuals with 1/2-sigma bands (bottom)."""
    from ..evaluation import binned_statistics

    t = np.asarray(log_m_true, float)
    edges = _bins(t)
    cols = {k: summary[k].to_numpy(float) for k in ("log_m_median", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2")}
    b = {k: binned_statistics(t, v, edges)["mean"].to_numpy() for k, v in cols.items()}
    mid = 0.5 * (edges[1:] + edges[:-1])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    a1.fill_between(mid, b["log_m_lo2"], b["log_m_hi2"], color="C0", alpha=0.2, label=r"2$\sigma$ (mean bound)")
    a1.fill_between(mid, b["log_m_lo1"], b["log_m_hi1"], color="C0", alpha=0.4, label=r"1$\sigma$ (mean bound)")
    a1.plot(mid, b["log_m_median"], "C0-", label="posterior median (bin mean)")
    lims = [edges[0], edges[-1]]
    a1.plot(lims, lims, "k--", lw=1, label="truth")
    a1.set_ylabel(r"$\log_{10} M_{\rm pred}\ [h^{-1} M_\odot]$")
    a1.legend(fontsize=8)
    a1.set_title(f"{label}: posterior vs truth ({len(t)} clusters)")
    eps = cols["log_m_median"] - t
    st = binned_statistics(t, eps, edges)
    a2.fill_between(mid, st["q02"], st["q98"], color="C1", alpha=0.2, label=r"2$\sigma$")
    a2.fill_between(mid, st["q16"], st["q84"], color="C1", alpha=0.4, label=r"1$\sigma$")
    a2.plot(mid, st["mean"], "C1-", label="mean")
    a2.axhline(0, color="k", lw=1, ls="--")
    a2.set_xlabel(MTRUE_LABEL)
    a2.set_ylabel(EPS_LABEL, fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_method_comparison(log_m_true, eps: dict, path) -> Path:
    """Fig. 7: binned mean residual with 1/2-sigma bands for each model/baseline."""
    from ..evaluation import binned_statistics

    t = np.asarray(log_m_true, float)
    edges = _bins(t)
    mid = 0.5 * (edges[1:] + edges[:-1])
    n = len(eps)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), sharey=True, squeeze=False)
    for ax, (name, e) in zip(axes[0], eps.items(), strict=True):
        st = binned_statistics(t, e, edges)
        ax.fill_between(mid, st["q02"], st["q98"], color="C0", alpha=0.2)
        ax.fill_between(mid, st["q16"], st["q84"], color="C0", alpha=0.4)
        ax.plot(mid, st["mean"], "k-")
        ax.axhline(0, color="k", lw=0.8, ls="--")
        e = np.asarray(e, float)
        ok = np.isfinite(e)
        ax.set_title(f"{name}: mean {np.mean(e[ok]):+.3f}, std {np.std(e[ok], ddof=1):.3f}", fontsize=9)
        ax.set_xlabel(MTRUE_LABEL)
    axes[0][0].set_ylabel(EPS_LABEL, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_richness(fits: dict, path, n_bins: int = 8) -> Path:
    """Fig. 8: residual scatter vs N_mem per model, eq.-7 fits, and 3/(sqrt(2N) ln 10).

    ``fits``: name -> ``(n_mem, residuals, fit dict from fit_richness_scatter)``.
    """
    from ..evaluation import richness_sigma, velocity_dispersion_scatter

    fig, ax = plt.subplots(figsize=(6, 4.5))
    all_n = np.concatenate([np.asarray(v[0], float) for v in fits.values()])
    all_n = all_n[np.isfinite(all_n) & (all_n > 0)]
    if len(all_n) == 0:
        all_n = np.array([10.0, 300.0])
    grid = np.geomspace(max(all_n.min(), 1), all_n.max(), 100)
    for k, (name, (n, r, fit)) in enumerate(fits.items()):
        n = np.asarray(n, float)
        r = np.asarray(r, float)
        ok = np.isfinite(n) & np.isfinite(r) & (n > 0)
        if ok.sum() < 10:
            continue
        edges = np.unique(np.quantile(n[ok], np.linspace(0, 1, n_bins + 1)))
        idx = np.clip(np.searchsorted(edges, n[ok], side="right") - 1, 0, len(edges) - 2)
        xs, ys, es = [], [], []
        for b in range(len(edges) - 1):
            sel = r[ok][idx == b]
            if len(sel) < 5:
                continue
            s = np.sqrt(np.mean(sel**2))
            xs.append(np.median(n[ok][idx == b]))
            ys.append(s)
            es.append(s / np.sqrt(2 * (len(sel) - 1)))
        ax.errorbar(xs, ys, es, fmt="o", color=f"C{k}", ms=4)
        if np.isfinite(fit.get("sigma_N", np.nan)):
            ax.plot(grid, richness_sigma(grid, fit["sigma_N"], fit["sigma_0"]), f"C{k}-",
                    label=rf"{name}: $\sigma_N$={fit['sigma_N']:.3f}, $\sigma_0$={fit['sigma_0']:.3f}")
    ax.plot(grid, velocity_dispersion_scatter(grid), "k--", label=r"$3/(\sqrt{2N}\ln 10)$ ($\sigma_v$ only)")
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
    marker size ~ 1 / phase-space distance of the closest interloper cluster."""
    from matplotlib.colors import LogNorm

    t = np.asarray(log_m_true, float)
    e = np.asarray(eps, float)
    c = np.asarray(contamination, float)
    d = np.asarray(d_min, float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
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


