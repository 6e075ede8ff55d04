"""Mass-function estimator on clusters drawn from a known mass function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clustermass.errors import ClustermassError
from clustermass.massfunction import (
    mass_function_estimate,
    mass_function_from_posteriors,
    smoothed_theory,
    survey_volume,
    theory_mass_function,
)

AREA, DMAX, LO, HI = 8250.0, 250.0, 13.6, 15.6


def _draw(seed=0):
    """Poisson sample of log masses from Tinker08 (Planck 2018) in the SDSS-like volume."""
    rng = np.random.default_rng(seed)
    fine = np.linspace(LO, HI, 4001)
    dn = theory_mass_function(fine)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (dn[1:] + dn[:-1]) * np.diff(fine))])
    n = rng.poisson(cdf[-1] * survey_volume(AREA, DMAX))
    return np.interp(rng.uniform(0, cdf[-1], n), cdf, fine), rng


def test_volume():
    assert survey_volume(FULL := 4 * np.pi * (180 / np.pi) ** 2, 100.0) == pytest.approx(4 / 3 * np.pi * 1e6)
    assert survey_volume(FULL / 2, 100.0, 50.0) == pytest.approx(2 / 3 * np.pi * (1e6 - 1.25e5))


def test_theory_is_tinker_planck18():
    grid = np.array([14.0, 14.5, 15.0])
    dn = theory_mass_function(grid)
    assert np.all(np.diff(dn) < 0)
    # order of magnitude at 1e14 h^-1 Msun, z = 0: ~7e-5 h^3 Mpc^-3 dex^-1 (n(>1e14) ~ 2e-5)
    assert 2e-5 < dn[0] < 2e-4


def test_estimate_recovers_input_within_band():
    log_m, rng = _draw(0)
    n = len(log_m)
    assert 500 < n < 3000  # SDSS-like: ~1000 clusters
    sigma = rng.uniform(0.08, 0.25, n)  # widths independent of mass: weights do not bias
    grid = np.linspace(13.9, 14.9, 21)
    est = mass_function_estimate(log_m, sigma, AREA, DMAX, grid, n_boot=200, seed=1)
    expect = smoothed_theory(grid, est.attrs["bandwidth"])
    band = est["dn_dlogm_boot_std"].to_numpy()
    inside = np.abs(est["dn_dlogm"].to_numpy() - expect) <= 2 * band
    assert inside.mean() >= 0.9
    # the 1-sigma band (percentiles) brackets the truth at most points
    lo, hi = est["dn_dlogm_lo"].to_numpy(), est["dn_dlogm_hi"].to_numpy()
    assert np.mean((expect >= lo - 0.5 * band) & (expect <= hi + 0.5 * band)) >= 0.7
    # where the kernel smoothing is negligible the raw theory is also recovered
    core = (grid >= 14.0) & (grid <= 14.5)
    raw = theory_mass_function(grid[core])
    assert np.all(np.abs(est["dn_dlogm"].to_numpy()[core] / raw - 1) < 0.25)
    # a wrong survey volume is detected
    wrong = mass_function_estimate(log_m, sigma, AREA / 2, DMAX, grid, n_boot=50, seed=1)
    assert (np.abs(wrong["dn_dlogm"].to_numpy() - expect) <= 2 * band).mean() < 0.3


def test_weights_normalised_to_cluster_count():
    log_m, rng = _draw(1)
    sigma = np.where(log_m > 14.3, 0.05, 0.3)  # strongly mass-dependent weights
    grid = np.linspace(12.0, 17.0, 501)
    est = mass_function_estimate(log_m, sigma, AREA, DMAX, grid, n_boot=0)
    total = np.trapezoid(est["dn_dlogm"], grid) * est.attrs["volume"]
    assert total == pytest.approx(len(log_m), rel=1e-3)
    # inverse-width weighting shifts weight to the precisely measured (high) masses
    flat = mass_function_estimate(log_m, sigma, AREA, DMAX, grid, n_boot=0, weighted=False)
    hi = grid > 14.6
    assert est["dn_dlogm"][hi].sum() > 1.5 * flat["dn_dlogm"][hi].sum()


def test_from_posteriors_and_errors():
    log_m, _ = _draw(2)
    post = pd.DataFrame({"log_m_map": log_m, "log_m_lo1": log_m - 0.1, "log_m_hi1": log_m + 0.15})
    post.loc[0, "log_m_map"] = np.nan  # skipped
    t = mass_function_from_posteriors(post, AREA, DMAX, n_boot=20)
    assert {"dn_dlogm_theory", "dn_dlogm_theory_smoothed", "dn_dlogm_lo"} <= set(t.columns)
    assert t.attrs["n_clusters"] == len(log_m) - 1
    post["comoving_distance"] = np.where(np.arange(len(post)) < 10, 300.0, 100.0)
    post["edge"] = np.arange(len(post)) % 2 == 0
    t2 = mass_function_from_posteriors(post, AREA, DMAX, n_boot=0, exclude_flags=("edge",))
    assert t2.attrs["n_clusters"] == ((np.arange(len(post)) >= 10) & (np.arange(len(post)) % 2 == 1)).sum()
    with pytest.raises(ClustermassError):
        mass_function_estimate([14.0], [0.1], AREA, DMAX)
    with pytest.raises(ClustermassError, match="no column"):
        mass_function_from_posteriors(post.drop(columns="log_m_lo1"), AREA, DMAX)


def test_write_mass_function(tmp_path):
    from clustermass.massfunction import write_mass_function

    log_m, _ = _draw(3)
    post = pd.DataFrame({"log_m_map": log_m, "log_m_lo1": log_m - 0.1, "log_m_hi1": log_m + 0.15})
    summary = write_mass_function(post, tmp_path, AREA, DMAX, n_boot=20, log_m_min=14.1)
    assert (tmp_path / "mass_function.csv").is_file() and (tmp_path / "figures" / "mass_function.png").is_file()
    assert summary["n_clusters"] == len(log_m)
    back = pd.read_csv(tmp_path / "mass_function.csv")
    assert np.all(back["dn_dlogm"] > 0)
