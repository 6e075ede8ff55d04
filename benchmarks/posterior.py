"""SBI posteriors: closed-form joint-KDE mixture (clustermass) vs the authors' grid slicing.

Synthetic calibration pairs mimic a CNN test split (log M uniform in [13.7, 15.2], prediction
= M + 0.04 + N(0, 0.16) with a mild curvature) and the predictions to infer are drawn the same
way, 1% of them outside the calibration range. clustermass fits ``JointKDEPosterior`` and
summarises all of them. The reference is the authors' approach: scipy ``gaussian_kde`` of the
pairs (same bandwidth) evaluated on a 1000 x 1000 grid, each
posterior being the normalised grid row nearest to its prediction (MAP = grid argmax,
quantiles from the cumulative sum, linearly interpolated). The reference evaluates only the
grid rows that a random subsample of predictions needs; its time is extrapolated to the full
grid (the cost of the method is the grid, independent of the number of posteriors). On that
subsample the two sets of summaries are compared, for two grid extents: the pairs' range
padded by 5 kernel widths on each axis (the whole KDE: a check of the numerics, limited by
the grid step) and the pairs' bare range (as a plain mgrid over the data would do: it cuts the
KDE's tails beyond the mass range of the calibration and so shifts the tail quantiles).

Also timed: the boundary-corrected posterior (kernels cut to the prior range [13.7, 15.2] and
renormalised, the default since issue 13) on the same 1e5 predictions; and the pipeline's
default, p(log M | d_pred, z, log n_gal) (bandwidth 0.40, quadratic trend, heteroscedastic,
prior edges), for ``--cond-posteriors`` predictions (default 1e5) drawn like the pairs (z
uniform in [0.02, 0.09], log n_gal from mass and redshift with 0.15 dex scatter; 1% moved off
the richness relation, to be flagged). Every one of them is solved exactly (no interpolation
in 3 conditioning dimensions) through the low-rank path (``JointKDEPosterior._fast_tables``).
The sums over pairs run in torch (float64, ``torch.get_num_threads()`` threads); torch is
imported before the clock starts (as in the pipeline, where the CNN has loaded it) and its
one-time import is recorded as ``torch_import_s``. It is compared, on a subsample, with (a)
the direct evaluation of every component (the implementation before the low-rank path,
``method="direct"``) and (b) the authors' grid
approach generalised to 3 conditioning variables: scipy ``gaussian_kde`` of (x, log M), one
1000-point log M grid row per posterior at its x (a 4-D grid over x is out of reach), against
our posterior with the same plain kernel (``mean_degree=1``, no prior edges). The 3-variable
default is also timed under the mass-function prior (``log_prior``: every posterior's tables
tilted by the prior; summaries only, the fit being the same).

    .venv/bin/python benchmarks/posterior.py [--quick] [--pairs 20000] [--posteriors 100000] [--compare-rev REV]

Prints a table and writes ``benchmarks/results/posterior.json`` atomically.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy.stats import gaussian_kde

from _revision import run_at_revision
from clustermass._io import write_json_atomic
from clustermass.posterior import QUANTILES, JointKDEPosterior

COLUMNS = ("log_m_map", "log_m_median", "log_m_mean", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2")


def make_pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    m = rng.uniform(13.7, 15.2, n)
    d = m + 0.04 + rng.normal(0.0, 0.16, n) - 0.08 * (m - 14.45) ** 2
    return d, m


def reference_summaries(kde, d_grid, m_grid, d_obs):
    """Authors' method for ``d_obs``; evaluates only the needed rows. Returns (table, s/row)."""
    rows = np.abs(d_obs[:, None] - d_grid[None, :]).argmin(1)
    need = np.unique(rows)
    t0 = time.perf_counter()
    dens = {r: kde(np.vstack([np.full_like(m_grid, d_grid[r]), m_grid])) for r in need}
    per_row = (time.perf_counter() - t0) / need.size
    out = {k: np.empty(d_obs.size) for k in COLUMNS}
    for j, r in enumerate(rows):
        y = dens[r] / dens[r].sum()
        cdf = np.cumsum(y)
        out["log_m_map"][j] = m_grid[np.argmax(y)]
        out["log_m_mean"][j] = np.sum(y * m_grid)
        for k, q in QUANTILES.items():
            out[k][j] = np.interp(q, cdf, m_grid)
    return out, per_row


def conditions(mass, seed):
    """Redshift and log n_gal of clusters of log mass ``mass`` (the 3-variable case's mocks)."""
    rz = np.random.default_rng(seed)
    z = rz.uniform(0.02, 0.09, mass.size)
    return z, 0.9 * (mass - 14.0) - 8.0 * (z - 0.05) + 2.0 + rz.normal(0, 0.15, mass.size)


