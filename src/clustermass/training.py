"""Training with PyTorch Lightning and safe model bundles (SCIENCE.md sec. 5).

:func:`train_model` fits a network of :mod:`clustermass.networks` to log10 M200c on the ``train``
split: MSE loss, Adam, a validation set of whole halos (``training.val_fraction`` of the train
halos; the sight lines of one halo never straddle the split), early stopping on the validation
loss with the best weights restored, checkpoints in ``out_dir/checkpoints`` so an interrupted
run resumes, seeded for repeatable CPU runs, mixed precision and channels-last on a GPU.

Inputs are built by :class:`clustermass.phasespace.PhaseSpaceDataset` (KDE on the fly, scaled by
``kde.input_scale``). Without augmentation each diagram's grid is fixed, so by default the grids
are built once (in parallel with ``training.num_workers`` DataLoader workers) and kept in memory
(on the GPU when it fits); nothing is written to disk. With ``augment`` or a cache larger than
``training.cache_max_gb`` the grids are rebuilt every epoch.

A model bundle is a directory with ``weights.safetensors`` and ``model.json`` (architecture,
preprocessing, target standardisation, training metadata, weights checksum), ``loss_curve.png``
and, after SBI calibration, ``calibration.parquet``. :func:`load_model` never unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._io import atomic_write, write_json_atomic
from .catalog import Catalogue
from .config import KIND_DIMS, KDEConfig, TrainingConfig, WindowConfig
from .errors import BundleError, ClustermassError, ConfigError
from .networks import build_network, count_parameters, default_arch

BUNDLE_FORMAT = "clustermass-model"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
CALIBRATION_FILE = "calibration.parquet"


# ---------------------------------------------------------------------- data
def halo_split(catalogue: Catalogue, rows, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split cluster ``rows`` into (train, validation) by halo.

    ``round(val_fraction * n_halos)`` halos (at least 1, at most n_halos - 1), drawn with
    ``numpy.random.default_rng(seed)``, go to validation with all their sight lines.

    Returns
    -------
    (train_rows, val_rows), both sorted.
    """
    rows = np.asarray(rows)
    halo = catalogue.clusters["halo_id"].to_numpy()[rows]
    uniq = np.unique(halo)
    if len(uniq) < 2:
        raise ClustermassError(
            f"the train split has {len(uniq)} halo(s); a validation set drawn by halo needs at least 2"
        )
    n_val = min(max(1, round(val_fraction * len(uniq))), len(uniq) - 1)
    val_halos = np.random.default_rng(seed).choice(uniq, size=n_val, replace=False)
    is_val = np.isin(halo, val_halos)
    return np.sort(rows[~is_val]), np.sort(rows[is_val])


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled index batches; the order of epoch ``e`` depends only on (seed, e).

    That makes a resumed run draw exactly the batches an uninterrupted one would
    (Lightning calls :meth:`set_epoch` before every epoch).
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
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size].tolist()


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


def _dataset(catalogue, rows, kind, window, kde, augment=False, seed=0):
    from .phasespace import PhaseSpaceDataset

    return PhaseSpaceDataset(catalogue, rows, kind, window, kde, augment=augment, seed=seed)


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


def _memory_format(kind: str):
    return {"cnn3d": torch.channels_last_3d, "cnn2d": torch.channels_last}.get(kind)


