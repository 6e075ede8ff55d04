"""Self-contained HTML report of a run directory.

:func:`build_report` reads what the pipeline left in ``run_dir`` (``metrics.json``,
``figures/*.png`` and any other PNG below it, ``config.yaml``, ``timings.json``) and writes
``run_dir/report.html``: one file, figures embedded as base64, no external resources, so it
opens in any browser and can be mailed around.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from ._io import write_text_atomic
from .errors import ClustermassError

#: figure file stem -> caption (paper figure numbers); others are listed after these
FIGURE_CAPTIONS = {
    "mass_distribution": "Mass distribution of the train/test/eval splits (paper Fig. 1).",
    "example_diagram": "An example phase-space diagram: galaxies (members blue, interlopers red) "
                       "and slices through its 3D KDE cube (paper Fig. 2).",
    "predictions": "Posterior vs truth (top; bin means of the posterior median and of the 1/2-sigma "
                   "bounds) and residuals eps = log M_pred - log M_true with 1/2-sigma bands (bottom; "
                   "paper Fig. 5).",
    "contamination": "Residuals coloured by interloper-cluster contamination (summed mass ratio); "
                     "marker size ~ 1/phase-space distance (paper Fig. 6, eq. 6).",
    "method_comparison": "Residuals per mass bin for every network and classical baseline (paper Fig. 7).",
    "richness": "Scatter about the power law vs number of members with the eq.-7 fits and the "
                "velocity-dispersion-only expectation (paper Fig. 8).",
    "joint_pdf": "Joint KDE of (network prediction, true mass) on the test split: the SBI "
                 "calibration (paper Fig. 4).",
    "coverage": "Empirical coverage of the central credible intervals of the primary model "
                "(evaluation split), with the ideal diagonal.",
    "pit": "Probability integral transform of the true masses under their posteriors: flat if calibrated.",
    "coverage_by_mass": "68% and 95% coverage per bin of true mass, with binomial errors.",
    "tarp": "TARP expected-coverage test (Lemos et al. 2023): on the diagonal if calibrated.",
    "group_calibration": "Calibration of the primary model per tercile of redshift, n_gal (galaxies in "
                         "the window) and network output, and per bin of true mass: 68%/95% coverage "
                         "and P(true < median), bootstrap 1-sigma errors; nominal dashed.",
    "example_posterior": "Posterior of one evaluation cluster: PDF, MAP and the 1/2-sigma intervals.",
    "loss_curve": "Training and validation loss per epoch.",
}

#: Scalar columns of the comparison table; the eq.-7 fits (value +/- error) follow them.
TABLE_COLUMNS = [
    ("eps_mean", "&lang;&epsilon;&rang; [dex]", "{:+.3f}"),
    ("eps_std", "&sigma;<sub>&epsilon;</sub> [dex]", "{:.3f}"),
    ("eps_raw_std", "&sigma;<sub>&epsilon;,raw</sub> [dex]", "{:.3f}"),
    ("width_68", "mean 68% width [dex]", "{:.3f}"),
    ("coverage_68", "coverage 68%", "{:.3f}"),
    ("coverage_95", "coverage 95%", "{:.3f}"),
    ("max_coverage_deviation", "max coverage dev.", "{:.3f}"),
    ("worst_group_coverage_68_deviation", "worst tercile |cov68 &minus; nom.|", "{:.3f}"),
    ("worst_group_median_deviation", "worst tercile |P(&lt;med) &minus; &frac12;|", "{:.3f}"),
    ("n_eval", "N", "{:d}"),
    ("n_failed", "failed", "{:d}"),
    ("time_per_cluster_ms", "time / cluster [ms]", "{:.2f}"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}tr.primary td{font-weight:600;background:#f7fbff}
figure{margin:1.2em 0;page-break-inside:avoid}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.muted{color:#777;font-size:.9em}
"""


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "&ndash;"
    try:
        if fmt == "{:d}":
            return fmt.format(int(value))
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return html.escape(str(value))


