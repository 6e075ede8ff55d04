"""Joint-KDE posterior: closed form against scipy, out-of-range rule, calibration diagnostics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr
from scipy.stats import gaussian_kde

from clustermass._io import save_figure
from clustermass.diagnostics import (
    calibration_metrics,
    coverage_by_mass,
    coverage_curve,
    pit_values,
    tarp_test,
)
from clustermass.errors import ClustermassError
from clustermass.posterior import QUANTILES, SUMMARY_COLUMNS, CalibrationError, JointKDEPosterior


def _synthetic(n, seed, noise=0.15, skew=0.0):
    """log M uniform in [13.7, 15.2]; d = M + N(0, noise) (+ an optional curved bias)."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(13.7, 15.2, n)
    d = m + rng.normal(0.0, noise, n) + skew * (m - 14.0) ** 2
    return d, m


@pytest.fixture(scope="module")
def small():
    d, m = _synthetic(800, seed=1, skew=0.1)
    return d, m, JointKDEPosterior(bandwidth=0.2).fit(d, m)


@pytest.fixture(scope="module")
def calibrated():
    d, m = _synthetic(4000, seed=2)
    return JointKDEPosterior().fit(d, m)


def _brute_force(kde, d, lo=12.8, hi=16.2, n=30_001):
    """Summaries of scipy's joint KDE sliced at d on a fine grid (trapezoidal CDF)."""
    g = np.linspace(lo, hi, n)
    y = kde(np.vstack([np.full_like(g, d), g]))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(g))])
    y, cdf = y / cdf[-1], cdf / cdf[-1]
    out = {k: np.interp(q, cdf, g) for k, q in QUANTILES.items()}
    out["log_m_mean"] = np.trapezoid(y * g, g)
    i = np.argmax(y)  # parabolic refinement of the grid maximum
    y0, y1, y2 = y[i - 1 : i + 2]
    out["log_m_map"] = g[i] + 0.5 * (g[1] - g[0]) * (y0 - y2) / (y0 - 2 * y1 + y2)
    return out, g, y


def test_kernel_matches_scipy_convention(small):
    d, m, post = small
    kde = gaussian_kde(np.vstack([d, m]), bw_method=0.2)
    np.testing.assert_allclose(post.kernel_covariance_, kde.covariance, rtol=1e-12)


@pytest.mark.parametrize("d_obs", [13.75, 14.1, 14.6, 15.05, 15.3])
def test_summaries_match_brute_force_scipy_slice(small, d_obs):
    d, m, post = small
    kde = gaussian_kde(np.vstack([d, m]), bw_method=0.2)
    ref, g, y = _brute_force(kde, d_obs)
    row = post.summarize([d_obs], method="exact").iloc[0]
    assert not row.out_of_range
    for k, v in ref.items():
        assert abs(row[k] - v) < 1e-5, (k, row[k], v)  # requirement: 0.002 dex; measured ~1e-7
    # the closed-form density is the normalised slice itself
    np.testing.assert_allclose(post.pdf([d_obs], g)[0], y, rtol=1e-6, atol=1e-9 * y.max())


def test_window_truncation_is_negligible(small):
    d, m, post = small
    wide = JointKDEPosterior(window=40.0).fit(d, m)  # keeps every component
    narrow = JointKDEPosterior(window=3.0).fit(d, m)  # drops visible mass: must differ
    dq = [13.7, 14.3, 15.1]
    cols = [c for c in SUMMARY_COLUMNS if c != "d_pred"]
    a, b, c = (p.summarize(dq, method="exact")[cols].to_numpy() for p in (post, wide, narrow))
    assert post.truncation_bound_ < 1e-9
    assert np.abs(a - b).max() < 1e-8
    assert np.abs(a - c).max() > 1e-5