def _channels_last(network: nn.Module, kind: str) -> nn.Module:
    fmt = _memory_format(kind)
    return network.to(memory_format=fmt) if fmt is not None else network


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
            self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=n)

        def train_loss_epoch(self) -> float:
            return self._sse / max(self._n, 1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(betas))

    return Regressor()


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
                            disable=not progress, dynamic_ncols=True)

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
            row = {"epoch": trainer.current_epoch + 1, "train_loss": pl_module.train_loss_epoch(),
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


def _run_fingerprint(kind, arch, window, kde, training, seed, data_hash) -> dict:
    tr = training.model_dump(mode="json")
    for k in ("max_epochs", "patience", "num_workers", "cache_max_gb"):
        tr.pop(k, None)
    return {"kind": kind, "arch": arch, "window": window.model_dump(mode="json"),
            "kde": kde.model_dump(mode="json"), "training": tr, "seed": int(seed), "data_hash": data_hash}


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
) -> ModelBundle:
    """Train a network of ``kind`` on the ``train`` split and write its bundle into ``out_dir``.

    Parameters
    ----------
    catalogue : catalogue with a ``train`` split and true ``log_m200c``.
    kind : "cnn3d", "cnn2d" or "cnn1d".
    window, kde : preprocessing (observation window, KDE grid and input scaling); stored in the bundle.
    training : optimiser, batch size, epochs, patience, validation fraction, augmentation, workers.
    seed : seeds the validation draw, the weights, the batch order and the augmentation.
    out_dir : bundle directory; checkpoints go to ``out_dir/checkpoints``.
    progress : show a per-epoch progress bar with train/val loss (silent otherwise).
    resume : None resumes when ``checkpoints/last.ckpt`` of an unfinished run with the same
        data and settings exists; True also continues a finished run (e.g. with more
        ``max_epochs``); False starts afresh.
    arch : architecture overrides for :func:`clustermass.networks.build_network`.

    Returns
    -------
    ModelBundle holding the best-validation-loss weights (also saved in ``out_dir``).
    """
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
    if ckpt_path is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, {"fingerprint": fingerprint, "completed": False})

    pl.seed_everything(seed, workers=True, verbose=False)
    network = build_network(kind, kde.n_grid, **arch_full, target_mean=t_mean, target_std=t_std)
    cuda = torch.cuda.is_available()
    precision = _precision(training, cuda)
    channels_last = kind in ("cnn3d", "cnn2d")  # faster convolutions on GPU and CPU (oneDNN)
    network = _channels_last(network, kind)
    module = _make_module(network, training.lr, training.betas, channels_last)

    # ---- data
    device = torch.device("cuda") if cuda else torch.device("cpu")
    n_cells = kde.n_grid ** KIND_DIMS[kind]
    cache_gb = (len(train_rows) + len(val_rows)) * n_cells * 4 / 1e9
    # sky-plane symmetries change only the 3D cubes; (R_proj, v) and v are invariant
    augment = training.augment if kind == "cnn3d" else "none"
    rebuild = augment == "rotate"  # galaxies rotated every epoch: no fixed cubes
    use_cache = training.cache_inputs and not rebuild and cache_gb <= training.cache_max_gb
    nw = training.num_workers
    train_base = None
    if use_cache:
        both = _dataset(catalogue, np.concatenate([train_rows, val_rows]), kind, window, kde)
        x, y = build_inputs(both, batch_size=max(training.batch_size, 64), num_workers=nw,
                            progress=progress, desc=f"{kind} grids")
        if cuda and cache_gb < 0.5 * torch.cuda.mem_get_info()[0] / 1e9:
            x, y = x.to(device), y.to(device)
        n_tr = len(train_rows)
        symmetries = augment == "d4"
        train_set = _TensorBatches(x[:n_tr], y[:n_tr], symmetries=symmetries, seed=seed)
        val_set = _TensorBatches(x[n_tr:], y[n_tr:])
        train_base = train_set  # receives set_epoch (symmetry draws per epoch)
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
            max_epochs=training.max_epochs, accelerator="gpu" if cuda else "cpu", devices=1,
            precision=precision, callbacks=[history, early, ckpt], logger=False,
            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
            deterministic=not cuda, benchmark=cuda, use_distributed_sampler=False,
            log_every_n_steps=1, default_root_dir=out_dir,
        )
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise ClustermassError(f"training interrupted; run again with the same --out to resume from {last}")

    # ---- restore the best weights
    best_path = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    if best_path is None or not best_path.is_file():
        raise ClustermassError(f"training produced no best checkpoint in {ckpt_dir}")
    network = network.to("cpu").to(memory_format=torch.contiguous_format).float()
    best_state = {k: v.contiguous() for k, v in _load_ckpt_state(best_path).items()}
    network.load_state_dict(best_state)
    hist = history.rows
    best_i = int(np.argmin([r["val_loss"] for r in hist]))
    write_json_atomic(run_file, {"fingerprint": fingerprint, "completed": True})

    import lightning

    from . import __version__

    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "kind": kind,
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
            "stopped_early": bool(early.stopped_epoch > 0),
            "history": hist,
            "precision": precision,
            "device": "cuda" if cuda else "cpu",
            "inputs_cached": bool(use_cache),
            "wall_s": round(time.perf_counter() - t0, 3),
        },
        "versions": {"clustermass": __version__, "torch": torch.__version__,
                     "lightning": lightning.__version__},
        # where the model may be applied: flux limit, distances and masses of its training mocks
        "training_data": {k: v for k, v in (catalogue.meta.get("simulation") or {}).items()
                          if k in ("mag_limit", "distance_max", "log_m_min", "log_m_max")},
        "calibration": None,
    }
    bundle = ModelBundle(kind, window, kde, network, meta)
    (out_dir / CALIBRATION_FILE).unlink(missing_ok=True)  # a calibration of earlier weights is stale
    bundle.save(out_dir)
    from .plots.training import plot_loss_curve

    plot_loss_curve(hist, out_dir / "loss_curve.png", best_epoch=meta["training"]["best_epoch"],
                    title=f"{kind}: MSE of log10 M200c")
    return bundle


