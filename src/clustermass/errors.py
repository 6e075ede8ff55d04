"""Exceptions with messages meant for users (the CLI prints them on one line)."""


class ClustermassError(Exception):
    """Base class: an error caused by user input, reported without a traceback."""


class CatalogueError(ClustermassError, ValueError):
    """A catalogue is missing, malformed or inconsistent."""


class ConfigError(ClustermassError, ValueError):
    """A preset, configuration file or override is invalid."""


class BundleError(ClustermassError, ValueError):
    """A model bundle is missing, corrupt or inconsistent with its config."""


class SkyInputError(CatalogueError):
    """A sky table (galaxies or clusters) cannot be used as given.

    ``option`` names the keyword argument that would fix it (e.g. ``"ra_col"``), when one does;
    the command line shows it as its flag (``--ra-col``).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class MissingColumnError(SkyInputError):
    """A required column is absent."""


class ClusterIdError(SkyInputError):
    """Cluster ids are duplicated or missing."""


class CoordinateError(SkyInputError):
    """Coordinates are NaN, out of range, or in the wrong angle unit."""


class UnitError(SkyInputError):
    """A column's unit (declared or implied by its values) does not fit what it must hold."""


class SkyWarning(UserWarning):
    """Something in a sky table was fixed or cannot be checked (dropped rows, flux limit)."""


class UnitWarning(UserWarning):
    """Values look implausible for their declared units (kpc for Mpc, m/s for km/s)."""


class OutOfDistributionWarning(UserWarning):
    """Inputs lie where the model was not trained (distance, flux limit, too few galaxies)."""


class OutputExistsError(ClustermassError):
    """An output path holds a different artefact, and overwriting it was not asked for."""
