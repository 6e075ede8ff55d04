"""Mock SDSS-like projected phase-space catalogues and real simulation boxes (docs/simulator.md).

Public API: :func:`simulate_catalogue`, :func:`summarize_catalogue`, :func:`populate_halos`,
:mod:`clustermass.simulate.box` (periodic boxes, the authors' public mock format) and
:mod:`clustermass.simulate.checks` (measurements against published numbers, issue 12).
"""

from .galaxies import populate_halos
from .mock import (
    iter_chunks,
    simulate_catalogue,
    simulate_chunk,
    simulate_to_directory,
    summarize_catalogue,
)

__all__ = [
    "iter_chunks",
    "populate_halos",
    "simulate_catalogue",
    "simulate_chunk",
    "simulate_to_directory",
    "summarize_catalogue",
]
