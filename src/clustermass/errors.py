"""Exceptions with messages meant for users (the CLI prints them on one line)."""


class ClustermassError(Exception):
    """Base class: an error caused by user input, reported without a traceback."""


class CatalogueError(ClustermassError, ValueError):
    """A catalogue is missing, malformed or inconsistent."""


class ConfigError(ClustermassError, ValueError):
    """A preset, configuration file or override is invalid."""


class BundleError(ClustermassError, ValueError):
    """A model bundle is missing, corrupt or inconsistent with its config."""