# ---------------------------------------------------------------------- bundles
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelBundle:
    """A trained network with exactly the preprocessing it was trained with.

    Attributes
    ----------
    kind : "cnn3d", "cnn2d" or "cnn1d".
    window : WindowConfig of the phase-space diagrams.
    kde : KDEConfig (grid size, bandwidth, input scaling).
    network : the torch module (CPU, eval mode), outputs log10 M200c.
    meta : the ``model.json`` dict.
    path : bundle directory once saved or loaded, else None.
    """

    def __init__(self, kind: str, window: WindowConfig, kde: KDEConfig, network: nn.Module,
                 meta: dict, path: str | Path | None = None) -> None:
        self.kind, self.window, self.kde, self.network, self.meta = kind, window, kde, network, meta
        self.network.eval()
        self.path = Path(path) if path is not None else None
        self._calibration: pd.DataFrame | None = None
        self._posterior = None  # fitted JointKDEPosterior, cached until the calibration changes

    def __repr__(self) -> str:
        tr = self.meta.get("training", {})
        return (f"ModelBundle(kind={self.kind!r}, n_grid={self.kde.n_grid}, "
                f"best_val_loss={tr.get('best_val_loss')}, path={str(self.path) if self.path else None!r})")

    # -------------------------------------------------------------- prediction
    def predict(self, catalogue: Catalogue, rows=None, batch_size: int = 256, progress: bool = False,
                num_workers: int = 0, device: str | None = None) -> np.ndarray:
        """Predicted log10 M200c (the point prediction d_pred) of each diagram.

        Parameters
        ----------
        catalogue : diagrams to predict (galaxies inside the bundle's window are used).
        rows : cluster rows (default: all).
        batch_size : diagrams per forward pass.
        progress : show a tqdm bar.
        num_workers : DataLoader workers building the KDE grids.
        device : torch device for the forward passes (default: CUDA when available, else CPU).

        Returns
        -------
        float64 array (len(rows),) of log10(M200c / h^-1 Msun).
        """
        from tqdm.auto import tqdm

        rows = catalogue.rows() if rows is None else np.asarray(rows)
        out = np.empty(len(rows), dtype=np.float64)
        if len(rows) == 0:
            return out
        ds = _dataset(catalogue, rows, self.kind, self.window, self.kde)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        fmt = _memory_format(self.kind)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = _channels_last(self.network, self.kind).to(dev).eval()
        i = 0
        with torch.inference_mode(), tqdm(total=len(rows), desc=f"predict {self.kind}", unit="diagram",
                                          disable=not progress) as bar:
            for x, _ in loader:
                x = x.to(dev, dtype=torch.float32)
                x = x if fmt is None else x.contiguous(memory_format=fmt)
                pred = net(x).double().cpu().numpy()
                out[i : i + len(pred)] = pred
                i += len(pred)
                bar.update(len(pred))
        return out

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``model.json`` (and the calibration) atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.network.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": BUNDLE_FORMAT}))
        self.meta["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(directory / WEIGHTS_FILE),
                                "keys": sorted(state)}
        cal = self.calibration
        if cal is not None and (self.path is None or directory.resolve() != self.path.resolve()):
            _write_calibration(directory / CALIBRATION_FILE, cal)
        write_json_atomic(directory / META_FILE, self.meta)
        self.path = directory
        return directory

    @property
    def calibration(self) -> pd.DataFrame | None:
        """The SBI calibration pairs (columns d_pred, log_m_true), or None before calibration."""
        if self._calibration is None and self.meta.get("calibration") and self.path is not None:
            self._calibration = _read_calibration(self.path / CALIBRATION_FILE)
        return self._calibration

    def set_calibration(self, d_pred, log_m_true, bandwidth: float, min_neighbours: float = 5.0) -> None:
        """Store the (prediction, true mass) pairs of the calibration split and the KDE settings.

        The posterior is fitted first, so a calibration it would refuse is never written.

        Parameters
        ----------
        d_pred : predicted log10 M200c of the calibration diagrams.
        log_m_true : their true log10 M200c.
        bandwidth : scipy bw_method factor of the joint 2D KDE (SCIENCE.md sec. 6).
        min_neighbours : kernel weight of calibration pairs below which a prediction is out of range.
        """
        from .posterior import JointKDEPosterior

        if self.path is None:
            raise BundleError("save the bundle (bundle.save(dir)) before calibrating it")
        d = np.asarray(d_pred, dtype=np.float64).ravel()
        m = np.asarray(log_m_true, dtype=np.float64).ravel()
        if len(d) != len(m):
            raise ClustermassError(f"calibration needs matching arrays, got {len(d)} and {len(m)} values")
        if not (np.isfinite(d).all() and np.isfinite(m).all()):
            raise ClustermassError("calibration pairs must be finite (no NaN true masses)")
        params = {"bandwidth": float(bandwidth), "min_neighbours": float(min_neighbours)}
        posterior = JointKDEPosterior(**params).fit(d, m)  # raises on unusable calibrations
        df = pd.DataFrame({"d_pred": d, "log_m_true": m})
        _write_calibration(self.path / CALIBRATION_FILE, df)
        self._calibration, self._posterior = df, posterior
        self.meta["calibration"] = {"file": CALIBRATION_FILE, **params, "n_pairs": int(len(d))}
        write_json_atomic(self.path / META_FILE, self.meta)

    def posterior(self):
        """The SBI posterior ``JointKDEPosterior(bandwidth, min_neighbours).fit(d_pred, log_m_true)``, fitted once."""
        from .posterior import JointKDEPosterior

        if self._posterior is None:
            cal = self.calibration
            if cal is None:
                raise BundleError("this model bundle is not calibrated yet (run `clustermass calibrate`)")
            c = self.meta["calibration"]
            self._posterior = JointKDEPosterior(c["bandwidth"], min_neighbours=c.get("min_neighbours", 5.0)).fit(
                cal["d_pred"].to_numpy(), cal["log_m_true"].to_numpy())
        return self._posterior