def test_cdf_at_quantiles_and_monotone_columns(small):
    _, _, post = small
    dq = np.linspace(13.6, 15.4, 7)
    tab = post.summarize(dq, method="exact")
    names = list(QUANTILES)
    cdf = post.cdf(dq, tab[names].to_numpy())
    np.testing.assert_allclose(cdf, np.broadcast_to(list(QUANTILES.values()), cdf.shape), atol=1e-7)
    vals = tab[["log_m_lo2", "log_m_lo1", "log_m_median", "log_m_hi1", "log_m_hi2"]].to_numpy()
    assert np.all(np.diff(vals, axis=1) > 0)
    assert list(tab.columns) == [*SUMMARY_COLUMNS, "out_of_range"]


def test_interpolated_equals_exact(calibrated):
    post = calibrated
    rng = np.random.default_rng(5)
    dq = np.concatenate([rng.uniform(*post.d_range_, 300), [10.0, 20.0]])
    ex = post.summarize(dq, method="exact")
    it = post.summarize(dq, method="interpolate")
    cols = [c for c in SUMMARY_COLUMNS if c != "d_pred"]
    err = np.abs(ex[cols].to_numpy() - it[cols].to_numpy())
    assert post.interp_error_ <= post.interp_tol
    assert err[:, 1:].max() < 2e-5  # quantiles and mean
    assert np.mean(err[:, 0] < 2e-5) > 0.98  # MAP (may differ only where two modes tie)


