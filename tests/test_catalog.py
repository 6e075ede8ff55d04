"""The catalogue format: schema validation, units metadata, round trip, atomic writes."""

import numpy as np
import pandas as pd
import pytest

from clustermass.catalog import Catalogue, read_catalogue, units_of, write_catalogue
from clustermass.errors import CatalogueError


def test_round_trip_and_units(tmp_path, unsorted_catalogue):
    cat = unsorted_catalogue()
    cat.meta = {"seed": 3}
    write_catalogue(cat, tmp_path / "cat")
    back = read_catalogue(tmp_path / "cat")
    pd.testing.assert_frame_equal(back.clusters, cat.clusters)
    pd.testing.assert_frame_equal(back.galaxies, cat.galaxies)
    assert back.meta["seed"] == 3
    units = units_of(tmp_path / "cat" / "galaxies.parquet")
    assert units["x_proj"] == "h^-1 Mpc" and units["v_los"] == "km/s"
    assert not list((tmp_path / "cat").glob(".*.tmp"))


def test_points_follow_offsets(unsorted_catalogue):
    cat = unsorted_catalogue()
    assert cat.galaxies["diagram_id"].is_monotonic_increasing
    for row in range(len(cat)):
        pts = cat.points(row)
        did = cat.clusters["diagram_id"].iloc[row]
        expect = cat.galaxies.loc[cat.galaxies["diagram_id"] == did, ["x_proj", "y_proj", "v_los"]].to_numpy()
        np.testing.assert_array_equal(pts, expect)
        assert len(pts) == cat.clusters["n_gal"].iloc[row]
    sub = cat.subset(cat.rows("test"))
    assert set(sub.clusters["split"]) == {"test"}
    assert set(sub.galaxies["diagram_id"]) <= set(sub.clusters["diagram_id"])


def test_schema_errors_name_the_column(tmp_path, unsorted_catalogue):
    cat = unsorted_catalogue()
    with pytest.raises(CatalogueError, match="v_los"):
        Catalogue(cat.clusters, cat.galaxies.drop(columns="v_los"))
    with pytest.raises(CatalogueError, match="log_m200c"):
        Catalogue(cat.clusters.drop(columns="log_m200c"), cat.galaxies)
    bad = cat.galaxies.copy()
    bad.loc[0, "x_proj"] = np.nan
    with pytest.raises(CatalogueError, match="NaN"):
        Catalogue(cat.clusters, bad)
    bad = cat.galaxies.copy()
    bad["x_proj"] = "a"
    with pytest.raises(CatalogueError, match="x_proj"):
        Catalogue(cat.clusters, bad)
    with pytest.raises(CatalogueError, match="not found"):
        read_catalogue(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogueError, match="clusters.parquet"):
        read_catalogue(tmp_path / "empty")


def test_rewriting_a_directory_drops_the_old_halos_table(tmp_path, unsorted_catalogue):
    cat = unsorted_catalogue()
    halos = pd.DataFrame({"diagram_id": [0], "halo_id": [7], "log_m200c": [14.0], "x_proj": [0.1],
                          "y_proj": [0.2], "v_los": [100.0]})
    write_catalogue(Catalogue(cat.clusters, cat.galaxies, halos), tmp_path / "cat")
    assert read_catalogue(tmp_path / "cat").halos is not None
    write_catalogue(cat, tmp_path / "cat")  # no halos table this time
    assert read_catalogue(tmp_path / "cat").halos is None


def test_interrupted_chunked_write_leaves_no_catalogue(tmp_path, unsorted_catalogue):
    from clustermass.catalog import write_catalogue_chunks

    cat = unsorted_catalogue()
    halos = pd.DataFrame({c: [] for c in ("diagram_id", "halo_id", "log_m200c", "x_proj", "y_proj", "v_los")})

    def chunks():
        yield cat.clusters, cat.galaxies, halos
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_catalogue_chunks(chunks(), tmp_path / "cat")
    assert not list((tmp_path / "cat").iterdir())  # no table, no temporary file


def _mapped(a) -> bool:
    """Whether array ``a`` views a memory-mapped file."""
    import mmap

    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return isinstance(a, mmap.mmap)


def _store_files(directory):
    return {p.name: p.stat().st_mtime_ns for p in (directory / ".galaxy-store").iterdir()}


