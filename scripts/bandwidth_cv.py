"""Choose the SBI bandwidth on the calibration split alone: halo-grouped 2-fold cross-validation.

For a calibrated bundle of a run, the calibration pairs are split in two halves by halo (all
sight lines of a halo in one half), each half calibrates the other, and the cross-validated
68/95% coverage and mean 68% width are printed for each bandwidth. The evaluation split is not
used, so the choice is not tuned to the numbers it is judged by.

    python scripts/bandwidth_cv.py runs/quick --model cnn3d --bandwidths 0.2 0.3 0.4 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass.calibration import Calibration, fit_calibration
from clustermass.diagnostics import NOMINAL_68, NOMINAL_95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="cnn3d")
    ap.add_argument("--bandwidths", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bundle_dir = args.run / "models" / args.model
    cal = Calibration.load(bundle_dir)
    pairs = cal.pairs.reset_index(drop=True)
    clusters = pd.read_parquet(args.run / "catalogue" / "clusters.parquet")
    halo = clusters.loc[clusters["split"] == json.loads((bundle_dir / "calibration.json").read_text()).get(
        "split", "test"), "halo_id"].to_numpy()
    if len(halo) != len(pairs):
        raise SystemExit("calibration pairs do not match the catalogue's calibration split")
    d, m = pairs["d_pred"].to_numpy(), pairs["log_m_true"].to_numpy()
    cond = pairs[[c for c in ("z", "log_n_gal") if c in pairs]]
    uh = np.unique(halo)
    half = np.isin(halo, uh[np.random.default_rng(args.seed).permutation(len(uh)) < len(uh) // 2])
    print(f"{args.model}: conditioning {list(cal.conditioning)}, {len(d)} pairs of {len(uh)} halos")
    print("| bandwidth | CV coverage 68% | CV coverage 95% | CV mean 68% width [dex] |\n|---|---|---|---|")
    for bw in args.bandwidths:
        pit, width = [], []
        for a, b in ((half, ~half), (~half, half)):
            c = fit_calibration(d[a], m[a], cond[a], conditioning=cal.conditioning, bandwidth=bw,
                                min_neighbours=cal.min_neighbours, prior_range=cal.prior_range,
                                mean_degree=cal.mean_degree, heteroscedastic=cal.heteroscedastic)
            ib = np.flatnonzero(b)
            pit.append(c.cdf(c.features(d[ib], cond.iloc[ib]), m[ib]))
            s = c.summarize(d[ib], cond.iloc[ib])
            width.append((s["log_m_hi1"] - s["log_m_lo1"]).to_numpy())
        p = np.concatenate(pit)
        p = p[np.isfinite(p)]
        print(f"| {bw:.2f} | {np.mean(np.abs(p - 0.5) <= NOMINAL_68 / 2):.3f} "
              f"| {np.mean(np.abs(p - 0.5) <= NOMINAL_95 / 2):.3f} | {np.nanmean(np.concatenate(width)):.3f} |")


if __name__ == "__main__":
    main()
