"""Validated configuration: one pydantic model per stage, presets, file and flag overrides.

Each stage owns one section. Units: distances in h^-1 Mpc (projected, proper), velocities in
km/s, masses as log10(M200c / (h^-1 Msun)).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

#: model kinds: the CNNs on KDE grids, and ``set``, the set-based neural posterior on the galaxies
#: themselves (:mod:`clustermass.setnpe`; no KDE grid, so absent from KIND_DIMS)
ModelKind = Literal["cnn3d", "cnn2d", "cnn1d", "set"]
#: dimensions of each CNN's input grid: (x, y, v), (R_proj, v), (v)
KIND_DIMS: dict[str, int] = {"cnn3d": 3, "cnn2d": 2, "cnn1d": 1}
SPLITS = ("train", "test", "eval")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WindowConfig(_Section):
    """Observation window of one phase-space diagram (SCIENCE.md sec. 1)."""

    r_max: float = Field(1.6, gt=0, description="half-width of the sky window |x|,|y| [h^-1 Mpc]")
    v_max: float = Field(2200.0, gt=0, description="half-width in line-of-sight velocity [km/s]")


#: flux limit and observer distance range of each survey setting (other survey effects:
#: ``clustermass.simulate.observe.SURVEYS``). sdss: SDSS DR7 main sample (r < 17.77, Strauss et
#: al. 2002) with the paper's distance ball; desi-bgs: DESI BGS Bright (r < 19.5, Hahn et al.
#: 2023) at 0.03 < z < 0.2; paper: the paper's mock (r < 18.0, no fibre collisions, centred on
#: the central galaxy).
SURVEY_DEFAULTS: dict[str, dict[str, float]] = {
    "sdss": {"mag_limit": 17.77, "distance_min": 40.0, "distance_max": 250.0},
    "desi-bgs": {"mag_limit": 19.5, "distance_min": 90.0, "distance_max": 570.0},
    "paper": {"mag_limit": 18.0, "distance_min": 40.0, "distance_max": 250.0},
}
SurveyKind = Literal["sdss", "desi-bgs", "paper"]


class SimulationConfig(_Section):
    """Mock-catalogue generation (SCIENCE.md sec. 2-3)."""

    survey: SurveyKind = Field(
        "sdss",
        description="spectroscopic survey the mocks imitate: flux limit, distance range, fibre "
        "collisions, incompleteness, centring (sdss, desi-bgs, or the paper's mock)",
    )

    n_train: int = Field(17000, ge=0, description="diagrams in the training split")
    n_test: int = Field(20000, ge=0, description="diagrams in the test (SBI calibration) split")
    n_eval: int = Field(5000, ge=0, description="diagrams in the evaluation split")
    log_m_min: float = Field(13.7, description="lowest cluster mass, log10 M200c [h^-1 Msun]")
    log_m_max: float = Field(15.2, description="highest cluster mass, log10 M200c [h^-1 Msun]")
    distance_max: float = Field(250.0, gt=0, description="radius of the observer ball [h^-1 Mpc, comoving] (default: the survey's)")
    mag_limit: float = Field(17.77, description="apparent r-band flux limit [mag] (default: the survey's)")
    max_sightlines: int = Field(25, ge=1, description="most sight lines per halo")
    interlopers: bool = Field(True, description="include line-of-sight interloper halos")
    chunk_size: int = Field(2000, ge=1, description="diagrams generated per independently seeded chunk")
    volume: float = Field(1e9, gt=0, description="volume the unique cluster halos come from [h^-3 Mpc^3] (MDPL2: 1e9)")
    distance_min: float = Field(40.0, ge=0, description="smallest observer distance [h^-1 Mpc, comoving] (default: the survey's)")
    halo_log_m_min: float = Field(13.0, description="mass floor of the halos table (interloper truth) [log10 h^-1 Msun]")
    mass_distribution: Literal["flat", "mass-function"] = Field(
        "flat",
        description="cluster masses: flat in log M (training, as the paper) or drawn from the Tinker08 "
        "mass function, one sight line per halo (a survey-like sample, for checking --prior mass-function)",
    )

    @property
    def n_total(self) -> int:
        return self.n_train + self.n_test + self.n_eval

    @model_validator(mode="before")
    @classmethod
    def _survey_defaults(cls, data: Any) -> Any:
        """Flux limit and distances not given explicitly come from the survey setting."""
        if isinstance(data, dict):
            survey = data.get("survey", "sdss")
            if survey in SURVEY_DEFAULTS:
                data = {**SURVEY_DEFAULTS[survey], **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        if self.log_m_max <= self.log_m_min:
            raise ValueError("log_m_max must exceed log_m_min")
        if self.distance_min >= self.distance_max:
            raise ValueError("distance_min must be below distance_max")
        return self


class KDEConfig(_Section):
    """Phase-space KDE grid (SCIENCE.md sec. 4)."""

    n_grid: int = Field(50, ge=4, description="grid points per axis")
    bandwidth: float = Field(0.175, gt=0, description="scipy bw_method factor h0")
    input_scale: float = Field(1000.0, gt=0, description="factor applied to the sum-1 cube before the network")


#: Training settings that change how a run executes, not its result (left out of the training
#: fingerprints, so a run resumes with other values: devices, caches, epochs budget).
RUN_ONLY_TRAINING_FIELDS = ("max_epochs", "patience", "num_workers", "cache_max_gb", "galaxies_in_memory_max_gb",
                            "devices", "num_nodes", "strategy")


class TrainingConfig(_Section):
    """Network training (SCIENCE.md sec. 5)."""

    model: ModelKind = "cnn3d"
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = Field(100, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(5, ge=1, description="early-stopping patience [epochs]")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of training halos held out")
    augment: Literal["none", "d4", "rotate"] = Field(
        "none",
        description="sky-plane augmentation: 'd4' = the 8 exact symmetries of the square window "
        "(x/y flips, x<->y swap) applied to the cached cubes (free); 'rotate' = random rotations "
        "+ reflections of the galaxies, cubes rebuilt every epoch (slow on CPU)",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cache_inputs: bool = Field(True, description="build the KDE grids once and keep them in memory (not with augment)")
    cache_max_gb: float = Field(12.0, ge=0, description="largest in-memory grid cache [GB] (paper: 8.5); beyond it grids are rebuilt each epoch")
    galaxies_in_memory_max_gb: float = Field(
        4.0, ge=0, description="largest galaxies table [GB, uncompressed] that train/run read into memory; "
        "a larger one is served from a memory-mapped store in the catalogue directory (.galaxy-store/)")
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"] = Field(
        "auto", description="auto: bf16/16-mixed on a GPU, 32-bit on CPU")
    devices: int = Field(1, ge=1, description="devices (GPUs, or CPU processes) per node; batches are "
                         "split across them, so the global batch stays batch_size")
    num_nodes: int = Field(1, ge=1, description="nodes of a multi-node run (Lightning's Slurm/torchrun launch)")
    strategy: Literal["auto", "ddp", "ddp_fork"] = Field(
        "auto", description="Lightning strategy when devices * num_nodes > 1: ddp (auto) relaunches "
        "the command once per device (or runs under srun/torchrun); ddp_fork forks at fit (CPU only)")


class CalibrationConfig(_Section):
    """SBI calibration: joint KDE of (prediction, conditioning variables, true mass) on the test
    split (sec. 6; docs/calibration.md)."""

    conditioning: Literal["auto"] | list[Literal["d_pred", "z", "log_n_gal"]] = Field(
        "auto",
        description="what the posterior conditions on: the network output d_pred (first), the cluster "
                    "redshift z, log10 of the galaxies in the window; auto: the sharpest of "
                    "[d_pred, z, log_n_gal], [d_pred, z], [d_pred] that passes a cross-validated "
                    "calibration check on the calibration split (paper: [d_pred])")
    bandwidth: float = Field(0.40, gt=0, description="scipy bw_method factor of the joint KDE (paper, "
                                                      "d_pred only: 0.20); 0.40 is the smallest whose "
                                                      "halo-grouped cross-validated coverage on the "
                                                      "calibration split is not overconfident "
                                                      "(scripts/bandwidth_cv.py, docs/calibration.md)")
    min_neighbours: float = Field(
        5.0, gt=0, description="kernel weight of calibration pairs below which a prediction is out of range"
    )
    mean_degree: Literal[1, 2] = Field(2, description="2: KDE of the residuals about a quadratic fit of log M "
                                                      "on the conditioning variables (paper: 1)")
    heteroscedastic: bool = Field(True, description="scale the residuals by a fitted local scatter "
                                                    "(needs mean_degree 2; paper: false)")
    boundary: bool = Field(True, description="cut the kernels to the prior mass range and renormalise")


class EvaluationConfig(_Section):
    """What the evaluation stage compares (sec. 7)."""

    comparison_models: list[ModelKind] = Field(default_factory=lambda: ["cnn1d", "cnn2d"])
    baselines: bool = Field(True, description="run classical estimators (sigma_v, virial)")


class PMConfig(_Section):
    """Particle-mesh boxes of ``clustermass simulate --engine pm`` (docs/simulator.md, "PM mocks").

    The default (200 h^-1 Mpc, 128^3 particles, 256^3 mesh, 40 steps) holds ~300+ halos above
    10^13.7 h^-1 Msun per box; the ``tiny`` preset uses 96 h^-1 Mpc, 64^3, 128^3, 20 steps (a box must exceed ~80 h^-1 Mpc, twice the reach of a diagram).
    """

    box_size: float = Field(200.0, gt=0, description="side of each periodic box [h^-1 Mpc comoving]")
    n_particles: int = Field(128, ge=8, description="particles per side")
    n_mesh: int = Field(256, ge=8, description="PM mesh cells per side (a multiple of n_particles)")
    n_steps: int = Field(40, ge=1, description="kick-drift-kick steps, uniform in a")
    a_start: float = Field(0.05, gt=0, lt=1, description="scale factor of the 2LPT initial conditions")
    snapshot_redshift: float = Field(0.0, ge=0, description="redshift of the snapshot the diagrams are made from")
    boxes: int = Field(1, ge=1, description="independent boxes (seeds seed, seed+1, ...); their "
                                           "diagrams are merged, halos split by box")
    min_members: int = Field(20, ge=2, description="smallest FoF group kept as a halo [particles]")
    mass: Literal["abundance", "so"] = Field(
        "abundance", description="M200c of the FoF halos: abundance matching to Tinker08 ranked by "
        "FoF mass (default: the mesh under-resolves halos) or the particles' spherical overdensity")
    profile_calibration: Literal["nfw", "none"] = Field(
        "nfw", description="nfw: move FoF members radially (keeping directions and radial order) "
        "so that each halo is NFW inside R200c of its M200c (the mesh cores halos); none: the PM "
        "positions as they are")
    velocity_calibration: Literal["evrard", "none"] = Field(
        "evrard", description="evrard: rescale FoF members' velocities about their halo's bulk "
        "velocity so that the mean sigma(M200c) matches Evrard et al. 2008 (the mesh makes halos "
        "too cold); none: the PM velocities as they are")


class RunConfig(_Section):
    """Everything a `clustermass run` needs; written next to its outputs as config.yaml."""

    preset: str = "paper"
    seed: int = Field(0, ge=0, description="random seed (non-negative integer)")
    window: WindowConfig = Field(default_factory=WindowConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    kde: KDEConfig = Field(default_factory=KDEConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    pm: PMConfig = Field(default_factory=PMConfig)


# Presets are overrides of the defaults (the paper's values with the SDSS survey setting).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"simulation": {"survey": "paper"}},
    "authors-public": {
        "simulation": {"survey": "paper"},
        "window": {"r_max": 4.0},
        "training": {"lr": 5e-5, "patience": 10},
    },
    "quick": {
        "simulation": {"n_train": 4000, "n_test": 3000, "n_eval": 1500, "max_sightlines": 10},
        "kde": {"n_grid": 32},
        "training": {"lr": 1e-3, "max_epochs": 20, "patience": 4, "batch_size": 50},
        "evaluation": {"comparison_models": ["cnn1d", "cnn2d", "set"]},
    },
    # for smoke tests only: seconds, not science
    "tiny": {
        "simulation": {"n_train": 240, "n_test": 160, "n_eval": 100, "max_sightlines": 5},
        "kde": {"n_grid": 16},
        "training": {"lr": 1e-3, "max_epochs": 2, "patience": 2, "batch_size": 50},
        # the set model costs < 1 s here (training 0.2 s on 2 cores), so the smoke run covers it
        "evaluation": {"comparison_models": ["cnn1d", "set"], "baselines": True},
        "pm": {"box_size": 96.0, "n_particles": 64, "n_mesh": 128, "n_steps": 20},
    },
}


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except Exception as exc:  # parse errors of three libraries
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def parse_override(text: str) -> dict:
    """Turn ``"training.max_epochs=3"`` into ``{"training": {"max_epochs": 3}}`` (YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    preset: str = "quick",
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **updates: Any,
) -> RunConfig:
    """Resolve a preset, then a YAML/TOML/JSON file, then ``section.key=value`` overrides.

    ``updates`` are dotted keys with ``__`` separators, e.g. ``training__max_epochs=2``
    (used by CLI flags).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data: dict[str, Any] = _deep_update({"preset": preset}, PRESETS[preset])
    if file is not None:
        data = _deep_update(data, _read_file(file))
    for o in overrides:
        data = _deep_update(data, parse_override(o))
    for k, v in updates.items():
        if v is None:
            continue
        data = _deep_update(data, parse_override(f"{k.replace('__', '.')}={json.dumps(v)}"))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"invalid configuration at {loc}: {err['msg']}") from exc


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved configuration as YAML text."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