def _write_calibration(path: Path, df: pd.DataFrame) -> None:
    from .catalog import write_parquet

    write_parquet(df[["d_pred", "log_m_true"]].reset_index(drop=True), path)


def _read_calibration(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BundleError(f"model.json records a calibration but {path} is missing")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not {"d_pred", "log_m_true"} <= set(df.columns):
        raise BundleError(f"{path} must have columns d_pred and log_m_true")
    return df[["d_pred", "log_m_true"]]


def load_model(directory: str | Path) -> ModelBundle:
    """Load a model bundle; never unpickles (JSON + safetensors only).

    Raises
    ------
    BundleError : missing files, unreadable/tampered weights (checksum), or weights whose
        names/shapes do not match the architecture in ``model.json``.
    """
    from pydantic import ValidationError
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, w_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise BundleError(f"model bundle directory not found: {directory}")
    if not meta_path.is_file():
        raise BundleError(f"{directory} has no {META_FILE} (not a clustermass model bundle)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path} is not a clustermass model description (format != {BUNDLE_FORMAT!r})")
    if meta.get("format_version", 0) > BUNDLE_VERSION:
        raise BundleError(f"{directory} was written by a newer clustermass (bundle format {meta['format_version']})")
    try:
        kind = meta["kind"]
        archd = meta["architecture"]
        pre = meta["preprocessing"]
        window = WindowConfig.model_validate(pre["window"])
        kde = KDEConfig.model_validate(pre["kde"])
        target = pre["target"]
        if int(archd["n_grid"]) != kde.n_grid:
            raise BundleError(f"{meta_path}: architecture n_grid {archd['n_grid']} != kde.n_grid {kde.n_grid}")
        network = build_network(kind, kde.n_grid, **archd.get("arch", {}),
                                target_mean=float(target["mean"]), target_std=float(target["std"]))
        expected_sha = meta["weights"]["sha256"]
    except (KeyError, TypeError, ValidationError, ConfigError) as exc:
        raise BundleError(f"{meta_path} is incomplete or invalid: {exc!r}") from exc
    if not w_path.is_file():
        raise BundleError(f"{directory} has no {WEIGHTS_FILE}")
    if _sha256(w_path) != expected_sha:
        raise BundleError(f"{w_path} does not match the checksum in {META_FILE} (corrupt or tampered file)")
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"cannot read {w_path}: {exc}") from exc
    want = network.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes))
        raise BundleError(f"weights in {w_path} do not match the {kind} architecture in {META_FILE}: "
                          + ", ".join(parts))
    network.load_state_dict(state)
    for name in ("mean", "std"):
        if not math.isclose(float(state[f"target_{name}"]), float(target[name]), rel_tol=1e-6, abs_tol=1e-6):
            raise BundleError(f"{w_path}: target_{name} differs from model.json (inconsistent bundle)")
    bundle = ModelBundle(kind, window, kde, network, meta, path=directory)
    if meta.get("calibration"):
        bundle._calibration = _read_calibration(directory / CALIBRATION_FILE)
    return bundle
