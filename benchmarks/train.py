"""Training throughput: the full pipeline (KDE grids from PhaseSpaceDataset + Lightning) vs a
bare PyTorch loop over pre-computed cubes, in one run.

Reports samples/s of a training epoch (validation excluded) for
  bare      : plain PyTorch loop (same network, memory format, batch size, Adam) over cubes in memory
  pipeline  : ``train_model`` as used (grids built once by PhaseSpaceDataset, kept in memory)
  on-the-fly: ``train_model`` with ``cache_inputs=False`` (grids rebuilt every epoch by the
              DataLoader, ``--workers`` worker processes)
and the ratios to the bare loop (target >= 0.95), the KDE cost per diagram, and the projected
seconds per epoch for the quick preset (CNN3D, 3000 training diagrams). With CUDA available the
same comparison runs on the GPU at 50^3, with the projected paper-scale time
(15.5k diagrams x 50 epochs). Writes ``benchmarks/results/train.json``.

    python benchmarks/train.py --quick        # < 1 minute on one CPU core
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clustermass._io import write_json_atomic
from clustermass.bundle import channels_last as _channels_last
from clustermass.bundle import memory_format as _memory_format
from clustermass.catalog import Catalogue
from clustermass.config import KDEConfig, TrainingConfig, WindowConfig
from clustermass.datasets import PhaseSpaceDataset, build_inputs
from clustermass.networks import build_network
from clustermass.training import train_model

RESULTS = Path(__file__).parent / "results" / "train.json"


def synthetic_catalogue(n_diagrams: int, seed: int = 0, window: WindowConfig | None = None) -> Catalogue:
    """Train-split diagrams, 20-150 galaxies each (log-uniform), v_los spread ~ M^(1/3)."""
    window = window or WindowConfig()
    rng = np.random.default_rng(seed)
    cl, gal = [], []
    for d in range(n_diagrams):
        logm = rng.uniform(13.7, 15.2)
        sig = 600.0 * 10 ** ((logm - 14.5) / 3)
        n = int(np.exp(rng.uniform(np.log(20), np.log(150))))
        cl.append(dict(diagram_id=d, halo_id=d // 2, split="train", log_m200c=logm, r200c=1.0, v200c=sig,
                       redshift=0.05, n_gal=n, n_mem=n))
        r = window.r_max * 0.999
        gal.append(pd.DataFrame(dict(diagram_id=d, x_proj=np.clip(rng.normal(0, 0.6, n), -r, r),
                                     y_proj=np.clip(rng.normal(0, 0.6, n), -r, r),
                                     v_los=np.clip(rng.normal(0, sig, n), -window.v_max * 0.999, window.v_max * 0.999))))
    return Catalogue(pd.DataFrame(cl), pd.concat(gal, ignore_index=True))


def bare_loop(x: torch.Tensor, y: torch.Tensor, kind: str, n_grid: int, batch: int, epochs: int,
              lr: float, device: torch.device) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds per epoch of a plain PyTorch training loop over in-memory cubes."""
    torch.manual_seed(0)
    net = _channels_last(build_network(kind, n_grid, target_mean=float(y.mean()), target_std=float(y.std())),
                         kind).to(device)
    fmt = _memory_format(kind)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = x.to(device), y.to(device)
    amp = device.type == "cuda"
    times, cpu = [], []
    for e in range(epochs):
        if amp:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        perm = torch.from_numpy(np.random.default_rng([0, e]).permutation(len(y))).to(device)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            xb = x[idx] if fmt is None else x[idx].contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = torch.mean((net(xb).float() - y[idx]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if amp:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return times, cpu


def pipeline(cat, kind, window, kde, training, out) -> dict:
    t = time.perf_counter()
    b = train_model(cat, kind, window, kde, training, seed=0, out_dir=out, progress=False, resume=False)
    tr = b.meta["training"]
    return {"epoch_train_s": [r["train_s"] for r in tr["history"]],
            "epoch_train_cpu_s": [r["train_cpu_s"] for r in tr["history"]], "total_s": time.perf_counter() - t,
            "n_train": tr["n_train"], "n_val": tr["n_val"]}


def best(times: list[float]) -> float:
    """Fastest epoch after the first (warm-up) one: robust to other processes on a shared machine."""
    return min(times[1:] if len(times) > 1 else times)


def run(kind: str, n_grid: int, n_diagrams: int, epochs: int, batch: int, workers: int,
        device: torch.device, on_the_fly: bool, repeats: int = 2) -> dict:
    window, kde = WindowConfig(), KDEConfig(n_grid=n_grid)
    cat = synthetic_catalogue(n_diagrams)
    common = dict(lr=1e-3, batch_size=batch, max_epochs=epochs, patience=epochs + 1, val_fraction=0.05)
    res: dict = {"kind": kind, "n_grid": n_grid, "n_diagrams": n_diagrams, "epochs": epochs, "batch": batch,
                 "device": device.type, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        bare, piped, bare_cpu, piped_cpu, totals, x = [], [], [], [], [], None
        for _ in range(repeats):  # alternate the two so that machine load hits both alike
            p = pipeline(cat, kind, window, kde, TrainingConfig(**common), Path(tmp) / "cached")
            piped += p["epoch_train_s"][1:]
            piped_cpu += p["epoch_train_cpu_s"][1:]
            totals.append(p["total_s"])
            n_tr = p["n_train"]
            if x is None:
                train_rows = np.sort(cat.rows("train"))[:n_tr]  # as many as the pipeline's train part
                t = time.perf_counter()
                x, y = build_inputs(PhaseSpaceDataset(cat, train_rows, kind, window, kde), batch_size=64)
                kde_s = (time.perf_counter() - t) / len(train_rows)
            b_wall, b_cpu = bare_loop(x, y, kind, n_grid, batch, epochs, 1e-3, device)
            bare += b_wall[1:]
            bare_cpu += b_cpu[1:]
        res.update(
            kde_ms_per_diagram=kde_s * 1e3,
            bare_samples_per_s=n_tr / min(bare),
            pipeline_samples_per_s=n_tr / min(piped),
            pipeline_total_s=min(totals),
            bare_cpu_samples_per_s=n_tr / min(bare_cpu),
            pipeline_cpu_samples_per_s=n_tr / min(piped_cpu),
            bare_epoch_s=bare,
            pipeline_epoch_s=piped,
            n_train=n_tr,
        )
        res["ratio"] = res["pipeline_samples_per_s"] / res["bare_samples_per_s"]
        res["cpu_time_ratio"] = res["pipeline_cpu_samples_per_s"] / res["bare_cpu_samples_per_s"]
        if on_the_fly:
            fly = pipeline(cat, kind, window, kde,
                           TrainingConfig(**common, cache_inputs=False, num_workers=workers),
                           Path(tmp) / "fly")
            res["on_the_fly_workers"] = workers
            res["on_the_fly_samples_per_s"] = n_tr / best(fly["epoch_train_s"])
            res["on_the_fly_ratio"] = res["on_the_fly_samples_per_s"] / res["bare_samples_per_s"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 minute on one core")
    ap.add_argument("--n-diagrams", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the on-the-fly run")
    ap.add_argument("--models", default=None,
                    help="comma list of kind:n_grid:batch (default cnn3d:32:50,cnn2d:50:100 with --quick)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating pipeline/bare repetitions")
    ap.add_argument("--no-on-the-fly", action="store_true", help="skip the run that rebuilds grids every epoch")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    n = args.n_diagrams or (160 if args.quick else 600)
    epochs = args.epochs or 3
    out: dict = {"benchmark": "train", "quick": args.quick, "machine": platform.machine(),
                 "torch": torch.__version__, "cpu": []}
    if args.models:
        rows = [(k, int(g), int(b)) for k, g, b in (m.split(":") for m in args.models.split(","))]
    elif args.quick:
        rows = [("cnn3d", 32, 50), ("cnn2d", 50, 100)]
    else:
        rows = [("cnn3d", 32, 50), ("cnn3d", 50, 100), ("cnn2d", 50, 100), ("cnn1d", 50, 100)]
    for kind, ng, batch in rows:
        out["cpu"].append(run(kind, ng, n, epochs, batch, args.workers, torch.device("cpu"),
                              on_the_fly=not args.no_on_the_fly, repeats=args.repeats))
    c32 = next((r for r in out["cpu"] if r["kind"] == "cnn3d" and r["n_grid"] == 32), None)
    if c32 is not None:
        out["quick_preset_estimate"] = {
            "what": "CNN3D 32^3, 3000 training diagrams (+ ~10% validation), batch 50, this CPU",
            "train_epoch_s": 3000 / c32["pipeline_samples_per_s"],
            "train_epoch_cpu_s": 3000 / c32["pipeline_cpu_samples_per_s"],
            "kde_build_s": 3300 * c32["kde_ms_per_diagram"] / 1e3,
            "threads": c32["threads"],
        }
    if torch.cuda.is_available():
        g = run("cnn3d", 50, max(n, 2000), epochs, 100, 8, torch.device("cuda"), on_the_fly=False)
        g["paper_scale_projection_s"] = 15500 * 50 / g["pipeline_samples_per_s"] + 17200 * g["kde_ms_per_diagram"] / 1e3
        out["gpu"] = [g]
    else:
        out["gpu"] = "skipped: no CUDA device"
    print("samples/s of a training epoch (fastest epoch after warm-up; 'cpu' columns: per CPU-second of the")
    print("main process, insensitive to other jobs on a shared machine when threads == 1)")
    print(f"{'kind':6} {'grid':>4} {'device':6} {'thr':>3} {'KDE ms':>7} {'bare/s':>8} {'pipe/s':>8} {'ratio':>6} "
          f"{'bare/cpu':>8} {'pipe/cpu':>8} {'ratio':>6} {'fly/s':>8} {'fly ratio':>9}")
    for r in out["cpu"] + (out["gpu"] if isinstance(out["gpu"], list) else []):
        print(f"{r['kind']:6} {r['n_grid']:>4} {r['device']:6} {r['threads']:>3} {r['kde_ms_per_diagram']:7.2f} "
              f"{r['bare_samples_per_s']:8.1f} {r['pipeline_samples_per_s']:8.1f} {r['ratio']:6.3f} "
              f"{r['bare_cpu_samples_per_s']:8.1f} {r['pipeline_cpu_samples_per_s']:8.1f} {r['cpu_time_ratio']:6.3f} "
              f"{r.get('on_the_fly_samples_per_s', float('nan')):8.1f} {r.get('on_the_fly_ratio', float('nan')):9.3f}")
    q = out.get("quick_preset_estimate")
    if q:
        print(f"quick preset (CNN3D 32^3, 3000 diagrams, {q['threads']} thread(s)): {q['train_epoch_s']:.1f} s/epoch "
              f"wall ({q['train_epoch_cpu_s']:.1f} CPU-s) + {q['kde_build_s']:.1f} s to build the grids once")
    if isinstance(out["gpu"], list):
        print(f"GPU paper-scale projection (15.5k x 50 epochs at 50^3): {out['gpu'][0]['paper_scale_projection_s']:.0f} s")
    else:
        print(f"GPU: {out['gpu']}")
    write_json_atomic(RESULTS, out)
    return out


if __name__ == "__main__":
    main()
    print(json.dumps({"written": str(RESULTS)}))
