"""Convolutional regressors of log10 M200c from phase-space grids (SCIENCE.md sec. 5).

``CNN3D`` defaults to the authors' public architecture: Conv3d(1->12, 5^3, ReLU) ->
MaxPool(2) -> Conv3d(12->8, 3^3, ReLU) -> MaxPool(2) -> Conv3d(8->4, 1^3, ReLU) -> MaxPool(2)
-> Flatten -> Dense(128) -> Dense(64) -> Dense(1), linear dense layers, valid convolutions,
Keras 'same' pooling (= ``ceil_mode=True``): 123,189 weights at 50^3. Each block is applied as
conv -> max-pool -> ReLU, which equals conv -> ReLU -> max-pool (ReLU is monotonic) at 1/8 of the
rectification cost. Filters, kernels and
dense widths are configurable (e.g. ``kernels=(5, 5, 5)`` for the paper's Fig. 3 reading) and
the flattened size follows the grid, so any ``n_grid`` large enough for the stack works.
``CNN2D`` (on (R_proj, v_los)) and ``CNN1D`` (on v_los) follow Ho et al. (2019) in spirit: the
same conv/pool stack in fewer dimensions, with ReLU dense layers.

Every network outputs log10(M200c / h^-1 Msun) directly: the last layer's output ``z`` is
mapped to ``target_mean + target_std * z`` (buffers, saved with the weights), so a fresh
network predicts the training-set mean and training works on a standardised target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import KIND_DIMS
from .errors import ConfigError

#: spatial dimensions of each model kind

_DEFAULTS = {
    "cnn3d": {"filters": (12, 8, 4), "kernels": (5, 3, 1), "dense": (128, 64), "dense_activation": None},
    "cnn2d": {"filters": (16, 16, 8), "kernels": (5, 3, 1), "dense": (128, 64), "dense_activation": "relu"},
    "cnn1d": {"filters": (16, 16, 8), "kernels": (5, 3, 1), "dense": (64, 32), "dense_activation": "relu"},
}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


class PhaseSpaceCNN(nn.Module):
    """Conv(valid, ReLU) + MaxPool('same') blocks, then dense layers, regressing log M.

    Parameters
    ----------
    dims : 1, 2 or 3 spatial dimensions (input shape ``(batch, 1, n_grid, ...)``).
    n_grid : grid points per axis of the input.
    filters, kernels : output channels and (cubic) kernel size of each conv layer.
    pool : max-pooling size and stride after each conv layer ('same' padding); 1 disables it.
    dense : widths of the hidden dense layers (the output layer of width 1 is added).
    dense_activation : None (linear, as the authors) or "relu" for the hidden dense layers.
    target_mean, target_std : the output is ``target_mean + target_std * z`` [log10 Msun/h].
    """

    def __init__(
        self,
        dims: int,
        n_grid: int,
        filters: Sequence[int],
        kernels: Sequence[int],
        pool: int = 2,
        dense: Sequence[int] = (128, 64),
        dense_activation: str | None = None,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        filters, kernels, dense = [int(f) for f in filters], [int(k) for k in kernels], [int(d) for d in dense]
        if len(filters) != len(kernels) or not filters:
            raise ConfigError(f"filters {filters} and kernels {kernels} must be non-empty and of equal length")
        if dims not in _CONV:
            raise ConfigError(f"dims must be 1, 2 or 3, got {dims}")
        if dense_activation not in (None, "relu"):
            raise ConfigError(f"dense_activation must be None or 'relu', got {dense_activation!r}")
        if not target_std > 0:
            raise ConfigError(f"target_std must be positive, got {target_std}")
        self.dims, self.n_grid, self.pool = dims, int(n_grid), int(pool)
        layers: list[nn.Module] = []
        size, c_in = self.n_grid, 1
        for c_out, k in zip(filters, kernels, strict=True):
            size = size - k + 1
            if size < 1:
                raise ConfigError(
                    f"grid of {n_grid} points is too small for the conv stack (kernels {kernels}, pool {pool})"
                )
            # max-pooling commutes with the (monotonic) ReLU; pooling first is the same network
            # with 2^d times fewer activations to rectify
            layers.append(_CONV[dims](c_in, c_out, k))
            if self.pool > 1:
                layers.append(_POOL[dims](self.pool, ceil_mode=True))
                size = math.ceil(size / self.pool)
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.n_features = c_in * size**dims
        head: list[nn.Module] = []
        width = self.n_features
        for d in dense:
            head.append(nn.Linear(width, d))
            if dense_activation == "relu":
                head.append(nn.ReLU())
            width = d
        head.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*head)
        self.register_buffer("target_mean", torch.tensor(float(target_mean), dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(float(target_std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, 1, n_grid, ...) -> predicted log10 M200c, shape (batch,)."""
        z = self.head(self.features(x)).squeeze(-1)
        return self.target_mean + self.target_std * z.float()


