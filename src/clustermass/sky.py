"""Real surveys: clusters given as sky coordinates and redshifts -> projected phase space.

A galaxy survey (RA, Dec, redshift, optionally an apparent magnitude) and a cluster list (id, RA,
Dec, redshift of the centre) become a :class:`~clustermass.catalog.Catalogue` in a model's window:

- every survey galaxy in each cluster's field is found with a spatial index on the sky (unit
  vectors in a ``scipy.spatial.cKDTree``, one ``query_ball_point`` with the chord of each
  cluster's angular radius), never by a loop over clusters x galaxies;
- offsets are the gnomonic (tangent-plane) standard coordinates times the angular-diameter
  distance at the cluster redshift: ``x`` toward the east (increasing RA), ``y`` toward the north,
  in h^-1 Mpc (proper); ``v_los = c (z - z_cl) / (1 + z_cl)`` in km/s;
- the model's window ``|x|, |y| <= r_max``, ``|v_los| <= v_max`` is applied.

Each cluster gets flags: ``edge`` (the field is cut by the survey footprint, estimated from the
galaxies themselves, see :func:`sky_to_catalogue`), ``few_galaxies`` (too few galaxies, or a
degenerate set, for a 3D KDE) and ``outside_training_range`` (beyond the redshift / comoving
distance the model was trained for, when known). Distances use the simulation cosmology of
:mod:`clustermass.cosmology` (Planck, h-scaled), the one the model was trained in.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from . import cosmology
from .catalog import Catalogue
from .config import WindowConfig
from .errors import CatalogueError

C_KMS = cosmology.C_KMS
FLAG_COLUMNS = ("edge", "few_galaxies", "outside_training_range")
POSTERIOR_COLUMNS = ("d_pred", "log_m_map", "log_m_median", "log_m_mean", "log_m_lo1", "log_m_hi1",
                     "log_m_lo2", "log_m_hi2", "out_of_range")

#: names tried (case-insensitively) when a default column name is absent
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "ra": ("ra", "ra_deg", "raj2000", "_raj2000", "ra_j2000", "alpha", "ra_gal", "ra_cl", "radeg"),
    "dec": ("dec", "dec_deg", "dej2000", "_dej2000", "decj2000", "dec_j2000", "de", "delta",
            "dec_gal", "dec_cl", "dedeg"),
    "z": ("z", "redshift", "zspec", "z_spec", "zobs", "z_obs", "zhelio", "z_helio", "zcmb",
          "z_cmb", "z_cl", "zcl"),
    "id": ("id", "cluster_id", "clusterid", "cid", "name", "objid", "gid", "galwcat_id"),
}
_FLAG_OF = {"ra": "--ra-col", "dec": "--dec-col", "z": "--z-col", "id": "--id-col", "mag": "--mag-col"}


# ---------------------------------------------------------------------- errors and warnings
class SkyInputError(CatalogueError):
    """A sky table (galaxies or clusters) cannot be used as given."""


class MissingColumnError(SkyInputError):
    """A required column is absent."""


class ClusterIdError(SkyInputError):
    """Cluster ids are duplicated or missing."""


class CoordinateError(SkyInputError):
    """Coordinates are NaN, out of range, or in the wrong angle unit."""


class SkyWarning(UserWarning):
    """Something in a sky table was fixed or cannot be checked (dropped rows, flux limit)."""


# ---------------------------------------------------------------------- coordinates
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


# ---------------------------------------------------------------------- input checks
def _as_frame(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):  # astropy Table
        return _astropy_to_pandas(table)
    return pd.DataFrame(table)


def resolve_column(df: pd.DataFrame, requested: str | None, kind: str, table: str,
                   default: str | None = None, flag: str | None = None) -> str:
    """The column of ``df`` to use for ``kind`` (ra, dec, z, id, mag).

    The requested name wins; if it is the default and absent, common aliases are tried
    case-insensitively (``RA``, ``RAJ2000``, ``redshift``, ...). Raises :class:`MissingColumnError`.
    """
    if requested is not None and requested in df.columns:
        return requested
    lower = {str(c).lower(): c for c in df.columns}
    if requested is not None and requested.lower() in lower:
        return lower[requested.lower()]
    if requested is None or requested == default:
        for alias in COLUMN_ALIASES.get(kind, ()):
            if alias in lower:
                return lower[alias]
    flag = flag or _FLAG_OF.get(kind, "")
    cols = ", ".join(map(str, list(df.columns)[:30]))
    raise MissingColumnError(
        f"{table} table has no {kind} column {requested!r} (columns: {cols}); "
        f"name the right one with {flag} (or the {kind}_col argument)"
    )


def _check_angles(ra: np.ndarray, dec: np.ndarray, unit: str, what: str) -> None:
    """Raise CoordinateError if RA/Dec are out of range or look like the other angle unit."""
    if unit not in ("deg", "rad"):
        raise CoordinateError(f"angle_unit must be 'deg' or 'rad', not {unit!r}")
    if len(ra) == 0:
        return
    amax_ra, amax_dec = float(np.max(np.abs(ra))), float(np.max(np.abs(dec)))
    if unit == "deg":
        if amax_ra > 360.0 or amax_dec > 90.0:
            raise CoordinateError(f"{what} RA/Dec out of range for degrees (|RA| <= 360, |Dec| <= 90): "
                                  f"max |RA| = {amax_ra:.4g}, max |Dec| = {amax_dec:.4g}")
        if amax_ra <= 2 * np.pi + 1e-9 and amax_dec <= np.pi / 2 + 1e-9 and len(ra) >= 3:
            raise CoordinateError(
                f"{what} RA/Dec look like radians (all |RA| <= 2 pi, |Dec| <= pi/2) but degrees "
                f"were said: pass angle_unit='rad' (--angle-unit rad); if they really are degrees "
                f"of a small field near RA = 0, pass check_angles=False"
            )
    else:
        if amax_ra > 2 * np.pi + 1e-9 or amax_dec > np.pi / 2 + 1e-9:
            raise CoordinateError(
                f"{what} RA/Dec look like degrees (max |RA| = {amax_ra:.4g}, max |Dec| = "
                f"{amax_dec:.4g}) but radians were said: pass angle_unit='deg'"
            )


def _float_column(df: pd.DataFrame, col: str, table: str) -> np.ndarray:
    try:
        return pd.to_numeric(df[col], errors="raise").to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise SkyInputError(f"{table} column {col!r} is not numeric: {exc}") from exc


def _check_cluster_ids(ids: pd.Series) -> None:
    missing = ids.isna().to_numpy() | (ids.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)[:5].tolist()
        raise ClusterIdError(f"{int(missing.sum())} cluster(s) have no id (rows {rows}); every cluster needs one")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        shown = sorted({str(v) for v in dup})[:5]
        raise ClusterIdError(f"duplicated cluster id(s): {', '.join(shown)} "
                             f"({dup.nunique()} id(s) occur more than once); ids must be unique")


# ---------------------------------------------------------------------- the main conversion
def sky_to_catalogue(
    galaxies,
    clusters,
    window: WindowConfig,
    *,
    ra_col: str = "ra",
    dec_col: str = "dec",
    z_col: str = "z",
    id_col: str = "id",
    mag_col: str | None = None,
    mag_limit: float | None = None,
    angle_unit: str = "deg",
    cluster_ra_col: str | None = None,
    cluster_dec_col: str | None = None,
    cluster_z_col: str | None = None,
    distance_max: float | None = None,
    z_range: tuple[float, float] | None = None,
    min_galaxies: int = 4,
    edge_grid: int = 5,
    edge_min_empty: int = 2,
    extra_cols: Sequence[str] = (),
    check_angles: bool = True,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> tuple[Catalogue, pd.DataFrame]:
    """Select each cluster's galaxies in the window and convert them to projected phase space.

    Parameters
    ----------
    galaxies : DataFrame or astropy Table
        Survey galaxies: RA, Dec [``angle_unit``], redshift; optionally an apparent magnitude.
    clusters : DataFrame or astropy Table
        Cluster list: id, RA, Dec of the centre [``angle_unit``], redshift.
    window : WindowConfig
        The model's window: ``r_max`` [h^-1 Mpc, proper], ``v_max`` [km/s].
    ra_col, dec_col, z_col, id_col, mag_col : str
        Column names (galaxies and clusters; ``cluster_*_col`` override for the clusters). When
        a default name is absent, common aliases (RA, RAJ2000, redshift, ...) are tried.
    mag_limit : float, optional
        Training flux limit [mag]: galaxies fainter are removed when ``mag_col`` is given;
        without magnitudes a :class:`SkyWarning` says the depth cannot be checked.
    distance_max : float, optional
        Largest comoving distance of the training clusters [h^-1 Mpc]; beyond it a cluster is
        flagged ``outside_training_range``. ``z_range`` = (z_min, z_max) likewise.
    min_galaxies : int
        Fewest galaxies for a 3D KDE (scipy needs more points than dimensions); fewer, or a
        degenerate (rank < 3) set, sets ``few_galaxies``.
    edge_grid, edge_min_empty : int
        Footprint test: ``edge`` is set when at least ``edge_min_empty`` of an
        ``edge_grid`` x ``edge_grid`` lattice of points spanning the square field have no
        survey galaxy (any redshift) within the radius that holds ~13 galaxies on average
        (1.6 x the median 5th-neighbour separation of the survey). The survey mask is not
        known to the package: this estimates it from the galaxies themselves.
    extra_cols : sequence of str
        Cluster columns copied into the info table (e.g. a published mass and its error).
    check_angles : bool
        Refuse RA/Dec that look like the other angle unit.

    Returns
    -------
    catalogue : Catalogue
        One diagram per cluster (``diagram_id`` = row of the cluster list, ``split='none'``,
        truth columns NaN / -1), galaxies with ``x_proj, y_proj`` [h^-1 Mpc], ``v_los`` [km/s]
        and ``galaxy_row`` (row in the input table).
    info : DataFrame
        Per cluster: ``diagram_id, id, ra, dec`` [deg], ``z``, ``comoving_distance``
        [h^-1 Mpc], ``n_gal`` (in window), ``empty_fraction`` (of the field's lattice points outside the
        estimated footprint), the flags.
    """
    gal = _as_frame(galaxies)
    cl = _as_frame(clusters)
    # ---- columns
    g_ra = resolve_column(gal, ra_col, "ra", "galaxies", "ra")
    g_dec = resolve_column(gal, dec_col, "dec", "galaxies", "dec")
    g_z = resolve_column(gal, z_col, "z", "galaxies", "z")
    c_ra = resolve_column(cl, cluster_ra_col or ra_col, "ra", "clusters", "ra")
    c_dec = resolve_column(cl, cluster_dec_col or dec_col, "dec", "clusters", "dec")
    c_z = resolve_column(cl, cluster_z_col or z_col, "z", "clusters", "z")
    c_id = resolve_column(cl, id_col, "id", "clusters", "id")
    g_mag = resolve_column(gal, mag_col, "mag", "galaxies") if mag_col is not None else None
    for col in extra_cols:
        if col not in cl.columns:
            raise MissingColumnError(f"clusters table has no column {col!r} (asked to keep it)")

    # ---- clusters: ids and coordinates must be complete
    ids = cl[c_id].reset_index(drop=True)
    _check_cluster_ids(ids)
    cra, cdec, cz = (_float_column(cl, c, "clusters") for c in (c_ra, c_dec, c_z))
    bad = ~(np.isfinite(cra) & np.isfinite(cdec) & np.isfinite(cz))
    if bad.any():
        shown = ", ".join(map(str, ids[bad].tolist()[:5]))
        raise CoordinateError(f"{int(bad.sum())} cluster(s) have NaN/inf RA, Dec or redshift (id {shown}); "
                              "fix or remove them")
    if (cz <= 0).any():
        shown = ", ".join(map(str, ids[cz <= 0].tolist()[:5]))
        raise CoordinateError(f"cluster redshift(s) must be positive (id {shown})")

    # ---- galaxies: drop incomplete rows with a warning
    gra, gdec, gz = (_float_column(gal, c, "galaxies") for c in (g_ra, g_dec, g_z))
    good = np.isfinite(gra) & np.isfinite(gdec) & np.isfinite(gz)
    gmag = _float_column(gal, g_mag, "galaxies") if g_mag is not None else None
    if gmag is not None:
        good &= np.isfinite(gmag)
    n_nan = int((~good).sum())
    if n_nan:
        warnings.warn(f"dropped {n_nan} of {len(good)} galaxies with NaN/inf RA, Dec, redshift"
                      f"{' or magnitude' if gmag is not None else ''}", SkyWarning, stacklevel=2)
    if check_angles:
        _check_angles(cra, cdec, angle_unit, "clusters")
        _check_angles(gra[good], gdec[good], angle_unit, "galaxies")
    # ---- flux limit
    n_faint = 0
    if mag_limit is not None:
        if gmag is not None:
            faint = good & (gmag > mag_limit)
            n_faint = int(faint.sum())
            if n_faint:
                warnings.warn(f"the survey is deeper than the model's training flux limit: removed "
                              f"{n_faint} galaxies fainter than {mag_limit:g} mag", SkyWarning, stacklevel=2)
            good &= ~faint
        else:
            warnings.warn(f"the model was trained with a flux limit of {mag_limit:g} mag; without a "
                          f"magnitude column (--mag-col) the survey depth cannot be checked or matched",
                          SkyWarning, stacklevel=2)
    grow = np.flatnonzero(good)
    to_rad = np.pi / 180.0 if angle_unit == "deg" else 1.0
    gra_r, gdec_r, gz = gra[grow] * to_rad, gdec[grow] * to_rad, gz[grow]
    cra_r, cdec_r = cra * to_rad, cdec * to_rad
    n_cl = len(cl)

    # ---- spatial index on the sky: one ball query per cluster, chord of its angular radius
    d_a = cosmology.angular_diameter_distance(cz, cosmo)
    theta = np.arctan(np.sqrt(2.0) * window.r_max / d_a)  # = window_angular_radius
    chord = 2.0 * np.sin(np.minimum(theta, np.pi / 2) / 2.0) * (1.0 + 1e-9)
    tree = cKDTree(unit_vectors(gra_r, gdec_r)) if len(grow) else None
    pairs_cl, pairs_gal = _sky_pairs(tree, unit_vectors(cra_r, cdec_r), chord)

    # ---- projection of all pairs at once
    xi, eta, cosc = _gnomonic(gra_r[pairs_gal], gdec_r[pairs_gal], cra_r[pairs_cl], cdec_r[pairs_cl])
    ok = cosc > 0
    x = d_a[pairs_cl] * np.where(ok, xi, np.inf)
    y = d_a[pairs_cl] * np.where(ok, eta, np.inf)
    v = los_velocity(gz[pairs_gal], cz[pairs_cl])
    in_square = (np.abs(x) <= window.r_max) & (np.abs(y) <= window.r_max)
    in_window = in_square & (np.abs(v) <= window.v_max)

    # ---- flags
    n_gal = np.bincount(pairs_cl[in_window], minlength=n_cl)
    empty = _empty_fraction(tree, cra, cdec, cz, window, edge_grid, angle_unit, cosmo)
    edge = empty * edge_grid**2 >= edge_min_empty - 1e-9
    sel_cl, sel_gal = pairs_cl[in_window], pairs_gal[in_window]
    xs, ys, vs = x[in_window], y[in_window], v[in_window]
    few = (n_gal < max(min_galaxies, 4)) | _degenerate(sel_cl, xs / window.r_max, ys / window.r_max,
                                                       vs / window.v_max, n_cl)
    chi = cosmology.comoving_distance(cz, cosmo)
    outside = np.zeros(n_cl, dtype=bool)
    if distance_max is not None:
        outside |= chi > distance_max * (1 + 1e-9)
    if z_range is not None:
        outside |= (cz < z_range[0]) | (cz > z_range[1])

    # ---- catalogue and info
    galaxies_out = pd.DataFrame({
        "diagram_id": sel_cl.astype(np.int64),
        "x_proj": xs,
        "y_proj": ys,
        "v_los": vs,
        "galaxy_row": grow[sel_gal].astype(np.int64),
    })
    if gmag is not None:
        galaxies_out["mag_r"] = gmag[grow][sel_gal]
    diag = np.arange(n_cl, dtype=np.int64)
    nan = np.full(n_cl, np.nan)
    clusters_out = pd.DataFrame({
        "diagram_id": diag, "halo_id": diag, "split": "none", "log_m200c": nan, "r200c": nan,
        "v200c": nan, "redshift": cz, "n_gal": n_gal.astype(np.int64),
        "n_mem": np.full(n_cl, -1, dtype=np.int64),
    })
    meta = {
        "source": "sky", "window": window.model_dump(), "mag_limit": mag_limit,
        "n_galaxies_input": int(len(gal)), "n_galaxies_dropped_nan": n_nan,
        "n_galaxies_fainter_than_limit": n_faint, "cosmology": cosmo, "angle_unit": angle_unit,
    }
    cat = Catalogue(clusters_out, galaxies_out, None, meta)
    to_deg = 1.0 if angle_unit == "deg" else 180.0 / np.pi
    info = pd.DataFrame({
        "diagram_id": diag, "id": ids.to_numpy(), "ra": cra * to_deg, "dec": cdec * to_deg, "z": cz,
        "comoving_distance": chi, "n_gal": n_gal.astype(np.int64), "empty_fraction": empty,
        "edge": edge, "few_galaxies": few, "outside_training_range": outside,
    })
    for col in extra_cols:
        info[col] = cl[col].to_numpy()
    return cat, info


def footprint_radius(tree: cKDTree, k: int = 5, n_sample: int = 4000, seed: int = 0,
                     factor: float = 1.6) -> float:
    """Chord radius holding ~13 survey galaxies: 1.6 x the median distance to the 5th neighbour."""
    xyz = tree.data
    if len(xyz) <= k:
        return np.inf
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(xyz), min(n_sample, len(xyz)), replace=False)
    d, _ = tree.query(xyz[idx], k=k + 1)
    return float(factor * np.median(d[:, k]))


def _empty_fraction(tree, cra, cdec, cz, window, n: int, angle_unit: str, cosmo: str) -> np.ndarray:
    """Fraction of an n x n lattice over each cluster's square field with no galaxy nearby."""
    if tree is None:
        return np.ones(len(cra))
    rho = footprint_radius(tree)
    g = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    gx, gy = np.meshgrid(g * window.r_max, g * window.r_max)
    to_deg = 1.0 if angle_unit == "deg" else 180.0 / np.pi
    ra, dec = projected_to_sky(gx.ravel()[None, :], gy.ravel()[None, :], (cra * to_deg)[:, None],
                               (cdec * to_deg)[:, None], cz[:, None], cosmo=cosmo)
    pts = unit_vectors(np.radians(ra.ravel()), np.radians(dec.ravel()))
    d, _ = tree.query(pts, k=1, distance_upper_bound=rho)
    return (~np.isfinite(d)).reshape(len(cra), n * n).mean(axis=1)


