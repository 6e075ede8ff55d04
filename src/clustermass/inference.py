"""Posterior masses for new data with a calibrated bundle (catalogues or sky tables), and their
comparison with published masses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .catalog import Catalogue, read_catalogue, write_parquet
from .errors import CatalogueError, ClustermassError

POSTERIOR_COLUMNS = ("d_pred", "log_m_map", "log_m_median", "log_m_mean", "log_m_lo1", "log_m_hi1",
                     "log_m_lo2", "log_m_hi2", "out_of_range")


#: flags of a diagram that make its posterior untrustworthy; flagged rows get NaN posteriors
#: except ``outside_training_range`` (the network still runs; the posterior is an extrapolation)
INPUT_FLAGS = ("few_galaxies", "degenerate", "outside_window", "outside_training_range")


def diagram_flags(cat: Catalogue, window, rows=None, training_data: dict | None = None,
                  min_galaxies: int = 4) -> pd.DataFrame:
    """Per diagram: can the network be trusted on it?

    - ``few_galaxies``: fewer than ``min_galaxies`` galaxies inside the model's window;
    - ``degenerate``: the galaxies in the window span fewer than 3 dimensions (all at one point,
      on a line or a plane), so no 3D KDE exists;
    - ``outside_window``: the diagram has galaxies, but none inside the window (wrong units, or
      not centred on the cluster);
    - ``outside_training_range``: the cluster's comoving distance (from its redshift) lies outside
      the distances of the training mocks (``training_data`` of the bundle), when both are known.
    """
    from . import cosmology
    from .sky.select import rank_deficient

    rows = cat.rows() if rows is None else np.asarray(rows)
    n = len(rows)
    off = cat.offsets[rows]
    counts = off[:, 1] - off[:, 0]
    idx = np.concatenate([np.arange(s, e) for s, e in off]) if n else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(n), counts)
    g = {c: cat.galaxies[c].to_numpy(dtype=float)[idx] for c in ("x_proj", "y_proj", "v_los")}
    inside = ((np.abs(g["x_proj"]) <= window.r_max) & (np.abs(g["y_proj"]) <= window.r_max)
              & (np.abs(g["v_los"]) <= window.v_max))
    n_in = np.bincount(owner[inside], minlength=n)
    degenerate = rank_deficient(owner[inside], g["x_proj"][inside] / window.r_max,
                             g["y_proj"][inside] / window.r_max, g["v_los"][inside] / window.v_max, n)
    outside_range = np.zeros(n, dtype=bool)
    td = training_data or {}
    z = cat.clusters["redshift"].to_numpy(dtype=float)[rows]
    known = np.isfinite(z) & (z > 0)
    if known.any() and ("distance_max" in td or "distance_min" in td):
        chi = np.full(n, np.nan)
        chi[known] = cosmology.comoving_distance(z[known])
        with np.errstate(invalid="ignore"):
            outside_range = (chi > td.get("distance_max", np.inf) * (1 + 1e-9)) | (
                chi < td.get("distance_min", 0.0) * (1 - 1e-9))
    return pd.DataFrame({
        "few_galaxies": n_in < min_galaxies,
        "degenerate": degenerate | ((n_in > 0) & (n_in < 4)),
        "outside_window": (counts > 0) & (n_in == 0),
        "outside_training_range": outside_range,
    })


def posterior_table(bundle, cat: Catalogue, rows=None, info: pd.DataFrame | None = None,
                    progress: bool = False, prior: str = "flat", *, calibration=None, d_pred=None,
                    window=None) -> pd.DataFrame:
    """The posterior of every diagram: the one builder of posterior tables (DESIGN.md columns).

    Parameters
    ----------
    bundle : ModelBundle
        A calibrated bundle (raises BundleError otherwise).
    cat : Catalogue
        Diagrams to infer.
    rows : array_like, optional
        Cluster rows of ``cat`` (default: all).
    info : DataFrame, optional
        Per-row description aligned with ``rows`` (from the sky path: ``id, ra, dec, z`` and its
        flags); its flag columns are combined with :func:`diagram_flags`.
    prior : {"flat", "mass-function"}
        Mass prior of the posteriors (:mod:`clustermass.calibration`): ``flat`` is the training
        prior (clusters drawn like the mocks), ``mass-function`` the Tinker08 mass function at
        each cluster's redshift (a survey's clusters; removes the Eddington bias).
    calibration : Calibration, optional
        Used instead of the bundle's own (e.g. a classical estimator's); it gets ``prior``.
    d_pred : array_like, optional
        The estimator's outputs for ``rows`` (then ``bundle`` may be None and is not run).
    window : WindowConfig, optional
        Phase-space window for the flags and ``log_n_gal`` (default: the bundle's).

    Returns
    -------
    DataFrame
        Identification (``id``, ``diagram_id``, ``ra``, ``dec``, ``z``, ``n_gal``), the posterior
        columns ``d_pred, log_m_map, log_m_median, log_m_mean, log_m_lo1/hi1, log_m_lo2/hi2``
        [log10 h^-1 Msun] and ``out_of_range``, the flags, then ``log_m_true`` when known and the
        rest of ``info``. Diagrams flagged ``few_galaxies``, ``degenerate`` or
        ``outside_window`` are not sent to the network: their posterior columns are NaN and
        ``out_of_range`` is True.
    """
    from .calibration import cluster_conditions

    if calibration is not None:
        cal = calibration
    elif hasattr(bundle, "calibrated"):
        cal = bundle.calibrated()  # BundleError if none
    else:  # an object with only posterior() (a bare posterior conditioned on d_pred, flat prior)
        cal = _PosteriorOnly(bundle.posterior())
    if prior != cal.prior:
        cal = cal.with_prior(prior)
    window = window if window is not None else bundle.window
    rows = cat.rows() if rows is None else np.asarray(rows)
    flags = diagram_flags(cat, window, rows, training_range(bundle))
    if info is None:
        info = pd.DataFrame({"diagram_id": cat.clusters["diagram_id"].to_numpy()[rows],
                             "n_gal": cat.clusters["n_gal"].to_numpy()[rows]})
        for col in ("id", "log_m_ref", "log_m_ref_err"):
            if col in cat.clusters.columns:
                info[col] = cat.clusters[col].to_numpy()[rows]
    info = info.reset_index(drop=True)
    for col in flags.columns:  # the sky path's own flags (e.g. its redshift range) add to these
        flags[col] = flags[col].to_numpy(bool) | (info[col].to_numpy(bool) if col in info else False)
    skip = flags[["few_galaxies", "degenerate", "outside_window"]].any(axis=1).to_numpy()
    run = np.flatnonzero(~skip)
    table = pd.DataFrame(np.nan, index=range(len(rows)), columns=list(POSTERIOR_COLUMNS[:-1]))
    table["out_of_range"] = True
    table["conditioned_on"] = ""
    table["cond_z"] = np.nan
    table["cond_log_n_gal"] = np.nan
    if len(run):
        if d_pred is None:
            d = bundle.predict(cat, rows=rows[run], progress=progress)
        else:
            d = np.asarray(d_pred, dtype=float).ravel()[run]
        cond = cluster_conditions(cat, rows[run], window)
        if "z" in info.columns:  # the sky path's cluster redshifts where the catalogue has none
            zi = info["z"].to_numpy(dtype=float)[run]
            cond["z"] = np.where(np.isfinite(cond["z"]), cond["z"], np.where(zi > 0, zi, np.nan))
        summ = cal.summarize(np.asarray(d), cond).reset_index(drop=True)
        for col in POSTERIOR_COLUMNS:
            table.loc[run, col] = summ[col].to_numpy()
        table.loc[run, "conditioned_on"] = summ["conditioned_on"].to_numpy()
        table.loc[run, "cond_z"] = cond["z"].to_numpy()
        table.loc[run, "cond_log_n_gal"] = cond["log_n_gal"].to_numpy()
    table["prior"] = cal.prior
    table["out_of_range"] = table["out_of_range"].astype(bool)
    first = [c for c in ("id", "diagram_id", "ra", "dec", "z", "n_gal") if c in info.columns]
    parts = [info[first], table, flags]
    truth = cat.clusters["log_m200c"].to_numpy(dtype=float)[rows]
    if np.isfinite(truth).any():
        parts.append(pd.DataFrame({"log_m_true": truth}))
    rest = [c for c in info.columns if c not in first and c not in flags.columns]
    parts.append(info[rest])
    return pd.concat(parts, axis=1)


class _PosteriorOnly:
    """A posterior conditioned on ``d_pred`` alone, flat prior, in the Calibration interface."""

    prior = "flat"
    conditioning = ("d_pred",)

    def __init__(self, posterior) -> None:
        self.posterior = posterior

    def with_prior(self, prior):
        raise ClustermassError(f"this posterior has only the flat prior, not {prior!r}")

    def summarize(self, d_pred, conditions=None) -> pd.DataFrame:
        out = self.posterior.summarize(np.asarray(d_pred, float)).reset_index(drop=True)
        out["conditioned_on"] = "d_pred"
        return out


def flag_summary(table: pd.DataFrame) -> dict[str, int]:
    """How many rows carry each flag (and ``out_of_range``) of a posterior table."""
    cols = [c for c in ("edge",) + INPUT_FLAGS + ("out_of_range",) if c in table.columns]
    return {c: int(table[c].astype(bool).sum()) for c in cols}


_FLAG_REASONS = {
    "outside_training_range": "lie outside the distances/redshifts of the training mocks",
    "few_galaxies": "have fewer than 4 galaxies in the window (no posterior)",
    "degenerate": "have galaxies on a point, line or plane (no posterior)",
    "outside_window": "have no galaxy inside the model's window: wrong units or centre? (no posterior)",
    "edge": "are cut by the survey footprint",
    "out_of_range": "have a network output outside the calibration range (or no posterior)",
}


def report_flags(table: pd.DataFrame, strict: bool = False) -> dict[str, int]:
    """Warn (:class:`OutOfDistributionWarning`) with the count and reason of each flag of a
    posterior table; with ``strict`` raise :class:`ClustermassError` instead when any cluster is
    flagged ``outside_training_range``, ``few_galaxies``, ``degenerate`` or ``outside_window``."""
    counts = flag_summary(table)
    _report_counts(counts, len(table), strict)
    return counts


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as parquet or CSV depending on the extension (atomically)."""
    from ._io import atomic_write

    path = Path(path)
    if path.suffix == ".csv":
        return atomic_write(path, lambda p: table.to_csv(p, index=False))
    return write_parquet(table, path)


def _cluster_figures(cal, table: pd.DataFrame, out: Path) -> None:
    """One posterior figure per cluster with a prediction: ``out/figures/posterior_<id>.png``.

    ``cal``: the Calibration (with the prior) that made ``table``."""
    from ._io import save_figure
    from .plots.posterior import plot_single_posterior

    key = "id" if "id" in table.columns else "diagram_id"
    cond = pd.DataFrame({"z": table.get("cond_z", np.nan), "log_n_gal": table.get("cond_log_n_gal", np.nan)})
    feats = cal.features(table["d_pred"].to_numpy(float), cond)
    truths = table["log_m_true"] if "log_m_true" in table.columns else [None] * len(table)
    for cid, x, truth in zip(table[key], feats, truths, strict=True):
        if not np.isfinite(x[0]):
            continue
        post = cal.posterior if np.isfinite(x).all() else cal.marginal
        xo = x if post.n_cond_ > 1 else float(x[0])
        fig = plot_single_posterior(post, xo, log_m_true=truth, label=f"cluster {cid}")
        save_figure(fig, out / "figures" / f"posterior_{cid}.png")


def _inference_identity(bundle, inputs: dict) -> dict:
    """What an ``infer`` output is made from: the model (integrity hash) and the input files."""
    return {"model": bundle.meta.get("integrity"), "inputs": {k: str(Path(v).resolve()) if v is not None
                                                              else None for k, v in inputs.items()}}


def _guard_posteriors(out, identity: dict, overwrite: bool) -> None:
    """Refuse to replace a ``posteriors.parquet`` written from other inputs (e.g. by ``evaluate``)."""
    import json

    from ._io import guard_output

    out = Path(out)
    existing = None
    if (out / "posteriors.parquet").is_file():
        try:
            existing = json.loads((out / "inference.json").read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            existing = "unknown"
    guard_output(out / "posteriors.parquet", existing, identity, overwrite, "posteriors")


def _write_posteriors(bundle, table: pd.DataFrame, out, plots: bool, identity: dict, strict: bool,
                      prior: str = "flat") -> Path:
    """Report flags, then write ``out/posteriors.parquet``, ``out/inference.json`` and, on
    request, one posterior figure per cluster."""
    from ._io import write_json_atomic

    counts = report_flags(table, strict=strict)
    out = Path(out)
    path = write_table(table, out / "posteriors.parquet")
    write_json_atomic(out / "inference.json", {"identity": identity, "n_clusters": len(table),
                                               "flags": counts, "model_kind": bundle.kind, "prior": prior})
    if plots:
        cal = bundle.calibrated()
        _cluster_figures(cal if cal.prior == prior else cal.with_prior(prior), table, out)
    return path


# ---------------------------------------------------------------------- batched, streamed inference
#: clusters read, inferred and written per batch by ``infer --data`` (bounds peak memory)
INFER_BATCH_SIZE = 20_000


def iter_catalogue_batches(directory: str | Path, batch_size: int):
    """Stream a catalogue directory as Catalogues of at most ``batch_size`` clusters.

    Returns ``(batches, n_clusters)``; ``batches`` is an iterator. Only the clusters and
    galaxies of one batch (plus one parquet row group of galaxies) are held in memory: the
    galaxies are read in step with the clusters, which needs both tables ordered by
    ``diagram_id`` (as ``simulate`` and ``write_catalogue`` write them). Any other catalogue is
    read whole (:func:`read_catalogue`) and split into batches. The halos table is not read.
    """
    import json

    import pyarrow.parquet as pq

    from .catalog import check_declared_units, units_of

    directory = Path(directory)
    paths = {n: directory / f"{n}.parquet" for n in ("clusters", "galaxies")}
    if not directory.is_dir() or not all(p.is_file() for p in paths.values()):
        cat = read_catalogue(directory)  # raises the usual CatalogueError
        return _split_batches(cat, None, batch_size, info_too=False), len(cat)
    try:
        # pre_buffer=False: with pyarrow's read-ahead cache, iter_batches keeps every column chunk
        # it has read until the iterator ends (~0.2 kB per cluster: memory grew with the catalogue)
        pf_cl, pf_gal = (pq.ParquetFile(paths[n], pre_buffer=False) for n in ("clusters", "galaxies"))
        ordered = all(_column_sorted(pf, "diagram_id", strict=(n == "clusters"))
                      for n, pf in (("clusters", pf_cl), ("galaxies", pf_gal)))
    except Exception:  # unreadable, or no diagram_id column: the full reader gives the error
        ordered = False
    if not ordered:
        cat = read_catalogue(directory)
        return _split_batches(cat, None, batch_size, info_too=False), len(cat)
    for name, path in paths.items():
        check_declared_units(units_of(path), f"{name}.parquet")
    meta = json.loads((pf_cl.schema_arrow.metadata or {}).get(b"clustermass.meta", b"{}"))
    return _stream_batches(pf_cl, pf_gal, batch_size, meta), pf_cl.metadata.num_rows


def _column_sorted(pf, column: str, strict: bool) -> bool:
    """Whether ``column`` of a parquet file never decreases (never repeats, with ``strict``);
    read one column, one row group at a time."""
    last = None
    for batch in pf.iter_batches(batch_size=1 << 18, columns=[column]):
        v = batch.column(0).to_numpy()
        if len(v) == 0:
            continue
        d = np.diff(v)
        if (d <= 0).any() if strict else (d < 0).any():
            return False
        if last is not None and (v[0] <= last if strict else v[0] < last):
            return False
        last = v[-1]
    return True


def _stream_batches(pf_cl, pf_gal, batch_size: int, meta: dict):
    from .catalog import warn_implausible_units

    gal_iter = pf_gal.iter_batches(batch_size=1 << 16)
    empty = pf_gal.schema_arrow.empty_table().to_pandas()
    buffer: list[pd.DataFrame] = []
    exhausted = False
    warned = False
    for rb in pf_cl.iter_batches(batch_size=batch_size):
        cl = rb.to_pandas()
        top = cl["diagram_id"].to_numpy()[-1]
        # pull galaxies until one lies beyond this batch's last diagram
        while not exhausted and (not buffer or buffer[-1]["diagram_id"].to_numpy()[-1] <= top):
            nxt = next(gal_iter, None)
            if nxt is None:
                exhausted = True
            elif nxt.num_rows:
                buffer.append(nxt.to_pandas())
        gal = pd.concat(buffer, ignore_index=True) if buffer else empty
        cut = int(np.searchsorted(gal["diagram_id"].to_numpy(), top, side="right"))
        mine = gal.iloc[:cut].reset_index(drop=True)
        buffer = [gal.iloc[cut:].reset_index(drop=True)] if cut < len(gal) else []
        cat = Catalogue(cl, mine, None, meta)
        if not warned:
            warn_implausible_units(cat.galaxies)
            warned = True
        yield cat
    if buffer or (not exhausted and next(gal_iter, None) is not None):
        raise CatalogueError("galaxies refer to diagram_id(s) not in clusters (beyond the last cluster)")


def _take(cat: Catalogue, rows) -> Catalogue:
    """The clusters ``rows`` of ``cat`` with their galaxies (contiguous slices via the offsets)."""
    off = cat.offsets[rows]
    idx = np.concatenate([np.arange(a, b) for a, b in off]) if len(rows) else np.zeros(0, np.int64)
    cl = cat.clusters.iloc[rows].reset_index(drop=True)
    gal = cat.galaxies.iloc[idx].reset_index(drop=True)
    return Catalogue(cl, gal, None, dict(cat.meta))


def _split_batches(cat: Catalogue, info: pd.DataFrame | None, batch_size: int, info_too: bool = True):
    """(Catalogue, info) batches of an in-memory catalogue (``info`` rows aligned with its clusters)."""
    n = len(cat)
    for start in range(0, max(n, 1), batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        part = cat if len(rows) == n else _take(cat, rows)
        inf = None if info is None else info.iloc[rows].reset_index(drop=True)
        yield (part, inf) if info_too else part


#: bundles loaded by this process, one per thread (Dask workers keep theirs between tasks; a
#: bundle's fitted posterior is per-batch state, so threads never share one)
_BUNDLES: dict = {}


def _worker_bundle(path: str, integrity: str):
    import threading

    from .bundle import load_model

    key = (path, integrity, threading.get_ident())
    if key not in _BUNDLES:
        for other in [k for k in _BUNDLES if k[:2] != key[:2]]:  # another model: drop the old ones
            _BUNDLES.pop(other, None)
        bundle = load_model(path)
        if bundle.meta.get("integrity") != integrity:
            raise ClustermassError(f"the model bundle {path} changed during inference")
        _BUNDLES[key] = bundle
    return _BUNDLES[key]


def _batch_table(item, bundle, prior: str = "flat") -> pd.DataFrame:
    """The posterior table of one batch; the calibration is read afresh for every batch, so a
    batch's result depends on the batch alone, not on which process ran the batches before it."""
    cat, info = item
    bundle._calibration = None
    return posterior_table(bundle, cat, info=info, prior=prior)


def _batch_task(item, path: str, integrity: str, prior: str = "flat") -> pd.DataFrame:
    return _batch_table(item, _worker_bundle(path, integrity), prior)


def _posterior_batches(bundle, items, scheduler: str | None, progress: bool, total: int,
                       prior: str = "flat"):
    """Posterior tables of (Catalogue, info) batches, in order, serially or as Dask tasks."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"infer {bundle.kind}", unit="cluster", disable=not progress,
              dynamic_ncols=True) as bar:
        if scheduler is None:
            for item in items:
                table = _batch_table(item, bundle, prior)
                bar.update(len(table))
                yield table
            return
        if bundle.path is None:
            raise ClustermassError("inference with a scheduler needs a saved model bundle")
        from .distributed import dask_client, map_ordered

        with dask_client(scheduler) as client:
            for table in map_ordered(client, _batch_task, items, str(Path(bundle.path).resolve()),
                                     bundle.meta.get("integrity"), prior):
                bar.update(len(table))
                yield table


def _write_posterior_stream(bundle, tables, out, plots: bool, identity: dict, strict: bool,
                            prior: str = "flat") -> Path:
    """:func:`_write_posteriors` for a stream of per-batch tables: one writer, one parquet row
    group per batch, moved into place atomically once every batch is written and the flags
    pass ``strict``. A single batch gives the same bytes as :func:`_write_posteriors`."""
    import pyarrow.parquet as pq

    from ._io import atomic_path, write_json_atomic
    from .catalog import HALO_COLUMNS, UNITS, _table_with_units

    out = Path(out)
    path = out / "posteriors.parquet"
    units = {**UNITS, **{k: v[1] for k, v in HALO_COLUMNS.items()}}
    counts: dict[str, int] = {}
    n = 0
    columns = None
    with atomic_path(path) as tmp:
        writer = None
        try:
            for table in tables:
                if columns is None:
                    columns = list(table.columns)
                elif list(table.columns) != columns:  # e.g. log_m_true known in some batches only
                    for i, c in enumerate(columns):
                        if c not in table.columns:
                            table.insert(min(i, len(table.columns)), c, np.nan)
                    table = table[columns]
                arrow = _table_with_units(table, units, {})
                if writer is None:
                    writer = pq.ParquetWriter(tmp, arrow.schema)
                writer.write_table(arrow.cast(writer.schema))
                for k, v in flag_summary(table).items():
                    counts[k] = counts.get(k, 0) + v
                n += len(table)
                if plots:
                    cal = bundle.calibrated()
                    _cluster_figures(cal if cal.prior == prior else cal.with_prior(prior), table, out)
            if writer is None:
                raise ClustermassError("no clusters to infer")
        finally:
            if writer is not None:
                writer.close()
        _report_counts(counts, n, strict)  # raises before the file moves into place
    write_json_atomic(out / "inference.json", {"identity": identity, "n_clusters": n,
                                               "flags": counts, "model_kind": bundle.kind, "prior": prior})
    return path


def _report_counts(counts: dict[str, int], n: int, strict: bool) -> None:
    """The warnings (or, with ``strict``, the error) of :func:`report_flags`, from flag counts
    (the streamed path keeps no whole table)."""
    import warnings

    from .errors import OutOfDistributionWarning

    hard = {k: counts[k] for k in INPUT_FLAGS if counts.get(k)}
    if strict and hard:
        raise ClustermassError("--strict: refusing to infer: " + "; ".join(
            f"{v} of {n} cluster(s) {_FLAG_REASONS[k]}" for k, v in hard.items()))
    for k, v in counts.items():
        if v:
            warnings.warn(f"{k} ({v} of {n}): {v} cluster(s) {_FLAG_REASONS[k]}",
                          OutOfDistributionWarning, stacklevel=4)


def infer_catalogue(model: str | Path, data: str | Path, out: str | Path, plots: bool = False,
                    progress: bool = True, strict: bool = False, overwrite: bool = False,
                    prior: str = "flat", scheduler: str | None = None, batch_size: int | None = None) -> Path:
    """Posteriors for every diagram of a catalogue directory -> ``out/posteriors.parquet``.

    The catalogue is read, inferred and written ``batch_size`` clusters at a time (default
    :data:`INFER_BATCH_SIZE`), so peak memory is bounded by the batch, not the catalogue
    (docs/scaling.md). With ``scheduler`` (``processes:N`` or a Dask scheduler address) the
    batches are Dask tasks; this process writes them in order, so the file is byte-identical
    to the serial run. ``prior``: ``flat`` or ``mass-function`` (docs/calibration.md).
    """
    from .bundle import load_model

    bundle = load_model(model)
    identity = {**_inference_identity(bundle, {"data": data}), "prior": prior}
    _guard_posteriors(out, identity, overwrite)
    batches, n = iter_catalogue_batches(data, batch_size or INFER_BATCH_SIZE)
    tables = _posterior_batches(bundle, ((cat, None) for cat in batches), scheduler, progress, n, prior)
    return _write_posterior_stream(bundle, tables, out, plots, identity, strict, prior)


def infer_sky_tables(model, galaxies, clusters, out, *, plots=False, progress=True, strict=False,
                     overwrite=False, prior: str = "flat", scheduler: str | None = None,
                     **column_options) -> Path:
    """Posteriors for clusters given on the sky (RA, Dec, z) with a survey galaxy table.

    ``column_options`` go to :func:`clustermass.sky.sky_to_catalogue` (``ra_col``,
    ``cluster_ra_col``, ``mag_col``/``flux_col``, ``mag_limit``, ``angle_unit``, ...).
    """
    from .bundle import load_model
    from .sky import read_table

    bundle = load_model(model)
    identity = {**_inference_identity(bundle, {"galaxies": galaxies, "clusters": clusters}), "prior": prior}
    _guard_posteriors(out, identity, overwrite)
    gal = read_table(galaxies)
    cl = read_table(clusters)
    if scheduler is None:
        table = infer_sky(bundle, gal, cl, progress=progress, prior=prior, **column_options)
        return _write_posteriors(bundle, table, out, plots, identity, strict, prior)
    cat, info = _sky_catalogue(bundle, gal, cl, **column_options)
    return _write_posterior_stream(bundle, _posterior_batches(
        bundle, _split_batches(cat, info, INFER_BATCH_SIZE), scheduler, progress, len(cat), prior),
        out, plots, identity, strict, prior)


def infer_authors_sdss(model, cluster_list, galaxy_source, out, *, plots=False, progress=True,
                       strict=False, overwrite=False, prior: str = "flat",
                       scheduler: str | None = None) -> Path:
    """Posteriors for the authors' public SDSS input (cluster list + per-cluster x, y, v tables)."""
    from .bundle import load_model
    from .sky import read_authors_sdss

    bundle = load_model(model)
    identity = {**_inference_identity(bundle, {"clusters": cluster_list, "galaxies": galaxy_source}), "prior": prior}
    _guard_posteriors(out, identity, overwrite)
    cat = read_authors_sdss(cluster_list, galaxy_source, window=bundle.window)
    if scheduler is None:
        table = posterior_table(bundle, cat, progress=progress, prior=prior)
        return _write_posteriors(bundle, table, out, plots, identity, strict, prior)
    return _write_posterior_stream(bundle, _posterior_batches(
        bundle, _split_batches(cat, None, INFER_BATCH_SIZE), scheduler, progress, len(cat), prior),
        out, plots, identity, strict, prior)


# ---------------------------------------------------------------------- sky inference
def training_range(bundle) -> dict:
    """Flux limit, distance and redshift range of a bundle's training data, where recorded."""
    meta = getattr(bundle, "meta", {}) or {}
    td = meta.get("training_data") or {}
    sim = td.get("simulation", td) if isinstance(td, dict) else {}
    out = {}
    for key in ("mag_limit", "distance_min", "distance_max", "z_min", "z_max"):
        val = sim.get(key, td.get(key) if isinstance(td, dict) else None)
        if val is not None:
            out[key] = float(val)
    return out


def infer_sky(bundle, galaxies, clusters, *, progress: bool = False, prior: str = "flat",
              **column_options) -> pd.DataFrame:
    """Posterior masses of clusters given on the sky.

    Parameters
    ----------
    bundle : ModelBundle
        A calibrated model bundle; its window is applied, and its training flux limit and
        distance range (``bundle.meta["training_data"]``, if recorded) are used unless
        ``mag_limit`` / ``distance_min`` / ``distance_max`` are given.
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
    cat, info = _sky_catalogue(bundle, galaxies, clusters, **column_options)
    return posterior_table(bundle, cat, info=info, progress=progress, prior=prior)


def _sky_catalogue(bundle, galaxies, clusters, **column_options):
    """(Catalogue, info) of sky tables, with the bundle's training range as default cuts."""
    rng = training_range(bundle)
    opts = dict(column_options)
    if opts.get("mag_limit") is None:
        opts["mag_limit"] = rng.get("mag_limit")
    for key in ("distance_min", "distance_max"):
        if opts.get(key) is None:
            opts[key] = rng.get(key)
    if opts.get("z_range") is None and "z_max" in rng and "distance_max" not in rng:
        opts["z_range"] = (rng.get("z_min", 0.0), rng["z_max"])
    from .sky import sky_to_catalogue

    return sky_to_catalogue(galaxies, clusters, bundle.window, **opts)


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
        ``scatter_dex`` over ``n`` clusters (and ``mean_total, std_total`` over ``n_total``
        clusters with a positive published error, with ``ref_err``).
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
        "n_skipped": int((~ok).sum()),  # no posterior, no reference mass, or a zero-width interval
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
        okt = ok & np.isfinite(tot) & (err > 0)  # a published error of 0 (or NaN) is no error
        summary["n_total"] = int(okt.sum())  # the n of mean_total / std_total
        summary["mean_total"] = float(np.mean(tot[okt])) if okt.any() else float("nan")
        summary["std_total"] = float(np.std(tot[okt], ddof=1)) if okt.sum() > 1 else float("nan")
    else:
        table["log_m_ref_err"] = np.nan
    return summary, table


def compare_tables(posteriors, reference, out, *, id_col="id", mass_col="log_m200c", err_col=None,
                   include_flagged: bool = False) -> dict:
    """Join inferred posteriors with published masses and write the contrast table + figures.

    Clusters flagged ``edge``, ``few_galaxies``, ``degenerate``, ``outside_window``,
    ``outside_training_range`` or ``out_of_range`` are left out unless ``include_flagged``;
    ``n_excluded_flagged`` says how many. Reference columns that the posterior table also has
    get the suffix ``_ref`` (e.g. ``z_ref``); the posterior's keep their names.
    """
    from ._io import save_figure, write_json_atomic
    from .plots.sky import plot_contrast_histogram, plot_mass_comparison
    from .sky import read_table

    post = read_table(posteriors)
    ref = read_table(reference)
    for col in (id_col, mass_col) + ((err_col,) if err_col else ()):
        if col not in ref.columns:
            raise ClustermassError(f"reference table has no column {col!r} (columns: {', '.join(map(str, ref.columns))})")
    key = "id" if "id" in post.columns else "diagram_id"
    ref = ref.rename(columns={id_col: key})
    merged = post.merge(ref, on=key, how="inner", suffixes=("", "_ref"))
    if merged.empty:
        raise ClustermassError("no cluster id is common to the posteriors and the reference table")
    renamed = {c: (f"{c}_ref" if c in post.columns and c != key else c) for c in ref.columns}
    flag_cols = [c for c in ("edge",) + INPUT_FLAGS + ("out_of_range",) if c in merged.columns]
    flagged = merged[flag_cols].astype(bool).any(axis=1).to_numpy() if flag_cols else np.zeros(len(merged), bool)
    n_matched = len(merged)
    if not include_flagged:
        merged = merged[~flagged].reset_index(drop=True)
        if merged.empty:
            raise ClustermassError(f"all {n_matched} matched clusters are flagged ({', '.join(flag_cols)}); "
                                   "pass include_flagged (--include-flagged) to compare them anyway")
    mcol, ecol = renamed[mass_col], (renamed[err_col] if err_col else None)
    summary, table = compare_with_published(
        merged, merged[mcol].to_numpy(float), merged[ecol].to_numpy(float) if ecol else None
    )
    summary = {"n_matched": n_matched, "n_excluded_flagged": 0 if include_flagged else int(flagged.sum()),
               "flags_checked": flag_cols, **summary}
    out = Path(out)
    write_table(table, out / "comparison.parquet")
    write_json_atomic(out / "comparison.json", summary)
    save_figure(plot_contrast_histogram(table), out / "figures" / "contrast_histogram.png")
    save_figure(plot_mass_comparison(table), out / "figures" / "mass_comparison.png")
    return summary
