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
