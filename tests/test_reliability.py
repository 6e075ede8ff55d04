"""Bad inputs and faults: clear errors, flags instead of silent answers, nothing overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from clustermass.catalog import Catalogue, read_catalogue, write_catalogue
from clustermass.config import KDEConfig, TrainingConfig, WindowConfig
from clustermass.errors import (
    CatalogueError,
    ClustermassError,
    OutOfDistributionWarning,
    OutputExistsError,
    UnitError,
    UnitWarning,
)
from clustermass.inference import compare_tables, infer_catalogue, posterior_table
from clustermass.sky import SkyWarning, sky_to_catalogue

W = WindowConfig()
KDE = KDEConfig(n_grid=16, bandwidth=0.5)


def _catalogue(n=40, seed=0, redshift=0.05):
    """Diagrams whose v_los spread grows with mass; a 'train' and a 'test' split."""
    rng = np.random.default_rng(seed)
    cl, gal = [], []
    for i in range(n):
        logm = rng.uniform(13.7, 15.2)
        sig = 600.0 * 10 ** ((logm - 14.5) / 3)
        k = int(rng.integers(20, 40))
        cl.append(dict(diagram_id=i, halo_id=i, split="train" if i < 3 * n // 4 else "test", log_m200c=logm,
                       r200c=1.0, v200c=sig, redshift=redshift, n_gal=k, n_mem=k))
        gal.append(pd.DataFrame(dict(diagram_id=i, x_proj=rng.uniform(-1.5, 1.5, k),
                                     y_proj=rng.uniform(-1.5, 1.5, k),
                                     v_los=np.clip(rng.normal(0, sig, k), -2150, 2150))))
    meta = {"simulation": {"mag_limit": 17.77, "distance_min": 40.0, "distance_max": 250.0}}
    return Catalogue(pd.DataFrame(cl), pd.concat(gal, ignore_index=True), None, meta)


def _training(**kw):
    return TrainingConfig(**{"lr": 1e-3, "max_epochs": 2, "patience": 2, "batch_size": 10, **kw})


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A tiny trained and calibrated CNN_1D bundle (seconds)."""
    from clustermass.training import train_model

    cat = _catalogue()
    out = tmp_path_factory.mktemp("bundle") / "cnn1d"
    b = train_model(cat, "cnn1d", W, KDE, _training(), seed=0, out_dir=out, progress=False)
    rng = np.random.default_rng(1)
    m = rng.uniform(13.7, 15.2, 400)
    b.set_calibration(m + rng.normal(0, 0.15, 400), m, bandwidth=0.2)
    return out


