"""Interloper-cluster finder against a brute-force double loop and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clustermass import cosmology
from clustermass.contamination import (
    PAIR_COLUMNS,
    catalogue_contamination,
    contamination_table,
    interlopers_from_halos,
    interlopers_in_box,
    interlopers_in_box_naive,
    phase_space_distance,
)


def _box(seed, n=1500, box=60.0, n_diag=150):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, box, (n, 3))
    # clump some halos around others so that close pairs exist
    pos[: n // 3] = np.mod(pos[n // 3: 2 * (n // 3)] + rng.normal(0, 1.0, (n // 3, 3)), box)
    vel = rng.normal(0, 500, (n, 3))
    log_m = rng.uniform(13.0, 15.2, n)
    centres = rng.choice(np.flatnonzero(log_m > 13.7), n_diag)
    los = rng.normal(size=(n_diag, 3))
    z = rng.uniform(0.01, 0.08, n_diag)
    return pos, vel, log_m, centres, los, z, box


@pytest.mark.parametrize("periodic", [True, False])
def test_tree_matches_double_loop(periodic):
    pos, vel, log_m, centres, los, z, box = _box(0)
    bs = box if periodic else None
    fast = interlopers_in_box(pos, vel, log_m, centres, los, z, box_size=bs)
    slow = interlopers_in_box_naive(pos, vel, log_m, centres, los, z, box_size=bs)
    assert list(fast.columns) == PAIR_COLUMNS
    assert len(slow) > 20  # the test must exercise real pairs
    pd.testing.assert_frame_equal(fast, slow, check_exact=False, rtol=1e-10, atol=1e-9)
    assert (fast["log_m200c"] > fast["cluster_log_m200c"]).all()
    assert (fast["r_proj"] < 1.6).all() and (fast["dv_los"].abs() < 2200).all()


def test_periodic_wrap_and_hubble_flow_hand():
    # cluster at the box edge; a heavier halo across the boundary 10 h^-1 Mpc along the sight line
    box = 100.0
    pos = np.array([[99.5, 50.0, 50.0], [9.5, 50.0, 50.0], [99.5, 50.0, 50.0 + 0.5], [99.5 - 25, 50.0, 50.0]])
    vel = np.zeros((4, 3))
    log_m = np.array([14.0, 14.5, 14.2, 15.0])
    los = np.array([[1.0, 0.0, 0.0]])
    out = interlopers_in_box(pos, vel, log_m, [0], los, 0.0, box_size=box)
    # halo 1: dr_los = +10 -> v = 100 km/s/(h^-1 Mpc) * 10 = 1000 km/s; halo 2: R = 0.5, v = 0;
    # halo 3: 25 h^-1 Mpc in front -> -2500 km/s, outside the window
    assert out["halo_id"].tolist() == [1, 2]
    assert out["dv_los"].tolist() == pytest.approx([1000.0, 0.0])
    assert out["r_proj"].tolist() == pytest.approx([0.0, 0.5])
    # at z = 0.05 the Hubble flow is H(z) a dr and the projected offset a dr_perp (proper)
    out = interlopers_in_box(pos, vel, log_m, [0], los, 0.05, box_size=box)
    assert out["dv_los"].iloc[0] == pytest.approx(cosmology.hubble(0.05) * 10 / 1.05)
    assert out["r_proj"].iloc[1] == pytest.approx(0.5 / 1.05)


def test_phase_space_distance_hand():
    z = 0.03
    r1, r2 = cosmology.r200c(14.0, z), cosmology.r200c(14.5, z)
    v1, v2 = cosmology.v200c(14.0, z), cosmology.v200c(14.5, z)
    hand = math.sqrt((0.3 / ((r1 + r2) / 2)) ** 2 + (0.4 / ((r1 + r2) / 2)) ** 2 + (500 / ((v1 + v2) / 2)) ** 2)
    assert phase_space_distance(0.3, 0.4, 500.0, 14.0, 14.5, z) == pytest.approx(hand, rel=1e-12)
    # R200c = (3 M / (4 pi 200 rho_c))^(1/3) (eq. 6)
    rho = cosmology.rho_c(z)
    assert r1 == pytest.approx((3 * 1e14 / (4 * math.pi * 200 * rho)) ** (1 / 3), rel=1e-3)


def _halos_case():
    clusters = pd.DataFrame(dict(diagram_id=[0, 1, 2], halo_id=[10, 11, 12], split="eval",
                                 log_m200c=[14.0, 14.6, 13.9], redshift=[0.03, 0.05, 0.04]))
    halos = pd.DataFrame(
        [
            (0, 10, 14.0, 0.0, 0.0, 0.0),  # itself
            (0, 20, 14.5, 0.3, 0.4, 500.0),  # interloper cluster
            (0, 21, 13.5, 0.1, 0.1, 100.0),  # lighter: not one
            (0, 22, 15.0, 1.2, 1.2, 0.0),  # R = 1.70 > 1.6
            (0, 23, 15.0, 0.1, 0.0, -2300.0),  # |dv| > 2200
            (0, 24, 14.3, -1.0, 0.5, -2100.0),  # interloper cluster
            (1, 25, 14.5, 0.0, 0.2, 0.0),  # lighter than 14.6
            (2, 26, 14.9, 0.0, -0.2, 50.0),  # interloper cluster
        ],
        columns=["diagram_id", "halo_id", "log_m200c", "x_proj", "y_proj", "v_los"],
    )
    return clusters, halos


def test_interlopers_from_halos_vs_brute_force():
    clusters, halos = _halos_case()
    out = interlopers_from_halos(clusters, halos)
    assert out["halo_id"].tolist() == [20, 24, 26]
    # brute force over every (diagram, halo) pair
    expect = []
    for _, c in clusters.iterrows():
        for _, h in halos[halos.diagram_id == c.diagram_id].iterrows():
            if h.halo_id != c.halo_id and h.log_m200c > c.log_m200c and math.hypot(h.x_proj, h.y_proj) < 1.6 \
                    and abs(h.v_los) < 2200:
                expect.append((c.diagram_id, h.halo_id, 10 ** (h.log_m200c - c.log_m200c),
                               float(phase_space_distance(h.x_proj, h.y_proj, h.v_los, c.log_m200c, h.log_m200c,
                                                          c.redshift))))
    got = list(zip(out.diagram_id, out.halo_id, out.mass_ratio, out.distance, strict=True))
    assert len(got) == len(expect)
    for g, e in zip(got, expect, strict=True):
        assert g[:2] == e[:2]
        assert g[2:] == pytest.approx(e[2:], rel=1e-12)
    assert out["mass_ratio"].iloc[0] == pytest.approx(10**0.5)


def test_contamination_table_sums_and_clean_rows():
    clusters, halos = _halos_case()
    pairs = interlopers_from_halos(clusters, halos)
    tab = contamination_table([0, 1, 2, 99], pairs)
    assert tab["diagram_id"].tolist() == [0, 1, 2, 99]
    assert tab["n_interlopers"].tolist() == [2, 0, 1, 0]
    assert tab.loc[0, "contamination"] == pytest.approx(10**0.5 + 10**0.3)
    assert tab.loc[0, "max_ratio"] == pytest.approx(10**0.5)
    assert tab.loc[1, "contamination"] == 0 and np.isnan(tab.loc[1, "d_min"])
    assert tab.loc[2, "contamination"] == pytest.approx(10**1.0)
    assert tab.loc[0, "d_min"] == pytest.approx(pairs[pairs.diagram_id == 0]["distance"].min())


def test_catalogue_contamination_none_without_halos():
    class _Cat:
        halos = None

    assert catalogue_contamination(_Cat()) is None
