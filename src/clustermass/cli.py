"""The ``clustermass`` command: a thin layer that parses, calls the API and prints.

Every command resolves its configuration the same way (``--preset``, then ``--config FILE``,
then ``--set section.key=value``) and writes the resolved ``config.yaml`` next to its output.
Errors caused by input (missing files, malformed catalogues, bad config, usage errors) are
printed on one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import ClustermassError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Dynamical galaxy-cluster masses from projected phase space "
    "(3D KDE + CNN + simulation-based inference). Units: log10(M200c / h^-1 Msun), "
    "h^-1 Mpc (projected, proper), km/s.",
)

Preset = Annotated[str, typer.Option(help="configuration preset: quick, paper, authors-public, tiny")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML/TOML/JSON file overriding the preset")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set training.max_epochs=3 (repeatable)")]
Seed = Annotated[int | None, typer.Option(min=0, help="random seed, a non-negative integer (default: the preset's, 0)")]
PriorChoice = str  # "flat" or "mass-function" (checked by clustermass.calibration)
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or log lines")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an output made from other inputs or settings")]
Scheduler = Annotated[str | None, typer.Option(help="run as Dask tasks: processes:N (local cluster) or a scheduler address tcp://host:8786 (needs the dask extra: pip install 'clustermass\\[dask]'); same output bytes")]
Devices = Annotated[int | None, typer.Option(min=1, help="devices (GPUs; CPU processes without one) per node (default: the preset's, 1)")]
NumNodes = Annotated[int | None, typer.Option("--num-nodes", min=1, help="nodes of a multi-node training (Slurm: srun; see docs/scaling.md)")]
Strategy = Annotated[str | None, typer.Option(help="Lightning strategy: auto, ddp, ddp_spawn, ddp_fork")]
Precision = Annotated[str | None, typer.Option(help="auto, 32-true, 16-mixed, bf16-mixed")]


def _config(preset: str, config: Path | None, sets: list[str] | None, seed: int | None = None, **updates):
    """The resolved configuration: preset < file < --set < command flags."""
    from .config import load_config

    return load_config(preset, config, sets or (), seed=seed, **updates)


def _write_config(cfg, out: Path) -> None:
    """``out/config.yaml``: the fully resolved configuration this command ran with."""
    from ._io import write_text_atomic
    from .config import dump_config

    write_text_atomic(Path(out) / "config.yaml", dump_config(cfg))


def _echo_dict(d: dict, indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            typer.echo(" " * indent + f"{k}:")
            _echo_dict(v, indent + 2)
        else:
            typer.echo(" " * indent + f"{k}: {v:.4g}" if isinstance(v, float) else " " * indent + f"{k}: {v}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="output catalogue directory")],
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    n_diagrams: Annotated[int | None, typer.Option(min=1, help="total diagrams; split sizes keep the preset's proportions")] = None,
    seed: Seed = None,
    sky: Annotated[bool, typer.Option("--sky", help="simulate a mock SKY (galaxy + cluster tables) instead of diagrams")] = False,
    area: Annotated[float, typer.Option(help="--sky: survey area [deg^2]")] = 500.0,
    scheduler: Scheduler = None,
    engine: Annotated[str, typer.Option(help="analytic (default: the fitted-formula mocks) or pm (a "
                                             "particle-mesh box with FoF halos and halotools galaxies; "
                                             "needs the nbody extra, pip install 'clustermass\\[nbody]'; settings in the pm section)")] = "analytic",
    boxes: Annotated[int | None, typer.Option(min=1, help="--engine pm: independent boxes (seeds seed, seed+1, ...)")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Simulate a mock catalogue of projected phase-space diagrams (or a mock sky with --sky)."""
    from .errors import ConfigError

    if engine not in ("analytic", "pm"):
        raise ConfigError(f"unknown --engine {engine!r}; choose analytic or pm")
    cfg = _config(preset, config, set_, seed, pm__boxes=boxes)
    if n_diagrams is not None:  # split sizes keep the preset's proportions (validated again)
        s = cfg.simulation
        tot = max(s.n_total, 1)
        n_train, n_test = round(n_diagrams * s.n_train / tot), round(n_diagrams * s.n_test / tot)
        cfg = _config(preset, config, set_, seed, simulation__n_train=n_train, simulation__n_test=n_test,
                      simulation__n_eval=n_diagrams - n_train - n_test, pm__boxes=boxes)
    if sky:
        if engine != "analytic":
            raise ConfigError("--sky is made by the analytic engine only")
        from .simulate.mocksky import write_mock_sky

        paths = write_mock_sky(out, area_deg2=area, sim=cfg.simulation, seed=cfg.seed, progress=not quiet)
        _write_config(cfg, out)
        for p in paths:
            typer.echo(f"wrote {p}")
        return
    from .pipeline import simulate_stage
    from .simulate import summarize_catalogue

    cat = simulate_stage(cfg, out, progress=not quiet, overwrite=overwrite, scheduler=scheduler,
                         engine=engine)
    _write_config(cfg, out)
    _echo_dict(summarize_catalogue(cat))
    typer.echo(f"catalogue written to {out}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="catalogue directory (from `simulate`)")],
    out: Annotated[Path, typer.Option(help="model bundle directory to write")],
    model: Annotated[str, typer.Option(help="network: cnn3d, cnn2d, cnn1d, or set (set-based neural posterior on the galaxies)")] = "cnn3d",
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="maximum epochs (default: the preset's)")] = None,
    seed: Seed = None,
    devices: Devices = None,
    num_nodes: NumNodes = None,
    strategy: Strategy = None,
    precision: Precision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a network on the catalogue's train split (validation drawn by halo) and save a bundle."""
    from .catalog import read_catalogue
    from .pipeline import train_stage

    cfg = _config(preset, config, set_, seed, training__model=model, training__max_epochs=epochs,
                  training__devices=devices, training__num_nodes=num_nodes, training__strategy=strategy,
                  training__precision=precision)
    cat = read_catalogue(data, galaxies_max_gb=cfg.training.galaxies_in_memory_max_gb)
    bundle = train_stage(cfg, cat, cfg.training.model, out, progress=not quiet, overwrite=overwrite)
    if bundle is None:  # a DDP rank > 0: rank 0 writes the bundle and reports
        return
    _write_config(cfg, out)
    typer.echo(f"model bundle written to {out} (best val loss {bundle.meta.get('training', {}).get('best_val_loss')})")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="model bundle directory")],
    data: Annotated[Path, typer.Option(help="catalogue directory with a test split")],
    bandwidth: Annotated[float | None, typer.Option(help="joint-KDE bandwidth factor (scipy bw_method; default: the preset's, 0.30)")] = None,
    split: Annotated[str, typer.Option(help="split used for calibration")] = "test",
    conditioning: Annotated[str | None, typer.Option(help="what the posterior conditions on: auto (default: "
                                                          "cross-validated choice) or a comma list of d_pred, z, log_n_gal")] = None,
    boundary: Annotated[bool | None, typer.Option("--boundary/--no-boundary", help="cut the kernels to the training mass range")] = None,
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Calibrate the SBI posterior: store the calibration pairs of the test split (network output,
    redshift, log n_gal, true mass) and the settings in the bundle (calibration.parquet/.json)."""
    from .bundle import load_model
    from .catalog import read_catalogue
    from .pipeline import calibrate_stage

    cond = None
    if conditioning is not None:
        cond = "auto" if conditioning.strip() == "auto" else [c.strip() for c in conditioning.split(",") if c.strip()]
    cfg = _config(preset, config, set_, None, calibration__bandwidth=bandwidth, calibration__conditioning=cond,
                  calibration__boundary=boundary)
    bundle = load_model(model)
    cat = read_catalogue(data)
    calibrate_stage(bundle, cat, cfg.calibration, split=split, progress=not quiet)
    if not getattr(bundle, "needs_calibration", True):  # the set model: validated, not calibrated
        v = json.loads((model / "validation.json").read_text())
        typer.echo(f"{model}: the set posterior needs no calibration; on the {split} split its 68/95% "
                   f"intervals hold {v['coverage_68']:.3f}/{v['coverage_95']:.3f} of the true masses "
                   f"(validation.json)")
        return
    cal = bundle.calibrated()
    typer.echo(f"calibration stored in {model} (calibration.json): conditioning on "
               f"{', '.join(cal.conditioning)}, {int(cal._used.sum())} pairs")


@app.command()
def evaluate(
    model: Annotated[list[Path], typer.Option(help="calibrated bundle(s); the first is the primary model")],
    data: Annotated[Path, typer.Option(help="catalogue directory with an eval split")],
    out: Annotated[Path, typer.Option(help="output directory for metrics.json, posteriors, figures")],
    baselines: Annotated[bool | None, typer.Option(help="also run the classical estimators (default: the preset's)")] = None,
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate calibrated models on the eval split: residuals, coverage, richness, contamination."""
    from .bundle import load_model
    from .catalog import read_catalogue
    from .evaluation import evaluate as _evaluate

    cfg = _config(preset, config, set_, None, evaluation__baselines=baselines)
    bundles = {}
    for p in model:
        b = load_model(p)
        if b.kind in bundles:
            raise ClustermassError(f"two --model bundles of kind {b.kind!r}; give one per kind")
        bundles[b.kind] = b
    primary = next(iter(bundles))
    metrics = _evaluate(bundles, read_catalogue(data), out, primary=primary,
                        baselines=cfg.evaluation.baselines, progress=not quiet)
    _write_config(cfg, out)
    _echo_dict({k: v for k, v in metrics.items() if not isinstance(v, dict | list)})


