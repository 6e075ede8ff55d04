"""The on-disk format of model bundles, shared by every bundle kind (CNN and set NPE).

Kept apart from :mod:`clustermass.bundle` so that model modules below it (the set NPE,
:mod:`clustermass.setnpe`, which :func:`clustermass.bundle.load_model` dispatches to) write
and check bundles with the same constants and integrity hash without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BUNDLE_FORMAT = "clustermass-model"
BUNDLE_VERSION = 2  # 2: model.json carries an integrity hash of the preprocessing
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
CALIBRATION_FILE = "calibration.parquet"


def integrity_hash(meta: dict) -> str:
    """SHA-256 of what fixes a bundle's predictions: kind, architecture, preprocessing (window,
    KDE grid, input scaling, target standardisation) and the weights' own checksum.

    Editing any of them in ``model.json`` (say ``n_grid`` 16 -> 15, or another window) changes
    every prediction, so :func:`clustermass.bundle.load_model` refuses a bundle whose hash no
    longer matches.
    """
    keys = ("kind", "architecture", "preprocessing", "weights")
    text = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(network, directory: Path) -> dict:
    """Write a network's state dict to ``directory/weights.safetensors`` atomically (safetensors:
    loading it cannot run code); returns the ``model.json["weights"]`` entry (file, sha256, keys)."""
    from safetensors.torch import save_file

    from ._io import atomic_write

    state = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": BUNDLE_FORMAT}))
    return {"file": WEIGHTS_FILE, "sha256": sha256_file(directory / WEIGHTS_FILE), "keys": sorted(state)}


def existing_fingerprint(out_dir: Path):
    """What the bundle in ``out_dir`` was trained from: its ``model.json`` fingerprint, None when
    there is no bundle, ``"unknown"`` when ``model.json`` is unreadable."""
    meta_file = Path(out_dir) / META_FILE
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text()).get("fingerprint", "unknown")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown"


def load_weights(directory: Path, expected_sha: str, network, what: str) -> None:
    """Load ``directory/weights.safetensors`` into ``network`` after checking the checksum from
    ``model.json`` and that the tensors match the architecture (``what`` names it in errors).
    Raises :class:`~clustermass.errors.BundleError`; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import BundleError

    w_path = Path(directory) / WEIGHTS_FILE
    if not w_path.is_file():
        raise BundleError(f"{directory} has no {WEIGHTS_FILE}")
    if sha256_file(w_path) != expected_sha:
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
        raise BundleError(f"weights in {w_path} do not match the {what} architecture in {META_FILE}: "
                          + ", ".join(parts))
    network.load_state_dict(state)
