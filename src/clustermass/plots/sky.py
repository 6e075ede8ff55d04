"""Real-data figures: comparison with published masses (paper Fig. 9), the mass function
(paper Fig. 10), a cluster's field in projected phase space, and the survey on the sky.

Every function returns a pyplot-free matplotlib Figure; save it with ``clustermass._io.save_figure``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import subplots

MASS_LABEL = r"$\log_{10} M_{200c}\ [h^{-1}\,M_\odot]$"


def plot_contrast_histogram(table: pd.DataFrame, column: str = "contrast", bins: int = 30):
    """Histogram (density) of the normalised contrast with a unit Gaussian (paper Fig. 9 bottom)."""
    c = table[column].to_numpy(dtype=float)
    c = c[np.isfinite(c)]
    fig, ax = subplots(figsize=(5.5, 4))
    lim = max(4.0, float(np.percentile(np.abs(c), 99))) if len(c) else 4.0
    ax.hist(np.clip(c, -lim, lim), bins=bins, range=(-lim, lim), density=True, color="C0", alpha=0.6,
            label=f"N = {len(c)}: mean {np.mean(c) if len(c) else np.nan:.2f}, "
                  f"std {np.std(c, ddof=1) if len(c) > 1 else np.nan:.2f}")
    x = np.linspace(-lim, lim, 300)
    ax.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k-", label="unit Gaussian")
    ax.set_xlabel(r"$(\log_{10} M_\mathrm{pred} - \log_{10} M_\mathrm{ref}) / \sigma_\mathrm{pred}$")
    ax.set_ylabel("probability density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mass_comparison(table: pd.DataFrame, pred: str = "log_m_pred", ref: str = "log_m_ref"):
    """Inferred vs published masses with asymmetric 1-sigma error bars (paper Fig. 9 top)."""
    p = table[pred].to_numpy(dtype=float)
    r = table[ref].to_numpy(dtype=float)
    ok = np.isfinite(p) & np.isfinite(r)
    lo = np.clip(p - table["log_m_lo1"].to_numpy(dtype=float), 0, None)
    hi = np.clip(table["log_m_hi1"].to_numpy(dtype=float) - p, 0, None)
    rerr = table["log_m_ref_err"].to_numpy(dtype=float) if "log_m_ref_err" in table else np.full(len(p), np.nan)
    xerr = np.where(np.isfinite(rerr), rerr, 0.0)[ok]
    fig, ax = subplots(figsize=(5, 5))
    ax.errorbar(r[ok], p[ok], yerr=[lo[ok], hi[ok]], xerr=xerr, fmt="o", ms=2.5, lw=0.6,
                alpha=0.6, color="C0", ecolor="0.6")
    if ok.any():
        a, b = min(r[ok].min(), p[ok].min()) - 0.1, max(r[ok].max(), p[ok].max()) + 0.1
        ax.plot([a, b], [a, b], "k--", lw=1)
        ax.set_xlim(a, b)
        ax.set_ylim(a, b)
    ax.set_xlabel("published " + MASS_LABEL)
    ax.set_ylabel("inferred " + MASS_LABEL)
    fig.tight_layout()
    return fig


def plot_mass_function(table: pd.DataFrame, log_m_min: float | None = None, theory: bool = True,
                       theory_label: str = "Tinker et al. 2008 (Planck 2018)"):
    """Estimated mass function with its bootstrap band and the theory (paper Fig. 10)."""
    fig, ax = subplots(figsize=(5.5, 4.2))
    m = table["log_m"].to_numpy(dtype=float)
    if "dn_dlogm_lo" in table:
        ax.fill_between(m, table["dn_dlogm_lo"], table["dn_dlogm_hi"], color="C0", alpha=0.3,
                        label=r"bootstrap 1$\sigma$")
    ax.plot(m, table["dn_dlogm"], "C0-", label="estimate (KDE, weights 1/$\\sigma$)")
    if theory and "dn_dlogm_theory" in table:
        ax.plot(m, table["dn_dlogm_theory"], "k-", label=theory_label)
    if theory and "dn_dlogm_theory_smoothed" in table:
        ax.plot(m, table["dn_dlogm_theory_smoothed"], "k:", label="theory through the same kernel")
    if "dn_dlogm_true" in table:
        ax.plot(m, table["dn_dlogm_true"], "C3--", label="true masses (mock)")
    if log_m_min is not None:
        ax.axvline(log_m_min, color="0.5", lw=0.8, ls="--", label="completeness mass")
    ax.set_yscale("log")
    pos = table["dn_dlogm"].to_numpy(dtype=float)
    pos = pos[pos > 0]
    if len(pos):
        ax.set_ylim(max(pos.min(), pos.max() * 1e-4) * 0.5, pos.max() * 3)
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel(r"$dn / d\log_{10} M\ [h^3\,\mathrm{Mpc}^{-3}\,\mathrm{dex}^{-1}]$")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_cluster_field(points: np.ndarray, r_max: float, v_max: float, title: str = ""):
    """One cluster in its window: sky plane (x east, y north) and R_proj vs v_los."""
    fig, (a1, a2) = subplots(1, 2, figsize=(8, 3.6))
    x, y, v = points[:, 0], points[:, 1], points[:, 2]
    a1.scatter(x, y, c=v, s=8, cmap="coolwarm", vmin=-v_max, vmax=v_max)
    a1.set_xlim(r_max, -r_max)  # east to the left, as on the sky
    a1.set_ylim(-r_max, r_max)
    a1.set_xlabel(r"$x$ (east) [$h^{-1}$ Mpc]")
    a1.set_ylabel(r"$y$ (north) [$h^{-1}$ Mpc]")
    a1.set_aspect("equal")
    a2.scatter(np.hypot(x, y), v, s=8, color="C0")
    a2.set_xlim(0, np.sqrt(2) * r_max)
    a2.set_ylim(-v_max, v_max)
    a2.set_xlabel(r"$R_\mathrm{proj}$ [$h^{-1}$ Mpc]")
    a2.set_ylabel(r"$v_\mathrm{los}$ [km/s]")
    fig.suptitle(title or f"{len(points)} galaxies")
    fig.tight_layout()
    return fig


def plot_sky_map(galaxies: pd.DataFrame, info: pd.DataFrame, max_points: int = 50000, seed: int = 0):
    """Survey galaxies and clusters on the sky; flagged clusters (edge, few galaxies) marked."""
    rng = np.random.default_rng(seed)
    g = galaxies if len(galaxies) <= max_points else galaxies.iloc[rng.choice(len(galaxies), max_points, replace=False)]
    fig, ax = subplots(figsize=(6, 4.5))
    ax.scatter(g["ra"], g["dec"], s=0.3, color="0.6", alpha=0.5, rasterized=True, label="galaxies")
    ok = ~(info["edge"] | info["few_galaxies"])
    ax.scatter(info["ra"][ok], info["dec"][ok], s=14, facecolor="none", edgecolor="C0", label="clusters")
    if info["edge"].any():
        ax.scatter(info["ra"][info["edge"]], info["dec"][info["edge"]], s=18, marker="x", color="C3",
                   label="edge")
    if info["few_galaxies"].any():
        ax.scatter(info["ra"][info["few_galaxies"]], info["dec"][info["few_galaxies"]], s=18, marker="+",
                   color="C1", label="few galaxies")
    ax.invert_xaxis()
    ax.set_xlabel("RA [deg]")
    ax.set_ylabel("Dec [deg]")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig
