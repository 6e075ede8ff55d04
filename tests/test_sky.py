"""Sky coordinates -> projected phase space, window selection, bad inputs, readers, comparison."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad

from clustermass import cosmology
from clustermass.config import WindowConfig
from clustermass.errors import ClustermassError
from clustermass.inference import compare_with_published, infer_sky, posterior_table
from clustermass.sky import (
    ClusterIdError,
    CoordinateError,
    MissingColumnError,
    SkyWarning,
    los_velocity,
    projected_to_sky,
    read_authors_sdss,
    read_table,
    sky_to_catalogue,
    sky_to_projected,
)

W = WindowConfig()


# ---------------------------------------------------------------------- coordinates
def test_round_trip_sky_projected_sky():
    rng = np.random.default_rng(1)
    ra0, dec0, z0 = 201.3, 41.7, 0.04
    x = rng.uniform(-3, 3, 500)
    y = rng.uniform(-3, 3, 500)
    ra, dec = projected_to_sky(x, y, ra0, dec0, z0)
    x2, y2 = sky_to_projected(ra, dec, ra0, dec0, z0)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(y2, y, atol=1e-9)
    # and the other way, including RA wrap-around at 0/360
    ra = (359.5 + rng.uniform(-1, 1, 100)) % 360
    dec = rng.uniform(-1, 1, 100)
    x, y = sky_to_projected(ra, dec, 359.5, 0.0, 0.03)
    ra2, dec2 = projected_to_sky(x, y, 359.5, 0.0, 0.03)
    np.testing.assert_allclose(np.radians(ra2 - ra + 180) % (2 * np.pi) - np.pi, 0, atol=1e-11)
    np.testing.assert_allclose(dec2, dec, atol=1e-11)


def test_hand_computed_case():
    """Planck 2013 flat LCDM at z = 0.05: D_A by direct integration, offsets east/north."""
    z = 0.05
    om = cosmology.use(cosmology.SIMULATION_COSMOLOGY).Om0
    chi = (cosmology.C_KMS / 100.0) * quad(lambda t: 1 / np.sqrt(om * (1 + t) ** 3 + 1 - om), 0, z)[0]
    d_a = chi / (1 + z)  # h^-1 Mpc
    # a galaxy 0.5 deg east on the equator: x = D_A tan(0.5 deg), y = 0
    x, y = sky_to_projected(10.5, 0.0, 10.0, 0.0, z)
    assert x == pytest.approx(d_a * np.tan(np.radians(0.5)), rel=2e-4)
    assert abs(y) < 1e-12
    # 0.5 deg north: y = D_A tan(0.5 deg)
    x, y = sky_to_projected(10.0, 0.5, 10.0, 0.0, z)
    assert y == pytest.approx(d_a * np.tan(np.radians(0.5)), rel=2e-4)
    assert abs(x) < 1e-12
    # west is negative x
    x, _ = sky_to_projected(9.5, 0.0, 10.0, 0.0, z)
    assert x < 0
    # v_los: z = 0.055 vs 0.05 -> c * 0.005 / 1.05
    assert los_velocity(0.055, 0.05) == pytest.approx(299792.458 * 0.005 / 1.05, rel=1e-9)


# ---------------------------------------------------------------------- window selection
def test_window_selection_matches_brute_force(random_sky):
    gal, cl = random_sky(seed=2)
    cat, info = sky_to_catalogue(gal, cl, W)
    assert len(cat) == len(cl)
    d_a = cosmology.angular_diameter_distance(cl["z"].to_numpy())
    for i in range(len(cl)):  # brute force: every galaxy against every cluster
        x, y = sky_to_projected(gal["ra"], gal["dec"], cl["ra"][i], cl["dec"][i], cl["z"][i])
        v = los_velocity(gal["z"].to_numpy(), cl["z"][i])
        sel = (np.abs(x) <= W.r_max) & (np.abs(y) <= W.r_max) & (np.abs(v) <= W.v_max)
        pts = cat.points(i)
        assert len(pts) == sel.sum() == info["n_gal"][i]
        rows = cat.galaxies["galaxy_row"].to_numpy()[slice(*cat.offsets[i])]
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(sel))
        order = np.argsort(rows)
        np.testing.assert_allclose(pts[order, 0], x[sel], rtol=1e-10)
        np.testing.assert_allclose(pts[order, 2], v[sel], rtol=1e-10)
        assert d_a[i] > 0
    assert info["n_gal"].sum() > 20 * len(cl)
    np.testing.assert_allclose(info["comoving_distance"], cosmology.comoving_distance(cl["z"].to_numpy()), rtol=1e-4)
    assert (cat.clusters["split"] == "none").all() and (cat.clusters["n_mem"] == -1).all()
    assert np.isnan(cat.clusters["log_m200c"]).all()


def test_flags_edge_few_and_training_range(random_sky):
    gal, cl = random_sky(seed=3)
    extra = pd.DataFrame({"id": [1, 2, 3], "ra": [150.0, 160.0, 160.0], "dec": [7.0, 7.0, 7.0],
                          "z": [0.04, 0.012, 0.09]})
    # cluster 1 sits on the RA = 150 survey edge; 2 is near; 3 is far and has no galaxies
    cat, info = sky_to_catalogue(gal, pd.concat([cl, extra], ignore_index=True), W, distance_max=200.0)
    e = info.set_index("id")
    assert e.loc[1, "edge"]
    assert e.loc[3, "few_galaxies"] and e.loc[3, "n_gal"] == 0
    assert e.loc[3, "outside_training_range"] and not e.loc[2, "outside_training_range"]
    assert info["edge"].iloc[: len(cl)].mean() < 0.2


def test_edge_flag_on_a_uniform_survey_with_a_hole():
    rng = np.random.default_rng(12)
    n = 30000  # ~100 per deg^2 in RA 150-170, Dec 0-15
    gal = pd.DataFrame({"ra": rng.uniform(150, 170, n), "dec": np.degrees(np.arcsin(rng.uniform(0, np.sin(np.radians(15)), n))),
                        "z": rng.uniform(0.01, 0.1, n)})
    hole = np.hypot((gal["ra"] - 160) * np.cos(np.radians(5)), gal["dec"] - 5) < 0.6
    gal = gal[~hole.to_numpy()]
    inner = pd.DataFrame({"id": np.arange(40), "ra": rng.uniform(153, 158, 40), "dec": rng.uniform(8, 12, 40), "z": 0.04})
    edge = pd.DataFrame({"id": np.arange(100, 110), "ra": 150.1, "dec": np.linspace(3, 12, 10), "z": 0.04})
    near_hole = pd.DataFrame({"id": [200, 201], "ra": [160.3, 160.0], "dec": [5.3, 5.0], "z": 0.04})
    _, info = sky_to_catalogue(gal, pd.concat([inner, edge, near_hole], ignore_index=True), W)
    e = info.set_index("id")["edge"]
    assert e.loc[inner["id"]].sum() <= 1
    assert e.loc[edge["id"]].all()
    assert e.loc[[200, 201]].all()
    assert info.set_index("id").loc[201, "empty_fraction"] > 0.2
    # a degenerate set (all on one line) is flagged even with enough galaxies
    line = pd.DataFrame({"ra": 160.0 + np.linspace(-0.3, 0.3, 10), "dec": 7.0, "z": 0.03})
    _, info2 = sky_to_catalogue(line, pd.DataFrame({"id": [9], "ra": [160.0], "dec": [7.0], "z": [0.03]}),
                                W, check_angles=False)
    assert info2["n_gal"][0] == 10 and info2["few_galaxies"][0]


# ---------------------------------------------------------------------- bad inputs
def test_missing_columns_name_the_flag_and_aliases_work(random_sky):
    gal, cl = random_sky(seed=4, n_gal=500, n_cl=5)
    with pytest.raises(MissingColumnError, match="ra_col"):
        sky_to_catalogue(gal.rename(columns={"ra": "alpha_x"}), cl, W)
    with pytest.raises(MissingColumnError, match="z_col"):
        sky_to_catalogue(gal, cl, W, z_col="zz")
    with pytest.raises(MissingColumnError, match="id_col"):
        sky_to_catalogue(gal, cl.drop(columns="id"), W)
    # common catalogue names are found without flags
    g2 = gal.rename(columns={"ra": "RAJ2000", "dec": "DEJ2000", "z": "redshift"})
    c2 = cl.rename(columns={"id": "Name", "ra": "RA", "dec": "DEC", "z": "Z"})
    cat, info = sky_to_catalogue(g2, c2, W)
    cat0, info0 = sky_to_catalogue(gal, cl, W)
    np.testing.assert_array_equal(info["n_gal"], info0["n_gal"])


def test_duplicate_and_missing_ids(random_sky):
    gal, cl = random_sky(seed=5, n_gal=500, n_cl=5)
    cl.loc[3, "id"] = cl.loc[1, "id"]
    with pytest.raises(ClusterIdError, match="duplicated"):
        sky_to_catalogue(gal, cl, W)
    cl = cl.astype({"id": object})
    cl.loc[3, "id"] = None
    with pytest.raises(ClusterIdError, match="no id"):
        sky_to_catalogue(gal, cl, W)


def test_nan_coordinates(random_sky):
    gal, cl = random_sky(seed=6, n_gal=500, n_cl=5)
    gal.loc[[0, 5, 9], "dec"] = np.nan
    gal.loc[11, "z"] = np.inf
    with pytest.warns(SkyWarning, match="dropped 4 of"):
        cat, _ = sky_to_catalogue(gal, cl, W)
    assert not np.isin([0, 5, 9, 11], cat.galaxies["galaxy_row"]).any()
    cl.loc[2, "ra"] = np.nan
    with pytest.raises(CoordinateError, match="NaN"):
        sky_to_catalogue(gal.dropna(), cl, W)


def test_degrees_vs_radians(random_sky):
    gal, cl = random_sky(seed=7, n_gal=500, n_cl=5)
    rad_g = gal.assign(ra=np.radians(gal["ra"]), dec=np.radians(gal["dec"]))
    rad_c = cl.assign(ra=np.radians(cl["ra"]), dec=np.radians(cl["dec"]))
    with pytest.raises(CoordinateError, match="look like radians"):
        sky_to_catalogue(rad_g, rad_c, W)
    with pytest.raises(CoordinateError, match="look like degrees"):
        sky_to_catalogue(gal, cl, W, angle_unit="rad")
    with pytest.raises(CoordinateError, match="out of range"):
        sky_to_catalogue(gal.assign(dec=gal["dec"] + 100), cl, W)
    # radians said and given: same result as degrees
    _, i_rad = sky_to_catalogue(rad_g, rad_c, W, angle_unit="rad")
    _, i_deg = sky_to_catalogue(gal, cl, W)
    np.testing.assert_array_equal(i_rad["n_gal"], i_deg["n_gal"])
    np.testing.assert_allclose(i_rad["ra"], i_deg["ra"])


def test_flux_limit_applied_or_warned(random_sky):
    gal, cl = random_sky(seed=8, n_gal=3000, n_cl=8)
    n_faint = int((gal["mag"] > 18.0).sum())
    with pytest.warns(SkyWarning, match=f"removed {n_faint} galaxies fainter than 18"):
        cat, _ = sky_to_catalogue(gal, cl, W, mag_col="mag", mag_limit=18.0)
    assert cat.galaxies["mag_r"].max() <= 18.0
    with pytest.warns(SkyWarning, match="cannot be checked"):
        sky_to_catalogue(gal, cl, W, mag_limit=18.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sky_to_catalogue(gal, cl, W)  # no limit known: nothing to say


def test_errors_are_clustermass_errors():
    for exc in (MissingColumnError, ClusterIdError, CoordinateError):
        assert issubclass(exc, ClustermassError)


# ---------------------------------------------------------------------- readers
@pytest.mark.parametrize("ext", ["fits", "csv", "ecsv", "xml", "parquet"])
def test_read_table_formats(tmp_path, ext):
    from astropy.table import Table

    df = pd.DataFrame({"id": [1, 2, 3], "ra": [10.0, 20.0, 30.0], "dec": [-1.0, 0.0, 1.0],
                       "name": ["a", "b", "c"]})
    path = tmp_path / f"t.{ext}"
    if ext == "csv":
        df.to_csv(path, index=False)
    elif ext == "parquet":
        df.to_parquet(path)
    else:
        Table.from_pandas(df).write(path, format={"fits": "fits", "ecsv": "ascii.ecsv", "xml": "votable"}[ext])
    out = read_table(path)
    np.testing.assert_allclose(out["ra"], df["ra"])
    assert list(out["id"]) == [1, 2, 3]
    assert list(out["name"].astype(str)) == ["a", "b", "c"]
    with pytest.raises(ClustermassError, match="not found"):
        read_table(tmp_path / "missing.csv")


def test_read_authors_sdss_single_file_and_directory(tmp_path):
    clist = tmp_path / "clusters_M200c"
    clist.write_text("1 14.2 0.10\n2 13.9 0.15\n3 14.8 0.05\n")
    rng = np.random.default_rng(0)
    rows = []
    for k, n in ((1, 12), (2, 5), (3, 30)):
        xyz = np.column_stack([rng.uniform(-4, 4, n), rng.uniform(-4, 4, n), rng.uniform(-2200, 2200, n)])
        rows.append(np.column_stack([np.full(n, k), xyz]))
    gfile = tmp_path / "galaxies_XYvZ"
    np.savetxt(gfile, np.vstack(rows))
    cat = read_authors_sdss(clist, gfile)
    assert list(cat.clusters["n_gal"]) == [12, 5, 30]
    np.testing.assert_allclose(cat.clusters["log_m_ref"], [14.2, 13.9, 14.8])
    np.testing.assert_allclose(cat.points(2), rows[2][:, 1:])
    cut = read_authors_sdss(clist, gfile, window=W)
    for i in range(3):
        p = cut.points(i)
        assert (np.abs(p[:, :2]) <= 1.6).all()
        assert len(p) == ((np.abs(rows[i][:, 1:3]) <= 1.6).all(axis=1)).sum()
    # per-cluster files in a directory
    d = tmp_path / "per_cluster"
    d.mkdir()
    for k, r in zip((1, 2, 3), rows, strict=True):
        np.savetxt(d / f"cluster_{k}.txt", r[:, 1:])
    cat2 = read_authors_sdss(clist, d)
    pd.testing.assert_frame_equal(cat2.galaxies[["diagram_id", "x_proj"]], cat.galaxies[["diagram_id", "x_proj"]])
    # bad inputs
    (d / "stray_99.txt").write_text("0 0 0\n")
    with pytest.raises(ClustermassError, match="stray_99"):
        read_authors_sdss(clist, d)
    bad = tmp_path / "dup"
    bad.write_text("1 14.2 0.1\n1 14.0 0.1\n")
    with pytest.raises(ClusterIdError):
        read_authors_sdss(bad, gfile)


# ---------------------------------------------------------------------- inference and comparison
class _FakePosterior:
    def summarize(self, d):
        d = np.asarray(d, float)
        return pd.DataFrame({"d_pred": d, "log_m_map": d, "log_m_median": d, "log_m_mean": d,
                             "log_m_lo1": d - 0.1, "log_m_hi1": d + 0.2, "log_m_lo2": d - 0.3,
                             "log_m_hi2": d + 0.4, "out_of_range": np.zeros(len(d), bool)})


class _FakeBundle:
    window = W
    meta = {"training_data": {"mag_limit": 18.0, "distance_max": 250.0}}

    def predict(self, cat, rows=None, progress=False):
        rows = np.arange(len(cat)) if rows is None else rows
        return 13.0 + 0.02 * cat.clusters["n_gal"].to_numpy()[rows]

    def posterior(self):
        return _FakePosterior()


def test_infer_sky_table_columns_and_skipped_rows(random_sky):
    gal, cl = random_sky(seed=9, n_gal=3000, n_cl=6)
    cl = pd.concat([cl, pd.DataFrame({"id": [7], "ra": [160.0], "dec": [7.0], "z": [0.2]})], ignore_index=True)
    with pytest.warns(SkyWarning):
        out = infer_sky(_FakeBundle(), gal, cl, mag_col="mag")
    assert list(out.columns[:6]) == ["id", "diagram_id", "ra", "dec", "z", "n_gal"]
    for c in ("log_m_map", "log_m_lo1", "edge", "few_galaxies", "outside_training_range"):
        assert c in out.columns
    last = out.iloc[-1]
    assert last["outside_training_range"] and last["few_galaxies"] and np.isnan(last["log_m_map"])
    ok = out.iloc[:-1]
    np.testing.assert_allclose(ok["log_m_map"], 13.0 + 0.02 * ok["n_gal"])


def test_compare_with_published():
    rng = np.random.default_rng(0)
    n = 4000
    true = rng.uniform(13.8, 15.0, n)
    lo_w, hi_w = 0.1, 0.2  # asymmetric posterior widths
    # draw the predictions so that the truth is distributed as the asymmetric posterior says
    u = rng.normal(size=n)
    pred = true - np.where(u > 0, u * hi_w, u * lo_w)
    post = pd.DataFrame({"log_m_map": pred, "log_m_lo1": pred - lo_w, "log_m_hi1": pred + hi_w})
    summary, table = compare_with_published(post, true)
    assert abs(summary["mean"]) < 0.05 and abs(summary["std"] - 1.0) < 0.05
    assert abs(summary["frac_within_1sigma"] - 0.683) < 0.03
    # using the wrong side would give a visibly wrong std
    wrong = (pred - true) / np.where(true >= pred, lo_w, hi_w)
    assert abs(np.std(wrong) - 1.0) > 0.2
    s2, t2 = compare_with_published(post, true + 0.1, np.full(n, 0.05))
    assert s2["mean"] < -0.3 and "contrast_total" in t2 and s2["std_total"] < s2["std"]
    with pytest.raises(ClustermassError, match="linear"):
        compare_with_published(post, 10**true)


def test_figures(tmp_path, random_sky):
    from clustermass._io import save_figure
    from clustermass.plots.sky import (
        plot_cluster_field,
        plot_contrast_histogram,
        plot_mass_comparison,
        plot_sky_map,
    )

    rng = np.random.default_rng(0)
    pred = rng.uniform(14, 15, 50)
    post = pd.DataFrame({"log_m_map": pred, "log_m_lo1": pred - 0.1, "log_m_hi1": pred + 0.15})
    _, table = compare_with_published(post, pred + rng.normal(0, 0.1, 50), np.full(50, 0.05))
    gal, cl = random_sky(seed=10, n_gal=2000, n_cl=5)
    cat, info = sky_to_catalogue(gal, cl, W)
    figs = {
        "hist": plot_contrast_histogram(table),
        "scatter": plot_mass_comparison(table),
        "field": plot_cluster_field(cat.points(0), W.r_max, W.v_max, "cluster 100"),
        "map": plot_sky_map(gal, info),
    }
    for name, fig in figs.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        assert path.stat().st_size > 5000


def test_authors_format_through_inference(tmp_path):
    clist = tmp_path / "clusters"
    clist.write_text("7 14.2 0.10\n8 13.9 0.15\n")
    g = tmp_path / "galaxies"
    rng = np.random.default_rng(1)
    rows = np.vstack([np.column_stack([np.full(20, 7), rng.normal(0, 0.5, (20, 2)), rng.normal(0, 500, 20)]),
                      np.column_stack([np.full(2, 8), rng.normal(0, 0.5, (2, 2)), rng.normal(0, 500, 2)])])
    np.savetxt(g, rows)
    cat = read_authors_sdss(clist, g, window=W)
    table = posterior_table(_FakeBundle(), cat)
    assert list(table["id"]) == [7, 8]
    np.testing.assert_allclose(table["log_m_ref"], [14.2, 13.9])
    assert np.isfinite(table["log_m_map"][0]) and np.isnan(table["log_m_map"][1])
    assert table["few_galaxies"].tolist() == [False, True]
    summary, _ = compare_with_published(table, table["log_m_ref"], table["log_m_ref_err"])
    assert summary["n"] == 1 and summary["n_skipped"] == 1