def test_cells_failing_interp_tol_are_computed_exactly(monkeypatch):
    """After the last halving, cells whose midpoint check still fails go to the exact path."""
    import clustermass.posterior as cp

    monkeypatch.setattr(cp, "_MAX_HALVINGS", 0)  # no refinement: some cells must fail 1e-7
    d, m = _synthetic(800, seed=1, skew=0.1)
    post = JointKDEPosterior(interp_tol=1e-7).fit(d, m)
    dq = np.random.default_rng(0).uniform(*post.d_range_, 2000)
    it = post.summarize(dq, method="interpolate")
    ex = post.summarize(dq, method="exact")
    n_bad = sum(int(bad.sum()) for *_, bad in post._nodes)
    n_cells = sum(bad.size for *_, bad in post._nodes)
    assert 0 < n_bad < n_cells
    assert post.interp_error_ <= post.interp_tol
    cols = ["log_m_median", "log_m_mean", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2"]
    err = np.abs(ex[cols].to_numpy() - it[cols].to_numpy()).max(1)
    assert err.max() < 2 * post.interp_tol  # plain splines here err by ~3e-7
    assert np.any(err < 1e-12)  # the d in failed cells were computed exactly


def test_out_of_range_returns_edge_posterior(calibrated):
    post = calibrated
    (lo, hi), = post.valid_intervals_
    assert post.d_range_[0] <= lo < hi <= post.d_range_[1]
    tab = post.summarize([lo - 1.0, lo - 1e-3, lo, 14.4, hi, hi + 0.5, np.nan])
    assert tab.out_of_range.tolist() == [True, True, False, False, False, True, True]
    cols = [c for c in SUMMARY_COLUMNS if c != "d_pred"]
    np.testing.assert_allclose(tab.loc[0, cols].to_numpy(float), tab.loc[2, cols].to_numpy(float), atol=1e-12)
    np.testing.assert_allclose(tab.loc[5, cols].to_numpy(float), tab.loc[4, cols].to_numpy(float), atol=1e-12)
    assert tab.loc[0, "d_pred"] == lo - 1.0  # the input is kept, not replaced
    assert tab.loc[6, cols].isna().all()
    # pdf, cdf and sample follow the same rule
    g = np.linspace(12, 17, 801)
    np.testing.assert_allclose(post.pdf([hi + 3.0], g), post.pdf([hi], g), atol=1e-12)
    assert post.out_of_range([hi + 3.0, 14.4]).tolist() == [True, False]


def test_density_gap_is_out_of_range():
    rng = np.random.default_rng(3)
    m = np.concatenate([rng.uniform(13.7, 14.2, 1500), rng.uniform(14.9, 15.2, 1500)])
    d = m + rng.normal(0, 0.03, m.size)
    d[0] = 16.5  # a lone outlier extends the raw range but not the covered one
    post = JointKDEPosterior().fit(d, m)
    iv = post.valid_intervals_
    assert iv.shape == (2, 2) and iv[0, 1] < 14.55 < iv[1, 0] and iv[1, 1] < 15.6
    tab = post.summarize([iv[0, 1] + 0.01, iv[1, 0] - 0.01, 16.4, 14.0])
    assert tab.out_of_range.tolist() == [True, True, True, False]
    edge = post.summarize([iv[0, 1], iv[1, 0], iv[1, 1]])
    np.testing.assert_allclose(tab.log_m_median.to_numpy()[:3], edge.log_m_median.to_numpy(), atol=1e-12)


def test_pdf_integrates_to_one_and_samples_match(calibrated):
    post = calibrated
    dq = np.array([13.6, 14.0, 14.7, 15.3, 17.0])
    g = np.linspace(12.5, 16.5, 4001)
    integ = np.trapezoid(post.pdf(dq, g), g, axis=1)
    np.testing.assert_allclose(integ, 1.0, atol=1e-6)
    smp = post.sample(dq, 40_000, seed=7)
    assert smp.shape == (5, 40_000)
    tab = post.summarize(dq, method="exact")
    for k, q in QUANTILES.items():
        np.testing.assert_allclose(np.quantile(smp, q, axis=1), tab[k], atol=0.006)
    np.testing.assert_allclose(smp.mean(1), tab.log_m_mean, atol=0.004)
    np.testing.assert_array_equal(post.sample(dq, 10, seed=1), post.sample(dq, 10, seed=1))


def test_calibration_on_synthetic_data_with_known_posterior(calibrated):
    post = calibrated
    d, m = _synthetic(3000, seed=11)
    met = calibration_metrics(post, d, m)
    assert abs(met["coverage_68"] - met["nominal_68"]) < 0.03
    assert abs(met["coverage_95"] - met["nominal_95"]) < 0.015
    assert met["max_coverage_deviation"] < 0.04
    assert met["pit_ks_pvalue"] > 0.01
    assert met["tarp_max_deviation"] < 0.04
    # the arrays behind the numbers come along (reused by the evaluation figures)
    np.testing.assert_array_equal(met["pit"], pit_values(post, d, m))
    assert met["tarp"]["max_deviation"] == met["tarp_max_deviation"] and met["tarp"]["ecp"].shape == (101,)
    # PIT histogram flat: every decile within 4 binomial sigma of 10%
    counts = np.histogram(pit_values(post, d, m), bins=10, range=(0, 1))[0] / m.size
    assert np.all(np.abs(counts - 0.1) < 4 * np.sqrt(0.09 / m.size))
    # the table agrees with the PIT-based coverage
    tab = post.summarize(d)
    inside = ((m >= tab.log_m_lo1) & (m <= tab.log_m_hi1)).mean()
    assert abs(inside - met["coverage_68"]) < 2e-3
    # the known posterior: flat prior x N(d; M, 0.15) -> median ~ d, width ~ 0.15 at mid-range
    mid = post.summarize([14.45], method="exact").iloc[0]
    assert abs(mid.log_m_median - 14.45) < 0.02
    assert 0.14 < 0.5 * (mid.log_m_hi1 - mid.log_m_lo1) < 0.17


def test_diagnostics_detect_overconfidence():
    d, m = _synthetic(3000, seed=4, noise=0.07)  # calibration narrower than the truth
    post = JointKDEPosterior().fit(d, m)
    de, me = _synthetic(2000, seed=12, noise=0.15)
    met = calibration_metrics(post, de, me)
    assert met["coverage_68"] < 0.5 and met["max_coverage_deviation"] > 0.2
    assert met["pit_ks_pvalue"] < 1e-6 and met["tarp_max_deviation"] > 0.1


def test_coverage_functions(calibrated):
    post = calibrated
    d, m = _synthetic(1500, seed=21)
    levels = np.linspace(0, 1, 11)
    cov = coverage_curve(post, d, m, levels)
    assert cov.shape == (11,) and cov[0] == 0 and cov[-1] == 1 and np.all(np.diff(cov) >= 0)
    assert np.max(np.abs(cov - levels)) < 0.05
    tab = coverage_by_mass(post, d, m, bins=3)
    assert list(tab.columns) == ["log_m_lo", "log_m_hi", "log_m_mid", "n", "coverage_68", "error_68", "coverage_95", "error_95"]
    assert tab.n.sum() == 1500
    pd.testing.assert_frame_equal(coverage_by_mass(post, d, m, bins=3, pit=pit_values(post, d, m)), tab)
    assert np.all(np.abs(tab.coverage_68 - 0.68) < 4 * tab.error_68 + 0.02)
    t = tarp_test(post, d, m, seed=3)
    assert t["ecp"].shape == t["alpha"].shape and t["credibility"].min() >= 0
    # TARP with the reference at the truth gives credibility 0 for every cluster
    t0 = tarp_test(post, d, m, reference=m)
    assert np.all(t0["credibility"] == 0)


def test_round_trip_through_table(calibrated, tmp_path):
    post = calibrated
    path = tmp_path / "calibration.parquet"
    post.to_frame().to_parquet(path)
    back = JointKDEPosterior.from_pairs(pd.read_parquet(path), **post.get_params())
    dq = [13.9, 14.8]
    pd.testing.assert_frame_equal(back.summarize(dq), post.summarize(dq))


@pytest.mark.parametrize(
    "d, m",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0]),
        ([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]),
        ([1.0, 2.0], [1.0, 2.0]),
        ([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]),  # perfectly correlated
        ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),
    ],
)
def test_bad_calibration_raises(d, m):
    with pytest.raises(CalibrationError):
        JointKDEPosterior().fit(d, m)
    assert issubclass(CalibrationError, ClustermassError)