def _pm(m: dict, key: str) -> str:
    v, e = m.get(key), m.get(f"{key}_err")
    if v is None:
        return "&ndash;"
    return f"{float(v):.3f} &plusmn; {float(e):.3f}" if e is not None else f"{float(v):.3f}"


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the main packages (without importing torch)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("clustermass", "numpy", "scipy", "torch", "lightning", "astropy", "colossus", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def comparison_table(metrics: dict) -> str:
    """HTML method-comparison table: one row per model/baseline."""
    models = metrics.get("models") or {}
    primary = metrics.get("primary")
    head = "".join(f"<th>{lab}</th>" for _, lab, _ in TABLE_COLUMNS)
    head = "<tr><th>method</th>" + head + "<th>&sigma;<sub>N</sub> [dex]</th><th>&sigma;<sub>0</sub> [dex]</th></tr>"
    rows = []
    for name, m in models.items():
        cells = "".join(f"<td>{_fmt(m.get(key), fmt)}</td>" for key, _, fmt in TABLE_COLUMNS)
        cls = ' class="primary"' if name == primary else ""
        rows.append(f"<tr{cls}><td>{html.escape(name)}</td>{cells}<td>{_pm(m, 'sigma_N')}</td><td>{_pm(m, 'sigma_0')}</td></tr>")
    return f'<table id="comparison">{head}{"".join(rows)}</table>'


def group_table(metrics: dict) -> str:
    """HTML table of the primary model's calibration per group (``models[primary]["groups"]``)."""
    groups = (metrics.get("models") or {}).get(metrics.get("primary"), {}).get("groups") or []
    if not groups:
        return "<p>No per-group calibration (the model has no posterior CDF).</p>"
    head = ("<tr><th>group</th><th>bin</th><th>range</th><th>N</th><th>coverage 68%</th><th>coverage 95%</th>"
            "<th>P(true &lt; median)</th><th>PIT KS p</th><th>mean 68% width [dex]</th></tr>")
    rows = []
    for g in groups:
        def pm(key, g=g):
            return f"{_fmt(g.get(key), '{:.3f}')} &plusmn; {_fmt(g.get(key + '_err'), '{:.3f}')}"
        rows.append(f"<tr><td>{html.escape(str(g.get('group')))}</td><td>{_fmt(g.get('bin'), '{:d}')}</td>"
                    f"<td>{_fmt(g.get('lo'), '{:.3g}')} &ndash; {_fmt(g.get('hi'), '{:.3g}')}</td>"
                    f"<td>{_fmt(g.get('n'), '{:d}')}</td><td>{pm('coverage_68')}</td><td>{pm('coverage_95')}</td>"
                    f"<td>{pm('p_below_median')}</td><td>{_fmt(g.get('pit_ks_pvalue'), '{:.2g}')}</td>"
                    f"<td>{_fmt(g.get('width_68'), '{:.3f}')}</td></tr>")
    return f'<table id="groups">{head}{"".join(rows)}</table>'


def cross_simulation_table(res: dict) -> str:
    """HTML table of ``cross_simulation.json`` (scripts/cross_simulation.py): one row per
    (training simulator, evaluation simulator)."""
    head = ("<tr><th>trained on</th><th>evaluated on</th><th>N</th><th>bias [dex]</th><th>scatter [dex]</th>"
            "<th>raw bias / scatter [dex]</th><th>coverage 68%</th><th>coverage 95%</th></tr>")
    rows = []
    for r in res.get("rows") or []:
        cls = "" if r.get("same_simulator") else ' class="primary"'
        rows.append(f"<tr{cls}><td>{html.escape(str(r.get('train')))}</td><td>{html.escape(str(r.get('eval')))}</td>"
                    f"<td>{_fmt(r.get('n'), '{:d}')}</td><td>{_fmt(r.get('bias'), '{:+.3f}')}</td>"
                    f"<td>{_fmt(r.get('scatter'), '{:.3f}')}</td><td>{_fmt(r.get('raw_bias'), '{:+.3f}')} / "
                    f"{_fmt(r.get('raw_scatter'), '{:.3f}')}</td><td>{_fmt(r.get('coverage_68'), '{:.3f}')}</td>"
                    f"<td>{_fmt(r.get('coverage_95'), '{:.3f}')}</td></tr>")
    cmd = html.escape(str(res.get("command", "")))
    return (f'<table id="cross-simulation">{head}{"".join(rows)}</table>'
            f"<p class='muted'>Cross-simulator rows highlighted; &epsilon; from the posterior median of each "
            f"model's own calibration. Command: <code>{cmd}</code></p>")


def _dict_table(d: dict, table_id: str) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict | list):
            continue
        val = _fmt(v, "{:.4g}") if isinstance(v, float) or v is None else html.escape(str(v))
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{val}</td></tr>")
    return f'<table id="{table_id}">{"".join(rows)}</table>'


def _figures(run_dir: Path) -> list[Path]:
    pngs = sorted(p for p in run_dir.rglob("*.png") if p.is_file())
    order = {stem: i for i, stem in enumerate(FIGURE_CAPTIONS)}
    return sorted(pngs, key=lambda p: (p.parent != run_dir / "figures", order.get(p.stem, 99), str(p)))


