"""Training with PyTorch Lightning (SCIENCE.md sec. 5).

:func:`train_model` fits a network of :mod:`clustermass.networks` to log10 M200c on the ``train``
split: MSE loss, Adam, a validation set of whole halos (``training.val_fraction`` of the train
halos; the sight lines of one halo never straddle the split), early stopping on the validation
loss with the best weights restored, checkpoints in ``out_dir/checkpoints`` so an interrupted
run resumes, seeded for repeatable CPU runs, mixed precision and channels-last on a GPU.

The pieces are Lightning's own: :class:`Regressor` (the LightningModule: loss, optimiser, logged
metrics), :class:`PhaseSpaceDataModule` (the train/validation loaders), Lightning's
``EarlyStopping``, ``ModelCheckpoint`` and ``CSVLogger`` (per-epoch metrics in
``out_dir/checkpoints/logs/version_*/metrics.csv``, read back by :func:`read_history`), and two
small callbacks: :class:`EpochTimes` (wall and CPU seconds per epoch) and
:class:`EpochProgressBar` (one tqdm bar of epochs; none when ``progress=False``).

Inputs are built by :class:`clustermass.datasets.PhaseSpaceDataset` (KDE on the fly, scaled by
``kde.input_scale``). Without augmentation each diagram's grid is fixed, so by default the grids
are built once (in parallel with ``training.num_workers`` DataLoader workers) and kept in memory
(on the GPU when it fits); nothing is written to disk. With ``augment`` or a cache larger than
``training.cache_max_gb`` the grids are rebuilt every epoch.

The result is a :class:`clustermass.bundle.ModelBundle` written to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from ._bundlefmt import existing_fingerprint
from ._io import guard_output, write_json_atomic
from ._lightning import quiet_lightning
from .bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CALIBRATION_FILE,
    ModelBundle,
    _dataset,
    channels_last,
    memory_format,
)
from .catalog import Catalogue, halo_split, train_validation_split, training_data_range  # noqa: F401  (re-exported)
from .config import KIND_DIMS, RUN_ONLY_TRAINING_FIELDS, KDEConfig, TrainingConfig, WindowConfig
from .datasets import SubsetBatches, TensorBatches, build_inputs, build_inputs_memmap
from .errors import ClustermassError
from .networks import build_network, count_parameters, default_arch

#: the columns of a training history (``model.json["training"]["history"]``): epoch (1-based),
#: mean train and validation MSE [dex^2], wall seconds of the training and validation passes, and
#: the CPU seconds of the training pass
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "train_s", "val_s", "train_cpu_s")


# ---------------------------------------------------------------------- data
def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the running torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled index batches; the order of epoch ``e`` depends only on (seed, e).

    That makes a resumed run draw exactly the batches an uninterrupted one would
    (Lightning calls :meth:`set_epoch` before every epoch).

    Under DDP (a torch.distributed process group of W ranks) every rank walks the same batches
    and keeps its 1/W slice of each (``numpy.array_split``; a batch smaller than W goes whole to
    every rank), so each optimiser step sees the single-device batch: DDP's gradient average
    equals the single-device gradient up to floating-point reduction order (exactly so when W
    divides the batch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, dataset=None) -> None:
        self.n, self.batch_size, self.seed, self.shuffle, self.epoch = n, batch_size, seed, shuffle, 0
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        """Select the batch order (and the dataset's augmentation draws) of ``epoch``."""
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            if self.shuffle else np.arange(self.n)
        )
        rank, world = _rank_world()
        for i in range(0, self.n, self.batch_size):
            batch = order[i : i + self.batch_size]
            if world > 1 and len(batch) >= world:
                batch = np.array_split(batch, world)[rank]
            yield batch.tolist()


