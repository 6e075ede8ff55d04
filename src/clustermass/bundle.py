"""Model bundles: a trained network with exactly the preprocessing it was trained with.

A model bundle is a directory with ``weights.safetensors`` and ``model.json`` (architecture,
preprocessing, target standardisation, training metadata, weights checksum), ``loss_curve.png``
and, after SBI calibration, ``calibration.parquet`` + ``calibration.json``
(:mod:`clustermass.calibration`; ``model.json`` is not rewritten by calibrating). Bundles
calibrated by older versions (settings in ``model.json``) still load. :func:`load_model` never
unpickles anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._bundlefmt import (  # noqa: F401  (the format's names are re-exported here)
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CALIBRATION_FILE,
    META_FILE,
    WEIGHTS_FILE,
    integrity_hash,
    load_weights,
    save_weights,
)
from ._io import write_json_atomic
from .catalog import Catalogue
from .config import KDEConfig, WindowConfig
from .errors import BundleError, ClustermassError, ConfigError
from .networks import build_network

if TYPE_CHECKING:
    from .setnpe import SetBundle


def _dataset(catalogue, rows, kind, window, kde, augment=False, seed=0):
    """The phase-space inputs of ``rows`` (KDE grids built on the fly)."""
    from .datasets import PhaseSpaceDataset

    return PhaseSpaceDataset(catalogue, rows, kind, window, kde, augment=augment, seed=seed)


def memory_format(kind: str):
    """The channels-last torch memory format of a network kind (None for 1D)."""
    return {"cnn3d": torch.channels_last_3d, "cnn2d": torch.channels_last}.get(kind)


def channels_last(network: nn.Module, kind: str) -> nn.Module:
    """``network`` in the channels-last layout of its kind (faster convolutions, oneDNN/cuDNN)."""
    fmt = memory_format(kind)
    return network.to(memory_format=fmt) if fmt is not None else network


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
        self._calibration = None  # clustermass.calibration.Calibration, loaded lazily

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
        fmt = memory_format(self.kind)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = channels_last(self.network, self.kind).to(dev).eval()
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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.meta["weights"] = save_weights(self.network, directory)
        self.meta["integrity"] = integrity_hash(self.meta)
        cal = self.calibrated(required=False)
        if cal is not None and (self.path is None or directory.resolve() != self.path.resolve()):
            cal.save(directory)
        written = {k: v for k, v in self.meta.items()
                   if not (k == "calibration" and isinstance(v, dict) and v.get("format"))}
        write_json_atomic(directory / META_FILE, written)  # calibration settings live in calibration.json
        self.path = directory
        return directory

    @property
    def calibration(self) -> pd.DataFrame | None:
        """The SBI calibration pairs (``d_pred, z, log_n_gal, log_m_true``), or None before calibration."""
        cal = self.calibrated(required=False)
        return None if cal is None else cal.pairs

    def calibrated(self, required: bool = True):
        """The bundle's :class:`~clustermass.calibration.Calibration` (read once from
        ``calibration.json`` + ``calibration.parquet``, or an old bundle's ``model.json``).

        Raises BundleError when there is none and ``required`` (else returns None)."""
        from .calibration import CALIBRATION_JSON, Calibration, CalibrationError

        if self._calibration is None and self.path is not None:
            js = self.path / CALIBRATION_JSON
            legacy = self.meta.get("calibration") if not js.is_file() else None
            if js.is_file() and self.meta.get("integrity"):
                try:
                    made_for = json.loads(js.read_text()).get("model")
                except (OSError, ValueError):
                    made_for = None
                if made_for is not None and made_for != self.meta["integrity"]:
                    js = None  # a calibration of earlier weights (the bundle was retrained): stale
            if (js is not None and js.is_file()) or legacy:
                try:
                    self._calibration = Calibration.load(self.path, legacy=legacy)
                except CalibrationError as exc:
                    raise BundleError(str(exc)) from exc
                self.meta["calibration"] = self._calibration.settings()
        if self._calibration is None and required:
            raise BundleError("this model bundle is not calibrated yet (run `clustermass calibrate`)")
        return self._calibration

    def set_calibration_object(self, calibration) -> None:
        """Attach a fitted Calibration and write it into the bundle directory (``calibration.parquet``
        + ``calibration.json``; ``model.json`` is left as trained)."""
        if self.path is None:
            raise BundleError("save the bundle (bundle.save(dir)) before calibrating it")
        calibration.save(self.path)
        self._calibration = calibration
        self.meta["calibration"] = calibration.settings()

    def set_calibration(self, d_pred, log_m_true, bandwidth: float, min_neighbours: float = 5.0, *,
                        conditions: pd.DataFrame | None = None, conditioning=("d_pred",),
                        boundary: bool = True, mean_degree: int | None = None,
                        heteroscedastic: bool | None = None) -> None:
        """Fit and store a calibration from (prediction, true mass) pairs of the calibration split.

        The posterior is fitted first, so a calibration it would refuse is never written.

        Parameters
        ----------
        d_pred : predicted log10 M200c of the calibration diagrams.
        log_m_true : their true log10 M200c.
        bandwidth : scipy bw_method factor of the joint KDE (SCIENCE.md sec. 6).
        min_neighbours : kernel weight of calibration pairs below which a prediction is out of range.
        conditions : table with ``z`` and ``log_n_gal`` aligned with ``d_pred`` (for ``conditioning``).
        conditioning : variables of the posterior (default ``d_pred`` only, as the paper).
        boundary : cut the kernels to the training mass range (``training_data``) and renormalise.
        mean_degree, heteroscedastic : trend model (default: 1/False for d_pred alone, else 2/True).
        """
        from .calibration import CalibrationError, fit_calibration, prior_range_of

        if self.path is None:
            raise BundleError("save the bundle (bundle.save(dir)) before calibrating it")
        d = np.asarray(d_pred, dtype=np.float64).ravel()
        m = np.asarray(log_m_true, dtype=np.float64).ravel()
        if len(d) != len(m):
            raise ClustermassError(f"calibration needs matching arrays, got {len(d)} and {len(m)} values")
        if not (np.isfinite(d).all() and np.isfinite(m).all()):
            raise ClustermassError("calibration pairs must be finite (no NaN true masses)")
        simple = tuple(conditioning) == ("d_pred",)
        pr = prior_range_of(self) if boundary else None
        if pr is not None:
            pr = (min(pr[0], float(m.min())), max(pr[1], float(m.max())))
        try:
            cal = fit_calibration(d, m, conditions, conditioning=tuple(conditioning), bandwidth=float(bandwidth),
                                  min_neighbours=float(min_neighbours), prior_range=pr,
                                  mean_degree=(1 if simple else 2) if mean_degree is None else mean_degree,
                                  heteroscedastic=(not simple) if heteroscedastic is None else heteroscedastic,
                                  meta={"model": self.meta.get("integrity")})
        except CalibrationError as exc:
            raise ClustermassError(str(exc)) from exc
        self.set_calibration_object(cal)

    def posterior(self):
        """The fitted SBI posterior (:class:`~clustermass.posterior.JointKDEPosterior`) of the calibration."""
        return self.calibrated().posterior


def load_model(directory: str | Path) -> ModelBundle | BaselineBundle | SetBundle:
    """Load a model bundle (a CNN's, a set NPE's (:class:`clustermass.setnpe.SetBundle`) or a
    calibrated classical estimator's); never unpickles (JSON + safetensors only).

    Raises
    ------
    BundleError : missing files, unreadable/tampered weights (checksum), or weights whose
        names/shapes do not match the architecture in ``model.json``.
    """
    from pydantic import ValidationError

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
    if isinstance(meta, dict) and meta.get("format") == BASELINE_FORMAT:
        return _load_baseline(directory, meta)
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path} is not a clustermass model description (format != {BUNDLE_FORMAT!r})")
    if meta.get("format_version", 0) > BUNDLE_VERSION:
        raise BundleError(f"{directory} was written by a newer clustermass (bundle format {meta['format_version']})")
    if meta.get("format_version", 0) < BUNDLE_VERSION or "integrity" not in meta:
        raise BundleError(f"{directory} was written by an older clustermass (bundle format "
                          f"{meta.get('format_version')}, no integrity hash); train it again")
    if integrity_hash(meta) != meta["integrity"]:
        raise BundleError(f"{meta_path}: the architecture, preprocessing (window, KDE grid, scaling) or "
                          "weights checksum were edited after training; predictions would be wrong. "
                          "Restore the original model.json or train again")
    if meta.get("kind") == "set":  # the set-based neural posterior (its flow is the posterior)
        from .setnpe import load_set_bundle

        return load_set_bundle(directory, meta)
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
    load_weights(directory, expected_sha, network, kind)
    state = network.state_dict()
    for name in ("mean", "std"):
        if not math.isclose(float(state[f"target_{name}"]), float(target[name]), rel_tol=1e-6, abs_tol=1e-6):
            raise BundleError(f"{w_path}: target_{name} differs from model.json (inconsistent bundle)")
    bundle = ModelBundle(kind, window, kde, network, meta, path=directory)
    bundle.calibrated(required=False)  # reads calibration.json (or an old model.json's settings)
    return bundle


# ---------------------------------------------------------------------- classical estimators
BASELINE_FORMAT = "clustermass-baseline"


class BaselineBundle:
    """A calibrated classical estimator, usable wherever a network bundle is (``infer``).

    ``kind`` is ``sigma_evrard`` (shifting-gapper + biweight velocity dispersion through the
    Evrard et al. 2008 relation), ``virial`` (the projected virial estimator) or ``caustic``
    (the caustic mass of :mod:`clustermass.caustic`, on the bundle's window), from
    :mod:`clustermass.baselines`; ``evaluate`` writes one per estimator into ``OUT/models/<kind>``
    with the calibration it fitted on the test split, so users can compare them with the network
    on their own data: ``clustermass infer --model runs/quick/models/sigma_evrard ...``.
    The directory holds ``model.json`` (kind, window, training range, integrity hash) and the
    calibration (``calibration.parquet`` + ``calibration.json``); nothing executable.
    """

    def __init__(self, kind: str, window: WindowConfig, meta: dict, path: str | Path | None = None) -> None:
        from .baselines import BASELINES

        if kind not in BASELINES:
            raise BundleError(f"unknown classical estimator {kind!r}; one of {', '.join(BASELINES)}")
        self.kind, self.window, self.meta = kind, window, meta
        self.path = Path(path) if path is not None else None
        self._calibration = None

    def __repr__(self) -> str:
        return f"BaselineBundle(kind={self.kind!r}, path={str(self.path) if self.path else None!r})"

    def predict(self, catalogue: Catalogue, rows=None, progress: bool = False, **_) -> np.ndarray:
        """The estimator's log10 M200c [h^-1 Msun] for each diagram (NaN where it fails)."""
        from .baselines import BASELINES, run_baselines

        rows = catalogue.rows() if rows is None else np.asarray(rows)
        raw = run_baselines(catalogue, rows, progress=progress, methods=[self.kind], window=self.window)
        return raw[BASELINES[self.kind]].to_numpy(dtype=np.float64)

    @classmethod
    def write(cls, kind: str, window: WindowConfig, calibration, directory, training_data: dict | None = None):
        """Write a calibrated estimator's bundle into ``directory``; returns it."""
        directory = Path(directory)
        meta = {"format": BASELINE_FORMAT, "format_version": 1, "kind": kind,
                "preprocessing": {"window": window.model_dump(mode="json")},
                "training_data": dict(training_data or {})}
        meta["integrity"] = integrity_hash(meta)
        calibration.save(directory)
        write_json_atomic(directory / META_FILE, meta)
        bundle = cls(kind, window, meta, path=directory)
        bundle._calibration = calibration
        return bundle

    def calibrated(self, required: bool = True):
        """The estimator's :class:`~clustermass.calibration.Calibration`."""
        from .calibration import Calibration, CalibrationError

        if self._calibration is None and self.path is not None:
            try:
                self._calibration = Calibration.load(self.path)
            except CalibrationError as exc:
                if required:
                    raise BundleError(str(exc)) from exc
        return self._calibration

    def posterior(self):
        """The fitted SBI posterior of the calibration."""
        return self.calibrated().posterior


def _load_baseline(directory: Path, meta: dict) -> BaselineBundle:
    from pydantic import ValidationError

    if integrity_hash(meta) != meta.get("integrity"):
        raise BundleError(f"{directory / META_FILE} was edited after it was written (integrity hash)")
    try:
        window = WindowConfig.model_validate(meta["preprocessing"]["window"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise BundleError(f"{directory / META_FILE} is incomplete or invalid: {exc!r}") from exc
    bundle = BaselineBundle(meta.get("kind"), window, meta, path=directory)
    bundle.calibrated()
    return bundle
