"""The set-based neural posterior (model kind ``set``, issue 15): p(log M200c | galaxies, z).

Instead of a KDE cube, the network reads the galaxies of a diagram themselves: every galaxy
inside the model's window becomes a point ``(x_proj / r_max, y_proj / r_max, v_los / v_max)``
(dimensionless; the window half-widths in h^-1 Mpc and km/s), a per-galaxy MLP ``phi`` maps it to
``hidden`` features, a masked mean and a masked max over the galaxies pool them (Deep Sets,
Zaheer et al. 2017: the output does not depend on the order of the galaxies), ``log10 n_gal``
(the galaxies in the window, all of them, also when the set is capped) is appended, and an MLP
``rho`` gives an ``embed``-dimensional summary. The summary and the standardised cluster
redshift condition a neural spline flow (``zuko.flows.NSF``, one feature: the standardised
log10 M200c), trained by maximum likelihood, ``-log q(log M | set, z)``: the flow *is* the
posterior under the training prior (flat in log M over the training range); no SBI calibration
step follows.

Variable numbers of galaxies: sets are zero-padded to the largest set of a batch and a boolean
mask keeps the padding out of the pooling (padding never changes the output). A diagram with
more than ``max_gal`` galaxies in the window (256 by default: the richest diagrams) is
represented by a random subset of ``max_gal`` of them, drawn with a seed fixed by its
``diagram_id`` (repeatable); ``log10 n_gal`` still counts them all.

Augmentation: every training batch is rotated by a random angle about the line of sight and
reflected with probability 1/2 (``augment: rotate``; ``d4`` draws only the 8 symmetries of the
square window; ``none``). The mass does not depend on the orientation of the sky, so this costs
nothing on sets (a KDE cube would have to be rebuilt). Validation sets are not augmented;
training (:mod:`clustermass.settraining`) halves the learning rate when the validation negative
log-likelihood stalls and stops early on it, with the best weights kept. With ``symmetrise``
(default) a cluster's posterior is the mixture of the flow's posteriors for the 8 symmetries of
the square window (exact symmetries of the data: no galaxy leaves the window), which makes it
exactly invariant under them and, on the quick preset, slightly less over-confident.

Posterior summaries: for each cluster the flow density is evaluated on ``grid_points`` (301)
values of log M spanning the training mass range (the prior support), normalised there (no mass
past the prior edges, as the KDE calibration's boundary cut), and the exact CDF of that grid
density (trapezoidal, i.e. piecewise-linear density) gives the quantiles, PIT and TARP.
``prior: mass-function`` multiplies the grid density by the Tinker et al. (2008) mass function at
the cluster's redshift over the flat training prior
(:class:`clustermass.calibration.MassFunctionPrior`). The point estimate ``d_pred`` of a set
model is its (flat-prior) posterior median.

:class:`SetPosterior` offers the interface of :class:`clustermass.calibration.Calibration` used by
:func:`clustermass.inference.posterior_table` and :func:`clustermass.evaluation.evaluate`. Those
call it with per-cluster features ``(d_pred, z, log_n_gal)`` rather than with the galaxies, so
:meth:`SetBundle.predict` keeps each predicted cluster's grid density in a bounded store keyed by
``(d_pred, log_n_gal)`` (float64, unique per cluster in practice), from which the posterior's
``summarize``, ``cdf`` and ``pdf`` read. Predict first, then summarise, in the same process
(``posterior_table`` does both).

Bundles: ``weights.safetensors`` + ``model.json`` (format of :mod:`clustermass._bundlefmt`, kind
``set``), loaded by :func:`clustermass.bundle.load_model`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zuko
from torch import nn

from ._bundlefmt import (
    META_FILE,
    WEIGHTS_FILE,
    integrity_hash,
    load_weights,
    save_weights,
)
from ._io import write_json_atomic
from .calibration import MassFunctionPrior, cluster_conditions
from .catalog import Catalogue
from .config import WindowConfig
from .errors import BundleError, ClustermassError, ConfigError
from .posterior import SUMMARY_COLUMNS

KIND = "set"
#: architecture and posterior-grid defaults (``arch`` overrides; stored in ``model.json``)
DEFAULT_ARCH: dict = {
    "hidden": 64,  # width of phi and rho
    "phi_layers": 2,  # linear+ReLU layers of the per-galaxy network phi
    "embed": 32,  # size of the set summary that conditions the flow (with z)
    "pool": "mean+max",  # or "mean"
    "flow_transforms": 2,
    "flow_bins": 8,
    "flow_hidden": [64, 64],
    "max_gal": 256,  # galaxies per set at most (a seeded random subset beyond)
    "grid_points": 301,  # log M values of the posterior grid over the training mass range
    "augment": "rotate",  # "rotate", "d4" or "none"
    "weight_decay": 0.0,  # AdamW weight decay
    "lr_schedule": "plateau",
    "symmetrise": True,  # average the posterior over the 8 symmetries of the square window (D4)  # "plateau": halve the lr when the validation NLL does not improve; "none"
}
#: quantile levels of the summary columns (as :mod:`clustermass.posterior`)
_LEVELS = {"log_m_lo2": 0.02275, "log_m_lo1": 0.1587, "log_m_median": 0.5, "log_m_hi1": 0.8413,
           "log_m_hi2": 0.97725}
#: clusters whose grid densities a bundle keeps at most (float32: ~1.2 kB each at 301 points)
STORE_CAPACITY = 100_000


def full_arch(arch: dict | None = None) -> dict:
    """:data:`DEFAULT_ARCH` with ``arch`` applied, validated, JSON-ready."""
    unknown = set(arch or {}) - set(DEFAULT_ARCH)
    if unknown:
        raise ConfigError(f"unknown set-model option(s) {sorted(unknown)}; allowed: {sorted(DEFAULT_ARCH)}")
    out = json.loads(json.dumps({**DEFAULT_ARCH, **(arch or {})}))
    if out["pool"] not in ("mean", "mean+max"):
        raise ConfigError(f"set-model pool must be 'mean' or 'mean+max', not {out['pool']!r}")
    if out["lr_schedule"] not in ("plateau", "none"):
        raise ConfigError(f"set-model lr_schedule must be 'plateau' or 'none', not {out['lr_schedule']!r}")
    if out["augment"] not in ("rotate", "d4", "none"):
        raise ConfigError(f"set-model augment must be 'rotate', 'd4' or 'none', not {out['augment']!r}")
    if int(out["max_gal"]) < 1 or int(out["grid_points"]) < 11:
        raise ConfigError("set-model max_gal must be >= 1 and grid_points >= 11")
    return out


# ---------------------------------------------------------------------- inputs
def set_inputs(catalogue: Catalogue, rows, window: WindowConfig, max_gal: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded galaxy sets of catalogue ``rows``.

    Returns
    -------
    x : float32 (n, max_gal, 3)
        ``(x_proj / r_max, y_proj / r_max, v_los / v_max)`` of the galaxies inside the window
        (|x|, |y| <= r_max [h^-1 Mpc], |v| <= v_max [km/s]), packed first, zero-padded; beyond
        ``max_gal`` a random subset seeded by the diagram id.
    count : int64 (n,)
        Galaxies of each set (<= max_gal).
    """
    rows = np.asarray(rows)
    x = np.zeros((len(rows), int(max_gal), 3), dtype=np.float32)
    count = np.zeros(len(rows), dtype=np.int64)
    cols = [catalogue.galaxies[c].to_numpy(dtype=np.float64) for c in ("x_proj", "y_proj", "v_los")]
    scale = np.array([window.r_max, window.r_max, window.v_max])
    ids = catalogue.clusters["diagram_id"].to_numpy()[rows]
    for i, (s, e) in enumerate(catalogue.offsets[rows]):
        p = np.column_stack([c[s:e] for c in cols]) / scale
        p = p[(np.abs(p) <= 1.0).all(axis=1)]
        if len(p) > max_gal:
            keep = np.random.default_rng([int(ids[i]) & 0x7FFFFFFF, 15]).choice(len(p), int(max_gal), replace=False)
            p = p[np.sort(keep)]
        x[i, : len(p)] = p
        count[i] = len(p)
    return x, count