# ---------------------------------------------------------------------- lightning
class PhaseSpaceDataModule(pl.LightningDataModule):
    """Train and validation batches of phase-space grids for one training run.

    Grids are built once and held in memory (``training.cache_inputs``, up to
    ``training.cache_max_gb``; on the GPU when it fits), built once into a memory-mapped file at
    ``memmap_file`` beyond that budget, or rebuilt every epoch by DataLoader workers with
    ``augment="rotate"``. ``d4`` augmentation applies the square window's symmetries to the
    cached 3D cubes. Batches come from :class:`EpochBatchSampler` (order fixed by (seed, epoch);
    sliced across DDP ranks). :meth:`setup` is idempotent: called before ``Trainer.fit`` it
    builds the grids once in the launching process, so forked DDP ranks share them.
    """

    def __init__(self, catalogue: Catalogue, kind: str, window: WindowConfig, kde: KDEConfig,
                 training: TrainingConfig, train_rows, val_rows, seed: int, memmap_file: Path,
                 progress: bool = False) -> None:
        super().__init__()
        self.catalogue, self.kind, self.window, self.kde, self.cfg = catalogue, kind, window, kde, training
        self.train_rows, self.val_rows, self.seed = np.asarray(train_rows), np.asarray(val_rows), seed
        self.memmap_file, self.progress = Path(memmap_file), progress
        self.cuda = torch.cuda.is_available()
        self.multi = training.devices * training.num_nodes > 1
        self.cache_gb = (len(train_rows) + len(val_rows)) * kde.n_grid ** KIND_DIMS[kind] * 4 / 1e9
        # sky-plane symmetries change only the 3D cubes; (R_proj, v) and v are invariant
        self.augment = training.augment if kind == "cnn3d" else "none"
        rebuild = self.augment == "rotate"  # galaxies rotated every epoch: no fixed cubes
        self.in_memory = training.cache_inputs and not rebuild and self.cache_gb <= training.cache_max_gb
        # larger than the in-memory budget: the grids are built once into a memory-mapped file and
        # read back batch by batch (the OS pages them in and out), so training data may exceed RAM
        self.on_disk = training.cache_inputs and not rebuild and not self.in_memory
        self.train_set = self.val_set = self.train_base = None
        self.workers: dict = {"num_workers": 0}
        self.pin = False

    @property
    def inputs_cached(self) -> bool | str:
        """How the grids were held: True (memory), "disk" (memory-mapped file) or False (rebuilt)."""
        return "disk" if self.on_disk else bool(self.in_memory)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        kind, window, kde, nw = self.kind, self.window, self.kde, self.cfg.num_workers
        if self.in_memory or self.on_disk:
            both = _dataset(self.catalogue, np.concatenate([self.train_rows, self.val_rows]), kind, window, kde)
            batch = max(self.cfg.batch_size, 64)
            if self.in_memory:
                x, y = build_inputs(both, batch_size=batch, num_workers=nw, progress=self.progress,
                                    desc=f"{kind} grids")
                if self.cuda and not self.multi and self.cache_gb < 0.5 * torch.cuda.mem_get_info()[0] / 1e9:
                    x, y = x.to("cuda"), y.to("cuda")
            else:
                self.memmap_file.parent.mkdir(parents=True, exist_ok=True)
                x, y = build_inputs_memmap(both, self.memmap_file, batch_size=batch, num_workers=nw,
                                           progress=self.progress, desc=f"{kind} grids (disk)")
            n_tr = len(self.train_rows)
            self.train_set = TensorBatches(x[:n_tr], y[:n_tr], symmetries=self.augment == "d4", seed=self.seed)
            self.val_set = TensorBatches(x[n_tr:], y[n_tr:])
            self.train_base = self.train_set  # receives set_epoch (symmetry draws per epoch)
            self.pin = self.cuda and not x.is_cuda
        else:
            augment = self.augment if self.augment != "none" else False
            self.train_base = _dataset(self.catalogue, self.train_rows, kind, window, kde, augment=augment,
                                       seed=self.seed)
            val_ds = _dataset(self.catalogue, self.val_rows, kind, window, kde)
            self.train_set, self.val_set = SubsetBatches(self.train_base), SubsetBatches(val_ds)
            # workers are re-spawned each epoch so they see the epoch's augmentation seed
            self.workers = {"num_workers": nw, "persistent_workers": nw > 0 and self.augment == "none"}
            self.pin = self.cuda

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = EpochBatchSampler(len(self.train_set), self.cfg.batch_size, self.seed, dataset=self.train_base)
        return torch.utils.data.DataLoader(self.train_set, batch_size=None, sampler=sampler, pin_memory=self.pin,
                                           **self.workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = EpochBatchSampler(len(self.val_set), self.cfg.batch_size, self.seed, shuffle=False)
        return torch.utils.data.DataLoader(self.val_set, batch_size=None, sampler=sampler, pin_memory=self.pin,
                                           **self.workers)

    def release(self) -> None:
        """Drop the grids and delete this process's memory-mapped grid file (if any)."""
        self.train_set = self.val_set = self.train_base = None
        if self.on_disk:
            self.memmap_file.unlink(missing_ok=True)


class Regressor(pl.LightningModule):
    """MSE of log10 M200c [dex^2], Adam; the network outputs log10 M directly.

    Logs ``train_loss`` (mean over the epoch's samples) and ``val_loss`` (mean over the
    validation samples) once per epoch; under DDP both are averaged over the ranks' slices.
    Inputs are put into ``input_format`` (channels-last for the 2D/3D networks) before the network.
    """

    def __init__(self, network: nn.Module, lr: float, betas, input_format: torch.memory_format | None = None) -> None:
        super().__init__()
        self.network = network
        self.lr, self.betas, self.input_format = lr, tuple(betas), input_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_format is not None:
            x = x.contiguous(memory_format=self.input_format)
        return self.network(x)

    def _loss(self, batch, name: str) -> torch.Tensor:
        x, y = batch
        loss = torch.mean((self(x).float() - y.float()) ** 2)
        # the epoch's train loss is summed in float64 (sum of batch loss x batch size / samples);
        # under DDP each rank sees a slice of every batch: sample-weighted mean over the ranks
        value = loss.detach().double() if name == "train_loss" else loss
        self.log(name, value, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=self.trainer.world_size > 1)
        return loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train_loss")

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val_loss")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas)


class EpochTimes(pl.Callback):
    """Logs ``train_s``, ``val_s`` (wall seconds of the training and validation passes) and
    ``train_cpu_s`` (CPU seconds of this process in the training pass) once per epoch."""

    def __init__(self) -> None:
        self._t = [time.perf_counter()] * 3
        self._c = [time.process_time()] * 2

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = [time.perf_counter()] * 3
        self._c = [time.process_time()] * 2

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t[1], self._c[1] = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t[2] = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        (t0, t1, t2), (c0, c1) = self._t, self._c
        row = {"epoch": trainer.current_epoch, "train_s": round(t1 - t0, 4), "val_s": round(t2 - t1, 4),
               "train_cpu_s": round(c1 - c0, 4)}
        for logger in trainer.loggers:  # rank 0 only (CSVLogger); saved with the epoch's metrics
            logger.log_metrics(row, step=trainer.global_step)


class EpochProgressBar(ProgressBar):
    """One tqdm bar of epochs (rank 0) with the epoch's train and validation loss and the best so far."""

    def __init__(self, total_epochs: int, desc: str) -> None:
        super().__init__()
        self.total_epochs, self.desc, self.enabled, self.bar, self.best = total_epochs, desc, True, None, math.inf

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_epochs, initial=trainer.current_epoch, desc=self.desc, unit="epoch",
                        disable=not self.enabled or not trainer.is_global_zero, dynamic_ncols=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
        self.best = min(self.best, m.get("val_loss", math.inf))
        self.bar.set_postfix(train=f"{m.get('train_loss', math.nan):.4f}", val=f"{m.get('val_loss', math.nan):.4f}",
                             best=f"{self.best:.4f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)


def read_history(log_dir: str | Path) -> list[dict]:
    """The per-epoch history of a training from the CSVLogger files under ``log_dir``.

    Each attempt (the first fit, each resumption) writes ``version_<n>/metrics.csv``; an attempt
    that starts at epoch e replaces the rows from epoch e on of the earlier ones, so the result is
    the history of the run that produced the final weights.

    Returns
    -------
    One dict per epoch with the keys of :data:`HISTORY_KEYS` (epoch 1-based; a value never
    logged is NaN), sorted by epoch.
    """
    def version(path: Path) -> int:
        return int(path.parent.name.rpartition("_")[2])

    rows: dict[int, dict] = {}
    for path in sorted(Path(log_dir).glob("version_*/metrics.csv"), key=version):
        with path.open(newline="") as f:
            records = [r for r in csv.DictReader(f) if r.get("epoch")]
        if not records:
            continue
        first = min(int(float(r["epoch"])) for r in records) + 1
        rows = {e: r for e, r in rows.items() if e < first}
        for r in records:
            e = int(float(r["epoch"])) + 1
            rows.setdefault(e, {"epoch": e}).update({k: float(v) for k, v in r.items() if k in HISTORY_KEYS[1:] and v})
    return [{k: row.get(k, math.nan) for k in HISTORY_KEYS} for _, row in sorted(rows.items())]




def _precision(training: TrainingConfig, cuda: bool) -> str:
    want = training.precision
    if want != "auto":
        return want
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


#: set during a multi-device fit, so the processes Lightning relaunches know which model they train
DDP_KIND_ENV = "CLUSTERMASS_DDP_KIND"
#: what Lightning's process launcher writes into the launching process's environment
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _strategy(training: TrainingConfig) -> str:
    """Lightning strategy: ``auto`` on one device, else the configured one (``auto`` -> ``ddp``)."""
    if training.devices * training.num_nodes == 1:
        return training.strategy if training.strategy != "auto" else "auto"
    return "ddp" if training.strategy == "auto" else training.strategy


def _launch_rank(training: TrainingConfig) -> int:
    """Global rank of this process in the training that is being launched (0 on one device).

    Read the way Lightning will: torchrun/torchelastic (RANK), Slurm (SLURM_PROCID, under
    srun), else LOCAL_RANK/NODE_RANK (set by Lightning for the processes it relaunches;
    unset, i.e. rank 0, in the launching process and under ddp_fork).
    """
    if training.devices * training.num_nodes == 1:
        return 0
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"])
    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("NODE_RANK", 0)) * training.devices + int(os.environ.get("LOCAL_RANK", 0))


def _run_fingerprint(kind, arch, window, kde, training, seed, data_hash) -> dict:
    tr = training.model_dump(mode="json")
    # how many devices train does not change the result (up to reduction order): resumable anywhere
    for k in RUN_ONLY_TRAINING_FIELDS:
        tr.pop(k, None)
    return {"kind": kind, "arch": arch, "window": window.model_dump(mode="json"),
            "kde": kde.model_dump(mode="json"), "training": tr, "seed": int(seed), "data_hash": data_hash}


def _readable_checkpoint(path: Path) -> bool:
    """True when ``path`` loads with ``torch.load(weights_only=True)`` (complete, no pickled objects)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, UnpicklingError, ... : any failure means "do not resume"
        return False
    return True




def _load_ckpt_state(path: Path) -> dict:
    """The ``state_dict`` of a Lightning checkpoint of our own run (tensors only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items()}


def _train_split(catalogue: Catalogue, val_fraction: float, seed: int):
    """(train rows, validation rows, target mean, target std) of the ``train`` split [log10 M]."""
    train_rows, val_rows, logm = train_validation_split(catalogue, val_fraction, seed)
    t_mean, t_std = float(logm[train_rows].mean()), float(logm[train_rows].std())
    return train_rows, val_rows, t_mean, t_std if t_std > 0 else 1.0


def _resume_from(ckpt_dir: Path, fingerprint: dict, resume: bool | None) -> Path | None:
    """``ckpt_dir/last.ckpt`` when the run should resume from it (see :func:`train_model`), else None."""
    last, run_file = ckpt_dir / "last.ckpt", ckpt_dir / "run.json"
    try:
        state = json.loads(run_file.read_text()) if run_file.is_file() else None
    except (OSError, json.JSONDecodeError):
        state = None
    if last.is_file() and state is not None and resume is not False and not _readable_checkpoint(last):
        warnings.warn(f"checkpoint {last} cannot be read safely (truncated, or holds pickled objects); "
                      "starting the training over", UserWarning, stacklevel=3)
        state = None
        if resume:
            raise ClustermassError(f"cannot resume: checkpoint {last} is unreadable")
    if resume is True and not last.is_file():
        raise ClustermassError(f"cannot resume: no checkpoint {last}")
    if last.is_file() and state is not None and resume is not False:
        if state.get("fingerprint") != fingerprint:
            if resume:
                raise ClustermassError(
                    f"cannot resume from {ckpt_dir}: it was made with other data or settings; "
                    "use another --out or resume=False"
                )
        elif resume or not state.get("completed", False):
            return last
    return None


@contextlib.contextmanager
def _ddp_launch(kind: str, multi: bool):
    """Bookkeeping around a fit that Lightning may launch on several processes.

    Processes that Lightning relaunches (strategy ddp) rerun the command from the start; `run`
    reads :data:`DDP_KIND_ENV` to train only this model in them (see pipeline.run_pipeline).
    Lightning launches the processes itself when LOCAL_RANK is unset; it then leaves MASTER_PORT,
    LOCAL_RANK, ... in this process's environment, which would make the next multi-device training
    of `run` believe it was launched externally: they are restored afterwards. The ranks of this
    fit end with it: a later training starts a new process group with new ranks.
    """
    own_launch = multi and "LOCAL_RANK" not in os.environ
    saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV + (DDP_KIND_ENV,)}
    if own_launch:
        os.environ[DDP_KIND_ENV] = kind
    try:
        yield
    finally:
        if own_launch:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if multi and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fit(module: Regressor, data: PhaseSpaceDataModule, kind: str, training: TrainingConfig, ckpt_dir: Path,
         ckpt_path: Path | None, progress: bool, precision: str):
    """Run Lightning's fit (early stopping, checkpoints, CSV metrics); returns (trainer, early, ckpt)."""
    cuda = torch.cuda.is_available()
    early = EarlyStopping(monitor="val_loss", mode="min", patience=training.patience)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                           save_top_k=1, save_last=True, enable_version_counter=False)
    bar = [EpochProgressBar(training.max_epochs, f"train {kind}")] if progress else []
    with quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=training.max_epochs, accelerator="gpu" if cuda else "cpu",
            devices=training.devices, num_nodes=training.num_nodes, strategy=_strategy(training),
            precision=precision, callbacks=[EpochTimes(), early, ckpt, *bar],
            logger=CSVLogger(ckpt_dir, name="logs"), enable_model_summary=False, enable_progress_bar=progress,
            num_sanity_val_steps=0, deterministic=not cuda, benchmark=cuda, use_distributed_sampler=False,
            log_every_n_steps=1, default_root_dir=ckpt_dir.parent,
        )
        with _ddp_launch(kind, data.multi):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise ClustermassError(f"training interrupted; run again with the same --out to resume from "
                               f"{ckpt_dir / 'last.ckpt'}")
    return trainer, early, ckpt


