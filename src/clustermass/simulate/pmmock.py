"""The PM mock family: particle-mesh boxes -> FoF halos -> halotools galaxies -> diagrams.

``clustermass simulate --engine pm`` (docs/simulator.md, "PM mocks"). Each box (its own seed)
goes through

1. :func:`clustermass.simulate.pm.run_pm` (jaxpm; particles at ``pm.snapshot_redshift``);
2. :func:`clustermass.simulate.halofind.find_halos` (FoF b = 0.2, M200c by abundance matching
   to Tinker08 or from the particles, ``pm.mass``); with ``pm.profile_calibration="nfw"``
   (default) the members move radially onto the NFW profile of their halo's M200c inside R200c
   (:func:`halofind.calibrate_profiles`: the mesh cores halos); with
   ``pm.velocity_calibration="evrard"``
   (default) the members' velocities about their halo's bulk velocity are rescaled so that the
   mean sigma(M200c) follows Evrard et al. (2008) (:func:`halofind.calibrate_velocities`: the
   mesh makes halos too cold, ~0.6 of Evrard at the default resolution);
3. :func:`populate_box`: halotools' Cacciato et al. (2009) CLF (``Cacciato09Cens`` /
   ``Cacciato09Sats`` on a ``UserSuppliedHaloCatalog``, ``populate_mock``; the same model and
   parameters as :mod:`clustermass.simulate.galaxies`, in its halo mass M180m). Centrals sit at
   the halo's density peak with its bulk velocity; satellites on random FoF member particles,
   with their velocities, so shapes, infall streams and substructure are the simulation's.
   Halos below the resolution limit (the smallest FoF halo) are drawn from Tinker08 and placed
   on random particles outside resolved halos (their galaxies trace the matter, bias 1, while
   such halos have a bias of ~0.7-0.9: the faint field is slightly over-clustered);
4. :func:`clustermass.simulate.box.diagrams_from_box` with the survey's fibre collisions and
   incompleteness: the same sight lines, observers, flux limit and window as the analytic mocks.

Units: positions comoving h^-1 Mpc, velocities km/s, masses log10 h^-1 Msun, magnitudes
M_r - 5 log10 h.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import cosmology
from ..catalog import Catalogue
from ..config import PMConfig, SimulationConfig, WindowConfig
from ..errors import ConfigError
from . import galaxies as gal
from . import halofind as hf
from .observe import abs_mag_limit, los_depth
from .pm import NbodyExtraMissingError, run_pm

#: version of the PM mock model (part of the catalogue's cache key)
PM_MODEL_VERSION = 1
#: halo_id of the unresolved (Tinker08-drawn) halos: UNRESOLVED_ID_BASE + i
UNRESOLVED_ID_BASE = 10**8
#: halo ids of box b are offset by b * BOX_ID_STRIDE
BOX_ID_STRIDE = 10**10


def _import_halotools():
    try:
        from halotools.empirical_models import (
            Cacciato09Cens,
            Cacciato09Sats,
            HodModelFactory,
            TrivialPhaseSpace,
        )
        from halotools.sim_manager import UserSuppliedHaloCatalog
    except ImportError as exc:
        raise NbodyExtraMissingError(
            f"the PM engine needs the nbody extra (halotools for the galaxies): "
            f"pip install 'clustermass[nbody]' ({exc})"
        ) from exc
    return Cacciato09Cens, Cacciato09Sats, HodModelFactory, TrivialPhaseSpace, UserSuppliedHaloCatalog


def faintest_magnitude(sim: SimulationConfig, window: WindowConfig) -> float:
    """Faintest absolute magnitude any diagram can see: the flux limit at the nearest observer
    distance minus the cylinder depth, never fainter than ``galaxies.MAG_ABS_FAINTEST``."""
    chi_near = max(sim.distance_min - float(los_depth(0.0, window)), 1.0)
    return float(np.minimum(abs_mag_limit(sim.mag_limit, chi_near), gal.MAG_ABS_FAINTEST))


def populate_box(halos: pd.DataFrame, group: np.ndarray, pos: np.ndarray, vel: np.ndarray,
                 box_size: float, particle_mass: float, redshift: float, mag_faintest: float,
                 seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Galaxies of a box's halos with halotools' Cacciato09 CLF.

    Parameters
    ----------
    halos : FoF halos with ``halo_id, x, y, z, vx, vy, vz, log_m200c`` (from :func:`find_halos`
        plus the mass column); ``halo_id`` = its index in ``group``.
    group : (n,) FoF halo index of every particle (-1: field).
    pos, vel : particles [h^-1 Mpc comoving, km/s].
    mag_faintest : faintest absolute magnitude generated.
    seed : int

    Returns
    -------
    all_halos : resolved + unresolved halos (``resolved`` column), ``log_m200c``
    galaxies : ``x, y, z, vx, vy, vz, abs_mag_r, host_halo_id, is_central``
    """
    cens_cls, sats_cls, factory, trivial, user_cat = _import_halotools()
    rng = np.random.default_rng(seed)
    volume = box_size**3
    lm_res = float(np.nanmin(halos["log_m200c"])) if len(halos) else 16.0
    log_l_min = float(gal.mag_to_log_l(mag_faintest))
    lm_lo = float(gal.min_log_m_hosting(log_l_min))
    lm_un = hf.tinker_draw(lm_lo, lm_res, volume, rng, z=redshift)
    field = np.flatnonzero(group < 0)
    if field.size == 0 and lm_un.size:
        raise ConfigError("no particle outside halos to host the unresolved halos")
    host_p = rng.choice(field, size=lm_un.size, replace=True) if lm_un.size else np.zeros(0, np.int64)
    un = pd.DataFrame({
        "halo_id": UNRESOLVED_ID_BASE + np.arange(lm_un.size, dtype=np.int64),
        "x": pos[host_p, 0], "y": pos[host_p, 1], "z": pos[host_p, 2],
        "vx": vel[host_p, 0], "vy": vel[host_p, 1], "vz": vel[host_p, 2],
        "log_m200c": lm_un,
    })
    res = halos[["halo_id", "x", "y", "z", "vx", "vy", "vz", "log_m200c"]].copy()
    res = res[np.isfinite(res["log_m200c"])]
    allh = pd.concat([res.assign(resolved=True), un.assign(resolved=False)], ignore_index=True)
    m180 = 10 ** gal.log_m_clf(allh["log_m200c"].to_numpy(float))
    hid = allh["halo_id"].to_numpy(np.int64)
    cat = user_cat(
        redshift=float(redshift), Lbox=float(box_size), particle_mass=float(particle_mass),
        halo_id=hid, halo_hostid=hid, halo_upid=np.full(hid.size, -1, np.int64),
        halo_x=np.mod(allh["x"].to_numpy(float), box_size), halo_y=np.mod(allh["y"].to_numpy(float), box_size),
        halo_z=np.mod(allh["z"].to_numpy(float), box_size),
        halo_vx=allh["vx"].to_numpy(float), halo_vy=allh["vy"].to_numpy(float),
        halo_vz=allh["vz"].to_numpy(float), halo_m180b=m180, halo_mvir=m180,
        halo_rvir=cosmology.r200c(allh["log_m200c"].to_numpy(float), redshift) * (1 + redshift),
    )
    # the CLF's mass M180m; halotools also requires halo_mvir (the same) and halo_rvir (R200c,
    # comoving; unused by the trivial phase-space components)
    key = "halo_m180b"
    cens = cens_cls(threshold=log_l_min, prim_haloprop_key=key, redshift=redshift)
    sats = sats_cls(threshold=log_l_min, prim_haloprop_key=key, redshift=redshift)
    # the two components share the central-luminosity parameters on purpose (Cacciato09)
    cens._suppress_repeated_param_warning = sats._suppress_repeated_param_warning = True
    model = factory(centrals_occupation=cens, centrals_profile=trivial(gal_type="centrals"),
                    satellites_occupation=sats, satellites_profile=trivial(gal_type="satellites"))
    model.populate_mock(cat, seed=int(rng.integers(2**31)), Num_ptcl_requirement=0,
                        halo_mass_column_key=key)
    gt = model.mock.galaxy_table
    gx = np.stack([np.asarray(gt[c], float) for c in ("x", "y", "z")], axis=1)
    gv = np.stack([np.asarray(gt[c], float) for c in ("vx", "vy", "vz")], axis=1)
    g_host = np.asarray(gt["halo_id"], np.int64)
    is_cen = np.asarray(gt["gal_type"]) == "centrals"
    # satellites of resolved halos on random member particles (with their velocities)
    order = np.argsort(group, kind="stable")
    gs = group[order]
    sat_res = ~is_cen & (g_host < UNRESOLVED_ID_BASE)
    g = g_host[sat_res]
    lo = np.searchsorted(gs, g)
    hi = np.searchsorted(gs, g, side="right")
    pick = order[lo + np.floor(rng.random(g.size) * (hi - lo)).astype(np.int64)]
    gx[sat_res], gv[sat_res] = pos[pick], vel[pick]
    # satellites of unresolved halos on one of the 8 particles nearest their host particle
    sat_un = ~is_cen & ~sat_res
    if sat_un.any():
        from scipy.spatial import cKDTree

        tree = cKDTree(pos, boxsize=box_size)
        _, nb = tree.query(np.mod(gx[sat_un], box_size), k=8)
        pick = nb[np.arange(nb.shape[0]), rng.integers(1, 8, size=nb.shape[0])]
        gx[sat_un], gv[sat_un] = pos[pick], vel[pick]
    galaxies = pd.DataFrame({
        "x": np.mod(gx[:, 0], box_size), "y": np.mod(gx[:, 1], box_size), "z": np.mod(gx[:, 2], box_size),
        "vx": gv[:, 0], "vy": gv[:, 1], "vz": gv[:, 2],
        "abs_mag_r": gal.log_l_to_mag(np.log10(np.asarray(gt["luminosity"], float))),
        "host_halo_id": g_host,
        "is_central": is_cen,
    })
    return allh, galaxies