def test_memory_mapped_galaxies_equal_the_in_memory_table(tmp_path, gaussian_catalogue, monkeypatch):
    """galaxies_max_gb exceeded: the galaxies come from a memory-mapped store with the same values,
    offsets and content hash (also when hashed in small chunks); the store is reused while the
    parquet file is unchanged and rebuilt when it changes."""
    import clustermass.catalog as catalog

    write_catalogue(gaussian_catalogue(30, 1), tmp_path / "cat")
    mem = read_catalogue(tmp_path / "cat")
    mapped = read_catalogue(tmp_path / "cat", galaxies_max_gb=0.0)
    assert _mapped(mapped.galaxies["x_proj"].to_numpy()) and _mapped(mapped._galaxy_array("v_los"))
    assert not _mapped(mem.galaxies["x_proj"].to_numpy())
    pd.testing.assert_frame_equal(mapped.galaxies, mem.galaxies)
    np.testing.assert_array_equal(mapped.offsets, mem.offsets)
    for row in range(len(mem)):
        np.testing.assert_array_equal(mapped.points(row), mem.points(row))
    assert mapped.data_hash() == mem.data_hash()
    import hashlib

    whole = hashlib.sha256()  # the hash of earlier versions: each table hashed whole
    for df in (mem.clusters, mem.galaxies):
        whole.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    monkeypatch.setattr(catalog, "CHUNK_ROWS", 7)
    assert read_catalogue(tmp_path / "cat", galaxies_max_gb=0.0).data_hash() == whole.hexdigest()[:16]
    monkeypatch.undo()
    before = _store_files(tmp_path / "cat")
    read_catalogue(tmp_path / "cat", galaxies_max_gb=0.0)
    assert _store_files(tmp_path / "cat") == before  # reused
    import os

    os.utime(tmp_path / "cat" / "galaxies.parquet")  # touched, same content: hashed, not rebuilt
    read_catalogue(tmp_path / "cat", galaxies_max_gb=0.0)
    after = _store_files(tmp_path / "cat")
    assert {k: v for k, v in after.items() if k.endswith(".npy")} == {
        k: v for k, v in before.items() if k.endswith(".npy")}
    assert not _mapped(read_catalogue(tmp_path / "cat", galaxies_max_gb=1.0).galaxies["x_proj"].to_numpy())
    write_catalogue(gaussian_catalogue(30, 2), tmp_path / "cat")  # new content: rebuilt
    again = read_catalogue(tmp_path / "cat", galaxies_max_gb=0.0)
    pd.testing.assert_frame_equal(again.galaxies, read_catalogue(tmp_path / "cat").galaxies)
    assert again.data_hash() != mem.data_hash()


def test_memory_mapped_galaxies_are_validated_with_the_same_errors(tmp_path, gaussian_catalogue, monkeypatch):
    """NaN values and unknown diagram ids: the same message in memory, memory-mapped, and checked
    in chunks of 3 rows; an unsorted galaxies table is not stored but read whole (and sorted)."""
    import clustermass.catalog as catalog
    from clustermass.catalog import galaxy_store, write_parquet

    cat = gaussian_catalogue(8, 1)
    gal = cat.galaxies.copy()
    gal.loc[[3, 40, 41, 42, 90, 91, 150], "v_los"] = np.nan
    gal.loc[[5, 60], "diagram_id"] = 999
    gal = gal.sort_values("diagram_id", kind="stable")
    for name, g in (("nan", gal.assign(diagram_id=cat.galaxies["diagram_id"])), ("ids", gal)):
        d = tmp_path / name
        write_catalogue(cat, d)
        write_parquet(g, d / "galaxies.parquet")
        messages = []
        for chunk in (catalog.CHUNK_ROWS, 3):
            monkeypatch.setattr(catalog, "CHUNK_ROWS", chunk)
            for limit in (None, 0.0):
                with pytest.raises(CatalogueError) as err:
                    read_catalogue(d, galaxies_max_gb=limit)
                messages.append(str(err.value))
        assert len(set(messages)) == 1, messages
        assert ("NaN" if name == "nan" else "999") in messages[0]
    d = tmp_path / "unsorted"
    write_catalogue(cat, d)
    write_parquet(cat.galaxies.iloc[::-1], d / "galaxies.parquet")
    assert galaxy_store(d / "galaxies.parquet") is None
    back = read_catalogue(d, galaxies_max_gb=0.0)
    assert back.galaxies["diagram_id"].is_monotonic_increasing
    assert back.data_hash() == read_catalogue(d).data_hash()
