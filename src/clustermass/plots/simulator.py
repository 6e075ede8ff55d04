"""Simulator check figures: sigma-M with Evrard et al. (2008), interloper fraction, richness,
the mass distribution per split (paper Fig. 1) and example diagrams.

Every function takes a mock :class:`clustermass.catalog.Catalogue` and returns a matplotlib
Figure (pyplot-free); save it with ``clustermass._io.save_figure``.
"""

from __future__ import annotations

import numpy as np

from ..baselines import evrard_sigma  # (also P.evrard_sigma for scripts/simulator_checks.py)
from . import subplots

MASS_LABEL = r"$\log_{10} M_{200c}\ [h^{-1}\,M_\odot]$"


def member_dispersion(cat, min_members: int = 10):
    """Per diagram (log M200c, redshift, std of satellite-member v_los [km/s]) with >= min_members."""
    g = cat.galaxies
    sel = g["is_member"].to_numpy().copy()
    if "is_central" in g:
        sel &= ~g["is_central"].to_numpy()
    s = g[sel].groupby("diagram_id")["v_los"].agg(["std", "size"])
    s = s[s["size"] >= min_members]
    cl = cat.clusters.set_index("diagram_id").loc[s.index]
    return cl["log_m200c"].to_numpy(), cl["redshift"].to_numpy(), s["std"].to_numpy()


def _binned(x, y, edges, stat=np.median):
    idx = np.digitize(x, edges) - 1
    mid, val, lo, hi = [], [], [], []
    for k in range(len(edges) - 1):
        v = y[idx == k]
        v = v[np.isfinite(v)]
        if v.size < 3:
            continue
        mid.append(0.5 * (edges[k] + edges[k + 1]))
        val.append(stat(v))
        lo.append(np.percentile(v, 16))
        hi.append(np.percentile(v, 84))
    return tuple(np.array(a) for a in (mid, val, lo, hi))


