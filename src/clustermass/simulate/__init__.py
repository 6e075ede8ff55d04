"""Mock SDSS-like projected phase-space catalogues and real simulation boxes (docs/simulator.md).

Public API: :func:`simulate_catalogue`, :func:`summarize_catalogue`, :func:`populate_halos`,
:mod:`clustermass.simulate.box` (periodic boxes, the authors' public mock format) and
:mod:`clustermass.simulate.checks` (measurements against published numbers, issue 12).
"""

#: the simulator's physical model; part of the key under which `run` reuses a catalogue, so a
#: change of the model (not only of the settings) makes a new catalogue. Raise it with the physics.
MODEL_VERSION = 2  # 2: DK14 outskirts, triaxial halos, beta(r), infall, groups, survey effects

from .galaxies import populate_halos  # noqa: E402
from .mock import (  # noqa: E402
    iter_chunks,
    simulate_catalogue,
    simulate_chunk,
    simulate_to_directory,
    summarize_catalogue,
)

__all__ = [
    "MODEL_VERSION",
    "iter_chunks",
    "populate_halos",
    "simulate_catalogue",
    "simulate_chunk",
    "simulate_to_directory",
    "summarize_catalogue",
]