@app.command()
def infer(
    model: Annotated[Path, typer.Option(help="calibrated bundle: a network, or a classical estimator that `evaluate` wrote (RUN/models/sigma_evrard, RUN/models/virial)")],
    out: Annotated[Path, typer.Option(help="output directory (posteriors.parquet)")],
    data: Annotated[Path | None, typer.Option(help="a clustermass catalogue directory")] = None,
    galaxies: Annotated[Path | None, typer.Option(help="survey galaxy table (FITS/CSV/ECSV/VOTable/parquet)")] = None,
    clusters: Annotated[Path | None, typer.Option(help="cluster list (id, RA, Dec, z of the centre)")] = None,
    ra_col: Annotated[str, typer.Option(help="RA column of both tables [deg, or the table's unit]")] = "ra",
    dec_col: Annotated[str, typer.Option(help="Dec column of both tables [deg, or the table's unit]")] = "dec",
    z_col: Annotated[str, typer.Option(help="redshift column of both tables")] = "z",
    galaxy_ra_col: Annotated[str | None, typer.Option(help="RA column of the galaxy table (overrides --ra-col)")] = None,
    galaxy_dec_col: Annotated[str | None, typer.Option(help="Dec column of the galaxy table (overrides --dec-col)")] = None,
    galaxy_z_col: Annotated[str | None, typer.Option(help="redshift column of the galaxy table (overrides --z-col)")] = None,
    cluster_ra_col: Annotated[str | None, typer.Option(help="RA column of the cluster table (overrides --ra-col)")] = None,
    cluster_dec_col: Annotated[str | None, typer.Option(help="Dec column of the cluster table (overrides --dec-col)")] = None,
    cluster_z_col: Annotated[str | None, typer.Option(help="redshift column of the cluster table (overrides --z-col)")] = None,
    id_col: Annotated[str, typer.Option(help="cluster id column")] = "id",
    mag_col: Annotated[str | None, typer.Option(help="apparent r magnitude column [mag] (optional)")] = None,
    flux_col: Annotated[str | None, typer.Option(help="r-band flux column instead of --mag-col (converted to AB mag)")] = None,
    flux_unit: Annotated[str, typer.Option(help="unit of --flux-col: nanomaggies (SDSS, DESI), Jy, uJy or nJy")] = "nanomaggies",
    mag_limit: Annotated[float | None, typer.Option(help="flux limit to apply [mag] (default: the model's)")] = None,
    angle_unit: Annotated[str, typer.Option(help="unit of RA/Dec when the table does not say: deg or rad")] = "deg",
    authors_sdss: Annotated[Path | None, typer.Option(help="cluster list in the authors' public SDSS format (id, log M200c, error); --galaxies is then their galaxy file or folder")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="refuse (exit 2) if any cluster lies outside the model's training range")] = False,
    plots: Annotated[bool, typer.Option(help="write a posterior figure per cluster")] = False,
    prior: Annotated[PriorChoice, typer.Option(help="mass prior: flat (the training mocks') or mass-function "
                                                    "(Tinker08 at each redshift: a survey's clusters)")] = "flat",
    scheduler: Scheduler = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="--data: clusters read, inferred and written per batch (bounds memory; default 20000)")] = None,
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Posterior masses for a catalogue (--data) or for sky tables (--galaxies + --clusters).

    --prior flat gives posteriors right for clusters drawn like the training mocks (flat in
    log M); --prior mass-function gives posteriors right for a survey's clusters, which follow the
    steep mass function (no Eddington bias at low mass). See docs/calibration.md."""
    from .inference import infer_authors_sdss, infer_catalogue, infer_sky_tables

    cfg = _config(preset, config, set_)
    common = {"plots": plots, "progress": not quiet, "strict": strict, "overwrite": overwrite, "prior": prior,
              "scheduler": scheduler}
    if authors_sdss is not None:
        if galaxies is None:
            raise ClustermassError("--authors-sdss needs --galaxies (their galaxy file or folder)")
        path = infer_authors_sdss(model, authors_sdss, galaxies, out, **common)
    elif (data is None) == (galaxies is None or clusters is None):
        raise ClustermassError("give either --data DIR, or both --galaxies and --clusters")
    elif data is not None:
        path = infer_catalogue(model, data, out, batch_size=batch_size, **common)
    else:
        path = infer_sky_tables(
            model, galaxies, clusters, out, ra_col=galaxy_ra_col or ra_col, dec_col=galaxy_dec_col or dec_col,
            z_col=galaxy_z_col or z_col, cluster_ra_col=cluster_ra_col or ra_col,
            cluster_dec_col=cluster_dec_col or dec_col, cluster_z_col=cluster_z_col or z_col, id_col=id_col,
            mag_col=mag_col, flux_col=flux_col, flux_unit=flux_unit, mag_limit=mag_limit,
            angle_unit=angle_unit, **common)
    _write_config(cfg, out)
    typer.echo(f"posteriors written to {path}")


@app.command()
def compare(
    posteriors: Annotated[Path, typer.Option(help="posteriors.parquet from `infer`")],
    reference: Annotated[Path, typer.Option(help="table with published masses (id, log_m, log_m_err)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    id_col: Annotated[str, typer.Option(help="id column of the reference table")] = "id",
    mass_col: Annotated[str, typer.Option(help="published log10 M200c column [h^-1 Msun]")] = "log_m200c",
    err_col: Annotated[str | None, typer.Option(help="published mass error column [dex]")] = None,
    include_flagged: Annotated[bool, typer.Option("--include-flagged", help="keep clusters flagged edge / few_galaxies / outside_training_range / out_of_range")] = False,
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
) -> None:
    """Compare inferred masses with published ones: normalised contrast and figures (paper Fig. 9)."""
    from .inference import compare_tables

    cfg = _config(preset, config, set_)
    summary = compare_tables(posteriors, reference, out, id_col=id_col, mass_col=mass_col, err_col=err_col,
                             include_flagged=include_flagged)
    _write_config(cfg, out)
    _echo_dict(summary)


@app.command("massfunction")
def massfunction(
    posteriors: Annotated[Path, typer.Option(help="posteriors.parquet from `infer` on a survey")],
    out: Annotated[Path, typer.Option(help="output directory")],
    area: Annotated[float, typer.Option(help="survey area [deg^2] (SDSS: 8250)")] = 8250.0,
    distance_max: Annotated[float, typer.Option(help="maximum comoving distance [h^-1 Mpc]")] = 250.0,
    log_m_min: Annotated[float | None, typer.Option(help="completeness mass, marked on the figure")] = None,
    n_boot: Annotated[int, typer.Option(min=1, help="bootstrap resamples for the 1-sigma band")] = 200,
    prior: Annotated[PriorChoice | None, typer.Option(help="mass prior the posteriors must have been inferred with "
                                                           "(flat or mass-function; default: the table's)")] = None,
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    seed: Seed = None,
) -> None:
    """Cluster mass function from inferred masses vs Tinker et al. 2008 (Planck 2018) (paper Fig. 10)."""
    from .massfunction import write_mass_function
    from .sky import read_table

    cfg = _config(preset, config, set_, seed)
    summary = write_mass_function(read_table(posteriors), out, area, distance_max, log_m_min=log_m_min,
                                  n_boot=n_boot, seed=cfg.seed, prior=prior)
    _write_config(cfg, out)
    _echo_dict({k: v for k, v in summary.items() if not isinstance(v, dict | list)})


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory (from `run` or `evaluate`)")]) -> None:
    """Build the self-contained report.html of a run directory (its config.yaml is shown)."""
    from .report import build_report

    if not Path(run_dir).is_dir():
        raise ClustermassError(f"run directory not found: {run_dir}")
    typer.echo(f"report written to {build_report(run_dir)}")


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/quick"),
    preset: Preset = "quick",
    config: ConfigFile = None,
    set_: Sets = None,
    seed: Seed = None,
    scheduler: Scheduler = None,
    devices: Devices = None,
    num_nodes: NumNodes = None,
    strategy: Strategy = None,
    precision: Precision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """The whole pipeline: simulate -> train -> calibrate (SBI) -> evaluate -> report."""
    from .pipeline import run_pipeline

    cfg = _config(preset, config, set_, seed, training__devices=devices, training__num_nodes=num_nodes,
                  training__strategy=strategy, training__precision=precision)
    metrics = run_pipeline(cfg, out, progress=not quiet, overwrite=overwrite, scheduler=scheduler)
    if metrics is None:  # a DDP rank > 0: done after training; rank 0 carries on
        return
    keys = ("eps_mean", "eps_std", "log_m_true_std", "coverage_68", "coverage_95", "sigma_N", "sigma_0")
    _echo_dict({k: metrics[k] for k in keys if k in metrics})


#: library keyword -> command-line flag, where they differ (sky tables: galaxy vs cluster columns)
_FLAG_OF = {"ra_col": "--galaxy-ra-col", "dec_col": "--galaxy-dec-col", "z_col": "--galaxy-z-col"}


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def _usage_hint(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "clustermass"
    return f" (see '{path} --help')"


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the typer app, turning user and usage errors into one-line messages
    and warnings (out-of-distribution clusters, dropped rows, units) into ``warning:`` lines."""
    import warnings

    warnings.formatwarning = _format_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        names = ", ".join(sorted(c.name or c.callback.__name__ for c in app.registered_commands))
        _fail(f"no command given; one of: {names} (see 'clustermass --help')")
    try:
        app(args=argv, prog_name="clustermass", standalone_mode=False)
    except typer.Exit as exc:  # --help and explicit exits
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except ClustermassError as exc:
        option = getattr(exc, "option", None)
        flag = f" (command line: {_FLAG_OF.get(option, '--' + option.replace('_', '-'))})" if option else ""
        _fail(f"{exc}{flag}")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        _fail(str(exc))
    except typer.TyperException as exc:  # usage errors: unknown option or command, bad value, missing option
        message = " ".join(exc.format_message().split())
        _fail(f"{message}{_usage_hint(exc)}", getattr(exc, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        _fail("interrupted; outputs written so far are complete files (rerun to resume)", 130)


if __name__ == "__main__":
    main()
