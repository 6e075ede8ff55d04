"""Benchmark (issue 16): scale-out in one run.

1. simulation throughput, serial vs a 2-worker Dask LocalCluster (``--scheduler processes:2``),
   and whether both write the same bytes;
2. DDP on 2 CPU processes (gloo, ``ddp_fork``) vs 1 process: training time and the loss
   difference;
3. peak RSS of ``clustermass infer`` (each size in a fresh process, ``os.wait4``) on synthetic
   catalogues of N clusters with few galaxies each and a tiny 1D network; the growth beyond
   the batch size must be flat;
4. peak memory of reading a training catalogue's galaxies the way training does (read, content
   hash, train/validation split, every training diagram's points), each size in a fresh
   process, with the galaxies in memory vs memory-mapped (``training.galaxies_in_memory_max_gb``);
5. on a GPU (when one is present): the paper-scale training time (``--gpu``).

    python benchmarks/scale.py --quick      # ~5 min on 2 cores: infer at 1e4, 1e5, 3e5 (batches of 1e4)
    python benchmarks/scale.py --sizes 10000 100000 1000000
    python benchmarks/scale.py --parts train_rss --quick   # training galaxies at 2e5, 2e6 (and 2e7 without --quick)
Prints a table and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from clustermass._io import write_json_atomic

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- helpers
def synthetic_catalogue(directory: Path, n: int, n_gal: int = 6, chunk: int = 10_000, seed: int = 0,
                        split: str = "none") -> Path:
    """N clusters with ``n_gal`` Gaussian galaxies each, written chunk by chunk (never all in memory).

    Each chunk is one parquet row group (as ``simulate`` writes its chunks), so every size has
    the same file layout: the reader's memory does not depend on N.
    """
    from clustermass.catalog import write_catalogue_chunks

    def chunks():
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            ids = np.arange(start, start + m, dtype=np.int64)
            logm = rng.uniform(13.7, 15.2, m)
            sig = 600.0 * 10 ** ((logm - 14.5) / 3)
            cl = pd.DataFrame({"diagram_id": ids, "halo_id": ids, "split": split, "log_m200c": logm,
                               "r200c": 1.0, "v200c": sig, "redshift": 0.05,
                               "n_gal": np.full(m, n_gal, np.int64), "n_mem": np.full(m, n_gal, np.int64)})
            g = m * n_gal
            gal = pd.DataFrame({"diagram_id": np.repeat(ids, n_gal),
                                "x_proj": rng.uniform(-1.5, 1.5, g), "y_proj": rng.uniform(-1.5, 1.5, g),
                                "v_los": np.clip(rng.normal(0, np.repeat(sig, n_gal)), -2100, 2100)})
            halos = pd.DataFrame({"diagram_id": np.zeros(0, np.int64), "halo_id": np.zeros(0, np.int64),
                                  "log_m200c": np.zeros(0), "x_proj": np.zeros(0), "y_proj": np.zeros(0),
                                  "v_los": np.zeros(0)})
            yield cl, gal, halos

    return write_catalogue_chunks(chunks(), directory, {"source": "benchmarks/scale.py"})


def tiny_bundle(path: Path, kind: str = "cnn1d", n_grid: int = 16, seed: int = 0):
    """A calibrated bundle without training: the test suite's (random weights, calibration pairs
    around its outputs on 400 synthetic clusters)."""
    from clustermass.catalog import read_catalogue

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_scale import tiny_bundle as untrained_calibrated_bundle

    cal = synthetic_catalogue(path.parent / "calibration_catalogue", 400, seed=seed + 1)
    return untrained_calibrated_bundle(path, read_catalogue(cal), kind=kind, n_grid=n_grid, seed=seed)


def run_measured(cmd: list[str]) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS [MB] of that process alone, return code, peak anonymous RSS [MB]).

    Peak RSS (``wait4``'s ru_maxrss) counts the resident pages of memory-mapped files too, which
    the kernel drops under memory pressure; the peak anonymous RSS (``RssAnon`` of
    ``/proc/PID/status``, sampled every 2 ms from this process) is the memory that cannot be
    dropped. A sampled peak can miss a spike shorter than the interval.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            anon = max(anon, kb / 1024.0)
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return wall, usage.ru_maxrss / 1024.0, proc.returncode, anon


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "clustermass.cli", *map(str, args)]


# ---------------------------------------------------------------- parts
def bench_simulate(tmp: Path, n_diagrams: int, workers: int) -> dict:
    from clustermass.config import load_config
    from clustermass.simulate.mock import simulate_to_directory

    cfg = load_config("tiny", overrides=[f"simulation.chunk_size={max(50, n_diagrams // 16)}"],
                      simulation__n_train=int(n_diagrams * 0.5), simulation__n_test=int(n_diagrams * 0.3),
                      simulation__n_eval=n_diagrams - int(n_diagrams * 0.5) - int(n_diagrams * 0.3))
    from clustermass.distributed import dask_client

    out = {}
    t0 = time.perf_counter()
    simulate_to_directory(cfg.simulation, cfg.window, cfg.seed, tmp / "sim_serial", progress=False)
    out["serial_s"] = time.perf_counter() - t0
    # `--scheduler processes:N` = start a LocalCluster + run; timed apart, then run on the warm cluster
    t0 = time.perf_counter()
    with dask_client(f"processes:{workers}") as client:
        out["startup_s"] = time.perf_counter() - t0
        # warm-up: each worker imports the simulator and fills its cosmology caches once
        t1 = time.perf_counter()
        warm = cfg.simulation.model_copy(update={"n_train": 40, "n_test": 40, "n_eval": 40, "chunk_size": 20})
        simulate_to_directory(warm, cfg.window, cfg.seed + 1, tmp / "sim_warm", progress=False,
                              scheduler=client.scheduler.address)
        out["warmup_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        simulate_to_directory(cfg.simulation, cfg.window, cfg.seed, tmp / "sim_dask", progress=False,
                              scheduler=client.scheduler.address)
        out["dask_s"] = time.perf_counter() - t1
    n = len(pd.read_parquet(tmp / "sim_serial" / "clusters.parquet", columns=["diagram_id"]))
    same = all(filecmp.cmp(tmp / "sim_serial" / f, tmp / "sim_dask" / f, shallow=False)
               for f in ("clusters.parquet", "galaxies.parquet", "halos.parquet"))
    return {"n_diagrams": n, "workers": workers, "serial_s": out["serial_s"], "dask_s": out["dask_s"],
            "local_cluster_startup_s": out["startup_s"], "worker_warmup_s": out["warmup_s"],
            "serial_diagrams_per_s": n / out["serial_s"], "dask_diagrams_per_s": n / out["dask_s"],
            "dask_speedup": out["serial_s"] / out["dask_s"],
            "dask_speedup_incl_startup": out["serial_s"] / (out["dask_s"] + out["startup_s"] + out["warmup_s"]),
            "same_bytes": same}


def _ddp_child(tmp: str, name: str, epochs: int, options: dict) -> None:
    """One training in a fresh (spawned) process; writes (wall s, history, n_train) to
    ``tmp/ddp_<name>.json`` (rank 0). ``ddp_fork`` must
    fork from a process whose torch/OpenMP thread pools have not run yet (forking after in-process
    trainings hung with both ranks idle), so every measurement gets its own process."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from clustermass.config import KDEConfig, TrainingConfig, WindowConfig
    from clustermass.training import train_model
    from conftest import learnable_catalogue

    kde = KDEConfig(n_grid=32, bandwidth=0.5)  # 32^3 cubes: enough work per step to time
    cat = learnable_catalogue(n_halos=300, sightlines=2, n_test_halos=2)
    tr = TrainingConfig(max_epochs=epochs, patience=epochs, batch_size=64, lr=1e-3, **options)
    t0 = time.perf_counter()
    b = train_model(cat, "cnn3d", WindowConfig(), kde, tr, 0, Path(tmp) / f"ddp_{name}", progress=False)
    if b is not None:  # rank 0
        result = [time.perf_counter() - t0, b.meta["training"]["history"], int(b.meta["training"]["n_train"])]
        (Path(tmp) / f"ddp_{name}.json").write_text(json.dumps(result))


