"""Calibration module: conditioning, prior edges, mass-function prior, exactness, persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clustermass.calibration import (
    Calibration,
    MassFunctionPrior,
    fit_calibration,
    validate_conditioning,
)
from clustermass.diagnostics import NOMINAL_68, group_calibration
from clustermass.posterior import CalibrationError, JointKDEPosterior

LO, HI = 13.7, 15.2


def _z_dependent(n, seed):
    """Predictions whose bias and scatter depend on redshift (as a richness-reading network's)."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(LO, HI, n)
    z = rng.uniform(0.02, 0.1, n)
    sig = 0.05 + 2.0 * z  # 0.09 dex nearby, 0.25 dex far away
    d = m + 2.0 * (0.06 - z) + sig * rng.standard_normal(n)  # nearby over-, distant under-predicted
    return d, z, m


def _tercile_stats(pit, z):
    g = group_calibration(pit, {"z": z}, n_boot=0)
    return np.abs(g["coverage_68"] - NOMINAL_68).max(), np.abs(g["p_below_median"] - 0.5).max()


def test_conditioning_on_redshift_fixes_per_tercile_calibration():
    d, z, m = _z_dependent(3000, 0)
    de, ze, me = _z_dependent(1500, 1)
    cond, cond_e = pd.DataFrame({"z": z}), pd.DataFrame({"z": ze})
    marg = fit_calibration(d, m, cond, conditioning=("d_pred",), mean_degree=1, prior_range=(LO, HI))
    full = fit_calibration(d, m, cond, conditioning=("d_pred", "z"), prior_range=(LO, HI))
    pit_m = marg.cdf(marg.features(de, cond_e), me)
    pit_f = full.cdf(full.features(de, cond_e), me)
    cov_m, med_m = _tercile_stats(pit_m, ze)
    cov_f, med_f = _tercile_stats(pit_f, ze)
    assert med_m > 0.12 and cov_m > 0.08  # d_pred alone: nearby too high, distant too low / too narrow
    assert med_f < 0.065 and cov_f < 0.05  # the conditional posterior is right in every tercile (SE ~0.02)
    # and sharper on average (the redshift tells which scatter applies)
    wf = full.summarize(de, cond_e)
    wm = marg.summarize(de, cond_e)
    assert (wf.log_m_hi1 - wf.log_m_lo1).mean() < (wm.log_m_hi1 - wm.log_m_lo1).mean()
    # the cross-validated choice picks the conditional
    chosen, table = validate_conditioning(d, m, cond, candidates=(("d_pred", "z"), ("d_pred",)),
                                          prior_range=(LO, HI))
    assert chosen == ("d_pred", "z") and len(table) == 2


def test_prior_edges_keep_coverage_in_the_edge_mass_bins():
    """Flat prior on [LO, HI], d = M + N(0, 0.15): the exact posterior is a truncated normal.
    Kernels leaking past the edges widen the posteriors (overall and in the edge mass bins);
    cut and renormalised kernels restore the nominal coverage and the exact posterior's."""
    from scipy.special import ndtr

    rng = np.random.default_rng(3)
    m = rng.uniform(LO, HI, 4000)
    d = m + rng.normal(0, 0.15, m.size)
    me = rng.uniform(LO, HI, 4000)
    de = me + rng.normal(0, 0.15, me.size)
    a, b = ndtr((LO - de) / 0.15), ndtr((HI - de) / 0.15)
    exact = (ndtr((me - de) / 0.15) - a) / (b - a)
    edge = (me < LO + 0.15) | (me > HI - 0.15)

    def cov(p, sel=slice(None), lv=NOMINAL_68):
        return np.mean(np.abs(p[sel] - 0.5) <= lv / 2)

    pits = {}
    for name, pr in (("cut", (LO, HI)), ("leaky", None)):
        post = JointKDEPosterior(0.2, prior_range=pr).fit(d, m)
        pits[name] = post.cdf(de, me)
        s = post.summarize(de)
        if pr is not None:  # every quantile lies inside the prior support
            assert (s.log_m_lo2 >= LO - 1e-9).all() and (s.log_m_hi2 <= HI + 1e-9).all()
    assert abs(cov(pits["cut"]) - NOMINAL_68) < 0.02 and abs(cov(pits["cut"], lv=0.9545) - 0.9545) < 0.012
    assert cov(pits["leaky"]) - NOMINAL_68 > 0.02  # too wide overall
    # in the edge bins (where even the exact posterior is not nominal) cut is closer to exact
    assert abs(cov(pits["cut"], edge) - cov(exact, edge)) < abs(cov(pits["leaky"], edge) - cov(exact, edge))
    assert cov(pits["leaky"], edge) - cov(exact, edge) > 0.05


@pytest.mark.parametrize("het", [False, True])
def test_exact_cdf_and_quantiles_match_numerical_integration(het):
    d, z, m = _z_dependent(800, 4)
    post = JointKDEPosterior(0.3, prior_range=(LO, HI), mean_degree=2, heteroscedastic=het).fit(
        np.column_stack([d, z]), m)
    x = np.array([[13.75, 0.03], [14.4, 0.06], [15.3, 0.09]])
    assert (post.pdf(x, [LO - 0.01, HI + 0.01]) == 0).all()  # nothing beyond the prior edges
    grid = np.linspace(LO, HI, 40001)
    pdf = post.pdf(x, grid)
    num = np.concatenate([np.zeros((3, 1)), np.cumsum(0.5 * (pdf[:, 1:] + pdf[:, :-1]) * np.diff(grid), 1)], 1)
    np.testing.assert_allclose(num[:, -1], 1.0, atol=1e-6)
    probe = np.array([14.0, 14.5, 15.0])
    exact = post.cdf(x, np.tile(probe, (3, 1)))
    ref = np.array([np.interp(probe, grid, row) for row in num])
    np.testing.assert_allclose(exact, ref, atol=1e-6)
    s = post.summarize(x)
    for col, q in (("log_m_lo1", 0.1587), ("log_m_median", 0.5), ("log_m_hi2", 0.97725)):
        np.testing.assert_allclose(post.cdf(x, s[col].to_numpy()), q, atol=1e-6)
    mean = np.trapezoid(pdf * grid, grid, axis=1)
    np.testing.assert_allclose(s["log_m_mean"], mean, atol=1e-5)


def _mass_function_sample(n, z, rng):
    """log M drawn from the Tinker08 mass function within the prior range (inverse CDF)."""
    from clustermass import cosmology

    g = np.linspace(LO, HI, 2001)
    cdf = np.cumsum(cosmology.mass_function(g, z))
    return np.interp(rng.random(n), cdf / cdf[-1], g)


def test_mass_function_prior_removes_eddington_bias():
    rng = np.random.default_rng(5)
    n = 4000
    m = rng.uniform(LO, HI, n)  # the mocks: flat in log M
    z = np.full(n, 0.05)
    d = m + rng.normal(0, 0.15, n)
    cond = pd.DataFrame({"z": z})
    flat = fit_calibration(d, m, cond, conditioning=("d_pred",), mean_degree=1, prior_range=(LO, HI))
    mf = flat.with_prior("mass-function")
    lp = mf.mass_prior(np.array([[LO, HI]]), [0.05])[0][0]
    assert lp[0] - lp[1] > np.log(20)  # the mass function is steep
    ms = _mass_function_sample(6000, 0.05, rng)  # a survey's clusters
    ds = ms + rng.normal(0, 0.15, ms.size)
    bias = {}
    for name, cal in (("flat", flat), ("mf", mf)):
        med = cal.summarize(ds)["log_m_median"].to_numpy()
        # Eddington bias: among clusters given a low mass, the true masses are lower still
        edges = np.array([13.8, 14.0, 14.2, 14.4, 14.7])
        k = np.digitize(med, edges) - 1
        bias[name] = np.array([np.mean(med[k == b] - ms[k == b]) for b in range(len(edges) - 1)])
    assert np.abs(bias["mf"]).max() < 0.03, bias
    assert bias["flat"][1:].min() > 0.04, bias  # flat prior: inferred masses biased high (the prior edge
    # at 13.7 limits the lowest bin)


def test_mass_function_prior_follows_colossus_at_each_redshift():
    from clustermass import cosmology

    prior = MassFunctionPrior((LO, HI))
    m = np.linspace(LO - 0.4, HI + 0.4, 57)
    z = np.array([0.0, 0.037, 0.5])
    lp, d1, d2 = prior(np.tile(m, (3, 1)), z)
    for i, zi in enumerate(z):
        ref = np.log(cosmology.mass_function(m, zi))
        np.testing.assert_allclose(lp[i] - lp[i, 0], ref - ref[0], atol=2e-3)  # linear in z between nodes
        np.testing.assert_allclose(d1[i, 1:-1], np.gradient(ref, m)[1:-1], rtol=1e-2, atol=0.02)
    assert (d2 < 0).all()  # ln n concave in log M
    assert d1[0, 20] > d1[2, 20]  # steeper at higher redshift
    far = prior(np.array([[HI + 2.0]]), [0.1])  # continued linearly beyond the fitted span
    assert far[2][0, 0] == 0.0 and np.isfinite(far[0]).all()
    assert np.isfinite(prior(np.array([[LO, HI]]), [5.0])[0]).all()  # steep at high z: still represented
    unknown = prior(np.array([[14.0]]), [np.nan])[0]
    np.testing.assert_allclose(unknown, prior(np.array([[14.0]]), [0.1])[0])  # z_ref


@pytest.mark.parametrize("k", [1, 2])
def test_mass_function_prior_is_the_exact_bayes_update(k):
    """Summaries, CDF and samples under the mass-function prior equal the flat posterior density
    times the prior, normalised by numerical integration inside the prior range."""
    d, z, m = _z_dependent(800, 8)
    x_fit = d if k == 1 else np.column_stack([d, z])
    prior = MassFunctionPrior((LO, HI))
    flat = JointKDEPosterior(0.3, prior_range=(LO, HI), mean_degree=2, heteroscedastic=True).fit(x_fit, m)
    mf = JointKDEPosterior(0.3, prior_range=(LO, HI), mean_degree=2, heteroscedastic=True,
                           log_prior=prior).fit(x_fit, m)
    dq, zq = np.array([13.72, 14.0, 14.5, 15.1]), np.array([0.03, 0.09, 0.05, 0.08])
    xq = dq if k == 1 else np.column_stack([dq, zq])
    grid = np.linspace(LO, HI, 30001)
    dens = flat.pdf(xq, grid) * np.exp(prior(np.tile(grid, (4, 1)), zq)[0])
    num = np.concatenate([np.zeros((4, 1)), np.cumsum(0.5 * (dens[:, 1:] + dens[:, :-1]) * np.diff(grid), 1)], 1)
    dens, num = dens / num[:, -1:], num / num[:, -1:]
    np.testing.assert_allclose(mf.pdf(xq, grid, prior_z=zq), dens, rtol=1e-6, atol=1e-9)
    s = mf.summarize(xq, prior_z=zq, method="exact")
    for col, q in (("log_m_lo2", 0.02275), ("log_m_median", 0.5), ("log_m_hi1", 0.8413)):
        ref = np.array([np.interp(q, num[i], grid) for i in range(4)])
        np.testing.assert_allclose(s[col], ref, atol=2e-5)
    np.testing.assert_allclose(s["log_m_mean"], np.trapezoid(dens * grid, grid, axis=1), atol=2e-5)
    probe = np.array([14.0, 14.5, 15.0])
    ref = np.array([np.interp(probe, grid, row) for row in num])
    np.testing.assert_allclose(mf.cdf(xq, np.tile(probe, (4, 1)), prior_z=zq), ref, atol=1e-6)
    s_flat = flat.summarize(xq, method="exact")
    assert (s["log_m_median"] < s_flat["log_m_median"]).all()  # the steep prior pulls masses down
    draws = mf.sample(xq[2:3], 4000, seed=3, prior_z=zq[2:3])[0]
    assert abs(np.median(draws) - s["log_m_median"][2]) < 0.01
    if k == 1:  # the interpolated path (many clusters) gives the same summaries
        many = np.repeat(dq, 300)
        si = mf.summarize(many, prior_z=np.repeat(zq, 300))
        np.testing.assert_allclose(si["log_m_median"].to_numpy()[::300], s["log_m_median"], atol=1e-5)


def test_min_neighbours_flags_far_conditioning_values():
    d, z, m = _z_dependent(1500, 6)
    cal = fit_calibration(d, m, pd.DataFrame({"z": z}), conditioning=("d_pred", "z"), prior_range=(LO, HI))
    s = cal.summarize([14.4, 14.4, 14.4], pd.DataFrame({"z": [0.05, 0.5, np.nan]}))
    assert s["out_of_range"].tolist() == [False, True, False]
    assert s["conditioned_on"].tolist() == ["d_pred+z", "d_pred+z", "d_pred"]  # no z: d_pred alone
    assert np.isfinite(s["log_m_median"]).all()


def test_calibration_round_trip(tmp_path):
    d, z, m = _z_dependent(600, 7)
    cal = fit_calibration(d, m, pd.DataFrame({"z": z}), conditioning=("d_pred", "z"), prior_range=(LO, HI),
                          meta={"model": "abc"})
    cal.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"calibration.parquet", "calibration.json"}
    back = Calibration.load(tmp_path)
    assert back.conditioning == cal.conditioning and back.prior_range == (LO, HI)
    assert back.meta["model"] == "abc"
    x = cal.features([14.0, 14.9], pd.DataFrame({"z": [0.03, 0.08]}))
    pd.testing.assert_frame_equal(cal.summarize(x[:, 0], pd.DataFrame({"z": x[:, 1]})),
                                  back.summarize(x[:, 0], pd.DataFrame({"z": x[:, 1]})))


