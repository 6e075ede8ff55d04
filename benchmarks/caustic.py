"""The caustic baseline: accuracy on clean halos, cost and raw residuals on a catalogue, and
(where installed) CausticSNUpy's cost on the same diagrams.

1. ``nfw``: 12 NFW halos (log M200c 14.0-14.9, z = 0.05) of 200 members out to 2 R200c with
   Jeans velocities (the simulator's beta(r)), no interlopers: median and scatter of the caustic
   M200c residual (the case of ``tests/test_baselines.py``).
2. ``catalogue`` (with ``--catalogue DIR``): :func:`clustermass.baselines.run_baselines` with
   ``methods=["caustic"]`` on the ``test`` and ``eval`` rows (the quick preset's 4500 diagrams
   are what ``evaluate`` runs it on), wall and CPU time, raw residual mean/std on ``eval`` and
   per 0.3 dex of true mass, failures, fraction with R200c beyond the window.
3. ``causticsnupy`` (``--snupy N`` diagrams of the catalogue, if ``causticsnupy`` is importable;
   not a dependency): ``caustics.run_from_array`` on RA/Dec/cz built from each diagram (cluster
   at RA 180, Dec 0; offsets through the angular-diameter distance of
   ``clustermass.cosmology``; ``cz = c z_cl + v_los (1 + z_cl)``), centre given, H0 = 100.
   Version 1.0.4 calls ``np.trapz`` (removed in numpy 2.4): the alias is restored for the run.

    .venv/bin/python benchmarks/caustic.py [--catalogue runs/quick/catalogue] [--limit N] [--snupy 3]

Prints a summary and writes ``benchmarks/results/caustic.json`` atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from clustermass import cosmology
from clustermass._io import write_json_atomic
from clustermass.simulate.checks import nfw_jeans_diagram


def bench_nfw() -> dict:
    from clustermass.caustic import caustic_mass

    z, lms = 0.05, np.linspace(14.0, 14.9, 12)
    t0 = time.perf_counter()
    eps = np.array([caustic_mass(nfw_jeans_diagram(lm, z, 200, 100 + i), z).log_m - lm for i, lm in enumerate(lms)])
    return {"n_halos": len(lms), "members": 200, "eps_median": float(np.median(eps)),
            "eps_std": float(np.std(eps, ddof=1)), "eps_max_abs": float(np.abs(eps).max()),
            "ms_per_halo": 1e3 * (time.perf_counter() - t0) / len(lms)}


def bench_catalogue(cat, limit: int | None) -> dict:
    from clustermass.baselines import run_baselines
    from clustermass.config import WindowConfig

    test, ev = cat.rows("test"), cat.rows("eval")
    if limit:
        test, ev = test[: limit // 2], ev[: limit - limit // 2]
    rows = np.concatenate([test, ev])
    t, c = time.perf_counter(), time.process_time()
    df = run_baselines(cat, rows, progress=True, methods=["caustic"], window=WindowConfig())
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    truth = cat.clusters["log_m200c"].to_numpy(float)[rows]
    e = df["log_m_caustic"].to_numpy(float) - truth
    is_eval = np.arange(len(rows)) >= len(test)
    ok = np.isfinite(e) & is_eval
    bins = {}
    for lo in np.arange(13.7, 15.2, 0.3):
        s = ok & (truth >= lo) & (truth < lo + 0.3)
        bins[f"{lo:.1f}-{lo + 0.3:.1f}"] = {"n": int(s.sum()), "eps_mean": float(e[s].mean()) if s.any() else None,
                                            "eps_std": float(e[s].std(ddof=1)) if s.sum() > 1 else None}
    return {"n_diagrams": len(rows), "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_diagram": 1e3 * cpu / len(rows),
            "n_eval": int(is_eval.sum()), "eval_eps_raw_mean": float(e[ok].mean()),
            "eval_eps_raw_std": float(e[ok].std(ddof=1)), "failures": df.attrs["failures"]["caustic"],
            "extrapolated_fraction": float(df["caustic_extrapolated"].mean()), "eval_by_mass": bins}


def bench_snupy(cat, n: int) -> dict:
    try:
        from causticsnupy import caustics
    except ImportError:
        return {"available": False}
    from clustermass.caustic import caustic_mass

    if not hasattr(np, "trapz"):  # causticsnupy 1.0.4 on numpy >= 2.4
        np.trapz = np.trapezoid
    om = cosmology.use().Om0
    out = []
    for row in cat.rows("eval")[:n]:
        pts = cat.points(int(row))
        z = float(cat.clusters["redshift"].iloc[int(row)])
        da = float(cosmology.angular_diameter_distance(z))
        ra, dec = 180.0 + np.degrees(pts[:, 0] / da), np.degrees(pts[:, 1] / da)
        cz = cosmology.C_KMS * z + pts[:, 2] * (1 + z)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every kappa step
            res = caustics.run_from_array(ra, dec, cz, cz.min() - 1, cz.max() + 1, r_max=1.6, v_max=2200,
                                          ra_cl=180.0, dec_cl=0.0, v_cl=cosmology.C_KMS * z, center_given=True,
                                          H0=100, Om0=om, Ode0=1 - om, display_log=False)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        ours = caustic_mass(pts, z)
        out.append({"n_gal": len(pts), "snupy_s": dt, "ours_s": time.perf_counter() - t,
                    "snupy_log_m_max": float(np.log10(np.max(res.M))), "ours_log_m200c": ours.log_m})
    return {"available": True, "diagrams": out,
            "snupy_s_mean": float(np.mean([o["snupy_s"] for o in out])) if out else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalogue", type=Path, help="a catalogue directory (e.g. runs/quick/catalogue)")
    ap.add_argument("--limit", type=int, default=None, help="diagrams of the catalogue (half test, half eval)")
    ap.add_argument("--snupy", type=int, default=0, help="diagrams to run CausticSNUpy on (if installed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "caustic.json")
    args = ap.parse_args()
    result = {"nfw": bench_nfw()}
    if args.catalogue is not None:
        from clustermass.catalog import read_catalogue

        cat = read_catalogue(args.catalogue)
        result["catalogue"] = {"path": str(args.catalogue), **bench_catalogue(cat, args.limit)}
        if args.snupy:
            result["causticsnupy"] = bench_snupy(cat, args.snupy)
    print(json.dumps(result, indent=1))
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
