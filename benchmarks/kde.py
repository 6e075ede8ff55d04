"""KDE grid benchmark: clustermass.phasespace vs scipy.stats.gaussian_kde, side by side, one core.

For cluster-like diagrams (Gaussian members + uniform interlopers, some outside the window) with
N = 10, 30, 100, 300, 1000 galaxies on the 50^3 grid: scipy time, our time, ratio and the max
error relative to the cube maximum (both cubes normalised to sum 1). Also cubes/s for the quick
preset's 32^3 grid with N ~ 60, and cubes/s on a GPU when CUDA is available.
Times are the minimum over repeats (robust to other processes sharing the machine).

    python benchmarks/kde.py [--quick] [--out benchmarks/results/kde.json]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"  # one core, set before numpy is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from clustermass._io import write_json_atomic  # noqa: E402
from clustermass.phasespace import gaussian_kde_grid, gaussian_kde_grid_torch  # noqa: E402

LO = np.array([-1.6, -1.6, -2200.0])
HI = -LO
BW = 0.175


def diagram(n: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster-like (x, y, v): 70% members, 30% interlopers (some just outside the window)."""
    n_mem = int(round(0.7 * n))
    sig_r, sig_v = rng.uniform(0.3, 0.6), rng.uniform(400, 900)
    mem = rng.normal(size=(n_mem, 3)) * [sig_r, sig_r, sig_v]
    bg = rng.uniform(-1, 1, size=(n - n_mem, 3)) * [1.7, 1.7, 2400]
    return np.vstack([mem, bg])


def scipy_cube(p: np.ndarray, n: int) -> np.ndarray:
    axes = [np.linspace(LO[j], HI[j], n) for j in range(3)]
    g = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    c = gaussian_kde(p.T, bw_method=BW)(g).reshape((n,) * 3)
    return c / c.sum()


def best_time(fn, repeats: int) -> tuple[float, object]:
    out, best = None, np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kde.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    rep_ours = 5 if args.quick else 20
    rows = []
    print(f"{'N':>6} {'scipy [ms]':>11} {'ours [ms]':>10} {'ratio':>7} {'max rel err':>12}")
    for n_pts in (10, 30, 100, 300, 1000):
        p = diagram(n_pts, rng)
        rep_sp = 1 if n_pts >= 300 and args.quick else (2 if n_pts >= 300 else 3)
        gaussian_kde_grid(p, LO, HI, 50, BW)  # warm-up
        t_sp, ref = best_time(lambda p=p: scipy_cube(p, 50), rep_sp)
        t_us, ours = best_time(lambda p=p: gaussian_kde_grid(p, LO, HI, 50, BW), rep_ours)
        err = float(np.abs(ours - ref).max() / ref.max())
        rows.append({"n_points": n_pts, "grid": 50, "scipy_s": t_sp, "ours_s": t_us,
                     "ratio": t_sp / t_us, "max_rel_err": err})
        print(f"{n_pts:>6} {t_sp * 1e3:>11.2f} {t_us * 1e3:>10.3f} {t_sp / t_us:>7.1f} {err:>12.2e}")

    # quick preset: 32^3 grid, N ~ 60
    ps = [diagram(int(rng.integers(40, 80)), rng) for _ in range(40 if args.quick else 200)]
    t0 = time.perf_counter()
    for p in ps:
        gaussian_kde_grid(p, LO, HI, 32, BW)
    cps32 = len(ps) / (time.perf_counter() - t0)
    t_sp32, _ = best_time(lambda: scipy_cube(ps[0], 32), 3)
    print(f"32^3 grid, N~60, one core: {cps32:.0f} cubes/s (scipy: {1 / t_sp32:.0f} cubes/s)")

    gpu = None
    if torch.cuda.is_available():
        batch = [diagram(100, rng) for _ in range(256)]
        gaussian_kde_grid_torch(batch[:8], LO, HI, 50, BW, device="cuda")
        torch.cuda.synchronize()
        t, reps = np.inf, 5
        for _ in range(reps):
            t0 = time.perf_counter()
            out = gaussian_kde_grid_torch(batch, LO, HI, 50, BW, device="cuda")
            torch.cuda.synchronize()
            t = min(t, time.perf_counter() - t0)
        ref = gaussian_kde_grid(batch[0], LO, HI, 50, BW)
        gerr = float(np.abs(out[0].double().cpu().numpy() - ref).max() / ref.max())
        gpu = {"device": torch.cuda.get_device_name(0), "batch": 256, "n_points": 100, "grid": 50,
               "cubes_per_s": 256 / t, "max_rel_err_float32": gerr}
        print(f"GPU {gpu['device']}: {gpu['cubes_per_s']:.0f} cubes/s (50^3, N=100, float32, "
              f"batch 256), max rel err vs float64 {gerr:.1e}")
    else:
        print("GPU: CUDA not available, skipped")

    write_json_atomic(args.out, {
        "benchmark": "kde", "threads": 1, "bandwidth": BW, "timing": "min over repeats",
        "machine": platform.processor() or platform.machine(), "rows": rows,
        "quick_preset_32cube_N60_cubes_per_s": cps32, "scipy_32cube_cubes_per_s": 1 / t_sp32,
        "gpu": gpu,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