def cli(*args):
    return subprocess.run([sys.executable, "-m", "clustermass.cli", *args], capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------- training faults
def test_diverging_training_writes_no_bundle(tmp_path):
    from clustermass.training import train_model

    with pytest.raises(ClustermassError, match="diverged"):
        train_model(_catalogue(), "cnn1d", W, KDE, _training(lr=1e8), seed=0, out_dir=tmp_path / "m",
                    progress=False)
    assert not (tmp_path / "m" / "model.json").exists()


@pytest.mark.parametrize("fault", ["truncated", "pickled"])
def test_unreadable_checkpoint_starts_over_with_a_warning(tmp_path, fault):
    from clustermass.training import train_model

    cat, out = _catalogue(), tmp_path / "m"
    train_model(cat, "cnn1d", W, KDE, _training(), seed=0, out_dir=out, progress=False)
    last = out / "checkpoints" / "last.ckpt"
    run = json.loads((out / "checkpoints" / "run.json").read_text())
    (out / "checkpoints" / "run.json").write_text(json.dumps({**run, "completed": False}))  # "interrupted"
    if fault == "truncated":  # disk full
        last.write_bytes(last.read_bytes()[:200])
    else:  # a checkpoint holding an arbitrary pickled object
        ckpt = torch.load(last, weights_only=True)
        ckpt["extra"] = SkyWarning("not a tensor")
        torch.save(ckpt, last)
    with pytest.warns(UserWarning, match="starting the training over"):
        b = train_model(cat, "cnn1d", W, KDE, _training(), seed=0, out_dir=out, progress=False)
    assert len(b.meta["training"]["history"]) == 2


# ---------------------------------------------------------------------- overwriting
def test_train_refuses_to_replace_another_bundle(tmp_path, bundle_dir):
    import shutil

    from clustermass.training import train_model

    out = tmp_path / "cnn3d_calibrated"
    shutil.copytree(bundle_dir, out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        train_model(_catalogue(), "cnn2d", W, KDE, _training(), seed=0, out_dir=out, progress=False)
    assert json.loads((out / "model.json").read_text())["kind"] == "cnn1d"
    train_model(_catalogue(), "cnn2d", W, KDE, _training(), seed=0, out_dir=out, progress=False, overwrite=True)
    assert json.loads((out / "model.json").read_text())["kind"] == "cnn2d"


def test_same_training_reruns_in_place(tmp_path):
    from clustermass.training import train_model

    out = tmp_path / "m"
    train_model(_catalogue(), "cnn1d", W, KDE, _training(), seed=0, out_dir=out, progress=False)
    train_model(_catalogue(), "cnn1d", W, KDE, _training(), seed=0, out_dir=out, progress=False)


def test_simulate_refuses_another_catalogue(tmp_path):
    from clustermass.config import load_config
    from clustermass.pipeline import simulate_stage

    sets = ["simulation.n_train=20", "simulation.n_test=10", "simulation.n_eval=10"]
    simulate_stage(load_config("tiny", overrides=sets, seed=1), tmp_path / "c", progress=False)
    before = (tmp_path / "c" / "clusters.parquet").read_bytes()
    simulate_stage(load_config("tiny", overrides=sets, seed=1), tmp_path / "c", progress=False)  # same: fine
    with pytest.raises(OutputExistsError):
        simulate_stage(load_config("tiny", overrides=sets, seed=2), tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "clusters.parquet").read_bytes() == before
    simulate_stage(load_config("tiny", overrides=sets, seed=2), tmp_path / "c", progress=False, overwrite=True)
    assert (tmp_path / "c" / "clusters.parquet").read_bytes() != before


def test_infer_refuses_to_replace_an_evaluation(tmp_path, bundle_dir):
    write_catalogue(_catalogue(n=8, seed=3), tmp_path / "cat")
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"diagram_id": [0]}).to_parquet(run / "posteriors.parquet")  # as `evaluate` writes it
    with pytest.raises(OutputExistsError):
        infer_catalogue(bundle_dir, tmp_path / "cat", run, progress=False)
    infer_catalogue(bundle_dir, tmp_path / "cat", tmp_path / "inf", progress=False)
    infer_catalogue(bundle_dir, tmp_path / "cat", tmp_path / "inf", progress=False)  # same inputs: in place
    res = cli("infer", "--model", str(bundle_dir), "--data", str(tmp_path / "cat"), "--out", str(run), "-q")
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------- catalogue path
def test_catalogue_diagrams_that_cannot_be_trusted_are_flagged(bundle_dir, tmp_path):
    from clustermass.bundle import load_model

    cl = pd.DataFrame(dict(diagram_id=range(6), halo_id=range(6), split="none", log_m200c=np.nan,
                           r200c=np.nan, v200c=np.nan, redshift=0.05, n_gal=[30, 2, 10, 10, 10, 10],
                           n_mem=-1))
    rng = np.random.default_rng(0)
    gal = [pd.DataFrame(dict(diagram_id=0, x_proj=rng.uniform(-1, 1, 30), y_proj=rng.uniform(-1, 1, 30),
                             v_los=rng.normal(0, 500, 30))),
           pd.DataFrame(dict(diagram_id=1, x_proj=[0.1, 0.2], y_proj=[0.0, 0.1], v_los=[10.0, 20.0])),
           pd.DataFrame(dict(diagram_id=2, x_proj=np.zeros(10), y_proj=np.zeros(10), v_los=np.zeros(10))),
           pd.DataFrame(dict(diagram_id=3, x_proj=np.linspace(-1, 1, 10), y_proj=np.linspace(-1, 1, 10),
                             v_los=np.linspace(-500, 500, 10))),
           pd.DataFrame(dict(diagram_id=4, x_proj=np.full(10, 1e30), y_proj=np.zeros(10), v_los=np.zeros(10))),
           pd.DataFrame(dict(diagram_id=5, x_proj=rng.uniform(-1, 1, 10), y_proj=rng.uniform(-1, 1, 10),
                             v_los=np.full(10, 9000.0)))]
    cat = Catalogue(cl, pd.concat(gal, ignore_index=True))
    t = posterior_table(load_model(bundle_dir), cat)
    assert not t.loc[0, ["few_galaxies", "degenerate", "outside_window"]].any()
    assert np.isfinite(t.loc[0, "log_m_median"])
    assert t.loc[1, "few_galaxies"]
    assert t.loc[2, "degenerate"] and t.loc[3, "degenerate"]
    assert t.loc[4, "outside_window"] and t.loc[5, "outside_window"]
    assert t.loc[1:, "log_m_median"].isna().all() and t.loc[1:, "out_of_range"].all()


