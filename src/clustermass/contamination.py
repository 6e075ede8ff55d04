"""Interloper-cluster contamination of phase-space diagrams (paper sec. 4.3, Fig. 6, eq. 6).

An *interloper cluster* of a diagram is a halo more massive than the diagram's cluster that
projects inside the observation window: ``R_proj < r_max`` (1.6 h^-1 Mpc) and
``|dv_los| < v_max`` (2200 km/s). For each one we record the mass ratio
``M_interloper / M_cluster`` and the phase-space distance (eq. 6)::

    d = sqrt((dx / R200c_av)^2 + (dy / R200c_av)^2 + (dv_los / v200c_av)^2)

with ``R200c_av``, ``v200c_av`` the means over the two halos of
:func:`clustermass.cosmology.r200c` / :func:`clustermass.cosmology.v200c` at the diagram's
redshift. The *contamination* of a diagram is the summed mass ratio of its interloper clusters
(0 for a clean diagram); ``max_ratio`` and ``d_min`` describe the worst/closest one.

Two inputs are supported:

* :func:`interlopers_from_halos`: a catalogue's ``halos`` table (offsets already relative to
  each diagram's centre), a vectorised join;
* :func:`interlopers_in_box`: halos with 3D positions/velocities in a (periodic) box, seen
  along given sight lines; neighbours come from a ``scipy.spatial.cKDTree`` queried once per
  cluster halo, so 4.3e4 diagrams take about a second (see ``benchmarks/contamination.py``).
  :func:`interlopers_in_box_naive` is the reference double loop used by tests and the benchmark.

Units: positions h^-1 Mpc (box coordinates comoving, projected offsets proper), velocities km/s,
masses log10(M200c / h^-1 Msun).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import cosmology
from .errors import ClustermassError

PAIR_COLUMNS = [
    "diagram_id",
    "halo_id",
    "log_m200c",
    "cluster_log_m200c",
    "mass_ratio",
    "r_proj",
    "dv_los",
    "distance",
]


def phase_space_distance(dx, dy, dv, log_m1, log_m2, z, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Eq. (6): phase-space distance between two halos.

    Parameters
    ----------
    dx, dy : array_like
        Projected offsets [h^-1 Mpc, proper].
    dv : array_like
        Line-of-sight velocity offset [km/s].
    log_m1, log_m2 : array_like
        log10 M200c [h^-1 Msun] of the two halos.
    z : array_like
        Redshift at which R200c and v200c are evaluated.

    Returns
    -------
    ndarray
        Dimensionless distance.
    """
    log_m1, log_m2 = np.asarray(log_m1, dtype=float), np.asarray(log_m2, dtype=float)
    r1, r2 = cosmology.r200c(log_m1, z, cosmo), cosmology.r200c(log_m2, z, cosmo)
    # v200c = sqrt(G M / R200c) as in cosmology.v200c, reusing R200c (h^-1 cancels)
    g = cosmology.G_KMS2_MPC_MSUN
    r_av = 0.5 * (r1 + r2)
    v_av = 0.5 * (np.sqrt(g * 10.0**log_m1 / r1) + np.sqrt(g * 10.0**log_m2 / r2))
    dx, dy, dv = (np.asarray(a, dtype=float) for a in (dx, dy, dv))
    return np.sqrt((dx / r_av) ** 2 + (dy / r_av) ** 2 + (dv / v_av) ** 2)


