"""Make the simulator check figures and numbers of docs/simulator.md.

Usage: python scripts/simulator_checks.py [--n 6000] [--seed 0] [--out docs/img/simulator]
Writes simulator_*.png and simulator_checks.json into --out (about 30 s on one core).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from clustermass._io import save_figure, write_json_atomic
from clustermass.config import SimulationConfig, WindowConfig
from clustermass.plots import simulator as P
from clustermass.simulate import simulate_catalogue, summarize_catalogue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=6000, help="diagrams in the main catalogue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/img/simulator"))
    args = ap.parse_args()
    n = args.n
    sim = SimulationConfig(
        n_train=n // 2, n_test=n // 3, n_eval=n - n // 2 - n // 3, max_sightlines=10
    )
    window = WindowConfig()
    t0 = time.perf_counter()
    cat = simulate_catalogue(sim, window, args.seed, progress=False)
    t_sim = time.perf_counter() - t0
    # pure member dynamics: no interlopers, window wide enough not to truncate the members
    wide = simulate_catalogue(
        sim.model_copy(update={"interlopers": False, "n_train": n // 6, "n_test": 0, "n_eval": 0}),
        WindowConfig(r_max=3.0, v_max=6000.0),
        args.seed,
        progress=False,
    )
    out = args.out
    save_figure(
        P.plot_sigma_mass(wide, "members, untruncated", extra=(cat, "members in the window")),
        out / "simulator_sigma_mass.png",
    )
    save_figure(P.plot_interlopers(cat), out / "simulator_interlopers.png")
    save_figure(P.plot_richness(cat), out / "simulator_richness.png")
    save_figure(P.plot_mass_distribution(cat), out / "simulator_mass_distribution.png")
    cl = cat.clusters
    rng = np.random.default_rng(args.seed)
    picks = []
    for lo, hi in ((13.7, 13.9), (14.2, 14.4), (14.7, 14.9)):
        picks.append(int(rng.choice(np.flatnonzero(cl["log_m200c"].between(lo, hi)))))
    ic = np.flatnonzero(cl["has_interloper_cluster"])
    if ic.size:
        picks.append(int(rng.choice(ic)))
    save_figure(
        P.plot_example_diagrams(cat, picks, window.r_max, window.v_max),
        out / "simulator_examples.png",
    )

    lm, z, s = P.member_dispersion(wide)
    slope, icpt = np.polyfit(lm - 15.0, np.log10(s), 1)
    lm2, _, s2 = P.member_dispersion(cat)
    slope2, icpt2 = np.polyfit(lm2 - 15.0, np.log10(s2), 1)
    edges = [13.7, 14.0, 14.3, 14.6, 14.9, 15.2]
    b = np.digitize(cl["log_m200c"], edges[1:-1])
    per_bin = []
    for k in range(len(edges) - 1):
        sel = b == k
        per_bin.append(
            {
                "log_m": f"{edges[k]}-{edges[k + 1]}",
                "n_diagrams": int(sel.sum()),
                "median_n_gal": float(np.median(cl["n_gal"][sel])),
                "median_n_mem": float(np.median(cl["n_mem"][sel])),
                "interloper_fraction": float(1 - cl["n_mem"][sel].sum() / cl["n_gal"][sel].sum()),
                "frac_interloper_cluster": float(cl["has_interloper_cluster"][sel].mean()),
            }
        )
    res = {
        "n_diagrams": len(cat),
        "seed": args.seed,
        "simulate_seconds": round(t_sim, 2),
        "summary": summarize_catalogue(cat),
        "sigma_slope_untruncated": float(slope),
        "sigma_1e15_untruncated": float(10**icpt),
        "sigma_slope_window": float(slope2),
        "sigma_1e15_window": float(10**icpt2),
        "evrard_1e15": float(P.evrard_sigma(15.0, np.median(z))),
        "per_mass_bin": per_bin,
    }
    write_json_atomic(out / "simulator_checks.json", res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
