"""Reading survey tables (FITS, CSV, ECSV, VOTable, parquet, text) and the authors' SDSS input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..catalog import Catalogue
from ..config import WindowConfig
from ..errors import CatalogueError, ClusterIdError, MissingColumnError

#: names tried (case-insensitively) when a default column name is absent
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "ra": ("ra", "ra_deg", "raj2000", "_raj2000", "ra_j2000", "alpha", "ra_gal", "ra_cl", "radeg",
           "mean_fiber_ra", "target_ra", "plug_ra", "ra_bcg"),
    "dec": ("dec", "dec_deg", "dej2000", "_dej2000", "decj2000", "dec_j2000", "de", "delta",
            "dec_gal", "dec_cl", "dedeg", "mean_fiber_dec", "target_dec", "plug_dec", "dec_bcg"),
    "z": ("z", "redshift", "zspec", "z_spec", "zobs", "z_obs", "zhelio", "z_helio", "zcmb",
          "z_cmb", "z_cl", "zcl", "z_noqso", "zbest", "z_best"),
    "id": ("id", "cluster_id", "clusterid", "cid", "name", "objid", "gid", "galwcat_id"),
    # SDSS (petroMag_r, modelMag_r, cModelMag_r), DESI-style (mag_r), generic names
    "mag": ("mag_r", "r", "rmag", "r_mag", "petromag_r", "modelmag_r", "cmodelmag_r", "dered_r",
            "mag_ab_r", "r_ab"),
    # DESI and SDSS fluxes in nanomaggies
    "flux": ("flux_r", "r_flux", "flux_r_nmgy"),
}


def _as_frame(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):  # astropy Table
        return _astropy_to_pandas(table)
    return pd.DataFrame(table)


def resolve_column(df: pd.DataFrame, requested: str | None, kind: str, table: str,
                   default: str | None = None, option: str | None = None) -> str:
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
    option = option or f"{kind}_col"
    cols = ", ".join(map(str, list(df.columns)[:30]))
    raise MissingColumnError(
        f"{table} table has no {kind} column {requested!r} (columns: {cols}); name the right one "
        f"with {option}", option=option,
    )



def _astropy_to_pandas(table) -> pd.DataFrame:
    """A DataFrame of the 1D columns; declared units kept in ``df.attrs["units"]``."""
    cols, units = {}, {}
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
        if getattr(col, "unit", None) is not None:
            units[name] = col.unit.to_string()
    df = pd.DataFrame(cols)
    df.attrs["units"] = units
    return df


def read_table(path: str | Path, format: str | None = None) -> pd.DataFrame:
    """Read a table (FITS, CSV, ECSV, VOTable, parquet, whitespace text) into a DataFrame.

    Units declared by the table (FITS ``TUNIT``, VOTable and ECSV units) are kept in
    ``df.attrs["units"]`` ({column: unit string}) and honoured by :func:`sky_to_catalogue`.
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
