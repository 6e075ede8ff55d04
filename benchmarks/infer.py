"""Benchmark: clusters per second for `infer` on a mock sky (selection + conversion to phase space).

Times :func:`clustermass.sky.sky_to_catalogue` (cKDTree on the sky, gnomonic projection,
window, flags) on N clusters of a mock sky against a brute-force reference (every galaxy
projected for every cluster, a loop over clusters), checks that both select the same galaxies,
and prints the ratio. With ``--model BUNDLE`` it also times the whole ``infer_sky`` (KDE and
network included). Target (issue 9): the 910-cluster SDSS sample in under a minute on 2 cores.

    python benchmarks/infer.py --quick          # < 1 min: ~1,000 clusters (down to 10^13) on 1,700 deg^2
    python benchmarks/infer.py --area 9000 --log-m-min 13.7   # SDSS-like sample
Writes benchmarks/results/infer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from clustermass._io import write_json_atomic
from clustermass.config import WindowConfig
from clustermass.simulate.mocksky import simulate_sky
from clustermass.sky import SkyWarning, los_velocity, sky_to_catalogue, sky_to_projected


def brute_force_counts(gal, cl, window: WindowConfig) -> np.ndarray:
    """Reference: loop over clusters, project every galaxy, cut to the window."""
    ra, dec, z = (gal[c].to_numpy() for c in ("ra", "dec", "z"))
    out = np.empty(len(cl), dtype=np.int64)
    for i, (ra0, dec0, z0) in enumerate(cl[["ra", "dec", "z"]].to_numpy()):
        x, y = sky_to_projected(ra, dec, ra0, dec0, z0)
        v = los_velocity(z, z0)
        out[i] = np.count_nonzero((np.abs(x) <= window.r_max) & (np.abs(y) <= window.r_max)
                                  & (np.abs(v) <= window.v_max))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small mock sky (default sizes are quick too)")
    ap.add_argument("--area", type=float, default=1700.0, help="mock-sky area [deg^2]")
    ap.add_argument("--log-m-min", type=float, default=13.0, help="cluster mass cut [log10 h^-1 Msun]")
    ap.add_argument("--log-m-halo-min", type=float, default=11.5, help="smallest galaxy host halo")
    ap.add_argument("--n-clusters", type=int, default=1000, help="clusters timed")
    ap.add_argument("--n-reference", type=int, default=100, help="clusters for the brute-force reference")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="calibrated bundle: also time infer_sky")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "infer.json")
    args = ap.parse_args()
    if args.quick:
        args.repeat = min(args.repeat, 3)

    t0 = time.perf_counter()
    gal, cl, _ = simulate_sky(args.area, 250.0, 18.0, args.log_m_min, args.seed,
                              log_m_halo_min=args.log_m_halo_min)
    t_mock = time.perf_counter() - t0
    cl = cl.iloc[: args.n_clusters].reset_index(drop=True)
    n = len(cl)
    window = WindowConfig()

    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkyWarning)
            cat, info = sky_to_catalogue(gal, cl, window, mag_col="mag_r", mag_limit=18.0, distance_max=250.0)
        times.append(time.perf_counter() - t)
    t_sel = min(times)

    n_ref = min(args.n_reference, n)
    t = time.perf_counter()
    ref_counts = brute_force_counts(gal, cl.iloc[:n_ref], window)
    t_ref = time.perf_counter() - t
    same = bool(np.array_equal(ref_counts, info["n_gal"].to_numpy()[:n_ref]))

    rows = [
        ("sky_to_catalogue (cKDTree)", n, t_sel, n / t_sel),
        ("brute force (loop, reference)", n_ref, t_ref, n_ref / t_ref),
    ]
    result = {
        "benchmark": "infer",
        "n_galaxies": int(len(gal)), "n_clusters": n, "area_deg2": args.area,
        "log_m_min": args.log_m_min, "median_n_gal": float(info["n_gal"].median()),
        "mock_sky_seconds": t_mock,
        "selection_seconds": t_sel, "selection_clusters_per_s": n / t_sel,
        "reference_clusters_per_s": n_ref / t_ref, "speedup_vs_reference": (n / t_sel) / (n_ref / t_ref),
        "same_selection_as_reference": same,
        "seconds_for_910_clusters_selection": 910 * t_sel / n,
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
    }
    if args.model is not None:
        from clustermass import load_model
        from clustermass.inference import infer_sky

        bundle = load_model(args.model)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkyWarning)
            post = infer_sky(bundle, gal, cl, mag_col="mag_r")
        t_inf = time.perf_counter() - t
        rows.append(("infer_sky (selection + KDE + network)", n, t_inf, n / t_inf))
        result.update({"infer_seconds": t_inf, "infer_clusters_per_s": n / t_inf,
                       "seconds_for_910_clusters_infer": 910 * t_inf / n,
                       "n_predicted": int(np.isfinite(post["log_m_map"]).sum())})

    print(f"mock sky: {len(gal)} galaxies, {n} clusters ({args.area:g} deg^2, log M >= {args.log_m_min}), "
          f"median {result['median_n_gal']:.0f} galaxies per window; built in {t_mock:.1f} s")
    print(f"{'step':40s} {'clusters':>9s} {'seconds':>9s} {'clusters/s':>11s}")
    for name, k, s, rate in rows:
        print(f"{name:40s} {k:9d} {s:9.3f} {rate:11.1f}")
    print(f"speed-up vs brute force: {result['speedup_vs_reference']:.1f}x; same selection: {same}")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
