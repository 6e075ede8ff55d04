"""The mock sky: geometry, flux limit, cluster list, and the sky -> phase-space path on it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from clustermass import cosmology
from clustermass.config import WindowConfig
from clustermass.errors import ClustermassError
from clustermass.massfunction import mass_function_estimate, smoothed_theory
from clustermass.simulate.mocksky import FULL_SKY_DEG2, simulate_sky, write_mock_sky
from clustermass.sky import sky_to_catalogue

AREA, DMAX, MLIM = 600.0, 250.0, 18.0


@pytest.fixture(scope="module")
def sky():
    return simulate_sky(AREA, DMAX, MLIM, log_m_min=13.5, seed=3)


def test_geometry_and_flux_limit(sky):
    gal, cl, halos = sky
    assert len(gal) > 10 * AREA and len(cl) > 10
    assert gal["mag_r"].max() <= MLIM
    # everything inside the cap around (180, 30)
    cos_max = 1 - 2 * AREA / FULL_SKY_DEG2
    for df in (gal, cl, halos[halos["neighbour_of"] < 0]):  # the footprint cuts galaxies too
        a, d = np.radians(df["ra"]), np.radians(df["dec"])
        cosang = np.sin(d) * np.sin(np.radians(30)) + np.cos(d) * np.cos(np.radians(30)) * np.cos(a - np.pi)
        assert cosang.min() >= cos_max - 1e-9
    # background halos uniform in comoving volume: (chi / chi_max)^3 is uniform
    chi_max = halos.attrs["distance_max"] + halos.attrs["margin"]
    bg = halos["neighbour_of"] < 0
    assert stats.kstest((halos["comoving_distance"][bg] / chi_max) ** 3, "uniform").pvalue > 1e-3
    # neighbours sit around their cluster (within the cylinder: ~3 h^-1 Mpc across, ~40 deep)
    nb = halos[~bg]
    par = halos.set_index("halo_index").loc[nb["neighbour_of"]]
    assert np.all(np.abs(nb["comoving_distance"].to_numpy() - par["comoving_distance"].to_numpy()) < 60)


def test_halo_masses_follow_the_input_mass_function(sky):
    _, _, halos = sky
    assert (halos["neighbour_of"] >= 0).sum() > 0  # clustered neighbours were added ...
    halos = halos[halos["neighbour_of"] < 0]  # ... on top of the Poisson sample
    lo, hi = halos.attrs["log_m_halo_min"], halos.attrs["log_m_halo_max"]
    fine = np.linspace(lo, hi, 2001)
    dn = cosmology.mass_function(fine, 0.0, cosmo=cosmology.SIMULATION_COSMOLOGY)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (dn[1:] + dn[:-1]) * np.diff(fine))])
    assert stats.kstest(halos["log_m200c"], lambda x: np.interp(x, fine, cdf / cdf[-1])).pvalue > 1e-3
    chi_max = halos.attrs["distance_max"] + halos.attrs["margin"]
    vol = AREA / FULL_SKY_DEG2 * 4 / 3 * np.pi * chi_max**3
    assert abs(len(halos) - cdf[-1] * vol) < 5 * np.sqrt(cdf[-1] * vol)


def test_clusters_are_sensible(sky):
    gal, cl, halos = sky
    assert (cl["log_m200c_true"] >= 13.5).all() and (cl["comoving_distance"] <= DMAX).all()
    assert cl["id"].is_unique
    # every massive halo inside the distance is in the list
    expect = ((halos["log_m200c"] >= 13.5) & (halos["comoving_distance"] <= DMAX)
              & (halos["neighbour_of"] < 0)).sum()
    assert len(cl) == expect
    # redshift = cosmological redshift + peculiar velocity (sigma 300 km/s)
    z_cos = cosmology.redshift_from_comoving(cl["comoving_distance"].to_numpy())
    dv = cosmology.C_KMS * (cl["z"] - z_cos) / (1 + z_cos)
    assert np.abs(dv).max() < 5 * 300 and np.std(dv) > 100
    # richer with mass, and fewer galaxies visible far away at fixed mass
    rho = stats.spearmanr(cl["log_m200c_true"], cl["n_members_observed"]).statistic
    assert rho > 0.3


def test_sky_path_on_the_mock(sky):
    gal, cl, _ = sky
    w = WindowConfig()
    cat, info = sky_to_catalogue(gal, cl, w, mag_col="mag_r", mag_limit=MLIM, distance_max=DMAX)
    # flagged by the observed redshift: only a few clusters near 250 h^-1 Mpc moving away
    assert info["outside_training_range"].mean() < 0.1
    assert info["n_gal"].median() >= 5
    # members of the cluster's own halo dominate the window of massive clusters
    host = gal["halo_index"].to_numpy()[cat.galaxies["galaxy_row"].to_numpy()]
    own = host == cl["halo_index"].to_numpy()[cat.galaxies["diagram_id"].to_numpy()]
    frac = np.bincount(cat.galaxies["diagram_id"], own, minlength=len(cl)) / np.maximum(info["n_gal"], 1)
    assert np.median(frac[info["n_gal"] >= 10]) > 0.35
    # member velocity dispersion grows with mass (Evrard et al. 2008 slope ~1/3)
    v = cat.galaxies["v_los"].to_numpy()
    sig = np.array([np.std(v[(cat.galaxies["diagram_id"] == i).to_numpy() & own]) if
                    ((cat.galaxies["diagram_id"] == i).to_numpy() & own).sum() >= 5 else np.nan
                    for i in range(len(cl))])
    ok = np.isfinite(sig)
    assert ok.sum() >= 8
    assert stats.spearmanr(cl["log_m200c_true"][ok], sig[ok]).statistic > 0.3
    pred = 1082.9 * (10 ** cl["log_m200c_true"][ok] / 1e15) ** 0.3361
    assert 0.5 < np.median(sig[ok] / pred) < 1.5


def test_true_mass_function_of_a_mock_sky(sky):
    """Cluster counts per mass bin against the input mass function x volume (Poisson chi^2),
    and the KDE estimator of the true masses against the input through its kernel."""
    _, cl, _ = sky
    edges = np.array([13.5, 13.7, 13.9, 14.2, 14.6, 15.6])
    fine = np.linspace(13.5, 15.6, 2101)
    dn = cosmology.mass_function(fine, 0.0, cosmo=cosmology.SIMULATION_COSMOLOGY)
    cum = np.concatenate([[0], np.cumsum(0.5 * (dn[1:] + dn[:-1]) * np.diff(fine))])
    vol = AREA / FULL_SKY_DEG2 * 4 / 3 * np.pi * DMAX**3
    expect = np.diff(np.interp(edges, fine, cum)) * vol
    got = np.histogram(cl["log_m200c_true"], edges)[0]
    chi2 = np.sum((got - expect) ** 2 / expect)
    assert stats.chi2.sf(chi2, len(expect)) > 1e-3, (got, expect)
    grid = np.linspace(13.7, 14.3, 7)
    est = mass_function_estimate(cl["log_m200c_true"], 0.1, AREA, DMAX, grid, n_boot=200, bandwidth=0.15)
    theory = smoothed_theory(grid, 0.15, log_m_min=13.5, cosmo=cosmology.SIMULATION_COSMOLOGY)
    assert np.mean(np.abs(est["dn_dlogm"] - theory) <= 3 * est["dn_dlogm_boot_std"]) >= 0.7
    # a wrong volume (area x 2) is far outside
    wrong = mass_function_estimate(cl["log_m200c_true"], 0.1, 2 * AREA, DMAX, grid, n_boot=0, bandwidth=0.15)
    assert np.all(wrong["dn_dlogm"] < 0.75 * theory)


def test_reproducible_and_written(tmp_path):
    a = simulate_sky(50.0, 150.0, 17.77, seed=11, log_m_halo_min=12.0)
    b = simulate_sky(50.0, 150.0, 17.77, seed=11, log_m_halo_min=12.0)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    paths = write_mock_sky(tmp_path, area_deg2=50.0, seed=11, progress=False, distance_max=150.0,
                           mag_limit=17.77, log_m_halo_min=12.0)
    names = {p.name for p in paths}
    assert {"sky_galaxies.parquet", "sky_clusters.parquet", "sky_halos.parquet", "mock_sky.json"} <= names
    with pytest.raises(ClustermassError):
        simulate_sky(-1.0)


def test_mock_sky_windows_resemble_the_training_mocks(sky):
    """Same window, flux limit and distances: galaxy counts at fixed mass as in the simulator's
    diagrams (which the networks are trained on), so `infer` on a mock sky is a fair test."""
    from clustermass.config import load_config
    from clustermass.simulate import simulate_catalogue

    gal, cl, _ = sky
    cfg = load_config("tiny", seed=5)
    sim = cfg.simulation.model_copy(update={"n_train": 300, "n_test": 0, "n_eval": 0, "mag_limit": MLIM,
                                            "log_m_max": 14.5})
    cat = simulate_catalogue(sim, cfg.window, seed=5, progress=False)
    sky_cat, info = sky_to_catalogue(gal, cl, cfg.window)
    m_sim, n_sim = cat.clusters["log_m200c"].to_numpy(), cat.clusters["n_gal"].to_numpy()
    m_sky, n_sky = cl["log_m200c_true"].to_numpy(), info["n_gal"].to_numpy()
    # fraction of the cluster halo's own galaxies (members and outskirts) in the window
    row = np.searchsorted(cat.clusters["diagram_id"].to_numpy(), cat.galaxies["diagram_id"].to_numpy())
    own_sim = cat.galaxies["host_halo_id"].to_numpy() == cat.clusters["halo_id"].to_numpy()[row]
    f_sim = np.bincount(row, own_sim.astype(float), minlength=len(m_sim)) / np.maximum(n_sim, 1)
    host = gal["halo_index"].to_numpy()[sky_cat.galaxies["galaxy_row"].to_numpy()]
    own = host == cl["halo_index"].to_numpy()[sky_cat.galaxies["diagram_id"].to_numpy()]
    f_sky = np.bincount(sky_cat.galaxies["diagram_id"], own, minlength=len(m_sky)) / np.maximum(n_sky, 1)
    for lo, hi in ((13.7, 14.0), (14.0, 14.4)):
        s_sim, s_sky = (m_sim >= lo) & (m_sim < hi), (m_sky >= lo) & (m_sky < hi)
        a, b = np.median(n_sim[s_sim]), np.median(n_sky[s_sky])
        assert 0.6 < b / a < 1.6, (lo, a, b)
        assert abs(np.median(f_sim[s_sim]) - np.median(f_sky[s_sky])) < 0.15
