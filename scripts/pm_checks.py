"""Checks of the PM mock family (issue 14; docs/simulator.md "PM mocks").

Usage: python scripts/pm_checks.py [--out runs/pm_checks] [--preset quick] [--seed 0]
       [--set pm.box_size=200 ...]

Runs one PM box with the preset's ``pm`` settings (default: 200 h^-1 Mpc, 128^3 particles,
256^3 mesh, 40 steps, z = 0), finds and populates its halos, makes the diagrams, writes the
catalogue to OUT/catalogue (readable by ``clustermass train/calibrate/evaluate``) and
OUT/pm_checks.json with:

- wall times [s] of the PM run, halo finding, galaxy population and diagrams;
- the matter power spectrum over halofit (Takahashi et al. 2012, jax_cosmo) at z = 0 and over
  the linear one (colossus) for k <= 0.3 h/Mpc;
- halo counts above 10^13.7 and the mass function of the FoF halos with abundance-matched
  M200c (Tinker08 by construction) and with their particle (SO) M200c, against Tinker08;
- the particle mass within R200c (of the abundance-matched M200c) over M200c, before and after
  the profile calibration;
- sigma_v-M200c against Evrard et al. (2008): the 1D dispersion of all particles within R200c
  of each halo (>= 10^13.7) before and after the velocity calibration, and of the satellites;
- the realism checks of the analytic engine (``clustermass.simulate.checks``) on the catalogue.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from clustermass import cosmology
from clustermass._io import write_json_atomic
from clustermass.baselines import evrard_sigma
from clustermass.catalog import write_catalogue
from clustermass.config import load_config
from clustermass.simulate import checks as C
from clustermass.simulate import halofind as hf
from clustermass.simulate import pm
from clustermass.simulate.pmmock import simulate_pm_box


def sigma_within_r200(centres, vbulk, log_m, z, pos, vel, box, a_fac=1.0):
    """1D velocity dispersion [km/s] of the points within R200c (3D) of each centre."""
    tree = cKDTree(pos, boxsize=box)
    r200 = cosmology.r200c(log_m, z) * a_fac  # comoving
    out = np.full(len(centres), np.nan)
    n = np.zeros(len(centres), int)
    for i, (c, r) in enumerate(zip(centres, r200, strict=True)):
        idx = tree.query_ball_point(c, r)
        n[i] = len(idx)
        if len(idx) >= 3:
            dv = vel[idx] - vel[idx].mean(axis=0)
            out[i] = np.sqrt(np.mean(dv**2))  # sqrt(trace / 3)
    return out, n


def mass_bins_ratio(lm, ratio, edges=(13.7, 14.0, 14.3, 14.6, 15.2)):
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        s = (lm >= lo) & (lm < hi) & np.isfinite(ratio)
        if s.sum():
            rows.append({"log_m": f"{lo}-{hi}", "n": int(s.sum()), "median_ratio": float(np.median(ratio[s]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pm_checks")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.preset, overrides=args.sets, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cat, info = simulate_pm_box(cfg.pm, cfg.simulation, cfg.window, args.seed, progress=True)
    cat.meta["config_key"] = f"pm_checks-{args.preset}-s{args.seed}"
    write_catalogue(cat, out / "catalogue")
    res: dict = {"command": "python scripts/pm_checks.py " + " ".join(
        [f"--out {args.out}", f"--preset {args.preset}", f"--seed {args.seed}"] + [f"--set {s}" for s in args.sets]),
        "pm": cfg.pm.model_dump(mode="json"), "timings_s": info["timings"],
        "total_s": time.perf_counter() - t0, "particle_mass": info["particle_mass"],
        "n_halos_fof": info["n_halos"], "n_galaxies": info["n_galaxies"], "n_diagrams": len(cat)}
    box, halos, galaxies = info["box"], info["halos"], info["galaxies"]
    L, z = cfg.pm.box_size, cfg.pm.snapshot_redshift

    # --- matter power spectrum
    k, p, nm = pm.power_spectrum(box.pos, L, cfg.pm.n_mesh, k_max=0.3 + 2 * np.pi / L, n_bins=int(0.3 * L / (2 * np.pi)) + 1)
    sel = k <= 0.3
    hfit, lin = pm.halofit_power(k[sel], z), pm.linear_power(k[sel], z)
    ratio = p[sel] / hfit
    # the Gaussian sampling error of each bin: sqrt(2 / modes)
    res["power"] = {"k": k[sel].tolist(), "P": p[sel].tolist(), "halofit": hfit.tolist(), "linear": lin.tolist(),
                    "ratio_halofit": ratio.tolist(), "modes": nm[sel].tolist(),
                    "max_abs_dev_halofit": float(np.max(np.abs(ratio - 1))),
                    "mode_weighted_mean_ratio": float(np.average(ratio, weights=nm[sel])),
                    "max_abs_dev_k_gt_0.1": float(np.max(np.abs(ratio[k[sel] > 0.1] - 1)))}

    # --- halo mass function (counts per 0.2 dex against Tinker08)
    vol = L**3
    edges = np.arange(13.7, 15.3, 0.2)
    t08 = np.array([hf.cumulative_abundance(a, z) - hf.cumulative_abundance(b, z) for a, b in zip(edges[:-1], edges[1:], strict=True)]) * vol
    am = np.histogram(halos["log_m200c_am"], edges)[0]
    so = np.histogram(halos["log_m200c_so"].dropna(), edges)[0]
    res["mass_function"] = {"edges": edges.tolist(), "tinker08_expected": t08.tolist(),
                            "abundance_matched": am.tolist(), "particle_so": so.tolist(),
                            "n_above_13.7_am": int((halos["log_m200c_am"] >= 13.7).sum()),
                            "n_above_13.7_so": int((halos["log_m200c_so"] >= 13.7).sum()),
                            "n_above_13.7_tinker08": float(hf.cumulative_abundance(13.7, z) * vol),
                            "median_so_minus_am_dex_13.7": float(np.nanmedian(
                                (halos["log_m200c_so"] - halos["log_m200c_am"])[halos["log_m200c_am"] >= 13.7]))}

    # --- sigma_v - M vs Evrard
    big = halos[halos["log_m200c"] >= 13.7]
    cen = big[["x", "y", "z"]].to_numpy()
    vb = big[["vx", "vy", "vz"]].to_numpy()
    lm = big["log_m200c"].to_numpy()
    a_fac = 1 + z
    s_raw, _ = sigma_within_r200(cen, vb, lm, z, box.pos, box.vel, L, a_fac)
    s_dm, n_cal = sigma_within_r200(cen, vb, lm, z, info["pos"], info["vel"], L, a_fac)
    _, n_rawin = sigma_within_r200(cen, vb, lm, z, box.pos, box.vel, L, a_fac)
    m200 = 10**lm / info["particle_mass"]
    res["mass_function"]["median_m_within_r200c_over_m200c"] = {
        "raw": float(np.median(n_rawin / m200)), "calibrated": float(np.median(n_cal / m200))}
    sat = galaxies[~galaxies["is_central"]]
    s_sat, n_sat = sigma_within_r200(cen, vb, lm, z, sat[["x", "y", "z"]].to_numpy(), sat[["vx", "vy", "vz"]].to_numpy(), L, a_fac)
    s_sat[n_sat < 10] = np.nan
    ev = evrard_sigma(lm, z)
    res["sigma_v"] = {"velocity_calibration": info["velocity_calibration"],
                      "dm_uncalibrated_median_ratio": float(np.nanmedian(s_raw / ev)),
                      "dm_uncalibrated_bins": mass_bins_ratio(lm, s_raw / ev),
                      "dm_median_ratio": float(np.nanmedian(s_dm / ev)),
                      "sat_median_ratio": float(np.nanmedian(s_sat / ev)),
                      "dm_bins": mass_bins_ratio(lm, s_dm / ev), "sat_bins": mass_bins_ratio(lm, s_sat / ev),
                      "n_halos": int(len(big))}

    # --- realism checks of the analytic engine
    w = cfg.window
    real = {"surface_density_ratio": C.surface_density_ratio(cat, w.r_max)}
    mem = cat.__class__(cat.clusters, cat.galaxies[cat.galaxies["is_member"]], cat.halos, cat.meta)
    real["surface_density_ratio_members"] = C.surface_density_ratio(mem, w.r_max)
    real["truncated_sphere"] = C.truncated_sphere_scatter(cat, w.r_max)
    real["orientation"] = C.orientation_scatter(cat, min_members=15, min_sightlines=5)
    real["interlopers"] = C.interloper_table(cat)
    real["summary"] = {"median_n_gal": float(cat.clusters["n_gal"].median()),
                       "median_n_mem": float(cat.clusters["n_mem"].median()),
                       "interloper_fraction": float(1 - cat.clusters["n_mem"].sum() / cat.clusters["n_gal"].sum())}
    res["realism"] = real
    write_json_atomic(out / "pm_checks.json", res)
    import json

    print(json.dumps({k: v for k, v in res.items() if k != "power"}, indent=1, default=float))
    print("P/halofit:", np.round(ratio, 3).tolist(), "k:", np.round(k[sel], 3).tolist())


if __name__ == "__main__":
    main()
