"""Sharpness vs calibration of the SBI step: which conditioning, which boundary rule, KDE vs NPE.

Reads a finished run directory (``clustermass run --preset quick --out RUN``): its catalogue, the
calibration pairs of a model (``models/<kind>/calibration.parquet``, aligned with the catalogue's
test split when they have no conditioning columns) and the network outputs on the evaluation
split (``posteriors*.parquet``: ``diagram_id, d_pred``). For each variant it fits the posterior on
the calibration pairs and reports, on the evaluation split, the coverage of the 68% and 95%
intervals, the mean 68% width, and the worst tercile (of redshift, n_gal and network output) in
68% coverage and in P(true < median).

    PYTHONPATH=src .venv/bin/python scripts/calibration_compare.py RUN [--kind cnn3d] [--npe]

Prints a markdown table (docs/calibration.md) and writes RUN/calibration_compare.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass._io import write_json_atomic
from clustermass.calibration import cluster_conditions
from clustermass.catalog import read_catalogue
from clustermass.config import WindowConfig
from clustermass.diagnostics import NOMINAL_68, NOMINAL_95, group_calibration
from clustermass.posterior import JointKDEPosterior

#: name -> (conditioning, boundary, bandwidth, mean_degree, heteroscedastic)
VARIANTS = {
    "d_pred, bw 0.20, no prior edges (before issue 13)": (("d_pred",), False, 0.2, 1, False),
    "d_pred, bw 0.20": (("d_pred",), True, 0.2, 1, False),
    "d_pred + z, bw 0.20": (("d_pred", "z"), True, 0.2, 1, False),
    "d_pred + z, bw 0.30, trend": (("d_pred", "z"), True, 0.3, 2, True),
    "d_pred + z + log_n_gal, bw 0.20": (("d_pred", "z", "log_n_gal"), True, 0.2, 1, False),
    "d_pred + z + log_n_gal, bw 0.30": (("d_pred", "z", "log_n_gal"), True, 0.3, 1, False),
    "d_pred + z + log_n_gal, bw 0.30, trend": (("d_pred", "z", "log_n_gal"), True, 0.3, 2, True),
    "d_pred + z + log_n_gal, bw 0.40, trend (default)": (("d_pred", "z", "log_n_gal"), True, 0.4, 2, True),
}


def load(run: Path, kind: str):
    cat = read_catalogue(run / "catalogue")
    meta = json.loads((run / "models" / kind / "model.json").read_text())
    win = WindowConfig.model_validate(meta["preprocessing"]["window"])
    td = meta.get("training_data") or {}
    prior_range = (td.get("log_m_min", 13.7), td.get("log_m_max", 15.2))
    cal = pd.read_parquet(run / "models" / kind / "calibration.parquet")
    rows_t = cat.rows("test")
    if "z" not in cal.columns:
        cond = cluster_conditions(cat, rows_t, win)
        truth = cat.clusters["log_m200c"].to_numpy()[rows_t]
        if not np.allclose(truth, cal["log_m_true"].to_numpy()):
            raise SystemExit("calibration pairs are not aligned with the test split")
        cal = pd.concat([cal.reset_index(drop=True), cond], axis=1)
    primary = json.loads((run / "metrics.json").read_text()).get("primary", "cnn3d")
    name = "posteriors.parquet" if kind == primary else f"posteriors_{kind}.parquet"
    ev = pd.read_parquet(run / name)[["diagram_id", "d_pred", "log_m_true"]]
    rows_e = cat.rows("eval")
    cond_e = cluster_conditions(cat, rows_e, win)
    cond_e["diagram_id"] = cat.clusters["diagram_id"].to_numpy()[rows_e]
    ev = ev.merge(cond_e, on="diagram_id", how="left")
    return cal, ev, prior_range


def score(pit, width, ev) -> dict:
    g = group_calibration(pit, {"z": ev["z"], "n_gal": ev["log_n_gal"], "d_pred": ev["d_pred"]}, width,
                          n_boot=0)
    return {
        "coverage_68": float(np.mean(np.abs(pit - 0.5) <= NOMINAL_68 / 2)),
        "coverage_95": float(np.mean(np.abs(pit - 0.5) <= NOMINAL_95 / 2)),
        "width_68": float(np.mean(width)),
        "worst_tercile_cov68_dev": float(np.max(np.abs(g["coverage_68"] - NOMINAL_68))),
        "worst_tercile_median_dev": float(np.max(np.abs(g["p_below_median"] - 0.5))),
        "groups": g.to_dict(orient="list"),
    }


def kde_variant(cal, ev, cols, boundary, prior_range, bandwidth, mean_degree=1, heteroscedastic=False):
    post = JointKDEPosterior(bandwidth, prior_range=prior_range if boundary else None, mean_degree=mean_degree,
                             heteroscedastic=heteroscedastic)
    x = cal[list(cols)].to_numpy()
    post.fit(x if len(cols) > 1 else x[:, 0], cal["log_m_true"].to_numpy())
    xe = ev[list(cols)].to_numpy()
    xe = xe if len(cols) > 1 else xe[:, 0]
    t0 = time.perf_counter()
    s = post.summarize(xe)
    pit = post.cdf(xe, ev["log_m_true"].to_numpy())
    dt = time.perf_counter() - t0
    out = score(pit, (s["log_m_hi1"] - s["log_m_lo1"]).to_numpy(), ev)
    out["seconds"] = dt
    out["out_of_range"] = float(s["out_of_range"].mean())
    return out


def npe_variant(cal, ev, cols, prior_range, seed=0, epochs=400):
    """Neural posterior estimation with a zuko NSF on the same summaries (log M standardised;
    posterior truncated to the prior range by rejection of samples)."""
    import torch
    import zuko

    torch.manual_seed(seed)
    x = torch.tensor(cal[list(cols)].to_numpy(), dtype=torch.float32)
    m = torch.tensor(cal["log_m_true"].to_numpy(), dtype=torch.float32)[:, None]
    xm, xs = x.mean(0), x.std(0)
    mm, ms = m.mean(0), m.std(0)
    xn, mn = (x - xm) / xs, (m - mm) / ms
    n = len(xn)
    perm = torch.randperm(n)
    va, tr = perm[: n // 5], perm[n // 5:]
    flow = zuko.flows.NSF(features=1, context=len(cols), transforms=3, hidden_features=(64, 64))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    best, state, bad = np.inf, None, 0
    for _ in range(epochs):
        flow.train()
        for idx in tr[torch.randperm(len(tr))].split(256):
            loss = -flow(xn[idx]).log_prob(mn[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            vl = float(-flow(xn[va]).log_prob(mn[va]).mean())
        if vl < best - 1e-4:
            best, state, bad = vl, {k: v.clone() for k, v in flow.state_dict().items()}, 0
        else:
            bad += 1
            if bad > 30:
                break
    flow.load_state_dict(state)
    xe = (torch.tensor(ev[list(cols)].to_numpy(), dtype=torch.float32) - xm) / xs
    t0 = time.perf_counter()
    with torch.no_grad():
        smp = flow(xe).sample((4000,))[..., 0].T * ms + mm  # (n_eval, 4000)
    smp = smp.numpy().astype(float)
    a, b = prior_range
    smp = np.where((smp >= a) & (smp <= b), smp, np.nan)
    truth = ev["log_m_true"].to_numpy()
    pit = np.nanmean(smp <= truth[:, None], axis=1)
    lo1, hi1 = np.nanquantile(smp, 0.1587, axis=1), np.nanquantile(smp, 0.8413, axis=1)
    out = score(pit, hi1 - lo1, ev)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--kind", default="cnn3d")
    ap.add_argument("--npe", action="store_true", help="also train a zuko NSF (NPE) on the same summaries")
    args = ap.parse_args()
    cal, ev, prior_range = load(args.run, args.kind)
    res = {}
    for name, (cols, boundary, bw, deg, het) in VARIANTS.items():
        res[f"KDE {name}"] = kde_variant(cal, ev, cols, boundary, prior_range, bw, deg, het)
    from clustermass.calibration import validate_conditioning

    chosen, table = validate_conditioning(cal["d_pred"], cal["log_m_true"], cal[["z", "log_n_gal"]],
                                          bandwidth=0.3, prior_range=prior_range)
    res["validation (2-fold CV on the calibration split)"] = {"chosen": list(chosen), "table": table}
    if args.npe:
        for cols in (("d_pred", "z", "log_n_gal"),):
            res["NPE (zuko NSF) " + " + ".join(cols)] = npe_variant(cal, ev, cols, prior_range)
    print(f"run {args.run}, {args.kind}: {len(cal)} calibration pairs, {len(ev)} evaluation diagrams\n")
    print("| posterior | coverage 68 | coverage 95 | mean 68% width [dex] | worst tercile |cov68-0.683| "
          "| worst tercile |P(true<median)-0.5| | out of range | time [s] |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        if "chosen" in r:
            continue
        print(f"| {name} | {r['coverage_68']:.3f} | {r['coverage_95']:.3f} | {r['width_68']:.3f} | "
              f"{r['worst_tercile_cov68_dev']:.3f} | {r['worst_tercile_median_dev']:.3f} | "
              f"{r.get('out_of_range', 0.0):.3f} | {r['seconds']:.1f} |")
    v = res["validation (2-fold CV on the calibration split)"]
    print(f"\nconditioning='auto' (2-fold CV on the calibration split) chooses {' + '.join(v['chosen'])}:")
    for row in v["table"]:
        print(f"  {' + '.join(row['conditioning'])}: coverage {row['coverage_68']:.3f}/{row['coverage_95']:.3f}, "
              f"width {row['width_68']:.3f}, worst tercile dev {row['dev_tercile_coverage_68']:.3f} (68%), "
              f"{row['dev_tercile_median']:.3f} (median), passed={row['passed']}")
    if os_access(args.run):
        write_json_atomic(args.run / "calibration_compare.json", res)


def os_access(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


if __name__ == "__main__":
    main()