def test_unfitted_and_bad_method(small):
    with pytest.raises(CalibrationError):
        JointKDEPosterior().summarize([14.0])
    with pytest.raises(CalibrationError):
        small[2].summarize([14.0], method="grid")
    with pytest.raises(CalibrationError, match="min_neighbours"):
        JointKDEPosterior(min_neighbours=50).fit(*_synthetic(20, seed=0))


def test_figures(small, tmp_path):
    from clustermass.plots import posterior as pp

    d, m, post = small
    pit = pit_values(post, d[:300], m[:300])
    levels = np.linspace(0, 1, 51)
    t = tarp_test(post, d[:300], m[:300], levels=levels)
    figs = {
        "joint": pp.plot_joint_pdf(post, n_grid=40),
        "single": pp.plot_single_posterior(post, 14.3, log_m_true=14.25),
        "edge": pp.plot_single_posterior(post, 20.0),
        "coverage": pp.plot_coverage(levels, coverage_curve(post, d[:300], m[:300], levels), n=300),
        "pit": pp.plot_pit(pit),
        "by_mass": pp.plot_coverage_by_mass(coverage_by_mass(post, d[:300], m[:300], bins=4)),
        "tarp": pp.plot_tarp(t["alpha"], t["ecp"], n=300),
    }
    for name, fig in figs.items():
        out = save_figure(fig, tmp_path / f"{name}.png")
        assert out.stat().st_size > 5000