def bench_ddp(tmp: Path, epochs: int) -> dict:
    import multiprocessing

    res = {}
    ctx = multiprocessing.get_context("spawn")
    for name, options in (("one", {}), ("two", {"devices": 2, "strategy": "ddp_fork"})):
        # a fresh interpreter per measurement (not a daemonic pool worker: ddp_fork forks ranks)
        proc = ctx.Process(target=_ddp_child, args=(str(tmp), name, epochs, options))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"DDP measurement {name!r} failed (exit code {proc.exitcode})")
        res[name] = json.loads((tmp / f"ddp_{name}.json").read_text())
    l1 = np.array([[r["train_loss"], r["val_loss"]] for r in res["one"][1]])
    l2 = np.array([[r["train_loss"], r["val_loss"]] for r in res["two"][1]])
    # the first epoch pays imports and first convolutions: compare the later ones
    fit1 = sum(r["train_s"] + r["val_s"] for r in res["one"][1][1:])
    fit2 = sum(r["train_s"] + r["val_s"] for r in res["two"][1][1:])
    return {"n_train_diagrams": res["one"][2], "epochs": epochs, "n_grid": 32,
            "one_process_s": res["one"][0], "two_processes_s": res["two"][0],
            "ratio_total": res["two"][0] / res["one"][0],
            "one_process_epochs_s": fit1, "two_processes_epochs_s": fit2, "ratio_epochs": fit2 / fit1,
            "epochs_timed": "2.." + str(epochs),
            "max_rel_loss_difference": float(np.max(np.abs(l2 - l1) / np.abs(l1)))}


