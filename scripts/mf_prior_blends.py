"""Why ``--prior mass-function`` keeps a bias at 10^14.3-14.8: the checks behind docs/calibration.md.

Reads the output of ``scripts/mass_function_prior_check.py`` (OUT: its simulated mass-function
catalogue and posterior tables) and the bundle, and prints, each as mean (posterior median -
true) [dex] in the bins of the posterior median where relevant:

1. blends (mock truth: a more massive halo in the window): their share, their bias under the
   mass-function prior, and their share of the clusters whose median is 10^14.5-14.8;
2. how the prior is applied (``--exact`` clusters, a random subset): the package's update of the
   posterior density (the table), checked against the flat-prior density times the Tinker08
   mass function (of the mocks' cosmology, as the check's prior) on a 0.002 dex grid, and importance weights ``p_MF(m_i | z_i) / p_flat`` on the
   calibration pairs instead (the package's method before; the weights sit at the pairs' masses
   while each kernel spreads in log M);
3. narrower KDE bandwidths (0.3, 0.2) with the mass-function prior;
4. calibration pairs drawn from the mass function themselves: half of the sample calibrates the
   other half, flat weights;
5. an observable blend flag: the window's brightest galaxy more than 0.3 h^-1 Mpc from the
   centre (completeness, purity, and the bias without the flagged clusters);
6. the calibration pairs above 10^14.5 and their distinct halos.

    python scripts/mf_prior_blends.py --model runs/quick/models/cnn3d --out runs/mf_prior_check [--exact 3000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass import cosmology, load_model
from clustermass.calibration import MassFunctionPrior, fit_calibration
from clustermass.catalog import read_catalogue
from clustermass.evaluation import bias_by_estimate_bin
from clustermass.posterior import JointKDEPosterior

MOCKS = cosmology.SIMULATION_COSMOLOGY  # the mass function of the mocks (and of their prior)


def _fmt(tab) -> str:
    return ", ".join(f"{b:+.3f}" for b in tab["bias"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/quick/models/cnn3d"))
    ap.add_argument("--out", type=Path, default=Path("runs/mf_prior_check"))
    ap.add_argument("--exact", type=int, default=3000, help="clusters for the exact grid update")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    bundle = load_model(args.model)
    cal = bundle.calibrated()
    cat = read_catalogue(args.out / "catalogue")
    post = pd.read_parquet(args.out / "posteriors_mass-function.parquet")
    truth = post["log_m_true"].to_numpy(float)
    med = post["log_m_median"].to_numpy(float)
    blend = cat.clusters["has_interloper_cluster"].to_numpy(bool)
    ok = np.isfinite(post["d_pred"].to_numpy(float)) & np.isfinite(post["cond_log_n_gal"].to_numpy(float))
    cond = pd.DataFrame({"z": post["cond_z"], "log_n_gal": post["cond_log_n_gal"]})

    top = (med >= 14.5) & (med < 14.8)
    print(f"1. blends: {blend.mean():.1%} of the clusters; mass-function-prior bias of the blends per bin: "
          f"{_fmt(bias_by_estimate_bin(med[blend], truth[blend]))}; {blend[top].mean():.0%} of the clusters "
          f"whose median is 10^14.5-14.8")

    sub = rng.choice(np.flatnonzero(ok), min(args.exact, ok.sum()), replace=False)
    grid = np.arange(cal.prior_range[0], cal.prior_range[1] + 1e-9, 0.002)
    z = cond["z"].to_numpy(float)[sub]
    feats = cal.features(post["d_pred"].to_numpy(float)[sub], cond.iloc[sub])
    dens = cal.posterior.pdf(feats, grid)
    dens *= np.exp(np.array([np.log(cosmology.mass_function(grid, zz, cosmo=MOCKS)) for zz in z]))
    cdf = np.cumsum(0.5 * (dens[:, 1:] + dens[:, :-1]), 1)
    grid_med = np.array([np.interp(0.5, c / c[-1], grid[1:]) for c in cdf])
    p = cal.pairs.dropna(subset=list(cal.conditioning))
    prior, pz = MassFunctionPrior(cal.prior_range, cosmo=MOCKS), p["z"].to_numpy()
    mg = np.linspace(*cal.prior_range, 301)
    log_norm = np.log(np.trapezoid(np.exp(prior(np.broadcast_to(mg, (len(p), mg.size)), pz)[0]), mg, axis=1))
    log_w = prior(p[["log_m_true"]].to_numpy(), pz)[0][:, 0] - log_norm  # p_MF(m_i | z_i) / p_flat, up to a constant
    weighted = JointKDEPosterior(**{**cal.posterior.get_params(), "log_prior": None}).fit(
        p[list(cal.conditioning)].to_numpy(), p["log_m_true"].to_numpy(), weights=np.exp(log_w))
    w_med = weighted.summarize(feats)["log_m_median"]
    print(f"2. on {sub.size} clusters: the package's update {_fmt(bias_by_estimate_bin(med[sub], truth[sub]))} "
          f"(max |median - grid update| {np.abs(med[sub] - grid_med).max():.1e} dex); importance weights on the "
          f"pairs {_fmt(bias_by_estimate_bin(w_med, truth[sub]))}")

    p = cal.pairs
    for bw in (0.3, 0.2):
        c = fit_calibration(p["d_pred"], p["log_m_true"], p[["z", "log_n_gal"]], bandwidth=bw,
                            prior_range=cal.prior_range, prior="mass-function", prior_options={"cosmo": MOCKS})
        s = c.summarize(post["d_pred"].to_numpy(float)[ok], cond[ok])
        print(f"3. bandwidth {bw}: {_fmt(bias_by_estimate_bin(s['log_m_median'], truth[ok]))}")

    half = rng.random(ok.size) < 0.5
    a, b = ok & half, ok & ~half
    c = fit_calibration(post["d_pred"][a], truth[a], cond[a], bandwidth=cal.bandwidth, prior_range=cal.prior_range)
    s = c.summarize(post["d_pred"].to_numpy(float)[b], cond[b])
    inside1 = (truth[b] >= s["log_m_lo1"]) & (truth[b] <= s["log_m_hi1"])
    inside2 = (truth[b] >= s["log_m_lo2"]) & (truth[b] <= s["log_m_hi2"])
    print(f"4. pairs from the mass function ({a.sum()} calibrate {b.sum()}): "
          f"{_fmt(bias_by_estimate_bin(s['log_m_median'], truth[b]))}; coverage {inside1.mean():.3f} / {inside2.mean():.3f}")

    g = cat.galaxies
    x, y, v, mag = (g[k].to_numpy(float) for k in ("x_proj", "y_proj", "v_los", "mag_r"))
    owner = np.repeat(np.arange(len(cat)), np.diff(cat.offsets, axis=1).ravel())
    w = bundle.window
    inw = np.flatnonzero((np.abs(x) <= w.r_max) & (np.abs(y) <= w.r_max) & (np.abs(v) <= w.v_max))
    order = inw[np.lexsort((mag[inw], owner[inw]))]
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]  # brightest in each window
    flag = np.zeros(len(cat), bool)
    flag[owner[first]] = np.hypot(x[first], y[first]) > 0.3
    print(f"5. brightest galaxy > 0.3 h^-1 Mpc off centre: flags {flag.mean():.1%}, finds {flag[blend].mean():.0%} "
          f"of the blends, {1 - blend[flag].mean():.0%} false alarms; without the flagged: "
          f"{_fmt(bias_by_estimate_bin(med[~flag], truth[~flag]))}")

    run_cat = args.model.parent.parent / "catalogue" / "clusters.parquet"
    if run_cat.is_file():
        t = pd.read_parquet(run_cat, columns=["split", "log_m200c", "halo_id"])
        t = t[t["split"] == "test"]
        hi = t[t["log_m200c"] > 14.5]
        print(f"6. calibration pairs: {len(t)}, {len(hi)} above 10^14.5 from {hi['halo_id'].nunique()} halos")


if __name__ == "__main__":
    main()
