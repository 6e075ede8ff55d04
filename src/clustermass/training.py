"""Training with PyTorch Lightning (SCIENCE.md sec. 5).

:func:`train_model` fits a network of :mod:`clustermass.networks` to log10 M200c on the ``train``
split: MSE loss, Adam, a validation set of whole halos (``training.val_fraction`` of the train
halos; the sight lines of one halo never straddle the split), early stopping on the validation
loss with the best weights restored, checkpoints in ``out_dir/checkpoints`` so an interrupted
run resumes, seeded for repeatable CPU runs, mixed precision and channels-last on a GPU.

Inputs are built by :class:`clustermass.datasets.PhaseSpaceDataset` (KDE on the fly, scaled by
``kde.input_scale``). Without augmentation each diagram's grid is fixed, so by default the grids
are built once (in parallel with ``training.num_workers`` DataLoader workers) and kept in memory
(on the GPU when it fits); nothing is written to disk. With ``augment`` or a cache larger than
``training.cache_max_gb`` the grids are rebuilt every epoch.

The result is a :class:`clustermass.bundle.ModelBundle` written to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import guard_output, write_json_atomic
from .bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CALIBRATION_FILE,
    META_FILE,
    ModelBundle,
    _dataset,
    channels_last,
)
from .catalog import Catalogue, halo_split, training_data_range  # noqa: F401  (re-exported)
from .config import KIND_DIMS, KDEConfig, TrainingConfig, WindowConfig
from .errors import ClustermassError
from .networks import build_network, count_parameters, default_arch


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


class _TensorBatches(torch.utils.data.Dataset):
    """In-memory grids indexed by a list of rows at once (one gather per batch).

    With ``symmetries`` (3D cubes only) each item gets one of the 8 exact symmetries of the square
    sky window (flip x, flip y, swap x and y), drawn from (seed, epoch, item): the KDE of the
    transformed galaxies is exactly the transformed cube, and the mass is unchanged.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, symmetries: bool = False, seed: int = 0) -> None:
        self.x, self.y, self.symmetries, self.seed, self.epoch = x, y, symmetries, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        x = self.x[torch.as_tensor(idx, device=self.x.device)]
        if self.symmetries:
            codes = np.random.default_rng([self.seed, self.epoch, int(idx[0])]).integers(0, 8, len(idx))
            x = apply_square_symmetries(x, codes)
        return x, self.y[torch.as_tensor(idx, device=self.y.device)]


def apply_square_symmetries(x: torch.Tensor, codes) -> torch.Tensor:
    """Apply symmetry ``codes[i]`` (bit 0: flip x, bit 1: flip y, bit 2: swap x and y) to cube i.

    ``x`` has shape (B, 1, n_x, n_y, n_v); the grid is symmetric about 0 on both sky axes.
    """
    out = x.clone()
    codes = np.asarray(codes)
    for c in range(1, 8):
        sel = torch.as_tensor(np.flatnonzero(codes == c), device=x.device)
        if len(sel) == 0:
            continue
        t = x[sel]
        if c & 1:
            t = t.flip(2)
        if c & 2:
            t = t.flip(3)
        if c & 4:
            t = t.transpose(2, 3)
        out[sel] = t
    return out


class _SubsetBatches(torch.utils.data.Dataset):
    """Batches of a per-item dataset for a list of indices (built items stacked)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx):
        items = [self.ds[i] for i in idx]
        return torch.stack([a for a, _ in items]), torch.stack([torch.as_tensor(b) for _, b in items])


def build_inputs(dataset, batch_size: int = 256, num_workers: int = 0, progress: bool = False,
                 desc: str = "phase-space grids") -> tuple[torch.Tensor, torch.Tensor]:
    """Build every item of ``dataset`` once: (x float32 (N, 1, n, ...), y float32 (N,))."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    xs, ys, i = None, torch.empty(len(dataset), dtype=torch.float32), 0
    with tqdm(total=len(dataset), desc=desc, unit="diagram", disable=not progress, leave=False) as bar:
        for x, y in loader:
            if xs is None:  # filled in place: peak memory is one copy of the grids
                xs = torch.empty((len(dataset),) + tuple(x.shape[1:]), dtype=torch.float32)
            xs[i : i + len(y)] = x
            ys[i : i + len(y)] = torch.as_tensor(y, dtype=torch.float32)
            i += len(y)
            bar.update(len(y))
    if xs is None:
        raise ClustermassError("no diagrams to build grids for")
    return xs, ys


