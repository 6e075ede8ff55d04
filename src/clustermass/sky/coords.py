"""Sky coordinates <-> projected phase space: gnomonic offsets, line-of-sight velocities.

Offsets are the gnomonic (tangent-plane) standard coordinates times the angular-diameter
distance at the cluster redshift: ``x`` toward the east (increasing RA), ``y`` toward the north,
in h^-1 Mpc (proper); ``v_los = c (z - z_cl) / (1 + z_cl)`` in km/s. Distances use the simulation
cosmology of :mod:`clustermass.cosmology` (Planck, h-scaled), the one the model was trained in.
"""

from __future__ import annotations

import numpy as np

from .. import cosmology
from ..config import WindowConfig

C_KMS = cosmology.C_KMS


def los_velocity(z, z_cl):
    """Line-of-sight velocity relative to the cluster, ``c (z - z_cl) / (1 + z_cl)`` [km/s]."""
    z = np.asarray(z, dtype=float)
    z_cl = np.asarray(z_cl, dtype=float)
    return C_KMS * (z - z_cl) / (1.0 + z_cl)


def redshift_from_los_velocity(v_los, z_cl):
    """Inverse of :func:`los_velocity`: the redshift of a galaxy at ``v_los`` [km/s]."""
    return np.asarray(z_cl, dtype=float) + np.asarray(v_los, dtype=float) * (1.0 + np.asarray(z_cl, dtype=float)) / C_KMS


def _gnomonic(ra, dec, ra0, dec0):
    """Gnomonic standard coordinates (xi east, eta north) and cos of the separation; radians."""
    dra = ra - ra0
    cd, sd = np.cos(dec), np.sin(dec)
    cd0, sd0 = np.cos(dec0), np.sin(dec0)
    cdra = np.cos(dra)
    cosc = sd0 * sd + cd0 * cd * cdra
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = cd * np.sin(dra) / cosc
        eta = (cd0 * sd - sd0 * cd * cdra) / cosc
    return xi, eta, cosc


def sky_to_projected(ra, dec, ra0, dec0, z0, *, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Projected proper offsets of sky positions from a centre at redshift ``z0``.

    Parameters
    ----------
    ra, dec : array_like
        Positions [deg].
    ra0, dec0, z0 : float or array_like
        Centre [deg] and its redshift (broadcast against ``ra``).

    Returns
    -------
    x, y : ndarray
        Gnomonic offsets times the angular-diameter distance at ``z0`` [h^-1 Mpc, proper];
        ``x`` toward the east (increasing RA), ``y`` toward the north. NaN on the far hemisphere.
    """
    xi, eta, cosc = _gnomonic(np.radians(ra), np.radians(dec), np.radians(ra0), np.radians(dec0))
    d_a = cosmology.angular_diameter_distance(np.asarray(z0, dtype=float), cosmo)
    bad = cosc <= 0
    x, y = d_a * xi, d_a * eta
    return np.where(bad, np.nan, x), np.where(bad, np.nan, y)


def projected_to_sky(x, y, ra0, dec0, z0, *, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Inverse of :func:`sky_to_projected`: offsets [h^-1 Mpc] -> (ra, dec) [deg]."""
    d_a = cosmology.angular_diameter_distance(np.asarray(z0, dtype=float), cosmo)
    xi = np.asarray(x, dtype=float) / d_a
    eta = np.asarray(y, dtype=float) / d_a
    ra0r, dec0r = np.radians(ra0), np.radians(dec0)
    rho = np.hypot(xi, eta)
    c = np.arctan(rho)
    sc, cc = np.sin(c), np.cos(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rho > 0, eta * sc / np.where(rho > 0, rho, 1.0), 0.0)
    dec = np.arcsin(cc * np.sin(dec0r) + ratio * np.cos(dec0r))
    ra = ra0r + np.arctan2(xi * sc, rho * np.cos(dec0r) * cc - eta * np.sin(dec0r) * sc)
    return np.degrees(ra) % 360.0, np.degrees(dec)


def unit_vectors(ra_rad, dec_rad) -> np.ndarray:
    """(N, 3) unit vectors of positions given in radians."""
    cd = np.cos(dec_rad)
    return np.column_stack([cd * np.cos(ra_rad), cd * np.sin(ra_rad), np.sin(dec_rad)])


def window_angular_radius(z, window: WindowConfig, *, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Angular radius [rad] of the circle enclosing the square window (corner at sqrt(2) r_max)."""
    d_a = cosmology.angular_diameter_distance(np.asarray(z, dtype=float), cosmo)
    return np.arctan(np.sqrt(2.0) * window.r_max / d_a)
