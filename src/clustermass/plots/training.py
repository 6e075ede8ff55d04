"""Training figures: the loss curve saved with every model bundle."""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .._io import save_figure
from . import subplots


def plot_loss_curve(history: list[dict], path: str | Path, best_epoch: int | None = None,
                    title: str = "training") -> Path:
    """Train and validation MSE [dex^2] per epoch, the best epoch marked; saved as PNG.

    Parameters
    ----------
    history : rows with ``epoch`` (1-based), ``train_loss`` and ``val_loss`` [dex^2].
    path : output PNG.
    best_epoch : epoch whose weights were kept (vertical line), optional.
    title : figure title.

    Returns
    -------
    The written path.
    """
    fig, ax = subplots(figsize=(5.5, 3.8))
    ep = [r["epoch"] for r in history]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [r["val_loss"] for r in history], "s-", ms=3, label="validation")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="0.5", ls="--", lw=1, label=f"best (epoch {best_epoch})")
    vals = [v for r in history for v in (r["train_loss"], r["val_loss"]) if v and v > 0]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"MSE of $\log_{10} M_{200c}$ [dex$^2$]")
    ax.set_title(title)
    ax.legend(frameon=False)
    return save_figure(fig, path)
