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


@pytest.fixture(scope="session", name="assemble_catalogue")
def _assemble_catalogue_fixture():
    return assemble_catalogue


@pytest.fixture(scope="session", name="gaussian_catalogue")
def _gaussian_catalogue_fixture():
    return gaussian_catalogue


@pytest.fixture(scope="session", name="evrard_catalogue")
def _evrard_catalogue_fixture():
    return evrard_catalogue


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