def interlopers_from_halos(
    clusters: pd.DataFrame,
    halos: pd.DataFrame,
    r_max: float = 1.6,
    v_max: float = 2200.0,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> pd.DataFrame:
    """Interloper clusters of every diagram from a catalogue's ``halos`` table.

    Parameters
    ----------
    clusters : DataFrame
        Catalogue clusters (``diagram_id, halo_id, log_m200c, redshift``).
    halos : DataFrame
        Catalogue halos (``diagram_id, halo_id, log_m200c, x_proj, y_proj, v_los``), offsets
        relative to the diagram centre [h^-1 Mpc proper, km/s].
    r_max : float
        Projected radius limit [h^-1 Mpc].
    v_max : float
        Line-of-sight velocity limit [km/s].

    Returns
    -------
    DataFrame
        One row per (diagram, interloper cluster) with :data:`PAIR_COLUMNS`.
    """
    need = {"diagram_id", "halo_id", "log_m200c", "x_proj", "y_proj", "v_los"}
    if missing := need - set(halos.columns):
        raise ClustermassError(f"halos table lacks column(s) {sorted(missing)}")
    cl = clusters[["diagram_id", "halo_id", "log_m200c", "redshift"]].rename(
        columns={"halo_id": "_cluster_halo", "log_m200c": "cluster_log_m200c", "redshift": "_z"}
    )
    m = halos[list(need)].merge(cl, on="diagram_id", how="inner")
    r_proj = np.hypot(m["x_proj"].to_numpy(float), m["y_proj"].to_numpy(float))
    dv = m["v_los"].to_numpy(float)
    sel = (
        (m["halo_id"].to_numpy() != m["_cluster_halo"].to_numpy())
        & (m["log_m200c"].to_numpy(float) > m["cluster_log_m200c"].to_numpy(float))
        & (r_proj < r_max)
        & (np.abs(dv) < v_max)
    )
    m = m[sel]
    out = pd.DataFrame(
        {
            "diagram_id": m["diagram_id"].to_numpy(),
            "halo_id": m["halo_id"].to_numpy(),
            "log_m200c": m["log_m200c"].to_numpy(float),
            "cluster_log_m200c": m["cluster_log_m200c"].to_numpy(float),
            "r_proj": r_proj[sel],
            "dv_los": dv[sel],
        }
    )
    out["mass_ratio"] = 10.0 ** (out["log_m200c"] - out["cluster_log_m200c"])
    out["distance"] = phase_space_distance(
        m["x_proj"].to_numpy(float), m["y_proj"].to_numpy(float), dv[sel],
        out["cluster_log_m200c"].to_numpy(), out["log_m200c"].to_numpy(), m["_z"].to_numpy(float), cosmo,
    ) if len(m) else np.zeros(0)
    return out[PAIR_COLUMNS].sort_values(["diagram_id", "halo_id"], kind="stable").reset_index(drop=True)


def _check_box_inputs(pos, vel, log_m, centre_index, los, redshift):
    pos = np.asarray(pos, dtype=float)
    vel = np.asarray(vel, dtype=float)
    log_m = np.asarray(log_m, dtype=float)
    centre_index = np.asarray(centre_index, dtype=np.int64)
    los = np.asarray(los, dtype=float)
    n_d = len(centre_index)
    redshift = np.broadcast_to(np.asarray(redshift, dtype=float), (n_d,)).copy()
    if pos.ndim != 2 or pos.shape[1] != 3 or vel.shape != pos.shape or log_m.shape != (len(pos),):
        raise ClustermassError("pos and vel must be (N, 3) and log_m (N,)")
    if los.shape != (n_d, 3):
        raise ClustermassError(f"los must be ({n_d}, 3) unit vectors, got {los.shape}")
    if n_d and (centre_index.min() < 0 or centre_index.max() >= len(pos)):
        raise ClustermassError("centre_index out of range")
    los = los / np.linalg.norm(los, axis=1, keepdims=True)
    return pos, vel, log_m, centre_index, los, redshift


def _finish_pairs(diag, halo, dr_perp, dv, log_m, centre_log_m, z, cosmo):
    out = pd.DataFrame(
        {
            "diagram_id": np.asarray(diag, dtype=np.int64),
            "halo_id": np.asarray(halo, dtype=np.int64),
            "log_m200c": np.asarray(log_m, dtype=float),
            "cluster_log_m200c": np.asarray(centre_log_m, dtype=float),
            "r_proj": np.asarray(dr_perp, dtype=float),
            "dv_los": np.asarray(dv, dtype=float),
        }
    )
    out["mass_ratio"] = 10.0 ** (out["log_m200c"] - out["cluster_log_m200c"])
    if len(out):
        # d only needs R_proj^2 = dx^2 + dy^2: pass (R_proj, 0)
        out["distance"] = phase_space_distance(
            out["r_proj"].to_numpy(), 0.0, out["dv_los"].to_numpy(),
            out["log_m200c"].to_numpy(), out["cluster_log_m200c"].to_numpy(), np.asarray(z, float), cosmo,
        )
    else:
        out["distance"] = np.zeros(0)
    return out[PAIR_COLUMNS].sort_values(["diagram_id", "halo_id"], kind="stable").reset_index(drop=True)


def interlopers_in_box(
    pos,
    vel,
    log_m,
    centre_index,
    los,
    redshift,
    box_size: float | None = None,
    r_max: float = 1.6,
    v_max: float = 2200.0,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> pd.DataFrame:
    """Interloper clusters of diagrams made by viewing box halos along sight lines (cKDTree).

    Diagram ``i`` is halo ``centre_index[i]`` seen along unit vector ``los[i]`` at redshift
    ``redshift[i]``. For another halo ``j``: ``dr = pos[j] - pos[c]`` (minimum image when
    ``box_size`` is given), ``R_proj = a |dr_perp|`` (proper, ``a = 1/(1+z)``) and
    ``dv_los = (vel[j] - vel[c]) . los + H(z) a (dr . los)`` (peculiar + Hubble flow).

    Parameters
    ----------
    pos : (N, 3) array
        Comoving halo positions [h^-1 Mpc].
    vel : (N, 3) array
        Peculiar velocities [km/s].
    log_m : (N,) array
        log10 M200c [h^-1 Msun].
    centre_index : (D,) int array
        Index of each diagram's cluster halo (several diagrams may share one halo).
    los : (D, 3) array
        Sight-line directions (normalised here).
    redshift : float or (D,) array
        Cosmological redshift of each diagram.
    box_size : float, optional
        Periodic box side [h^-1 Mpc]; None for no periodicity.
    r_max, v_max : float
        Window [h^-1 Mpc proper, km/s].

    Returns
    -------
    DataFrame
        :data:`PAIR_COLUMNS`; ``diagram_id`` is the diagram's index ``i``, ``halo_id`` the
        halo's index ``j``.
    """
    from scipy.spatial import cKDTree

    pos, vel, log_m, centre_index, los, z = _check_box_inputs(pos, vel, log_m, centre_index, los, redshift)
    empty = _finish_pairs([], [], [], [], [], [], [], cosmo)
    if len(centre_index) == 0:
        return empty
    # only halos more massive than the lightest cluster can be interloper clusters
    cand = np.flatnonzero(log_m > log_m[centre_index].min())
    if len(cand) == 0:
        return empty
    cpos = pos[cand]
    if box_size is not None:
        cpos = np.mod(cpos, box_size)
    tree = cKDTree(cpos, boxsize=box_size)
    a = 1.0 / (1.0 + z)
    hub = cosmology.hubble(z, cosmo)
    vabs_max = float(np.linalg.norm(vel[cand], axis=1).max())

    uniq, inv = np.unique(centre_index, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
    # an upper bound on |dr| for each cluster halo: the window in R_proj and in |dr_los|
    vc = np.linalg.norm(vel[uniq], axis=1)
    radii = np.empty(len(uniq))
    for k in range(len(uniq)):
        d = order[bounds[k]:bounds[k + 1]]
        los_max = (v_max + vc[k] + vabs_max) / (hub[d] * a[d])
        radii[k] = np.sqrt((r_max / a[d]) ** 2 + los_max**2).max() * (1 + 1e-9)
    qpos = np.mod(pos[uniq], box_size) if box_size is not None else pos[uniq]
    neigh = tree.query_ball_point(qpos, radii)

    out_d, out_h, out_r, out_v = [], [], [], []
    for k, c in enumerate(uniq):
        nb = cand[np.asarray(neigh[k], dtype=np.int64)]
        nb = nb[(nb != c) & (log_m[nb] > log_m[c])]
        if len(nb) == 0:
            continue
        d = order[bounds[k]:bounds[k + 1]]
        dr = pos[nb] - pos[c]
        if box_size is not None:
            dr -= box_size * np.round(dr / box_size)
        dvp = vel[nb] - vel[c]
        r_los = dr @ los[d].T  # (K, L)
        r_perp = np.sqrt(np.maximum((dr**2).sum(1)[:, None] - r_los**2, 0.0)) * a[d]
        v_los = dvp @ los[d].T + (hub[d] * a[d]) * r_los
        ki, li = np.nonzero((r_perp < r_max) & (np.abs(v_los) < v_max))
        out_d.append(d[li])
        out_h.append(nb[ki])
        out_r.append(r_perp[ki, li])
        out_v.append(v_los[ki, li])
    if not out_d:
        return empty
    diag = np.concatenate(out_d)
    halo = np.concatenate(out_h)
    return _finish_pairs(
        diag, halo, np.concatenate(out_r), np.concatenate(out_v),
        log_m[halo], log_m[centre_index[diag]], z[diag], cosmo,
    )


def interlopers_in_box_naive(
    pos, vel, log_m, centre_index, los, redshift, box_size=None, r_max=1.6, v_max=2200.0,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
) -> pd.DataFrame:
    """Reference double loop (every diagram x every halo) for :func:`interlopers_in_box`.

    Same inputs and output; O(D N) Python iterations, for tests and the benchmark only.
    """
    pos, vel, log_m, centre_index, los, z = _check_box_inputs(pos, vel, log_m, centre_index, los, redshift)
    hub = cosmology.hubble(z, cosmo)
    P, V, M = pos.tolist(), vel.tolist(), log_m.tolist()
    rows = ([], [], [], [])
    for i, c in enumerate(centre_index.tolist()):
        a = 1.0 / (1.0 + z[i])
        n = los[i].tolist()
        ha = float(hub[i]) * a
        for j in range(len(P)):
            if j == c or M[j] <= M[c]:
                continue
            dr = [P[j][k] - P[c][k] for k in range(3)]
            if box_size is not None:
                dr = [x - box_size * round(x / box_size) for x in dr]
            rl = dr[0] * n[0] + dr[1] * n[1] + dr[2] * n[2]
            rp = math.sqrt(max(dr[0] ** 2 + dr[1] ** 2 + dr[2] ** 2 - rl * rl, 0.0)) * a
            vl = sum((V[j][k] - V[c][k]) * n[k] for k in range(3)) + ha * rl
            if rp < r_max and abs(vl) < v_max:
                for lst, val in zip(rows, (i, j, rp, vl), strict=True):
                    lst.append(val)
    d = np.asarray(rows[0], dtype=np.int64)
    h = np.asarray(rows[1], dtype=np.int64)
    return _finish_pairs(d, h, rows[2], rows[3], log_m[h], log_m[centre_index[d]], z[d], cosmo)


def contamination_table(diagram_ids, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-diagram contamination summary.

    Parameters
    ----------
    diagram_ids : array_like
        Diagrams to summarise (clean ones get zeros).
    pairs : DataFrame
        Output of :func:`interlopers_from_halos` / :func:`interlopers_in_box`.

    Returns
    -------
    DataFrame
        ``diagram_id, n_interlopers, contamination`` (summed mass ratio, 0 if clean),
        ``max_ratio`` (0 if clean), ``d_min`` (smallest eq.-6 distance, NaN if clean).
    """
    ids = np.asarray(diagram_ids)
    g = pairs.groupby("diagram_id")
    agg = pd.DataFrame(
        {
            "n_interlopers": g.size(),
            "contamination": g["mass_ratio"].sum(),
            "max_ratio": g["mass_ratio"].max(),
            "d_min": g["distance"].min(),
        }
    )
    out = agg.reindex(ids)
    out["n_interlopers"] = out["n_interlopers"].fillna(0).astype(np.int64)
    out["contamination"] = out["contamination"].fillna(0.0)
    out["max_ratio"] = out["max_ratio"].fillna(0.0)
    out.index.name = "diagram_id"
    return out.reset_index()


def catalogue_contamination(catalogue, rows=None, r_max: float | None = None, v_max: float | None = None) -> pd.DataFrame | None:
    """Contamination of the given cluster rows of a catalogue (None if it has no halos table).

    ``r_max``/``v_max`` default to the paper's 1.6 h^-1 Mpc and 2200 km/s.
    """
    if catalogue.halos is None:
        return None
    rows = np.arange(len(catalogue)) if rows is None else np.asarray(rows)
    cl = catalogue.clusters.iloc[rows]
    pairs = interlopers_from_halos(cl, catalogue.halos, r_max or 1.6, v_max or 2200.0)
    return contamination_table(cl["diagram_id"].to_numpy(), pairs)