@pytest.mark.slow
def test_mass_function_prior_on_mass_function_mocks():
    """End to end on the simulator: the sigma_v estimator calibrated on flat-prior mocks, applied to
    mocks whose clusters follow the mass function (same simulator, other seed). In bins of the
    posterior median where most clusters are, ``mass-function`` removes most of the Eddington
    bias that ``flat`` shows (scripts/mass_function_prior_check.py does this for a network)."""
    from clustermass.baselines import run_baselines
    from clustermass.calibration import cluster_conditions
    from clustermass.config import SimulationConfig, WindowConfig
    from clustermass.evaluation import bias_by_estimate_bin
    from clustermass.simulate import simulate_catalogue

    window = WindowConfig()

    def estimates(dist, n, seed):
        sim = SimulationConfig(n_train=0, n_test=n, n_eval=0, mass_distribution=dist, max_sightlines=5)
        cat = simulate_catalogue(sim, window, seed, progress=False)
        d = run_baselines(cat, progress=False, methods=["sigma_evrard"], window=window)["log_m_sigma"]
        return d.to_numpy(), cluster_conditions(cat, None, window), cat.clusters["log_m200c"].to_numpy()

    d, cond, m = estimates("flat", 1500, 21)
    flat = fit_calibration(d, m, cond, prior_range=(LO, HI), bandwidth=0.4)
    ds, conds, ms = estimates("mass-function", 1500, 22)
    bias = {}
    from clustermass.cosmology import SIMULATION_COSMOLOGY

    mf = flat.with_prior("mass-function", cosmo=SIMULATION_COSMOLOGY)  # the mocks' own mass function
    for name, cal in (("flat", flat), ("mf", mf)):
        med = cal.summarize(ds, conds)["log_m_median"]
        bias[name] = bias_by_estimate_bin(med, ms, edges=(13.7, 13.9, 14.1, 14.3))["bias"].to_numpy()
    assert bias["flat"][1:].min() > 0.035, bias  # Eddington bias with the flat prior
    assert np.abs(bias["mf"][:2]).max() < 0.03, bias  # 13.7-14.1: three quarters of the clusters
    # above, part of the bias remains (docs/calibration.md "Priors": the calibration's low-mass tail)
    assert (np.abs(bias["mf"]) < 0.6 * bias["flat"]).all(), bias


def test_with_prior_shares_the_fit_and_equals_a_fresh_calibration():
    """Switching the prior does not refit (the prior multiplies the posterior density): the copy
    shares the fitted pairs and gives the same posteriors as a calibration built with that prior."""
    d, z, m = _z_dependent(600, 9)
    cond = pd.DataFrame({"z": z})
    opts = {"conditioning": ("d_pred", "z"), "prior_range": (LO, HI)}
    flat = fit_calibration(d, m, cond, **opts)
    mf = flat.with_prior("mass-function")
    assert mf.posterior.x_ is flat.posterior.x_ and flat.prior == "flat"
    q, dq = pd.DataFrame({"z": [0.03, 0.07, np.nan]}), [14.0, 14.6, 14.3]
    fresh = fit_calibration(d, m, cond, prior="mass-function", **opts)
    pd.testing.assert_frame_equal(mf.summarize(dq, q), fresh.summarize(dq, q))
    pd.testing.assert_frame_equal(mf.with_prior("flat").summarize(dq, q), flat.summarize(dq, q))
    with pytest.raises(CalibrationError, match="prior must be one of"):
        flat.with_prior("schechter")