def bench_infer_rss(tmp: Path, sizes: list[int], batch_size: int) -> list[dict]:
    model = tmp / "model"
    tiny_bundle(model)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        cat = synthetic_catalogue(tmp / f"cat_{n}", n)
        t_make = time.perf_counter() - t0
        wall, rss, rc, _ = run_measured(cli("infer", "--model", model, "--data", cat, "--out", tmp / f"inf_{n}",
                                         "--batch-size", batch_size, "-q", "--overwrite"))
        n_out = len(pd.read_parquet(tmp / f"inf_{n}" / "posteriors.parquet", columns=["diagram_id"])) if rc == 0 else 0
        rows.append({"n_clusters": n, "peak_rss_mb": rss, "infer_s": wall, "clusters_per_s": n / wall,
                     "catalogue_write_s": t_make, "ok": rc == 0 and n_out == n})
        shutil.rmtree(tmp / f"cat_{n}", ignore_errors=True)
        shutil.rmtree(tmp / f"inf_{n}", ignore_errors=True)
    return rows


def train_inputs_child(directory: str, limit: str) -> None:
    """The galaxy side of building training inputs, as ``train`` does it: read the catalogue
    (galaxies memory-mapped beyond ``limit`` GB, ``none``: in memory), its content hash, the
    train/validation split and every training diagram's points (as
    :class:`~clustermass.datasets.PhaseSpaceDataset` reads them to build the grids)."""
    from clustermass.catalog import read_catalogue, train_validation_split

    cat = read_catalogue(directory, galaxies_max_gb=None if limit == "none" else float(limit))
    cat.data_hash()
    train, val, _ = train_validation_split(cat, 0.1, 0)
    n = sum(len(cat.points(int(r))) for r in np.concatenate([train, val]))
    assert n == len(cat.galaxies), (n, len(cat.galaxies))