def plot_sigma_mass(cat, label: str = "members", extra=None):
    """Member line-of-sight dispersion vs mass, binned medians, power-law fit and Evrard line.

    ``extra``: optional (catalogue, label) drawn as a second binned curve.
    """
    fig, ax = subplots(figsize=(5.5, 4.2))
    lm, z, s = member_dispersion(cat)
    ax.scatter(lm, s, s=3, alpha=0.25, color="C0", rasterized=True)
    edges = np.arange(13.7, 15.31, 0.1)
    mid, med, lo, hi = _binned(lm, s, edges)
    slope, icpt = np.polyfit(lm - 15.0, np.log10(s), 1)
    ax.errorbar(
        mid,
        med,
        yerr=[med - lo, hi - med],
        fmt="o",
        color="C0",
        label=f"{label}: slope {slope:.3f}, $\\sigma(10^{{15}})$ = {10**icpt:.0f} km/s",
    )
    if extra is not None:
        lm2, _, s2 = member_dispersion(extra[0])
        m2, med2, _, _ = _binned(lm2, s2, edges)
        sl2, ic2 = np.polyfit(lm2 - 15.0, np.log10(s2), 1)
        ax.plot(
            m2, med2, "s--", color="C1", label=f"{extra[1]}: slope {sl2:.3f}, {10**ic2:.0f} km/s"
        )
    x = np.linspace(13.6, 15.3, 50)
    ax.plot(x, evrard_sigma(x, np.median(z)), "k-", label="Evrard et al. 2008 (slope 0.336)")
    ax.set_yscale("log")
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel(r"$\sigma_\mathrm{los}$ of members [km/s]")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_interlopers(cat):
    """Interloper (non-member) fraction inside the window and rate of interloper clusters vs mass."""
    cl = cat.clusters
    lm = cl["log_m200c"].to_numpy()
    edges = np.arange(13.7, 15.31, 0.1)
    idx = np.digitize(lm, edges) - 1
    mid, fg, fic = [], [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() < 5:
            continue
        mid.append(0.5 * (edges[k] + edges[k + 1]))
        fg.append(1 - cl["n_mem"][sel].sum() / max(cl["n_gal"][sel].sum(), 1))
        fic.append(
            cl["has_interloper_cluster"][sel].mean() if "has_interloper_cluster" in cl else np.nan
        )
    _, med, lo, hi = _binned(lm, cl["interloper_fraction"].to_numpy(), edges)
    fig, axes = subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.plot(mid, fg, "o-", label="all galaxies in the bin")
    ax.fill_between(
        _binned(lm, cl["interloper_fraction"].to_numpy(), edges)[0],
        lo,
        hi,
        alpha=0.2,
        color="C1",
        label="per diagram, 16-84%",
    )
    ax.plot(
        _binned(lm, cl["interloper_fraction"].to_numpy(), edges)[0],
        med,
        "s--",
        color="C1",
        label="per diagram, median",
    )
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel("interloper fraction inside the window")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(mid, np.array(fic) * 100, "o-", color="C3")
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel("diagrams with an interloper cluster [%]")
    ax.set_title(
        "more massive halo with $R_\\mathrm{proj}<r_\\mathrm{max}$, $|v|<v_\\mathrm{max}$",
        fontsize=8,
    )
    return fig


def plot_richness(cat):
    """Median (16-84%) number of galaxies and of true members per diagram vs mass."""
    cl = cat.clusters
    lm = cl["log_m200c"].to_numpy()
    edges = np.arange(13.7, 15.31, 0.1)
    fig, ax = subplots(figsize=(5.5, 4.2))
    for col, c, lab in (
        ("n_gal", "C0", r"$N_\mathrm{gal}$ (window)"),
        ("n_mem", "C2", r"$N_\mathrm{mem}$"),
    ):
        mid, med, lo, hi = _binned(lm, cl[col].to_numpy(float), edges)
        ax.plot(mid, med, "o-", color=c, label=lab)
        ax.fill_between(mid, lo, hi, color=c, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel("galaxies per diagram")
    ax.legend(fontsize=8)
    return fig


def plot_mass_distribution(cat):
    """Diagrams per 0.05 dex of log mass for each split (paper Fig. 1)."""
    cl = cat.clusters
    edges = np.arange(13.7, 15.25, 0.05)
    fig, ax = subplots(figsize=(5.5, 4.2))
    for split in ("train", "test", "eval"):
        sel = cl["split"] == split
        ax.hist(
            cl["log_m200c"][sel],
            bins=edges,
            histtype="step",
            lw=1.5,
            label=f"{split} ({sel.sum()})",
        )
    ax.set_xlabel(MASS_LABEL)
    ax.set_ylabel("diagrams per 0.05 dex")
    ax.legend(fontsize=8)
    return fig


def plot_example_diagrams(cat, rows, r_max: float = 1.6, v_max: float = 2200.0):
    """Sky plane (x, y) and (R_proj, v_los) of a few diagrams: members, the cluster's own
    galaxies outside R200c, and galaxies of other halos."""
    rows = list(rows)
    fig, axes = subplots(2, len(rows), figsize=(3.2 * len(rows), 6.2), squeeze=False)
    for j, r in enumerate(rows):
        s, e = cat.offsets[r]
        g = cat.galaxies.iloc[s:e]
        mem = g["is_member"].to_numpy()
        cl = cat.clusters.iloc[r]
        own = g["host_halo_id"].to_numpy() == cl["halo_id"]
        groups = [(mem, "C0", "o", "members (r < R200c)"),
                  (own & ~mem, "C1", "^", "cluster outskirts (backsplash, infall)"),
                  (~own, "C3", "x", "other halos")]
        for a, (xx, yy) in zip(
            axes[:, j],
            ((g["x_proj"], g["y_proj"]), (np.hypot(g["x_proj"], g["y_proj"]), g["v_los"])),
            strict=True,
        ):
            for sel, color, marker, label in groups:
                a.scatter(np.asarray(xx)[sel], np.asarray(yy)[sel], s=6, color=color, marker=marker,
                          label=label)
        axes[0, j].set_xlim(-r_max, r_max)
        axes[0, j].set_ylim(-r_max, r_max)
        axes[0, j].set_aspect("equal")
        axes[0, j].set_title(
            f"log M = {cl['log_m200c']:.2f}, z = {cl['redshift']:.3f}\n"
            f"N_gal = {cl['n_gal']}, N_mem = {cl['n_mem']}",
            fontsize=8,
        )
        axes[0, j].set_xlabel(r"$x_\mathrm{proj}$ [$h^{-1}$ Mpc]", fontsize=8)
        axes[1, j].set_xlim(0, r_max * np.sqrt(2))
        axes[1, j].set_ylim(-v_max, v_max)
        axes[1, j].set_xlabel(r"$R_\mathrm{proj}$ [$h^{-1}$ Mpc]", fontsize=8)
        axes[1, j].axvline(cl["r200c"], color="k", lw=0.8, ls=":")
    axes[0, 0].set_ylabel(r"$y_\mathrm{proj}$ [$h^{-1}$ Mpc]")
    axes[1, 0].set_ylabel(r"$v_\mathrm{los}$ [km/s]")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig
