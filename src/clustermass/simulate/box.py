"""Real simulation input: periodic boxes (e.g. MDPL2 halos + SAG galaxies) and the authors'
public mock format.

A box goes through the same sight-line, observer-distance, projection, flux-limit and window
code as the mock (:mod:`.halos`, :mod:`.observe`). Units: positions comoving h^-1 Mpc at the
snapshot, velocities km/s (peculiar), masses h^-1 Msun (or log10 in ``log_m200c``), absolute
magnitudes M_r - 5 log10 h.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import cosmology
from ..catalog import Catalogue
from ..config import SimulationConfig, WindowConfig
from ..errors import CatalogueError
from . import halos as hal
from .observe import (
    abs_mag_limit,
    los_depth,
    observe,
    observer_distance,
    spectroscopic_selection,
    to_sightline_frame,
)

_HALO_ID = ("halo_id", "id")
_HOST_ID = ("host_halo_id", "host_id", "host")


def _pick(df: pd.DataFrame, names, what: str) -> str:
    for n in names:
        if n in df.columns:
            return n
    raise CatalogueError(f"{what} table needs one of the columns {', '.join(names)}")


def _require(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CatalogueError(f"{what} table is missing column(s): {', '.join(missing)}")


def diagrams_from_box(
    halos: pd.DataFrame,
    galaxies: pd.DataFrame,
    box_size: float,
    window: WindowConfig,
    sim: SimulationConfig,
    seed: int,
    snapshot_redshift: float = 0.0,
    survey_effects: bool = False,
    members_within_r200c: bool = False,
) -> Catalogue:
    """Phase-space diagrams of the cluster halos of a periodic simulation box.

    Parameters
    ----------
    halos : DataFrame
        ``halo_id`` (or ``id``), ``x, y, z`` [h^-1 Mpc comoving], ``vx, vy, vz`` [km/s],
        ``log_m200c`` or ``M200c`` [h^-1 Msun]; optional ``r200c`` [h^-1 Mpc proper].
    galaxies : DataFrame
        ``x, y, z, vx, vy, vz, abs_mag_r`` and the host halo id (``host_halo_id``/``host_id``).
        The brightest galaxy of a cluster halo is its central (the diagram centre); without
        galaxies the halo centre is used.
    box_size : float
        Periodic box side [h^-1 Mpc comoving].
    window, sim : the observation window and the simulation settings (mass range, flat-mass
        resampling with ``sim.max_sightlines``, observer ball, flux limit, split sizes).
    seed : int
    snapshot_redshift : float
        Redshift of the snapshot (comoving -> proper: divide by 1 + z).
    survey_effects : bool
        Also apply the survey's fibre collisions and incompleteness
        (:func:`~clustermass.simulate.observe.spectroscopic_selection`, ``sim.survey``) as the
        analytic mock does; the diagram centre always keeps its redshift.
    members_within_r200c : bool
        ``is_member``: a galaxy of the cluster's own halo within R200c (3D) of the centre, as in
        the analytic mock; otherwise (default) every galaxy of the cluster's halo.

    The galaxies table also gets ``los_offset`` (line-of-sight offset from the centre [h^-1 Mpc
    proper], truth for the 3D profile checks) and ``is_central`` when the input has it.

    Returns
    -------
    Catalogue (same columns as :func:`clustermass.simulate.simulate_catalogue`; the halos table
    lists other halos above ``sim.halo_log_m_min`` near each window).
    """
    if box_size <= 0:
        raise CatalogueError("box_size must be positive")
    hid_col = _pick(halos, _HALO_ID, "halo")
    _require(halos, ["x", "y", "z", "vx", "vy", "vz"], "halo")
    if "log_m200c" in halos.columns:
        h_lm = halos["log_m200c"].to_numpy(float)
    elif "M200c" in halos.columns:
        h_lm = np.log10(halos["M200c"].to_numpy(float))
    else:
        raise CatalogueError("halo table needs log_m200c or M200c")
    host_col = _pick(galaxies, _HOST_ID, "galaxy")
    _require(galaxies, ["x", "y", "z", "vx", "vy", "vz", "abs_mag_r"], "galaxy")
    from scipy.spatial import cKDTree

    a_fac = 1.0 + snapshot_redshift
    h_id = halos[hid_col].to_numpy(np.int64)
    h_pos = np.mod(halos[["x", "y", "z"]].to_numpy(float), box_size)
    h_vel = halos[["vx", "vy", "vz"]].to_numpy(float)
    g_pos = np.mod(galaxies[["x", "y", "z"]].to_numpy(float), box_size)
    g_vel = galaxies[["vx", "vy", "vz"]].to_numpy(float)
    g_mag = galaxies["abs_mag_r"].to_numpy(float)
    g_host = galaxies[host_col].to_numpy(np.int64)
    g_cen = galaxies["is_central"].to_numpy(bool) if "is_central" in galaxies.columns else None
    lm_of = pd.Series(h_lm, index=h_id)
    g_host_lm = lm_of.reindex(g_host).to_numpy(float)

    # --- flat log-mass resampling of the cluster halos, as in the mock
    root = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root)
    edges = hal.mass_edges(sim)
    cand = np.flatnonzero((h_lm >= sim.log_m_min) & (h_lm < sim.log_m_max))
    bins = np.digitize(h_lm[cand], edges) - 1
    avail = np.bincount(bins, minlength=len(edges) - 1)[: len(edges) - 1]
    chosen, nsl = [], []
    for b, counts in enumerate(hal.allocate_sightlines(avail, sim.n_total, sim.max_sightlines)):
        if counts.size:
            members = cand[bins == b]
            chosen.append(rng.choice(members, size=counts.size, replace=False))
            nsl.append(counts)
    if not chosen:
        raise CatalogueError("no halo of the box lies in the configured mass range")
    rows = np.concatenate(chosen)
    nsl = np.concatenate(nsl)
    split = hal.assign_splits(nsl, sim)
    hd = np.repeat(np.arange(rows.size), nsl)
    nd = hd.size
    basis = hal.sightline_bases(nsl, rng)
    chi = observer_distance(nd, sim.distance_min, sim.distance_max, rng)
    z = cosmology.redshift_from_comoving(chi)
    lm_d = h_lm[rows][hd]
    if "r200c" in halos.columns:
        r200 = halos["r200c"].to_numpy(float)[rows][hd]
    else:
        r200 = cosmology.r200c(lm_d, snapshot_redshift)
    v200 = cosmology.v200c(lm_d, snapshot_redshift, r200=r200)
    depth = los_depth(z, window)

    g_tree = cKDTree(g_pos, boxsize=box_size)
    h_tree = cKDTree(h_pos, boxsize=box_size)
    reach = (np.sqrt(2) * (window.r_max + 2.5) + depth.max()) * a_fac  # comoving search radius
    if reach >= box_size / 2:
        raise CatalogueError(
            f"box of {box_size} h^-1 Mpc is too small for the window (needs > {2 * reach:.0f})"
        )

    def rel(p, c):
        return (p - c + box_size / 2) % box_size - box_size / 2

    gal_parts, halo_parts, n_gal, n_mem, has_ic = (
        [],
        [],
        np.zeros(nd, np.int64),
        np.zeros(nd, np.int64),
        np.zeros(nd, bool),
    )
    first = np.cumsum(nsl) - nsl
    # the centre of every host, found once: its brightest galaxy inside R200c of the halo
    # centre (BCG; galaxies of the halo's outskirts do not count); hosts sorted, brightest first
    row_of = pd.Series(np.arange(h_id.size), index=h_id)
    g_row = row_of.reindex(g_host).to_numpy()
    known = np.isfinite(g_row)
    g_row = np.where(known, g_row, 0).astype(np.int64)
    if "r200c" in halos.columns:
        h_r200 = halos["r200c"].to_numpy(float) * (1 + snapshot_redshift)  # comoving
    else:
        h_r200 = cosmology.r200c(h_lm, snapshot_redshift) * (1 + snapshot_redshift)
    g_off = (g_pos - h_pos[g_row] + box_size / 2) % box_size - box_size / 2
    inner = known & (np.linalg.norm(g_off, axis=1) <= h_r200[g_row])
    order = np.flatnonzero(inner)[np.lexsort((g_mag[inner], g_host[inner]))]
    host_sorted = g_host[order]
    for i, r in enumerate(rows):
        j = np.searchsorted(host_sorted, h_id[r])
        cen_row = None
        if j < host_sorted.size and host_sorted[j] == h_id[r]:
            cen_row = order[j]
            c_pos, c_vel = g_pos[cen_row], g_vel[cen_row]
        else:
            c_pos, c_vel = h_pos[r], h_vel[r]
        gi = np.asarray(g_tree.query_ball_point(c_pos, reach), dtype=np.int64)
        mem = g_host[gi] == h_id[r]  # the same for every sight line
        hi = np.asarray(h_tree.query_ball_point(c_pos, reach), dtype=np.int64)
        hi = hi[(hi != r) & (h_lm[hi] >= sim.halo_log_m_min)]
        dpos = rel(g_pos[gi], c_pos) / a_fac
        if members_within_r200c:
            mem &= np.linalg.norm(dpos, axis=1) <= r200[first[i]]
        dvel = g_vel[gi] - c_vel
        hpos = rel(h_pos[hi], c_pos) / a_fac
        hvel = h_vel[hi] - c_vel
        is_cen = np.zeros(gi.size, bool)
        if cen_row is not None:
            is_cen = gi == cen_row
        for k in range(nsl[i]):
            d = first[i] + k
            bsis = np.broadcast_to(basis[d], (gi.size, 3, 3))
            p = to_sightline_frame(dpos, bsis)
            v = to_sightline_frame(dvel, bsis)
            obs = observe(p, v, g_mag[gi], np.full(gi.size, d), z, chi, window, sim.mag_limit)
            keep = obs["keep"]
            if survey_effects:
                cand = np.flatnonzero(keep)
                got = spectroscopic_selection(obs["x_proj"][cand], obs["y_proj"][cand],
                                              np.full(cand.size, d), z, chi, sim.survey,
                                              is_cen[cand], rng)
                keep = np.zeros_like(keep)
                keep[cand[got]] = True
            n_gal[d] = keep.sum()
            n_mem[d] = (keep & mem).sum()
            gal_parts.append(
                pd.DataFrame(
                    {
                        "diagram_id": np.full(keep.sum(), d, dtype=np.int64),
                        "x_proj": obs["x_proj"][keep],
                        "y_proj": obs["y_proj"][keep],
                        "v_los": obs["v_los"][keep],
                        "is_member": mem[keep],
                        "host_halo_id": g_host[gi][keep],
                        "host_log_m200c": g_host_lm[gi][keep].astype(np.float32),
                        "mag_r": obs["mag_r"][keep].astype(np.float32),
                        "abs_mag_r": g_mag[gi][keep].astype(np.float32),
                        "los_offset": p[keep, 2].astype(np.float32),
                        **({"is_central": g_cen[gi][keep]} if g_cen is not None else {}),
                    }
                )
            )
            hb = np.broadcast_to(basis[d], (hi.size, 3, 3))
            hp = to_sightline_frame(hpos, hb)
            hv = to_sightline_frame(hvel, hb)[:, 2] + cosmology.hubble(z[d]) * hp[:, 2]
            inw = (
                (np.abs(hp[:, 0]) <= window.r_max)
                & (np.abs(hp[:, 1]) <= window.r_max)
                & (np.abs(hv) <= window.v_max)
            )
            near = (
                (np.abs(hp[:, 0]) <= window.r_max + 2.0)
                & (np.abs(hp[:, 1]) <= window.r_max + 2.0)
                & (np.abs(hv) <= window.v_max + 1000)
            )
            has_ic[d] = np.any(
                (h_lm[hi] > lm_d[d])
                & (np.hypot(hp[:, 0], hp[:, 1]) < window.r_max)
                & (np.abs(hv) < window.v_max)
            )
            halo_parts.append(
                pd.DataFrame(
                    {
                        "diagram_id": np.full(near.sum(), d, dtype=np.int64),
                        "halo_id": h_id[hi][near],
                        "log_m200c": h_lm[hi][near],
                        "x_proj": hp[near, 0],
                        "y_proj": hp[near, 1],
                        "v_los": hv[near],
                        "in_window": inw[near],
                    }
                )
            )
    clusters = pd.DataFrame(
        {
            "diagram_id": np.arange(nd, dtype=np.int64),
            "halo_id": h_id[rows][hd],
            "split": split[hd],
            "log_m200c": lm_d,
            "r200c": r200,
            "v200c": v200,
            "redshift": z,
            "n_gal": n_gal,
            "n_mem": n_mem,
            "distance": chi,
            "sightline": (np.arange(nd) - first[hd]).astype(np.int64),
            "los_x": basis[:, 2, 0],
            "los_y": basis[:, 2, 1],
            "los_z": basis[:, 2, 2],
            "mag_limit_abs": abs_mag_limit(sim.mag_limit, chi),
            "interloper_fraction": np.where(n_gal > 0, 1 - n_mem / np.maximum(n_gal, 1), np.nan),
            "has_interloper_cluster": has_ic,
        }
    )
    meta = {
        "source": "clustermass.simulate.box",
        "seed": int(seed),
        "box_size": float(box_size),
        "snapshot_redshift": float(snapshot_redshift),
        "simulation": sim.model_dump(mode="json"),
        "window": window.model_dump(mode="json"),
    }
    return Catalogue(
        clusters,
        pd.concat(gal_parts, ignore_index=True),
        pd.concat(halo_parts, ignore_index=True),
        meta,
    )


def _read_table(path, ncols: int, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"{what} file not found: {path}")
    try:
        df = pd.read_csv(path, sep=r"\s+", comment="#", header=None, dtype=str)
    except Exception as exc:  # pandas parse errors
        raise CatalogueError(f"cannot read {what} file {path}: {exc}") from exc
    if df.shape[1] < ncols:
        raise CatalogueError(
            f"{what} file {path} has {df.shape[1]} column(s), expected at least {ncols}"
        )
    try:
        float(df.iat[0, 1])
    except (ValueError, IndexError):  # first line is a header
        df = df.iloc[1:]
    try:
        return df.iloc[:, :ncols].astype(float).reset_index(drop=True)
    except ValueError as exc:
        raise CatalogueError(f"{what} file {path} has non-numeric values: {exc}") from exc


def read_authors_mock(
    cluster_file, galaxy_file, redshift: float = 0.0, split: str = "none"
) -> Catalogue:
    """Read the authors' public mock format (two whitespace tables).

    Parameters
    ----------
    cluster_file : path
        Columns: cluster id, log10 M200c [h^-1 Msun] (further columns ignored; '#' comments and
        a header line allowed).
    galaxy_file : path
        Columns: cluster id, x_proj, y_proj [h^-1 Mpc], v_los [km/s].
    redshift : float
        Redshift used for R200c and V200c (the format does not store it).
    split : str
        Split label of every diagram.

    Returns
    -------
    Catalogue with ``n_mem = -1`` (membership unknown) and one diagram per cluster line.
    """
    cl = _read_table(cluster_file, 2, "cluster")
    gl = _read_table(galaxy_file, 4, "galaxy")
    cid = cl.iloc[:, 0].to_numpy().astype(np.int64)
    if len(np.unique(cid)) != len(cid):
        raise CatalogueError(f"cluster file {cluster_file} has duplicated cluster ids")
    lm = cl.iloc[:, 1].to_numpy(float)
    row_of = pd.Series(np.arange(len(cid)), index=cid)
    gid = gl.iloc[:, 0].to_numpy().astype(np.int64)
    unknown = ~np.isin(gid, cid)
    if unknown.any():
        raise CatalogueError(
            f"galaxy file refers to unknown cluster id(s): {np.unique(gid[unknown])[:5].tolist()}"
        )
    drow = row_of.reindex(gid).to_numpy(np.int64)
    galaxies = (
        pd.DataFrame(
            {
                "diagram_id": drow,
                "x_proj": gl.iloc[:, 1].to_numpy(float),
                "y_proj": gl.iloc[:, 2].to_numpy(float),
                "v_los": gl.iloc[:, 3].to_numpy(float),
            }
        )
        .sort_values("diagram_id", kind="stable")
        .reset_index(drop=True)
    )
    clusters = pd.DataFrame(
        {
            "diagram_id": np.arange(len(cid), dtype=np.int64),
            "halo_id": cid,
            "split": np.full(len(cid), split, dtype=object),
            "log_m200c": lm,
            "r200c": cosmology.r200c(lm, redshift),
            "v200c": cosmology.v200c(lm, redshift),
            "redshift": np.full(len(cid), float(redshift)),
            "n_gal": np.bincount(drow, minlength=len(cid)).astype(np.int64),
            "n_mem": np.full(len(cid), -1, dtype=np.int64),
        }
    )
    meta = {
        "source": "authors-mock",
        "cluster_file": str(cluster_file),
        "galaxy_file": str(galaxy_file),
    }
    return Catalogue(clusters, galaxies, None, meta)