def test_catalogue_units_are_checked_on_read(tmp_path):
    cat = _catalogue(n=6)
    write_catalogue(cat, tmp_path / "ok")
    read_catalogue(tmp_path / "ok")
    ms = Catalogue(cat.clusters, cat.galaxies.assign(v_los=cat.galaxies["v_los"] * 1000.0), None, cat.meta)
    write_catalogue(ms, tmp_path / "ms")
    with pytest.warns(UnitWarning, match="m/s"):
        read_catalogue(tmp_path / "ms")
    kpc = Catalogue(cat.clusters, cat.galaxies.assign(x_proj=cat.galaxies["x_proj"] * 1000.0,
                                                      y_proj=cat.galaxies["y_proj"] * 1000.0), None, cat.meta)
    write_catalogue(kpc, tmp_path / "kpc")
    with pytest.warns(UnitWarning, match="kpc"):
        read_catalogue(tmp_path / "kpc")
    # a foreign parquet whose metadata declares other units is refused
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(cat.galaxies, preserve_index=False)
    md = {b"clustermass.units": json.dumps({"v_los": "m/s"}).encode()}
    pq.write_table(table.replace_schema_metadata(md), tmp_path / "ok" / "galaxies.parquet")
    with pytest.raises(CatalogueError, match="m/s"):
        read_catalogue(tmp_path / "ok")


def test_negative_richness_is_refused():
    cat = _catalogue(n=4)
    with pytest.raises(CatalogueError, match="n_gal"):
        Catalogue(cat.clusters.assign(n_gal=-3), cat.galaxies)


def test_out_of_distribution_warning_and_strict(tmp_path, bundle_dir):
    far = _catalogue(n=6, seed=5, redshift=0.3)  # ~ 830 h^-1 Mpc, beyond the training distance
    write_catalogue(far, tmp_path / "far")
    with pytest.warns(OutOfDistributionWarning, match=r"outside_training_range \(6 of 6\)"):
        infer_catalogue(bundle_dir, tmp_path / "far", tmp_path / "a", progress=False)
    with pytest.raises(ClustermassError, match="strict"):
        infer_catalogue(bundle_dir, tmp_path / "far", tmp_path / "b", progress=False, strict=True)
    assert not (tmp_path / "b" / "posteriors.parquet").exists()
    near = _catalogue(n=6, seed=5, redshift=0.005)  # ~ 15 h^-1 Mpc, nearer than the training minimum
    write_catalogue(near, tmp_path / "near")
    with pytest.warns(OutOfDistributionWarning, match="outside_training_range"):
        infer_catalogue(bundle_dir, tmp_path / "near", tmp_path / "c", progress=False)
    res = cli("infer", "--model", str(bundle_dir), "--data", str(tmp_path / "far"), "--out",
              str(tmp_path / "d"), "--strict", "-q")
    assert res.returncode == 2 and res.stderr.startswith("error: --strict")


def test_bundle_records_the_training_distance_range(bundle_dir):
    meta = json.loads((bundle_dir / "model.json").read_text())
    assert meta["training_data"]["distance_min"] == 40.0 and meta["training_data"]["distance_max"] == 250.0


# ---------------------------------------------------------------------- sky tables
def _sky(seed=0, n_cl=4, k=60):
    rng = np.random.default_rng(seed)
    cl = pd.DataFrame({"id": np.arange(n_cl), "ra": rng.uniform(150, 160, n_cl), "dec": rng.uniform(0, 10, n_cl),
                       "z": rng.uniform(0.03, 0.05, n_cl)})
    cen = cl.loc[np.repeat(np.arange(n_cl), k)].reset_index(drop=True)
    gal = pd.DataFrame({"ra": cen["ra"] + rng.normal(0, 0.2, n_cl * k), "dec": cen["dec"] + rng.normal(0, 0.2, n_cl * k),
                        "z": cen["z"] + rng.normal(0, 0.002, n_cl * k), "mag": rng.uniform(13, 17.5, n_cl * k)})
    return gal, cl