def _sky_pairs(tree: cKDTree | None, cl_xyz: np.ndarray, chord: np.ndarray, chunk: int = 512):
    """(cluster index, galaxy index) of every galaxy within ``chord`` of each cluster."""
    if tree is None or len(cl_xyz) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    out_c, out_g = [], []
    for s in range(0, len(cl_xyz), chunk):
        hits = tree.query_ball_point(cl_xyz[s:s + chunk], r=chord[s:s + chunk], return_sorted=False)
        counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
        out_c.append(np.repeat(np.arange(s, s + len(hits), dtype=np.int64), counts))
        flat = [i for h in hits for i in h]
        out_g.append(np.asarray(flat, dtype=np.int64))
    return np.concatenate(out_c), np.concatenate(out_g)


def _degenerate(cl: np.ndarray, x: np.ndarray, y: np.ndarray, v: np.ndarray, n: int,
                rtol: float = 1e-8) -> np.ndarray:
    """True where the (x, y, v) covariance of a cluster's points is singular (vectorised)."""
    cnt = np.bincount(cl, minlength=n).astype(float)
    safe = np.maximum(cnt, 1.0)
    cols = (x, y, v)
    mean = [np.bincount(cl, c, minlength=n) / safe for c in cols]
    cov = np.empty((n, 3, 3))
    for i in range(3):
        for j in range(i, 3):
            s = np.bincount(cl, cols[i] * cols[j], minlength=n) / safe - mean[i] * mean[j]
            cov[:, i, j] = cov[:, j, i] = s
    eig = np.linalg.eigvalsh(cov)
    return (cnt >= 4) & (eig[:, 0] <= rtol * np.maximum(eig[:, 2], 1e-300))


