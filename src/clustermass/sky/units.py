"""Units of sky-table columns: honour what the table declares, refuse what cannot fit.

FITS (``TUNIT``), VOTable and ECSV tables say the unit of each column; :func:`read_table`
keeps them in ``DataFrame.attrs["units"]``. Angles are converted to degrees (hours of RA
included), redshift columns must be dimensionless, magnitude columns must hold magnitudes, and a
flux column is converted to AB magnitudes. Where a table declares nothing, the values are
checked for the usual mistakes (radians for degrees, cz in km/s for z, fluxes for magnitudes).
"""

from __future__ import annotations

import numpy as np

from ..errors import CoordinateError, UnitError

#: flux units accepted by :func:`flux_to_mag`, as the AB zero point of 1 unit [mag]
FLUX_ZERO_POINTS = {"nanomaggies": 22.5, "nanomaggy": 22.5, "nmgy": 22.5, "jy": 8.90, "ujy": 23.90,
                    "njy": 31.40}
#: a redshift above this is taken for a velocity cz [km/s] (the tables stop at z = 20)
Z_MAX_PLAUSIBLE = 10.0


def declared_unit(attrs_units: dict | None, col: str) -> str | None:
    """The unit a table declares for ``col`` (None when it declares none)."""
    unit = (attrs_units or {}).get(col)
    unit = None if unit is None else str(unit).strip()
    return unit or None


def _astropy_unit(text: str):
    import astropy.units as u

    try:
        return u.Unit(text, parse_strict="raise")
    except (ValueError, TypeError):
        return None


def angle_to_degrees(values: np.ndarray, unit: str | None, default_unit: str, col: str, table: str) -> np.ndarray:
    """Angles of column ``col`` in degrees.

    ``unit`` is the declared unit (hours of RA as ``h``, ``hour`` or ``hourangle`` are taken as
    hour angle, 15 deg each); without one, ``default_unit`` ('deg' or 'rad') applies.
    Raises :class:`UnitError` for a declared unit that is not an angle.
    """
    import astropy.units as u

    if unit is None:
        if default_unit not in ("deg", "rad"):
            raise CoordinateError(f"angle_unit must be 'deg' or 'rad', not {default_unit!r}", option="angle_unit")
        return values if default_unit == "deg" else np.degrees(values)
    if unit.lower() in ("h", "hr", "hour", "hours", "hourangle", "hms"):
        return values * 15.0
    parsed = _astropy_unit(unit)
    if parsed is None or not parsed.is_equivalent(u.deg):
        raise UnitError(f"{table} column {col!r} has unit {unit!r}, which is not an angle (deg, rad, h)")
    return (values * parsed).to_value(u.deg)


def check_redshifts(values: np.ndarray, unit: str | None, col: str, table: str, option: str) -> None:
    """Refuse a redshift column that holds velocities (declared, or values above 10)."""
    import astropy.units as u

    if unit is not None and unit.lower() not in ("", "redshift", "dimensionless", "z"):
        parsed = _astropy_unit(unit)
        if parsed is not None and parsed.is_equivalent(u.km / u.s):
            raise UnitError(f"{table} column {col!r} holds velocities ({unit}): give redshifts "
                            "z = cz / c (c = 299792.458 km/s)", option=option)
        if parsed is None or parsed != u.dimensionless_unscaled:
            raise UnitError(f"{table} column {col!r} has unit {unit!r}; a redshift is dimensionless",
                            option=option)
    finite = values[np.isfinite(values)]
    if len(finite) and finite.max() > Z_MAX_PLAUSIBLE:
        raise UnitError(f"{table} column {col!r} reaches {finite.max():.6g}: that looks like cz in km/s, "
                        "not a redshift; give z = cz / c (c = 299792.458 km/s)", option=option)


def check_magnitudes(values: np.ndarray, unit: str | None, col: str, option: str = "mag_col") -> None:
    """Refuse a magnitude column that holds fluxes (declared unit, or the spread of the values).

    Apparent galaxy magnitudes lie between ~8 and ~30 and span a factor < 4 (1st to 99th
    percentile); fluxes span orders of magnitude, or exceed 40, or go negative.
    """
    if unit is not None:
        low = unit.lower().replace(" ", "")
        if "mag" not in low:
            raise UnitError(f"galaxy column {col!r} has unit {unit!r}, not magnitudes; for fluxes use "
                            "flux_col with its unit", option=option)
        if "maggy" in low or "maggies" in low:
            raise UnitError(f"galaxy column {col!r} holds fluxes ({unit}); use flux_col", option=option)
    finite = values[np.isfinite(values)]
    if len(finite) < 3:
        return
    p1, p50, p99 = np.percentile(finite, [1, 50, 99])
    if p1 < -1.0 or p50 > 40.0 or (p1 > 0 and p99 / p1 > 4.0):
        raise UnitError(
            f"galaxy column {col!r} does not look like apparent magnitudes (1st/50th/99th percentiles "
            f"{p1:.3g}/{p50:.3g}/{p99:.3g}); fluxes (e.g. flux_r in nanomaggies) go in flux_col",
            option=option)


def flux_to_mag(flux: np.ndarray, flux_unit: str, col: str) -> np.ndarray:
    """AB magnitudes of fluxes in ``flux_unit`` (nanomaggies, Jy, uJy, nJy); NaN where flux <= 0."""
    key = flux_unit.lower().replace("µ", "u")
    if key not in FLUX_ZERO_POINTS:
        raise UnitError(f"unknown flux unit {flux_unit!r}; one of {', '.join(sorted(set(FLUX_ZERO_POINTS)))}",
                        option="flux_unit")
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = FLUX_ZERO_POINTS[key] - 2.5 * np.log10(flux)
    return np.where(np.asarray(flux) > 0, mag, np.nan)
