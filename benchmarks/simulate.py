"""Simulator benchmark: diagrams per second and the time of the paper-scale catalogue.

Runs ``simulate_catalogue`` on one core for the quick preset's catalogue (8500 diagrams, 10
sight lines) and for paper settings (25 sight lines; 43,000 diagrams, or 8000 with --quick,
extrapolated), and compares with the target of issue 12: 4.3e4 diagrams within 120 s on 2 cores
(ratio = target / time; > 1 meets it). --workers 2 also runs the independent chunks on a
2-process pool (the 2-core number). --compare-rev REV times the simulator of an older git
revision (``git archive REV src`` into a temporary directory, run in a subprocess on the same
cases) in the same run, for the side-by-side ratio new / old. Wall and CPU (process) times are
both recorded: on a shared machine (load average above the core count) the CPU time is the
honest measure of the work, and the 2-core estimate is the paper-scale CPU time / 2 (the chunks
are independent and even). The JSON also keeps the times recorded by the previous run of this
script (``previous``).

    python benchmarks/simulate.py [--quick] [--workers 2] [--compare-rev 31383ef] [--out benchmarks/results/simulate.json]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from _revision import run_at_revision  # noqa: E402
from clustermass._io import write_json_atomic  # noqa: E402
from clustermass.config import SimulationConfig, WindowConfig  # noqa: E402
from clustermass.simulate import simulate_catalogue, simulate_chunk  # noqa: E402
from clustermass.simulate.mock import plan  # noqa: E402

PAPER_N = 43000
TARGET_S = 120.0  # issue 12: the paper-scale catalogue within 120 s on 2 cores

_OLD_SNIPPET = """
import json, sys, time
from clustermass.config import SimulationConfig, WindowConfig
from clustermass.simulate import simulate_catalogue
cases = json.loads(sys.argv[1])
w = WindowConfig()
simulate_catalogue(SimulationConfig(n_train=20, n_test=0, n_eval=0), w, 0, progress=False)
out = []
for c in cases:
    sim = SimulationConfig(**c)
    t, c = time.perf_counter(), time.process_time()
    cat = simulate_catalogue(sim, w, 0, progress=False)
    out.append([time.perf_counter() - t, len(cat), len(cat.galaxies), time.process_time() - c])
