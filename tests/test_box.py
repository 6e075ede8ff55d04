"""Real-simulation input: periodic boxes and the authors' public mock format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clustermass import cosmology
from clustermass.config import SimulationConfig, WindowConfig
from clustermass.errors import CatalogueError
from clustermass.simulate import populate_halos
from clustermass.simulate.box import diagrams_from_box, read_authors_mock

BOX = 200.0


def _box(seed=0):
    """A small periodic box: 40 cluster halos (one across the corner) + 400 small halos."""
    rng = np.random.default_rng(seed)
    lm = np.concatenate([rng.uniform(13.7, 14.6, 40), rng.uniform(12.0, 13.5, 400)])
    pos = rng.uniform(0, BOX, (lm.size, 3))
    pos[0] = [0.2, BOX - 0.1, 0.3]  # straddles the periodic boundary
    vel = rng.normal(0, 300, (lm.size, 3))
    halos = pd.DataFrame(
        {
            "halo_id": np.arange(lm.size) + 100,
            "x": pos[:, 0],
            "y": pos[:, 1],
            "z": pos[:, 2],
            "vx": vel[:, 0],
            "vy": vel[:, 1],
            "vz": vel[:, 2],
            "M200c": 10**lm,
        }
    )
    g = populate_halos(lm, 0.0, rng, mag_limit_abs=-19.0)
    # keep each halo's galaxies within 1.5 R200c (the simulator draws outskirts to ~5 R200c),
    # so that every galaxy of a cluster halo falls in the test's wide window
    r200 = cosmology.r200c(lm, 0.0)[g["halo_index"].to_numpy()]
    g = g[np.sqrt(g["dx"] ** 2 + g["dy"] ** 2 + g["dz"] ** 2).to_numpy() <= 1.5 * r200].reset_index(drop=True)
    h = g["halo_index"].to_numpy()
    gal = pd.DataFrame(
        {
            "x": np.mod(pos[h, 0] + g["dx"], BOX),
            "y": np.mod(pos[h, 1] + g["dy"], BOX),
            "z": np.mod(pos[h, 2] + g["dz"], BOX),
            "vx": vel[h, 0] + g["dvx"],
            "vy": vel[h, 1] + g["dvy"],
            "vz": vel[h, 2] + g["dvz"],
            "abs_mag_r": g["abs_mag_r"],
            "host_id": h + 100,
        }
    )
    return halos, gal


SIM = SimulationConfig(
    n_train=30,
    n_test=10,
    n_eval=10,
    max_sightlines=3,
    log_m_min=13.7,
    log_m_max=14.7,
    distance_min=50.0,
    distance_max=100.0,
)


def test_box_diagrams_find_all_members():
    halos, gal = _box()
    wide = WindowConfig(r_max=3.0, v_max=4000.0)
    cat = diagrams_from_box(halos, gal, BOX, wide, SIM, seed=1)
    cl = cat.clusters
    assert len(cl) == SIM.n_total
    assert (cl.groupby("halo_id")["split"].nunique() == 1).all()
    # at 50-100 h^-1 Mpc every M_r < -19 galaxy is brighter than r = 18 and the wide window
    # holds every R200c: each diagram sees all galaxies of its halo, also across the boundary
    n_own = gal.groupby("host_id").size().reindex(cl["halo_id"]).to_numpy()
    np.testing.assert_array_equal(cl["n_mem"].to_numpy(), n_own)
    g = cat.galaxies
    np.testing.assert_array_equal(
        g.groupby("diagram_id").size().reindex(cl["diagram_id"], fill_value=0), cl["n_gal"]
    )
    assert (np.abs(g[["x_proj", "y_proj"]]).to_numpy() <= wide.r_max).all()
    assert (np.abs(g["v_los"]) <= wide.v_max).all()
    assert (cl["n_gal"] >= cl["n_mem"]).all() and (cl["n_gal"] > cl["n_mem"]).any()


def test_box_projection_geometry():
    """One halo with one satellite at a known offset and no relative velocity."""
    halos = pd.DataFrame(
        {
            "id": [7],
            "x": [BOX - 0.2],
            "y": [5.0],
            "z": [5.0],
            "vx": [50.0],
            "vy": [0.0],
            "vz": [0.0],
            "log_m200c": [14.2],
        }
    )
    gal = pd.DataFrame(
        {
            "x": [BOX - 0.2, 0.3],
            "y": [5.0, 5.0],
            "z": [5.0, 5.0],
            "vx": [50.0, 50.0],
            "vy": [0.0, 0.0],
            "vz": [0.0, 0.0],
            "abs_mag_r": [-22.0, -21.0],
            "host_halo_id": [7, 7],
        }
    )
    sim = SIM.model_copy(update={"n_train": 3, "n_test": 0, "n_eval": 0})
    cat = diagrams_from_box(halos, gal, BOX, WindowConfig(r_max=3.0), sim, seed=4)
    assert len(cat) == 3 and (cat.clusters["n_mem"] == 2).all()
    sat = cat.galaxies[
        cat.galaxies["x_proj"] ** 2 + cat.galaxies["y_proj"] ** 2 + cat.galaxies["v_los"] ** 2 > 0
    ]
    cl = cat.clusters.set_index("diagram_id").loc[sat["diagram_id"]]
    h = cosmology.hubble(cl["redshift"].to_numpy())
    dz = sat["v_los"].to_numpy() / h
    np.testing.assert_allclose(sat["x_proj"] ** 2 + sat["y_proj"] ** 2 + dz**2, 0.5**2, rtol=1e-9)
    np.testing.assert_allclose(dz, 0.5 * cl["los_x"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_box_errors():
    halos, gal = _box()
    with pytest.raises(CatalogueError, match="host"):
        diagrams_from_box(halos, gal.drop(columns="host_id"), BOX, WindowConfig(), SIM, seed=0)
    with pytest.raises(CatalogueError, match="too small"):
        diagrams_from_box(halos, gal, 60.0, WindowConfig(), SIM, seed=0)
    with pytest.raises(CatalogueError, match="mass range"):
        diagrams_from_box(
            halos,
            gal,
            BOX,
            WindowConfig(),
            SIM.model_copy(update={"log_m_min": 15.0, "log_m_max": 15.2}),
            seed=0,
        )


def test_read_authors_mock(tmp_path):
    (tmp_path / "clusters.txt").write_text("# id logM\nid logM200c\n10 14.2\n11 13.9\n12 14.8\n")
    (tmp_path / "galaxies.txt").write_text(
        "# cluster x y v\n10 0.1 -0.2 150.0\n10 0.0 0.0 0.0\n12 1.2 0.3 -900.5\n10 -1.0 1.1 2000.0\n"
    )
    cat = read_authors_mock(tmp_path / "clusters.txt", tmp_path / "galaxies.txt", redshift=0.05)
    cl = cat.clusters
    assert cl["halo_id"].tolist() == [10, 11, 12]
    assert cl["n_gal"].tolist() == [3, 0, 1]
    assert (cl["n_mem"] == -1).all()
    np.testing.assert_allclose(cl["r200c"], cosmology.r200c([14.2, 13.9, 14.8], 0.05))
    pts = cat.points(2)
    np.testing.assert_allclose(pts, [[1.2, 0.3, -900.5]])
    assert cat.points(0).shape == (3, 3)


def test_read_authors_mock_errors(tmp_path):
    (tmp_path / "c.txt").write_text("1 14.0\n2 14.5\n")
    (tmp_path / "g.txt").write_text("3 0.1 0.1 10.0\n")
    with pytest.raises(CatalogueError, match="unknown cluster"):
        read_authors_mock(tmp_path / "c.txt", tmp_path / "g.txt")
    with pytest.raises(CatalogueError, match="not found"):
        read_authors_mock(tmp_path / "missing.txt", tmp_path / "g.txt")
    (tmp_path / "g2.txt").write_text("1 0.1 0.1\n")
    with pytest.raises(CatalogueError, match="column"):
        read_authors_mock(tmp_path / "c.txt", tmp_path / "g2.txt")
