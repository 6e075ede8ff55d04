"""Shared test fixtures: synthetic catalogues, and the ``slow`` / ``gpu`` markers.

Catalogue factories (fixtures returning functions, so each test picks sizes and seeds):

* ``assemble_catalogue(galaxies, **cluster_columns)``: a valid :class:`Catalogue` from one galaxy
  table per diagram, filling the required cluster columns with defaults (the schema boilerplate
  every synthetic catalogue needs).
* ``gaussian_catalogue(n, seed)``: small diagrams of Gaussian blobs (20-60 galaxies), the last one
  empty; one ``train`` split. For KDE / dataset tests.
* ``evrard_catalogue(n_test, n_eval, seed, halos)``: members with the Evrard et al. (2008)
  velocity dispersion of their mass plus uniform interlopers, ``test`` and ``eval`` splits, and
  optionally a halos table of heavier interloper clusters. For evaluation / baseline tests.
* ``learnable_catalogue(n_halos, sightlines, n_test_halos, seed)``: several sight lines per halo
  whose velocity spread grows with mass (sigma ~ M^(1/3)), ``train`` and ``test`` halos: a
  network learns it in a few epochs. For training tests.
* ``unsorted_catalogue(n, seed)``: a few small diagrams over all three splits, two per halo, the
  galaxy table given in reverse diagram order. For catalogue-format tests.
* ``random_sky(seed, n_gal, n_cl, ra, dec)``: a (galaxies, clusters) pair of sky tables (ra, dec
  [deg], z, mag) with a clump of galaxies around each cluster. For sky-to-catalogue tests.

Units as in the catalogue format: log10(M200c / h^-1 Msun), h^-1 Mpc, km/s.

Markers (registered in pyproject.toml): ``slow``; ``gpu`` tests are skipped without CUDA.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clustermass.catalog import Catalogue

#: defaults of the required cluster columns not derived from the galaxies
CLUSTER_DEFAULTS = {"split": "train", "log_m200c": 14.5, "r200c": 1.0, "v200c": 800.0, "redshift": 0.05,
                    "n_mem": 0}


def assemble_catalogue(galaxies, *, diagram_ids=None, halos=None, **cluster_columns) -> Catalogue:
    """Catalogue from a list of per-diagram galaxy tables (dicts or DataFrames with x_proj, y_proj, v_los
    and optional extra columns such as is_member).

    ``cluster_columns`` (scalars or one value per diagram) override :data:`CLUSTER_DEFAULTS`;
    ``halo_id`` defaults to the diagram's index, ``n_gal`` is counted.
    """
    n = len(galaxies)
    ids = np.arange(n) if diagram_ids is None else np.asarray(diagram_ids)
    tables = [pd.DataFrame({"diagram_id": i, **dict(g)}) for i, g in zip(ids, galaxies, strict=True)]
    cols = {"diagram_id": ids, "halo_id": np.arange(n)}
    for key, default in CLUSTER_DEFAULTS.items():
        if key == "n_mem":  # the column order of the catalogue format
            cols["n_gal"] = [len(t) for t in tables]
        cols[key] = cluster_columns.pop(key, default)
    cols.update(cluster_columns)
    return Catalogue(pd.DataFrame(cols), pd.concat(tables, ignore_index=True), halos)


def gaussian_catalogue(n: int = 6, seed: int = 0) -> Catalogue:
    """``n`` diagrams of 20-60 galaxies, x ~ N(0, 0.5), y ~ N(0.2, 0.4) [h^-1 Mpc], v ~ N(0, 600) km/s;
    the last diagram is empty. diagram_id 100, 101, ...; masses uniform in [13.7, 15.2]."""
    rng = np.random.default_rng(seed)
    ngal = rng.integers(20, 60, n)
    ngal[-1] = 0  # one empty diagram
    log_m = rng.uniform(13.7, 15.2, n)
    m = ngal.sum()
    x, y, v = rng.normal(0, 0.5, m), rng.normal(0, 0.4, m) + 0.2, rng.normal(0, 600, m)
    cuts = np.cumsum(ngal)[:-1]
    galaxies = [dict(x_proj=a, y_proj=b, v_los=c)
                for a, b, c in zip(np.split(x, cuts), np.split(y, cuts), np.split(v, cuts), strict=True)]
    return assemble_catalogue(galaxies, diagram_ids=np.arange(100, 100 + n), log_m200c=log_m)


def evrard_catalogue(n_test: int = 200, n_eval: int = 150, seed: int = 0, halos: bool = True) -> Catalogue:
    """Clusters with Gaussian member velocities (Evrard sigma) + uniform interlopers.

    N_mem = 8 * 10^(0.9 (log M - 13.7)) + 5 members inside 0.8 h^-1 Mpc, Poisson(5) interlopers
    with |v| < 2200 km/s; with ``halos`` a quarter of the diagrams get a heavier interloper halo.
    """
    from clustermass.baselines import evrard_sigma

    rng = np.random.default_rng(seed)
    n = n_test + n_eval
    lm = rng.uniform(13.7, 15.1, n)
    n_mem = np.round(8 * 10 ** (0.9 * (lm - 13.7))).astype(int) + 5
    galaxies = []
    for i in range(n):
        k = rng.poisson(5)
        v = np.concatenate([rng.normal(0, evrard_sigma(lm[i], 0.04), n_mem[i]), rng.uniform(-2200, 2200, k)])
        r = 0.8 * np.sqrt(rng.uniform(0, 1, n_mem[i] + k))
        phi = rng.uniform(0, 2 * np.pi, n_mem[i] + k)
        galaxies.append(dict(x_proj=r * np.cos(phi), y_proj=r * np.sin(phi), v_los=v,
                             is_member=np.arange(n_mem[i] + k) < n_mem[i]))
    hal = None
    if halos:
        sel = rng.choice(n, n // 4, replace=False)
        hal = pd.DataFrame(dict(diagram_id=sel + 100, halo_id=10_000 + sel, log_m200c=lm[sel] + rng.uniform(-0.3, 1, sel.size),
                                x_proj=rng.uniform(-1.5, 1.5, sel.size), y_proj=rng.uniform(-1.5, 1.5, sel.size),
                                v_los=rng.uniform(-2500, 2500, sel.size)))
    return assemble_catalogue(galaxies, diagram_ids=np.arange(n) + 100, halos=hal,
                              split=["test"] * n_test + ["eval"] * n_eval, log_m200c=lm, redshift=0.04,
                              n_mem=n_mem)


def learnable_catalogue(n_halos: int = 60, sightlines: int = 2, n_test_halos: int = 10, seed: int = 0) -> Catalogue:
    """Synthetic diagrams whose v_los spread grows with mass (sigma = 600 km/s (M / 10^14.5)^(1/3)).

    ``n_halos`` train and ``n_test_halos`` test halos, log M uniform in [13.7, 15.2], each seen
    along ``sightlines`` sight lines of 20-39 galaxies (x, y ~ N(0, 0.5) h^-1 Mpc clipped to the
    window, v ~ N(0, sigma) clipped to +-2199 km/s); every galaxy is a member.
    """
    rng = np.random.default_rng(seed)
    galaxies, halo, split, log_m, sigma, n_mem = [], [], [], [], [], []
    for h in range(n_halos + n_test_halos):
        logm = rng.uniform(13.7, 15.2)
        sig = 600.0 * 10 ** ((logm - 14.5) / 3)
        for _ in range(sightlines):
            n = int(rng.integers(20, 40))
            galaxies.append(dict(x_proj=np.clip(rng.normal(0, 0.5, n), -1.59, 1.59),
                                 y_proj=np.clip(rng.normal(0, 0.5, n), -1.59, 1.59),
                                 v_los=np.clip(rng.normal(0, sig, n), -2199, 2199)))
            halo.append(h)
            split.append("train" if h < n_halos else "test")
            log_m.append(logm)
            sigma.append(sig)
            n_mem.append(n)
    return assemble_catalogue(galaxies, halo_id=halo, split=split, log_m200c=log_m, v200c=sigma, n_mem=n_mem)


def unsorted_catalogue(n: int = 5, seed: int = 0) -> Catalogue:
    """``n`` diagrams of 3-19 galaxies (x, y uniform in +-1.6 h^-1 Mpc, v ~ N(0, 500) km/s), splits
    train, test, eval, train, test, ...; diagrams 2k and 2k+1 share a halo. The galaxy table is
    handed to :class:`Catalogue` in reverse diagram order, which it must sort."""
    rng = np.random.default_rng(seed)
    log_m = rng.uniform(13.7, 15.2, n)
    ngal = rng.integers(3, 20, n)
    m = ngal.sum()
    x, y, v = rng.uniform(-1.6, 1.6, m), rng.uniform(-1.6, 1.6, m), rng.normal(0, 500, m)
    cuts = np.cumsum(ngal)[:-1]
    galaxies = [dict(x_proj=a, y_proj=b, v_los=c)
                for a, b, c in zip(np.split(x, cuts), np.split(y, cuts), np.split(v, cuts), strict=True)]
    cat = assemble_catalogue(galaxies, halo_id=np.arange(n) // 2, split=(["train", "test", "eval"] * n)[:n],
                             log_m200c=log_m)
    return Catalogue(cat.clusters, cat.galaxies.iloc[::-1].reset_index(drop=True))


def random_sky(seed: int = 0, n_gal: int = 20000, n_cl: int = 60, ra=(150.0, 170.0), dec=(0.0, 15.0)):
    """(galaxies, clusters) sky tables: ``n_gal`` galaxies uniform on the sphere within ``ra`` x
    ``dec`` [deg], z uniform in [0.02, 0.06], r mag uniform in [14, 18.5]; ``n_cl`` clusters (id
    100, 101, ...) at least 1 deg inside the edges, z in [0.025, 0.055], each with a clump of 40
    galaxies (0.3 deg, sigma_z 0.002) so that its window is populated."""
    rng = np.random.default_rng(seed)
    s0, s1 = np.sin(np.radians(dec))
    gal = pd.DataFrame({
        "ra": rng.uniform(*ra, n_gal),
        "dec": np.degrees(np.arcsin(rng.uniform(s0, s1, n_gal))),
        "z": rng.uniform(0.02, 0.06, n_gal),
        "mag": rng.uniform(14.0, 18.5, n_gal),
    })
    cl = pd.DataFrame({
        "id": np.arange(100, 100 + n_cl),
        "ra": rng.uniform(ra[0] + 1, ra[1] - 1, n_cl),
        "dec": rng.uniform(dec[0] + 1, dec[1] - 1, n_cl),
        "z": rng.uniform(0.025, 0.055, n_cl),
    })
    k = 40
    cen = cl.loc[np.repeat(np.arange(n_cl), k)].reset_index(drop=True)
    clump = pd.DataFrame({
        "ra": cen["ra"] + rng.normal(0, 0.3, n_cl * k) / np.cos(np.radians(cen["dec"])),
        "dec": cen["dec"] + rng.normal(0, 0.3, n_cl * k),
        "z": cen["z"] + rng.normal(0, 0.002, n_cl * k),
        "mag": rng.uniform(14.0, 18.5, n_cl * k),
    })
    return pd.concat([gal, clump], ignore_index=True), cl


@pytest.fixture(scope="session", name="assemble_catalogue")
def _assemble_catalogue_fixture():
    return assemble_catalogue


@pytest.fixture(scope="session", name="gaussian_catalogue")
def _gaussian_catalogue_fixture():
    return gaussian_catalogue


@pytest.fixture(scope="session", name="evrard_catalogue")
def _evrard_catalogue_fixture():
    return evrard_catalogue


@pytest.fixture(scope="session", name="learnable_catalogue")
def _learnable_catalogue_fixture():
    return learnable_catalogue


@pytest.fixture(scope="session", name="unsorted_catalogue")
def _unsorted_catalogue_fixture():
    return unsorted_catalogue


@pytest.fixture(scope="session", name="random_sky")
def _random_sky_fixture():
    return random_sky


# ---------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return  # torch is imported only when some collected test needs a GPU
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu:
        item.add_marker(skip)