# ---------------------------------------------------------------------- inference
def training_range(bundle) -> dict:
    """Flux limit, distance and redshift range of a bundle's training data, where recorded."""
    meta = getattr(bundle, "meta", {}) or {}
    td = meta.get("training_data") or {}
    sim = td.get("simulation", td) if isinstance(td, dict) else {}
    out = {}
    for key in ("mag_limit", "distance_max", "z_min", "z_max"):
        val = sim.get(key, td.get(key) if isinstance(td, dict) else None)
        if val is not None:
            out[key] = float(val)
    return out


def infer_sky_catalogue(bundle, cat: Catalogue, info: pd.DataFrame | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Posterior summaries for the diagrams of ``cat`` with a calibrated bundle.

    Rows flagged ``few_galaxies`` (or with fewer than 4 galaxies when ``info`` is None) are not
    sent to the network; their posterior columns are NaN. Returns ``info`` (or the catalogue's
    diagram ids) joined with the posterior columns (``out_of_range`` True for skipped rows).
    """
    if info is None:
        info = pd.DataFrame({"diagram_id": cat.clusters["diagram_id"].to_numpy(),
                             "n_gal": cat.clusters["n_gal"].to_numpy()})
        for c in ("id", "log_m_ref", "log_m_ref_err"):
            if c in cat.clusters.columns:
                info[c] = cat.clusters[c].to_numpy()
        info["few_galaxies"] = info["n_gal"].to_numpy() < 4
    post = bundle.posterior()  # raises BundleError when the bundle is not calibrated
    rows = np.flatnonzero(~info["few_galaxies"].to_numpy(bool))
    table = pd.DataFrame(index=range(len(info)), columns=list(POSTERIOR_COLUMNS), dtype=float)
    table["out_of_range"] = True
    if len(rows):
        d = bundle.predict(cat, rows=rows, progress=progress)
        summ = post.summarize(np.asarray(d)).reset_index(drop=True)
        for c in POSTERIOR_COLUMNS:
            if c in summ.columns:
                table.loc[rows, c] = summ[c].to_numpy()
    table["out_of_range"] = table["out_of_range"].astype(bool)
    first = [c for c in ("id", "diagram_id", "ra", "dec", "z", "n_gal") if c in info.columns]
    rest = [c for c in info.columns if c not in first]
    return pd.concat([info[first].reset_index(drop=True), table, info[rest].reset_index(drop=True)], axis=1)


def infer_sky(bundle, galaxies, clusters, *, progress: bool = False, **column_options) -> pd.DataFrame:
    """Posterior masses of clusters given on the sky.

    Parameters
    ----------
    bundle : ModelBundle
        A calibrated model bundle; its window is applied, and its training flux limit and
        distance range (``bundle.meta["training_data"]``, if recorded) are used unless
        ``mag_limit`` / ``distance_max`` are given.
    galaxies, clusters : DataFrame or astropy Table
        The survey and the cluster list (see :func:`sky_to_catalogue`).
    **column_options
        Passed to :func:`sky_to_catalogue` (``ra_col``, ``mag_col``, ``angle_unit``, ...).

    Returns
    -------
    DataFrame
        One row per cluster: ``id, diagram_id, ra, dec, z, n_gal``, the posterior columns
        (NaN where the cluster has too few galaxies), ``comoving_distance, empty_fraction`` and the flags.
    """
    rng = training_range(bundle)
    opts = dict(column_options)
    if opts.get("mag_limit") is None:
        opts["mag_limit"] = rng.get("mag_limit")
    if opts.get("distance_max") is None:
        opts["distance_max"] = rng.get("distance_max")
    if opts.get("z_range") is None and "z_max" in rng:
        opts["z_range"] = (rng.get("z_min", 0.0), rng["z_max"])
    cat, info = sky_to_catalogue(galaxies, clusters, bundle.window, **opts)
    return infer_sky_catalogue(bundle, cat, info, progress=progress)


# ---------------------------------------------------------------------- comparison
def compare_with_published(posteriors: pd.DataFrame, ref_log_m, ref_err=None, *,
                           estimate: str = "log_m_map") -> tuple[dict, pd.DataFrame]:
    """Normalised contrast of inferred and published masses (paper Fig. 9).

    ``contrast = (log M_pred - log M_ref) / sigma_pred`` with ``sigma_pred`` the 1-sigma
    half-width of the posterior on the side toward the reference (``hi1 - pred`` when the
    reference is above, ``pred - lo1`` otherwise).

    Parameters
    ----------
    posteriors : DataFrame
        Posterior table (``log_m_lo1, log_m_hi1`` and ``estimate``), one row per cluster.
    ref_log_m : array_like
        Published log10 M200c [h^-1 Msun], aligned with ``posteriors``.
    ref_err : array_like, optional
        Published errors [dex]; adds ``contrast_total`` using both errors in quadrature.
    estimate : str
        Posterior column used as the prediction (MAP by default).

    Returns
    -------
    summary : dict
        ``n, mean, std, median, frac_within_1sigma`` of the contrast, ``mean_offset_dex``,
        ``scatter_dex`` (and ``mean_total, std_total`` with ``ref_err``).
    table : DataFrame
        ``posteriors`` plus ``log_m_pred, log_m_ref, log_m_ref_err, sigma_pred, contrast``.
    """
    if estimate not in posteriors.columns:
        raise CatalogueError(f"posterior table has no column {estimate!r}")
    pred = posteriors[estimate].to_numpy(dtype=float)
    ref = np.asarray(ref_log_m, dtype=float)
    if ref.shape != pred.shape:
        raise CatalogueError(f"{len(ref)} reference masses for {len(pred)} posteriors")
    if np.nanmedian(ref) > 100:  # linear masses given
        raise CatalogueError("reference masses look linear (median > 100): give log10 M200c [h^-1 Msun]")
    lo = posteriors["log_m_lo1"].to_numpy(dtype=float)
    hi = posteriors["log_m_hi1"].to_numpy(dtype=float)
    sigma = np.where(ref >= pred, hi - pred, pred - lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        contrast = (pred - ref) / sigma
    table = posteriors.copy().reset_index(drop=True)
    table["log_m_pred"] = pred
    table["log_m_ref"] = ref
    table["sigma_pred"] = sigma
    table["contrast"] = contrast
    ok = np.isfinite(contrast) & (sigma > 0)
    diff = pred - ref
    summary = {
        "n": int(ok.sum()),
        "n_skipped": int((~ok).sum()),
        "estimate": estimate,
        "mean": float(np.mean(contrast[ok])) if ok.any() else float("nan"),
        "std": float(np.std(contrast[ok], ddof=1)) if ok.sum() > 1 else float("nan"),
        "median": float(np.median(contrast[ok])) if ok.any() else float("nan"),
        "frac_within_1sigma": float(np.mean(np.abs(contrast[ok]) <= 1)) if ok.any() else float("nan"),
        "mean_offset_dex": float(np.mean(diff[ok])) if ok.any() else float("nan"),
        "scatter_dex": float(np.std(diff[ok], ddof=1)) if ok.sum() > 1 else float("nan"),
    }
    if ref_err is not None:
        err = np.asarray(ref_err, dtype=float)
        table["log_m_ref_err"] = err
        with np.errstate(invalid="ignore", divide="ignore"):
            tot = diff / np.sqrt(sigma**2 + err**2)
        table["contrast_total"] = tot
        okt = ok & np.isfinite(tot)
        summary["mean_total"] = float(np.mean(tot[okt])) if okt.any() else float("nan")
        summary["std_total"] = float(np.std(tot[okt], ddof=1)) if okt.sum() > 1 else float("nan")
    else:
        table["log_m_ref_err"] = np.nan
    return summary, table


# ---------------------------------------------------------------------- readers
def _astropy_to_pandas(table) -> pd.DataFrame:
    cols = {}
    for name in table.colnames:
        col = table[name]
        if getattr(col, "ndim", 1) > 1:
            continue  # multidimensional columns have no pandas equivalent
        data = col.filled(np.nan) if hasattr(col, "filled") and getattr(col, "mask", None) is not None \
            and col.dtype.kind in "fc" else (col.filled() if hasattr(col, "filled") else col)
        arr = np.asarray(data)
        if arr.dtype.kind == "S":
            arr = np.char.decode(arr, "utf-8")
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))
        cols[name] = arr
    return pd.DataFrame(cols)


def read_table(path: str | Path, format: str | None = None) -> pd.DataFrame:
    """Read a table (FITS, CSV, ECSV, VOTable, parquet, whitespace text) into a DataFrame.

    The format follows the extension (``.fits .fit .fits.gz``, ``.csv``, ``.ecsv``,
    ``.xml .vot .votable``, ``.parquet .pq``, ``.txt .dat``) unless ``format`` names one of
    ``fits, csv, ecsv, votable, parquet, ascii``.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"table file not found: {path}")
    name = path.name.lower()
    if format is None:
        for fmt, exts in (("fits", (".fits", ".fit", ".fits.gz", ".fts")), ("ecsv", (".ecsv",)),
                          ("csv", (".csv", ".csv.gz")), ("votable", (".xml", ".vot", ".votable")),
                          ("parquet", (".parquet", ".pq")), ("ascii", (".txt", ".dat", ".tsv"))):
            if name.endswith(exts):
                format = fmt
                break
        else:
            raise CatalogueError(f"cannot tell the format of {path} from its extension; "
                                 "use .fits, .csv, .ecsv, .xml/.vot, .parquet or .txt")
    try:
        if format == "parquet":
            return pd.read_parquet(path)
        if format == "csv":
            return pd.read_csv(path, comment="#")
        if format == "ascii":
            return pd.read_csv(path, sep=r"\s+", comment="#")
        from astropy.table import Table

        astro_fmt = {"fits": "fits", "ecsv": "ascii.ecsv", "votable": "votable"}.get(format)
        if astro_fmt is None:
            raise CatalogueError(f"unknown table format {format!r}")
        return _astropy_to_pandas(Table.read(path, format=astro_fmt))
    except CatalogueError:
        raise
    except Exception as exc:
        raise CatalogueError(f"cannot read {path} as {format}: {exc}") from exc


