"""Lightning's console noise, silenced while the package trains (shared by the CNN and set trainers)."""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_lightning():
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