def test_fits_ra_in_hours_is_converted(tmp_path):
    from astropy.table import Table

    from clustermass.sky import read_table

    gal, cl = _sky()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkyWarning)
        _, ref = sky_to_catalogue(gal, cl, W)
        t = Table.from_pandas(gal.assign(ra=gal["ra"] / 15.0))
        t["ra"].unit = "h"
        t.write(tmp_path / "gal.fits")
        g = read_table(tmp_path / "gal.fits")
        assert g.attrs["units"]["ra"] == "h"
        _, info = sky_to_catalogue(g, cl, W)
    np.testing.assert_array_equal(info["n_gal"], ref["n_gal"])
    t["ra"].unit = "m"
    t.write(tmp_path / "bad.fits")
    with pytest.raises(UnitError, match="not an angle"):
        sky_to_catalogue(read_table(tmp_path / "bad.fits"), cl, W)


def test_redshift_given_as_cz_and_high_redshift_clusters():
    gal, cl = _sky()
    with pytest.raises(UnitError, match="cz"):
        sky_to_catalogue(gal, cl.assign(z=cl["z"] * 299792.458), W)
    with pytest.raises(UnitError, match="cz"):
        sky_to_catalogue(gal.assign(z=gal["z"] * 299792.458), cl, W)
    far = pd.concat([cl, pd.DataFrame({"id": [99], "ra": [155.0], "dec": [5.0], "z": [1.5]})], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkyWarning)
        _, info = sky_to_catalogue(gal, far, W, distance_max=250.0)
    assert info["outside_training_range"].iloc[-1] and not info["outside_training_range"].iloc[0]


def test_fluxes_are_not_taken_for_magnitudes():
    gal, cl = _sky()
    flux = 10 ** ((22.5 - gal["mag"]) / 2.5)  # nanomaggies
    with pytest.raises(UnitError, match="flux"):
        sky_to_catalogue(gal.assign(flux_r=flux), cl, W, mag_col="flux_r", mag_limit=16.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkyWarning)
        cat_m, info_m = sky_to_catalogue(gal, cl, W, mag_col="mag", mag_limit=16.0)
        cat_f, info_f = sky_to_catalogue(gal.assign(flux_r=flux), cl, W, flux_col="flux_r", mag_limit=16.0)
    np.testing.assert_array_equal(info_m["n_gal"], info_f["n_gal"])
    np.testing.assert_allclose(cat_f.galaxies["mag_r"], cat_m.galaxies["mag_r"], atol=1e-9)


def test_galaxies_without_magnitudes_are_kept_and_counted():
    gal, cl = _sky()
    gal.loc[:9, "mag"] = np.nan  # e.g. bright central galaxies whose photometry failed
    with pytest.warns(SkyWarning, match="kept 10 galaxies without a magnitude"):
        cat, info = sky_to_catalogue(gal, cl, W, mag_col="mag", mag_limit=18.0)
    assert cat.meta["n_galaxies_without_magnitude"] == 10
    assert set(range(10)) <= set(cat.galaxies["galaxy_row"])


def test_repeat_spectra_are_merged():
    gal, cl = _sky()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkyWarning)
        _, ref = sky_to_catalogue(gal, cl, W)
    twins = gal.iloc[:50].assign(ra=gal["ra"].iloc[:50] + 0.1 / 3600, z=gal["z"].iloc[:50] + 1e-5, mag=np.nan)
    with pytest.warns(SkyWarning, match="merged 50 repeat spectra"):
        cat, info = sky_to_catalogue(pd.concat([twins, gal], ignore_index=True), cl, W, mag_col="mag")
    np.testing.assert_array_equal(info["n_gal"], ref["n_gal"])
    assert cat.galaxies["galaxy_row"].min() >= 50  # the copy with a magnitude was kept


def test_member_lists_get_no_footprint_edge_flag():
    gal, cl = _sky()
    with pytest.warns(SkyWarning, match="member lists"):
        _, info = sky_to_catalogue(gal, cl, W)
    assert not info["edge"].any() and info["empty_fraction"].isna().all()


