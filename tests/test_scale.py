"""Scale-out (issue 16): Dask schedulers give the serial bytes, batched/streamed inference,
DDP sharding and a CPU DDP training whose bundle loads."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from clustermass.config import KDEConfig, WindowConfig
from clustermass.errors import ConfigError

#: the grid of the training tests (tests/test_training.py): wide kernels, learnable on 16 cells
TRAIN_KDE = KDEConfig(n_grid=16, bandwidth=0.5)


def cli(*args, timeout=240):
    res = subprocess.run([sys.executable, "-m", "clustermass.cli", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def tiny_bundle(path, cat, kind="cnn3d", n_grid=16, seed=0):
    """A calibrated bundle without training: random weights, calibrated on ``cat``'s rows."""
    import torch

    from clustermass.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, ModelBundle
    from clustermass.networks import build_network, default_arch

    torch.manual_seed(seed)
    window, kde = WindowConfig(), KDEConfig(n_grid=n_grid, bandwidth=0.5)
    arch = default_arch(kind)
    net = build_network(kind, n_grid, **arch, target_mean=14.4, target_std=0.4)
    meta = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "kind": kind,
            "architecture": {"kind": kind, "n_grid": n_grid, "arch": arch},
            "preprocessing": {"window": window.model_dump(mode="json"), "kde": kde.model_dump(mode="json"),
                              "target": {"mean": 14.4, "std": 0.4}},
            "calibration": None}
    bundle = ModelBundle(kind, window, kde, net, meta)
    bundle.save(path)
    d = bundle.predict(cat)
    rng = np.random.default_rng(seed)
    bundle.set_calibration(np.concatenate([d, d + 0.01]),
                           np.concatenate([d, d]) + rng.normal(0, 0.1, 2 * len(d)), 0.2)
    return bundle