def build_inputs_memmap(dataset, path: Path, batch_size: int = 256, num_workers: int = 0,
                        progress: bool = False, desc: str = "phase-space grids") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_inputs` into a ``.npy`` file at ``path``, memory-mapped: same values, but
    only one batch of grids is ever in memory (x is a tensor view of the mapped file)."""
    import os

    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    mm, ys, i = None, torch.empty(len(dataset), dtype=torch.float32), 0
    with tqdm(total=len(dataset), desc=desc, unit="diagram", disable=not progress, leave=False) as bar:
        for x, y in loader:
            if mm is None:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=(len(dataset),) + tuple(x.shape[1:]))
            mm[i : i + len(y)] = x.numpy()
            ys[i : i + len(y)] = torch.as_tensor(y, dtype=torch.float32)
            i += len(y)
            bar.update(len(y))
    if mm is None:
        raise ClustermassError("no diagrams to build grids for")
    mm.flush()
    del mm
    os.replace(tmp, path)
    # copy-on-write mapping: writable for torch, never written back
    return torch.from_numpy(np.load(path, mmap_mode="c")), ys


# ---------------------------------------------------------------------- lightning
def _lightning():
    import lightning.pytorch as pl

    return pl


def _make_module(network: nn.Module, lr: float, betas, channels_last: bool):
    pl = _lightning()

    class Regressor(pl.LightningModule):
        """MSE on log10 M; the network outputs log10 M directly."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self._memfmt = None
            if channels_last:
                self._memfmt = {5: torch.channels_last_3d, 4: torch.channels_last}
            self._sse, self._n = 0.0, 0

        def forward(self, x):
            if self._memfmt and x.dim() in self._memfmt:
                x = x.contiguous(memory_format=self._memfmt[x.dim()])
            return self.network(x)

        def _loss(self, batch):
            x, y = batch
            pred = self(x).float()
            return torch.mean((pred - y.float()) ** 2), len(y)

        def on_train_epoch_start(self) -> None:
            self._sse, self._n = 0.0, 0

        def training_step(self, batch, batch_idx):
            loss, n = self._loss(batch)
            self._sse += float(loss.detach()) * n
            self._n += n
            return loss

        def validation_step(self, batch, batch_idx):
            loss, n = self._loss(batch)
            # under DDP each rank sees a slice of every batch: average over the ranks
            self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=n,
                     sync_dist=self.trainer.world_size > 1)

        def train_loss_epoch(self) -> float:
            return self._sse / max(self._n, 1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(betas))

    return Regressor()


#: the History rows, as a (epochs, len(HISTORY_KEYS)) tensor in ``trainer.callback_metrics`` under DDP
HISTORY_METRIC = "_clustermass_history"
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "train_s", "val_s", "train_cpu_s")


def _make_history_callback(total_epochs: int, progress: bool, desc: str):
    pl = _lightning()

    class History(pl.Callback):
        """Per-epoch (train, val) loss, kept in the checkpoints; a tqdm bar of epochs."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.bar = None
            self._t0 = self._t1 = time.perf_counter()
            self._c0 = self._c1 = time.process_time()

        def on_fit_start(self, trainer, pl_module) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_epochs, initial=len(self.rows), desc=desc, unit="epoch",
                            disable=not progress or trainer.global_rank != 0, dynamic_ncols=True)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t0 = self._t1 = time.perf_counter()
            self._c0 = self._c1 = time.process_time()

        def on_validation_start(self, trainer, pl_module) -> None:
            self._t1, self._c1 = time.perf_counter(), time.process_time()

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            val = float(trainer.callback_metrics["val_loss"])
            now = time.perf_counter()
            train_loss = pl_module.train_loss_epoch()
            if trainer.world_size > 1:  # every rank saw a slice of each batch: sum over ranks
                tot = trainer.strategy.reduce(torch.tensor([pl_module._sse, float(pl_module._n)],
                                                           dtype=torch.float64, device=pl_module.device),
                                              reduce_op="sum")
                train_loss = float(tot[0] / max(float(tot[1]), 1.0))
            row = {"epoch": trainer.current_epoch + 1, "train_loss": train_loss,
                   "val_loss": val, "train_s": round(self._t1 - self._t0, 4), "val_s": round(now - self._t1, 4),
                   "train_cpu_s": round(self._c1 - self._c0, 4)}
            self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
            if self.bar is not None:
                best = min(r["val_loss"] for r in self.rows)
                self.bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{val:.4f}", best=f"{best:.4f}",
                                     refresh=False)
                self.bar.update(1)

        def on_fit_end(self, trainer, pl_module) -> None:
            if self.bar is not None:
                self.bar.close()
            if trainer.world_size > 1:  # ddp_fork: only callback_metrics travel back to the parent
                trainer.callback_metrics[HISTORY_METRIC] = torch.tensor(
                    [[float(r[k]) for k in HISTORY_KEYS] for r in self.rows], dtype=torch.float64)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.on_fit_end(trainer, pl_module)

        def state_dict(self) -> dict:
            return {"rows": [dict(r) for r in self.rows]}

        def load_state_dict(self, state_dict) -> None:
            self.rows = [dict(r) for r in state_dict.get("rows", [])]

    return History()


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's banners and hints (GPU available, worker counts, ...)."""
    names = ["lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
             "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning.*")
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*")
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory.*exists.*")
            # DDP with channels-last weights: harmless (gradients are copied into the buckets)
            warnings.filterwarnings("ignore", message=r".*Grad strides do not match bucket view.*")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


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
    for k in ("max_epochs", "patience", "num_workers", "cache_max_gb", "devices", "num_nodes", "strategy"):
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


def _existing_fingerprint(out_dir: Path):
    """What the bundle in ``out_dir`` was trained from (None when there is no bundle)."""
    meta_file = out_dir / META_FILE
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text()).get("fingerprint", "unknown")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown"


def _load_ckpt_state(path: Path) -> dict:
    """The ``state_dict`` of a Lightning checkpoint of our own run (tensors only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items()}


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
    pl = _lightning()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    rows = catalogue.rows("train")
    if len(rows) == 0:
        raise ClustermassError("the catalogue has no 'train' split to train on")
    logm = catalogue.clusters["log_m200c"].to_numpy(dtype=np.float64)
    if not np.isfinite(logm[rows]).all():
        raise ClustermassError("training needs true masses, but the 'train' split has NaN log_m200c")
    train_rows, val_rows = halo_split(catalogue, rows, training.val_fraction, seed)
    y_train = logm[train_rows]
    t_mean, t_std = float(y_train.mean()), float(y_train.std())
    if not t_std > 0:
        t_std = 1.0
    arch_full = {**default_arch(kind), **(arch or {})}
    arch_full = json.loads(json.dumps(arch_full))  # tuples -> lists, JSON-ready
    data_hash = catalogue.data_hash()
    fingerprint = _run_fingerprint(kind, arch_full, window, kde, training, seed, data_hash)

    # ---- resume or start afresh
    last = ckpt_dir / "last.ckpt"
    run_file = ckpt_dir / "run.json"
    try:
        state = json.loads(run_file.read_text()) if run_file.is_file() else None
    except (OSError, json.JSONDecodeError):
        state = None
    if last.is_file() and state is not None and resume is not False and not _readable_checkpoint(last):
        warnings.warn(f"checkpoint {last} cannot be read safely (truncated, or holds pickled objects); "
                      "starting the training over", UserWarning, stacklevel=2)
        state = None
        if resume:
            raise ClustermassError(f"cannot resume: checkpoint {last} is unreadable")
    ckpt_path = None
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
            ckpt_path = last
    guard_output(out_dir, _existing_fingerprint(out_dir), fingerprint, overwrite, "a model bundle")
    rank = _launch_rank(training)  # under DDP only rank 0 touches the output directory
    if rank == 0:
        if ckpt_path is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, {"fingerprint": fingerprint, "completed": False})

    pl.seed_everything(seed, workers=True, verbose=False)
    network = build_network(kind, kde.n_grid, **arch_full, target_mean=t_mean, target_std=t_std)
    cuda = torch.cuda.is_available()
    precision = _precision(training, cuda)
    use_channels_last = kind in ("cnn3d", "cnn2d")  # faster convolutions on GPU and CPU (oneDNN)
    network = channels_last(network, kind)
    module = _make_module(network, training.lr, training.betas, use_channels_last)

    # ---- data
    device = torch.device("cuda") if cuda else torch.device("cpu")
    multi = training.devices * training.num_nodes > 1
    n_cells = kde.n_grid ** KIND_DIMS[kind]
    cache_gb = (len(train_rows) + len(val_rows)) * n_cells * 4 / 1e9
    # sky-plane symmetries change only the 3D cubes; (R_proj, v) and v are invariant
    augment = training.augment if kind == "cnn3d" else "none"
    rebuild = augment == "rotate"  # galaxies rotated every epoch: no fixed cubes
    use_cache = training.cache_inputs and not rebuild and cache_gb <= training.cache_max_gb
    # larger than the in-memory budget: the grids are built once into a memory-mapped file and
    # read back batch by batch (the OS pages them in and out), so training data may exceed RAM
    use_memmap = training.cache_inputs and not rebuild and not use_cache
    # one file per launched process, beside (not inside) checkpoints/, which rank 0 may clear
    memmap_file = out_dir / f".grids-rank{rank}.npy"
    nw = training.num_workers
    train_base = None
    if use_cache:
        both = _dataset(catalogue, np.concatenate([train_rows, val_rows]), kind, window, kde)
        x, y = build_inputs(both, batch_size=max(training.batch_size, 64), num_workers=nw,
                            progress=progress, desc=f"{kind} grids")
        if cuda and not multi and cache_gb < 0.5 * torch.cuda.mem_get_info()[0] / 1e9:
            x, y = x.to(device), y.to(device)
        n_tr = len(train_rows)
        symmetries = augment == "d4"
        train_set = _TensorBatches(x[:n_tr], y[:n_tr], symmetries=symmetries, seed=seed)
        val_set = _TensorBatches(x[n_tr:], y[n_tr:])
        train_base = train_set  # receives set_epoch (symmetry draws per epoch)
        workers = {"num_workers": 0}
    elif use_memmap:
        out_dir.mkdir(parents=True, exist_ok=True)
        both = _dataset(catalogue, np.concatenate([train_rows, val_rows]), kind, window, kde)
        x, y = build_inputs_memmap(both, memmap_file, batch_size=max(training.batch_size, 64),
                                   num_workers=nw, progress=progress, desc=f"{kind} grids (disk)")
        n_tr = len(train_rows)
        train_set = _TensorBatches(x[:n_tr], y[:n_tr], symmetries=augment == "d4", seed=seed)
        val_set = _TensorBatches(x[n_tr:], y[n_tr:])
        train_base = train_set
        workers = {"num_workers": 0}
    else:
        train_base = _dataset(catalogue, train_rows, kind, window, kde,
                              augment=augment if augment != "none" else False, seed=seed)
        val_ds = _dataset(catalogue, val_rows, kind, window, kde)
        train_set, val_set = _SubsetBatches(train_base), _SubsetBatches(val_ds)
        # workers are re-spawned each epoch so they see the epoch's augmentation seed
        workers = {"num_workers": nw, "persistent_workers": nw > 0 and augment == "none"}
    pin = cuda and not (use_cache and x.is_cuda)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=None,
        sampler=EpochBatchSampler(len(train_set), training.batch_size, seed, dataset=train_base),
        pin_memory=pin, **workers)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=None, sampler=EpochBatchSampler(len(val_set), training.batch_size, seed, shuffle=False),
        pin_memory=pin, **workers)

    # ---- trainer
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    history = _make_history_callback(training.max_epochs, progress, f"train {kind}")
    early = EarlyStopping(monitor="val_loss", mode="min", patience=training.patience)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                           save_top_k=1, save_last=True, enable_version_counter=False)
    with _quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=training.max_epochs, accelerator="gpu" if cuda else "cpu",
            devices=training.devices, num_nodes=training.num_nodes, strategy=_strategy(training),
            precision=precision, callbacks=[history, early, ckpt], logger=False,
            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
            deterministic=not cuda, benchmark=cuda, use_distributed_sampler=False,
            log_every_n_steps=1, default_root_dir=out_dir,
        )
        # processes that Lightning relaunches (strategy ddp) rerun the command from the start;
        # `run` reads this to train only this model in them (see pipeline.run_pipeline)
        # Lightning launches the processes itself when LOCAL_RANK is unset; it then leaves
        # MASTER_PORT, LOCAL_RANK, ... in this process's environment, which would make the next
        # multi-device training of `run` believe it was launched externally: restore them after
        own_launch = multi and "LOCAL_RANK" not in os.environ
        saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV + (DDP_KIND_ENV,)}
        if own_launch:
            os.environ[DDP_KIND_ENV] = kind
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
        finally:
            if own_launch:
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    if multi and torch.distributed.is_available() and torch.distributed.is_initialized():
        # the ranks relaunched for this fit end with it: a later training (the next model of
        # `run`) starts a new process group with new ranks
        torch.distributed.destroy_process_group()
    if trainer.interrupted:
        raise ClustermassError(f"training interrupted; run again with the same --out to resume from {last}")
    if trainer.global_rank != 0:  # DDP: the other ranks are done; rank 0 writes the bundle
        if use_memmap:
            del train_set, val_set, train_loader, val_loader, x, y
            memmap_file.unlink(missing_ok=True)
        return None

    # ---- restore the best weights
    if multi and HISTORY_METRIC in trainer.callback_metrics:  # ddp_fork trained in child processes
        table = np.asarray(trainer.callback_metrics[HISTORY_METRIC], dtype=np.float64).reshape(-1, len(HISTORY_KEYS))
        history.rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in zip(HISTORY_KEYS, row, strict=True)}
                        for row in table]
        if not ckpt.best_model_path and (ckpt_dir / "best.ckpt").is_file():
            ckpt.best_model_path = str(ckpt_dir / "best.ckpt")
    hist = history.rows
    stopped_early = early.stopped_epoch > 0 or (multi and len(hist) < training.max_epochs)
    if not hist or not np.isfinite([r["val_loss"] for r in hist]).any():
        raise ClustermassError(
            f"training diverged: the validation loss was never finite (lr = {training.lr:g}); "
            "lower training.lr (e.g. --set training.lr=1e-4); no bundle written")
    best_path = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    if best_path is None or not best_path.is_file():
        raise ClustermassError(f"training produced no best checkpoint in {ckpt_dir}")
    network = network.to("cpu").to(memory_format=torch.contiguous_format).float()
    best_state = {k: v.contiguous() for k, v in _load_ckpt_state(best_path).items()}
    network.load_state_dict(best_state)
    if not all(torch.isfinite(v).all() for v in best_state.values() if v.is_floating_point()):
        raise ClustermassError("training diverged: the best weights hold NaN/inf; lower training.lr; no bundle written")
    best_i = int(np.nanargmin([r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf for r in hist]))
    write_json_atomic(run_file, {"fingerprint": fingerprint, "completed": True})
    if use_memmap:
        del train_set, val_set, train_loader, val_loader, x, y
        memmap_file.unlink(missing_ok=True)

    import lightning

    from . import __version__

    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "architecture": {"kind": kind, "n_grid": kde.n_grid, "arch": arch_full,
                         "n_parameters": count_parameters(network)},
        "preprocessing": {
            "window": window.model_dump(mode="json"),
            "kde": kde.model_dump(mode="json"),
            "target": {"mean": t_mean, "std": t_std, "quantity": "log10(M200c / h^-1 Msun)"},
        },
        "training": {
            **training.model_dump(mode="json"),
            "model": kind,
            "seed": int(seed),
            "data_hash": data_hash,
            "n_train": int(len(train_rows)),
            "n_val": int(len(val_rows)),
            "val_halo_ids": sorted(int(h) for h in np.unique(catalogue.clusters["halo_id"].to_numpy()[val_rows])),
            "epochs_run": int(len(hist)),
            "best_epoch": int(hist[best_i]["epoch"]),
            "best_val_loss": float(hist[best_i]["val_loss"]),
            "stopped_early": bool(stopped_early),
            "history": hist,
            "precision": precision,
            "device": "cuda" if cuda else "cpu",
            "inputs_cached": "disk" if use_memmap else bool(use_cache),
            "wall_s": round(time.perf_counter() - t0, 3),
        },
        "versions": {"clustermass": __version__, "torch": torch.__version__,
                     "lightning": lightning.__version__},
        # where the model may be applied: flux limit, distances and masses of its training mocks
        "training_data": training_data_range(catalogue),
        "calibration": None,
    }
    bundle = ModelBundle(kind, window, kde, network, meta)
    (out_dir / CALIBRATION_FILE).unlink(missing_ok=True)  # a calibration of earlier weights is stale
    bundle.save(out_dir)
    from .plots.training import plot_loss_curve

    plot_loss_curve(hist, out_dir / "loss_curve.png", best_epoch=meta["training"]["best_epoch"],
                    title=f"{kind}: MSE of log10 M200c")
    return bundle