def simulate_pm_box(pmc: PMConfig, sim: SimulationConfig, window: WindowConfig, seed: int,
                    progress: bool = True) -> tuple[Catalogue, dict]:
    """One PM box to a catalogue of diagrams; returns it and the box's diagnostics (halos,
    wall times [s], the FoF/SO/abundance-matched masses)."""
    t = {}
    t0 = time.perf_counter()
    box = run_pm(pmc.box_size, pmc.n_particles, pmc.n_mesh, pmc.n_steps, seed=seed,
                 a_start=pmc.a_start, z_final=pmc.snapshot_redshift, progress=progress)
    t["pm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    halos, group, _ = hf.find_halos(box.pos, box.vel, box.particle_mass, pmc.box_size,
                                     pmc.n_particles, pmc.snapshot_redshift, pmc.min_members,
                                     progress=progress)
    halos["log_m200c_am"] = hf.abundance_match(halos["log_m_fof"].to_numpy(), pmc.box_size**3,
                                               pmc.snapshot_redshift)
    halos["log_m200c"] = halos["log_m200c_am"] if pmc.mass == "abundance" else halos["log_m200c_so"]
    pos, vel, vcal = box.pos, box.vel, None
    if pmc.profile_calibration == "nfw":
        pos = hf.calibrate_profiles(halos, group, box.pos, box.particle_mass, pmc.box_size,
                                    pmc.snapshot_redshift)
    if pmc.velocity_calibration == "evrard":
        vel, vcal = hf.calibrate_velocities(halos, group, pos, box.vel, pmc.box_size,
                                            pmc.snapshot_redshift)
    t["halofind_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    allh, galaxies = populate_box(halos, group, pos, vel, pmc.box_size, box.particle_mass,
                                  pmc.snapshot_redshift, faintest_magnitude(sim, window), seed)
    t["populate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cat = diagrams(allh, galaxies, pmc, sim, window, seed)
    t["diagrams_s"] = time.perf_counter() - t0
    info = {"timings": t, "n_halos": int(len(halos)), "n_galaxies": int(len(galaxies)),
            "n_halos_13.7": int((halos["log_m200c"] >= 13.7).sum()),
            "particle_mass": box.particle_mass, "velocity_calibration": vcal}
    return cat, {**info, "halos": halos, "galaxies": galaxies, "all_halos": allh, "box": box,
                 "pos": pos, "vel": vel, "group": group}


def diagrams(allh: pd.DataFrame, galaxies: pd.DataFrame, pmc: PMConfig, sim: SimulationConfig,
             window: WindowConfig, seed: int) -> Catalogue:
    """Diagrams of a populated box through :func:`~clustermass.simulate.box.diagrams_from_box`."""
    from .box import diagrams_from_box

    return diagrams_from_box(allh, galaxies, pmc.box_size, window, sim, seed,
                             snapshot_redshift=pmc.snapshot_redshift, survey_effects=True,
                             members_within_r200c=True)


def merge_catalogues(cats: list[Catalogue], meta: dict) -> Catalogue:
    """Catalogues of independent boxes as one: diagram ids renumbered, halo ids offset by
    ``box * BOX_ID_STRIDE`` so halos of different boxes never share an id."""
    cl, ga, ha = [], [], []
    off = 0
    for b, c in enumerate(cats):
        shift = b * BOX_ID_STRIDE
        cl.append(c.clusters.assign(diagram_id=c.clusters["diagram_id"] + off,
                                    halo_id=c.clusters["halo_id"] + shift))
        ga.append(c.galaxies.assign(diagram_id=c.galaxies["diagram_id"] + off,
                                    host_halo_id=c.galaxies["host_halo_id"] + shift))
        if c.halos is not None:
            ha.append(c.halos.assign(diagram_id=c.halos["diagram_id"] + off,
                                     halo_id=c.halos["halo_id"] + shift))
        off += len(c.clusters)
    return Catalogue(pd.concat(cl, ignore_index=True), pd.concat(ga, ignore_index=True),
                     pd.concat(ha, ignore_index=True) if ha else None, meta)


def simulate_pm_catalogue(pmc: PMConfig, sim: SimulationConfig, window: WindowConfig, seed: int,
                          progress: bool = True) -> Catalogue:
    """``pmc.boxes`` independent boxes (seeds ``seed, seed + 1, ...``), each asked for 1/boxes
    of the split sizes, merged into one catalogue (provenance and wall times in ``meta``)."""
    if sim.n_total <= 0:
        raise ConfigError("the simulation asks for no diagrams (n_train + n_test + n_eval = 0)")
    nb = pmc.boxes
    per_box = sim.model_copy(update={"n_train": -(-sim.n_train // nb), "n_test": -(-sim.n_test // nb),
                                     "n_eval": -(-sim.n_eval // nb)})
    cats, boxes = [], []
    for b in range(nb):
        cat, info = simulate_pm_box(pmc, per_box, window, seed + b, progress)
        cats.append(cat)
        boxes.append({k: v for k, v in info.items()
                      if k not in ("halos", "galaxies", "all_halos", "box", "pos", "vel", "group")})
        if progress:
            tm = info["timings"]
            print(f"[clustermass] PM box {b + 1}/{nb}: {info['n_halos_13.7']} halos above 10^13.7, "
                  f"{len(cat)} diagrams; PM {tm['pm_s']:.0f} s, halos {tm['halofind_s']:.0f} s, "
                  f"galaxies {tm['populate_s']:.0f} s, diagrams {tm['diagrams_s']:.0f} s", flush=True)
    meta = {
        "source": "clustermass.simulate.pmmock",
        "engine": "pm",
        "seed": int(seed),
        "pm": pmc.model_dump(mode="json"),
        "simulation": sim.model_dump(mode="json"),
        "window": window.model_dump(mode="json"),
        "boxes": boxes,
    }
    return merge_catalogues(cats, meta)
