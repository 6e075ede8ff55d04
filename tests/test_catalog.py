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