def build_report(run_dir) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and return its path.

    Parameters
    ----------
    run_dir : path
        A run directory (from ``clustermass run`` or ``clustermass evaluate``).

    Returns
    -------
    Path
        The report file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ClustermassError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / "metrics.json"
    metrics: dict = {}
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as exc:
            raise ClustermassError(f"{metrics_path} is not valid JSON: {exc}") from exc
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>clustermass report: {html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>clustermass report &mdash; {html.escape(run_dir.name)}</h1>",
        f"<p class='muted'>generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"from <code>{html.escape(str(run_dir.resolve()))}</code></p>",
    ]
    parts.append("<h2 id='summary'>Summary</h2>")
    if metrics:
        primary = metrics.get("primary", "?")
        parts.append(
            f"<p>Primary model <b>{html.escape(str(primary))}</b> on the <b>{html.escape(str(metrics.get('split', '?')))}</b> "
            f"split ({_fmt(metrics.get('n_eval'), '{:d}')} clusters, true-mass spread "
            f"{_fmt(metrics.get('log_m_true_std'), '{:.3f}')} dex): "
            f"&lang;&epsilon;&rang; = {_fmt(metrics.get('eps_mean'), '{:+.3f}')} dex, "
            f"&sigma;<sub>&epsilon;</sub> = {_fmt(metrics.get('eps_std'), '{:.3f}')} dex, "
            f"68%/95% coverage {_fmt(metrics.get('coverage_68'), '{:.3f}')}/{_fmt(metrics.get('coverage_95'), '{:.3f}')}, "
            f"&sigma;<sub>N</sub> = {_pm(metrics, 'sigma_N')} dex, &sigma;<sub>0</sub> = {_pm(metrics, 'sigma_0')} dex.</p>"
        )
        parts.append(
            f"<p class='muted'>{html.escape(str(metrics.get('eps_definition', '')))}. "
            f"Richness fit: {html.escape(str(metrics.get('richness_fit', '')))}; velocity-dispersion-only "
            f"scatter at N<sub>mem</sub> = 100: {_fmt(metrics.get('sigma_v_reference_100'), '{:.3f}')} dex. "
            "Paper (CNN<sub>3D</sub>): &lang;&epsilon;&rang; = 0.04, &sigma;<sub>&epsilon;</sub> = 0.16, "
            "&sigma;<sub>N</sub> = 0.04, &sigma;<sub>0</sub> = 0.08 dex.</p>"
        )
        parts.append("<h2 id='methods'>Method comparison</h2>")
        parts.append(comparison_table(metrics))
        parts.append(
            "<p class='muted'>&epsilon; from the posterior median (calibrated on the test split, the "
            "same SBI step and conditioning for every method, docs/calibration.md); &sigma;<sub>&epsilon;,raw</sub> from the "
            "uncalibrated summary d&#771; (for the classical baselines not an M<sub>200c</sub> estimate); "
            "&sigma;<sub>N</sub>, &sigma;<sub>0</sub>: eq. 7 fitted to the scatter of d&#771; about its "
            "power law in true mass, in dex of true mass.</p>"
        )
        parts.append("<h2 id='groups-summary'>Calibration per group</h2>")
        parts.append(group_table(metrics))
        contam = metrics.get("contamination") or {}
        parts.append("<h2 id='contamination-summary'>Interloper contamination</h2>")
        if contam.get("available") is False or not contam:
            parts.append("<p>No halos table in the catalogue: contamination not computed.</p>")
        else:
            parts.append(_dict_table(contam, "contamination"))
        if metrics.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in metrics["notes"]) + "</ul>")
    else:
        parts.append("<p>No <code>metrics.json</code> in this run directory.</p>")

    cross = run_dir / "cross_simulation.json"
    if cross.is_file():
        try:
            parts.append("<h2 id='cross-simulation-summary'>Cross-simulation test (analytic vs PM mocks)</h2>"
                         + cross_simulation_table(json.loads(cross.read_text())))
        except json.JSONDecodeError as exc:
            raise ClustermassError(f"{cross} is not valid JSON: {exc}") from exc

    figs = _figures(run_dir)
    parts.append("<h2 id='figures'>Figures</h2>")
    if not figs:
        parts.append("<p>No figures.</p>")
    for p in figs:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        cap = FIGURE_CAPTIONS.get(p.stem, "")
        rel = p.relative_to(run_dir)
        parts.append(
            f"<figure><img alt='{html.escape(str(rel))}' src='data:image/png;base64,{data}'>"
            f"<figcaption><code>{html.escape(str(rel))}</code> {html.escape(cap)}</figcaption></figure>"
        )

    parts.append("<h2 id='config'>Configuration</h2>")
    cfg = run_dir / "config.yaml"
    parts.append(f"<pre>{html.escape(cfg.read_text())}</pre>" if cfg.is_file() else "<p>No <code>config.yaml</code>.</p>")
    timings = run_dir / "timings.json"
    if timings.is_file():
        try:
            parts.append("<h3>Timings [s]</h3>" + _dict_table(json.loads(timings.read_text()), "timings"))
        except json.JSONDecodeError:
            pass
    parts.append("<h2 id='versions'>Versions</h2>" + _dict_table(versions(), "versions"))
    parts.append("</body></html>\n")
    return write_text_atomic(run_dir / "report.html", "\n".join(parts))
