"""Atomic writes: an interrupted run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as null)."""
    return write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats to plain JSON values."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and release it; returns the written path.

    Parameters
    ----------
    fig : matplotlib Figure.
    path : output file (written through a temporary file and renamed).
    dpi : resolution [dots per inch].

    ``clustermass.plots`` builds pyplot-free ``Figure`` objects (nothing to release); a figure
    made with pyplot (it has a canvas manager) is closed through pyplot, which only then is
    imported.
    """

    def _w(p: Path) -> None:
        fig.savefig(p, dpi=dpi, bbox_inches="tight", format="png")

    try:
        return atomic_write(path, _w)
    finally:
        if getattr(fig.canvas, "manager", None) is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)


def guard_output(path: str | os.PathLike, existing: Any, wanted: Any, overwrite: bool, what: str) -> None:
    """Refuse to replace ``path`` (an artefact made from other inputs) unless ``overwrite``.

    ``existing`` identifies what ``path`` holds now (None: nothing there yet, free to write);
    ``wanted`` identifies what is about to be written. Rerunning the same thing in place is allowed.
    """
    from .errors import OutputExistsError

    if existing is None or overwrite or existing == wanted:
        return
    raise OutputExistsError(
        f"{path} already holds {what} made from other inputs or settings; "
        "choose another output or pass overwrite (--overwrite) to replace it"
    )
