"""Thin layer over colossus for the cosmology and halo physics the package needs.

Units: masses in h^-1 Msun (functions take log10 M200c), distances in h^-1 Mpc
(R200c proper; line-of-sight and observer distances comoving), velocities in km/s.
The simulation cosmology is Planck 2013 (MDPL2, as in the paper); the mass-function
comparison uses Planck 2018. colossus keeps one global cosmology: use :func:`use`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy import constants as const
from astropy import units as u
from colossus.cosmology import cosmology as _cc
from colossus.halo import concentration as _conc
from colossus.halo import mass_so as _mass_so
from colossus.lss import mass_function as _mf

SIMULATION_COSMOLOGY = "planck13"
MASS_FUNCTION_COSMOLOGY = "planck18"

#: Newton's constant in km^2 s^-2 Mpc Msun^-1 (h cancels in v200c for h-scaled M and R)
G_KMS2_MPC_MSUN = const.G.to(u.km**2 * u.Mpc / (u.s**2 * u.Msun)).value
#: speed of light [km/s]
C_KMS = const.c.to(u.km / u.s).value


def use(name: str = SIMULATION_COSMOLOGY):
    """Make ``name`` colossus' current cosmology (no-op if it already is) and return it."""
    try:
        cur = _cc.getCurrent()
        if cur.name == name:
            return cur
    except Exception:  # no cosmology set yet
        pass
    return _cc.setCosmology(name)


def hubble(z, cosmo: str = SIMULATION_COSMOLOGY):
    """H(z) in km/s per h^-1 Mpc, i.e. 100 E(z)."""
    return 100.0 * use(cosmo).Ez(np.asarray(z, dtype=float))


def r200c(log_m, z, cosmo: str = SIMULATION_COSMOLOGY):
    """R200c [h^-1 Mpc, proper] of halos of log10 M200c [h^-1 Msun] at redshift z.

    Parameters
    ----------
    log_m : array_like
        log10 M200c [h^-1 Msun].
    z : array_like
        Redshift.
    cosmo : str
        colossus cosmology name (default: the simulation's, Planck 2013).

    >>> round(float(r200c(15.0, 0.0)), 2)  # h^-1 Mpc
    1.63
    """
    use(cosmo)
    return _mass_so.M_to_R(10.0 ** np.asarray(log_m, dtype=float), np.asarray(z, dtype=float), "200c") / 1e3


def v200c(log_m, z, cosmo: str = SIMULATION_COSMOLOGY, r200=None):
    """Circular velocity at R200c, sqrt(G M200c / R200c) [km/s].

    Parameters
    ----------
    log_m : array_like
        log10 M200c [h^-1 Msun].
    z : array_like
        Redshift.
    cosmo : str
        colossus cosmology name.
    r200 : array_like, optional
        R200c [h^-1 Mpc, proper] if already known (skips :func:`r200c`).

    >>> round(float(v200c(15.0, 0.0)))  # km/s
    1626
    """
    r = r200c(log_m, z, cosmo) if r200 is None else np.asarray(r200, dtype=float)
    return np.sqrt(G_KMS2_MPC_MSUN * 10.0 ** np.asarray(log_m, dtype=float) / r)


def rho_c(z, cosmo: str = SIMULATION_COSMOLOGY):
    """Critical density [h^2 Msun Mpc^-3] at redshift z."""
    return use(cosmo).rho_c(np.asarray(z, dtype=float)) * 1e9


def concentration_200c(log_m, z, model: str = "diemer19", cosmo: str = SIMULATION_COSMOLOGY):
    """NFW concentration c200c of halos of log10 M200c [h^-1 Msun] (colossus c(M) model)."""
    use(cosmo)
    m = 10.0 ** np.asarray(log_m, dtype=float)
    return _conc.concentration(m, "200c", float(np.mean(z)) if np.ndim(z) else float(z), model=model)


def comoving_distance(z, cosmo: str = SIMULATION_COSMOLOGY):
    """Line-of-sight comoving distance [h^-1 Mpc] (tabulated for 0 <= z <= 20).

    Raises ValueError for redshifts outside the table (e.g. a velocity cz given as a redshift).
    """
    z = np.asarray(z, dtype=float)
    tab_chi, tab_z = _z_of_chi_table(cosmo)
    if np.nanmax(z, initial=0.0) > tab_z[-1] or np.nanmin(z, initial=0.0) < 0:
        raise ValueError(f"redshift outside 0 <= z <= {tab_z[-1]:g} (max {np.nanmax(z):.4g}, "
                         f"min {np.nanmin(z):.4g})")
    return np.interp(z, tab_z, tab_chi)


def angular_diameter_distance(z, cosmo: str = SIMULATION_COSMOLOGY):
    """Angular-diameter distance chi / (1 + z) [h^-1 Mpc] (flat cosmologies, as Planck's)."""
    return comoving_distance(z, cosmo) / (1.0 + np.asarray(z, dtype=float))


def luminosity_distance(z, cosmo: str = SIMULATION_COSMOLOGY):
    """Luminosity distance (1 + z) chi [h^-1 Mpc] (flat cosmologies, as Planck's)."""
    return (1.0 + np.asarray(z, dtype=float)) * comoving_distance(z, cosmo)


@lru_cache(maxsize=8)
def _z_of_chi_table(cosmo: str):
    # chi(z) = (c / 100 km/s/Mpc) * int_0^z dz'/E(z') [h^-1 Mpc], trapezoid on a fine grid
    # (colossus integrates point by point, seconds for thousands of points).
    from scipy.integrate import cumulative_trapezoid

    z = np.concatenate([np.linspace(0.0, 1.0, 20001), np.linspace(1.0, 20.0, 19001)[1:]])
    chi = C_KMS / 100.0 * cumulative_trapezoid(1.0 / use(cosmo).Ez(z), z, initial=0.0)
    return chi, z


def redshift_from_comoving(chi, cosmo: str = SIMULATION_COSMOLOGY):
    """Redshift at comoving distance ``chi`` [h^-1 Mpc] (interpolated; z <= 20)."""
    tab_chi, tab_z = _z_of_chi_table(cosmo)
    chi = np.asarray(chi, dtype=float)
    if np.nanmax(chi, initial=0.0) > tab_chi[-1]:
        raise ValueError(f"comoving distance beyond z = {tab_z[-1]:g} ({tab_chi[-1]:.0f} h^-1 Mpc) is not tabulated")
    return np.interp(chi, tab_chi, tab_z)


def mass_function(log_m, z=0.0, cosmo: str = MASS_FUNCTION_COSMOLOGY, model: str = "tinker08"):
    """Halo mass function dn/dlog10(M200c) [h^3 Mpc^-3 dex^-1] from colossus."""
    use(cosmo)
    m = 10.0 ** np.asarray(log_m, dtype=float)
    # colossus 'dndlnM' returns dn/dlnM; dn/dlog10M = ln(10) * dn/dlnM
    return np.log(10.0) * _mf.massFunction(m, z, mdef="200c", model=model, q_out="dndlnM")