def _best_network(network: nn.Module, best_path: Path | None, ckpt_dir: Path, history: list[dict], lr: float):
    """``network`` (CPU, float32, contiguous) holding the best checkpoint's weights; raises on divergence."""
    if not history or not np.isfinite([r["val_loss"] for r in history]).any():
        raise ClustermassError(
            f"training diverged: the validation loss was never finite (lr = {lr:g}); "
            "lower training.lr (e.g. --set training.lr=1e-4); no bundle written")
    if best_path is None or not best_path.is_file():
        raise ClustermassError(f"training produced no best checkpoint in {ckpt_dir}")
    network = network.to("cpu").to(memory_format=torch.contiguous_format).float()
    best_state = {k: v.contiguous() for k, v in _load_ckpt_state(best_path).items()}
    network.load_state_dict(best_state)
    if not all(torch.isfinite(v).all() for v in best_state.values() if v.is_floating_point()):
        raise ClustermassError("training diverged: the best weights hold NaN/inf; lower training.lr; no bundle written")
    return network


def _bundle_meta(catalogue, kind, window, kde, training, seed, arch, network, fingerprint, target, data,
                 history, stopped_early, precision, wall_s) -> dict:
    """``model.json`` of a trained bundle: architecture, preprocessing, training record, versions."""
    import lightning

    from . import __version__

    best_i = int(np.nanargmin([r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf for r in history]))
    halo = catalogue.clusters["halo_id"].to_numpy()
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "architecture": {"kind": kind, "n_grid": kde.n_grid, "arch": arch, "n_parameters": count_parameters(network)},
        "preprocessing": {
            "window": window.model_dump(mode="json"),
            "kde": kde.model_dump(mode="json"),
            "target": {"mean": target[0], "std": target[1], "quantity": "log10(M200c / h^-1 Msun)"},
        },
        "training": {
            **training.model_dump(mode="json"),
            "model": kind,
            "seed": int(seed),
            "data_hash": fingerprint["data_hash"],
            "n_train": int(len(data.train_rows)),
            "n_val": int(len(data.val_rows)),
            "val_halo_ids": sorted(int(h) for h in np.unique(halo[data.val_rows])),
            "epochs_run": int(len(history)),
            "best_epoch": int(history[best_i]["epoch"]),
            "best_val_loss": float(history[best_i]["val_loss"]),
            "stopped_early": bool(stopped_early),
            "history": history,
            "precision": precision,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "inputs_cached": data.inputs_cached,
            "wall_s": round(wall_s, 3),
        },
        "versions": {"clustermass": __version__, "torch": torch.__version__, "lightning": lightning.__version__},
        # where the model may be applied: flux limit, distances and masses of its training mocks
        "training_data": training_data_range(catalogue),
        "calibration": None,
    }