def test_multivariate_conditional_matches_scipy_slice():
    """k = 2 conditioning variables: the mixture is the exact slice of scipy's 3-D KDE."""
    rng = np.random.default_rng(11)
    m = rng.uniform(13.7, 15.2, 600)
    z = rng.uniform(0.02, 0.1, 600)
    d = m + 1.5 * (0.06 - z) + rng.normal(0, 0.05 + z, 600)
    post = JointKDEPosterior(bandwidth=0.3).fit(np.column_stack([d, z]), m)
    kde = gaussian_kde(np.vstack([d, z, m]), bw_method=0.3)
    np.testing.assert_allclose(post.kernel_covariance_, kde.covariance, rtol=1e-12)
    g = np.linspace(12.8, 16.2, 30_001)
    for x in ([14.2, 0.03], [14.9, 0.09]):
        y = kde(np.vstack([np.full_like(g, x[0]), np.full_like(g, x[1]), g]))
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(g))])
        cdf /= cdf[-1]
        row = post.summarize(np.array([x])).iloc[0]
        for k, q in QUANTILES.items():
            assert abs(row[k] - np.interp(q, cdf, g)) < 1e-4, k
    with pytest.raises(CalibrationError):
        post.summarize([14.0, 14.5])  # 1-D input to a 2-variable posterior


@pytest.mark.parametrize("weighted", [False, True])
def test_fast_conditional_equals_direct_evaluation(weighted):
    """k = 3, quadratic trend, heteroscedastic, prior edges (and importance weights): the fast
    path (weight cut + low-rank tables + Hermite at the edges) gives the direct evaluation's
    summaries to 1e-7 dex and the same out-of-range flags, far-out and NaN rows included."""
    rng = np.random.default_rng(21)
    n = 1000
    m = rng.uniform(13.7, 15.2, n)
    z = rng.uniform(0.02, 0.09, n)
    logn = 0.9 * (m - 14.0) - 8.0 * (z - 0.05) + 2.0 + rng.normal(0, 0.15, n)
    d = m + 0.04 + rng.normal(0.0, 0.16, n) - 0.08 * (m - 14.45) ** 2
    w = np.exp(-1.5 * (m - 13.7)) if weighted else None  # a steep prior, as the mass function
    post = JointKDEPosterior(0.4, prior_range=(13.7, 15.2), mean_degree=2, heteroscedastic=True).fit(
        np.column_stack([d, z, logn]), m, weights=w)
    nq = 120
    mq = rng.uniform(13.7, 15.2, nq)
    zq = rng.uniform(0.02, 0.09, nq)
    xq = np.column_stack([mq + rng.normal(0, 0.16, nq), zq,
                          0.9 * (mq - 14.0) - 8.0 * (zq - 0.05) + 2.0 + rng.normal(0, 0.15, nq)])
    xq[:12, 2] += np.linspace(-1.2, 1.2, 12)  # off the calibration's richness relation
    xq[12] = [14.5, 0.3, 2.0]  # far outside in redshift
    xq[13, 1] = np.nan
    fast = post.summarize(xq)
    ref = post.summarize(xq, method="direct")
    assert post.lowrank_error_ < 1e-8
    np.testing.assert_array_equal(fast.out_of_range, ref.out_of_range)
    assert fast.out_of_range.sum() >= 3 and fast.out_of_range[13]
    cols = [c for c in SUMMARY_COLUMNS if c != "d_pred"]
    ok = np.isfinite(xq).all(1)
    assert np.isnan(fast.loc[~ok, cols].to_numpy()).all()
    # untruncated mixture mass inside the prior range: where it is ~0 (far out: flagged) the
    # truncated posterior is ill-conditioned in both paths (a difference of two CDFs near 1)
    au, bu = post._bounds_u(np.nan_to_num(xq))
    wts = post._weights(np.nan_to_num(xq), 0, post.n_pairs_)
    cdf_u = lambda v: (wts * ndtr((v[:, None] - post.u_[None, :]) / post.sigma_u_)).sum(1)  # noqa: E731
    mass = cdf_u(bu) - cdf_u(au)
    assert (fast.out_of_range[ok & (mass < 1e-3)]).all()
    ok &= mass > 1e-6
    assert ok.sum() > 100
    dev = np.abs(fast.loc[ok, cols].to_numpy() - ref.loc[ok, cols].to_numpy())
    assert dev.max() < 1e-7, dev.max(axis=0)
    # the n_eff lower bound of the fast path matches the direct sum where it matters
    tab, n_eff, thin = post._fast_tables(xq[14:40])
    assert thin.size == 0
    np.testing.assert_allclose(n_eff, post._n_eff(xq[14:40]), rtol=1e-9)
    np.testing.assert_allclose(tab, post._direct_tables(xq[14:40]), atol=1e-8)
    # far out, with little mass inside the prior range: the fast path leaves the tables to the
    # direct evaluation (one pass for all such rows of a summary)
    tab, _, thin = post._fast_tables(xq[:13])
    assert thin.size and np.isnan(tab[thin]).all() and np.isfinite(np.delete(tab, thin, 0)).all()
    np.testing.assert_array_equal(thin, np.flatnonzero(mass[:13] < 1e-3))
    np.testing.assert_allclose(post._exact_tables(xq[:13])[thin], post._direct_tables(xq[thin]))


