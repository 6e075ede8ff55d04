"""Why `--prior mass-function` leaves a bias above 10^14.3: the mechanism, with a Gaussian stand-in.

A calibration is fitted on flat-prior pairs whose predictions scatter by ``--calib-scatter`` dex
about the true mass (conditioned on d_pred alone, prior edges 13.7-15.2, z = 0.05). It is applied
to clusters drawn from the Tinker08 mass function at z = 0.05 whose predictions scatter by
``--true-scatter`` (several values). For each, the mean (posterior median - true mass) [dex] in
bins of the posterior median, with the flat and the mass-function prior, as
``scripts/mock_sky_check.py --priors`` reports it on the mock sky.

With matched scatter the mass-function prior is unbiased in every bin; with the likelihood
wider than calibrated (over-confident posteriors, as on mass-function mocks from the training
simulator and on the mock sky, docs/calibration.md "Priors") a bias remains that grows with mass, because the missing shrinkage,
~ -(d ln n / d log M) (sigma_true^2 - sigma_post^2), grows as the mass function steepens.

    python scripts/mf_prior_diagnosis.py [--calib-scatter 0.12] [--true-scatter 0.12 0.15 0.19]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from clustermass import cosmology
from clustermass.calibration import fit_calibration

LO, HI = 13.7, 15.2
EDGES = np.array([13.7, 13.9, 14.1, 14.3, 14.5, 14.8, 15.2])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-scatter", type=float, default=0.12)
    ap.add_argument("--true-scatter", type=float, nargs="+", default=[0.12, 0.15, 0.19])
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--clusters", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    m = rng.uniform(LO, HI, args.pairs)  # the mocks: flat in log M
    d = m + rng.normal(0, args.calib_scatter, m.size)
    flat = fit_calibration(d, m, pd.DataFrame({"z": np.full(m.size, 0.05)}), conditioning=("d_pred",),
                           mean_degree=1, prior_range=(LO, HI))
    mf = flat.with_prior("mass-function")
    g = np.linspace(LO, HI, 2001)
    dens = cosmology.mass_function(g, 0.05)
    ms = np.interp(rng.random(args.clusters), np.cumsum(dens) / dens.sum(), g)  # the survey's clusters
    mids = 0.5 * (EDGES[1:] + EDGES[:-1])
    slope = np.interp(mids, g, np.gradient(np.log(dens), g))
    print("bins of the posterior median:", " ".join(f"{a:.1f}-{b:.1f}" for a, b in zip(EDGES[:-1], EDGES[1:], strict=True)))
    print("d ln n / d log10 M at the bin centres:", np.round(slope, 1).tolist())
    out = {"calib_scatter": args.calib_scatter, "edges": EDGES.tolist(), "slope": slope.tolist(), "runs": []}
    for sig in args.true_scatter:
        ds = ms + rng.normal(0, sig, ms.size)
        row = {"true_scatter": sig}
        for name, cal in (("flat", flat), ("mass-function", mf)):
            med = cal.summarize(ds)["log_m_median"].to_numpy()
            k = np.digitize(med, EDGES) - 1
            row[name] = [float(np.mean(med[k == b] - ms[k == b])) if (k == b).any() else float("nan")
                         for b in range(len(EDGES) - 1)]
        out["runs"].append(row)
        print(f"true scatter {sig:.2f} (calibrated {args.calib_scatter:.2f}): flat "
              f"{np.round(row['flat'], 3).tolist()}  mass-function {np.round(row['mass-function'], 3).tolist()}")
    return out


if __name__ == "__main__":
    main()
