"""Torch datasets of phase-space KDE grids: the training and prediction inputs.

This is the torch side of :mod:`clustermass.phasespace` (which stays torch-free: importing it
loads numpy only). :class:`PhaseSpaceDataset` builds a catalogue's KDE grids on the fly with
:func:`clustermass.phasespace.diagram_grid` (one item) or
:func:`clustermass.phasespace.gaussian_kde_grid_torch` (a batch, GPU when present).
For training, :func:`build_inputs` (in memory) and :func:`build_inputs_memmap` (a memory-mapped
file) build every grid once; :class:`TensorBatches` serves such grids one batch (a list of rows)
at a time, with the square window's symmetries (:func:`apply_square_symmetries`) as optional
augmentation, and :class:`SubsetBatches` stacks the items of a dataset that rebuilds them.

Data flows one way: ``catalog -> phasespace -> datasets -> training``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._io import atomic_write
from .config import KDEConfig, WindowConfig
from .errors import ClustermassError
from .phasespace import (
    DegenerateKDEWarning,
    _kind_dim,
    augment_points,
    diagram_grid,
    diagram_limits,
    diagram_points,
    gaussian_kde_grid_torch,
    grid_shape,
)

__all__ = ["PhaseSpaceDataset", "SubsetBatches", "TensorBatches", "apply_square_symmetries", "build_inputs",
           "build_inputs_memmap"]


class PhaseSpaceDataset(Dataset):
    """Torch Dataset building KDE grids on the fly from a catalogue (no cubes on disk).

    Parameters
    ----------
    catalogue : :class:`clustermass.catalog.Catalogue`.
    rows : cluster row indices (e.g. ``catalogue.rows("train")``).
    kind : "cnn3d", "cnn2d" or "cnn1d".
    window, kde : :class:`WindowConfig`, :class:`KDEConfig`.
    augment : False, True / "rotate" (random sky-plane rotation + reflection) or "d4"
        (symmetries of the square window); see :func:`augment_points`.
    seed : augmentation seed. Item ``i`` of epoch ``e`` uses
        ``numpy.random.default_rng([seed, e, rows[i]])``: independent of worker count, order
        and batch size. Call :meth:`set_epoch` before each epoch (like DistributedSampler).
    cache_dir : optional directory for a float32 memory-map of the (un-augmented) grids;
        filled lazily or by :meth:`precompute`, keyed by a hash of rows, kind, window, kde and
        the catalogue content. Ignored while augmenting.

    Items are ``(x, y)``: x float32 tensor (1, n, ...) = ``diagram_grid * kde.input_scale``;
    y float32 scalar tensor, the row's log_m200c (NaN for real data). The default
    ``torch.utils.data.default_collate`` stacks them into (B, 1, n, ...) and (B,).
    Degenerate diagrams (no galaxies or too few for a covariance) use the documented fallbacks
    of :func:`gaussian_kde_grid` silently; their rows are listed in ``degenerate_rows``.
    """

    def __init__(self, catalogue, rows, kind: str, window: WindowConfig, kde: KDEConfig,
                 augment: bool | str = False, seed: int = 0, cache_dir: str | Path | None = None):
        self.catalogue = catalogue
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(catalogue)):
            raise ClustermassError(f"rows out of range for a catalogue of {len(catalogue)} clusters")
        self.kind, self.window, self.kde = kind, window, kde
        self.dim = _kind_dim(kind)
        self.augment = "rotate" if augment is True else (augment or False)
        if self.augment not in (False, "rotate", "d4"):
            raise ClustermassError(f"augment must be False, True, 'rotate' or 'd4', got {augment!r}")
        self.seed, self.epoch = int(seed), 0
        off = catalogue.offsets[self.rows]
        self.n_points = off[:, 1] - off[:, 0]
        self.degenerate_rows = self.rows[self.n_points <= self.dim]
        if len(self.degenerate_rows):
            warnings.warn(
                DegenerateKDEWarning(
                    f"{len(self.degenerate_rows)} of {len(self.rows)} diagrams have <= {self.dim} "
                    "galaxies; their grids use the documented fallback (zeros or a regularised kernel)"
                ),
                stacklevel=2,
            )
        self._y = catalogue.clusters["log_m200c"].to_numpy(dtype=np.float64)[self.rows].astype(np.float32)
        self._ids = catalogue.clusters["diagram_id"].to_numpy()[self.rows]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mm = None
        self._filled = None
        if self.cache_dir is not None and not self.augment:
            self._create_cache()

    # -------------------------------------------------------------- torch API
    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (deterministic given seed and epoch)."""
        self.epoch = int(epoch)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item's x: (1, n, ...)."""
        return (1,) + grid_shape(self.kind, self.kde.n_grid)

    def points(self, i: int) -> np.ndarray:
        """(N, 3) (x, y, v) of item ``i`` after augmentation (if any)."""
        p = self.catalogue.points(int(self.rows[i]))
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.rows[i])])
            p = augment_points(p, rng, self.augment)
        return p

    def grid(self, i: int) -> np.ndarray:
        """Unscaled (sum 1) float64 grid of item ``i``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateKDEWarning)
            return diagram_grid(self.points(i), self.kind, self.window, self.kde, label=int(self._ids[i]))

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        cube = None
        if self.cache_dir is not None and not self.augment:
            self._open_cache()
            if self._filled[i]:
                cube = np.array(self._mm[i])
            else:
                cube = (self.grid(i) * self.kde.input_scale).astype(np.float32)
                self._mm[i] = cube
                self._mm.flush()
                self._filled[i] = 1
                self._filled.flush()
        if cube is None:
            cube = (self.grid(i) * self.kde.input_scale).astype(np.float32)
        x = torch.from_numpy(cube).unsqueeze(0)
        y = torch.tensor(self._y[i], dtype=torch.float32)
        return x, y

    def batch(self, indices, device=None, dtype=None):
        """Items ``indices`` built together by the torch path (GPU when available).

        Returns ``(x, y)``: x (B, 1, n, ...) = grids * input_scale on ``device`` (float32 by
        default), y (B,) float32 log_m200c. Same grids as ``__getitem__`` (augmentation
        included) within float32 rounding; ignores the on-disk cache.
        """
        idx = [int(i) for i in indices]
        pts = [diagram_points(self.points(i), self.kind) for i in idx]
        lo, hi = diagram_limits(self.kind, self.window)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateKDEWarning)
            x = gaussian_kde_grid_torch(
                pts, lo, hi, self.kde.n_grid, self.kde.bandwidth, device=device,
                dtype=dtype or torch.float32, labels=[int(self._ids[i]) for i in idx],
            )
        x = (x * self.kde.input_scale).unsqueeze(1)
        y = torch.as_tensor(self._y[idx], device=x.device)
        return x, y

    # -------------------------------------------------------------- cache
    def cache_key(self) -> str:
        """Hash identifying the cached grids (rows, kind, window, kde, catalogue content)."""
        h = hashlib.sha256()
        spec = {"kind": self.kind, "window": self.window.model_dump(), "kde": self.kde.model_dump()}
        h.update(json.dumps(spec, sort_keys=True).encode())
        h.update(self.rows.tobytes())
        h.update(self.catalogue.data_hash().encode())
        return h.hexdigest()[:16]

    def _cache_paths(self) -> tuple[Path, Path]:
        key = self.cache_key()
        return self.cache_dir / f"grids-{key}.f32", self.cache_dir / f"grids-{key}.filled"

    def _create_cache(self) -> None:
        """Create the (zero, unfilled) memory-map files once, in the main process."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        data_path, flag_path = self._cache_paths()
        shape = (len(self),) + grid_shape(self.kind, self.kde.n_grid)
        for path, dt, shp in ((data_path, np.float32, shape), (flag_path, np.uint8, (len(self),))):
            if not path.exists():
                atomic_write(path, lambda p, dt=dt, shp=shp: np.memmap(p, dtype=dt, mode="w+", shape=shp).flush())

    def _open_cache(self) -> None:
        if self._mm is not None:
            return
        data_path, flag_path = self._cache_paths()
        shape = (len(self),) + grid_shape(self.kind, self.kde.n_grid)
        self._mm = np.memmap(data_path, dtype=np.float32, mode="r+", shape=shape)
        self._filled = np.memmap(flag_path, dtype=np.uint8, mode="r+", shape=(len(self),))

    def precompute(self, progress: bool = False) -> None:
        """Fill the on-disk cache for every item (needs ``cache_dir``; no augmentation)."""
        if self.cache_dir is None or self.augment:
            raise ClustermassError("precompute needs cache_dir and augment=False")
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), disable=not progress, desc="KDE grids"):
            self[i]

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        st = dict(self.__dict__)
        st["_mm"], st["_filled"] = None, None
        return st


# ---------------------------------------------------------------------- batches for training
class TensorBatches(torch.utils.data.Dataset):
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


class SubsetBatches(torch.utils.data.Dataset):
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