def _conditions(catalogue: Catalogue, rows, window: WindowConfig) -> tuple[np.ndarray, np.ndarray]:
    """(z, log10 n_gal in the window) of ``rows``, as the KDE calibration conditions on them."""
    c = cluster_conditions(catalogue, rows, window)
    return c["z"].to_numpy(dtype=np.float64), c["log_n_gal"].to_numpy(dtype=np.float64)


def _mask(count: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=count.device)[None, :] < count[:, None]


def augment_sets(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each set's sky coordinates (columns 0, 1) about the line of sight by a random angle
    (``rotate``: uniform; ``d4``: multiples of 90 degrees) and reflect them with probability 1/2.
    Padding (zeros) stays zero; ``v_los`` is unchanged."""
    if mode == "none":
        return x
    b = x.shape[0]
    u = torch.rand(b, generator=generator, device="cpu")
    ang = 2 * math.pi * u if mode == "rotate" else (torch.floor(4 * u) * (math.pi / 2))
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    c, s = torch.cos(ang).to(x), torch.sin(ang).to(x)
    xs, ys = x[..., 0], x[..., 1] * flip.to(x)[:, None]
    out = x.clone()
    out[..., 0] = c[:, None] * xs - s[:, None] * ys
    out[..., 1] = s[:, None] * xs + c[:, None] * ys
    return out


def square_symmetries(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of sets ``x`` (B, N, 3) under the symmetries of the square sky window
    (rotations by multiples of 90 degrees, with and without a reflection); the identity first."""
    out = []
    for flip in (1.0, -1.0):
        a, b = x[..., 0], x[..., 1] * flip
        for _ in range(4):
            out.append(torch.stack([a, b, x[..., 2]], dim=-1))
            a, b = -b, a
    return out


# ---------------------------------------------------------------------- network
class DeepSetNPE(nn.Module):
    """Deep Sets summary of a galaxy set + a zuko neural spline flow over standardised log M.

    Buffers (saved with the weights): ``theta_mean/std`` (log10 M200c), ``z_mean/std``,
    ``logn_mean/std`` (log10 n_gal) of the training split.
    """

    def __init__(self, hidden: int = 64, embed: int = 32, pool: str = "mean+max", flow_transforms: int = 2,
                 flow_bins: int = 8, flow_hidden=(64, 64), phi_layers: int = 2, **_) -> None:
        super().__init__()
        h = int(hidden)
        self.pool = pool
        layers: list[nn.Module] = []
        for i in range(int(phi_layers)):
            layers += [nn.Linear(3 if i == 0 else h, h), nn.ReLU()]
        self.phi = nn.Sequential(*layers)
        n_pool = h * (2 if pool == "mean+max" else 1)
        self.rho = nn.Sequential(nn.Linear(n_pool + 1, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                 nn.Linear(h, int(embed)))
        self.flow = zuko.flows.NSF(features=1, context=int(embed) + 1, transforms=int(flow_transforms),
                                   bins=int(flow_bins), hidden_features=tuple(int(v) for v in flow_hidden))
        for name in ("theta", "z", "logn"):
            self.register_buffer(f"{name}_mean", torch.zeros(()))
            self.register_buffer(f"{name}_std", torch.ones(()))

    def set_standardisation(self, **stats: float) -> None:
        """Set ``<name>_mean`` / ``<name>_std`` buffers (e.g. ``theta_mean=14.4``)."""
        for k, v in stats.items():
            getattr(self, k).fill_(float(v))

    def context(self, x: torch.Tensor, count: torch.Tensor, z: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        """Flow context (B, embed + 1) of padded sets ``x`` (B, N, 3) with ``count`` (B,) galaxies."""
        mask = _mask(count, x.shape[1]).unsqueeze(-1).to(x.dtype)
        h = self.phi(x) * mask  # ReLU outputs >= 0: zeros at the padding never win the max
        pooled = [h.sum(1) / count.clamp(min=1).unsqueeze(-1).to(x.dtype)]
        if self.pool == "mean+max":
            pooled.append(h.amax(1) if x.shape[1] else torch.zeros_like(pooled[0]))
        ln = ((log_n - self.logn_mean) / self.logn_std).unsqueeze(-1).to(x.dtype)
        e = self.rho(torch.cat(pooled + [ln], dim=-1))
        return torch.cat([e, ((z - self.z_mean) / self.z_std).unsqueeze(-1).to(x.dtype)], dim=-1)

    def log_prob(self, log_m: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """log q(log M | context) [per dex] for log_m (B,) and ctx (B, C)."""
        theta = ((log_m - self.theta_mean) / self.theta_std).unsqueeze(-1).to(ctx.dtype)
        return self.flow(ctx).log_prob(theta) - torch.log(self.theta_std)

    def log_density_grid(self, ctx: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """log q on a log M ``grid`` (G,) for every context row: (B, G) [per dex]."""
        b, g = ctx.shape[0], grid.shape[0]
        c = ctx.unsqueeze(1).expand(b, g, ctx.shape[-1])
        theta = ((grid - self.theta_mean) / self.theta_std).to(ctx.dtype).view(1, g, 1).expand(b, g, 1)
        return self.flow(c).log_prob(theta) - torch.log(self.theta_std)


# ---------------------------------------------------------------------- posterior on a grid
def _normalise(pdf: np.ndarray, dg: float) -> tuple[np.ndarray, np.ndarray]:
    """(pdf, cdf) on a uniform grid of spacing ``dg``: trapezoidal CDF, both normalised to 1."""
    inc = 0.5 * (pdf[:, 1:] + pdf[:, :-1]) * dg
    cdf = np.concatenate([np.zeros((pdf.shape[0], 1)), np.cumsum(inc, axis=1)], axis=1)
    tot = cdf[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pdf / tot, cdf / tot


def _interp_rows(x: np.ndarray, grid0: float, dg: float, table: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation of ``table`` (n, G) at ``x`` (n, k), clamped to the ends."""
    g = table.shape[1]
    u = np.clip((x - grid0) / dg, 0.0, g - 1.0)
    i = np.minimum(np.floor(u).astype(np.int64), g - 2)
    f = u - i
    r = np.arange(table.shape[0])[:, None]
    return table[r, i] * (1 - f) + table[r, i + 1] * f


def _quantiles(cdf: np.ndarray, grid: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` of each row's piecewise-linear CDF on ``grid``."""
    g = grid.size
    idx = np.clip((cdf < q).sum(axis=1), 1, g - 1)
    r = np.arange(cdf.shape[0])
    lo, hi = cdf[r, idx - 1], cdf[r, idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(hi > lo, (q - lo) / (hi - lo), 0.5)
    return grid[idx - 1] + np.clip(f, 0, 1) * (grid[1] - grid[0])


class _GridStore:
    """Flat-prior grid densities of predicted clusters, keyed by (d_pred, log_n_gal); FIFO, bounded."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = int(capacity)
        self._rows: dict[tuple[float, float], tuple[np.ndarray, float, bool]] = {}

    def put(self, d, log_n, pdf, z, z_known) -> None:
        for k in zip(np.asarray(d, float), np.asarray(log_n, float), pdf, z, z_known, strict=True):
            if np.isfinite(k[0]):
                self._rows.pop((k[0], k[1]), None)
                self._rows[(float(k[0]), float(k[1]))] = (k[2].astype(np.float32), float(k[3]), bool(k[4]))
        while len(self._rows) > self.capacity:
            self._rows.pop(next(iter(self._rows)))

    def get(self, d, log_n, n_grid: int):
        """(found (n,), pdf (n, G) float64 (NaN rows where not found), z (n,), z_known (n,))."""
        d, log_n = np.asarray(d, float), np.asarray(log_n, float)
        pdf = np.full((d.size, n_grid), np.nan)
        z = np.full(d.size, np.nan)
        zk = np.zeros(d.size, bool)
        found = np.zeros(d.size, bool)
        for i, key in enumerate(zip(d.tolist(), log_n.tolist(), strict=True)):
            hit = self._rows.get(key)
            if hit is not None:
                pdf[i], z[i], zk[i], found[i] = hit[0], hit[1], hit[2], True
        return found, pdf, z, zk

    def __len__(self) -> int:
        return len(self._rows)


class SetPosterior:
    """The set model's posteriors, in the interface of :class:`clustermass.calibration.Calibration`.

    Features of a cluster are ``(d_pred, z, log_n_gal)`` (:meth:`features`, :meth:`features_of`);
    its grid density comes from the bundle's store (filled by :meth:`SetBundle.predict`).

    Attributes
    ----------
    prior : "flat" (the training prior) or "mass-function" (Tinker08 at the cluster's redshift).
    prior_range : (log_m_min, log_m_max) of the grid [log10 h^-1 Msun].
    flow_conditioning : ("galaxies", "z"): what the flow conditions on (per row: ``conditioned_on``).
    conditioning, bandwidth, min_neighbours, mean_degree, heteroscedastic : the default
        KDE-calibration settings (``conditioning`` "auto"), used only by estimators calibrated
        beside this model (``evaluate``'s baselines when the set model is the primary one); the
        set posterior itself has no KDE.
    """

    flow_conditioning = ("galaxies", "z")

    def __init__(self, store: _GridStore, grid: np.ndarray, log_n_range: tuple[float, float], prior: str = "flat",
                 prior_options: dict | None = None, meta: dict | None = None) -> None:
        from .config import CalibrationConfig

        if prior not in ("flat", "mass-function"):
            raise ClustermassError(f"prior must be 'flat' or 'mass-function', not {prior!r}")
        self.store, self.grid, self.prior = store, np.asarray(grid, float), prior
        self.prior_range = (float(self.grid[0]), float(self.grid[-1]))
        self.log_n_range = (float(log_n_range[0]), float(log_n_range[1]))
        self.prior_options = dict(prior_options or {})
        self.meta = dict(meta or {})
        dflt = CalibrationConfig()
        self.conditioning, self.bandwidth, self.min_neighbours = dflt.conditioning, dflt.bandwidth, dflt.min_neighbours
        self.mean_degree, self.heteroscedastic = dflt.mean_degree, dflt.heteroscedastic
        self._view = _SetView(self)
        self._mass_prior = MassFunctionPrior(self.prior_range, **self.prior_options) if prior == "mass-function" else None

    def __repr__(self) -> str:
        return f"SetPosterior(prior={self.prior!r}, grid={self.grid.size} points over {self.prior_range})"

    def with_prior(self, prior: str, **options) -> SetPosterior:
        """The same posteriors under another prior (``flat`` or ``mass-function``)."""
        return SetPosterior(self.store, self.grid, self.log_n_range, prior, options, self.meta)

    @property
    def posterior(self):
        """A view with the :class:`~clustermass.posterior.JointKDEPosterior` calling convention
        (``summarize(x)``, ``pdf(x, grid)``, ``cdf(x, m)`` on feature rows; ``n_cond_`` = 3)."""
        return self._view

    marginal = posterior  # no reduced conditioning: the flow always sees the galaxies

    # -------------------------------------------------------------- features
    def features(self, d_pred, conditions: pd.DataFrame | None = None) -> np.ndarray:
        """(n, 3) rows ``(d_pred, z, log_n_gal)`` (NaN where unknown)."""
        d = np.asarray(d_pred, dtype=float).ravel()
        cols = [d]
        for c in ("z", "log_n_gal"):
            cols.append(np.asarray(conditions[c], float).ravel() if conditions is not None and c in conditions
                        else np.full(d.size, np.nan))
        return np.column_stack(cols)

    def features_of(self, table: pd.DataFrame) -> np.ndarray:
        """Features of a posterior table (``d_pred``, ``cond_z``, ``cond_log_n_gal``)."""
        cond = pd.DataFrame({"z": table["cond_z"] if "cond_z" in table else np.nan,
                             "log_n_gal": table["cond_log_n_gal"] if "cond_log_n_gal" in table else np.nan},
                            index=table.index)
        return self.features(table["d_pred"].to_numpy(float), cond)

    def _densities(self, features) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(valid (n,), pdf (n, G), cdf (n, G), z_known (n,)) under this prior."""
        x = np.asarray(features, float).reshape(-1, 3)
        found, pdf, z_store, zk = self.store.get(x[:, 0], x[:, 2], self.grid.size)
        missing = np.isfinite(x[:, 0]) & ~found
        if missing.any():
            raise ClustermassError(
                f"no set-model posterior for {int(missing.sum())} cluster(s): the set posterior needs the "
                "galaxies; predict them with this bundle first, in this process (posterior_table does)")
        if self.prior == "mass-function" and found.any():
            z = np.where(np.isfinite(x[:, 1]), x[:, 1], z_store)[found]
            lp = self._mass_prior(np.broadcast_to(self.grid, (int(found.sum()), self.grid.size)), z)[0]
            pdf[found] *= np.exp(lp - lp.max(1, keepdims=True))
        p, c = _normalise(pdf, self.grid[1] - self.grid[0])
        return found, p, c, zk

    # -------------------------------------------------------------- Calibration interface
    def summarize(self, d_pred, conditions: pd.DataFrame | None = None) -> pd.DataFrame:
        """Posterior summaries (``SUMMARY_COLUMNS`` + ``out_of_range`` + ``conditioned_on``).

        ``d_pred`` is the flat-prior posterior median (the model's point prediction); under the
        mass-function prior the other columns change, ``d_pred`` does not. ``out_of_range``: no
        posterior, or log10 n_gal outside the training sets' range."""
        return self._summaries(self.features(d_pred, conditions))

    def _summaries(self, x) -> pd.DataFrame:
        ok, pdf, cdf, zk = self._densities(x)
        n = x.shape[0]
        out = pd.DataFrame(np.nan, index=range(n), columns=list(SUMMARY_COLUMNS))
        out["d_pred"] = x[:, 0]
        if ok.any():
            g = self.grid
            out.loc[ok, "log_m_map"] = g[np.argmax(pdf[ok], axis=1)]
            w = np.full(g.size, g[1] - g[0])
            w[[0, -1]] *= 0.5
            out.loc[ok, "log_m_mean"] = (pdf[ok] * g * w).sum(axis=1)
            for col, q in _LEVELS.items():
                out.loc[ok, col] = _quantiles(cdf[ok], g, q)
        log_n = x[:, 2]
        inside = (log_n >= self.log_n_range[0] - 1e-9) & (log_n <= self.log_n_range[1] + 1e-9)
        out["out_of_range"] = ~ok | ~inside
        out["conditioned_on"] = np.where(ok, np.where(zk, "galaxies+z", "galaxies"), "")
        return out

    def cdf(self, features, log_m) -> np.ndarray:
        """Posterior CDF at ``log_m`` (n,) or (n, j) for feature rows (n, 3) (NaN without a posterior)."""
        ok, _, cdf, _ = self._densities(features)
        m = np.asarray(log_m, float)
        two = m.ndim == 2
        m2 = m.reshape(len(ok), -1)
        out = np.full(m2.shape, np.nan)
        if ok.any():
            out[ok] = _interp_rows(m2[ok], self.grid[0], self.grid[1] - self.grid[0], cdf[ok])
        return out if two else out.reshape(m.shape)

    def pdf(self, features, log_m_grid) -> np.ndarray:
        """Posterior density [1/dex] on ``log_m_grid`` (g,) for feature rows (n, 3); 0 outside the prior."""
        ok, pdf, _, _ = self._densities(features)
        gq = np.asarray(log_m_grid, float).ravel()
        out = np.full((len(ok), gq.size), np.nan)
        if ok.any():
            vals = _interp_rows(np.broadcast_to(gq, (int(ok.sum()), gq.size)), self.grid[0],
                                self.grid[1] - self.grid[0], pdf[ok])
            out[ok] = np.where((gq >= self.grid[0]) & (gq <= self.grid[-1]), vals, 0.0)
        return out

    def settings(self) -> dict:
        return {"format": "clustermass-set-posterior", "conditioning": list(self.flow_conditioning),
                "prior": self.prior, "prior_options": self.prior_options, "prior_range": list(self.prior_range),
                "grid_points": int(self.grid.size), **self.meta}


class _SetView:
    """:class:`SetPosterior` with the JointKDEPosterior calling convention (feature rows only)."""

    n_cond_ = 3

    def __init__(self, post: SetPosterior) -> None:
        self._post = post

    def summarize(self, x_obs, method: str = "auto") -> pd.DataFrame:
        return self._post._summaries(np.asarray(x_obs, float).reshape(-1, 3))

    def cdf(self, x_obs, log_m):
        return self._post.cdf(x_obs, log_m)

    def pdf(self, x_obs, log_m_grid):
        return self._post.pdf(x_obs, log_m_grid)

    def to_frame(self) -> pd.DataFrame:
        """No calibration pairs: the set posterior is not a joint KDE (empty frame)."""
        return pd.DataFrame({"d_pred": [], "log_m_true": []})


# ---------------------------------------------------------------------- bundle
class SetBundle:
    """A trained set NPE with the window it reads galaxies from; usable wherever a
    :class:`~clustermass.bundle.ModelBundle` is (``posterior_table``, ``evaluate``, ``infer``).

    Attributes
    ----------
    kind : "set".
    window : WindowConfig the galaxies are selected and scaled with.
    kde : None (no KDE grid).
    network : :class:`DeepSetNPE` (CPU, eval mode).
    meta : the ``model.json`` dict.
    path : bundle directory once saved or loaded.
    needs_calibration : False: the flow is the posterior; ``calibrate`` validates it instead.
    """

    kind = KIND
    kde = None
    needs_calibration = False

    def __init__(self, window: WindowConfig, network: DeepSetNPE, meta: dict, path: str | Path | None = None) -> None:
        self.window, self.network, self.meta = window, network, meta
        self.network.eval()
        self.path = Path(path) if path is not None else None
        self.arch = full_arch(meta["architecture"]["arch"])
        pre = meta["preprocessing"]
        self.grid = np.linspace(*pre["grid"]["log_m_range"], int(self.arch["grid_points"]))
        self._store = _GridStore()
        self._posterior = SetPosterior(self._store, self.grid, tuple(pre["log_n_gal_range"]),
                                       meta={"model": meta.get("integrity")})

    def __repr__(self) -> str:
        tr = self.meta.get("training", {})
        return f"SetBundle(best_val_nll={tr.get('best_val_loss')}, path={str(self.path) if self.path else None!r})"

    def predict(self, catalogue: Catalogue, rows=None, batch_size: int = 256, progress: bool = False,
                device: str | None = None, **_) -> np.ndarray:
        """Flat-prior posterior median of log10 M200c [h^-1 Msun] per diagram (NaN without galaxies
        in the window); the grid densities are kept for :meth:`calibrated` (see the module notes)."""
        from tqdm.auto import tqdm

        rows = catalogue.rows() if rows is None else np.asarray(rows)
        med = np.full(len(rows), np.nan)
        if len(rows) == 0:
            return med
        z, log_n = _conditions(catalogue, rows, self.window)
        z_known = np.isfinite(z)
        z_in = np.where(z_known, z, float(self.network.z_mean))  # unknown z: the training mean
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = self.network.to(dev).eval()
        grid = torch.as_tensor(self.grid, dtype=torch.float32, device=dev)
        dg = self.grid[1] - self.grid[0]
        pdf_all = np.full((len(rows), self.grid.size), np.nan)
        with torch.inference_mode(), tqdm(total=len(rows), desc="predict set", unit="diagram",
                                          disable=not progress) as bar:
            for s in range(0, len(rows), batch_size):
                sl = slice(s, s + batch_size)
                x, cnt = set_inputs(catalogue, rows[sl], self.window, int(self.arch["max_gal"]))
                ok = cnt > 0
                if ok.any():
                    nmax = int(cnt.max())
                    xt = torch.as_tensor(x[ok, :nmax], device=dev)
                    args = (torch.as_tensor(cnt[ok], device=dev),
                            torch.as_tensor(z_in[sl][ok], dtype=torch.float32, device=dev),
                            torch.as_tensor(log_n[sl][ok], dtype=torch.float32, device=dev))
                    views = square_symmetries(xt) if self.arch["symmetrise"] else [xt]
                    acc = 0.0
                    for xv in views:  # mixture of the views' posteriors (each normalised on the grid)
                        lp = net.log_density_grid(net.context(xv, *args), grid).double().cpu().numpy()
                        acc = acc + _normalise(np.exp(lp - lp.max(axis=1, keepdims=True)), dg)[0]
                    idx = np.arange(s, min(s + batch_size, len(rows)))[ok]
                    pdf_all[idx] = acc / len(views)
                bar.update(len(cnt))
        good = np.isfinite(pdf_all).all(axis=1)
        if good.any():
            pdf, cdf = _normalise(pdf_all[good], dg)
            med[good] = _quantiles(cdf, self.grid, 0.5)
            self._store.put(med[good], log_n[good], pdf, z_in[good], z_known[good])
        return med

    def calibrated(self, required: bool = True) -> SetPosterior:
        """The set posterior (flat prior); always available: the flow needs no calibration."""
        return self._posterior

    def posterior(self):
        """The posterior in the JointKDEPosterior calling convention (:attr:`SetPosterior.posterior`)."""
        return self._posterior.posterior

    def validate(self, catalogue: Catalogue, split: str = "test", progress: bool = False) -> dict:
        """Coverage of the set posterior on a split with true masses (what ``calibrate`` does for
        a set bundle); written to ``validation.json`` in the bundle directory when saved.

        Returns ``n, coverage_68, coverage_95`` (fractions of true masses inside the central 68.27%
        and 95.45% intervals) and ``width_68`` (mean 68% interval [dex])."""
        rows = catalogue.rows(split)
        if len(rows) < 10:
            raise ClustermassError(f"validation needs the '{split}' split; the catalogue has {len(rows)} such diagrams")
        truth = catalogue.clusters["log_m200c"].to_numpy(float)[rows]
        if not np.isfinite(truth).all():
            raise ClustermassError(f"validation needs true masses, but the '{split}' split has NaN log_m200c")
        d = self.predict(catalogue, rows, progress=progress)
        z, log_n = _conditions(catalogue, rows, self.window)
        feats = np.column_stack([d, z, log_n])
        ok = np.isfinite(d)
        pit = self._posterior.cdf(feats[ok], truth[ok])
        s = self._posterior._summaries(feats[ok])
        out = {"split": split, "n": int(ok.sum()),
               "coverage_68": float(np.mean(np.abs(pit - 0.5) <= 0.6827 / 2)),
               "coverage_95": float(np.mean(np.abs(pit - 0.5) <= 0.9545 / 2)),
               "width_68": float(np.mean(s["log_m_hi1"] - s["log_m_lo1"])),
               "model": self.meta.get("integrity")}
        if self.path is not None:
            write_json_atomic(self.path / "validation.json", out)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``model.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.meta["weights"] = save_weights(self.network, directory)
        self.meta["integrity"] = integrity_hash(self.meta)
        self._posterior.meta["model"] = self.meta["integrity"]
        write_json_atomic(directory / META_FILE, self.meta)
        self.path = directory
        return directory


def build_set_network(arch: dict, standardisation: dict) -> DeepSetNPE:
    """A :class:`DeepSetNPE` of ``arch`` (:func:`full_arch`) with its standardisation buffers."""
    net = DeepSetNPE(**full_arch(arch))
    net.set_standardisation(**{f"{k}_{s}": v for k, d in standardisation.items() for s, v in d.items()})
    return net


def load_set_bundle(directory: str | Path, meta: dict) -> SetBundle:
    """A set bundle from ``directory`` whose ``model.json`` (already integrity-checked by
    :func:`clustermass.bundle.load_model`) is ``meta``; never unpickles."""
    from pydantic import ValidationError

    directory = Path(directory)
    w_path = directory / WEIGHTS_FILE
    try:
        pre = meta["preprocessing"]
        window = WindowConfig.model_validate(pre["window"])
        net = build_set_network(meta["architecture"]["arch"], pre["standardisation"])
        expected = meta["weights"]["sha256"]
    except (KeyError, TypeError, ValidationError, ConfigError) as exc:
        raise BundleError(f"{directory / META_FILE} is incomplete or invalid: {exc!r}") from exc
    load_weights(directory, expected, net, "set")
    state = net.state_dict()
    for name, d in pre["standardisation"].items():
        for s, v in d.items():
            if not math.isclose(float(state[f"{name}_{s}"]), float(v), rel_tol=1e-6, abs_tol=1e-6):
                raise BundleError(f"{w_path}: {name}_{s} differs from model.json (inconsistent bundle)")
    return SetBundle(window, net, meta, path=directory)