def _read_columns(path: Path, ncol: int, what: str) -> np.ndarray:
    try:
        arr = np.loadtxt(path, comments="#", ndmin=2)
    except Exception as exc:
        raise CatalogueError(f"cannot read {what} {path}: {exc}") from exc
    if arr.size and arr.shape[1] < ncol:
        raise CatalogueError(f"{what} {path} has {arr.shape[1]} column(s), expected at least {ncol}")
    return arr


def read_authors_sdss(cluster_list_file: str | Path, galaxy_source, *,
                      window: WindowConfig | None = None, galaxy_index: str = "auto") -> Catalogue:
    """Read the authors' public SDSS input (GalWCat19 clusters prepared for their networks).

    Parameters
    ----------
    cluster_list_file : path
        Whitespace text, one cluster a row: ``id, log10 M200c [h^-1 Msun], error [dex]``
        (linear masses, median > 100, are converted to log10 with the error in dex).
    galaxy_source : path or list of paths
        Either one whitespace text file with rows ``cluster_index, x, y, v`` (their
        ``galaxies_XYvZ_*`` file: x, y [h^-1 Mpc], v [km/s], already in their window), or a
        directory / list of per-cluster files with rows ``x, y, v`` whose name ends in the
        cluster id (e.g. ``cluster_17.txt``).
    window : WindowConfig, optional
        Cut the galaxies to this window (e.g. their 4 h^-1 Mpc files for a 1.6 h^-1 Mpc model).
    galaxy_index : {'auto', 'id', 'row'}
        What the first column of a single galaxy file refers to: the cluster id, or the
        1-based row of the cluster list (their script); 'auto' takes ids when all match.

    Returns
    -------
    Catalogue
        Real-data clusters (``split='none'``) with extra columns ``id, log_m_ref,
        log_m_ref_err``; ``redshift`` is NaN (not in the format).
    """
    arr = _read_columns(Path(cluster_list_file), 3, "cluster list")
    ids = arr[:, 0]
    if np.all(ids == np.round(ids)):
        ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ClusterIdError(f"cluster list {cluster_list_file} has duplicated ids")
    m, err = arr[:, 1].astype(float), arr[:, 2].astype(float)
    if len(m) and np.nanmedian(m) > 100:
        err = err / (m * np.log(10.0))
        m = np.log10(m)
    n = len(ids)
    parts = []
    src = galaxy_source
    if isinstance(src, str | Path) and Path(src).is_file():
        g = _read_columns(Path(src), 4, "galaxy file")
        key = g[:, 0]
        if galaxy_index not in ("auto", "id", "row"):
            raise CatalogueError("galaxy_index must be 'auto', 'id' or 'row'")
        id_pos = {v: i for i, v in enumerate(ids.tolist())}
        use_id = galaxy_index == "id" or (galaxy_index == "auto" and all(k in id_pos for k in np.unique(key).tolist()))
        if use_id:
            unknown = [k for k in np.unique(key).tolist() if k not in id_pos]
            if unknown:
                raise CatalogueError(f"galaxy file refers to cluster id(s) not in the list: {unknown[:5]}")
            row = np.array([id_pos[k] for k in key.tolist()], dtype=np.int64)
        else:
            row = key.astype(np.int64) - 1
            if len(row) and (row.min() < 0 or row.max() >= n):
                raise CatalogueError("galaxy file cluster index outside 1..N of the cluster list")
        parts.append(pd.DataFrame({"diagram_id": row, "x_proj": g[:, 1], "y_proj": g[:, 2], "v_los": g[:, 3]}))
    else:
        if isinstance(src, str | Path):
            if not Path(src).is_dir():
                raise CatalogueError(f"galaxy file or directory not found: {src}")
            files = sorted(p for p in Path(src).iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            files = [Path(p) for p in src]
        id_pos = {str(v): i for i, v in enumerate(ids.tolist())}
        for f in files:
            nums = re.findall(r"(\d+)", f.stem)
            if not nums or str(int(nums[-1])) not in id_pos:
                raise CatalogueError(f"cannot match galaxy file {f.name} to a cluster id of the list "
                                     "(its name must end in the id)")
            g = _read_columns(f, 3, "galaxy file")
            parts.append(pd.DataFrame({"diagram_id": id_pos[str(int(nums[-1]))], "x_proj": g[:, 0],
                                       "y_proj": g[:, 1], "v_los": g[:, 2]}))
    gal = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {"diagram_id": np.zeros(0, np.int64), "x_proj": [], "y_proj": [], "v_los": []})
    gal["diagram_id"] = gal["diagram_id"].astype(np.int64)
    if window is not None:
        keep = ((gal["x_proj"].abs() <= window.r_max) & (gal["y_proj"].abs() <= window.r_max)
                & (gal["v_los"].abs() <= window.v_max))
        gal = gal[keep.to_numpy()]
    gal = gal.sort_values("diagram_id", kind="stable").reset_index(drop=True)
    diag = np.arange(n, dtype=np.int64)
    nan = np.full(n, np.nan)
    clusters = pd.DataFrame({
        "diagram_id": diag, "halo_id": diag, "split": "none", "log_m200c": nan, "r200c": nan,
        "v200c": nan, "redshift": nan,
        "n_gal": np.bincount(gal["diagram_id"].to_numpy(), minlength=n).astype(np.int64),
        "n_mem": np.full(n, -1, dtype=np.int64), "id": ids, "log_m_ref": m, "log_m_ref_err": err,
    })
    meta = {"source": "authors-sdss", "cluster_list": str(cluster_list_file),
            "window": window.model_dump() if window is not None else None}
    return Catalogue(clusters, gal, None, meta)