def test_fast_path_weight_cut_is_what_makes_it_exact():
    """A (forbidden) coarse weight cut visibly changes the tables: the comparison above can fail."""
    rng = np.random.default_rng(3)
    m = rng.uniform(13.7, 15.2, 800)
    z = rng.uniform(0.02, 0.09, 800)
    d = m + rng.normal(0, 0.15, 800)
    post = JointKDEPosterior(0.4, prior_range=(13.7, 15.2)).fit(np.column_stack([d, z]), m)
    xq = np.column_stack([rng.uniform(14.0, 15.0, 50), rng.uniform(0.03, 0.08, 50)])
    ref = post._direct_tables(xq)
    post.weight_cut = 0.3  # bypasses the constructor's check on purpose
    cut = np.vstack([post._exact_tables(xq[i : i + 1]) for i in range(5)])  # one query per group
    assert np.abs(cut - ref[:5]).max() > 1e-4
    with pytest.raises(CalibrationError):
        JointKDEPosterior(weight_cut=0.1).fit(np.column_stack([d, z]), m)


def test_fast_path_zero_weight_neighbours_shift_by_exact_max():
    """Queries whose nearest pairs carry zero importance weight: the kernel sums would underflow
    relative to the kd bound, so the fast path shifts them by the exact largest exponent; its
    summaries still equal the direct evaluation's."""
    rng = np.random.default_rng(5)
    m = rng.uniform(13.7, 15.2, 600)
    z = rng.uniform(0.02, 0.09, 600)
    d = m + rng.normal(0, 0.15, 600)
    w = np.where(m < 14.2, 0.0, 1.0)
    post = JointKDEPosterior(0.4, prior_range=(13.7, 15.2)).fit(np.column_stack([d, z]), m, weights=w)
    xq = np.column_stack([rng.uniform(13.8, 13.9, 20), rng.uniform(0.03, 0.08, 20)])
    yq = xq @ post.white_.T
    r2 = ((yq[:, None, :] - post.y_[None]) ** 2).sum(-1)
    assert (post.c_[np.argsort(r2, axis=1)[:, :4]] == 0).all(1).any()  # log c = -690 at the 4 nearest
    tab, n_eff, thin = post._fast_tables(xq)
    assert thin.size == 0  # n_eff: kernel weight of the pairs of nonzero weight (a lower bound)
    np.testing.assert_allclose(n_eff, np.exp(-0.5 * r2[:, post.c_ > 0]).sum(1), rtol=1e-9)
    np.testing.assert_allclose(tab, post._direct_tables(xq), atol=1e-8)
    fast, ref = post.summarize(xq), post.summarize(xq, method="direct")
    cols = [c for c in SUMMARY_COLUMNS if c != "d_pred"]
    np.testing.assert_array_equal(fast.out_of_range, ref.out_of_range)
    np.testing.assert_allclose(fast[cols].to_numpy(), ref[cols].to_numpy(), rtol=0, atol=1e-7)
