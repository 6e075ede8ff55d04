"""Measurements that check a mock catalogue against the sky (issue 12; docs/simulator.md).

Used by ``scripts/simulator_checks.py`` and the tests. Each function takes a mock
:class:`clustermass.catalog.Catalogue` (tables as written by :func:`simulate_catalogue`) and
returns plain numbers.

- :func:`surface_density_ratio`: stacked surface density of all galaxies in two annuli
  (in R_proj / R200c), so a density cliff at R200c shows up as a ratio << 1;
- :func:`truncated_sphere_scatter`: a positions-only mass estimator (flat background + projected
  NFW sphere truncated at a free radius, maximum likelihood; no velocities, no richness) and
  the scatter of log M200c about its power law in the truncation radius;
- :func:`orientation_scatter`: intrinsic rms of ln sigma_los across the sight lines of one halo,
  the sampling noise removed;
- :func:`stacked_profile_3d` / :func:`steepest_slope_radius`: the stacked 3D number density of
  all galaxies around the clusters and the radius of its steepest logarithmic slope (splashback);
- :func:`interloper_table`: interloper fraction and interloper-cluster rate per mass bin;
- :func:`nfw_jeans_diagram`: one isolated NFW halo with Jeans velocities and no interlopers, the
  known-mass test case of the mass estimators (caustic tests and benchmark).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd


def _radius(cat) -> tuple[np.ndarray, np.ndarray]:
    g = cat.galaxies
    cl = cat.clusters.set_index("diagram_id")
    r200 = cl["r200c"].reindex(g["diagram_id"]).to_numpy()
    rp = np.hypot(g["x_proj"].to_numpy(), g["y_proj"].to_numpy())
    return rp, r200


def surface_density_ratio(cat, r_max: float, inner=(0.9, 1.0), outer=(1.0, 1.1)) -> float:
    """Sigma(outer annulus) / Sigma(inner annulus) of all galaxies, stacked in R_proj / R200c
    over the diagrams whose outer annulus lies inside the window (R <= r_max)."""
    rp, r200 = _radius(cat)
    cl = cat.clusters
    ok_d = set(cl["diagram_id"][outer[1] * cl["r200c"] <= r_max])
    ok = cat.galaxies["diagram_id"].isin(ok_d).to_numpy()
    x = rp[ok] / r200[ok]
    n_in = np.count_nonzero((x >= inner[0]) & (x < inner[1]))
    n_out = np.count_nonzero((x >= outer[0]) & (x < outer[1]))
    area_in = inner[1] ** 2 - inner[0] ** 2
    area_out = outer[1] ** 2 - outer[0] ** 2
    return float((n_out / area_out) / max(n_in / area_in, 1e-300))


# ---------------------------------------------------------------- positions-only estimator
#: concentration of the truncated NFW template (r_s = r_t / TEMPLATE_C)
TEMPLATE_C = 4.0


@lru_cache(maxsize=1)
def _projected_template():
    """u = R / r_t grid and the surface density (total 1) of an NFW sphere cut at r_t."""
    u = np.linspace(0.0, 1.0, 801)[1:]
    ell = np.linspace(0.0, 1.0, 400)
    lmax = np.sqrt(np.maximum(1.0 - u**2, 0.0))
    r = np.sqrt(u[:, None] ** 2 + (ell[None, :] * lmax[:, None]) ** 2) * TEMPLATE_C
    rho = 1.0 / (r * (1 + r) ** 2)
    sig = 2.0 * np.trapezoid(rho, ell, axis=1) * lmax
    norm = np.trapezoid(2 * np.pi * u * sig, u)
    return u, sig / norm


def truncated_sphere_fit(cat, r_max: float, grid=None) -> pd.DataFrame:
    """Per diagram maximum-likelihood truncation radius r_t [h^-1 Mpc] of a flat background +
    projected NFW sphere (c = TEMPLATE_C) cut at r_t, from galaxy positions only (the centre
    galaxy excluded). Returns ``diagram_id, log_m200c, r_t, f_bg``."""
    g = cat.galaxies
    if "is_centre" in g:
        g = g[~g["is_centre"].to_numpy()]
    else:
        g = g[~(g["is_central"].to_numpy() & g["is_member"].to_numpy())]
    ids = cat.clusters["diagram_id"].to_numpy()
    row = np.searchsorted(ids, g["diagram_id"].to_numpy())
    nd = ids.size
    rp = np.hypot(g["x_proj"].to_numpy(), g["y_proj"].to_numpy())
    area = (2 * r_max) ** 2
    u_t, s_t = _projected_template()
    grid = np.geomspace(0.15, r_max, 40) if grid is None else grid
    best_ll = np.full(nd, -np.inf)
    best_rt = np.full(nd, np.nan)
    best_f = np.full(nd, np.nan)
    n = np.bincount(row, minlength=nd).astype(float)
    f = np.full(nd, 0.5)
    for rt in grid:
        s = np.interp(rp / rt, u_t, s_t, right=0.0) / rt**2
        f = np.clip(f, 0.02, 0.98)  # warm start from the previous radius
        for _ in range(12):  # Newton on the (concave) log likelihood in the background share f
            p = f[row] / area + (1 - f[row]) * s
            d1 = np.bincount(row, (1 / area - s) / p, minlength=nd)
            d2 = -np.bincount(row, ((1 / area - s) / p) ** 2, minlength=nd)
            f = np.clip(f - d1 / np.where(d2 < 0, d2, -1.0), 1e-4, 1 - 1e-4)
        ll = np.bincount(row, np.log(f[row] / area + (1 - f[row]) * s), minlength=nd)
        better = ll > best_ll
        best_ll[better], best_rt[better], best_f[better] = ll[better], rt, f[better]
    ok = n >= 5
    return pd.DataFrame({"diagram_id": ids[ok], "log_m200c": cat.clusters["log_m200c"].to_numpy()[ok],
                         "r_t": best_rt[ok], "f_bg": best_f[ok]})


def truncated_sphere_scatter(cat, r_max: float) -> dict:
    """Scatter [dex] of the positions-only truncated-sphere mass estimator about its power law
    (larger = the positions carry less mass information).

    ``scatter_dex``: the estimator calibrated as a scaling relation, the power law
    r_t = A M200c^b fitted to the catalogue and inverted, log M_est = (log r_t - log A) / b;
    ``scatter_forward_dex``: the best power-law predictor, log M = a + b log r_t (least squares
    in log M; bounded by the spread of the sample's masses, 0.433 dex for a flat 13.7-15.2).
    """
    fit = truncated_sphere_fit(cat, r_max)
    x, y = np.log10(fit["r_t"].to_numpy()), fit["log_m200c"].to_numpy()
    bf, af = np.polyfit(x, y, 1)
    b, a = np.polyfit(y, x, 1)
    est = (x - a) / b
    return {"scatter_dex": float(np.std(est - y)),
            "scatter_forward_dex": float(np.std(y - (af + bf * x))),
            "sample_std_dex": float(np.std(y)), "slope_rt_vs_m": float(b),
            "n_diagrams": int(len(fit)), "corr": float(np.corrcoef(x, y)[0, 1])}


# ---------------------------------------------------------------- orientation scatter
def orientation_scatter(cat, log_m_range=(14.0, 14.6), min_members: int = 30,
                        min_sightlines: int = 5, seed: int = 0, n_splits: int = 8) -> dict:
    """Intrinsic rms of ln sigma_los across the sight lines of one halo (satellite members).

    ``intrinsic_rms_ln_sigma`` (the issue's measure): the variance of ln sigma over the sight
    lines minus the Gaussian sampling variance 1 / (2 (N - 1)), averaged over halos (it
    over-subtracts where the sight lines of one halo share galaxies, and under-subtracts for
    heavier-than-Gaussian velocity tails). ``split_half_rms`` (cross-check free of both): each
    sight line's members are split at random into two halves A and B; the covariance over the
    sight lines of ln sigma_A and ln sigma_B keeps what the sight line changes and drops the
    sampling noise (the halves share no galaxy), averaged over ``n_splits`` splits and halos.
    """
    g = cat.galaxies
    sel = g["is_member"].to_numpy() & ~g["is_central"].to_numpy()
    if "is_centre" in g:
        sel &= ~g["is_centre"].to_numpy()
    g = g[sel]
    rng = np.random.default_rng(seed)
    v = g["v_los"].to_numpy()
    did = g["diagram_id"].to_numpy()
    s = g.groupby("diagram_id")["v_los"].agg(["std", "size"])
    cl = cat.clusters.set_index("diagram_id").loc[s.index]
    df = pd.DataFrame({"halo": cl["halo_id"].to_numpy(), "lm": cl["log_m200c"].to_numpy(),
                       "ls": np.log(s["std"].to_numpy()), "n": s["size"].to_numpy()})
    for k in range(n_splits):  # random halves, averaged over n_splits splits
        half = rng.random(len(g)) < 0.5
        st = pd.DataFrame({"d": did, "v": v, "h": half}).groupby(["d", "h"])["v"].std().unstack()
        df[f"a{k}"] = np.log(st.reindex(s.index)[False].to_numpy())
        df[f"b{k}"] = np.log(st.reindex(s.index)[True].to_numpy())
    df = df[(df["n"] >= min_members) & df["lm"].between(*log_m_range)]
    rows = []
    for _, h in df.groupby("halo"):
        if len(h) < min_sightlines:
            continue
        cov = np.mean([np.cov(h[f"a{k}"], h[f"b{k}"])[0, 1] for k in range(n_splits)])
        rows.append((h["ls"].var(), np.mean(1.0 / (2.0 * (h["n"] - 1))), cov))
    var, noise, cov = (np.array(c) for c in zip(*rows, strict=True)) if rows else (np.zeros(1),) * 3
    return {"intrinsic_rms_ln_sigma": float(np.sqrt(max(np.mean(var - noise), 0.0))),
            "split_half_rms": float(np.sqrt(max(np.mean(cov), 0.0))),
            "observed_rms": float(np.sqrt(np.mean(var))),
            "noise_rms": float(np.sqrt(np.mean(noise))),
            "ratio_observed_to_noise_var": float(np.mean(var) / np.mean(noise)),
            "n_halos": int(len(rows))}


# ---------------------------------------------------------------- 3D profile and splashback
def stacked_profile_3d(cat, r_max: float, edges=None) -> tuple[np.ndarray, np.ndarray]:
    """Stacked 3D number density of all galaxies vs r / R200c (needs the ``los_offset`` truth
    column), over the diagrams whose outermost shell lies inside the sky window; the density is
    per unit volume in R200c^3, summed over those diagrams (shape only)."""
    edges = np.geomspace(0.3, 4.0, 41) if edges is None else edges
    g = cat.galaxies
    rp, r200 = _radius(cat)
    r = np.sqrt(rp**2 + g["los_offset"].to_numpy(float) ** 2) / r200
    cl = cat.clusters
    ok_d = cl["diagram_id"][edges[-1] * cl["r200c"] <= r_max]
    ok = g["diagram_id"].isin(set(ok_d)).to_numpy()
    counts = np.histogram(r[ok], edges)[0]
    vol = 4.0 / 3.0 * np.pi * np.diff(edges**3)
    return np.sqrt(edges[1:] * edges[:-1]), counts / vol / max(len(ok_d), 1)


def steepest_slope_radius(x, rho, window: int = 17) -> float:
    """Radius of the steepest logarithmic slope of a (noisy) profile: local quadratic fits of
    ln rho vs ln r over ``window`` bins (17 bins of 0.02 dex: 0.36 dex), slope minimum between
    0.8 and 3.5 R200c."""
    lx, ly = np.log(x), np.log(np.maximum(rho, 1e-300))
    half = window // 2
    slopes = np.full(lx.size, np.nan)
    for i in range(half, lx.size - half):
        sl = slice(i - half, i + half + 1)
        p = np.polyfit(lx[sl] - lx[i], ly[sl], 2)
        slopes[i] = p[1]
    ok = np.isfinite(slopes) & (x > 0.8) & (x < 3.5)
    i = np.flatnonzero(ok)[np.argmin(slopes[ok])]
    return float(x[i])


# ---------------------------------------------------------------- interlopers
def interloper_table(cat, edges=(13.7, 14.0, 14.3, 14.6, 14.9, 15.2)) -> list[dict]:
    """Per mass bin: diagrams, median N_gal / N_mem, non-member share of the galaxies, share of
    diagrams with an interloper cluster, share of galaxies of the cluster halo outside R200c."""
    cl = cat.clusters
    g = cat.galaxies
    b = np.digitize(cl["log_m200c"], edges[1:-1])
    bd = pd.Series(b, index=cl["diagram_id"]).reindex(g["diagram_id"]).to_numpy()
    halo_of = cl.set_index("diagram_id")["halo_id"].reindex(g["diagram_id"]).to_numpy()
    own_out = (g["host_halo_id"].to_numpy() == halo_of) & ~g["is_member"].to_numpy()
    out = []
    for k in range(len(edges) - 1):
        sel = b == k
        ng = cl["n_gal"][sel].sum()
        out.append({
            "log_m": f"{edges[k]}-{edges[k + 1]}",
            "n_diagrams": int(sel.sum()),
            "median_n_gal": float(np.median(cl["n_gal"][sel])) if sel.any() else float("nan"),
            "median_n_mem": float(np.median(cl["n_mem"][sel])) if sel.any() else float("nan"),
            "interloper_fraction": float(1 - cl["n_mem"][sel].sum() / max(ng, 1)),
            "outskirt_fraction": float(own_out[bd == k].sum() / max(ng, 1)),
            "frac_interloper_cluster": float(cl["has_interloper_cluster"][sel].mean())
            if sel.any() else float("nan"),
        })
    return out


# ---------------------------------------------------------------- a known-mass test cluster
def nfw_jeans_diagram(log_m: float, z: float, n: int, seed: int, x_max: float = 2.0) -> np.ndarray:
    """(x_proj, y_proj, v_los) [h^-1 Mpc, h^-1 Mpc, km/s] of ``n`` members of an isolated NFW
    halo of log10 M200c ``log_m`` [h^-1 Msun] at redshift ``z``, out to ``x_max`` R200c, velocities
    from the simulator's Jeans solution (beta(r) = 0.5 r / (r + r_s)); no interlopers."""
    from .. import cosmology
    from .galaxies import anisotropy_beta, concentration, jeans_sigma_r, sample_nfw_radius

    rng = np.random.default_rng(seed)
    c = float(np.ravel(concentration(log_m, z))[0])
    r200, v200 = float(cosmology.r200c(log_m, z)), float(cosmology.v200c(log_m, z))
    x = sample_nfw_radius(np.full(n, c), rng, x_max)
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1)[:, None]
    sig_r = jeans_sigma_r(x, c) * v200
    t = rng.normal(size=(n, 3))
    t -= (t * u).sum(1)[:, None] * u  # two tangential components, each N(0, 1)
    vel = rng.normal(size=n)[:, None] * sig_r[:, None] * u + t * (sig_r * np.sqrt(1 - anisotropy_beta(x, c)))[:, None]
    return np.column_stack([x * u[:, 0] * r200, x * u[:, 1] * r200, vel[:, 2]])
