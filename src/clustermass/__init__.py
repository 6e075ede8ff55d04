"""clustermass: dynamical galaxy-cluster masses with calibrated uncertainties.

Pipeline: simulate -> catalogue -> phase-space KDE -> CNN -> SBI posterior -> evaluation.

The curated public API is :data:`__all__`; every name is loaded lazily on first use (PEP 562),
so ``import clustermass`` imports no dependency at all (no numpy, torch or matplotlib) and each
name costs only what its own module needs:

>>> import clustermass
>>> clustermass.load_config.__module__
'clustermass.config'

Modules with the full interface of each stage: :mod:`clustermass.catalog`,
:mod:`clustermass.simulate`, :mod:`clustermass.phasespace`, :mod:`clustermass.datasets`,
:mod:`clustermass.networks`, :mod:`clustermass.training`, :mod:`clustermass.posterior`,
:mod:`clustermass.diagnostics`, :mod:`clustermass.evaluation`, :mod:`clustermass.sky`,
:mod:`clustermass.inference`, :mod:`clustermass.massfunction`, :mod:`clustermass.report`,
:mod:`clustermass.pipeline` (see docs/design.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> module (relative to the package) that defines it
_LAZY = {
    # configuration and data
    "RunConfig": "config",
    "load_config": "config",
    "Catalogue": "catalog",
    "read_catalogue": "catalog",
    "write_catalogue": "catalog",
    "ClustermassError": "errors",
    # stages
    "simulate_catalogue": "simulate",
    "diagram_grid": "phasespace",
    "gaussian_kde_grid": "phasespace",
    "PhaseSpaceDataset": "datasets",
    "train_model": "training",
    "load_model": "bundle",
    "ModelBundle": "bundle",
    "JointKDEPosterior": "posterior",
    "calibrate": "calibration",
    "Calibration": "calibration",
    "evaluate": "evaluation",
    "sky_to_catalogue": "sky",
    "infer_sky": "inference",
    "posterior_table": "inference",
    "mass_function_estimate": "massfunction",
    "build_report": "report",
    "run_pipeline": "pipeline",
}

__all__ = [
    "__version__",
    "build_report",
    "calibrate",
    "Calibration",
    "Catalogue",
    "ClustermassError",
    "diagram_grid",
    "evaluate",
    "gaussian_kde_grid",
    "infer_sky",
    "JointKDEPosterior",
    "load_config",
    "load_model",
    "ModelBundle",
    "posterior_table",
    "mass_function_estimate",
    "PhaseSpaceDataset",
    "read_catalogue",
    "run_pipeline",
    "RunConfig",
    "simulate_catalogue",
    "sky_to_catalogue",
    "train_model",
    "write_catalogue",
]


def __getattr__(name: str):
    """Load a public name from its module on first access (PEP 562) and cache it here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from .bundle import ModelBundle, load_model
    from .calibration import Calibration, calibrate
    from .catalog import Catalogue, read_catalogue, write_catalogue
    from .config import RunConfig, load_config
    from .datasets import PhaseSpaceDataset
    from .errors import ClustermassError
    from .evaluation import evaluate
    from .inference import infer_sky, posterior_table
    from .massfunction import mass_function_estimate
    from .phasespace import diagram_grid, gaussian_kde_grid
    from .pipeline import run_pipeline
    from .posterior import JointKDEPosterior
    from .report import build_report
    from .simulate import simulate_catalogue
    from .sky import sky_to_catalogue
    from .training import train_model