def test_desi_column_names_and_separate_cluster_columns():
    gal, cl = _sky()
    flux = 10 ** ((22.5 - gal["mag"]) / 2.5)
    desi = pd.DataFrame({"mean_fiber_ra": gal["ra"], "mean_fiber_dec": gal["dec"], "z": gal["z"], "flux_r": flux})
    clusters = cl.rename(columns={"ra": "ra_bcg_deg", "dec": "dec_bcg_deg", "z": "z_cl_mean"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkyWarning)
        _, ref = sky_to_catalogue(gal, cl, W, mag_col="mag", mag_limit=16.5)
        with pytest.warns(SkyWarning, match="flux_r"):
            _, info = sky_to_catalogue(desi, clusters, W, cluster_ra_col="ra_bcg_deg", cluster_dec_col="dec_bcg_deg",
                                       cluster_z_col="z_cl_mean", mag_limit=16.5)
    np.testing.assert_array_equal(info["n_gal"], ref["n_gal"])


def test_cli_names_the_flag_of_a_missing_cluster_column(tmp_path, bundle_dir):
    gal, cl = _sky()
    gal.to_csv(tmp_path / "g.csv", index=False)
    cl.rename(columns={"ra": "ra_bcg"}).drop(columns="dec").to_csv(tmp_path / "c.csv", index=False)
    res = cli("infer", "--model", str(bundle_dir), "--galaxies", str(tmp_path / "g.csv"), "--clusters",
              str(tmp_path / "c.csv"), "--out", str(tmp_path / "o"), "-q")
    assert res.returncode == 2 and "--cluster-dec-col" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------- comparison
def test_compare_excludes_flagged_and_names_columns(tmp_path):
    n = 10
    post = pd.DataFrame({"id": np.arange(n), "z": 0.05, "log_m_map": 14.5, "log_m_lo1": 14.3,
                         "log_m_hi1": 14.7, "edge": [True] + [False] * (n - 1),
                         "outside_training_range": [False, True] + [False] * (n - 2),
                         "out_of_range": False})
    ref = pd.DataFrame({"id": np.arange(n), "z": 0.051, "log_m200c": 14.6, "err": [0.1] * (n - 1) + [0.0]})
    post.to_parquet(tmp_path / "p.parquet")
    ref.to_csv(tmp_path / "r.csv", index=False)
    s = compare_tables(tmp_path / "p.parquet", tmp_path / "r.csv", tmp_path / "o", err_col="err")
    assert s["n_matched"] == 10 and s["n_excluded_flagged"] == 2 and s["n"] == 8
    assert s["n_total"] == 7  # one published error is 0
    table = pd.read_parquet(tmp_path / "o" / "comparison.parquet")
    assert {"z", "z_ref"} <= set(table.columns) and "z_x" not in table.columns
    s_all = compare_tables(tmp_path / "p.parquet", tmp_path / "r.csv", tmp_path / "o2", include_flagged=True)
    assert s_all["n"] == 10 and s_all["n_excluded_flagged"] == 0


def test_infer_with_the_mass_function_prior(tmp_path, bundle_dir):
    """``infer --prior mass-function`` through the CLI: a steeply falling prior moves every
    posterior median down (never up), the table records the prior, and ``massfunction`` refuses
    it under another prior with a one-line error."""
    write_catalogue(_catalogue(n=12, seed=4), tmp_path / "cat")
    tables = {}
    for prior in ("flat", "mass-function"):
        res = cli("infer", "--model", str(bundle_dir), "--data", str(tmp_path / "cat"), "--out",
                  str(tmp_path / prior), "--prior", prior, "-q")
        assert res.returncode == 0, res.stderr
        tables[prior] = pd.read_parquet(tmp_path / prior / "posteriors.parquet")
    flat, mf = tables["flat"], tables["mass-function"]
    assert (mf["prior"] == "mass-function").all() and (flat["prior"] == "flat").all()
    ok = np.isfinite(flat["log_m_median"]).to_numpy()
    assert ok.sum() >= 6
    shift = (mf["log_m_median"] - flat["log_m_median"]).to_numpy()[ok]
    assert (shift <= 1e-9).all() and (shift < -0.005).any(), shift
    res = cli("massfunction", "--posteriors", str(tmp_path / "mass-function" / "posteriors.parquet"), "--out",
              str(tmp_path / "mfn"), "--area", "100", "--distance-max", "200", "--prior", "flat")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