def bench_train_rss(tmp: Path, galaxy_counts: list[int], n_gal: int = 200) -> list[dict]:
    rows = []
    child = "import sys; sys.path.insert(0, {here!r}); from scale import train_inputs_child; train_inputs_child(*sys.argv[1:])"
    for g in galaxy_counts:
        cat = synthetic_catalogue(tmp / f"train_cat_{g}", g // n_gal, n_gal=n_gal, chunk=10_000, split="train")
        size_mb = (cat / "galaxies.parquet").stat().st_size / 1e6
        for mode, limit in (("memory", "none"), ("memmap", "0"), ("memmap, store reused", "0")):
            wall, rss, rc, anon = run_measured([sys.executable, "-c", child.format(here=str(HERE)), str(cat), limit])
            rows.append({"n_galaxies": g, "n_clusters": g // n_gal, "galaxies_parquet_mb": size_mb, "mode": mode,
                         "peak_rss_mb": rss, "peak_anon_mb": anon, "wall_s": wall, "ok": rc == 0})
        shutil.rmtree(cat, ignore_errors=True)
    return rows


def bench_gpu(tmp: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "pending: no GPU in this run"}
    from clustermass.config import load_config
    from clustermass.pipeline import simulate_stage, train_stage

    cfg = load_config("paper", overrides=["training.max_epochs=5"])
    t0 = time.perf_counter()
    cat = simulate_stage(cfg, tmp / "paper_catalogue", progress=False, scheduler="processes:8")
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = train_stage(cfg, cat, "cnn3d", tmp / "paper_model", progress=False)
    hist = b.meta["training"]["history"]
    return {"simulate_s": t_sim, "train_5_epochs_s": time.perf_counter() - t0,
            "epoch_s": float(np.median([r["train_s"] + r["val_s"] for r in hist])),
            "device": torch.cuda.get_device_name(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the ~5-minute run on 2 CPU cores")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                    help="clusters for the infer peak-RSS measurement")
    ap.add_argument("--batch-size", type=int, default=20_000, help="infer --batch-size")
    ap.add_argument("--sim-diagrams", type=int, default=20000)
    ap.add_argument("--ddp-epochs", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="also time paper-scale training on a GPU")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--galaxies", type=int, nargs="+", default=[200_000, 2_000_000, 20_000_000],
                    help="galaxies (200 per cluster) for the training-input memory measurement")
    ap.add_argument("--parts", nargs="+", choices=["simulate", "ddp", "rss", "train_rss"],
                    default=["simulate", "ddp", "rss", "train_rss"],
                    help="which measurements to run (default: all)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.batch_size = [10_000, 100_000, 300_000], 10_000
        args.galaxies = [200_000, 2_000_000]
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="clustermass-scale-"))
    t_all = time.perf_counter()
    try:
        sim = bench_simulate(tmp, args.sim_diagrams, workers=2) if "simulate" in args.parts else None
        ddp = bench_ddp(tmp, args.ddp_epochs) if "ddp" in args.parts else None
        rss = bench_infer_rss(tmp, args.sizes, args.batch_size) if "rss" in args.parts else []
        train_rss = bench_train_rss(tmp, args.galaxies) if "train_rss" in args.parts else []
        gpu = bench_gpu(tmp) if args.gpu else {"status": "pending: no GPU lent to this run"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "scale", "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
              "simulate": sim, "ddp_cpu_gloo": ddp,
              "infer_peak_rss": {"batch_size": args.batch_size, "galaxies_per_cluster": 6, "model": "cnn1d, n_grid 16",
                                 "rows": rss},
              "train_inputs_peak_memory": {"galaxies_per_cluster": 200, "rows": train_rss},
              "gpu": gpu, "total_s": time.perf_counter() - t_all, "cpu_count": os.cpu_count(),
              "python": platform.python_version()}
    write_json_atomic(args.out, result)

    if sim:
        print(f"simulate {sim['n_diagrams']} diagrams: serial {sim['serial_s']:.1f} s, Dask {sim['workers']} workers "
              f"{sim['dask_s']:.1f} s (+ {sim['local_cluster_startup_s']:.1f} s LocalCluster start, "
              f"{sim['worker_warmup_s']:.1f} s warm-up) -> speedup "
              f"{sim['dask_speedup']:.2f}x ({sim['dask_speedup_incl_startup']:.2f}x with the start); "
              f"same bytes: {sim['same_bytes']}")
    if ddp:
        print(f"DDP 2 CPU processes (gloo) vs 1: total {ddp['ratio_total']:.2f}x time, epochs "
              f"{ddp['ratio_epochs']:.2f}x; max relative loss difference {ddp['max_rel_loss_difference']:.1e}")
    if rss:
        print(f"{'clusters':>10} {'peak RSS [MB]':>14} {'infer [s]':>10} {'clusters/s':>11}")
    for r in rss:
        print(f"{r['n_clusters']:>10} {r['peak_rss_mb']:>14.0f} {r['infer_s']:>10.1f} {r['clusters_per_s']:>11.0f}"
              + ("" if r["ok"] else "  FAILED"))
    if train_rss:
        print(f"{'galaxies':>10} {'mode':>22} {'peak RSS [MB]':>14} {'peak anon [MB]':>15} {'wall [s]':>9}")
    for r in train_rss:
        print(f"{r['n_galaxies']:>10} {r['mode']:>22} {r['peak_rss_mb']:>14.0f} {r['peak_anon_mb']:>15.0f} "
              f"{r['wall_s']:>9.1f}" + ("" if r["ok"] else "  FAILED"))
    print(f"GPU: {json.dumps(gpu)}")
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
