"""Cross-simulation robustness (issue 14): models trained on one mock family, evaluated on the other.

Usage:
  python scripts/cross_simulation.py --analytic RUN_OR_CATALOGUE --pm PM_CATALOGUE --out DIR
         [--preset quick] [--model cnn3d] [--set training.max_epochs=10 ...]

``--analytic``: a run directory of ``clustermass run`` (its ``catalogue/`` and, when present, its
calibrated ``models/<model>/`` bundle are used) or an analytic catalogue directory (then the
model is trained and calibrated here). ``--pm``: a PM catalogue (``clustermass simulate --engine
pm`` or ``scripts/pm_checks.py``'s ``OUT/catalogue``). The PM model is trained on the PM train
split with the same preset and settings and calibrated on the PM test split (written to
``OUT/models/pm-<model>``). Rows, each on an eval split with the posterior of the model's own
calibration:

- analytic -> analytic, pm -> pm (same simulator);
- analytic -> pm, pm -> analytic (cross simulator).

When ``--analytic`` is a run directory with ``metrics.json``, the result is also stored there
(``metrics.json["cross_simulation"]``, ``cross_simulation.json``) and its ``report.html`` is
rebuilt with the table.

Per row: bias and scatter of eps = log M_posterior-median - log M_true [dex], of the raw network
output too, the 68/95% coverage, and the same per true-mass bin. Writes
``OUT/cross_simulation.json`` and ``OUT/cross_simulation.md`` (atomically).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from clustermass._io import write_json_atomic, write_text_atomic
from clustermass.bundle import load_model
from clustermass.catalog import read_catalogue
from clustermass.config import load_config
from clustermass.evaluation import coverage_from_summary
from clustermass.inference import posterior_table
from clustermass.pipeline import calibrate_stage, train_stage

EDGES = (13.7, 14.0, 14.3, 14.6, 15.2)


def row_metrics(bundle, cat) -> dict:
    """Metrics of one calibrated bundle on the eval split of ``cat``."""
    rows = cat.rows("eval")
    t = posterior_table(bundle, cat, rows)
    true = cat.clusters["log_m200c"].to_numpy(float)[rows]
    med = t["log_m_median"].to_numpy(float)
    ok = np.isfinite(med)
    eps = med - true
    raw = t["d_pred"].to_numpy(float) - true
    out = {"n": int(ok.sum()), "bias": float(np.mean(eps[ok])), "scatter": float(np.std(eps[ok])),
           "raw_bias": float(np.nanmean(raw)), "raw_scatter": float(np.nanstd(raw)),
           **coverage_from_summary(t[ok], true[ok]), "bins": []}
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        s = ok & (true >= lo) & (true < hi)
        if s.sum() >= 5:
            cov = coverage_from_summary(t[s], true[s])
            out["bins"].append({"log_m": f"{lo}-{hi}", "n": int(s.sum()), "bias": float(np.mean(eps[s])),
                                "scatter": float(np.std(eps[s])), "coverage_68": cov["coverage_68"],
                                "coverage_95": cov["coverage_95"]})
    return out


def get_bundle(cfg, cat, model_dir: Path, kind: str, reuse: Path | None = None):
    """A calibrated bundle: ``reuse`` (or ``model_dir``, from an earlier run of this script) when
    it holds one, else trained + calibrated into ``model_dir``."""
    for d in (reuse, model_dir):
        if d is not None and (d / "calibration.json").is_file():
            return load_model(d)
    bundle = train_stage(cfg, cat, kind, model_dir, progress=True, overwrite=False)
    calibrate_stage(bundle, cat, cfg.calibration, progress=True)
    return load_model(model_dir)


def markdown(res: dict) -> str:
    lines = [f"Cross-simulation test ({res['model']}, preset {res['preset']}; command: `{res['command']}`)", "",
             "| trained on -> evaluated on | n | bias [dex] | scatter [dex] | raw bias / scatter [dex] | coverage 68% | coverage 95% |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['train']} -> {r['eval']} | {r['n']} | {r['bias']:+.3f} | {r['scatter']:.3f} | "
                     f"{r['raw_bias']:+.3f} / {r['raw_scatter']:.3f} | {r['coverage_68']:.3f} | {r['coverage_95']:.3f} |")
    lines += ["", "Per true-mass bin (bias / scatter / coverage 68%):", "",
              "| trained on -> evaluated on | " + " | ".join(f"{a}-{b}" for a, b in zip(EDGES[:-1], EDGES[1:], strict=True)) + " |",
              "|---|" + "---|" * (len(EDGES) - 1)]
    for r in res["rows"]:
        cells = {b["log_m"]: f"{b['bias']:+.2f} / {b['scatter']:.2f} / {b['coverage_68']:.2f} (n={b['n']})" for b in r["bins"]}
        lines.append(f"| {r['train']} -> {r['eval']} | " + " | ".join(
            cells.get(f"{a}-{b}", "-") for a, b in zip(EDGES[:-1], EDGES[1:], strict=True)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analytic", required=True, type=Path)
    ap.add_argument("--pm", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--model", default="cnn3d")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.preset, overrides=args.sets, seed=args.seed)
    t0 = time.perf_counter()
    a_dir = args.analytic / "catalogue" if (args.analytic / "catalogue").is_dir() else args.analytic
    cat_a, cat_p = read_catalogue(a_dir), read_catalogue(args.pm)
    reuse = args.analytic / "models" / args.model
    b_a = get_bundle(cfg, cat_a, args.out / "models" / f"analytic-{args.model}", args.model,
                     reuse if reuse.is_dir() else None)
    b_p = get_bundle(cfg, cat_p, args.out / "models" / f"pm-{args.model}", args.model)
    rows = []
    for train, b in (("analytic", b_a), ("pm", b_p)):
        for ev, c in (("analytic", cat_a), ("pm", cat_p)):
            rows.append({"train": train, "eval": ev, "same_simulator": train == ev, **row_metrics(b, c)})
    res = {"command": "python scripts/cross_simulation.py " + " ".join(
        [f"--analytic {args.analytic}", f"--pm {args.pm}", f"--out {args.out}", f"--preset {args.preset}",
         f"--model {args.model}", f"--seed {args.seed}"] + [f"--set {s}" for s in args.sets]),
        "model": args.model, "preset": args.preset, "rows": rows, "wall_s": time.perf_counter() - t0,
        "n_train": {"analytic": int(len(cat_a.rows("train"))), "pm": int(len(cat_p.rows("train")))}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "cross_simulation.json", res)
    md = markdown(res)
    write_text_atomic(args.out / "cross_simulation.md", md)
    metrics_file = args.analytic / "metrics.json"
    if metrics_file.is_file():  # a run directory: the table joins its metrics.json and report
        import json

        from clustermass.report import build_report

        metrics = json.loads(metrics_file.read_text())
        metrics["cross_simulation"] = res
        write_json_atomic(metrics_file, metrics)
        write_json_atomic(args.analytic / "cross_simulation.json", res)
        build_report(args.analytic)
    print(md)


if __name__ == "__main__":
    main()
