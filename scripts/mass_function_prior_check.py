"""Does ``--prior mass-function`` remove the Eddington bias? A check on mocks that follow the mass function.

Simulates clusters with the run's own simulator and survey settings, but with halo masses drawn
from the Tinker08 mass function (``simulation.mass_distribution=mass-function``, one sight line
per halo, a seed the run never used), infers their masses with a calibrated bundle under both
priors (the mass-function prior in the mocks' cosmology, Planck 2013; ``infer`` uses Planck 2018)
and prints, in bins of the posterior median, the mean (posterior median - true mass) with
its standard error, for all clusters and without the diagrams whose window holds a more massive
halo (mock truth: the blends of the paper's Fig. 6), the mean (posterior median - posterior mean)
(what a correct posterior of that shape would leave in the first), and the mean (posterior mean -
true mass) in bins of the posterior mean. Because the simulator is the one the bundle was
calibrated on, this isolates the prior (the transfer of the likelihood to another mock family or
to the sky is checked by scripts/mock_sky_check.py and scripts/cross_simulation.py). With
``--extra-calibration N`` it repeats the comparison with the bundle calibrated on its own pairs
plus N more flat-prior mocks (seed + 1; same calibration settings).

    python scripts/mass_function_prior_check.py --model runs/quick/models/cnn3d [--n 10000] \
        [--seed 101] [--out runs/mf_prior_check] [--figure docs/img/demo/mass_function_prior.png] \
        [--extra-calibration 12000]

Writes OUT/mass_function_prior_check.json, OUT/posteriors_<prior>.parquet (and the simulated
catalogues OUT/catalogue, OUT/extra_calibration, reused when present with the same settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass import cosmology, load_model
from clustermass._io import save_figure, write_json_atomic
from clustermass.calibration import cluster_conditions, fit_calibration
from clustermass.catalog import read_catalogue
from clustermass.config import load_config
from clustermass.evaluation import bias_by_estimate_bin
from clustermass.inference import posterior_table, write_table
from clustermass.simulate.mock import simulate_to_directory

PRIORS = ("flat", "mass-function")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/quick/models/cnn3d"))
    ap.add_argument("--preset", default="quick", help="the preset the model was trained with (simulator settings)")
    ap.add_argument("--n", type=int, default=10000, help="clusters drawn from the mass function")
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--out", type=Path, default=Path("runs/mf_prior_check"))
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--extra-calibration", type=int, default=0,
                    help="also calibrate on this many more flat-prior mocks (seed + 1) and compare again")
    args = ap.parse_args(argv)

    cfg = load_config(args.preset)
    cat = _simulated(cfg, "mass-function", args.n, args.seed, args.out / "catalogue")
    bundle = load_model(args.model)
    d_pred = bundle.predict(cat, progress=True)
    result = {"model": str(args.model), "preset": args.preset, "n_clusters": len(cat), "seed": args.seed}
    result.update(_compare_priors(bundle, cat, d_pred, None, args.out))
    if args.extra_calibration:
        # the same bundle, calibrated on its own pairs plus N more flat-prior mocks (another seed)
        extra = _simulated(cfg, "flat", args.extra_calibration, args.seed + 1, args.out / "extra_calibration")
        base = bundle.calibrated()
        cond = cluster_conditions(extra, None, bundle.window)
        pairs = pd.concat([base.pairs, cond.assign(d_pred=bundle.predict(extra, progress=True),
                                                   log_m_true=extra.clusters["log_m200c"].to_numpy())],
                          ignore_index=True)
        big = fit_calibration(pairs["d_pred"], pairs["log_m_true"], pairs[["z", "log_n_gal"]],
                              conditioning=base.conditioning, bandwidth=base.bandwidth,
                              min_neighbours=base.min_neighbours, prior_range=base.prior_range,
                              mean_degree=base.mean_degree, heteroscedastic=base.heteroscedastic)
        print(f"\ncalibrated on {len(base.pairs)} + {len(extra)} pairs:")
        result["extra_calibration"] = {"n_pairs": len(pairs), **_compare_priors(bundle, cat, d_pred, big, None)}
    tables = result.pop("tables")
    result.get("extra_calibration", {}).pop("tables", None)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "mass_function_prior_check.json", result)
    if args.figure is not None:
        save_figure(plot_prior_bias(tables), args.figure)
    return result


def _simulated(cfg, distribution: str, n: int, seed: int, directory: Path):
    """A catalogue of ``n`` clusters from the preset's simulator with masses drawn ``distribution``
    (reused when ``directory`` holds one made with the same settings)."""
    sim = cfg.simulation.model_copy(update={"mass_distribution": distribution, "n_train": 0, "n_test": 0,
                                            "n_eval": n})
    settings = {"seed": seed, "n": n, "distribution": distribution, "simulation": sim.model_dump(mode="json")}
    meta = directory / "catalogue.json"
    if not (meta.is_file() and json.loads(meta.read_text()).get("mf_check") == settings):
        simulate_to_directory(sim, cfg.window, seed, directory, meta={"mf_check": settings})
    return read_catalogue(directory)


def _compare_priors(bundle, cat, d_pred, calibration, out: Path | None) -> dict:
    """Posterior tables under both priors (written to OUT when given), the printed comparison, and
    its numbers (``tables``: the bias per bin of the median, for the figure)."""
    # mock truth: diagrams whose window holds a more massive halo (blends, paper Fig. 6)
    blend = cat.clusters["has_interloper_cluster"].to_numpy(bool)
    result = {"blend_fraction": float(blend.mean())}
    tables = {}
    base = calibration if calibration is not None else bundle.calibrated()
    for prior in PRIORS:  # the prior is the mocks' own mass function (their cosmology)
        cal = base.with_prior(prior, **({"cosmo": cosmology.SIMULATION_COSMOLOGY} if prior == "mass-function" else {}))
        post = posterior_table(bundle, cat, prior=prior, d_pred=d_pred, calibration=cal)
        ok = np.isfinite(post["log_m_median"].to_numpy(float))
        truth = post["log_m_true"].to_numpy(float)
        inside = (truth >= post["log_m_lo1"]) & (truth <= post["log_m_hi1"])
        inside2 = (truth >= post["log_m_lo2"]) & (truth <= post["log_m_hi2"])
        tab = bias_by_estimate_bin(post["log_m_median"], truth)
        clean = bias_by_estimate_bin(post["log_m_median"][~blend], truth[~blend])
        # the posterior mean is unbiased in bins of itself for a correct posterior, skewed or not
        # (E[m | x] is the mean); the median is not where blends make the posteriors skewed:
        # there mean(median - true) = mean(median - posterior mean) for a correct posterior
        by_mean = bias_by_estimate_bin(post["log_m_mean"], truth)
        skew = bias_by_estimate_bin(post["log_m_median"], post["log_m_mean"])
        tables[prior] = tab
        if out is not None:
            write_table(post, out / f"posteriors_{prior}.parquet")
        result[prior] = {"n_inferred": int(ok.sum()), "coverage_68": float(inside[ok].mean()),
                         "coverage_95": float(inside2[ok].mean()), "by_median_bin": tab.to_dict("list"),
                         "by_median_bin_without_blends": clean.to_dict("list"),
                         "mean_by_mean_bin": by_mean.to_dict("list"),
                         "median_minus_mean_by_median_bin": skew.to_dict("list")}
    print("| bin of posterior median | n (flat / mf) | flat: mean(median - true) | mass-function: mean(median - true) "
          "| mass-function: mean(median - posterior mean) |")
    print("|---|---|---|---|---|")
    f, m = tables["flat"], tables["mass-function"]
    sk = result["mass-function"]["median_minus_mean_by_median_bin"]["bias"]
    for i in range(len(f)):
        print(f"| {f.lo[i]:.1f}-{f.hi[i]:.1f} | {f.n[i]} / {m.n[i]} | {f.bias[i]:+.3f} ± {f.bias_err[i]:.3f} "
              f"| {m.bias[i]:+.3f} ± {m.bias_err[i]:.3f} | {sk[i]:+.3f} |")
    print(f"without the diagrams whose window holds a more massive halo ({result['blend_fraction']:.1%} of them; "
          "mock truth):")
    _print_bins(result, "by_median_bin_without_blends")
    print("mean(posterior mean - true) in bins of the posterior mean:")
    _print_bins(result, "mean_by_mean_bin")
    for prior in PRIORS:
        print(f"{prior}: 68/95% coverage {result[prior]['coverage_68']:.3f} / {result[prior]['coverage_95']:.3f}")
    result["tables"] = tables
    return result


def _print_bins(result: dict, key: str) -> None:
    """One line per prior: bias ± error (n) in each bin of ``result[prior][key]``."""
    for prior in PRIORS:
        c = result[prior][key]
        print(f"  {prior}: " + ", ".join(f"{b:+.3f} ± {e:.3f} ({n})"
                                         for b, e, n in zip(c["bias"], c["bias_err"], c["n"], strict=True)))


def plot_prior_bias(tables: dict):
    """Mean (median - true) per bin of the posterior median, one series per prior."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, (prior, tab) in enumerate(tables.items()):
        mid = 0.5 * (tab.lo + tab.hi) + (k - 0.5) * 0.02
        ax.errorbar(mid, tab.bias, yerr=tab.bias_err, fmt="o-", capsize=3, label=f"--prior {prior}")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(-0.03, 0.03, color="0.9", zorder=0, label="±0.03 dex")
    ax.set_xlabel(r"posterior median $\log_{10} M_{200c}$ [$h^{-1} M_\odot$]")
    ax.set_ylabel("mean(median - true) [dex]")
    ax.set_title("clusters drawn from the mass function")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
