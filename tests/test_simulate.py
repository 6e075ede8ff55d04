"""Physics and bookkeeping checks of the mock simulator (small catalogues, fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from clustermass import cosmology
from clustermass.catalog import read_catalogue, write_catalogue
from clustermass.config import SimulationConfig, WindowConfig
from clustermass.errors import ConfigError
from clustermass.simulate import galaxies as gal
from clustermass.simulate import halos as hal
from clustermass.simulate import populate_halos, simulate_catalogue, summarize_catalogue

SIM = SimulationConfig(n_train=500, n_test=250, n_eval=250, max_sightlines=5)
WINDOW = WindowConfig()


@pytest.fixture(scope="module")
def cat():
    return simulate_catalogue(SIM, WINDOW, seed=11, progress=False)


def _bins(cl, edges=(13.7, 14.05, 14.4, 14.75, 15.2)):
    return np.digitize(cl["log_m200c"].to_numpy(), edges[1:-1])


# ---------------------------------------------------------------- bookkeeping
def test_sizes_and_splits(cat):
    cl = cat.clusters
    assert len(cl) == SIM.n_total
    counts = cl["split"].value_counts()
    for name, n in (("train", SIM.n_train), ("test", SIM.n_test), ("eval", SIM.n_eval)):
        assert abs(counts[name] - n) <= SIM.max_sightlines
    # a halo never straddles two splits, and sight-line counts respect the cap
    assert (cl.groupby("halo_id")["split"].nunique() == 1).all()
    assert cl.groupby("halo_id").size().max() <= SIM.max_sightlines
    assert cl["log_m200c"].between(SIM.log_m_min, SIM.log_m_max).all()
    # flat-ish in log mass: the four quarters hold similar numbers of diagrams
    per_bin = np.bincount(_bins(cl))
    assert per_bin.min() > 0.6 * per_bin.max()


def test_counts_match_galaxies(cat):
    g = cat.galaxies
    ids = cat.clusters["diagram_id"].to_numpy()
    n_gal = g.groupby("diagram_id").size().reindex(ids, fill_value=0).to_numpy()
    n_mem = g[g["is_member"]].groupby("diagram_id").size().reindex(ids, fill_value=0).to_numpy()
    np.testing.assert_array_equal(n_gal, cat.clusters["n_gal"].to_numpy())
    np.testing.assert_array_equal(n_mem, cat.clusters["n_mem"].to_numpy())
    # members (inside R200c) belong to the diagram's cluster halo; its galaxies outside R200c
    # (backsplash, infalling) and the galaxies of other halos are not members
    halo_of = cat.clusters.set_index("diagram_id")["halo_id"]
    own = g["host_halo_id"].to_numpy() == halo_of.reindex(g["diagram_id"]).to_numpy()
    mem = g["is_member"].to_numpy()
    assert (own[mem]).all() and (own & ~mem).sum() > 0.05 * own.sum()
    np.testing.assert_array_equal(g["phase"].to_numpy() == 0, ~own)
    assert not (mem & (g["phase"].to_numpy() == 2)).any()  # backsplash = orbiting outside R200c
    # every diagram is centred on one galaxy of its cluster (the BCG for the sdss survey)
    cen = g[g["is_centre"]]
    assert cen["diagram_id"].nunique() == len(cat) == len(cen)
    assert np.abs(cen[["x_proj", "y_proj", "v_los"]].to_numpy()).max() == 0.0
    assert cen["is_member"].all()
    # the BCG is at least as bright as every visible member
    brightest = g[mem].groupby("diagram_id")["abs_mag_r"].min()
    np.testing.assert_array_equal(cen.set_index("diagram_id")["abs_mag_r"].reindex(brightest.index), brightest)


def test_no_galaxy_outside_window(cat):
    g = cat.galaxies
    assert (np.abs(g["x_proj"]) <= WINDOW.r_max).all()
    assert (np.abs(g["y_proj"]) <= WINDOW.r_max).all()
    assert (np.abs(g["v_los"]) <= WINDOW.v_max).all()
    assert SIM.mag_limit == 17.77  # the default survey is SDSS
    assert (g["mag_r"] <= SIM.mag_limit).all()
    # the window is filled, not just its centre
    assert np.abs(g["x_proj"]).max() > 0.95 * WINDOW.r_max
    assert np.abs(g["v_los"]).max() > 0.95 * WINDOW.v_max


def test_same_seed_same_bytes(tmp_path):
    sim = SimulationConfig(n_train=60, n_test=20, n_eval=20, max_sightlines=4, chunk_size=30)
    a = simulate_catalogue(sim, WINDOW, seed=5, progress=False)
    b = simulate_catalogue(sim, WINDOW, seed=5, progress=False)
    c = simulate_catalogue(sim, WINDOW, seed=6, progress=False)
    assert a.data_hash() == b.data_hash() != c.data_hash()
    write_catalogue(a, tmp_path / "a")
    write_catalogue(b, tmp_path / "b")
    for name in ("clusters.parquet", "galaxies.parquet", "halos.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    back = read_catalogue(tmp_path / "a")
    assert back.data_hash() == a.data_hash()
    assert back.clusters["split"].nunique() == 3


def test_chunking_does_not_change_the_halo_sample():
    small = SimulationConfig(n_train=60, n_test=20, n_eval=20, max_sightlines=4, chunk_size=30)
    big = small.model_copy(update={"chunk_size": 1000})
    a = simulate_catalogue(small, WINDOW, seed=2, progress=False).clusters
    b = simulate_catalogue(big, WINDOW, seed=2, progress=False).clusters
    np.testing.assert_array_equal(a["log_m200c"], b["log_m200c"])
    np.testing.assert_array_equal(a["split"], b["split"])


def test_summary(cat):
    s = summarize_catalogue(cat)
    assert s["n_diagrams"] == len(cat)
    assert sum(s["per_split"].values()) == len(cat)
    assert SIM.log_m_min <= s["log_m_min"] < s["log_m_max"] <= SIM.log_m_max
    assert s["median_n_gal"] >= s["median_n_mem"] > 3
    assert 0.0 < s["interloper_fraction"] < 1.0


# ---------------------------------------------------------------- physics anchors
def test_velocity_dispersion_matches_evrard():
    """Member sigma_los vs M200c: slope 0.28-0.40, within 15% of Evrard et al. 2008 at 1e15."""
    sim = SimulationConfig(n_train=400, n_test=100, n_eval=100, max_sightlines=5, interlopers=False)
    wide = WindowConfig(r_max=3.0, v_max=6000.0)  # no truncation of the member distribution
    cat = simulate_catalogue(sim, wide, seed=3, progress=False)
    g = cat.galaxies
    sat = g[g["is_member"] & ~g["is_central"]]
    s = sat.groupby("diagram_id")["v_los"].agg(["std", "size"])
    s = s[s["size"] >= 10]
    cl = cat.clusters.set_index("diagram_id").loc[s.index]
    slope, icpt = np.polyfit(cl["log_m200c"] - 15.0, np.log10(s["std"]), 1)
    ez = cosmology.use(cosmology.SIMULATION_COSMOLOGY).Ez(np.median(cl["redshift"]))
    evrard = 1082.9 * ez**0.3361  # M in h^-1 Msun: h(z) M / 1e15 Msun = E(z) M / 1e15 h^-1 Msun
    assert 0.28 <= slope <= 0.40
    assert abs(10**icpt / evrard - 1) < 0.15


def test_interlopers_tens_of_percent_and_falling(cat):
    cl = cat.clusters
    b = _bins(cl)
    frac = [1 - cl["n_mem"][b == k].sum() / cl["n_gal"][b == k].sum() for k in range(4)]
    assert 0.45 < frac[0] < 0.9  # low masses: the window reaches several R200c
    assert 0.15 < frac[3] < 0.5  # outskirts (backsplash + infall) of the cluster itself
    assert all(np.diff(frac) < 0)


def test_richness_rises_with_mass(cat):
    cl = cat.clusters
    b = _bins(cl)
    med = [np.median(cl["n_mem"][b == k]) for k in range(4)]
    assert all(np.diff(med) > 0)
    assert med[3] > 3 * med[0]


def test_interloper_clusters_occur(cat):
    cl = cat.clusters
    low = cl["log_m200c"] < 14.05
    assert cl["has_interloper_cluster"][low].mean() >= 0.04
    assert cl["has_interloper_cluster"].mean() >= 0.015
    # the halos table holds them: a more massive halo centred in the window
    h = cat.halos.merge(cl[["diagram_id", "log_m200c"]], on="diagram_id", suffixes=("", "_cl"))
    hit = h[
        (h["log_m200c"] > h["log_m200c_cl"])
        & (np.hypot(h["x_proj"], h["y_proj"]) < WINDOW.r_max)
        & (np.abs(h["v_los"]) < WINDOW.v_max)
    ]
    assert set(hit["diagram_id"]) == set(cl["diagram_id"][cl["has_interloper_cluster"]])
    assert (cat.halos["log_m200c"] >= SIM.halo_log_m_min).all()


def test_empty_request_is_an_error():
    with pytest.raises(ConfigError, match="no diagrams"):
        simulate_catalogue(SimulationConfig(n_train=0, n_test=0, n_eval=0), WINDOW, seed=0)


def test_interlopers_switch():
    sim = SimulationConfig(n_train=50, n_test=0, n_eval=0, max_sightlines=2, interlopers=False)
    cat = simulate_catalogue(sim, WINDOW, seed=1, progress=False)
    halo_of = cat.clusters.set_index("diagram_id")["halo_id"].reindex(cat.galaxies["diagram_id"])
    assert (cat.galaxies["host_halo_id"].to_numpy() == halo_of.to_numpy()).all()
    assert (cat.clusters["n_gal"] >= cat.clusters["n_mem"]).all()
    assert len(cat.halos) == 0


# ---------------------------------------------------------------- components
def test_populate_halos_profile_and_occupation():
    rng = np.random.default_rng(0)
    lm = np.repeat([13.0, 14.0, 15.0], [300, 100, 30])
    df = populate_halos(lm, 0.05, rng, mag_limit_abs=-19.0)
    for col in ("halo_index", "dx", "dy", "dz", "dvx", "dvy", "dvz", "abs_mag_r", "is_central", "phase"):
        assert col in df
    assert df["is_central"].sum() == lm.size
    r200 = cosmology.r200c(lm, 0.05)[df["halo_index"]]
    x = np.sqrt(df["dx"] ** 2 + df["dy"] ** 2 + df["dz"] ** 2) / r200
    # continuous through R200c: triaxial (up to ~1.7x the ellipsoidal radius) and out to X_MAX
    assert (x <= gal.X_MAX * 2.0).all() and (x > 1.0).mean() > 0.2
    sats = df[~df["is_central"]]
    assert (sats["abs_mag_r"] <= -19.0).all()
    nsat = np.bincount(sats["halo_index"], minlength=lm.size)
    mean = [nsat[lm == m].mean() for m in (13.0, 14.0, 15.0)]
    c = gal.concentration(np.array([13.0, 14.0, 15.0]))
    expected = gal.mean_satellites(np.array([13.0, 14.0, 15.0]), gal.mag_to_log_l(-19.0)) / (
        gal.fraction_inside_r180m(c, gal.truncation_radius(np.array([13.0, 14.0, 15.0]), c)))
    np.testing.assert_allclose(mean, expected, rtol=0.15)
    assert mean[0] < mean[1] < mean[2]


def test_nfw_radii_follow_enclosed_mass():
    rng = np.random.default_rng(1)
    c = 5.0
    x = gal.sample_nfw_radius(np.full(40000, c), rng)
    for q in (0.1, 0.3, 0.6):
        expected = gal._nfw_m(c * q) / gal._nfw_m(c)
        assert abs(np.mean(x < q) - expected) < 0.01
    x = gal.sample_nfw_radius(np.full(40000, c), rng, x_max=3.0)
    assert abs(np.mean(x < 1.0) - gal._nfw_m(c) / gal._nfw_m(3 * c)) < 0.01


def test_halo_radii_follow_dk14():
    """Radii of the DK14 inner profile (NFW x transition) follow its enclosed number."""
    from scipy import integrate as si

    rng = np.random.default_rng(4)
    c, xt = 4.0, 1.6
    x = gal.sample_halo_radius(np.full(60000, c), xt, rng)
    edge = float(gal.outer_edge(xt))
    dens = lambda t: t / (1 + c * t) ** 2 * gal.dk14_transition(t, xt)  # noqa: E731
    total = si.quad(dens, 0, edge)[0]
    for q in (0.3, 1.0, 2.0):
        assert abs(np.mean(x < q) - si.quad(dens, 0, q)[0] / total) < 0.01
    f = gal.fraction_inside_r180m(np.array([c]), np.array([xt]))[0]
    assert f == pytest.approx(si.quad(dens, 0, gal.radius_ratio(c, 180.0))[0] / total, rel=2e-3)


def test_jeans_dispersion():
    """sigma_r of the beta(r) = 0.5 r/(r + r_s) Jeans solution equals direct quadrature of the
    Jeans equation with its integrating factor exp(int 2 beta / r dr)."""
    c = 5.0

    def nu(t):  # NFW tracer density
        return 1 / (t * (1 + t) ** 2)

    def factor(y, t):  # exp(int_y^t 2 beta(s)/s ds) for beta = 0.5 s/(s+1), by quadrature
        return np.exp(integrate.quad(lambda s: 2 * 0.5 * s / (s + 1) / s, y, t)[0])

    for y in (0.3, 2.0, 8.0):
        integral = integrate.quad(lambda t, y=y: factor(y, t) * nu(t) * gal._nfw_m(t) / t**2,
                                  y, np.inf, limit=200)[0]
        direct = np.sqrt(c / gal._nfw_m(c) * integral / nu(y))
        assert gal.jeans_sigma_r(y / c, c) == pytest.approx(direct, rel=3e-3)
    # isotropic at the centre, 0.5 far out
    assert gal.anisotropy_beta(1e-4, c) < 1e-3 and gal.anisotropy_beta(100.0, c) > 0.49


def test_upper_gamma():
    for a, x in ((-0.45, 0.02), (-0.2, 0.5), (0.0, 1.0), (0.3, 2.0)):
        direct = integrate.quad(lambda t, a=a: t ** (a - 1) * np.exp(-t), x, np.inf)[0]
        assert gal.upper_gamma(a, x) == pytest.approx(direct, rel=1e-6)


def test_sightlines_well_separated():
    d = hal.sightline_directions(25)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    assert hal.min_separation_deg(d) > 22.0
    assert hal.min_separation_deg(d[:5]) > 50.0
    rng = np.random.default_rng(0)
    b = hal.sightline_bases(np.array([25, 3, 1]), rng)
    assert b.shape == (29, 3, 3)
    np.testing.assert_allclose(
        np.einsum("nij,nkj->nik", b, b), np.broadcast_to(np.eye(3), (29, 3, 3)), atol=1e-12
    )
    # a random rotation keeps the separations of one halo's sight lines
    assert hal.min_separation_deg(b[:25, 2]) == pytest.approx(hal.min_separation_deg(d), abs=1e-6)


def test_infall_profile():
    r = np.array([1.5, 3.0, 6.0, 12.0, 24.0])
    lm, z = 14.5, 0.05
    v = hal.infall_velocity(r, lm, cosmology.r200c(lm, z), cosmology.v200c(lm, z), 4.5, z)
    assert (v < 0).all() and (np.diff(v) >= 0).all() and v[-1] > v[1]  # infall, weakening outward
    assert v[-1] > -0.3 * cosmology.hubble(z) * r[-1]  # Hubble flow wins far out
    assert v[0] >= -cosmology.v200c(lm, z) - 1e-9  # capped at V200c


def test_matter_correlation_function():
    c = cosmology.use(cosmology.SIMULATION_COSMOLOGY)
    lin = c.correlationFunction(np.array([1.0, 2.0, 10.0, 30.0]), hal.Z_REF)
    xi = hal.xi_mm(np.array([1.0, 2.0, 10.0, 30.0]))
    assert xi[0] > 3 * lin[0] and xi[1] > 1.5 * lin[1]  # nonlinear boost on cluster scales
    np.testing.assert_allclose(xi[2:], lin[2:], rtol=0.02)  # linear on large scales
    k = np.array([1e-3, 1e-2, 1.0])
    d_lin, d_nl = hal._halofit_delta2(k, hal.Z_REF)
    np.testing.assert_allclose(d_nl[:2], d_lin[:2], rtol=0.02)
    assert d_nl[2] > 3 * d_lin[2]
    # scale-dependent bias suppresses b b xi where xi >> 1, and vanishes on large scales
    assert hal.halo_xi(1.0, 2.0, 2.0) < 4 * xi[0]
    assert hal.halo_xi(30.0, 2.0, 2.0) == pytest.approx(4 * xi[3], rel=0.02)


def test_streamed_catalogue_equals_in_memory(tmp_path):
    import pandas as pd
    """simulate_to_directory (one chunk in memory at a time) writes the same catalogue."""
    from clustermass.catalog import read_catalogue
    from clustermass.config import SimulationConfig, WindowConfig
    from clustermass.simulate import simulate_catalogue, simulate_to_directory

    sim = SimulationConfig(n_train=60, n_test=30, n_eval=30, max_sightlines=3, chunk_size=40)
    window = WindowConfig()
    mem = simulate_catalogue(sim, window, seed=5, progress=False)
    simulate_to_directory(sim, window, 5, tmp_path / "cat", progress=False)
    disk = read_catalogue(tmp_path / "cat")
    pd.testing.assert_frame_equal(disk.clusters, mem.clusters)
    pd.testing.assert_frame_equal(disk.galaxies, mem.galaxies)
    pd.testing.assert_frame_equal(disk.halos, mem.halos)
    assert disk.meta["seed"] == 5 and not list((tmp_path / "cat").glob(".*.tmp"))


def test_mass_function_sample_follows_tinker08():
    """simulation.mass_distribution=mass-function: one sight line per halo, masses ~ Tinker08."""
    from scipy import stats

    sim = SimulationConfig(n_train=2000, n_test=1000, n_eval=1000, mass_distribution="mass-function")
    halos = hal.cluster_sample(sim, np.random.default_rng(3))
    assert (halos["n_sightlines"] == 1).all() and len(halos) == sim.n_total
    assert (halos["split"].value_counts()[["train", "test", "eval"]].to_numpy() == [2000, 1000, 1000]).all()
    lm, _, cum = hal.mass_function_table()
    c0, c1 = np.interp([sim.log_m_min, sim.log_m_max], lm, cum)
    cdf = lambda x: (np.interp(x, lm, cum) - c0) / (c1 - c0)  # noqa: E731
    assert stats.kstest(halos["log_m200c"], cdf).pvalue > 0.01
    flat = hal.cluster_sample(sim.model_copy(update={"mass_distribution": "flat"}), np.random.default_rng(3))
    assert stats.kstest(flat["log_m200c"], cdf).pvalue < 1e-6  # the default sample is not the mass function
    assert np.median(halos["log_m200c"]) < 14.0 < np.median(flat["log_m200c"])
