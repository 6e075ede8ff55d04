"""Real surveys: clusters given as sky coordinates and redshifts -> projected phase space.

A galaxy survey (RA, Dec, redshift, optionally an apparent magnitude) and a cluster list (id, RA,
Dec, redshift of the centre) become a :class:`~clustermass.catalog.Catalogue` in a model's window.

- :mod:`.coords`: gnomonic offsets [h^-1 Mpc, proper] and line-of-sight velocities [km/s];
- :mod:`.io`: reading FITS/CSV/ECSV/VOTable/parquet tables (units honoured) and the authors'
  public SDSS input; column-name resolution;
- :mod:`.select`: each cluster's galaxies in the window, with flags (footprint edge, too few
  galaxies, outside the training range).

Inference on the result (a calibrated bundle -> posteriors) lives in :mod:`clustermass.inference`.
"""

from ..errors import (
    ClusterIdError,
    CoordinateError,
    MissingColumnError,
    SkyInputError,
    SkyWarning,
    UnitError,
)
from .coords import (
    C_KMS,
    los_velocity,
    projected_to_sky,
    redshift_from_los_velocity,
    sky_to_projected,
    unit_vectors,
    window_angular_radius,
)
from .io import COLUMN_ALIASES, read_authors_sdss, read_table, resolve_column
from .select import FLAG_COLUMNS, footprint_radius, sky_to_catalogue

__all__ = [
    "C_KMS", "COLUMN_ALIASES", "FLAG_COLUMNS", "ClusterIdError", "CoordinateError",
    "MissingColumnError", "SkyInputError", "SkyWarning", "UnitError", "footprint_radius",
    "los_velocity", "projected_to_sky", "read_authors_sdss", "read_table",
    "redshift_from_los_velocity", "resolve_column", "sky_to_catalogue", "sky_to_projected",
    "unit_vectors", "window_angular_radius",
]
