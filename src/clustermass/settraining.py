"""Training of the set-based neural posterior (:mod:`clustermass.setnpe`, model kind ``set``).

:func:`train_set_npe` minimises ``-log q(log M | set, z)`` with a Lightning module
(:class:`SetNPEModule`, AdamW): the validation set is whole halos
(:func:`clustermass.catalog.halo_split`, ``training.val_fraction``), training stops early on the
validation negative log-likelihood (``training.patience``) and keeps the best weights; every
training batch is rotated about the line of sight and reflected (``augment``). Batches group sets
of similar size (:class:`SizeBucketSampler`), so little time goes to padding. The bundle is
written with :meth:`clustermass.setnpe.SetBundle.save`; an existing bundle of other data or
settings is refused without ``overwrite``. No checkpoints: the quick preset trains in seconds to
minutes on 2 CPU cores, and an interrupted training starts over.

Kept apart from :mod:`clustermass.setnpe` so that loading and applying a set bundle imports
neither Lightning nor the training code (as :mod:`clustermass.training` is apart from
:mod:`clustermass.bundle`). :func:`clustermass.training.train_model` dispatches here for ``set``.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ._bundlefmt import BUNDLE_FORMAT, BUNDLE_VERSION, existing_fingerprint
from ._io import guard_output
from ._lightning import quiet_lightning
from .catalog import Catalogue, train_validation_split, training_data_range
from .config import RUN_ONLY_TRAINING_FIELDS, TrainingConfig, WindowConfig
from .errors import ClustermassError
from .setnpe import (
    KIND,
    DeepSetNPE,
    SetBundle,
    _conditions,
    augment_sets,
    build_set_network,
    full_arch,
    set_inputs,
)


class SetNPEModule(pl.LightningModule):
    """Minimises -log q(log M | set, z) with AdamW; keeps the best-validation weights and the
    per-epoch history (train/val NLL [per dex])."""

    def __init__(self, network: DeepSetNPE, lr: float, betas, weight_decay: float, augment: str,
                 progress_bar=None, lr_schedule: str = "plateau") -> None:
        super().__init__()
        self.lr_schedule = lr_schedule
        self.network, self.lr, self.betas, self.weight_decay, self.augment = network, lr, tuple(betas), weight_decay, augment
        self.bar = progress_bar
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self._sum = self._n = self._vsum = self._vn = 0.0
        self._t0 = time.perf_counter()

    def _nll(self, batch, augment: bool):
        x, count, z, log_n, y = batch
        x = x[:, : int(count.max())]
        if augment:
            x = augment_sets(x, self.augment)
        ctx = self.network.context(x, count, z, log_n)
        return -self.network.log_prob(y, ctx).mean(), len(y)

    def on_train_epoch_start(self) -> None:
        self._sum = self._n = 0.0
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx):
        loss, n = self._nll(batch, augment=True)
        self._sum += float(loss.detach()) * n
        self._n += n
        return loss

    def on_validation_epoch_start(self) -> None:
        self._vsum = self._vn = 0.0

    def validation_step(self, batch, batch_idx):
        loss, n = self._nll(batch, augment=False)
        self._vsum += float(loss) * n
        self._vn += n
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._vn:
            return
        val = self._vsum / self._vn
        row = {"epoch": self.current_epoch + 1, "train_loss": self._sum / max(self._n, 1), "val_loss": val,
               "wall_s": round(time.perf_counter() - self._t0, 3)}
        self.history.append(row)
        if np.isfinite(val) and (self.best_state is None or val < min(r["val_loss"] for r in self.history[:-1])):
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.network.state_dict().items()})
        if self.bar is not None:
            best = min(r["val_loss"] for r in self.history)
            self.bar.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{val:.3f}", best=f"{best:.3f}", refresh=False)
            self.bar.update(1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        if self.lr_schedule == "none":
            return opt
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}


class _Batches(torch.utils.data.Dataset):
    """Padded sets indexed by a list of rows at once (one gather per batch)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx):
        i = torch.as_tensor(idx)
        return tuple(t[i] for t in self.tensors)