print(json.dumps(out))
"""


def _run(sim: SimulationConfig, window: WindowConfig, seed: int = 0) -> tuple[float, object, float]:
    simulate_catalogue(
        SimulationConfig(n_train=20, n_test=0, n_eval=0), window, seed, progress=False
    )  # warm caches
    t, c = time.perf_counter(), time.process_time()
    cat = simulate_catalogue(sim, window, seed, progress=False)
    return time.perf_counter() - t, cat, time.process_time() - c


def _pool(sim: SimulationConfig, window: WindowConfig, workers: int, seed: int = 0) -> tuple[float, float]:
    halos, seeds = plan(sim, seed)
    parts = [halos[halos["chunk"] == c] for c in range(len(seeds))]
    t = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ProcessPoolExecutor(workers) as ex:
        n = sum(
            len(r[0])
            for r in ex.map(simulate_chunk, parts, [sim] * len(parts), [window] * len(parts), seeds)
        )
    assert n == sim.n_total
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
    return time.perf_counter() - t, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="paper settings on 8000 diagrams, extrapolated"
    )
    ap.add_argument("--workers", type=int, default=0, help="also time a process pool over chunks")
    ap.add_argument("--compare-rev", default="", help="also time the simulator of this git revision")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate.json"))
    args = ap.parse_args()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else None
    if previous:
        previous.pop("previous", None)
    window = WindowConfig()
    n_paper = 8000 if args.quick else PAPER_N
    cases = {
        "quick preset (8500, 10 sight lines)": SimulationConfig(
            n_train=4000, n_test=3000, n_eval=1500, max_sightlines=10
        ),
        f"paper settings ({n_paper}, 25 sight lines)": SimulationConfig(
            n_train=n_paper * 17 // 42,
            n_test=n_paper * 20 // 42,
            n_eval=n_paper - n_paper * 37 // 42,
        ),
    }
    rows = []
    print(
        f"{'case':42s} {'diagrams':>8s} {'time [s]':>9s} {'diag/s':>8s} {'gal/diag':>8s} "
        f"{'4.3e4 [s]':>9s} {'target [s]':>10s} {'ratio':>6s}"
    )
    for name, sim in cases.items():
        dt, cat, cpu = _run(sim, window)
        rate = len(cat) / dt
        t_paper = PAPER_N / rate
        row = {
            "case": name,
            "n_diagrams": len(cat),
            "seconds": dt,
            "diagrams_per_s": rate,
            "galaxies_per_diagram": len(cat.galaxies) / len(cat),
            "extrapolated_paper_s": t_paper,
            "target_paper_s": TARGET_S,
            "ratio": TARGET_S / t_paper,
            "cpu_seconds": cpu,
            "extrapolated_paper_cpu_s": PAPER_N * cpu / len(cat),
            "ratio_cpu_2cores": TARGET_S / (PAPER_N * cpu / len(cat) / 2),
        }
        rows.append(row)
        print(
            f"{name:42s} {len(cat):8d} {dt:9.2f} {rate:8.0f} {row['galaxies_per_diagram']:8.0f} "
            f"{t_paper:9.1f} {TARGET_S:10.0f} {row['ratio']:6.1f}   (cpu {cpu:.1f} s; "
            f"4.3e4 on 2 cores from cpu: {row['extrapolated_paper_cpu_s'] / 2:.1f} s)"
        )
    if args.compare_rev:
        old = run_at_revision(args.compare_rev, _OLD_SNIPPET, [
            {k: getattr(sim, k) for k in ("n_train", "n_test", "n_eval", "max_sightlines")}
            for sim in cases.values()])
        for row, (dt_old, n_old, ng_old, cpu_old) in zip(rows, old, strict=True):
            row["old_rev"] = args.compare_rev
            row["old_seconds"] = dt_old
            row["old_cpu_seconds"] = cpu_old
            row["old_galaxies_per_diagram"] = ng_old / n_old
            row["new_over_old"] = row["seconds"] / dt_old
            row["new_over_old_cpu"] = row["cpu_seconds"] / cpu_old
            print(f"{row['case']:42s} old {args.compare_rev}: {dt_old:.2f} s wall, {cpu_old:.2f} s cpu "
                  f"({ng_old / n_old:.0f} gal/diag); new / old = {row['new_over_old']:.2f} wall, "
                  f"{row['new_over_old_cpu']:.2f} cpu")
    if args.workers:
        sim = cases[f"paper settings ({n_paper}, 25 sight lines)"].model_copy(
            update={"chunk_size": 1000}
        )
        dt, cpu = _pool(sim, window, args.workers)
        rows.append(
            {
                "case": f"process pool x{args.workers}",
                "n_diagrams": sim.n_total,
                "seconds": dt,
                "diagrams_per_s": sim.n_total / dt,
                "extrapolated_paper_s": PAPER_N * dt / sim.n_total,
                "target_paper_s": TARGET_S,
                "ratio": TARGET_S / (PAPER_N * dt / sim.n_total),
                "cpu_seconds_all_workers": cpu,
            }
        )
        print(
            f"{'process pool x' + str(args.workers):42s} {sim.n_total:8d} {dt:9.2f} {sim.n_total / dt:8.0f}"
            f"   (cpu of all workers {cpu:.1f} s)"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    load = os.getloadavg()
    print(f"peak memory {peak_mb:.0f} MB; load average {load[0]:.1f} (cores: {os.cpu_count()})")
    write_json_atomic(
        args.out,
        {
            "cases": rows,
            "previous": previous,
            "peak_rss_mb": peak_mb,
            "load_average_1min_at_end": load[0],
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    )


if __name__ == "__main__":
    main()
