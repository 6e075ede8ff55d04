"""End-to-end check of the real-survey path on a mock sky (issue 9 acceptance).

Simulates a mock sky, infers masses with a calibrated bundle from the sky tables alone, and
compares with the true masses (residuals, coverage, normalised contrast) and the mass function
with its input. Prints a JSON summary; with --figures DIR also writes the figures.

With --priors it also compares the two mass priors on the same sky, whose clusters follow the
mass function: the mean of (posterior median - true mass) in bins of the posterior median, which
is ~0 where the posterior is right for that population (no Eddington bias).

Usage: python scripts/mock_sky_check.py --model runs/quick/models/cnn3d [--area 3000] [--seed 7]
       [--figures docs/img/real-data] [--out runs/mock_sky_check] [--priors]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from clustermass import load_model
from clustermass._io import save_figure, write_json_atomic
from clustermass.config import load_config
from clustermass.evaluation import bias_by_estimate_bin
from clustermass.inference import compare_with_published, infer_sky
from clustermass.massfunction import mass_function_from_posteriors, smoothed_theory
from clustermass.plots.sky import plot_contrast_histogram, plot_mass_comparison, plot_mass_function
from clustermass.simulate.mocksky import simulate_sky


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/quick/models/cnn3d"))
    ap.add_argument("--area", type=float, default=3000.0, help="mock survey area [deg^2]")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("runs/mock_sky_check"))
    ap.add_argument("--figures", type=Path, default=None, help="also copy the figures here")
    ap.add_argument("--priors", action="store_true", help="compare --prior flat and mass-function")
    args = ap.parse_args()

    sim = load_config("quick").simulation
    bundle = load_model(args.model)
    gal, clusters, _ = simulate_sky(area_deg2=args.area, distance_max=sim.distance_max,
                                    mag_limit=sim.mag_limit, log_m_min=sim.log_m_min, seed=args.seed,
                                    survey=sim.survey)
    post = infer_sky(bundle, gal, clusters, mag_col="mag_r")
    post = post.merge(clusters[["id", "log_m200c_true"]], on="id", how="left")
    ok = np.isfinite(post["log_m_median"].to_numpy(float))
    p = post[ok]
    truth = p["log_m200c_true"].to_numpy(float)
    eps = p["log_m_median"].to_numpy(float) - truth
    inside1 = (truth >= p["log_m_lo1"]) & (truth <= p["log_m_hi1"])
    inside2 = (truth >= p["log_m_lo2"]) & (truth <= p["log_m_hi2"])
    summary, table = compare_with_published(p, truth)

    mf = mass_function_from_posteriors(post[ok], args.area, sim.distance_max, seed=args.seed)
    # the mock's input: Tinker08 for the simulation cosmology, through the same kernel
    mf["dn_dlogm_input_smoothed"] = smoothed_theory(mf["log_m"], mf.attrs["bandwidth"], cosmo="planck13",
                                                    log_m_min=sim.log_m_min)
    sel = (mf["log_m"] >= 14.1) & (mf["log_m"] <= 14.8)
    ratio = (mf["dn_dlogm"] / mf["dn_dlogm_input_smoothed"])[sel].to_numpy()
    within = ((mf["dn_dlogm_input_smoothed"] >= mf["dn_dlogm_lo"]) &
              (mf["dn_dlogm_input_smoothed"] <= mf["dn_dlogm_hi"]))[sel].to_numpy()

    result = {
        "model": str(args.model), "area_deg2": args.area, "seed": args.seed,
        "n_clusters": int(len(post)), "n_inferred": int(ok.sum()),
        "n_flagged_edge": int(post["edge"].sum()), "n_out_of_range": int(p["out_of_range"].sum()),
        "eps_mean": float(eps.mean()), "eps_std": float(eps.std(ddof=1)),
        "coverage_68": float(inside1.mean()), "coverage_95": float(inside2.mean()),
        "contrast_mean": summary.get("mean"), "contrast_std": summary.get("std"),
        "massfunction_ratio_14.1_14.8": [float(ratio.min()), float(ratio.max())],
        "massfunction_input_within_band_14.1_14.8": float(within.mean()),
    }
    if args.priors:
        result["prior_bias_by_median_bin"] = prior_comparison(bundle, gal, clusters)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "mock_sky_check.json", result)
    print(json.dumps(result, indent=2))
    if args.figures is not None:
        save_figure(plot_contrast_histogram(table), args.figures / "contrast_histogram.png")
        save_figure(plot_mass_comparison(table), args.figures / "mass_comparison.png")
        save_figure(plot_mass_function(mf, log_m_min=14.1), args.figures / "mass_function.png")


def prior_comparison(bundle, gal, clusters) -> dict:
    """Mean (posterior median - true) [dex] in bins of the posterior median, for both priors."""
    print("| bin of posterior median | n | flat: mean(median - true) | mass-function: mean(median - true) |")
    print("|---|---|---|---|")
    tabs = {}
    for prior in ("flat", "mass-function"):
        post = infer_sky(bundle, gal, clusters, mag_col="mag_r", prior=prior)
        post = post.merge(clusters[["id", "log_m200c_true"]], on="id", how="left")
        tabs[prior] = bias_by_estimate_bin(post["log_m_median"], post["log_m200c_true"])
    f, m = tabs["flat"], tabs["mass-function"]
    for i in range(len(f)):
        print(f"| {f.lo[i]:.1f}-{f.hi[i]:.1f} | {f.n[i]} / {m.n[i]} | {f.bias[i]:+.3f} | {m.bias[i]:+.3f} |")
    return {"edges": [*f.lo, f.hi.iloc[-1]],
            **{p: {"n": t.n.tolist(), "mean_median_minus_true": t.bias.tolist()} for p, t in tabs.items()}}


if __name__ == "__main__":
    main()
