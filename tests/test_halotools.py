"""The simulator's CLF equals halotools' Cacciato09Cens / Cacciato09Sats (only where installed).

halotools is an optional extra (``pip install clustermass[halotools]``): the package carries its
own numpy transcription of the Cacciato et al. (2009) model (:mod:`clustermass.simulate.galaxies`).
Both work in the CLF's halo mass, M180m [h^-1 Msun]; the package converts from M200c with
:func:`~clustermass.simulate.galaxies.log_m_clf`, so halotools is called with that mass.
Luminosities: log10 L [h^-2 Lsun].
"""

from __future__ import annotations

import numpy as np
import pytest

ht = pytest.importorskip("halotools.empirical_models")

from clustermass.simulate import galaxies as gal  # noqa: E402

LOG_M200C = np.linspace(11.5, 15.5, 41)  # groups to the most massive clusters
LOG_L_MIN = np.array([8.5, 9.0, 9.5, 10.0, 10.5, 11.0])  # M_r - 5 log h ~ -16.5 ... -22.7


@pytest.fixture(scope="module")
def m_clf():
    """M180m [h^-1 Msun] of the LOG_M200C grid, the halo mass halotools' CLF is written in."""
    return 10 ** gal.log_m_clf(LOG_M200C)


def test_parameters_are_halotools_defaults():
    cens, sats = ht.Cacciato09Cens(), ht.Cacciato09Sats()
    for key, value in gal.CLF_PARAMS.items():
        ref = cens.param_dict.get(key, sats.param_dict.get(key))
        assert ref == pytest.approx(value, abs=0), key
    # the package has no delta_1/delta_2 (the exponential cut-off stays exp(-(L/L*)^2))
    assert sats.param_dict.get("delta_1", 0.0) == 0.0 and sats.param_dict.get("delta_2", 0.0) == 0.0


def test_central_median_luminosity(m_clf):
    ref = np.log10(ht.Cacciato09Cens().median_prim_galprop(prim_haloprop=m_clf))
    np.testing.assert_allclose(gal.central_log_l_median(LOG_M200C), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("log_l_min", LOG_L_MIN)
def test_central_occupation(m_clf, log_l_min):
    """<N_cen | M> = P(log L_c > log_l_min): the package's log-normal with CLF_PARAMS['sigma']."""
    from scipy.special import erfc

    ref = ht.Cacciato09Cens(threshold=log_l_min).mean_occupation(prim_haloprop=m_clf)
    mine = 0.5 * erfc((log_l_min - gal.central_log_l_median(LOG_M200C)) / (np.sqrt(2) * gal.CLF_PARAMS["sigma"]))
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("log_l_min", LOG_L_MIN)
def test_satellite_mean_occupation(m_clf, log_l_min):
    """<N_sat | M, L > L_min> (the Poisson mean of populate_scaled) equals halotools'."""
    ref = ht.Cacciato09Sats(threshold=log_l_min).mean_occupation(prim_haloprop=m_clf)
    mine = gal.mean_satellites(LOG_M200C, log_l_min)
    assert ref.max() > 0.5  # the grid reaches halos with satellites at every threshold
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-6)


def test_satellite_luminosity_function(m_clf):
    """dN_sat/dlog10 L = -d<N_sat(>L)>/dlog10 L equals halotools' Cacciato09Sats.clf."""
    sats = ht.Cacciato09Sats()
    h = 1e-4
    for log_l in (8.75, 9.5, 10.25, 10.75):
        mine = (gal.mean_satellites(LOG_M200C, log_l - h) - gal.mean_satellites(LOG_M200C, log_l + h)) / (2 * h)
        ref = sats.clf(prim_galprop=np.full(m_clf.shape, 10**log_l), prim_haloprop=m_clf)
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-6)


def test_satellite_clf_shape(m_clf):
    """alpha(M), phi*(M) and L*(M) = 0.562 L_c(M) of the satellite CLF."""
    sats = ht.Cacciato09Sats()
    alpha, phi, log_lstar = gal._sat_params(LOG_M200C)
    np.testing.assert_allclose(alpha, sats.alpha_sat(prim_haloprop=m_clf), rtol=0, atol=1e-4)
    np.testing.assert_allclose(phi, sats.phi_sat(prim_haloprop=m_clf), rtol=1e-4)
    np.testing.assert_allclose(log_lstar, np.log10(sats.prim_galprop_cut(prim_haloprop=m_clf)), rtol=0, atol=1e-4)


def test_incomplete_gamma():
    from halotools.empirical_models import custom_incomplete_gamma

    a = np.linspace(-0.99, 0.99, 23)
    x = np.geomspace(1e-4, 30, 31)
    A, X = (g.ravel() for g in np.meshgrid(a, x))  # halotools takes 1-D arrays
    np.testing.assert_allclose(gal.upper_gamma(A, X), custom_incomplete_gamma(A, X), rtol=1e-6)
