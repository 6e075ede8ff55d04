"""The mock catalogue: cluster halos -> sight lines -> members + clustered neighbours -> diagrams.

Every chunk of halos is generated from its own ``numpy.random.SeedSequence`` child, vectorised
over all halos and diagrams of the chunk, so chunks are independent tasks (Dask-ready:
``dask.delayed(simulate_chunk)``) and the output depends only on the seed and the configuration.
See docs/simulator.md for the model and its references.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from .. import cosmology
from ..catalog import Catalogue
from ..config import SimulationConfig, WindowConfig
from ..errors import ConfigError
from . import galaxies as gal
from . import halos as hal
from .observe import (
    SURVEYS,
    abs_mag_limit,
    los_depth,
    observe,
    observer_distance,
    spectroscopic_selection,
    to_sightline_frame,
)

#: host_halo_id of neighbour halos: NEIGHBOUR_ID_BASE + diagram_id * NEIGHBOUR_ID_STRIDE + k
NEIGHBOUR_ID_BASE = 10**12
NEIGHBOUR_ID_STRIDE = 10**5


def plan(sim: SimulationConfig, seed: int) -> tuple[pd.DataFrame, list[np.random.SeedSequence]]:
    """The cluster-halo table (with ``first_diagram`` and ``chunk``) and one seed per chunk."""
    root = np.random.SeedSequence(seed)
    halo_seed, chunk_root = root.spawn(2)
    halos = hal.cluster_sample(sim, np.random.default_rng(halo_seed))
    nsl = halos["n_sightlines"].to_numpy()
    halos["first_diagram"] = np.cumsum(nsl) - nsl
    halos["chunk"] = (halos["first_diagram"] // sim.chunk_size).astype(np.int64)
    n_chunks = int(halos["chunk"].max()) + 1 if len(halos) else 0
    return halos, chunk_root.spawn(n_chunks)


def simulate_chunk(
    halos: pd.DataFrame,
    sim: SimulationConfig,
    window: WindowConfig,
    seed: np.random.SeedSequence | int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Diagrams of a set of cluster halos (one chunk): clusters, galaxies and halos tables.

    ``halos`` needs ``halo_id, log_m200c, n_sightlines, split, first_diagram`` (diagram ids are
    ``first_diagram + sight-line index``).
    """
    rng = np.random.default_rng(seed)
    survey = SURVEYS[sim.survey]
    lm_h = halos["log_m200c"].to_numpy(float)
    nsl = halos["n_sightlines"].to_numpy(np.int64)
    nh = len(halos)
    hd = np.repeat(np.arange(nh), nsl)  # halo row of each diagram
    nd = hd.size
    sl = np.arange(nd) - np.repeat(np.cumsum(nsl) - nsl, nsl)
    diagram_id = halos["first_diagram"].to_numpy(np.int64)[hd] + sl
    basis = hal.sightline_bases(nsl, rng)
    chi = observer_distance(nd, sim.distance_min, sim.distance_max, rng)
    z = cosmology.redshift_from_comoving(chi)
    lm_d = lm_h[hd]
    r200 = cosmology.r200c(lm_d, z)
    v200 = cosmology.v200c(lm_d, z, r200=r200)
    conc_h = gal.concentration(lm_h) * 10 ** (gal.CONC_SCATTER_DEX * rng.normal(size=nh))
    conc_d = conc_h[hd]
    depth = los_depth(z, window)

    # ---- cluster galaxies: one 3D realisation per halo (principal-axis frame; the sight lines
    # are randomly oriented in it), seen along each of its sight lines
    mlim_cl = abs_mag_limit(sim.mag_limit, chi - gal.X_MAX * r200 * (1 + z))  # faintest needed
    mlim_h = np.full(nh, -np.inf)
    np.maximum.at(mlim_h, hd, mlim_cl)
    mem = gal.populate_scaled(lm_h, rng, mlim_h, conc_h)
    gstart = np.searchsorted(mem["halo_index"], np.arange(nh))
    gcount = np.bincount(mem["halo_index"], minlength=nh)
    r3d = np.linalg.norm(mem["x"], axis=1)
    # the diagram centre: the central galaxy, or the brightest galaxy inside R200c (BCG)
    if survey["centre"] == "bcg":
        inside = np.flatnonzero(r3d < 1.0)
        o = inside[np.lexsort((mem["abs_mag_r"][inside], mem["halo_index"][inside]))]
        first = np.searchsorted(mem["halo_index"][o], np.arange(nh))
        centre_h = o[first]
    else:
        centre_h = gstart
    per_d = gcount[hd]
    md = np.repeat(np.arange(nd), per_d)  # diagram of each member copy
    gi = np.repeat(gstart[hd] - np.cumsum(per_d) + per_d, per_d) + np.arange(per_d.sum())
    off_x = to_sightline_frame(mem["x"][centre_h[hd]] * r200[:, None], basis)  # per diagram
    off_v = to_sightline_frame(mem["v"][centre_h[hd]] * v200[:, None], basis)
    mpos = to_sightline_frame(mem["x"][gi] * r200[md, None], basis[md]) - off_x[md]
    mvel = to_sightline_frame(mem["v"][gi] * v200[md, None], basis[md]) - off_v[md]
    m_abs = mem["abs_mag_r"][gi]
    m_cen = mem["is_central"][gi]

    # ---- neighbour halos in each cylinder and their galaxies (randomly oriented)
    if sim.interlopers:
        mlim_near = abs_mag_limit(sim.mag_limit, chi - depth * (1 + z))
        floor = np.maximum(
            gal.min_log_m_hosting(gal.mag_to_log_l(mlim_near)), hal.NEIGHBOUR_LOG_M_MIN
        )
        nb = hal.sample_neighbours(lm_d, r200, v200, conc_d, z, floor, window.r_max, depth, rng)
    else:
        nb = pd.DataFrame(
            {c: np.zeros(0) for c in ("diagram", "log_m200c", "x", "y", "z", "vx", "vy", "vz")}
        )
        nb["diagram"] = nb["diagram"].astype(np.int64)
    nbd = nb["diagram"].to_numpy(np.int64)
    nb_lm = nb["log_m200c"].to_numpy(float)
    nb_local = np.arange(len(nb)) - np.searchsorted(nbd, nbd)
    nb_id = NEIGHBOUR_ID_BASE + diagram_id[nbd] * NEIGHBOUR_ID_STRIDE + nb_local
    nb_pos = nb[["x", "y", "z"]].to_numpy(float) - off_x[nbd]
    nb_vel = nb[["vx", "vy", "vz"]].to_numpy(float) - off_v[nbd]
    nb_c = gal.concentration(nb_lm) * 10 ** (gal.CONC_SCATTER_DEX * rng.normal(size=len(nb)))
    ng = gal.populate_scaled(
        nb_lm,
        rng,
        abs_mag_limit(sim.mag_limit, chi[nbd] - depth[nbd] * (1 + z[nbd])),
        nb_c,
    )
    hi = ng["halo_index"]
    nb_rot = hal.random_rotations(len(nb), rng)[hi]
    ngd = nbd[hi]
    nb_r200 = cosmology.r200c(nb_lm, z[nbd])
    nb_v200 = cosmology.v200c(nb_lm, z[nbd], r200=nb_r200)
    npos = nb_pos[hi] + np.einsum("nij,nj->ni", nb_rot, ng["x"]) * nb_r200[hi, None]
    nvel = nb_vel[hi] + np.einsum("nij,nj->ni", nb_rot, ng["v"]) * nb_v200[hi, None]

    # ---- observe everything: projection, flux limit, window, then fibres and completeness
    pos = np.concatenate([mpos, npos])
    vel = np.concatenate([mvel, nvel])
    absm = np.concatenate([m_abs, ng["abs_mag_r"]])
    dgal = np.concatenate([md, ngd])
    obs = observe(pos, vel, absm, dgal, z, chi, window, sim.mag_limit)
    is_centre = np.concatenate([gi == centre_h[hd[md]], np.zeros(ngd.size, bool)])
    cand = np.flatnonzero(obs["keep"])
    got = spectroscopic_selection(obs["x_proj"][cand], obs["y_proj"][cand], dgal[cand], z, chi,
                                  sim.survey, is_centre[cand], rng)
    keep = np.zeros(dgal.size, bool)
    keep[cand[got]] = True
    is_member = np.concatenate([r3d[gi] < 1.0, np.zeros(ngd.size, bool)])
    phase = np.concatenate([mem["phase"][gi], np.zeros(ngd.size, np.int8)])
    host_id = np.concatenate([halos["halo_id"].to_numpy(np.int64)[hd[md]], nb_id[hi]])
    host_lm = np.concatenate([lm_d[md], nb_lm[hi]])
    is_cen = np.concatenate([m_cen, ng["is_central"]])
    order = np.flatnonzero(keep)
    order = order[np.argsort(dgal[order], kind="stable")]
    galaxies = pd.DataFrame(
        {
            "diagram_id": diagram_id[dgal[order]],
            "x_proj": obs["x_proj"][order],
            "y_proj": obs["y_proj"][order],
            "v_los": obs["v_los"][order],
            "is_member": is_member[order],
            "host_halo_id": host_id[order],
            "host_log_m200c": host_lm[order].astype(np.float32),
            "mag_r": obs["mag_r"][order].astype(np.float32),
            "abs_mag_r": absm[order].astype(np.float32),
            "is_central": is_cen[order],
            "is_centre": is_centre[order],
            "phase": phase[order],
            "los_offset": pos[order, 2].astype(np.float32),
        }
    )
    n_gal = np.bincount(dgal[keep], minlength=nd)
    n_mem = np.bincount(dgal[keep & is_member], minlength=nd)
    n_target = np.bincount(dgal[obs["keep"]], minlength=nd)

    # ---- halos table: neighbours above the floor whose galaxies can reach the window
    nb_vlos = nb_vel[:, 2] + cosmology.hubble(z[nbd]) * nb_pos[:, 2]
    nb_gal = np.bincount(hi[keep[md.size :]], minlength=len(nb))
    in_win = (
        (np.abs(nb_pos[:, 0]) <= window.r_max)
        & (np.abs(nb_pos[:, 1]) <= window.r_max)
        & (np.abs(nb_vlos) <= window.v_max)
    )
    near = (
        (np.abs(nb_pos[:, 0]) <= window.r_max + nb_r200)
        & (np.abs(nb_pos[:, 1]) <= window.r_max + nb_r200)
        & (np.abs(nb_vlos) <= window.v_max + 2 * nb_v200)
    )
    sel = np.flatnonzero((nb_lm >= sim.halo_log_m_min) & near)
    halos_tab = pd.DataFrame(
        {
            "diagram_id": diagram_id[nbd[sel]],
            "halo_id": nb_id[sel],
            "log_m200c": nb_lm[sel],
            "x_proj": nb_pos[sel, 0],
            "y_proj": nb_pos[sel, 1],
            "v_los": nb_vlos[sel],
            "r200c": nb_r200[sel],
            "v200c": nb_v200[sel],
            "r_3d": np.linalg.norm(nb_pos[sel] + off_x[nbd[sel]], axis=1),
            "in_window": in_win[sel],
            "n_gal": nb_gal[sel].astype(np.int64),
        }
    )
    rproj = np.hypot(nb_pos[:, 0], nb_pos[:, 1])
    bigger = (nb_lm > lm_d[nbd]) & (rproj < window.r_max) & (np.abs(nb_vlos) < window.v_max)
    has_ic = np.bincount(nbd[bigger], minlength=nd) > 0
    axes = mem["axes"][hd]
    clusters = pd.DataFrame(
        {
            "diagram_id": diagram_id,
            "halo_id": halos["halo_id"].to_numpy(np.int64)[hd],
            "split": halos["split"].to_numpy()[hd],
            "log_m200c": lm_d,
            "r200c": r200,
            "v200c": v200,
            "redshift": z,
            "n_gal": n_gal.astype(np.int64),
            "n_mem": n_mem.astype(np.int64),
            "c200c": conc_d,
            "distance": chi,
            "sightline": sl.astype(np.int64),
            "los_x": basis[:, 2, 0],
            "los_y": basis[:, 2, 1],
            "los_z": basis[:, 2, 2],
            "axis_q": axes[:, 1] / axes[:, 0],
            "axis_s": axes[:, 2] / axes[:, 0],
            "centre_offset": np.hypot(off_x[:, 0], off_x[:, 1]),
            "centre_v_offset": off_v[:, 2],
            "n_targets": n_target.astype(np.int64),
            "mag_limit_abs": abs_mag_limit(sim.mag_limit, chi),
            "interloper_fraction": np.where(n_gal > 0, 1 - n_mem / np.maximum(n_gal, 1), np.nan),
            "has_interloper_cluster": has_ic,
        }
    )
    return clusters, galaxies, halos_tab


