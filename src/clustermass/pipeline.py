"""The whole chain, stage by stage: simulate -> train -> calibrate -> evaluate -> report.

Each stage function reads what the previous one wrote, so the CLI commands and
:func:`run_pipeline` share one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ._io import write_json_atomic, write_text_atomic
from .catalog import Catalogue, read_catalogue
from .config import CalibrationConfig, RunConfig, dump_config


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[clustermass] {msg}", flush=True)


def config_hash(*sections) -> str:
    """Short hash of config sections (decides whether a cached stage output can be reused)."""
    text = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _existing_catalogue_key(out: Path):
    """The ``config_key`` of the catalogue in ``out`` ("unknown" for a foreign one), None if none."""
    meta_file = out / "catalogue.json"
    if not (out / "clusters.parquet").is_file():
        return None
    try:
        return json.loads(meta_file.read_text()).get("config_key", "unknown")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown"


def simulate_stage(cfg: RunConfig, out: Path, progress: bool = True, overwrite: bool = False,
                   scheduler: str | None = None, engine: str = "analytic") -> Catalogue:
    """Simulate the mock catalogue into ``out`` (reused when it exists with the same config and seed).

    A catalogue made with other settings or another seed (trained bundles refer to it by hash)
    is only replaced with ``overwrite``. The catalogue streams to disk chunk by chunk, then is read back
    (its galaxies memory-mapped beyond ``cfg.training.galaxies_in_memory_max_gb``, :func:`read_catalogue`).
    ``scheduler`` (``processes:N`` or a Dask scheduler address) runs the chunks as Dask tasks;
    the files are the same bytes either way. ``engine="pm"`` makes the PM mock family instead
    (:mod:`clustermass.simulate.pmmock`, settings ``cfg.pm``; needs the ``nbody`` extra).
    """
    from ._io import guard_output
    from .errors import ConfigError
    from .simulate import MODEL_VERSION, simulate_to_directory

    out = Path(out)
    galaxies_max_gb = cfg.training.galaxies_in_memory_max_gb  # a larger galaxies table is memory-mapped
    if engine not in ("analytic", "pm"):
        raise ConfigError(f"unknown simulation engine {engine!r}; choose analytic or pm")
    if engine == "pm":
        from .simulate.pmmock import PM_MODEL_VERSION

        key = config_hash(cfg.simulation, cfg.window, cfg.pm) + f"-s{cfg.seed}-pm{PM_MODEL_VERSION}"
    else:
        key = config_hash(cfg.simulation, cfg.window) + f"-s{cfg.seed}-m{MODEL_VERSION}"
    existing = _existing_catalogue_key(out)
    if existing == key:
        _log(f"reusing catalogue in {out}", progress)
        return read_catalogue(out, galaxies_max_gb)
    guard_output(out, existing, key, overwrite, "a catalogue")
    if engine == "pm":
        from .catalog import write_catalogue
        from .simulate.pmmock import simulate_pm_catalogue

        if scheduler is not None:
            raise ConfigError("--scheduler is not supported with --engine pm (use --boxes)")
        cat = simulate_pm_catalogue(cfg.pm, cfg.simulation, cfg.window, cfg.seed, progress=progress)
        cat.meta["config_key"] = key
        write_catalogue(cat, out)
        return read_catalogue(out, galaxies_max_gb)
    simulate_to_directory(cfg.simulation, cfg.window, cfg.seed, out, meta={"config_key": key},
                          progress=progress, scheduler=scheduler)
    return read_catalogue(out, galaxies_max_gb)


def train_stage(cfg: RunConfig, cat: Catalogue, kind: str, out: Path, progress: bool = True,
                overwrite: bool = False):
    """Train one network of ``kind`` on the catalogue's train split; the bundle goes to ``out``.

    Returns the bundle, or None on a DDP rank > 0 (see :func:`clustermass.training.train_model`).
    """
    from .training import train_model

    training = cfg.training.model_copy(update={"model": kind})
    return train_model(cat, kind, cfg.window, cfg.kde, training, seed=cfg.seed, out_dir=out,
                       progress=progress, overwrite=overwrite)


def calibrate_stage(bundle, cat: Catalogue, calibration: CalibrationConfig, split: str = "test",
                    progress: bool = True):
    """SBI calibration (:func:`clustermass.calibration.calibrate`): predict the ``split`` diagrams and
    store the calibration (pairs + conditioning columns + settings) in the bundle directory.

    A bundle whose posterior needs no calibration (``needs_calibration`` False: the set model,
    whose flow is the posterior) is validated on the split instead: its coverage goes to
    ``validation.json`` in the bundle (:meth:`clustermass.setnpe.SetBundle.validate`)."""
    from .calibration import calibrate

    if not getattr(bundle, "needs_calibration", True):
        bundle.validate(cat, split=split, progress=progress)
        return bundle
    calibrate(bundle, cat, split=split, config=calibration, progress=progress)
    return bundle


def run_pipeline(cfg: RunConfig, out: str | Path, progress: bool = True, overwrite: bool = False,
                 scheduler: str | None = None) -> dict | None:
    """Run every stage of the pipeline for ``cfg`` into directory ``out``; returns the metrics.

    ``scheduler`` (``processes:N`` or a Dask scheduler address) runs the simulation chunks as
    Dask tasks; training uses ``cfg.training.devices/num_nodes/strategy`` (Lightning). On the
    ranks > 0 of a relaunched DDP training the call returns None after the first training.
    """
    from .evaluation import evaluate
    from .report import build_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    _log("1/5 simulate", progress)
    cat = simulate_stage(cfg, out / "catalogue", progress, overwrite=overwrite, scheduler=scheduler)
    timings["simulate_s"] = time.perf_counter() - t0

    kinds = [cfg.training.model] + [k for k in cfg.evaluation.comparison_models if k != cfg.training.model]
    relaunched_for = os.environ.get("CLUSTERMASS_DDP_KIND")  # training.DDP_KIND_ENV
    if relaunched_for in kinds:  # a process Lightning relaunched (DDP) to train this one model
        kinds = [relaunched_for]
    bundles = {}
    for kind in kinds:
        t0 = time.perf_counter()
        _log(f"2/5 train {kind}", progress)
        bundles[kind] = train_stage(cfg, cat, kind, out / "models" / kind, progress, overwrite=overwrite)
        if bundles[kind] is None:  # a DDP rank > 0 (rank 0 carries on with the other stages)
            return None
        timings[f"train_{kind}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _log(f"3/5 calibrate {kind} on the test split", progress)
        calibrate_stage(bundles[kind], cat, cfg.calibration, progress=progress)
        timings[f"calibrate_{kind}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log("4/5 evaluate", progress)
    metrics = evaluate(bundles, cat, out, primary=cfg.training.model,
                       baselines=cfg.evaluation.baselines, progress=progress)
    timings["evaluate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log("5/5 report", progress)
    write_json_atomic(out / "timings.json", timings)
    report = build_report(out)
    timings["report_s"] = time.perf_counter() - t0
    write_json_atomic(out / "timings.json", timings)
    _log(f"done: {report}", progress)
    return metrics
