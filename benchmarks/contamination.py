"""Interloper-cluster finder: cKDTree (clustermass) vs the naive double loop (and a numpy loop).

A synthetic 1 h^-1 Gpc box of cluster-scale halos (log M200c >= 13.7 from the Tinker et al.
2008 mass function, half of them clustered around others) is viewed along random sight lines
to make the paper's ~4.3e4 diagrams. The tree finder runs on all of them; the reference double
loop (every diagram x every halo, as in the authors' script) on a random subsample, checked
for identical output there and extrapolated linearly to the full set.

    .venv/bin/python benchmarks/contamination.py [--quick] [--diagrams 43000] [--naive 100]

Prints a table and writes ``benchmarks/results/contamination.json`` atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass import cosmology
from clustermass._io import write_json_atomic
from clustermass.contamination import (
    contamination_table,
    interlopers_in_box,
    interlopers_in_box_naive,
)


def make_box(n_halos: int, box: float, n_diagrams: int, seed: int):
    rng = np.random.default_rng(seed)
    grid = np.linspace(13.7, 15.4, 400)
    cdf = np.cumsum(cosmology.mass_function(grid, 0.0))
    cdf /= cdf[-1]
    log_m = np.interp(rng.uniform(0, 1, n_halos), cdf, grid)
    pos = rng.uniform(0, box, (n_halos, 3))
    half = n_halos // 2
    parents = rng.integers(half, n_halos, half)
    pos[:half] = np.mod(pos[parents] + rng.normal(0, 3.0, (half, 3)), box)
    vel = rng.normal(0, 400, (n_halos, 3))
    # cluster halos: flat in log M (weights ~ 1/dn), up to 25 sight lines each
    cand = np.flatnonzero(log_m <= 15.2)
    w = 1.0 / np.interp(log_m[cand], grid, np.gradient(cdf, grid))
    n_cl = max(n_diagrams // 10, 1)
    clusters = rng.choice(cand, n_cl, replace=False, p=w / w.sum())
    centre = np.repeat(clusters, int(np.ceil(n_diagrams / n_cl)))[:n_diagrams]
    los = rng.normal(size=(n_diagrams, 3))
    z = cosmology.redshift_from_comoving(250.0 * rng.uniform(0, 1, n_diagrams) ** (1 / 3))
    return pos, vel, log_m, centre, los, np.maximum(z, 0.005)


def per_diagram_numpy(pos, vel, log_m, centre, los, z, box):
    """Middle ground: a Python loop over diagrams, numpy over all halos (pair count only)."""
    hub = cosmology.hubble(z)
    n = 0
    for i, c in enumerate(centre):
        a = 1.0 / (1.0 + z[i])
        dr = pos - pos[c]
        dr -= box * np.round(dr / box)
        rl = dr @ los[i]
        rp = np.sqrt(np.maximum((dr**2).sum(1) - rl**2, 0)) * a
        vl = (vel - vel[c]) @ los[i] + hub[i] * a * rl
        sel = (log_m > log_m[c]) & (rp < 1.6) & (np.abs(vl) < 2200.0)
        sel[c] = False
        n += int(sel.sum())
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller naive subsample (runs in < 1 min)")
    ap.add_argument("--diagrams", type=int, default=43000)
    ap.add_argument("--halos", type=int, default=40000)
    ap.add_argument("--box", type=float, default=1000.0)
    ap.add_argument("--naive", type=int, default=None, help="diagrams in the double-loop subsample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "contamination.json"))
    args = ap.parse_args(argv)
    n_naive = args.naive or (20 if args.quick else 100)

    pos, vel, log_m, centre, los, z = make_box(args.halos, args.box, args.diagrams, args.seed)
    cosmology.hubble(z)  # warm colossus
    t0 = time.perf_counter()
    pairs = interlopers_in_box(pos, vel, log_m, centre, los, z, box_size=args.box)
    t_tree = time.perf_counter() - t0
    table = contamination_table(np.arange(args.diagrams), pairs)

    rng = np.random.default_rng(args.seed + 1)
    # half the subsample among diagrams the tree found contaminated (checks the pairs it
    # reports), half at random (checks it misses none)
    dirty = np.unique(pairs["diagram_id"].to_numpy())
    pick = rng.choice(dirty, min(n_naive // 2, len(dirty)), replace=False)
    rest = rng.choice(np.setdiff1d(np.arange(args.diagrams), pick), n_naive - len(pick), replace=False)
    sub = np.sort(np.concatenate([pick, rest]))
    t0 = time.perf_counter()
    slow = interlopers_in_box_naive(pos, vel, log_m, centre[sub], los[sub], z[sub], box_size=args.box)
    t_naive = time.perf_counter() - t0
    slow["diagram_id"] = sub[slow["diagram_id"].to_numpy()]
    fast_sub = pairs[np.isin(pairs["diagram_id"], sub)].reset_index(drop=True)
    try:
        pd.testing.assert_frame_equal(fast_sub, slow.reset_index(drop=True), check_exact=False, rtol=1e-9, atol=1e-9)
        agree = True
    except AssertionError:
        agree = False
    t_naive_full = t_naive / n_naive * args.diagrams
    n_np = min(10 * n_naive, args.diagrams)
    sub_np = rng.choice(args.diagrams, n_np, replace=False)
    los_n = los / np.linalg.norm(los, axis=1, keepdims=True)
    t0 = time.perf_counter()
    n_pairs_np = per_diagram_numpy(pos, vel, log_m, centre[sub_np], los_n[sub_np], z[sub_np], args.box)
    t_np = time.perf_counter() - t0
    t_np_full = t_np / n_np * args.diagrams
    agree = agree and n_pairs_np == int(np.isin(pairs["diagram_id"], sub_np).sum())

    res = {
        "n_diagrams": args.diagrams,
        "n_halos": args.halos,
        "box": args.box,
        "n_pairs": len(pairs),
        "fraction_contaminated": float((table["contamination"] > 0).mean()),
        "tree_s": t_tree,
        "naive_subsample": n_naive,
        "naive_subsample_s": t_naive,
        "naive_extrapolated_s": t_naive_full,
        "speedup": t_naive_full / t_tree,
        "numpy_loop_subsample": n_np,
        "numpy_loop_subsample_s": t_np,
        "numpy_loop_extrapolated_s": t_np_full,
        "speedup_vs_numpy_loop": t_np_full / t_tree,
        "identical_on_subsample": agree,
        "pairs_on_subsample": len(slow),
    }
    print(f"{'method':<28}{'diagrams':>10}{'time [s]':>12}")
    print(f"{'cKDTree (clustermass)':<28}{args.diagrams:>10}{t_tree:>12.2f}")
    print(f"{'double loop (measured)':<28}{n_naive:>10}{t_naive:>12.2f}")
    print(f"{'double loop (extrapolated)':<28}{args.diagrams:>10}{t_naive_full:>12.1f}")
    print(f"{'numpy loop over diagrams':<28}{n_np:>10}{t_np:>12.2f}")
    print(f"{'numpy loop (extrapolated)':<28}{args.diagrams:>10}{t_np_full:>12.1f}")
    print(f"speedup x{res['speedup']:.0f} vs the double loop, x{res['speedup_vs_numpy_loop']:.0f} vs the numpy loop; identical on the subsample: {agree} ({len(slow)} pairs); "
          f"{res['fraction_contaminated']:.1%} of diagrams contaminated")
    write_json_atomic(args.out, res)
    return res


if __name__ == "__main__":
    main()