def train_model(
    catalogue: Catalogue,
    kind: str,
    window: WindowConfig,
    kde: KDEConfig,
    training: TrainingConfig,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
    resume: bool | None = None,
    arch: dict | None = None,
    overwrite: bool = False,
) -> ModelBundle:
    """Train a network of ``kind`` on the ``train`` split and write its bundle into ``out_dir``.

    Parameters
    ----------
    catalogue : catalogue with a ``train`` split and true ``log_m200c``.
    kind : "cnn3d", "cnn2d", "cnn1d", or "set" (:func:`clustermass.settraining.train_set_npe`; ``kde``
        and ``resume`` do not apply to it).
    window, kde : preprocessing (observation window, KDE grid and input scaling); stored in the bundle.
    training : optimiser, batch size, epochs, patience, validation fraction, augmentation, workers.
    seed : seeds the validation draw, the weights, the batch order and the augmentation.
    out_dir : bundle directory; checkpoints go to ``out_dir/checkpoints``.
    progress : show a per-epoch progress bar with train/val loss (silent otherwise).
        The per-epoch metrics are also written by Lightning's CSVLogger into
        ``out_dir/checkpoints/logs/version_*/metrics.csv`` (one version per attempt).
    resume : None resumes when ``checkpoints/last.ckpt`` of an unfinished run with the same
        data and settings exists; True also continues a finished run (e.g. with more
        ``max_epochs``); False starts afresh.
    arch : architecture overrides for :func:`clustermass.networks.build_network`.
    overwrite : replace a bundle in ``out_dir`` trained on other data or settings (or of another
        kind); without it that raises :class:`~clustermass.errors.OutputExistsError`. The same
        training may always rerun in place.

    Raises
    ------
    ClustermassError : no train split, NaN true masses, or a diverged training (non-finite
        validation loss or predictions); no bundle is written then.

    Returns
    -------
    ModelBundle holding the best-validation-loss weights (also saved in ``out_dir``); None on
    the ranks > 0 of a multi-process (DDP) training, where rank 0 writes the bundle.

    Notes
    -----
    ``training.devices``, ``num_nodes`` and ``strategy`` go to Lightning's Trainer. Under DDP the
    data are sharded by batch slices (:class:`EpochBatchSampler`): the global batch stays
    ``batch_size``, so results equal the single-device run up to floating-point reduction order.
    Each process builds the grid cache for itself (forked children share the parent's).
    """
    if kind == "set":  # the set-based neural posterior trains in its own module (issue 15)
        from .settraining import train_set_npe

        return train_set_npe(catalogue, window, training, seed, out_dir, progress=progress,
                             overwrite=overwrite, arch=arch)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    train_rows, val_rows, t_mean, t_std = _train_split(catalogue, training.val_fraction, seed)
    arch_full = json.loads(json.dumps({**default_arch(kind), **(arch or {})}))  # tuples -> lists, JSON-ready
    fingerprint = _run_fingerprint(kind, arch_full, window, kde, training, seed, catalogue.data_hash())
    ckpt_path = _resume_from(ckpt_dir, fingerprint, resume)
    guard_output(out_dir, existing_fingerprint(out_dir), fingerprint, overwrite, "a model bundle")
    rank = _launch_rank(training)  # under DDP only rank 0 touches the output directory
    if rank == 0:
        if ckpt_path is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ckpt_dir / "run.json", {"fingerprint": fingerprint, "completed": False})

    # the random streams in order: weights, then grids and batches (seeded by Lightning)
    pl.seed_everything(seed, workers=True, verbose=False)
    network = build_network(kind, kde.n_grid, **arch_full, target_mean=t_mean, target_std=t_std)
    module = Regressor(channels_last(network, kind), training.lr, training.betas, memory_format(kind))
    # one memmap file per launched process, beside (not inside) checkpoints/, which rank 0 may clear
    data = PhaseSpaceDataModule(catalogue, kind, window, kde, training, train_rows, val_rows, seed,
                                out_dir / f".grids-rank{rank}.npy", progress)
    data.setup("fit")  # grids built here, before the ranks fork, so forked ranks share them
    precision = _precision(training, torch.cuda.is_available())
    trainer, early, ckpt = _fit(module, data, kind, training, ckpt_dir, ckpt_path, progress, precision)
    data.release()
    if trainer.global_rank != 0:  # DDP: the other ranks are done; rank 0 writes the bundle
        return None

    history = read_history(ckpt_dir / "logs")  # written by rank 0, also under ddp_fork
    best = ckpt.best_model_path or (ckpt_dir / "best.ckpt")  # ddp_fork: the parent's callback saw no fit
    network = _best_network(module.network, Path(best), ckpt_dir, history, training.lr)
    stopped_early = early.stopped_epoch > 0 or (data.multi and len(history) < training.max_epochs)
    write_json_atomic(ckpt_dir / "run.json", {"fingerprint": fingerprint, "completed": True})
    meta = _bundle_meta(catalogue, kind, window, kde, training, seed, arch_full, network, fingerprint,
                        (t_mean, t_std), data, history, stopped_early, precision, time.perf_counter() - t0)
    bundle = ModelBundle(kind, window, kde, network, meta)
    (out_dir / CALIBRATION_FILE).unlink(missing_ok=True)  # a calibration of earlier weights is stale
    bundle.save(out_dir)
    from .plots.training import plot_loss_curve

    plot_loss_curve(history, out_dir / "loss_curve.png", best_epoch=meta["training"]["best_epoch"],
                    title=f"{kind}: MSE of log10 M200c")
    return bundle
