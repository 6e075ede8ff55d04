"""clustermass: dynamical galaxy-cluster masses with calibrated uncertainties.

Pipeline: simulate -> catalogue -> phase-space KDE -> CNN -> SBI posterior -> evaluation.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import Catalogue, read_catalogue, write_catalogue  # noqa: E402
from .config import RunConfig, load_config  # noqa: E402


def load_model(path):
    """Load a model bundle (``weights.safetensors`` + ``model.json``); see :mod:`clustermass.bundle`."""
    from .bundle import load_model as _load

    return _load(path)


__all__ = ["Catalogue", "RunConfig", "__version__", "load_config", "load_model", "read_catalogue", "write_catalogue"]
