"""Make the simulator check figures and numbers of docs/simulator.md (issue 12 "Must show").

Usage: python scripts/simulator_checks.py [--out docs/img/simulator] [--seed 7] [--n 8500]

Catalogues (fixed seeds):
- main: the quick preset (``clustermass simulate --preset quick``: 8500 diagrams, survey sdss),
  tables only: stacked surface density ratio 1.0-1.1 / 0.9-1.0 R200c, the positions-only
  truncated-sphere estimator, interloper fraction and interloper-cluster rate per mass bin;
- orientation: members only, wide window (interlopers=false, r_max=3, v_max=6000), a small
  volume so every halo of 10^14.0-14.6 gets 25 sight lines: intrinsic rms of ln sigma_los;
- wide: members only in the wide window: sigma_v-M200c vs Evrard et al. (2008);
- profile: all galaxies (interlopers on) in the wide window, the paper's centring (halo centre),
  10^14.0-14.6: stacked 3D profile, steepest slope vs colossus' splashback radius.
Writes simulator_*.png and simulator_checks.json into --out and prints every number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clustermass._io import save_figure, write_json_atomic  # noqa: E402
from clustermass.config import WindowConfig, load_config  # noqa: E402
from clustermass.plots import simulator as P  # noqa: E402
from clustermass.simulate import checks as C  # noqa: E402
from clustermass.simulate import galaxies as gal  # noqa: E402
from clustermass.simulate import simulate_catalogue, summarize_catalogue  # noqa: E402

WIDE = WindowConfig(r_max=3.0, v_max=6000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=0, help="diagrams of the main catalogue (0: the quick preset's)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("docs/img/simulator"))
    args = ap.parse_args()
    cfg = load_config("quick", seed=args.seed)
    sim = cfg.simulation
    if args.n:
        n = args.n
        sim = sim.model_copy(update={"n_train": n // 2, "n_test": n // 3, "n_eval": n - n // 2 - n // 3})
    window = cfg.window
    out = args.out
    res: dict = {"seed": args.seed, "survey": sim.survey, "mag_limit": sim.mag_limit}

    t0 = time.perf_counter()
    cat = simulate_catalogue(sim, window, args.seed, progress=False)
    res["simulate_seconds"] = round(time.perf_counter() - t0, 2)
    res["n_diagrams"] = len(cat)
    res["summary"] = summarize_catalogue(cat)

    # 1. no density cliff at R200c
    res["surface_density_ratio_1.0-1.1_over_0.9-1.0"] = C.surface_density_ratio(cat, window.r_max)
    rp, r200 = C._radius(cat)
    x = rp / r200
    edges = np.linspace(0.05, 2.0, 40)
    ok = cat.clusters["diagram_id"][2.0 * cat.clusters["r200c"] <= window.r_max]
    sel = cat.galaxies["diagram_id"].isin(set(ok)).to_numpy()
    h_all = np.histogram(x[sel], edges)[0]
    h_mem = np.histogram(x[sel & cat.galaxies["is_member"].to_numpy()], edges)[0]
    area = np.pi * np.diff(edges**2) * max(len(ok), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    mid = 0.5 * (edges[1:] + edges[:-1])
    ax.plot(mid, h_all / area, "k-", label="all galaxies")
    ax.plot(mid, h_mem / area, "C0--", label="members (r < R200c in 3D)")
    ax.plot(mid, (h_all - h_mem) / area, "C3:", label="non-members (outskirts + interlopers)")
    ax.axvline(1.0, color="0.6", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(r"$R_\mathrm{proj} / R_{200c}$")
    ax.set_ylabel(r"stacked $\Sigma$ [galaxies / $R_{200c}^2$ per diagram]")
    ax.set_title(f"quick preset, seed {args.seed}: ratio 1.0-1.1 / 0.9-1.0 = "
                 f"{res['surface_density_ratio_1.0-1.1_over_0.9-1.0']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out / "simulator_surface_density.png")

    # 2. positions-only truncated-sphere estimator
    res["truncated_sphere"] = C.truncated_sphere_scatter(cat, window.r_max)
    fit = C.truncated_sphere_fit(cat, window.r_max)
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.scatter(fit["log_m200c"], np.log10(fit["r_t"]), s=2, alpha=0.3, rasterized=True)
    ax.set_xlabel(P.MASS_LABEL)
    ax.set_ylabel(r"$\log_{10} r_t$ [$h^{-1}$ Mpc] (positions only)")
    ts = res["truncated_sphere"]
    ax.set_title(f"truncated-sphere estimator: scatter {ts['scatter_dex']:.2f} dex "
                 f"(forward {ts['scatter_forward_dex']:.2f})", fontsize=9)
    save_figure(fig, out / "simulator_truncated_sphere.png")

    # 3. interlopers per mass bin
    res["per_mass_bin"] = C.interloper_table(cat)
    save_figure(P.plot_interlopers(cat), out / "simulator_interlopers.png")
    save_figure(P.plot_richness(cat), out / "simulator_richness.png")
    save_figure(P.plot_mass_distribution(cat), out / "simulator_mass_distribution.png")
    g = cat.galaxies
    res["survey_losses"] = {
        "targets_without_redshift": float(1 - cat.clusters["n_gal"].sum() / cat.clusters["n_targets"].sum()),
        "centre_is_not_the_central": float(np.mean(cat.clusters["centre_offset"] > 0)),
        "median_centre_offset_over_r200c_when_offset": float(np.median(
            (cat.clusters["centre_offset"] / cat.clusters["r200c"])[cat.clusters["centre_offset"] > 0]))
        if (cat.clusters["centre_offset"] > 0).any() else 0.0,
        "rms_centre_v_offset_over_v200c": float(np.sqrt(np.mean(
            (cat.clusters["centre_v_offset"] / cat.clusters["v200c"]) ** 2))),
    }
    res["phase_shares_in_windows"] = {
        name: float(np.mean(g["phase"].to_numpy() == k))
        for k, name in enumerate(["other_halos", "bound", "backsplash", "infalling"])
    }
    rng = np.random.default_rng(args.seed)
    cl = cat.clusters
    picks = [int(rng.choice(np.flatnonzero(cl["log_m200c"].between(lo, hi))))
             for lo, hi in ((13.7, 13.9), (14.2, 14.4), (14.7, 14.9))]
    ic = np.flatnonzero(cl["has_interloper_cluster"])
    if ic.size:
        picks.append(int(rng.choice(ic)))
    save_figure(P.plot_example_diagrams(cat, picks, window.r_max, window.v_max),
                out / "simulator_examples.png")

    # 4. orientation scatter of sigma_los (members only, wide window, many sight lines per halo)
    orient_sim = sim.model_copy(update={"interlopers": False, "volume": 2e7, "n_train": 8000,
                                        "n_test": 0, "n_eval": 0, "max_sightlines": 25,
                                        "log_m_min": 14.0, "log_m_max": 14.6})
    ocat = simulate_catalogue(orient_sim, WIDE, args.seed, progress=False)
    res["orientation"] = C.orientation_scatter(ocat)

    # 5. sigma_v - M200c vs Evrard et al. 2008 (members, wide window)
    wide = simulate_catalogue(sim.model_copy(update={"interlopers": False, "n_train": 2000, "n_test": 0,
                                                     "n_eval": 0}), WIDE, args.seed, progress=False)
    lm, z, s = P.member_dispersion(wide)
    slope, icpt = np.polyfit(lm - 15.0, np.log10(s), 1)
    lm2, _, s2 = P.member_dispersion(cat)
    slope2, icpt2 = np.polyfit(lm2 - 15.0, np.log10(s2), 1)
    ev = float(P.evrard_sigma(15.0, np.median(z)))
    res["sigma_mass"] = {"slope_wide": float(slope), "sigma_1e15_wide": float(10**icpt),
                         "evrard_1e15": ev, "ratio_to_evrard": float(10**icpt / ev),
                         "slope_window": float(slope2), "sigma_1e15_window": float(10**icpt2)}
    save_figure(P.plot_sigma_mass(wide, "members, wide window", extra=(cat, "members in the window")),
                out / "simulator_sigma_mass.png")

    # 6. splashback: stacked 3D profile of all galaxies around 10^14.0-14.6 halos
    prof_sim = sim.model_copy(update={"survey": "paper", "mag_limit": sim.mag_limit, "n_train": 1500,
                                      "n_test": 0, "n_eval": 0, "log_m_min": 14.0, "log_m_max": 14.6,
                                      "distance_min": 60.0, "distance_max": 200.0})
    pcat = simulate_catalogue(prof_sim, WIDE, args.seed, progress=False)
    xr, rho = C.stacked_profile_3d(pcat, WIDE.r_max, np.geomspace(0.3, 3.3, 48))
    r_steep = C.steepest_slope_radius(xr, rho)
    lm_med = float(np.median(pcat.clusters["log_m200c"]))
    rsp = {d: float(gal.splashback_radius(lm_med, rspdef=d)[0])
           for d in ("sp-apr-p50", "sp-apr-p75", "sp-apr-p87")}
    rsp["more15"] = float(gal.splashback_radius_more15(lm_med)[0])
    res["splashback"] = {"log_m200c_median": lm_med, "r_steepest_over_r200c": r_steep,
                         "colossus_rsp_over_r200c": rsp,
                         "ratio_to_more15": r_steep / rsp["more15"],
                         "ratio_to_diemer20_p75": r_steep / rsp["sp-apr-p75"]}
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(5.5, 6.0), sharex=True)
    a1.loglog(xr, rho, "k.-")
    a1.set_ylabel(r"stacked $n_\mathrm{gal}(r)$ [arb.]")
    slope_prof = np.gradient(np.log(np.maximum(rho, 1e-300)), np.log(xr))
    a2.semilogx(xr, slope_prof, "k.-")
    for ax in (a1, a2):
        ax.axvline(r_steep, color="C0", label=f"steepest slope {r_steep:.2f}")
        ax.axvline(rsp["more15"], color="C3", ls="--", label=f"colossus More+15 {rsp['more15']:.2f}")
        ax.axvline(rsp["sp-apr-p75"], color="C1", ls=":", label=f"colossus Diemer20 p75 {rsp['sp-apr-p75']:.2f}")
    a2.set_xlabel(r"$r / R_{200c}$")
    a2.set_ylabel(r"$d\ln n / d\ln r$")
    a1.legend(fontsize=7)
    save_figure(fig, out / "simulator_splashback.png")

    write_json_atomic(out / "simulator_checks.json", res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