# ---------------------------------------------------------------- fast
def test_parse_scheduler():
    from clustermass.distributed import parse_scheduler

    assert parse_scheduler("processes:2") == ("processes", 2)
    assert parse_scheduler("threads:3") == ("threads", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    assert parse_scheduler("node12:8786") == ("address", "node12:8786")
    for bad in ("processes:0", "processes", "slurm", "processes:-1"):
        with pytest.raises(ConfigError):
            parse_scheduler(bad)


def test_missing_dask_names_the_extra(monkeypatch):
    import builtins

    from clustermass import distributed

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("no dask here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError, match=r"clustermass\[dask\]"), distributed.dask_client("processes:1"):
        pass


def test_ddp_sampler_slices_each_batch(monkeypatch):
    """Under W ranks every batch is split into W slices: together they are the single-device batch."""
    from clustermass import training

    single = list(training.EpochBatchSampler(23, 10, seed=3))
    for world in (2, 3):
        parts = []
        for rank in range(world):
            monkeypatch.setattr(training, "_rank_world", lambda r=rank, w=world: (r, w))
            parts.append(list(training.EpochBatchSampler(23, 10, seed=3)))
        assert all(len(p) == len(single) for p in parts)  # the same number of steps on every rank
        for i, batch in enumerate(single):
            if len(batch) >= world:
                assert sum((p[i] for p in parts), []) == batch
            else:  # a batch smaller than the world goes whole to every rank
                assert all(p[i] == batch for p in parts)


def test_single_device_default_unchanged():
    from clustermass.config import TrainingConfig
    from clustermass.training import _run_fingerprint, _strategy

    tr = TrainingConfig()
    assert (tr.devices, tr.num_nodes, tr.strategy) == (1, 1, "auto") and _strategy(tr) == "auto"
    assert _strategy(tr.model_copy(update={"devices": 2})) == "ddp"
    # device settings do not enter the run fingerprint (a run may resume on other hardware)
    fp = _run_fingerprint("cnn3d", {}, WindowConfig(), KDEConfig(), tr, 0, "h")
    fp2 = _run_fingerprint("cnn3d", {}, WindowConfig(), KDEConfig(),
                           tr.model_copy(update={"devices": 4, "strategy": "ddp"}), 0, "h")
    assert fp == fp2


def test_streamed_infer_matches_one_batch(tmp_path, gaussian_catalogue):
    """Batches of 7 give the values of one batch; one batch gives the bytes of the in-memory path."""
    from clustermass.catalog import read_catalogue, write_catalogue
    from clustermass.inference import _write_posteriors, infer_catalogue, posterior_table

    cat = gaussian_catalogue(n=30, seed=1)
    write_catalogue(cat, tmp_path / "cat")
    bundle = tiny_bundle(tmp_path / "model", cat, kind="cnn1d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = posterior_table(bundle, read_catalogue(tmp_path / "cat"))
        _write_posteriors(bundle, ref, tmp_path / "ref", False, {}, False)
        one = infer_catalogue(tmp_path / "model", tmp_path / "cat", tmp_path / "one", progress=False)
        many = infer_catalogue(tmp_path / "model", tmp_path / "cat", tmp_path / "many", progress=False,
                               batch_size=7)
    assert filecmp.cmp(one, tmp_path / "ref" / "posteriors.parquet", shallow=False)
    a, b = pd.read_parquet(one), pd.read_parquet(many)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 30
    num = a.select_dtypes("number").columns
    np.testing.assert_allclose(b[num].to_numpy(float), a[num].to_numpy(float), rtol=0, atol=1e-9)
    assert json.loads((tmp_path / "many" / "inference.json").read_text())["n_clusters"] == 30


def test_streamed_reader_memory_does_not_grow_with_the_catalogue(tmp_path):
    """Arrow memory held while streaming a catalogue stays at one batch + one row group: with
    pyarrow's read-ahead cache (pre_buffer) it grew with every row group read (~0.2 kB/cluster)."""
    import pyarrow as pa

    from clustermass.catalog import write_catalogue_chunks
    from clustermass.inference import iter_catalogue_batches

    def chunks(n_chunks=40, m=2000, n_gal=6):
        rng = np.random.default_rng(0)
        for c in range(n_chunks):
            ids = np.arange(c * m, (c + 1) * m, dtype=np.int64)
            cl = pd.DataFrame({"diagram_id": ids, "halo_id": ids, "split": "none",
                               "log_m200c": rng.uniform(13.7, 15.2, m), "r200c": 1.0, "v200c": 600.0,
                               "redshift": 0.05, "n_gal": n_gal, "n_mem": n_gal})
            g = m * n_gal
            gal = pd.DataFrame({"diagram_id": np.repeat(ids, n_gal), "x_proj": rng.uniform(-1, 1, g),
                                "y_proj": rng.uniform(-1, 1, g), "v_los": rng.normal(0, 600, g)})
            halos = pd.DataFrame({c: np.zeros(0, np.int64 if c.endswith("id") else float) for c in
                                  ("diagram_id", "halo_id", "log_m200c", "x_proj", "y_proj", "v_los")})
            yield cl, gal, halos

    write_catalogue_chunks(chunks(), tmp_path / "cat")
    batches, n = iter_catalogue_batches(tmp_path / "cat", 2000)
    held = []
    for batch in batches:
        held.append(pa.total_allocated_bytes())
        del batch
    assert n == 80_000 and len(held) == 40
    # the galaxies table is 480 000 rows x 4 x 8 bytes = 15.4 MB; the cache held all of it
    assert max(held) < 0.7 * 480_000 * 32, held


# ---------------------------------------------------------------- slow: processes
@pytest.mark.slow
def test_simulate_and_infer_with_dask_processes_give_serial_bytes(tmp_path):
    """`--scheduler processes:2` writes the same catalogue and posterior bytes as the serial run."""
    from clustermass.catalog import read_catalogue

    sets = ["--set", "simulation.chunk_size=100"]  # several chunks -> several tasks
    cli("simulate", "--out", tmp_path / "serial", "--preset", "tiny", "-q", *sets)
    cli("simulate", "--out", tmp_path / "dask", "--preset", "tiny", "-q", "--scheduler", "processes:2", *sets)
    for name in ("clusters.parquet", "galaxies.parquet", "halos.parquet", "catalogue.json"):
        assert filecmp.cmp(tmp_path / "serial" / name, tmp_path / "dask" / name, shallow=False), name

    tiny_bundle(tmp_path / "model", read_catalogue(tmp_path / "serial").subset(range(60)))
    common = ["--model", tmp_path / "model", "--data", tmp_path / "serial", "--batch-size", 120, "-q"]
    cli("infer", "--out", tmp_path / "inf_serial", *common)
    cli("infer", "--out", tmp_path / "inf_dask", "--scheduler", "processes:2", *common)
    assert filecmp.cmp(tmp_path / "inf_serial" / "posteriors.parquet",
                       tmp_path / "inf_dask" / "posteriors.parquet", shallow=False)
    assert len(pd.read_parquet(tmp_path / "inf_dask" / "posteriors.parquet")) == 500


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_tiny_and_the_bundle_loads(tmp_path):
    """`train --devices 2 --strategy ddp` (gloo, Lightning relaunches the command) on CPU."""
    from clustermass.bundle import load_model

    cli("simulate", "--out", tmp_path / "cat", "--preset", "tiny", "-q")
    cli("train", "--data", tmp_path / "cat", "--out", tmp_path / "m", "--preset", "tiny", "--epochs", 1,
        "--devices", 2, "--strategy", "ddp", "-q", timeout=300)
    bundle = load_model(tmp_path / "m")
    assert bundle.meta["training"]["devices"] == 2 and bundle.meta["training"]["epochs_run"] == 1
    assert np.isfinite(bundle.meta["training"]["history"][0]["train_loss"])


def test_ddp_fork_equals_single_device(tmp_path, learnable_catalogue):
    """Two forked CPU ranks (gloo) reproduce the single-device losses up to reduction order."""
    from clustermass.config import TrainingConfig
    from clustermass.training import train_model
    cat = learnable_catalogue(n_halos=30, sightlines=2, n_test_halos=2)
    hist = {}
    for name, kw in (("one", {}), ("two", {"devices": 2, "strategy": "ddp_fork"})):
        tr = TrainingConfig(max_epochs=2, batch_size=32, lr=1e-3, **kw)
        b = train_model(cat, "cnn3d", WindowConfig(), TRAIN_KDE, tr, 0, tmp_path / name, progress=False)
        hist[name] = [(r["train_loss"], r["val_loss"]) for r in b.meta["training"]["history"]]
    np.testing.assert_allclose(hist["two"], hist["one"], rtol=1e-5)


def test_grids_beyond_the_memory_budget_stream_from_a_memmap(tmp_path, learnable_catalogue):
    """cache_max_gb exceeded: grids built once into a memory-mapped file; same training, file removed."""
    from clustermass.config import TrainingConfig
    from clustermass.training import train_model
    cat = learnable_catalogue(n_halos=20, sightlines=2, n_test_halos=2)
    hist = {}
    for name, kw in (("memory", {}), ("disk", {"cache_max_gb": 0.0})):
        tr = TrainingConfig(max_epochs=2, batch_size=16, lr=1e-3, **kw)
        b = train_model(cat, "cnn3d", WindowConfig(), TRAIN_KDE, tr, 0, tmp_path / name, progress=False)
        hist[name] = [(r["train_loss"], r["val_loss"]) for r in b.meta["training"]["history"]]
    assert b.meta["training"]["inputs_cached"] == "disk"
    assert hist["disk"] == hist["memory"]
    assert not list((tmp_path / "disk").rglob("*grids*"))


def test_bad_scheduler_is_a_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "clustermass.cli", "simulate", "--out", str(tmp_path / "c"),
                          "--preset", "tiny", "-q", "--scheduler", "slurm"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error:") and "processes:N" in res.stderr


@pytest.mark.gpu
@pytest.mark.slow
def test_ddp_on_the_gpus_trains_tiny(tmp_path):
    """Multi-GPU DDP (NCCL) where a machine has two GPUs; one GPU: the single-device path."""
    import torch

    from clustermass.bundle import load_model

    n = min(torch.cuda.device_count(), 2)
    cli("simulate", "--out", tmp_path / "cat", "--preset", "tiny", "-q")
    cli("train", "--data", tmp_path / "cat", "--out", tmp_path / "m", "--preset", "tiny", "--epochs", 1,
        "--devices", n, "--precision", "bf16-mixed", "-q", timeout=300)
    meta = load_model(tmp_path / "m").meta["training"]
    assert meta["device"] == "cuda" and meta["devices"] == n and meta["precision"] == "bf16-mixed"


@pytest.mark.parametrize("kind", ["cnn3d", "set"])
def test_training_from_memory_mapped_galaxies_equals_in_memory(tmp_path, learnable_catalogue, kind):
    """A galaxies table beyond training.galaxies_in_memory_max_gb is memory-mapped: the same
    data hash, losses and weights as training on the table read into memory."""
    from clustermass.catalog import read_catalogue, write_catalogue
    from clustermass.config import TrainingConfig, load_config
    from clustermass.training import train_model

    write_catalogue(learnable_catalogue(n_halos=20, sightlines=2, n_test_halos=2), tmp_path / "cat")
    tr = TrainingConfig(max_epochs=2, batch_size=16, lr=1e-3, model=kind)
    kde = TRAIN_KDE if kind != "set" else load_config("tiny").kde
    meta, losses = {}, {}
    for name, limit in (("memory", None), ("mapped", 0.0)):
        cat = read_catalogue(tmp_path / "cat", galaxies_max_gb=limit)
        b = train_model(cat, kind, WindowConfig(), kde, tr, 0, tmp_path / name, progress=False)
        meta[name] = b.meta
        losses[name] = [(r["train_loss"], r["val_loss"]) for r in b.meta["training"]["history"]]
    assert (tmp_path / "cat" / ".galaxy-store" / "store.json").is_file()
    assert meta["mapped"]["fingerprint"] == meta["memory"]["fingerprint"]  # data_hash included
    assert losses["mapped"] == losses["memory"] and len(losses["memory"]) == 2
    a, b = ((tmp_path / n / "weights.safetensors").read_bytes() for n in ("memory", "mapped"))
    assert a == b
