"""The catalogue data model: a directory with ``clusters.parquet`` and ``galaxies.parquet``.

One row of ``clusters`` is one projected phase-space diagram (a cluster seen along one sight
line); ``galaxies`` holds every galaxy of every diagram, sorted by ``diagram_id``. Mock
catalogues may add ``halos.parquet``: the other halos inside each diagram's cylinder, for the
interloper-contamination analysis. Units (SCIENCE.md): masses log10(M200c / h^-1 Msun),
projected proper distances h^-1 Mpc, velocities km/s. They are written into the parquet
metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._io import atomic_path, atomic_write, write_json_atomic
from .errors import CatalogueError

#: required columns -> (dtype kind, unit, description)
CLUSTER_COLUMNS: dict[str, tuple[str, str, str]] = {
    "diagram_id": ("i", "", "row id of the phase-space diagram"),
    "halo_id": ("i", "", "id of the cluster halo (several sight lines share it)"),
    "split": ("O", "", "train / test / eval (or 'none' for real data)"),
    "log_m200c": ("f", "log10(h^-1 Msun)", "true log10 M200c, NaN when unknown"),
    "r200c": ("f", "h^-1 Mpc", "R200c, proper"),
    "v200c": ("f", "km/s", "circular velocity at R200c"),
    "redshift": ("f", "", "cosmological redshift of the cluster"),
    "n_gal": ("i", "", "galaxies in the diagram (inside the window)"),
    "n_mem": ("i", "", "true members in the diagram (-1 when unknown)"),
}
GALAXY_COLUMNS: dict[str, tuple[str, str, str]] = {
    "diagram_id": ("i", "", "diagram the galaxy belongs to"),
    "x_proj": ("f", "h^-1 Mpc", "sky-plane offset from the centre, proper"),
    "y_proj": ("f", "h^-1 Mpc", "sky-plane offset from the centre, proper"),
    "v_los": ("f", "km/s", "line-of-sight velocity relative to the centre incl. Hubble flow"),
}
#: optional galaxy columns written by mocks
GALAXY_MOCK_COLUMNS: dict[str, tuple[str, str, str]] = {
    "is_member": ("b", "", "true member of the cluster halo (inside its R200c)"),
    "host_halo_id": ("i", "", "id of the halo hosting the galaxy"),
    "host_log_m200c": ("f", "log10(h^-1 Msun)", "log10 M200c of the host halo"),
    "mag_r": ("f", "mag", "apparent r-band magnitude"),
}
#: optional halos table (mock truth for the contamination analysis)
HALO_COLUMNS: dict[str, tuple[str, str, str]] = {
    "diagram_id": ("i", "", "diagram whose cylinder holds the halo"),
    "halo_id": ("i", "", "halo id"),
    "log_m200c": ("f", "log10(h^-1 Msun)", "log10 M200c"),
    "x_proj": ("f", "h^-1 Mpc", "projected offset from the diagram centre"),
    "y_proj": ("f", "h^-1 Mpc", "projected offset from the diagram centre"),
    "v_los": ("f", "km/s", "line-of-sight velocity offset incl. Hubble flow"),
}

UNITS = {
    **{k: v[1] for k, v in CLUSTER_COLUMNS.items()},
    **{k: v[1] for k, v in GALAXY_COLUMNS.items()},
    **{k: v[1] for k, v in GALAXY_MOCK_COLUMNS.items()},
}


def _check_table(df: pd.DataFrame, spec: dict, name: str, optional: dict | None = None) -> None:
    missing = [c for c in spec if c not in df.columns]
    if missing:
        raise CatalogueError(
            f"{name} is missing required column(s): {', '.join(missing)} "
            f"(required: {', '.join(spec)})"
        )
    for col, (kind, _, _) in {**spec, **(optional or {})}.items():
        if col not in df.columns:
            continue
        k = df[col].dtype.kind
        ok = {
            "i": k in "iu",
            "f": k in "fiu",
            "b": k in "b",
            "O": k in "OSUT" or isinstance(df[col].dtype, pd.StringDtype),
        }[kind]
        if not ok:
            raise CatalogueError(f"{name} column {col!r} has dtype {df[col].dtype}, expected kind {kind!r}")


@dataclass
class Catalogue:
    """Clusters (one row per diagram) and their galaxies.

    Attributes
    ----------
    clusters : DataFrame indexed 0..n-1 with the CLUSTER_COLUMNS (diagram_id unique).
    galaxies : DataFrame with the GALAXY_COLUMNS, sorted by diagram_id.
    halos : optional DataFrame with the HALO_COLUMNS (mock truth).
    meta : free-form provenance (simulator config, seed, ...), stored in the parquet metadata.
    """

    clusters: pd.DataFrame
    galaxies: pd.DataFrame
    halos: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        if not self.galaxies["diagram_id"].is_monotonic_increasing:
            self.galaxies = self.galaxies.sort_values("diagram_id", kind="stable").reset_index(drop=True)
        self.clusters = self.clusters.reset_index(drop=True)
        self._offsets: np.ndarray | None = None

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise CatalogueError naming the first missing or malformed column."""
        _check_table(self.clusters, CLUSTER_COLUMNS, "clusters table")
        _check_table(self.galaxies, GALAXY_COLUMNS, "galaxies table", GALAXY_MOCK_COLUMNS)
        if self.halos is not None:
            _check_table(self.halos, HALO_COLUMNS, "halos table")
        ids = self.clusters["diagram_id"].to_numpy()
        if len(np.unique(ids)) != len(ids):
            raise CatalogueError("clusters table has duplicated diagram_id values")
        # galaxy checks run chunk by chunk: a memory-mapped table is never copied whole
        gid = self.galaxies["diagram_id"].to_numpy()
        bad = _first_rows(len(gid), lambda sl: ~np.isin(gid[sl], ids))
        if len(bad):
            raise CatalogueError(f"galaxies refer to diagram_id(s) not in clusters: {gid[bad].tolist()}")
        for col in ("x_proj", "y_proj", "v_los"):
            vals = self.galaxies[col].to_numpy()
            bad = _first_rows(len(vals), lambda sl, vals=vals: ~np.isfinite(vals[sl]))
            if len(bad):
                raise CatalogueError(f"galaxies column {col!r} has NaN/inf values (diagram_id {gid[bad].tolist()})")
        for col in ("n_gal", "n_mem"):
            vals = self.clusters[col].to_numpy()
            low = -1 if col == "n_mem" else 0
            if len(vals) and vals.min() < low:
                bad = self.clusters["diagram_id"].to_numpy()[vals < low][:5]
                raise CatalogueError(f"clusters column {col!r} must be >= {low} (diagram_id {bad.tolist()})")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.clusters)

    @property
    def offsets(self) -> np.ndarray:
        """(n, 2) row ranges: the galaxies of cluster row i are ``galaxies[offsets[i, 0]:offsets[i, 1]]``."""
        if self._offsets is None:
            gid = self.galaxies["diagram_id"].to_numpy()
            cid = self.clusters["diagram_id"].to_numpy()
            self._offsets = np.stack([np.searchsorted(gid, cid, side="left"),
                                      np.searchsorted(gid, cid, side="right")], axis=1)
        return self._offsets

    def points(self, row: int, columns=("x_proj", "y_proj", "v_los")) -> np.ndarray:
        """(N, len(columns)) float64 array of the galaxies of cluster row ``row``."""
        s, e = self.offsets[row]
        return np.column_stack([self._galaxy_array(c)[s:e] for c in columns])

    def _galaxy_array(self, col: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_arrays", {})
        if col not in cache:
            cache[col] = self.galaxies[col].to_numpy(dtype=np.float64)
        return cache[col]

    def rows(self, split: str | None = None) -> np.ndarray:
        """Cluster row indices, optionally of one split."""
        if split is None:
            return np.arange(len(self.clusters))
        return np.flatnonzero(self.clusters["split"].to_numpy() == split)

    def subset(self, rows) -> Catalogue:
        """A new catalogue with the given cluster rows and their galaxies (and halos)."""
        rows = np.asarray(rows)
        cl = self.clusters.iloc[rows].reset_index(drop=True)
        ids = cl["diagram_id"].to_numpy()
        gal = self.galaxies[np.isin(self.galaxies["diagram_id"].to_numpy(), ids)].reset_index(drop=True)
        halos = None
        if self.halos is not None:
            halos = self.halos[np.isin(self.halos["diagram_id"].to_numpy(), ids)].reset_index(drop=True)
        return Catalogue(cl, gal, halos, dict(self.meta))

    def data_hash(self) -> str:
        """Short content hash of the clusters and galaxies (recorded in model bundles).

        Computed once, like :attr:`offsets`: a catalogue is not modified after construction.
        The row hashes are computed :data:`CHUNK_ROWS` rows at a time (the same bytes as for the
        whole table: ``hash_pandas_object`` hashes each row on its own).
        """
        if "_hash" not in self.__dict__:
            import hashlib

            h = hashlib.sha256()
            for df in (self.clusters, self.galaxies):
                for a in range(0, len(df), CHUNK_ROWS):
                    h.update(pd.util.hash_pandas_object(df.iloc[a : a + CHUNK_ROWS], index=False).to_numpy().tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash


#: rows per chunk of the galaxy checks and hashes (bounds their temporary memory)
CHUNK_ROWS = 1 << 20


def _first_rows(n: int, is_bad, limit: int = 5) -> np.ndarray:
    """The first (at most ``limit``) row indices below ``n`` flagged by ``is_bad(slice)``,
    scanning :data:`CHUNK_ROWS` rows at a time."""
    found: list[int] = []
    for a in range(0, n, CHUNK_ROWS):
        idx = np.flatnonzero(is_bad(slice(a, min(n, a + CHUNK_ROWS)))) + a
        found.extend(idx[: limit - len(found)].tolist())
        if len(found) >= limit:
            break
    return np.asarray(found, dtype=np.int64)


# ---------------------------------------------------------------------- I/O
def _table_with_units(df: pd.DataFrame, spec_units: dict, meta: dict) -> pa.Table:
    table = pa.Table.from_pandas(df, preserve_index=False)
    units = {c: spec_units.get(c, "") for c in df.columns}
    md = dict(table.schema.metadata or {})
    md[b"clustermass.units"] = json.dumps(units).encode()
    md[b"clustermass.meta"] = json.dumps(meta, default=str).encode()
    fields = [
        f.with_metadata({b"unit": units.get(f.name, "").encode()}) for f in table.schema
    ]
    return table.cast(pa.schema(fields, metadata=md))


def write_parquet(df: pd.DataFrame, path: str | Path, meta: dict | None = None) -> Path:
    """Write a DataFrame as parquet atomically, with column units in the metadata."""
    units = {**UNITS, **{k: v[1] for k, v in HALO_COLUMNS.items()}}
    table = _table_with_units(df, units, meta or {})
    return atomic_write(path, lambda p: pq.write_table(table, p))


def _start_catalogue(directory: str | Path, with_halos: bool) -> Path:
    """Prepare ``directory`` for a new catalogue: drop the completion markers (clusters table,
    catalogue.json) of any earlier one, and its halos table when the new one has none."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("clusters.parquet", "catalogue.json") + (() if with_halos else ("halos.parquet",)):
        (directory / name).unlink(missing_ok=True)
    return directory


def write_catalogue(cat: Catalogue, directory: str | Path) -> Path:
    """Write ``clusters.parquet``, ``galaxies.parquet`` (and ``halos.parquet``) into ``directory``."""
    directory = _start_catalogue(directory, with_halos=cat.halos is not None)
    write_parquet(cat.galaxies, directory / "galaxies.parquet", cat.meta)
    if cat.halos is not None:
        write_parquet(cat.halos, directory / "halos.parquet", cat.meta)
    # clusters last: its presence marks a complete catalogue
    write_parquet(cat.clusters, directory / "clusters.parquet", cat.meta)
    write_json_atomic(directory / "catalogue.json", {"n_diagrams": len(cat), **cat.meta})
    return directory


def write_catalogue_chunks(chunks, directory: str | Path, meta: dict | None = None) -> Path:
    """Stream ``(clusters, galaxies, halos)`` chunks into a catalogue directory.

    Memory holds one chunk at a time (each becomes a parquet row group), so catalogues larger
    than memory can be written; the result reads back with :func:`read_catalogue` exactly like
    one written by :func:`write_catalogue`. Files appear atomically when every chunk is written.
    """
    from contextlib import ExitStack

    directory = _start_catalogue(directory, with_halos=True)
    meta = meta or {}
    units = {**UNITS, **{k: v[1] for k, v in HALO_COLUMNS.items()}}
    names = ("clusters", "galaxies", "halos")
    n = 0
    with ExitStack() as stack:
        # exits run in reverse: the writers close, then halos, galaxies and (last) clusters move into place
        tmp = {name: stack.enter_context(atomic_path(directory / f"{name}.parquet")) for name in names}
        writers: dict[str, pq.ParquetWriter] = {}
        for chunk in chunks:
            for name, df in zip(names, chunk, strict=True):
                table = _table_with_units(df, units, meta)
                if name not in writers:
                    writers[name] = stack.enter_context(pq.ParquetWriter(tmp[name], table.schema))
                writers[name].write_table(table.cast(writers[name].schema))
            n += len(chunk[0])
        if len(writers) < len(names):
            raise CatalogueError("no chunk to write: the catalogue would be empty")
    write_json_atomic(directory / "catalogue.json", {"n_diagrams": n, **meta})
    return directory


def read_catalogue(directory: str | Path, galaxies_max_gb: float | None = None) -> Catalogue:
    """Read and validate a catalogue directory written by :func:`write_catalogue`.

    With ``galaxies_max_gb`` [GB], a galaxies table larger than that (uncompressed, from the
    parquet metadata) is served from a memory-mapped store (:func:`galaxy_store`) instead of
    being read into memory; the catalogue behaves the same (same values, same :meth:`~Catalogue.data_hash`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogueError(f"catalogue directory not found: {directory}")
    paths = {n: directory / f"{n}.parquet" for n in ("clusters", "galaxies", "halos")}
    for n in ("clusters", "galaxies"):
        if not paths[n].is_file():
            raise CatalogueError(f"{directory} has no {n}.parquet (not a clustermass catalogue)")
    try:
        cl_table = pq.read_table(paths["clusters"])
        clusters = cl_table.to_pandas()
        galaxies = None
        if galaxies_max_gb is not None and _uncompressed_gb(paths["galaxies"]) > galaxies_max_gb:
            galaxies = galaxy_store(paths["galaxies"])
        if galaxies is None:
            galaxies = pq.read_table(paths["galaxies"]).to_pandas()
        halos = pq.read_table(paths["halos"]).to_pandas() if paths["halos"].is_file() else None
    except Exception as exc:
        raise CatalogueError(f"cannot read catalogue in {directory}: {exc}") from exc
    md = cl_table.schema.metadata or {}
    meta = json.loads(md.get(b"clustermass.meta", b"{}"))
    for name, path in paths.items():
        if path.is_file():
            check_declared_units(units_of(path), f"{name}.parquet")
    cat = Catalogue(clusters, galaxies, halos, meta)
    warn_implausible_units(cat.galaxies)
    return cat


def _uncompressed_gb(path: Path) -> float:
    """Uncompressed size [GB] of a parquet file's data, from its metadata."""
    md = pq.ParquetFile(path).metadata
    return sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / 1e9


#: subdirectory of a catalogue holding its memory-mapped galaxy store
GALAXY_STORE = ".galaxy-store"


def galaxy_store(path: str | Path) -> pd.DataFrame | None:
    """The galaxies table of ``path`` (``galaxies.parquet``) as a DataFrame of read-only
    memory-mapped columns, or None when it cannot be stored that way.

    The store (``.galaxy-store/`` next to ``path``: one ``.npy`` file per column and
    ``store.json``) is written by streaming the parquet file 65 536 rows at a time (with
    ``pre_buffer=False``, so Arrow keeps no read-ahead), each file moved into place atomically
    and ``store.json`` last; it is reused while ``store.json`` records the current parquet
    file's size and modification time, or, when those changed, its SHA-256 (the file is then
    only hashed, not decoded). Only galaxies sorted by ``diagram_id`` with numeric or boolean columns
    free of nulls are stored (the dtypes pandas gives the whole table); for any other table the
    result is None and the caller reads it whole.
    """
    import hashlib

    path = Path(path)
    store = path.parent / GALAXY_STORE
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]  # unchanged file: no need to read it again
    manifest = store / "store.json"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("stamp") != stamp:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        digest = h.hexdigest()
        if info.get("sha256") != digest:
            info = _write_galaxy_store(path, store, {"sha256": digest, "stamp": stamp})
            if info is None:
                return None
        else:  # touched, same content
            info["stamp"] = stamp
            write_json_atomic(manifest, info)
    # plain ndarray views of the mapped files (not np.memmap: pandas then sees ordinary arrays)
    cols = {c: np.asarray(np.load(store / f"{c}.npy", mmap_mode="r")) for c in info["columns"]}
    return pd.DataFrame(cols, copy=False)


class _NotStorable(Exception):
    """The galaxies table cannot be memory-mapped column by column (read it whole)."""


def _write_galaxy_store(path: Path, store: Path, key: dict) -> dict | None:
    """Stream ``path`` into ``store`` (see :func:`galaxy_store`); its manifest (``key`` plus the
    columns), or None."""
    from contextlib import ExitStack

    pf = pq.ParquetFile(path, pre_buffer=False)
    n = pf.metadata.num_rows
    (store / "store.json").unlink(missing_ok=True)
    dtypes: dict = {}
    last = None
    try:
        # exits run in reverse: the files close, then move into place (or, on an exception, go)
        with ExitStack() as stack:
            files: dict = {}
            for rb in pf.iter_batches(batch_size=1 << 16):
                df = rb.to_pandas()
                if not files:
                    dtypes = {c: df[c].dtype for c in df.columns}
                    if "diagram_id" not in dtypes or not all(
                            isinstance(d, np.dtype) and d.kind in "biuf" for d in dtypes.values()):
                        raise _NotStorable
                    for c, d in dtypes.items():
                        f = stack.enter_context(stack.enter_context(atomic_path(store / f"{c}.npy")).open("wb"))
                        np.lib.format.write_array_header_2_0(
                            f, {"descr": np.lib.format.dtype_to_descr(d), "fortran_order": False, "shape": (n,)})
                        files[c] = f
                if {c: df[c].dtype for c in df.columns} != dtypes:  # e.g. nulls in an integer column
                    raise _NotStorable
                ids = df["diagram_id"].to_numpy()
                if len(ids) and ((np.diff(ids) < 0).any() or (last is not None and ids[0] < last)):
                    raise _NotStorable  # unsorted: read whole (and sorted) by the caller
                last = ids[-1] if len(ids) else last
                for c, f in files.items():
                    f.write(np.ascontiguousarray(df[c].to_numpy()).tobytes())
            if not files:
                raise _NotStorable
    except _NotStorable:
        return None
    info = {**key, "columns": list(dtypes), "n_rows": n}
    write_json_atomic(store / "store.json", info)
    return info


def check_declared_units(declared: dict, what: str) -> None:
    """Refuse columns whose declared unit differs from the catalogue format's (e.g. kpc, m/s)."""
    for col, unit in declared.items():
        want = UNITS.get(col)
        if want is not None and unit and unit != want:
            raise CatalogueError(f"{what}: column {col!r} is in {unit!r}, the catalogue format needs "
                                 f"{want!r}; convert it (SCIENCE.md units)")


#: typical scale of the galaxy columns in their units, and what a wrong unit would give
_PLAUSIBLE = {"x_proj": (20.0, "h^-1 Mpc", "kpc"), "y_proj": (20.0, "h^-1 Mpc", "kpc"),
              "v_los": (2.0e4, "km/s", "m/s")}


def warn_implausible_units(galaxies: pd.DataFrame) -> None:
    """Warn when the spread of positions or velocities is implausible for the declared units.

    Phase-space windows are a few h^-1 Mpc and a few thousand km/s wide; a median |value| far
    above that means kpc instead of Mpc or m/s instead of km/s.
    """
    import warnings

    from .errors import UnitWarning

    for col, (limit, unit, wrong) in _PLAUSIBLE.items():
        vals = galaxies[col].to_numpy(dtype=float)
        # the median exceeds the limit only if at least half of the values do: count them chunk by
        # chunk, and take the median (a copy of the column) only then
        above = sum(int(np.count_nonzero(np.abs(vals[a : a + CHUNK_ROWS]) > limit))
                    for a in range(0, len(vals), CHUNK_ROWS))
        if len(vals) and 2 * above >= len(vals) and (med := np.median(np.abs(vals))) > limit:
            warnings.warn(f"galaxies column {col!r} has median |value| {med:.3g}, "
                          f"implausible in {unit} (is it in {wrong}?)", UnitWarning, stacklevel=3)


def units_of(path: str | Path) -> dict[str, str]:
    """Column units stored in a parquet file written by this package."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(b"clustermass.units", b"{}"))


# ---------------------------------------------------------------------- training helpers
def halo_split(catalogue: Catalogue, rows, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split cluster ``rows`` into (train, validation) by halo.

    ``round(val_fraction * n_halos)`` halos (at least 1, at most n_halos - 1), drawn with
    ``numpy.random.default_rng(seed)``, go to validation with all their sight lines.

    Returns
    -------
    (train_rows, val_rows), both sorted.
    """
    rows = np.asarray(rows)
    halo = catalogue.clusters["halo_id"].to_numpy()[rows]
    uniq = np.unique(halo)
    if len(uniq) < 2:
        raise CatalogueError(
            f"the train split has {len(uniq)} halo(s); a validation set drawn by halo needs at least 2"
        )
    n_val = min(max(1, round(val_fraction * len(uniq))), len(uniq) - 1)
    val_halos = np.random.default_rng(seed).choice(uniq, size=n_val, replace=False)
    is_val = np.isin(halo, val_halos)
    return np.sort(rows[~is_val]), np.sort(rows[is_val])


def train_validation_split(catalogue: Catalogue, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, validation rows, log10 M200c of every cluster) of the ``train`` split, split by
    halo (:func:`halo_split`); raises CatalogueError without a train split or with NaN masses."""
    rows = catalogue.rows("train")
    if len(rows) == 0:
        raise CatalogueError("the catalogue has no 'train' split to train on")
    logm = catalogue.clusters["log_m200c"].to_numpy(dtype=np.float64)
    if not np.isfinite(logm[rows]).all():
        raise CatalogueError("training needs true masses, but the 'train' split has NaN log_m200c")
    return *halo_split(catalogue, rows, val_fraction, seed), logm


def training_data_range(catalogue: Catalogue) -> dict:
    """Where a model trained on ``catalogue`` may be applied: its flux limit, distances, masses.

    From the simulation settings in the catalogue's metadata (``mag_limit`` [mag],
    ``distance_min``/``distance_max`` [h^-1 Mpc, comoving], ``log_m_min``/``log_m_max``) and, when
    known, the redshift range of its clusters (``z_min``, ``z_max``).
    """
    sim = catalogue.meta.get("simulation") or {}
    out = {k: v for k, v in sim.items()
           if k in ("mag_limit", "distance_min", "distance_max", "log_m_min", "log_m_max")}
    z = catalogue.clusters["redshift"].to_numpy(dtype=float)
    if np.isfinite(z).any():
        out["z_min"], out["z_max"] = float(np.nanmin(z)), float(np.nanmax(z))
    return out