def iter_chunks(
    sim: SimulationConfig, window: WindowConfig, seed: int, progress: bool = False
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
    """Yield (clusters, galaxies, halos) chunk by chunk (for streaming very large catalogues)."""
    from tqdm.auto import tqdm

    halos, seeds = plan(sim, seed)
    with tqdm(
        total=int(halos["n_sightlines"].sum()),
        disable=not progress,
        desc="simulate",
        unit="diagram",
    ) as bar:
        for c, ss in enumerate(seeds):
            part = halos[halos["chunk"].to_numpy() == c]
            out = simulate_chunk(part, sim, window, ss)
            bar.update(len(out[0]))
            yield out


def simulate_catalogue(
    sim: SimulationConfig, window: WindowConfig, seed: int, progress: bool = True
) -> Catalogue:
    """Simulate a mock catalogue of projected phase-space diagrams.

    Parameters
    ----------
    sim : SimulationConfig
        Sizes (n_train/n_test/n_eval, matched to within a few diagrams because splits are by
        halo), mass range, observer ball, flux limit, sight lines, chunking.
    window : WindowConfig
        The observation window (|x|,|y| <= r_max h^-1 Mpc, |v_los| <= v_max km/s).
    seed : int
        Same seed and configuration give identical tables.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Catalogue with clusters (CLUSTER_COLUMNS + truth: ``c200c, distance, sightline, los_*,
    mag_limit_abs, interloper_fraction, has_interloper_cluster``), galaxies (GALAXY_COLUMNS +
    GALAXY_MOCK_COLUMNS + ``abs_mag_r, is_central``) and halos (neighbours above
    ``sim.halo_log_m_min`` near each window, HALO_COLUMNS + ``r200c, v200c, r_3d, in_window, n_gal``).
    """
    if sim.n_total <= 0:
        raise ConfigError("the simulation asks for no diagrams (n_train + n_test + n_eval = 0)")
    parts = list(iter_chunks(sim, window, seed, progress))
    clusters = pd.concat([p[0] for p in parts], ignore_index=True)
    galaxies = pd.concat([p[1] for p in parts], ignore_index=True)
    halos = pd.concat([p[2] for p in parts], ignore_index=True)
    return Catalogue(clusters, galaxies, halos, catalogue_meta(sim, window, seed))


def catalogue_meta(sim: SimulationConfig, window: WindowConfig, seed: int) -> dict:
    """Provenance stored with a simulated catalogue (seed, configuration, cosmology)."""
    return {
        "source": "clustermass.simulate",
        "seed": int(seed),
        "simulation": sim.model_dump(mode="json"),
        "window": window.model_dump(mode="json"),
        "cosmology": cosmology.SIMULATION_COSMOLOGY,
    }


def simulate_to_directory(sim: SimulationConfig, window: WindowConfig, seed: int, out,
                          meta: dict | None = None, progress: bool = True, scheduler: str | None = None):
    """Simulate straight to a catalogue directory, one chunk in memory at a time.

    Same diagrams as :func:`simulate_catalogue` (same seed, same chunks); ``meta`` is added to
    the provenance. With ``scheduler`` (``processes:N`` or a Dask scheduler address, see
    :mod:`clustermass.distributed`) the chunks are Dask tasks; this process alone writes them,
    in chunk order, so the files are byte-identical to the serial run. Returns the directory.
    """
    from ..catalog import write_catalogue_chunks

    if sim.n_total <= 0:
        raise ConfigError("the simulation asks for no diagrams (n_train + n_test + n_eval = 0)")
    meta = {**catalogue_meta(sim, window, seed), **(meta or {})}
    if scheduler is None:
        return write_catalogue_chunks(iter_chunks(sim, window, seed, progress), out, meta)
    from ..distributed import dask_client

    with dask_client(scheduler) as client:
        return write_catalogue_chunks(_iter_chunks_dask(client, sim, window, seed, progress), out, meta)


def _iter_chunks_dask(client, sim: SimulationConfig, window: WindowConfig, seed: int, progress: bool):
    """:func:`iter_chunks` with each chunk a Dask task (bounded in flight, results in order)."""
    from tqdm.auto import tqdm

    from ..distributed import map_ordered

    halos, seeds = plan(sim, seed)
    chunk = halos["chunk"].to_numpy()
    items = ((halos[chunk == c], ss) for c, ss in enumerate(seeds))
    with tqdm(total=int(halos["n_sightlines"].sum()), disable=not progress, desc="simulate",
              unit="diagram") as bar:
        for out in map_ordered(client, _chunk_task, items, sim, window):
            bar.update(len(out[0]))
            yield out


def _chunk_task(item, sim: SimulationConfig, window: WindowConfig):
    part, ss = item
    return simulate_chunk(part, sim, window, ss)


def summarize_catalogue(cat: Catalogue) -> dict:
    """Summary numbers of a catalogue (printed by the CLI).

    Returns
    -------
    dict: ``n_diagrams``, ``n_halos``, ``per_split`` (diagrams per split), ``log_m_min/max``,
    ``median_n_gal``, ``median_n_mem``, ``interloper_fraction`` (non-member share of all
    galaxies inside the windows), ``frac_with_interloper_cluster`` (when known).
    """
    cl = cat.clusters
    n_gal = cl["n_gal"].to_numpy()
    n_mem = cl["n_mem"].to_numpy()
    known = n_mem >= 0
    out = {
        "n_diagrams": int(len(cl)),
        "n_halos": int(cl["halo_id"].nunique()),
        "per_split": {str(k): int(v) for k, v in cl["split"].value_counts().sort_index().items()},
        "log_m_min": float(np.nanmin(cl["log_m200c"])) if len(cl) else float("nan"),
        "log_m_max": float(np.nanmax(cl["log_m200c"])) if len(cl) else float("nan"),
        "median_n_gal": float(np.median(n_gal)) if len(cl) else float("nan"),
        "median_n_mem": float(np.median(n_mem[known])) if known.any() else float("nan"),
        "interloper_fraction": float(1 - n_mem[known].sum() / max(n_gal[known].sum(), 1))
        if known.any()
        else float("nan"),
    }
    if "has_interloper_cluster" in cl:
        out["frac_with_interloper_cluster"] = float(cl["has_interloper_cluster"].mean())
    return out
