"""End to end: the whole `run` pipeline at the tiny preset; every output exists and parses."""

import json

import pandas as pd
import pytest
import yaml

from clustermass.config import load_config
from clustermass.pipeline import run_pipeline


@pytest.mark.slow
def test_run_pipeline_tiny(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("tiny", seed=1)
    metrics = run_pipeline(cfg, out, progress=False)

    for key in ("eps_mean", "eps_std", "coverage_68", "coverage_95", "sigma_N", "sigma_0"):
        assert key in metrics
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["eps_std"] == metrics["eps_std"]
    assert "cnn1d" in on_disk["models"]
    # the set model (issue 15) is evaluated with the same metrics, and validated, not calibrated
    assert set(on_disk["models"]["set"]) == set(on_disk["models"]["cnn1d"])
    assert json.loads((out / "models" / "set" / "validation.json").read_text())["n"] > 0

    cat = out / "catalogue"
    assert len(pd.read_parquet(cat / "clusters.parquet")) > 0
    assert len(pd.read_parquet(cat / "galaxies.parquet")) > 0
    for kind in ("cnn3d", "cnn1d"):
        bundle = out / "models" / kind
        assert (bundle / "weights.safetensors").stat().st_size > 0
        meta = json.loads((bundle / "model.json").read_text())
        assert not meta.get("calibration")  # calibrating does not rewrite model.json (issue 13)
        settings = json.loads((bundle / "calibration.json").read_text())
        assert settings["bandwidth"] == cfg.calibration.bandwidth
        assert len(pd.read_parquet(bundle / "calibration.parquet")) > 0

    post = pd.read_parquet(out / "posteriors.parquet")
    for col in ("diagram_id", "d_pred", "log_m_map", "log_m_median", "log_m_lo1", "log_m_hi1",
                "log_m_lo2", "log_m_hi2"):
        assert col in post.columns
    assert (post["log_m_lo2"] <= post["log_m_lo1"]).all() and (post["log_m_lo1"] <= post["log_m_hi1"]).all()
    assert yaml.safe_load((out / "config.yaml").read_text())["preset"] == "tiny"
    figures = list((out / "figures").glob("*.png"))
    assert len(figures) >= 3
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html

    # the calibrated classical estimators are bundles too: `infer --model RUN/models/sigma_evrard`
    from clustermass.bundle import BaselineBundle, load_model
    from clustermass.catalog import read_catalogue
    from clustermass.inference import posterior_table

    for name in ("sigma_evrard", "virial", "caustic"):
        b = load_model(out / "models" / name)
        assert isinstance(b, BaselineBundle) and b.kind == name
    cat = read_catalogue(out / "catalogue")
    rows = cat.rows("eval")
    t = posterior_table(load_model(out / "models" / "sigma_evrard"), cat, rows)
    ev = pd.read_parquet(out / "posteriors_sigma_evrard.parquet")
    ok = t["log_m_median"].notna().to_numpy() & ev["log_m_median"].notna().to_numpy()
    assert ok.sum() > 0.8 * len(rows)
    assert abs(t["log_m_median"].to_numpy()[ok] - ev["log_m_median"].to_numpy()[ok]).max() < 1e-9


@pytest.mark.slow
def test_infer_paths_with_a_trained_bundle(tmp_path):
    """`infer` on a catalogue (with per-cluster figures) and on sky tables of a mock sky."""
    from clustermass.catalog import read_catalogue, write_catalogue
    from clustermass.inference import infer_catalogue, infer_sky_tables
    from clustermass.simulate.mocksky import simulate_sky

    out = tmp_path / "run"
    run_pipeline(load_config("tiny", overrides=["evaluation.comparison_models=[]",
                                                "evaluation.baselines=false"]), out, progress=False)
    model = out / "models" / "cnn3d"
    write_catalogue(read_catalogue(out / "catalogue").subset([0, 1, 2]), tmp_path / "sub")
    t = pd.read_parquet(infer_catalogue(model, tmp_path / "sub", tmp_path / "inf", plots=True, progress=False))
    assert len(t) == 3 and (t["log_m_lo1"] <= t["log_m_hi1"]).all() and "log_m_true" in t
    assert len(list((tmp_path / "inf" / "figures").glob("posterior_*.png"))) == 3

    gal, clusters, _ = simulate_sky(area_deg2=200, seed=2)
    gal.to_parquet(tmp_path / "gal.parquet")
    clusters.to_csv(tmp_path / "clusters.csv", index=False)
    s = pd.read_parquet(infer_sky_tables(model, tmp_path / "gal.parquet", tmp_path / "clusters.csv",
                                         tmp_path / "sky", mag_col="mag_r", progress=False))
    assert len(s) == len(clusters) > 0
    assert set(s["id"]) == set(clusters["id"])
    ok = s["log_m_median"].notna()
    assert ok.any() and (s.loc[ok, "log_m_lo2"] <= s.loc[ok, "log_m_hi2"]).all()