class CNN3D(PhaseSpaceCNN):
    """3D CNN on the (x, y, v_los) KDE cube; defaults are the authors' public architecture."""

    def __init__(self, n_grid: int = 50, **arch) -> None:
        super().__init__(3, n_grid, **{**_DEFAULTS["cnn3d"], **arch})


class CNN2D(PhaseSpaceCNN):
    """2D CNN on the (R_proj, v_los) KDE image (Ho et al. 2019 in spirit)."""

    def __init__(self, n_grid: int = 50, **arch) -> None:
        super().__init__(2, n_grid, **{**_DEFAULTS["cnn2d"], **arch})


class CNN1D(PhaseSpaceCNN):
    """1D CNN on the v_los KDE profile (Ho et al. 2019 in spirit)."""

    def __init__(self, n_grid: int = 50, **arch) -> None:
        super().__init__(1, n_grid, **{**_DEFAULTS["cnn1d"], **arch})


_CLASSES = {"cnn3d": CNN3D, "cnn2d": CNN2D, "cnn1d": CNN1D}
_ARCH_KEYS = {"filters", "kernels", "pool", "dense", "dense_activation", "target_mean", "target_std"}


def default_arch(kind: str) -> dict:
    """The default architecture keywords of ``kind`` (lists, JSON-ready)."""
    _check_kind(kind)
    d = dict(_DEFAULTS[kind])
    return {"filters": list(d["filters"]), "kernels": list(d["kernels"]), "pool": 2,
            "dense": list(d["dense"]), "dense_activation": d["dense_activation"]}


def _check_kind(kind: str) -> None:
    if kind not in _CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {', '.join(_CLASSES)}")


def build_network(kind: str, n_grid: int, **arch) -> PhaseSpaceCNN:
    """Build the network of ``kind`` for an input grid of ``n_grid`` points per axis.

    Parameters
    ----------
    kind : "cnn3d", "cnn2d" or "cnn1d".
    n_grid : grid points per axis.
    **arch : overrides of the defaults: ``filters``, ``kernels``, ``pool``, ``dense``,
        ``dense_activation``, ``target_mean``, ``target_std``.

    Returns
    -------
    PhaseSpaceCNN mapping (batch, 1, n_grid, ...) float32 to (batch,) log10 M200c.
    """
    _check_kind(kind)
    unknown = set(arch) - _ARCH_KEYS
    if unknown:
        raise ConfigError(f"unknown architecture option(s) {sorted(unknown)}; allowed: {sorted(_ARCH_KEYS)}")
    return _CLASSES[kind](int(n_grid), **arch)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable weights (buffers excluded)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def input_shape(kind: str, n_grid: int) -> tuple[int, ...]:
    """Shape of one input sample ``(1, n_grid, ...)`` for ``kind``."""
    _check_kind(kind)
    return (1,) + (int(n_grid),) * KIND_DIMS[kind]
