"""Interloper removal shared by the classical estimators: the shifting gapper.

The *shifting gapper* (Fadda et al. 1996, ApJ 473, 670; as used e.g. by Wing & Blanton 2011,
AJ 141, 88): galaxies are sorted by projected radius and grouped into radial bins at least
``bin_width = 0.4 h^-1 Mpc`` wide holding at least ``min_per_bin = 15`` galaxies (a short last bin
joins the previous one); in each bin the velocities are sorted and split wherever two neighbours
differ by more than ``gap = 1000 km/s``; only the group holding the velocity closest to the
cluster's (0, the central galaxy) is kept. This repeats until no galaxy is removed.

Used by :mod:`clustermass.baselines` (velocity dispersion, virial mass) and
:mod:`clustermass.caustic` (candidate members); re-exported as
``clustermass.baselines.shifting_gapper``.
"""

from __future__ import annotations

import numpy as np


def _radial_bins(r_sorted: np.ndarray, bin_width: float, min_per_bin: int) -> list[slice]:
    n = len(r_sorted)
    bins: list[slice] = []
    start, lo = 0, 0.0
    while start < n:
        end = int(np.searchsorted(r_sorted, lo + bin_width, side="left"))
        end = max(end, start + min_per_bin)
        end = min(end, n)
        bins.append(slice(start, end))
        if end < n:
            lo = max(lo + bin_width, float(r_sorted[end - 1]))
        start = end
    if len(bins) > 1 and bins[-1].stop - bins[-1].start < min_per_bin:
        last = bins.pop()
        bins[-1] = slice(bins[-1].start, last.stop)
    return bins


def shifting_gapper(
    r_proj,
    v_los,
    gap: float = 1000.0,
    bin_width: float = 0.4,
    min_per_bin: int = 15,
    v_centre: float = 0.0,
    max_iter: int = 50,
) -> np.ndarray:
    """Shifting-gapper membership (Fadda et al. 1996).

    Parameters
    ----------
    r_proj : array_like
        Projected radii [h^-1 Mpc].
    v_los : array_like
        Line-of-sight velocities relative to the centre [km/s].
    gap : float
        Velocity gap separating groups [km/s].
    bin_width : float
        Minimum radial bin width [h^-1 Mpc].
    min_per_bin : int
        Minimum galaxies per radial bin.
    v_centre : float
        Velocity of the cluster [km/s]; the group nearest to it is kept.
    max_iter : int
        Iteration cap.

    Returns
    -------
    ndarray of bool
        True for the galaxies kept as members.
    """
    r = np.asarray(r_proj, dtype=float)
    v = np.asarray(v_los, dtype=float)
    keep = np.ones(len(r), dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(keep)
        if len(idx) < 2:
            break
        idx = idx[np.argsort(r[idx], kind="stable")]
        new = keep.copy()
        for b in _radial_bins(r[idx], bin_width, min_per_bin):
            members = idx[b]
            vs_order = np.argsort(v[members], kind="stable")
            vs = v[members][vs_order]
            group = np.concatenate([[0], np.cumsum(np.diff(vs) > gap)])
            main = group[np.argmin(np.abs(vs - v_centre))]
            new[members[vs_order[group != main]]] = False
        if (new == keep).all():
            break
        keep = new
    return keep
