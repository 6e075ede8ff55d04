"""Posterior masses for new data with a calibrated bundle: catalogues or sky tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .catalog import Catalogue, read_catalogue, write_parquet
from .errors import ClustermassError


def posterior_table(bundle, cat: Catalogue, rows=None, progress: bool = False) -> pd.DataFrame:
    """Predict and summarise the posterior of every diagram (DESIGN.md posterior columns).

    Returns a DataFrame with ``diagram_id`` first, the posterior summary columns, and
    ``log_m_true`` when the catalogue knows the true masses.
    """
    post = bundle.posterior()  # raises BundleError when the bundle is not calibrated
    rows = cat.rows() if rows is None else np.asarray(rows)
    d_pred = bundle.predict(cat, rows=rows, progress=progress)
    table = post.summarize(d_pred).reset_index(drop=True)
    table.insert(0, "diagram_id", cat.clusters["diagram_id"].to_numpy()[rows])
    truth = cat.clusters["log_m200c"].to_numpy()[rows]
    if np.isfinite(truth).any():
        table["log_m_true"] = truth
    table["n_gal"] = cat.clusters["n_gal"].to_numpy()[rows]
    return table


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as parquet or CSV depending on the extension (atomically)."""
    from ._io import atomic_write

    path = Path(path)
    if path.suffix == ".csv":
        return atomic_write(path, lambda p: table.to_csv(p, index=False))
    return write_parquet(table, path)


def _cluster_figures(post, table: pd.DataFrame, out: Path) -> None:
    """One posterior figure per cluster with a prediction: ``out/figures/posterior_<id>.png``."""
    from ._io import save_figure
    from .plots.posterior import plot_single_posterior

    key = "id" if "id" in table.columns else "diagram_id"
    for cid, d, truth in zip(table[key], table["d_pred"], table.get("log_m_true", [None] * len(table)),
                             strict=True):
        if not np.isfinite(d):
            continue
        fig = plot_single_posterior(post, float(d), log_m_true=truth, label=f"cluster {cid}")
        save_figure(fig, out / "figures" / f"posterior_{cid}.png")


def _write_posteriors(bundle, table: pd.DataFrame, out, plots: bool) -> Path:
    """``out/posteriors.parquet`` and, on request, one posterior figure per cluster."""
    out = Path(out)
    path = write_table(table, out / "posteriors.parquet")
    if plots:
        _cluster_figures(bundle.posterior(), table, out)
    return path


def infer_catalogue(model: str | Path, data: str | Path, out: str | Path, plots: bool = False,
                    progress: bool = True) -> Path:
    """Posteriors for every diagram of a catalogue directory -> ``out/posteriors.parquet``."""
    from .training import load_model

    bundle = load_model(model)
    cat = read_catalogue(data)
    table = posterior_table(bundle, cat, progress=progress)
    return _write_posteriors(bundle, table, out, plots)


def infer_sky_tables(model, galaxies, clusters, out, *, ra_col="ra", dec_col="dec", z_col="z",
                     id_col="id", mag_col=None, mag_limit=None, angle_unit="deg", plots=False,
                     progress=True) -> Path:
    """Posteriors for clusters given on the sky (RA, Dec, z) with a survey galaxy table."""
    from .sky import infer_sky, read_table
    from .training import load_model

    bundle = load_model(model)
    gal = read_table(galaxies)
    cl = read_table(clusters)
    table = infer_sky(bundle, gal, cl, ra_col=ra_col, dec_col=dec_col, z_col=z_col, id_col=id_col,
                      mag_col=mag_col, mag_limit=mag_limit, angle_unit=angle_unit, progress=progress)
    return _write_posteriors(bundle, table, out, plots)


def infer_authors_sdss(model, cluster_list, galaxy_source, out, *, plots=False, progress=True) -> Path:
    """Posteriors for the authors' public SDSS input (cluster list + per-cluster x, y, v tables)."""
    from .sky import infer_sky_catalogue, read_authors_sdss
    from .training import load_model

    bundle = load_model(model)
    cat = read_authors_sdss(cluster_list, galaxy_source, window=bundle.window)
    table = infer_sky_catalogue(bundle, cat, progress=progress)
    return _write_posteriors(bundle, table, out, plots)


def compare_tables(posteriors, reference, out, *, id_col="id", mass_col="log_m200c", err_col=None) -> dict:
    """Join inferred posteriors with published masses and write the contrast table + figures."""
    from ._io import save_figure, write_json_atomic
    from .plots.sky import plot_contrast_histogram, plot_mass_comparison
    from .sky import compare_with_published, read_table

    post = read_table(posteriors)
    ref = read_table(reference)
    for col in (id_col, mass_col) + ((err_col,) if err_col else ()):
        if col not in ref.columns:
            raise ClustermassError(f"reference table has no column {col!r} (columns: {', '.join(map(str, ref.columns))})")
    key = "id" if "id" in post.columns else "diagram_id"
    merged = post.merge(ref.rename(columns={id_col: key}), on=key, how="inner")
    if merged.empty:
        raise ClustermassError("no cluster id is common to the posteriors and the reference table")
    summary, table = compare_with_published(
        merged, merged[mass_col].to_numpy(float), merged[err_col].to_numpy(float) if err_col else None
    )
    out = Path(out)
    write_table(table, out / "comparison.parquet")
    write_json_atomic(out / "comparison.json", summary)
    save_figure(plot_contrast_histogram(table), out / "figures" / "contrast_histogram.png")
    save_figure(plot_mass_comparison(table), out / "figures" / "mass_comparison.png")
    return summary
