"""Each cluster's survey galaxies in a model's window, as a catalogue of phase-space diagrams.

Every survey galaxy in each cluster's field is found with a spatial index on the sky (unit
vectors in a ``scipy.spatial.cKDTree``, one ``query_ball_point`` with the chord of each cluster's
angular radius), never by a loop over clusters x galaxies, then projected with
:mod:`clustermass.sky.coords` and cut to the window ``|x|, |y| <= r_max``, ``|v_los| <= v_max``.

Each cluster gets flags: ``edge`` (the field is cut by the survey footprint, estimated from the
galaxies themselves, see :func:`sky_to_catalogue`), ``few_galaxies`` (too few galaxies, or a
degenerate set, for a 3D KDE) and ``outside_training_range`` (beyond the redshift / comoving
distance the model was trained for, when known).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .. import cosmology
from ..catalog import Catalogue
from ..config import WindowConfig
from ..errors import ClusterIdError, CoordinateError, MissingColumnError, SkyInputError, SkyWarning
from .coords import _gnomonic, los_velocity, projected_to_sky, unit_vectors
from .io import COLUMN_ALIASES, _as_frame, resolve_column
from .units import angle_to_degrees, check_magnitudes, check_redshifts, declared_unit, flux_to_mag

FLAG_COLUMNS = ("edge", "few_galaxies", "outside_training_range")


def _check_angles(ra: np.ndarray, dec: np.ndarray, what: str, declared: bool, said_rad: bool = False) -> None:
    """Raise CoordinateError if RA/Dec [deg] are out of range, or (undeclared) look like radians."""
    if len(ra) == 0:
        return
    amax_ra, amax_dec = float(np.max(np.abs(ra))), float(np.max(np.abs(dec)))
    if said_rad and (amax_ra > 360.0 or amax_dec > 90.0):
        raise CoordinateError(
            f"{what} RA/Dec look like degrees (max |RA| = {np.radians(amax_ra):.4g}, max |Dec| = "
            f"{np.radians(amax_dec):.4g}) but radians were said: pass angle_unit='deg'", option="angle_unit")
    if amax_ra > 360.0 or amax_dec > 90.0:
        raise CoordinateError(f"{what} RA/Dec out of range for degrees (|RA| <= 360, |Dec| <= 90): "
                              f"max |RA| = {amax_ra:.4g}, max |Dec| = {amax_dec:.4g}", option="angle_unit")
    if not declared and amax_ra <= 2 * np.pi + 1e-9 and amax_dec <= np.pi / 2 + 1e-9 and len(ra) >= 3:
        raise CoordinateError(
            f"{what} RA/Dec look like radians (all |RA| <= 2 pi, |Dec| <= pi/2) but degrees were "
            "said: pass angle_unit='rad'; if they really are degrees of a small field near RA = 0, "
            "pass check_angles=False", option="angle_unit")


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


def _sky_angles(df, ra_c, dec_c, table, angle_unit, check):
    """RA, Dec [deg] of a table, honouring declared units; checked for range and radians."""
    units = df.attrs.get("units")
    ra_u, dec_u = declared_unit(units, ra_c), declared_unit(units, dec_c)
    ra = angle_to_degrees(_float_column(df, ra_c, table), ra_u, angle_unit, ra_c, table)
    dec = angle_to_degrees(_float_column(df, dec_c, table), dec_u, angle_unit, dec_c, table)
    return ra, dec, ra_u is not None or dec_u is not None


def _galaxy_magnitudes(gal, mag_col, flux_col, flux_unit, need: bool):
    """(apparent r magnitudes or None, the column used). Aliases are tried when ``need``."""
    units = gal.attrs.get("units")
    if mag_col is not None and flux_col is not None:
        raise SkyInputError("give either mag_col or flux_col, not both", option="flux_col")
    if mag_col is None and flux_col is None and need:  # recognise common survey names
        lower = {str(c).lower(): c for c in gal.columns}
        mag_col = next((lower[a] for a in COLUMN_ALIASES["mag"] if a in lower), None)
        if mag_col is None:
            flux_col = next((lower[a] for a in COLUMN_ALIASES["flux"] if a in lower), None)
        if mag_col or flux_col:
            warnings.warn(f"using galaxy column {mag_col or flux_col!r} as r-band "
                          f"{'magnitudes' if mag_col else 'fluxes [' + flux_unit + ']'} for the model's "
                          "flux limit (name another with mag_col / flux_col)", SkyWarning, stacklevel=3)
    if flux_col is not None:
        col = resolve_column(gal, flux_col, "flux", "galaxies", option="flux_col")
        return flux_to_mag(_float_column(gal, col, "galaxies"), flux_unit, col), col
    if mag_col is not None:
        col = resolve_column(gal, mag_col, "mag", "galaxies", option="mag_col")
        mag = _float_column(gal, col, "galaxies")
        check_magnitudes(mag, declared_unit(units, col), col)
        return mag, col
    return None, None


def merge_repeat_spectra(ra, dec, z, mag, radius_arcsec: float = 0.5, dv_kms: float = 500.0):
    """Keep one of each group of spectra of the same galaxy (within ``radius_arcsec`` on the sky
    and ``dv_kms`` in c dz / (1 + z)): the one with a magnitude, else the first row.

    Returns a boolean mask of the rows kept. Repeat spectra (DESI re-observes targets) would
    otherwise count one galaxy twice in the KDE and in the richness.
    """
    keep = np.ones(len(ra), dtype=bool)
    if len(ra) < 2 or radius_arcsec <= 0:
        return keep
    xyz = unit_vectors(np.radians(ra), np.radians(dec))
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    same = np.abs(los_velocity(z[j], z[i])) <= dv_kms
    i, j = i[same], j[same]
    if len(i) == 0:
        return keep
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ra)
    _, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    has_mag = np.isfinite(mag) if mag is not None else np.zeros(n, dtype=bool)
    order = np.lexsort((np.arange(n), ~has_mag, label))  # per group: with magnitude first, then row
    first = np.ones(n, dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    keep[:] = False
    keep[order[first]] = True
    return keep


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
    flux_col: str | None = None,
    flux_unit: str = "nanomaggies",
    mag_limit: float | None = None,
    angle_unit: str = "deg",
    cluster_ra_col: str | None = None,
    cluster_dec_col: str | None = None,
    cluster_z_col: str | None = None,
    distance_max: float | None = None,
    distance_min: float | None = None,
    z_range: tuple[float, float] | None = None,
    min_galaxies: int = 4,
    edge_grid: int = 5,
    edge_min_empty: int = 2,
    footprint: str = "auto",
    merge_radius_arcsec: float = 0.5,
    extra_cols: Sequence[str] = (),
    check_angles: bool = True,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> tuple[Catalogue, pd.DataFrame]:
    """Select each cluster's galaxies in the window and convert them to projected phase space.

    The model expects each cluster's centre to be its brightest central galaxy's position, at the
    cluster's mean redshift: that is how the training mocks are centred (SCIENCE.md sec. 2).

    Parameters
    ----------
    galaxies : DataFrame or astropy Table
        Survey galaxies: RA, Dec, redshift; optionally an apparent r magnitude or flux.
    clusters : DataFrame or astropy Table
        Cluster list: id, RA, Dec of the centre, redshift.
    window : WindowConfig
        The model's window: ``r_max`` [h^-1 Mpc, proper], ``v_max`` [km/s].
    ra_col, dec_col, z_col : str
        Galaxy-table columns (``cluster_*_col`` name the cluster table's; default: the same
        names). When a default name is absent, common aliases (RA, RAJ2000, redshift,
        DESI's ``mean_fiber_ra``/``mean_fiber_dec``, ...) are tried.
    id_col : str
        Cluster id column.
    mag_col, flux_col : str, optional
        Apparent r magnitude [mag], or r flux in ``flux_unit`` (nanomaggies, Jy, uJy, nJy;
        converted to AB magnitudes). With neither, common names (``mag_r``, ``petroMag_r``,
        ``flux_r``, ...) are used when a flux limit is to be applied. A magnitude column that
        looks like fluxes is refused.
    mag_limit : float, optional
        Training flux limit [mag]: galaxies fainter are removed. Galaxies without a magnitude
        (NaN; e.g. bright galaxies whose photometry failed) are kept and counted in a warning.
    angle_unit : {'deg', 'rad'}
        Unit of RA/Dec where the table declares none (FITS/VOTable/ECSV units are honoured:
        ``h`` for RA in hours is converted).
    distance_min, distance_max : float, optional
        Comoving distance range of the training clusters [h^-1 Mpc]; outside it a cluster is
        flagged ``outside_training_range``. ``z_range`` = (z_min, z_max) likewise.
    min_galaxies : int
        Fewest galaxies for a 3D KDE; fewer, or a degenerate (rank < 3) set, sets ``few_galaxies``.
    footprint : {'auto', 'survey', 'none'}
        Footprint test (``edge``): 'survey' estimates the survey mask from the galaxies
        themselves: ``edge`` is set when at least ``edge_min_empty`` of an ``edge_grid`` x
        ``edge_grid`` lattice over the square field have no galaxy (any redshift) within the
        radius holding ~13 galaxies on average. That is meaningless for member lists or compiled
        tables, so 'auto' runs it only when most galaxies lie outside every cluster's window
        (a survey), and 'none' never; without the test ``edge`` is False and ``empty_fraction`` NaN.
    merge_radius_arcsec : float
        Repeat spectra of one galaxy (closer than this, within 500 km/s) are merged into one
        (0 turns it off); the count is reported.
    extra_cols : sequence of str
        Cluster columns copied into the info table (e.g. a published mass and its error).
    check_angles : bool
        Refuse RA/Dec that look like radians when degrees were said.

    Returns
    -------
    catalogue : Catalogue
        One diagram per cluster (``diagram_id`` = row of the cluster list, ``split='none'``,
        truth columns NaN / -1), galaxies with ``x_proj, y_proj`` [h^-1 Mpc], ``v_los`` [km/s]
        and ``galaxy_row`` (row in the input table).
    info : DataFrame
        Per cluster: ``diagram_id, id, ra, dec`` [deg], ``z``, ``comoving_distance``
        [h^-1 Mpc], ``n_gal`` (in window), ``empty_fraction``, the flags.
    """
    gal = _as_frame(galaxies)
    cl = _as_frame(clusters)
    if footprint not in ("auto", "survey", "none"):
        raise SkyInputError(f"footprint must be 'auto', 'survey' or 'none', not {footprint!r}", option="footprint")
    # ---- columns
    g_ra = resolve_column(gal, ra_col, "ra", "galaxies", "ra", option="ra_col")
    g_dec = resolve_column(gal, dec_col, "dec", "galaxies", "dec", option="dec_col")
    g_z = resolve_column(gal, z_col, "z", "galaxies", "z", option="z_col")
    c_ra = resolve_column(cl, cluster_ra_col or ra_col, "ra", "clusters", "ra", option="cluster_ra_col")
    c_dec = resolve_column(cl, cluster_dec_col or dec_col, "dec", "clusters", "dec", option="cluster_dec_col")
    c_z = resolve_column(cl, cluster_z_col or z_col, "z", "clusters", "z", option="cluster_z_col")
    c_id = resolve_column(cl, id_col, "id", "clusters", "id", option="id_col")
    for col in extra_cols:
        if col not in cl.columns:
            raise MissingColumnError(f"clusters table has no column {col!r} (asked to keep it)")

    # ---- clusters: ids and coordinates must be complete, in known units
    ids = cl[c_id].reset_index(drop=True)
    _check_cluster_ids(ids)
    cra, cdec, c_declared = _sky_angles(cl, c_ra, c_dec, "clusters", angle_unit, check_angles)
    cz = _float_column(cl, c_z, "clusters")
    bad = ~(np.isfinite(cra) & np.isfinite(cdec) & np.isfinite(cz))
    if bad.any():
        shown = ", ".join(map(str, ids[bad].tolist()[:5]))
        raise CoordinateError(f"{int(bad.sum())} cluster(s) have NaN/inf RA, Dec or redshift (id {shown}); "
                              "fix or remove them")
    check_redshifts(cz, declared_unit(cl.attrs.get("units"), c_z), c_z, "clusters", "cluster_z_col")
    if (cz <= 0).any():
        shown = ", ".join(map(str, ids[cz <= 0].tolist()[:5]))
        raise CoordinateError(f"cluster redshift(s) must be positive (id {shown})", option="cluster_z_col")

    # ---- galaxies: drop rows without position or redshift (with a warning), check units
    gra, gdec, g_declared = _sky_angles(gal, g_ra, g_dec, "galaxies", angle_unit, check_angles)
    gz = _float_column(gal, g_z, "galaxies")
    gmag, g_mag = _galaxy_magnitudes(gal, mag_col, flux_col, flux_unit, need=mag_limit is not None)
    good = np.isfinite(gra) & np.isfinite(gdec) & np.isfinite(gz)
    check_redshifts(gz[good], declared_unit(gal.attrs.get("units"), g_z), g_z, "galaxies", "z_col")
    n_nan = int((~good).sum())
    if n_nan:
        warnings.warn(f"dropped {n_nan} of {len(good)} galaxies with NaN/inf RA, Dec or redshift",
                      SkyWarning, stacklevel=2)
    if check_angles:
        said_rad = angle_unit == "rad"
        _check_angles(cra, cdec, "clusters", c_declared or said_rad, said_rad and not c_declared)
        _check_angles(gra[good], gdec[good], "galaxies", g_declared or said_rad, said_rad and not g_declared)
    # ---- repeat spectra of one galaxy
    n_merged = 0
    if merge_radius_arcsec > 0 and good.sum() > 1:
        idx = np.flatnonzero(good)
        keep = merge_repeat_spectra(gra[idx], gdec[idx], gz[idx], gmag[idx] if gmag is not None else None,
                                    merge_radius_arcsec)
        n_merged = int((~keep).sum())
        if n_merged:
            good[idx[~keep]] = False
            warnings.warn(f"merged {n_merged} repeat spectra (within {merge_radius_arcsec:g} arcsec and "
                          "500 km/s of another spectrum) into one galaxy each", SkyWarning, stacklevel=2)
    # ---- flux limit
    n_faint = n_no_mag = 0
    if mag_limit is not None:
        if gmag is not None:
            faint = good & (gmag > mag_limit)
            n_faint = int(faint.sum())
            n_no_mag = int((good & ~np.isfinite(gmag)).sum())
            if n_faint:
                warnings.warn(f"the survey is deeper than the model's training flux limit: removed "
                              f"{n_faint} galaxies fainter than {mag_limit:g} mag", SkyWarning, stacklevel=2)
            if n_no_mag:
                warnings.warn(f"kept {n_no_mag} galaxies without a magnitude ({g_mag!r} is NaN or the flux "
                              "non-positive): their depth cannot be checked", SkyWarning, stacklevel=2)
            good &= ~faint
        else:
            warnings.warn(f"the model was trained with a flux limit of {mag_limit:g} mag; without a "
                          f"magnitude or flux column the survey depth cannot be checked or matched",
                          SkyWarning, stacklevel=2)
    grow = np.flatnonzero(good)
    to_rad = np.pi / 180.0
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
    share_in_windows = len(np.unique(pairs_gal[in_window])) / max(len(grow), 1)
    run_footprint = footprint == "survey" or (footprint == "auto" and share_in_windows < 0.5)
    if footprint == "auto" and not run_footprint and n_cl:
        warnings.warn(f"{share_in_windows:.0%} of the galaxies lie in a cluster window: the table looks like "
                      "member lists, not a survey, so the footprint edge is not estimated (edge = False; "
                      "footprint='survey' forces it)", SkyWarning, stacklevel=2)
    if run_footprint:
        empty = _empty_fraction(tree, cra, cdec, cz, window, edge_grid, cosmo)
        edge = empty * edge_grid**2 >= edge_min_empty - 1e-9
    else:
        empty, edge = np.full(n_cl, np.nan), np.zeros(n_cl, dtype=bool)
    sel_cl, sel_gal = pairs_cl[in_window], pairs_gal[in_window]
    xs, ys, vs = x[in_window], y[in_window], v[in_window]
    few = (n_gal < max(min_galaxies, 4)) | rank_deficient(sel_cl, xs / window.r_max, ys / window.r_max,
                                                       vs / window.v_max, n_cl)
    chi = cosmology.comoving_distance(cz, cosmo)
    outside = np.zeros(n_cl, dtype=bool)
    if distance_max is not None:
        outside |= chi > distance_max * (1 + 1e-9)
    if distance_min is not None:
        outside |= chi < distance_min * (1 - 1e-9)
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
        "n_galaxies_fainter_than_limit": n_faint, "n_galaxies_without_magnitude": n_no_mag,
        "n_repeat_spectra_merged": n_merged, "magnitude_column": g_mag,
        "footprint_estimated": bool(run_footprint), "cosmology": cosmo,
    }
    cat = Catalogue(clusters_out, galaxies_out, None, meta)
    info = pd.DataFrame({
        "diagram_id": diag, "id": ids.to_numpy(), "ra": cra, "dec": cdec, "z": cz,
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


def _empty_fraction(tree, cra, cdec, cz, window, n: int, cosmo: str) -> np.ndarray:
    """Fraction of an n x n lattice over each cluster's square field with no galaxy nearby."""
    if tree is None:
        return np.ones(len(cra))
    rho = footprint_radius(tree)
    g = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    gx, gy = np.meshgrid(g * window.r_max, g * window.r_max)
    ra, dec = projected_to_sky(gx.ravel()[None, :], gy.ravel()[None, :], cra[:, None], cdec[:, None],
                               cz[:, None], cosmo=cosmo)
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


def rank_deficient(cl: np.ndarray, x: np.ndarray, y: np.ndarray, v: np.ndarray, n: int,
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