class SizeBucketSampler(torch.utils.data.Sampler):
    """Shuffled index batches of similar set sizes (less padding); the order of epoch ``e``
    depends only on (seed, e) (Lightning calls :meth:`set_epoch`).

    Each epoch the sets are permuted, cut into groups of ``bucket`` batches, sorted by size within
    a group and batched; the batches are then shuffled. Without ``shuffle``: batches in order.
    """

    def __init__(self, sizes, batch_size: int, seed: int, shuffle: bool = True, bucket: int = 16) -> None:
        self.sizes, self.batch_size, self.seed = np.asarray(sizes), int(batch_size), int(seed)
        self.shuffle, self.bucket, self.epoch = shuffle, int(bucket), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sizes) / self.batch_size)

    def __iter__(self):
        n, bs = len(self.sizes), self.batch_size
        if not self.shuffle:
            yield from (list(range(i, min(i + bs, n))) for i in range(0, n, bs))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        batches = []
        for g in range(0, n, bs * self.bucket):
            grp = order[g : g + bs * self.bucket]
            grp = grp[np.argsort(self.sizes[grp], kind="stable")]
            batches += [grp[i : i + bs].tolist() for i in range(0, len(grp), bs)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


def _loader(tensors, batch_size: int, seed: int, shuffle: bool):
    sampler = SizeBucketSampler(tensors[1].numpy(), batch_size, seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(_Batches(*tensors), sampler=sampler, batch_size=None)


def _fingerprint(arch: dict, window: WindowConfig, training: TrainingConfig, seed: int, data_hash: str) -> dict:
    tr = training.model_dump(mode="json")
    for k in (*RUN_ONLY_TRAINING_FIELDS, "cache_inputs", "augment"):
        tr.pop(k, None)
    return {"kind": KIND, "arch": arch, "window": window.model_dump(mode="json"), "training": tr,
            "seed": int(seed), "data_hash": data_hash}






def train_set_npe(catalogue: Catalogue, window: WindowConfig, training: TrainingConfig, seed: int,
                  out_dir: str | Path, progress: bool = True, overwrite: bool = False,
                  arch: dict | None = None) -> SetBundle:
    """Train the set NPE on the ``train`` split and write its bundle into ``out_dir``.

    Uses ``training.lr``, ``betas``, ``batch_size``, ``max_epochs``, ``patience`` (early stopping
    on the validation NLL, best weights kept), ``val_fraction`` (validation halos,
    :func:`clustermass.catalog.halo_split`); always float32 (``training.precision``,
    ``augment``, ``num_workers`` and the grid-cache settings do not apply: augmentation is the
    set model's own, ``arch["augment"]``). ``arch`` overrides :data:`DEFAULT_ARCH`. One device
    (a GPU when present). No checkpoints: a quick-preset training takes seconds to minutes on 2
    CPU cores (12 s on a quiet machine); an interrupted one starts over.

    Raises
    ------
    ClustermassError : no train split, NaN true masses, multi-device settings, a diverged training.
    OutputExistsError : ``out_dir`` holds a bundle of other data or settings and not ``overwrite``.
    """
    from lightning.pytorch.callbacks import EarlyStopping
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if training.devices * training.num_nodes > 1:
        raise ClustermassError("the set model trains on one device (training.devices = 1, num_nodes = 1)")
    out_dir = Path(out_dir)
    train_rows, val_rows, logm = train_validation_split(catalogue, training.val_fraction, seed)
    arch_full = full_arch(arch)
    data_hash = catalogue.data_hash()
    fingerprint = _fingerprint(arch_full, window, training, seed, data_hash)
    guard_output(out_dir, existing_fingerprint(out_dir), fingerprint, overwrite, "a model bundle")

    both = np.concatenate([train_rows, val_rows])
    x, cnt = set_inputs(catalogue, both, window, int(arch_full["max_gal"]))
    z, log_n = _conditions(catalogue, both, window)
    keep = cnt > 0  # diagrams without a galaxy in the window carry no set
    z = np.where(np.isfinite(z), z, np.nanmean(z) if np.isfinite(z).any() else 0.0)
    n_tr = len(train_rows)
    tr_sel, va_sel = keep[:n_tr], keep[n_tr:]
    if tr_sel.sum() < 2 or va_sel.sum() < 1:
        raise ClustermassError("too few training diagrams with galaxies in the window for the set model")

    def stats(v):
        s = float(np.std(v))
        return {"mean": float(np.mean(v)), "std": s if s > 0 else 1.0}

    y = logm[both]
    stand = {"theta": stats(y[:n_tr][tr_sel]), "z": stats(z[:n_tr][tr_sel]), "logn": stats(log_n[:n_tr][tr_sel])}
    lo_n, hi_n = float(np.min(log_n[:n_tr][tr_sel])), float(np.max(log_n[:n_tr][tr_sel]))
    td = training_data_range(catalogue)
    m_lo = float(td.get("log_m_min", np.min(y))) if np.isfinite(td.get("log_m_min", np.nan)) else float(np.min(y))
    m_hi = float(td.get("log_m_max", np.max(y))) if np.isfinite(td.get("log_m_max", np.nan)) else float(np.max(y))
    m_lo, m_hi = min(m_lo, float(np.min(y))), max(m_hi, float(np.max(y)))

    pl.seed_everything(seed, workers=True, verbose=False)
    net = build_set_network(arch_full, stand)

    def tensors(sel_rows):
        return (torch.as_tensor(x[sel_rows]), torch.as_tensor(cnt[sel_rows]),
                torch.as_tensor(z[sel_rows], dtype=torch.float32),
                torch.as_tensor(log_n[sel_rows], dtype=torch.float32), torch.as_tensor(y[sel_rows], dtype=torch.float32))

    idx_tr = np.flatnonzero(tr_sel)
    idx_va = n_tr + np.flatnonzero(va_sel)
    train_loader = _loader(tensors(idx_tr), training.batch_size, seed, shuffle=True)
    val_loader = _loader(tensors(idx_va), max(training.batch_size, 256), seed, shuffle=False)
    cuda = torch.cuda.is_available()
    with tqdm(total=training.max_epochs, desc="train set", unit="epoch", disable=not progress,
              dynamic_ncols=True) as bar:
        module = SetNPEModule(net, training.lr, training.betas, float(arch_full["weight_decay"]),
                              arch_full["augment"], progress_bar=bar, lr_schedule=arch_full["lr_schedule"])
        early = EarlyStopping(monitor="val_loss", mode="min", patience=training.patience)
        with quiet_lightning():
            trainer = pl.Trainer(max_epochs=training.max_epochs, accelerator="gpu" if cuda else "cpu", devices=1,
                                 callbacks=[early], logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 deterministic=not cuda, gradient_clip_val=5.0, default_root_dir=out_dir)
            trainer.fit(module, train_loader, val_loader)
    hist = module.history
    if trainer.interrupted:
        raise ClustermassError("set-model training interrupted; run it again")
    if module.best_state is None or not hist:
        raise ClustermassError(f"set-model training diverged: the validation NLL was never finite "
                               f"(lr = {training.lr:g}); lower training.lr; no bundle written")
    net = net.to("cpu").float()
    net.load_state_dict(module.best_state)
    best_i = int(np.nanargmin([r["val_loss"] for r in hist]))

    import lightning
    import zuko

    from . import __version__

    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "kind": KIND,
        "fingerprint": fingerprint,
        "architecture": {"kind": KIND, "arch": arch_full, "n_parameters": int(sum(p.numel() for p in net.parameters()))},
        "preprocessing": {
            "window": window.model_dump(mode="json"),
            "inputs": "(x_proj/r_max, y_proj/r_max, v_los/v_max) of the galaxies in the window; "
                      "log10 n_gal; cluster redshift z",
            "standardisation": stand,
            "grid": {"log_m_range": [m_lo, m_hi], "quantity": "log10(M200c / h^-1 Msun)"},
            "log_n_gal_range": [lo_n, hi_n],
        },
        "training": {
            **training.model_dump(mode="json"),
            "model": KIND,
            "seed": int(seed),
            "data_hash": data_hash,
            "n_train": int(tr_sel.sum()),
            "n_val": int(va_sel.sum()),
            "val_halo_ids": sorted(int(h) for h in np.unique(catalogue.clusters["halo_id"].to_numpy()[val_rows])),
            "epochs_run": len(hist),
            "best_epoch": int(hist[best_i]["epoch"]),
            "best_val_loss": float(hist[best_i]["val_loss"]),
            "loss": "negative log-likelihood of log10 M200c [per dex]",
            "stopped_early": bool(early.stopped_epoch > 0),
            "history": hist,
            "device": "cuda" if cuda else "cpu",
            "wall_s": round(time.perf_counter() - t0, 3),
        },
        "versions": {"clustermass": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
                     "zuko": zuko.__version__},
        "training_data": td,
        "calibration": None,
    }
    bundle = SetBundle(window, net, meta)
    bundle.save(out_dir)
    (out_dir / "validation.json").unlink(missing_ok=True)  # a validation of earlier weights is stale
    from .plots.training import plot_loss_curve

    plot_loss_curve(hist, out_dir / "loss_curve.png", best_epoch=meta["training"]["best_epoch"],
                    title="set: NLL of log10 M200c")
    return bundle
