"""The README's result tables, from a finished run directory (``clustermass run``).

Prints markdown: (1) every method side by side, raw network residuals (the paper's point
estimates, ``d_pred``) beside the posterior-median ones, widths and coverage, eq. 7 richness fit;
(2) interloper clusters (paper Fig. 6); (3) residuals against observer distance at fixed mass
(raw ``d_pred`` minus the per-mass-bin mean, by redshift tercile), which shows whether a method
reads survey depth. Writes the same numbers to ``RUN/results_tables.json``.

    python scripts/results_tables.py runs/quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass._io import write_json_atomic

LABELS = {"cnn3d": "CNN_3D", "cnn2d": "CNN_2D", "cnn1d": "CNN_1D",
          "set": "set NPE (Deep Sets + flow, posterior median as d_pred)",
          "sigma_evrard": "sigma_v (gapper + biweight, Evrard 2008)", "virial": "virial estimator",
          "caustic": "caustic (Diaferio 1999; Serra et al. 2011)"}


def _posteriors(run: Path, name: str, primary: str) -> pd.DataFrame:
    return pd.read_parquet(run / ("posteriors.parquet" if name == primary else f"posteriors_{name}.parquet"))


def method_table(metrics: dict) -> tuple[str, dict]:
    rows, out = [], {}
    head = ("| method | raw eps mean / std [dex] | posterior-median eps mean / std [dex] | mean 68% width [dex] "
            "| coverage 68% | coverage 95% | sigma_N [dex] | sigma_0 [dex] | time per cluster [ms] |"
            "\n|---|---|---|---|---|---|---|---|---|")
    for name, m in metrics["models"].items():
        out[name] = {k: m.get(k) for k in ("eps_raw_mean", "eps_raw_std", "eps_mean", "eps_std", "width_68",
                                          "coverage_68", "coverage_95", "sigma_N", "sigma_N_err", "sigma_0",
                                          "sigma_0_err", "time_per_cluster_ms")}
        ms = m.get("time_per_cluster_ms")
        rows.append(f"| {LABELS.get(name, name)} | {m['eps_raw_mean']:+.3f} / {m['eps_raw_std']:.3f} "
                    f"| {m['eps_mean']:+.3f} / {m['eps_std']:.3f} | {m['width_68']:.3f} | {m['coverage_68']:.3f} "
                    f"| {m['coverage_95']:.3f} | {m['sigma_N']:.3f} ± {m['sigma_N_err']:.3f} "
                    f"| {m['sigma_0']:.3f} ± {m['sigma_0_err']:.3f} | {'-' if ms is None else f'{ms:.2f}'} |")
    return head + "\n" + "\n".join(rows), out


def contamination_table(metrics: dict) -> tuple[str, dict]:
    c = metrics.get("contamination") or {}
    if not c:
        return "(no contamination table: the catalogue has no halos table)", {}
    text = (f"{c['n_contaminated']} of {c['n_diagrams']} evaluation diagrams "
            f"({100 * c['fraction_contaminated']:.1f}%) hold an interloper cluster (a more massive halo "
            f"inside the window); primary-model residuals: clean {c['eps_mean_clean']:+.3f} ± "
            f"{c['eps_std_clean']:.3f} dex, contaminated {c['eps_mean_contaminated']:+.3f} ± "
            f"{c['eps_std_contaminated']:.3f} dex (Spearman rho of eps vs contamination "
            f"{c['spearman_eps_vs_contamination']:+.2f}).")
    return text, c


def distance_table(run: Path, metrics: dict) -> tuple[str, dict]:
    clusters = pd.read_parquet(run / "catalogue" / "clusters.parquet")[["diagram_id", "redshift"]]
    primary = metrics["primary"]
    head = ("| method | nearest third | middle third | farthest third | far - near [dex] |\n"
            "|---|---|---|---|---|")
    rows, out = [], {}
    for name in metrics["models"]:
        p = _posteriors(run, name, primary).merge(clusters, on="diagram_id")
        ok = np.isfinite(p["d_pred"]) & np.isfinite(p["log_m_true"])
        p = p[ok]
        # residual of the raw output about its own mean at fixed true mass (0.1 dex bins)
        mbin = np.floor(p["log_m_true"] / 0.1)
        resid = p["d_pred"] - p.groupby(mbin)["d_pred"].transform("mean")
        third = pd.qcut(p["redshift"], 3, labels=False)
        means = resid.groupby(third).mean().to_numpy()
        errs = (resid.groupby(third).std() / np.sqrt(resid.groupby(third).size())).to_numpy()
        out[name] = {"mean_by_tercile": means.tolist(), "err_by_tercile": errs.tolist(),
                     "far_minus_near": float(means[2] - means[0])}
        rows.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{m:+.3f} ± {e:.3f}" for m, e in zip(means, errs,
                                                                                                   strict=True))
                    + f" | {means[2] - means[0]:+.3f} |")
    return head + "\n" + "\n".join(rows), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run directory of `clustermass run`")
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    t1, j1 = method_table(metrics)
    t2, j2 = contamination_table(metrics)
    t3, j3 = distance_table(args.run, metrics)
    n = metrics.get("n_eval")
    print(f"## Methods ({n} evaluation diagrams, true log M spread {metrics['log_m_true_std']:.3f} dex)\n\n{t1}\n")
    print(f"## Interloper clusters (paper Fig. 6)\n\n{t2}\n")
    print("## Raw-output residual at fixed true mass, by redshift tercile (depth dependence)\n\n" + t3)
    write_json_atomic(args.run / "results_tables.json", {"methods": j1, "contamination": j2, "distance": j3})


if __name__ == "__main__":
    main()
