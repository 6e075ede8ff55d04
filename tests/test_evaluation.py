"""Evaluation on synthetic predictions with known scatter, and the evaluate() orchestration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from clustermass import evaluation as ev
from clustermass.errors import ClustermassError

SN, S0 = 0.04, 0.08


def _richness_sample(n, seed, sn=SN, s0=S0):
    rng = np.random.default_rng(seed)
    n_mem = np.round(10 ** rng.uniform(1.0, 2.6, n))  # 10 .. 400 members
    resid = rng.normal(0, np.sqrt(sn**2 * 100 / n_mem + s0**2))
    return resid, n_mem


@pytest.mark.parametrize("method", ["ml", "binned"])
def test_richness_fit_recovers_sigma_n_and_sigma_0(method):
    resid, n_mem = _richness_sample(6000, 0)
    fit = ev.fit_richness_scatter(resid, n_mem, method=method)
    for key, true in (("sigma_N", SN), ("sigma_0", S0)):
        assert 0 < fit[f"{key}_err"] < 0.006
        assert abs(fit[key] - true) < 4 * fit[f"{key}_err"], (key, fit)


def test_richness_fit_errors_are_calibrated():
    # the spread of the ML estimates over repeated samples matches the Fisher error
    fits = [ev.fit_richness_scatter(*_richness_sample(1500, s)) for s in range(30)]
    sn = np.array([f["sigma_N"] for f in fits])
    err = np.median([f["sigma_N_err"] for f in fits])
    assert abs(sn.mean() - SN) < 2 * err / np.sqrt(len(fits)) * 3
    assert 0.6 < sn.std(ddof=1) / err < 1.5


def test_richness_fit_distinguishes_pure_richness_scatter():
    resid, n_mem = _richness_sample(6000, 1, sn=0.09, s0=0.0)
    fit = ev.fit_richness_scatter(resid, n_mem)
    assert fit["sigma_N"] == pytest.approx(0.09, abs=0.006)
    assert fit["sigma_0"] < 0.02
    with pytest.raises(ClustermassError):
        ev.fit_richness_scatter(resid, n_mem, method="nope")


def test_velocity_dispersion_reference():
    assert ev.velocity_dispersion_scatter(100) == pytest.approx(3 / (np.sqrt(200) * np.log(10)))
    assert ev.velocity_dispersion_scatter(100) == pytest.approx(0.092, abs=0.001)  # paper: 0.09 dex


def test_power_law_residuals_in_true_mass_dex():
    rng = np.random.default_rng(2)
    t = rng.uniform(13.7, 15.2, 4000)
    noise = rng.normal(0, 0.1, t.size)
    pred = 1.5 + 0.9 * t + 0.9 * noise
    r, a, b = ev.power_law_residuals(t, pred)
    assert (a, b) == pytest.approx((1.5, 0.9), abs=0.05)
    assert np.std(r) == pytest.approx(0.1, rel=0.05)


def _gaussian_summary(mu, sigma, d_pred=None):
    mu = np.asarray(mu, float)
    sigma = np.broadcast_to(np.asarray(sigma, float), mu.shape)
    return pd.DataFrame(
        {
            "d_pred": mu if d_pred is None else d_pred, "log_m_map": mu, "log_m_median": mu, "log_m_mean": mu,
            "log_m_lo1": mu - sigma, "log_m_hi1": mu + sigma,
            "log_m_lo2": mu - 2 * sigma, "log_m_hi2": mu + 2 * sigma, "out_of_range": False,
        }
    )


def test_model_metrics_sign_coverage_and_scatter():
    rng = np.random.default_rng(3)
    t = rng.uniform(13.7, 15.2, 5000)
    resid, n_mem = _richness_sample(5000, 4)
    pred = t + resid
    s = np.sqrt(SN**2 * 100 / n_mem + S0**2)
    biased = ev.model_metrics(t, n_mem, _gaussian_summary(pred + 0.05, s))  # over-prediction
    assert biased["eps_mean"] == pytest.approx(0.05 + resid.mean(), abs=1e-9)  # eps = pred - true
    assert biased["coverage_68"] < 0.66
    m = ev.model_metrics(t, n_mem, _gaussian_summary(pred, s))
    assert m["eps_std"] == pytest.approx(np.std(resid), rel=0.02)
    assert m["coverage_68"] == pytest.approx(0.6827, abs=0.02)
    assert m["coverage_95"] == pytest.approx(0.9545, abs=0.01)
    assert m["max_coverage_deviation_68_95"] < 0.02
    # without a posterior the all-level deviation is unavailable (one key, one meaning)
    assert np.isnan(m["max_coverage_deviation"]) and "summary" in m["coverage_source"]
    assert m["sigma_N"] == pytest.approx(SN, abs=0.01) and m["sigma_0"] == pytest.approx(S0, abs=0.01)
    assert m["n_eval"] == 5000 and m["n_failed"] == 0
    # over-confident posteriors (half width) cover much less
    m2 = ev.model_metrics(t, n_mem, _gaussian_summary(pred, s / 2))
    assert m2["coverage_68"] == pytest.approx(2 * norm.cdf(0.5) - 1, abs=0.02)
    assert m2["max_coverage_deviation_68_95"] > 0.25


def test_binned_statistics():
    x = np.repeat([0.05, 0.15], 1000)
    y = np.concatenate([np.zeros(1000), np.linspace(-1, 1, 1000)])
    st = ev.binned_statistics(x, y, [0, 0.1, 0.2])
    assert st["n"].tolist() == [1000, 1000]
    assert st.loc[0, "std"] == 0 and st.loc[1, "mean"] == pytest.approx(0)
    assert st.loc[1, "q84"] == pytest.approx(norm.cdf(1) * 2 - 1, abs=0.01)


# ---------------------------------------------------------------------- fake catalogue + bundles
class FakeBundle:
    """predict = truth + N(0, noise) (seeded); calibrated on the test split like a real bundle."""

    def __init__(self, kind, noise, cat, seed):
        from clustermass.calibration import (
            cluster_conditions,
            fit_calibration,
            validate_conditioning,
        )
        from clustermass.config import WindowConfig

        self.kind, self.noise, self.seed, self.meta = kind, noise, seed, {}
        self.window = WindowConfig()
        rows = cat.rows("test")
        d, t = self.predict(cat, rows), cat.clusters["log_m200c"].to_numpy()[rows]
        cond = cluster_conditions(cat, rows, self.window)
        chosen, _ = validate_conditioning(d, t, cond)  # as calibrate(..., conditioning="auto")
        self._cal = fit_calibration(d, t, cond, conditioning=chosen)

    def predict(self, catalogue, rows=None, progress=False):
        rows = catalogue.rows() if rows is None else np.asarray(rows)
        t = catalogue.clusters["log_m200c"].to_numpy()[rows]
        rng = np.random.default_rng(self.seed + int(rows[0]))
        return t + rng.normal(0, self.noise, len(rows))

    def calibrated(self, required=True):
        return self._cal

    def posterior(self):
        return self._cal.posterior


def test_evaluate_predictions_writes_metrics_and_figures(tmp_path, evrard_catalogue):
    cat = evrard_catalogue()
    rows = cat.rows("eval")
    t = cat.clusters["log_m200c"].to_numpy()[rows]
    rng = np.random.default_rng(5)
    results = {"cnn3d": _gaussian_summary(t + 0.1 + rng.normal(0, 0.1, t.size), 0.1),
               "cnn1d": _gaussian_summary(t + rng.normal(0, 0.2, t.size), 0.2)}
    from clustermass.contamination import catalogue_contamination

    contam = catalogue_contamination(cat, rows)
    m = ev.evaluate_predictions(cat, rows, results, tmp_path, primary="cnn3d", contamination=contam)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ev.METRIC_KEYS:
        assert key in on_disk and key in on_disk["models"]["cnn1d"], key
    assert m["eps_mean"] == pytest.approx(0.1, abs=0.03)
    assert m["eps_mean"] == m["models"]["cnn3d"]["eps_mean"]
    assert m["models"]["cnn1d"]["eps_std"] > m["eps_std"]
    assert m["n_eval"] == len(rows)
    assert m["log_m_true_std"] == pytest.approx(np.std(t, ddof=1))
    assert m["contamination"]["n_diagrams"] == len(rows)
    assert 0 < m["contamination"]["n_contaminated"] < len(rows)
    for name in ("mass_distribution", "predictions", "method_comparison", "richness", "contamination",
                 "example_diagram"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000, name
    with pytest.raises(ClustermassError):
        ev.evaluate_predictions(cat, rows, results, None, primary="cnn2d")


def test_evaluate_with_bundles_and_baselines(tmp_path, evrard_catalogue):
    cat = evrard_catalogue(seed=1)
    bundles = {"cnn3d": FakeBundle("cnn3d", 0.08, cat, 1), "cnn1d": FakeBundle("cnn1d", 0.2, cat, 2)}
    m = ev.evaluate(bundles, cat, tmp_path, primary="cnn3d", progress=False)
    assert set(m["models"]) == {"cnn3d", "cnn1d", "sigma_evrard", "virial", "caustic"}
    post = pd.read_parquet(tmp_path / "posteriors.parquet")
    assert len(post) == len(cat.rows("eval"))
    for col in ["diagram_id", "log_m_true", *ev.SUMMARY_COLUMNS]:
        assert col in post.columns
    assert post["diagram_id"].tolist() == cat.clusters["diagram_id"].to_numpy()[cat.rows("eval")].tolist()
    for name in ("cnn1d", "sigma_evrard", "virial", "caustic"):
        assert (tmp_path / f"posteriors_{name}.parquet").is_file()
    # the caustic baseline: same metrics as the others, a loadable bundle; every model is timed
    assert set(m["models"]["caustic"]) == set(m["models"]["sigma_evrard"]) == set(m["models"]["cnn3d"])
    assert all(0 < mm["time_per_cluster_ms"] < 1e4 for mm in m["models"].values())
    assert m["time_per_cluster_ms"] == m["models"]["cnn3d"]["time_per_cluster_ms"]
    from clustermass.bundle import BaselineBundle, load_model

    cb = load_model(tmp_path / "models" / "caustic")
    assert isinstance(cb, BaselineBundle) and cb.kind == "caustic"
    assert np.isfinite(m["models"]["caustic"]["eps_std"])
    assert (tmp_path / "contamination.parquet").is_file()
    for fig in ("coverage", "pit", "coverage_by_mass", "tarp", "joint_pdf", "example_posterior"):
        assert (tmp_path / "figures" / f"{fig}.png").is_file(), fig
    # ranking: 3D better than 1D; the sigma-based baseline recovers mass (~0.1-0.2 dex here)
    assert m["models"]["cnn3d"]["eps_std"] < m["models"]["cnn1d"]["eps_std"]
    assert m["models"]["sigma_evrard"]["eps_std"] < 0.3
    assert m["eps_std"] == pytest.approx(0.08, rel=0.25)
    # per-group calibration, with the same table builder for networks and baselines
    for name in ("cnn3d", "sigma_evrard"):
        groups = pd.DataFrame(m["models"][name]["groups"])
        assert {"z", "n_gal", "d_pred", "log_m_true"} <= set(groups["group"])
        assert (groups.loc[groups["n"] >= 10, "coverage_68_err"] > 0).all()
    assert (tmp_path / "figures" / "group_calibration.png").is_file()
    # these mocks all lie at one redshift: z cannot be conditioned on, and the check picks d_pred
    assert post["conditioned_on"].eq("+".join(bundles["cnn3d"].calibrated().conditioning)).all()
    # the full coverage curve comes from the posterior's CDF (PIT) when it has one
    assert "CDF" in m["coverage_source"] and m["max_coverage_deviation"] < 0.15
    assert 0 <= m["tarp_max_deviation"] < 0.2 and 0 <= m["pit_ks_pvalue"] <= 1
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["primary"] == "cnn3d"
    # the PIT/TARP arrays feed the figures but stay out of metrics.json
    for mm in (m, on_disk, *on_disk["models"].values()):
        assert not {"_diagnostics", "pit", "tarp"} & set(mm)


def test_evaluate_with_real_joint_kde_posterior(tmp_path, evrard_catalogue):
    cat = evrard_catalogue(n_test=300, n_eval=100, seed=2, halos=False)
    m = ev.evaluate({}, cat, tmp_path, primary="cnn3d", progress=False, figures=False)
    assert m["primary"] == "sigma_evrard"  # falls back to the first available method
    assert "primary model 'cnn3d' absent" in m["notes"][0]
    assert m["contamination"] == {"available": False}
    assert 0.4 < m["coverage_68"] < 0.95


def test_calibrate_and_summarize_keeps_failed_rows():
    rng = np.random.default_rng(7)
    t = rng.uniform(13.7, 15, 200)
    d = 0.5 * t + 7 + rng.normal(0, 0.05, 200)
    d[:3] = np.nan  # failed estimates are left out of the calibration
    d_eval = np.array([14.0, np.nan, 14.5])
    summary, post = ev.calibrate_and_summarize(d, t, d_eval)
    assert len(summary) == 3 and np.isnan(summary.loc[1, "log_m_median"])
    assert summary["d_pred"].iloc[[0, 2]].tolist() == [14.0, 14.5]
    # a NaN d is flagged out of range, as JointKDEPosterior.summarize does for the networks
    assert summary["out_of_range"].tolist() == [False, True, False]
    assert summary.loc[2, "log_m_median"] == pytest.approx((14.5 - 7) / 0.5, abs=0.05)
    m = ev.model_metrics([14.0, 14.2, 15.0], [50, 50, 50], summary)
    assert m["n_eval"] == 2 and m["n_failed"] == 1
    with pytest.raises(ClustermassError):
        ev.calibrate_and_summarize(np.full(20, np.nan), t[:20], d_eval)