def conditional_inputs(pairs: int, posteriors: int, seed: int):
    """Pairs (x, m) and queries xq of the 3-variable case (1% of queries off the richness relation)."""
    d, m = make_pairs(pairs, seed)
    x = np.column_stack([d, *conditions(m, seed + 3)])
    dq, mq = make_pairs(posteriors, seed + 4)
    xq = np.column_stack([dq, *conditions(mq, seed + 5)])
    off = max(posteriors // 100, 1)
    xq[:off, 2] += np.random.default_rng(seed + 2).choice([-1.0, 1.0], off)
    return x, m, xq, off


_OLD_SNIPPET = """
import json, sys, time
import torch  # noqa: F401  (as in the current run: loaded before the clock)
from posterior import conditional_inputs
from clustermass.posterior import JointKDEPosterior
a = json.loads(sys.argv[1])
x, m, xq, _ = conditional_inputs(a["pairs"], a["posteriors"], a["seed"])
t = time.perf_counter()
post = JointKDEPosterior(bandwidth=a["bw"], prior_range=(13.7, 15.2), mean_degree=2, heteroscedastic=True).fit(x, m)
post._fast_setup()
t_fit = time.perf_counter() - t
t = time.perf_counter()
post.summarize(xq)
print(json.dumps([t_fit, time.perf_counter() - t]))
"""


def conditional_3d(args, rng) -> dict:
    """The 3-variable default posterior: timing for ``args.cond_posteriors`` predictions and the
    comparison with the direct and grid references on a subsample (module docstring); with
    ``args.compare_rev`` also the same timing at that git revision, right after ours."""
    nq, bw = args.cond_posteriors, args.cond_bandwidth
    sub = min(args.cond_subsample or (12 if args.quick else 60), nq)
    x, m, xq, off = conditional_inputs(args.pairs, nq, args.seed)
    t0 = time.perf_counter()
    import torch  # the fast path's kernel sums (loaded anyway where a CNN made the predictions)
    t_torch = time.perf_counter() - t0  # one-time, outside the timings below
    t0 = time.perf_counter()
    post = JointKDEPosterior(bandwidth=bw, prior_range=(13.7, 15.2), mean_degree=2, heteroscedastic=True).fit(x, m)
    post._fast_setup()  # the low-rank factorisation (otherwise built by the first summarize)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    tab = post.summarize(xq)
    t_sum = time.perf_counter() - t0
    # the same posteriors under the mass-function prior (``infer --prior mass-function``); imported
    # here: --compare-rev imports this module's input generators with an older clustermass
    from clustermass.calibration import MassFunctionPrior

    post_mf = JointKDEPosterior(bandwidth=bw, prior_range=(13.7, 15.2), mean_degree=2, heteroscedastic=True,
                                log_prior=MassFunctionPrior((13.7, 15.2))).fit(x, m)
    post_mf._fast_setup()
    t0 = time.perf_counter()
    post_mf.summarize(xq, prior_z=xq[:, 1])
    t_mf = time.perf_counter() - t0
    old = run_at_revision(args.compare_rev, _OLD_SNIPPET, {"pairs": args.pairs, "posteriors": nq, "seed": args.seed,
                                                          "bw": bw}) if args.compare_rev else None
    pick = np.sort(rng.choice(np.arange(off, nq), sub, replace=False))  # in-range subsample
    t0 = time.perf_counter()
    ref = post.summarize(xq[pick], method="direct")
    t_direct = (time.perf_counter() - t0) / sub
    diff_direct = {k: float(np.max(np.abs(tab[k].to_numpy()[pick] - ref[k].to_numpy()))) for k in COLUMNS}
    flags_equal = bool((tab.out_of_range.to_numpy()[pick] == ref.out_of_range.to_numpy()).all())
    # the authors' grid approach on the plain kernel (mean_degree 1, no prior edges): same model
    plain = JointKDEPosterior(bandwidth=bw).fit(x, m)
    ours = plain.summarize(xq[pick])
    kde = gaussian_kde(np.vstack([x.T, m]), bw_method=bw)
    pad = 5 * np.sqrt(kde.covariance[-1, -1])
    m_grid = np.linspace(m.min() - pad, m.max() + pad, args.grid)
    grid = {k: np.empty(sub) for k in COLUMNS}
    t0 = time.perf_counter()
    for j, xi in enumerate(xq[pick]):
        y = kde(np.vstack([np.repeat(xi[:, None], m_grid.size, 1), m_grid]))
        y = y / y.sum()
        cdf = np.cumsum(y)
        grid["log_m_map"][j] = m_grid[np.argmax(y)]
        grid["log_m_mean"][j] = np.sum(y * m_grid)
        for k, q in QUANTILES.items():
            grid[k][j] = np.interp(q, cdf, m_grid)
    t_grid = (time.perf_counter() - t0) / sub
    inside = ~ours.out_of_range.to_numpy()
    diff_grid = {k: float(np.max(np.abs(ours[k].to_numpy()[inside] - grid[k][inside]))) for k in COLUMNS}
    total = t_fit + t_sum
    return {
        "pairs": int(m.size), "posteriors": nq, "bandwidth": bw, "out_of_range": int(tab.out_of_range.sum()),
        "torch_import_s": t_torch, "torch_threads": torch.get_num_threads(),
        "fit_s": t_fit, "summarize_s": t_sum, "total_s": total, "s_per_posterior": total / nq,
        "mass_function_prior_summarize_s": t_mf,
        "lowrank_rank": int(post.lowrank_rank_), "lowrank_error": float(post.lowrank_error_),
        "weight_cut": post.weight_cut, "compared_posteriors": sub,
        "direct_s_per_posterior": t_direct, "direct_total_s_extrapolated": t_direct * nq,
        "speedup_vs_direct": t_direct * nq / total, "max_abs_diff_vs_direct_dex": diff_direct,
        "flags_equal_to_direct": flags_equal,
        "grid_s_per_posterior": t_grid, "grid_total_s_extrapolated": t_grid * nq, "speedup_vs_grid": t_grid * nq / total,
        "grid_m_step_dex": float(m_grid[1] - m_grid[0]), "max_abs_diff_vs_grid_dex": diff_grid,
        "compare_rev": args.compare_rev or None, "compare_rev_fit_s": old[0] if old else None,
        "compare_rev_summarize_s": old[1] if old else None,
        "compare_rev_total_s": sum(old) if old else None,
        "speedup_vs_compare_rev": sum(old) / total if old else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small reference subsample (< 1 min)")
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--posteriors", type=int, default=100_000)
    ap.add_argument("--subsample", type=int, default=None, help="reference posteriors (default 300, quick 25)")
    ap.add_argument("--bandwidth", type=float, default=0.20)
    ap.add_argument("--grid", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cond-posteriors", type=int, default=100_000,
                    help="predictions summarised by the 3-D conditional posterior (0: skip)")
    ap.add_argument("--cond-bandwidth", type=float, default=0.40, help="the pipeline default (CalibrationConfig)")
    ap.add_argument("--cond-subsample", type=int, default=None,
                    help="3-D posteriors compared with the direct and grid references (default 60, quick 12)")
    ap.add_argument("--compare-rev", default="", help="also time the 3-variable case with this git revision's clustermass")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "posterior.json"))
    args = ap.parse_args(argv)
    sub = args.subsample or (25 if args.quick else 300)

    d, m = make_pairs(args.pairs, args.seed)
    d_obs, _ = make_pairs(args.posteriors, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    n_out = args.posteriors // 100
    d_obs[:n_out] = rng.choice([d.min() - 0.3, d.max() + 0.3], n_out) + rng.normal(0, 0.1, n_out)

    t0 = time.perf_counter()
    post = JointKDEPosterior(bandwidth=args.bandwidth).fit(d, m)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    tab = post.summarize(d_obs)
    t_ours = time.perf_counter() - t0

    pick = np.sort(rng.choice(args.posteriors, sub, replace=False))
    pick[0] = 0  # include one extrapolated prediction
    t0 = time.perf_counter()
    ex = post.summarize(d_obs[pick], method="exact")
    t_exact = (time.perf_counter() - t0) / sub

    kde = gaussian_kde(np.vstack([d, m]), bw_method=args.bandwidth)
    pad_d, pad_m = 5 * np.sqrt(kde.covariance[0, 0]), 5 * np.sqrt(kde.covariance[1, 1])
    d_grid = np.linspace(d.min() - pad_d, d.max() + pad_d, args.grid)
    m_grid = np.linspace(m.min() - pad_m, m.max() + pad_m, args.grid)
    ref, per_row = reference_summaries(kde, d_grid, m_grid, d_obs[pick])
    t_ref = per_row * args.grid  # the full 1000 x 1000 grid
    d_bare, m_bare = np.linspace(d.min(), d.max(), args.grid), np.linspace(m.min(), m.max(), args.grid)
    ref_bare, _ = reference_summaries(kde, d_bare, m_bare, d_obs[pick])
    inside = ~tab.out_of_range.to_numpy()[pick]
    diff = {k: float(np.max(np.abs(tab[k].to_numpy()[pick] - ref[k]))) for k in COLUMNS}
    diff_in = {k: float(np.max(np.abs(tab[k].to_numpy()[pick][inside] - ref[k][inside]))) for k in COLUMNS}
    diff_bare = {k: float(np.max(np.abs(tab[k].to_numpy()[pick][inside] - ref_bare[k][inside]))) for k in COLUMNS}
    t0 = time.perf_counter()
    post_b = JointKDEPosterior(bandwidth=args.bandwidth, prior_range=(13.7, 15.2)).fit(d, m)
    tab_b = post_b.summarize(d_obs)
    t_bound = time.perf_counter() - t0
    cond = conditional_3d(args, rng) if args.cond_posteriors else None
    interp_vs_exact = float(np.nanmax(np.abs(tab.loc[pick, list(COLUMNS)].to_numpy() - ex[list(COLUMNS)].to_numpy())))
    result = {
        "pairs": args.pairs,
        "posteriors": args.posteriors,
        "out_of_range": int(tab.out_of_range.sum()),
        "bandwidth": args.bandwidth,
        "threads": {v: os.environ.get(v, "unset") for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "load_average_at_start": list(os.getloadavg()),
        "ours_fit_s": t_fit,
        "ours_summarize_s": t_ours,
        "ours_total_s": t_fit + t_ours,
        "ours_boundary_corrected_total_s": t_bound,
        "ours_boundary_corrected_out_of_range": int(tab_b.out_of_range.sum()),
        "conditional_3d": cond,
        "ours_exact_per_posterior_s": t_exact,
        "reference_grid": f"{args.grid}x{args.grid}",
        "reference_rows_evaluated": int(np.unique(np.abs(d_obs[pick][:, None] - d_grid).argmin(1)).size),
        "reference_s_per_row": per_row,
        "reference_total_s_extrapolated": t_ref,
        "speedup": t_ref / (t_fit + t_ours),
        "compared_posteriors": sub,
        "max_abs_diff_dex": diff,
        "max_abs_diff_dex_in_range": diff_in,
        "max_abs_diff_dex_in_range_bare_grid": diff_bare,
        "reference_grid_step_dex": {"d": float(d_grid[1] - d_grid[0]), "log_m": float(m_grid[1] - m_grid[0])},
        "ours_interp_vs_exact_max_dex": interp_vs_exact,
        "ours_interp_error_check_dex": post.interp_error_,
        "ours_truncation_bound": post.truncation_bound_,
    }
    print(f"{'':34s}{'clustermass':>14s}{'authors (grid)':>16s}")
    print(f"{'time for ' + str(args.posteriors) + ' posteriors [s]':34s}{t_fit + t_ours:14.2f}{t_ref:16.1f}  (x{result['speedup']:.0f})")
    print(f"{'  of which fit / summaries [s]':34s}{t_fit:7.2f} / {t_ours:5.2f}")
    print(f"max |difference| on {sub} posteriors [dex]: padded grid in range / all; bare grid in range")
    for k in COLUMNS:
        print(f"  {k:14s} {diff_in[k]:.4f} / {diff[k]:.4f}   {diff_bare[k]:.4f}")
    print(f"boundary-corrected (prior range 13.7-15.2), {args.posteriors} posteriors: {t_bound:.2f} s "
          f"(x{t_ref / t_bound:.0f} vs the grid)")
    if cond:
        c = cond
        print(f"\nconditional on (d_pred, z, log n_gal), pipeline default (bandwidth {c['bandwidth']}, trend, "
              f"heteroscedastic, prior edges), every posterior exact")
        print(f"{'':34s}{'clustermass':>14s}{'direct (before)':>17s}{'authors (grid)':>16s}")
        print(f"{'time for ' + str(c['posteriors']) + ' posteriors [s]':34s}{c['total_s']:14.2f}"
              f"{c['direct_total_s_extrapolated']:17.0f}{c['grid_total_s_extrapolated']:16.0f}")
        rd, rg = f"x{c['speedup_vs_direct']:.0f}", f"x{c['speedup_vs_grid']:.0f}"
        print(f"{'  ratio':34s}{'':14s}{rd:>17s}{rg:>16s}")
        if c["compare_rev"]:
            print(f"{'  at ' + c['compare_rev'] + ' (same run) [s]':34s}{c['compare_rev_total_s']:14.2f}"
                  f"   (ours x{c['speedup_vs_compare_rev']:.2f} faster)")
        print(f"{'  of which fit+factorise / summaries [s]':34s}{c['fit_s']:7.2f} / {c['summarize_s']:5.2f}"
              f"   (rank {c['lowrank_rank']}, out of range {c['out_of_range']})")
        print(f"{'  summaries, mass-function prior [s]':34s}{c['mass_function_prior_summarize_s']:14.2f}")
        print(f"max |difference| on {c['compared_posteriors']} posteriors [dex]: vs direct (default model); "
              f"vs grid (plain kernel, in range)")
        for k in COLUMNS:
            print(f"  {k:14s} {c['max_abs_diff_vs_direct_dex'][k]:.1e}   {c['max_abs_diff_vs_grid_dex'][k]:.4f}")
    print(f"ours: interpolated vs exact {interp_vs_exact:.1e} dex; truncation bound {post.truncation_bound_:.1e}")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
