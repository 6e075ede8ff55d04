"""SBI calibration: one module that fits, stores and applies the posterior of every model.

:func:`calibrate` turns a trained bundle and the calibration split of a catalogue into a
:class:`Calibration`: the calibration pairs (network output ``d_pred``, the conditioning
variables an observer knows for every cluster, true ``log_m_true``), the settings, and the fitted
:class:`~clustermass.posterior.JointKDEPosterior` of ``log M`` given

    x = (d_pred, z, log_n_gal)          (``conditioning``, default; docs/calibration.md)

where ``z`` is the cluster redshift and ``log_n_gal`` = log10 of the number of galaxies inside
the model's phase-space window. The posterior is the exact conditional of a (k+1)-D Gaussian KDE
(closed-form Gaussian mixture in log M), each kernel cut to the prior support
``[log_m_min, log_m_max]`` of the training masses and renormalised (no mass leaks past the
prior edges). :func:`fit_calibration` does the same from plain arrays (the classical baselines).

Priors
------
``flat`` (default): the training prior, flat in log M over the prior support: posteriors are
right for clusters drawn like the mocks. ``mass-function``: the Tinker et al. (2008) halo mass
function of the mass-function cosmology at each cluster's own redshift (optionally times a
selection function of mass, :class:`MassFunctionPrior`), applied as the Bayes update of the
flat-prior posterior density (``JointKDEPosterior(log_prior=...)``): right for a survey's
clusters, which follow the steep mass function (no Eddington bias).

Rows whose conditioning values are missing (e.g. no redshift) get the posterior conditioned on
``d_pred`` alone (same pairs, weights and settings); ``conditioned_on`` says which was used.

Artefact: ``calibration.parquet`` (pairs + conditioning columns) and ``calibration.json``
(settings) in the bundle directory; ``model.json`` is never rewritten.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ClustermassError
from .posterior import SUMMARY_COLUMNS, CalibrationError, JointKDEPosterior

__all__ = [
    "CALIBRATION_JSON",
    "CALIBRATION_PARQUET",
    "CONDITIONING_CHOICES",
    "DEFAULT_CONDITIONING",
    "Calibration",
    "calibrate",
    "cluster_conditions",
    "fit_calibration",
    "MassFunctionPrior",
]

CALIBRATION_PARQUET = "calibration.parquet"
CALIBRATION_JSON = "calibration.json"
CALIBRATION_FORMAT = "clustermass-calibration"
CALIBRATION_VERSION = 1
#: Conditioning variables an observer has for every cluster.
CONDITIONING_CHOICES = ("d_pred", "z", "log_n_gal")
DEFAULT_CONDITIONING = ("d_pred", "z", "log_n_gal")
PRIORS = ("flat", "mass-function")


def cluster_conditions(cat, rows=None, window=None) -> pd.DataFrame:
    """Conditioning variables of catalogue rows: ``z`` (cluster redshift; NaN when unknown or
    <= 0) and ``log_n_gal`` (log10 of the galaxies inside ``window``, all galaxies without one)."""
    rows = cat.rows() if rows is None else np.asarray(rows)
    z = (cat.clusters["redshift"].to_numpy(dtype=float)[rows] if "redshift" in cat.clusters.columns
         else np.full(len(rows), np.nan))
    z = np.where(np.isfinite(z) & (z > 0), z, np.nan)
    off = cat.offsets[rows]
    counts = off[:, 1] - off[:, 0]
    if window is not None and len(rows):
        idx = np.concatenate([np.arange(s, e) for s, e in off])
        owner = np.repeat(np.arange(len(rows)), counts)
        g = {c: cat.galaxies[c].to_numpy(dtype=float)[idx] for c in ("x_proj", "y_proj", "v_los")}
        inside = ((np.abs(g["x_proj"]) <= window.r_max) & (np.abs(g["y_proj"]) <= window.r_max)
                  & (np.abs(g["v_los"]) <= window.v_max))
        counts = np.bincount(owner[inside], minlength=len(rows))
    with np.errstate(divide="ignore"):
        log_n = np.where(counts > 0, np.log10(np.maximum(counts, 1)), np.nan)
    return pd.DataFrame({"z": z, "log_n_gal": log_n})


class MassFunctionPrior:
    """The Tinker et al. (2008) halo mass function as a prior on log10 M200c, per redshift.

    Called as ``prior(log_m, z)`` with ``log_m`` (n, j) [log10 h^-1 Msun] and ``z`` (n,), it
    returns ``ln p`` and its first two derivatives in log M [per dex], each (n, j), where ``p`` is
    dn/dlog10 M200c (:func:`clustermass.cosmology.mass_function`, cosmology ``cosmo``) at that
    redshift, times ``selection(log M)`` if given. The constant per redshift is arbitrary (every
    posterior is renormalised). Unknown redshifts (NaN, < 0) use ``z_ref``.

    Representation: at redshift nodes spaced 0.01, a Chebyshev fit of degree 12 in log M over the
    prior support widened by 0.5 dex each side (residual < 1e-4 in ln p, or 1e-5 of its range
    where that exceeds 10 (high redshift), checked at each fit;
    colossus's own interpolation noise is ~2e-5); linear in z between nodes; continued linearly
    in log M beyond the fitted span (only grid cells far outside the prior support see it).
    Its shape agrees with colossus's to 2e-3 in ln p between nodes
    (``tests/test_calibration.py::test_mass_function_prior_follows_colossus_at_each_redshift``).
    """

    _DZ, _DEGREE, _MARGIN, _FIT_TOL = 0.01, 12, 0.5, 1e-4

    def __init__(self, prior_range, *, cosmo: str | None = None, selection=None, z_ref: float = 0.1) -> None:
        a, b = float(prior_range[0]), float(prior_range[1])
        self.lo, self.hi = a - self._MARGIN, b + self._MARGIN
        self.cosmo, self.selection, self.z_ref = cosmo, selection, float(z_ref)
        self._coefs: dict[int, np.ndarray] = {}

    def _node(self, k: int) -> np.ndarray:
        """Chebyshev coefficients (in t = 2 (log M - lo) / (hi - lo) - 1) at z = k * 0.01."""
        if k not in self._coefs:
            from . import cosmology

            m = np.linspace(self.lo, self.hi, 401)
            kw = {} if self.cosmo is None else {"cosmo": self.cosmo}
            dens = cosmology.mass_function(m, k * self._DZ, **kw)
            if self.selection is not None:
                dens = dens * np.asarray(self.selection(m), dtype=float)
            if not (np.all(np.isfinite(dens)) and np.all(dens > 0)):
                raise CalibrationError("the mass-function prior (times the selection) must be positive and "
                                       f"finite over log M {self.lo:.2f}-{self.hi:.2f}")
            t = 2.0 * (m - self.lo) / (self.hi - self.lo) - 1.0
            ld = np.log(dens)
            c = np.polynomial.chebyshev.chebfit(t, ld, self._DEGREE)
            err = float(np.abs(np.polynomial.chebyshev.chebval(t, c) - ld).max())
            if err > self._FIT_TOL * max(1.0, float(np.ptp(ld)) / 10.0):  # relative where ln p is steep
                raise CalibrationError(f"the mass-function prior is not smooth in log M (fit residual {err:.1e}; "
                                       "a sharp selection function?)")
            self._coefs[k] = c
        return self._coefs[k]

    def __call__(self, log_m, z):
        m = np.asarray(log_m, dtype=float)
        m = m.reshape(-1, 1) if m.ndim < 2 else m
        zz = np.broadcast_to(np.asarray(z, dtype=float).ravel(), (m.shape[0],))
        zz = np.where(np.isfinite(zz) & (zz >= 0), zz, self.z_ref)
        pos = zz / self._DZ
        k0 = np.floor(pos).astype(int)
        frac = (pos - k0)[None, :]
        ks, inv = np.unique(np.concatenate([k0, k0 + 1]), return_inverse=True)
        table = np.stack([self._node(int(k)) for k in ks], axis=1)  # (degree + 1, nodes)
        c = (1.0 - frac) * table[:, inv[: k0.size]] + frac * table[:, inv[k0.size :]]  # (degree + 1, n)
        cheb = np.polynomial.chebyshev
        dt = 2.0 / (self.hi - self.lo)
        d1, d2 = cheb.chebder(c, 1, scl=dt), cheb.chebder(c, 2, scl=dt)
        t = 2.0 * (np.clip(m, self.lo, self.hi) - self.lo) / (self.hi - self.lo) - 1.0
        lv = cheb.chebval(t, c[:, :, None], tensor=False)
        l1 = cheb.chebval(t, d1[:, :, None], tensor=False)
        l2 = cheb.chebval(t, d2[:, :, None], tensor=False)
        out = m - np.clip(m, self.lo, self.hi)  # linear continuation beyond the fitted span
        return lv + l1 * out, l1, np.where(out == 0.0, l2, 0.0)


@dataclass
class Calibration:
    """A fitted SBI calibration (see the module docstring).

    Attributes
    ----------
    pairs : DataFrame
        ``d_pred``, ``z``, ``log_n_gal`` (NaN where unknown), ``log_m_true``: the calibration split.
    conditioning : tuple of str
        Columns of ``pairs`` the posterior conditions on (first is ``d_pred``).
    bandwidth, min_neighbours : float
        KDE settings (:class:`~clustermass.posterior.JointKDEPosterior`).
    prior_range : (float, float) or None
        Support of the training masses; kernels are cut to it and renormalised (None: no cut).
    prior : "flat" or "mass-function"
    mean_degree, heteroscedastic :
        Trend model of the KDE (:class:`~clustermass.posterior.JointKDEPosterior`).
    prior_options : dict
        For ``mass-function``: ``cosmo``, ``selection`` and ``z_ref`` (:class:`MassFunctionPrior`;
        ``z_ref`` defaults to the calibration pairs' median redshift).
    posterior : JointKDEPosterior
        Fitted on ``pairs[conditioning]`` (rows with all values known).
    mass_prior : MassFunctionPrior or None
        The prior density applied to the posteriors (None for the flat prior).
    meta : dict
        Provenance (model integrity hash, split, n_pairs).
    """

    pairs: pd.DataFrame
    conditioning: tuple[str, ...] = DEFAULT_CONDITIONING
    bandwidth: float = 0.20
    min_neighbours: float = 5.0
    prior_range: tuple[float, float] | None = None
    prior: str = "flat"
    prior_options: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    mean_degree: int = 2
    heteroscedastic: bool = True
    posterior: JointKDEPosterior = field(init=False, repr=False)
    mass_prior: MassFunctionPrior | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.conditioning = tuple(self.conditioning)
        if int(self.mean_degree) == 1:
            self.heteroscedastic = False
        bad = [c for c in self.conditioning if c not in CONDITIONING_CHOICES]
        if bad or not self.conditioning or self.conditioning[0] != "d_pred":
            raise CalibrationError(f"conditioning must start with d_pred and use {CONDITIONING_CHOICES}, "
                                   f"got {self.conditioning}")
        if self.prior_range is not None:
            self.prior_range = (float(self.prior_range[0]), float(self.prior_range[1]))
        pairs = self.pairs.reset_index(drop=True).copy()
        for c in ("z", "log_n_gal"):
            if c not in pairs.columns:
                pairs[c] = np.nan
        missing = {"d_pred", "log_m_true"} - set(pairs.columns)
        if missing:
            raise CalibrationError(f"calibration pairs lack columns {sorted(missing)}")
        self.pairs = pairs[["d_pred", "z", "log_n_gal", "log_m_true"]].astype(float)
        self._marginal: JointKDEPosterior | None = None
        self.mass_prior = self._make_mass_prior()
        self.posterior, self._used = self._fit(self.conditioning)

    def _make_mass_prior(self) -> MassFunctionPrior | None:
        """The prior density of ``self.prior`` (None for flat), fitted over the prior range (else
        the calibration masses'); unknown redshifts get the calibration pairs' median."""
        if self.prior not in PRIORS:
            raise CalibrationError(f"prior must be one of {PRIORS}, not {self.prior!r}")
        if self.prior == "flat":
            return None
        z, m = self.pairs["z"].to_numpy(), self.pairs["log_m_true"].to_numpy()
        span = self.prior_range or (float(np.nanmin(m)), float(np.nanmax(m)))
        opts = {"z_ref": float(np.nanmedian(z)) if np.isfinite(z).any() else 0.1, **self.prior_options}
        return MassFunctionPrior(span, **opts)

    # ------------------------------------------------------------------ fitting
    def _fit(self, cols):
        p = self.pairs
        base = np.isfinite(p["d_pred"]) & np.isfinite(p["log_m_true"])
        used = base & np.isfinite(p[list(cols)]).all(axis=1)
        if used.sum() < max(10, 0.5 * base.sum()):
            raise CalibrationError(f"only {int(used.sum())} of {int(base.sum())} calibration pairs have "
                                   f"{', '.join(cols)}; condition on fewer variables")
        used = used.to_numpy()
        m = p["log_m_true"].to_numpy()[used]
        post = JointKDEPosterior(self.bandwidth, min_neighbours=self.min_neighbours, prior_range=self.prior_range,
                                 mean_degree=self.mean_degree, heteroscedastic=self.heteroscedastic,
                                 log_prior=self.mass_prior)
        post.fit(p[list(cols)].to_numpy()[used], m)
        return post, used

    @property
    def marginal(self) -> JointKDEPosterior:
        """The posterior given ``d_pred`` alone (same pairs, prior and settings), fitted once."""
        if self.conditioning == ("d_pred",):
            return self.posterior
        if self._marginal is None:
            self._marginal = self._fit(("d_pred",))[0]
        return self._marginal

    def with_prior(self, prior: str, **options) -> Calibration:
        """The same calibration under another prior (``flat`` or ``mass-function``).

        Not refitted: the prior multiplies the posterior density, so the copy shares the fitted
        posteriors (:meth:`JointKDEPosterior.with_log_prior`)."""
        out = copy.copy(self)
        out.prior, out.prior_options, out.meta = prior, dict(options), dict(self.meta)
        out.mass_prior = out._make_mass_prior()
        out.posterior = self.posterior.with_log_prior(out.mass_prior)
        out._marginal = None if self._marginal is None else self._marginal.with_log_prior(out.mass_prior)
        return out

    # ------------------------------------------------------------------ applying
    def features(self, d_pred, conditions: pd.DataFrame | None = None) -> np.ndarray:
        """The (n, k) conditioning array for predictions ``d_pred`` and a table with ``z`` and
        ``log_n_gal`` (NaN where unknown)."""
        d = np.asarray(d_pred, dtype=float).ravel()
        cols = [d]
        for c in self.conditioning[1:]:
            if conditions is None or c not in conditions.columns:
                cols.append(np.full(d.size, np.nan))
            else:
                cols.append(np.asarray(conditions[c], dtype=float).ravel())
        return np.column_stack(cols)

    def summarize(self, d_pred, conditions: pd.DataFrame | None = None) -> pd.DataFrame:
        """Posterior summaries (``SUMMARY_COLUMNS`` + ``out_of_range`` + ``conditioned_on``).

        Rows with all conditioning values known use :attr:`posterior`; rows with a finite
        ``d_pred`` but a missing conditioning value use :attr:`marginal`; NaN ``d_pred`` gives a
        NaN row flagged ``out_of_range``."""
        x = self.features(d_pred, conditions)
        n = x.shape[0]
        full = np.isfinite(x).all(1)
        part = np.isfinite(x[:, 0]) & ~full
        out = pd.DataFrame(np.nan, index=range(n), columns=list(SUMMARY_COLUMNS))
        out["d_pred"] = x[:, 0]
        out["out_of_range"] = True
        out["conditioned_on"] = ""
        zq = self._redshifts(x, conditions)
        for sel, post, cols in ((full, self.posterior, self.conditioning), (part, self.marginal, ("d_pred",))):
            if sel.any():
                arg = x[sel][:, : len(cols)] if len(cols) > 1 else x[sel, 0]
                s = post.summarize(arg, prior_z=zq[sel])
                for c in SUMMARY_COLUMNS[1:]:
                    out.loc[sel, c] = s[c].to_numpy()
                out.loc[sel, "out_of_range"] = s["out_of_range"].to_numpy()
                out.loc[sel, "conditioned_on"] = "+".join(cols)
        out["out_of_range"] = out["out_of_range"].astype(bool)
        return out

    def _redshifts(self, x: np.ndarray, conditions: pd.DataFrame | None = None) -> np.ndarray:
        """Redshifts of the rows for the mass prior: the ``z`` column of ``conditions``, else of the
        features ``x`` (NaN where unknown: the prior's reference redshift)."""
        if conditions is not None and "z" in conditions.columns:
            return np.asarray(conditions["z"], dtype=float).ravel()
        if "z" in self.conditioning:
            return x[:, self.conditioning.index("z")]
        return np.full(x.shape[0], np.nan)

    def _dispatch(self, features, fn_name: str, vals, prior_z=None) -> np.ndarray:
        x = np.asarray(features, dtype=float)
        x = x.reshape(x.shape[0], -1)
        zq = self._redshifts(x) if prior_z is None else np.broadcast_to(np.asarray(prior_z, float), (x.shape[0],))
        v = np.asarray(vals, dtype=float)
        two_d = v.ndim == 2
        out = np.full(v.shape if fn_name == "cdf" else (x.shape[0], v.size), np.nan)
        full = np.isfinite(x).all(1)
        part = np.isfinite(x[:, 0]) & ~full
        for sel, post in ((full, self.posterior), (part, self.marginal)):
            if not sel.any():
                continue
            arg = x[sel][:, : post.n_cond_] if post.n_cond_ > 1 else x[sel, 0]
            if fn_name == "cdf":
                out[sel] = post.cdf(arg, v[sel] if two_d or v.ndim == 1 else v, prior_z=zq[sel])
            else:
                out[sel] = post.pdf(arg, v, prior_z=zq[sel])
        return out

    def cdf(self, features, log_m, prior_z=None) -> np.ndarray:
        """Posterior CDF at ``log_m`` (n,) or (n, j) for rows of ``features`` (n, k) (exact; rows
        missing a conditioning value use :attr:`marginal`, rows without ``d_pred`` give NaN).
        ``prior_z``: redshifts for the mass-function prior (default: the features' ``z``)."""
        return self._dispatch(features, "cdf", log_m, prior_z)

    def pdf(self, features, log_m_grid, prior_z=None) -> np.ndarray:
        """Posterior density [1/dex] on ``log_m_grid`` (g,) for rows of ``features`` (n, k)
        (``prior_z`` as in :meth:`cdf`)."""
        return self._dispatch(features, "pdf", np.asarray(log_m_grid, dtype=float).ravel(), prior_z)

    def features_of(self, table: pd.DataFrame) -> np.ndarray:
        """Conditioning array of a posterior table (``d_pred``, ``cond_z``, ``cond_log_n_gal``)."""
        cond = pd.DataFrame({"z": table["cond_z"] if "cond_z" in table else np.nan,
                             "log_n_gal": table["cond_log_n_gal"] if "cond_log_n_gal" in table else np.nan},
                            index=table.index)
        return self.features(table["d_pred"].to_numpy(float), cond)

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION,
            "conditioning": list(self.conditioning), "bandwidth": float(self.bandwidth),
            "min_neighbours": float(self.min_neighbours), "mean_degree": int(self.mean_degree),
            "heteroscedastic": bool(self.heteroscedastic),
            "prior_range": list(self.prior_range) if self.prior_range is not None else None,
            "boundary": "kernels cut to prior_range and renormalised" if self.prior_range is not None else "none",
            "prior": self.prior, "prior_options": self.prior_options,
            "n_pairs": int(self._used.sum()), **{k: v for k, v in self.meta.items() if k not in ("n_pairs",)},
        }

    def save(self, directory) -> Path:
        """Write ``calibration.parquet`` (pairs) and ``calibration.json`` (settings) atomically."""
        from ._io import write_json_atomic
        from .catalog import write_parquet

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_parquet(self.pairs, directory / CALIBRATION_PARQUET)
        write_json_atomic(directory / CALIBRATION_JSON, self.settings())
        return directory

    @classmethod
    def load(cls, directory, legacy: dict | None = None) -> Calibration:
        """Read a calibration written by :meth:`save` (or, with ``legacy`` settings from an old
        ``model.json``, a bare ``d_pred, log_m_true`` table)."""
        directory = Path(directory)
        js, pq = directory / CALIBRATION_JSON, directory / CALIBRATION_PARQUET
        if js.is_file():
            try:
                s = json.loads(js.read_text())
            except (OSError, ValueError) as exc:
                raise CalibrationError(f"cannot read {js}: {exc}") from exc
            if s.get("format") != CALIBRATION_FORMAT:
                raise CalibrationError(f"{js} is not a clustermass calibration")
        elif legacy is not None:
            s = {"conditioning": ["d_pred"], **legacy}
        else:
            raise CalibrationError(f"{directory} has no {CALIBRATION_JSON}")
        if not pq.is_file():
            raise CalibrationError(f"{js.name} records a calibration but {pq} is missing")
        try:
            pairs = pd.read_parquet(pq)
        except Exception as exc:
            raise CalibrationError(f"cannot read {pq}: {exc}") from exc
        keep = ("format", "format_version", "conditioning", "bandwidth", "min_neighbours", "prior_range",
                "boundary", "prior", "prior_options", "n_pairs", "file", "mean_degree", "heteroscedastic")
        return cls(pairs, tuple(s.get("conditioning", ["d_pred"])), float(s.get("bandwidth", 0.2)),
                   float(s.get("min_neighbours", 5.0)),
                   tuple(s["prior_range"]) if s.get("prior_range") else None, s.get("prior", "flat"),
                   dict(s.get("prior_options") or {}), {k: v for k, v in s.items() if k not in keep},
                   int(s.get("mean_degree", 1)), bool(s.get("heteroscedastic", False)))


def fit_calibration(d_pred, log_m_true, conditions: pd.DataFrame | None = None, *,
                    conditioning=DEFAULT_CONDITIONING, bandwidth: float = 0.20, min_neighbours: float = 5.0,
                    prior_range=None, prior: str = "flat", prior_options: dict | None = None,
                    meta: dict | None = None, mean_degree: int = 2, heteroscedastic: bool = True) -> Calibration:
    """A :class:`Calibration` from arrays (any estimator: networks or classical baselines).

    ``conditions``: table aligned with ``d_pred`` with ``z`` and ``log_n_gal``. Pairs with a
    non-finite ``d_pred`` or truth are left out of the fit.
    """
    d = np.asarray(d_pred, dtype=float).ravel()
    m = np.asarray(log_m_true, dtype=float).ravel()
    if d.size != m.size:
        raise CalibrationError(f"calibration needs matching arrays, got {d.size} and {m.size} values")
    pairs = pd.DataFrame({"d_pred": d, "log_m_true": m})
    if conditions is not None:
        c = conditions.reset_index(drop=True)
        if len(c) != d.size:
            raise CalibrationError(f"conditions have {len(c)} rows for {d.size} pairs")
        for col in ("z", "log_n_gal"):
            if col in c.columns:
                pairs[col] = c[col].to_numpy(dtype=float)
    ok = np.isfinite(d) & np.isfinite(m)
    if ok.sum() < 10:
        raise CalibrationError(f"only {int(ok.sum())} calibration pairs with finite values (need >= 10)")
    def usable(c):  # known for most pairs and not constant (e.g. mocks all at one redshift)
        if c == "d_pred":
            return True
        if c not in pairs.columns:
            return False
        v = pairs.loc[ok, c].to_numpy(dtype=float)
        fin = np.isfinite(v)
        return fin.mean() >= 0.5 and np.ptp(v[fin]) > 1e-6 * max(1.0, float(np.abs(v[fin]).max()))

    conditioning = tuple(c for c in conditioning if usable(c))
    return Calibration(pairs[ok].reset_index(drop=True), conditioning, bandwidth, min_neighbours,
                       prior_range, prior, dict(prior_options or {}), dict(meta or {}), mean_degree, heteroscedastic)


#: Candidate conditioning sets of ``conditioning="auto"``, sharpest first.
AUTO_CANDIDATES = (("d_pred", "z", "log_n_gal"), ("d_pred", "z"), ("d_pred",))
#: Tolerances of the validation (2-fold cross-validation on the calibration split): overall
#: 68/95% coverage, and worst tercile (z, n_gal, d_pred) in 68% coverage and P(true < median).
VALIDATION_TOLERANCES = {"coverage_68": 0.03, "coverage_95": 0.02, "tercile_coverage_68": 0.06,
                         "tercile_median": 0.06}


def validate_conditioning(d_pred, log_m_true, conditions: pd.DataFrame | None, candidates=AUTO_CANDIDATES, *,
                          seed: int = 0, max_eval: int = 3000, **options) -> tuple[tuple[str, ...], list[dict]]:
    """Pick the conditioning set by 2-fold cross-validation on the calibration pairs.

    Each candidate is fitted on one half and its PITs computed on the other (both ways, at most
    ``max_eval`` clusters each). A candidate passes when the overall 68/95% coverage and the worst
    tercile (of z, log n_gal and d_pred) in 68% coverage and in P(true < median) are within
    :data:`VALIDATION_TOLERANCES`; the passing candidate with the narrowest mean 68% interval
    wins (none passing: the smallest calibration error). Half the pairs make the check
    conservative. Returns ``(conditioning, table)`` with one dict per candidate.
    """
    from .diagnostics import NOMINAL_68, NOMINAL_95, group_calibration

    d = np.asarray(d_pred, dtype=float).ravel()
    m = np.asarray(log_m_true, dtype=float).ravel()
    cond = (conditions.reset_index(drop=True) if conditions is not None
            else pd.DataFrame(index=range(d.size))).copy()
    for c in ("z", "log_n_gal"):
        if c not in cond.columns:
            cond[c] = np.nan
    rng = np.random.default_rng(seed)
    half = rng.permutation(d.size) < d.size // 2
    rows = []
    for cand in candidates:
        try:
            cal0 = fit_calibration(d, m, cond, conditioning=cand, **options)
        except CalibrationError:
            continue
        if cal0.conditioning != tuple(cand):  # a variable is unusable (missing or constant)
            continue
        pits, widths, parts = [], [], []
        try:
            for a, b in ((half, ~half), (~half, half)):
                cal = fit_calibration(d[a], m[a], cond[a], conditioning=cand, **options)
                ib = np.flatnonzero(b)
                if ib.size > max_eval:
                    ib = np.sort(rng.choice(ib, max_eval, replace=False))
                x = cal.features(d[ib], cond.iloc[ib])
                summ = cal.summarize(d[ib], cond.iloc[ib])
                pits.append(cal.cdf(x, m[ib]))
                widths.append((summ["log_m_hi1"] - summ["log_m_lo1"]).to_numpy())
                parts.append(pd.DataFrame({"z": cond["z"].to_numpy()[ib], "log_n_gal": cond["log_n_gal"].to_numpy()[ib],
                                           "d_pred": d[ib]}))
        except CalibrationError:
            continue
        pit, width, g = np.concatenate(pits), np.concatenate(widths), pd.concat(parts, ignore_index=True)
        ok = np.isfinite(pit)
        groups = group_calibration(pit[ok], {k: g[k].to_numpy()[ok] for k in g.columns}, n_boot=0)
        c68 = float(np.mean(np.abs(pit[ok] - 0.5) <= NOMINAL_68 / 2))
        c95 = float(np.mean(np.abs(pit[ok] - 0.5) <= NOMINAL_95 / 2))
        dev = {"coverage_68": abs(c68 - NOMINAL_68), "coverage_95": abs(c95 - NOMINAL_95),
               "tercile_coverage_68": float(np.nanmax(np.abs(groups["coverage_68"] - NOMINAL_68))),
               "tercile_median": float(np.nanmax(np.abs(groups["p_below_median"] - 0.5)))}
        rows.append({"conditioning": list(cand), "coverage_68": c68, "coverage_95": c95,
                     "width_68": float(np.nanmean(width)), **{f"dev_{k}": v for k, v in dev.items()},
                     "passed": bool(all(dev[k] <= VALIDATION_TOLERANCES[k] for k in dev)),
                     "error": float(max(dev[k] / VALIDATION_TOLERANCES[k] for k in dev))})
    if not rows:
        return ("d_pred",), rows
    passed = [r for r in rows if r["passed"]]
    best = min(passed, key=lambda r: r["width_68"]) if passed else min(rows, key=lambda r: r["error"])
    best["chosen"] = True
    return tuple(best["conditioning"]), rows


def prior_range_of(bundle) -> tuple[float, float] | None:
    """Mass range of a bundle's training data (``training_data.log_m_min/max``), if recorded."""
    td = (getattr(bundle, "meta", None) or {}).get("training_data") or {}
    sim = td.get("simulation", td) if isinstance(td, dict) else {}
    lo, hi = sim.get("log_m_min", td.get("log_m_min")), sim.get("log_m_max", td.get("log_m_max"))
    if lo is None or hi is None or not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return None
    return float(lo), float(hi)


def calibrate(bundle, catalogue, *, split: str = "test", config=None, conditioning=None,
              progress: bool = False, store: bool = True) -> Calibration:
    """Calibrate a trained bundle on the ``split`` diagrams of ``catalogue``.

    Parameters
    ----------
    bundle : ModelBundle
        Trained (and saved, when ``store``) model bundle.
    catalogue : Catalogue
        Holds the calibration split with true masses.
    split : str
        Calibration split (default ``test``).
    config : CalibrationConfig, optional
        ``bandwidth``, ``min_neighbours``, ``conditioning``, ``boundary`` (defaults otherwise).
    conditioning : sequence of str or "auto", optional
        Overrides ``config.conditioning``. ``auto`` (default): the sharpest of
        :data:`AUTO_CANDIDATES` that passes :func:`validate_conditioning` (recorded under
        ``validation`` in ``calibration.json``).
    store : bool
        Write ``calibration.parquet`` + ``calibration.json`` into the bundle directory and attach
        the calibration to the bundle.

    Returns
    -------
    Calibration
        Fitted once (a calibration the posterior refuses is never written).
    """
    from .config import CalibrationConfig

    cfg = config or CalibrationConfig()
    rows = catalogue.rows(split)
    if len(rows) < 10:
        raise ClustermassError(f"calibration needs the '{split}' split; the catalogue has {len(rows)} such diagrams")
    truth = catalogue.clusters["log_m200c"].to_numpy(dtype=float)[rows]
    if not np.isfinite(truth).all():
        raise ClustermassError(f"calibration needs true masses, but the '{split}' split has NaN log_m200c")
    d_pred = bundle.predict(catalogue, rows=rows, progress=progress)
    cond = cluster_conditions(catalogue, rows, bundle.window)
    boundary = getattr(cfg, "boundary", True)
    prior_range = prior_range_of(bundle) if boundary else None
    if prior_range is not None and (truth.min() < prior_range[0] - 1e-6 or truth.max() > prior_range[1] + 1e-6):
        prior_range = (min(prior_range[0], float(truth.min())), max(prior_range[1], float(truth.max())))
    conditioning = conditioning or getattr(cfg, "conditioning", "auto")
    opts = {"bandwidth": cfg.bandwidth, "min_neighbours": cfg.min_neighbours, "prior_range": prior_range,
            "mean_degree": getattr(cfg, "mean_degree", 2), "heteroscedastic": getattr(cfg, "heteroscedastic", True)}
    meta = {"split": split, "model": (bundle.meta or {}).get("integrity")}
    if conditioning == "auto":
        conditioning, table = validate_conditioning(d_pred, truth, cond, **opts)
        meta["validation"] = table
    cal = fit_calibration(d_pred, truth, cond, conditioning=tuple(conditioning), meta=meta, **opts)
    if store:
        bundle.set_calibration_object(cal)
    return cal
