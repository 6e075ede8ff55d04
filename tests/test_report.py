"""report.html from a fake run directory; headless-browser render where Chromium exists."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from clustermass.errors import ClustermassError  # noqa: E402
from clustermass.report import build_report, comparison_table, versions  # noqa: E402


def _model(eps_std, s_n):
    return {"eps_mean": 0.01, "eps_std": eps_std, "eps_raw_std": eps_std, "width_68": 0.3, "coverage_68": 0.69,
            "coverage_95": 0.95, "max_coverage_deviation": 0.01, "sigma_N": s_n, "sigma_N_err": 0.004,
            "sigma_0": 0.08, "sigma_0_err": 0.003, "n_eval": 500, "n_failed": 0, "log_m_true_std": 0.4}


@pytest.fixture
def run_dir(tmp_path):
    models = {"cnn3d": _model(0.16, 0.04), "cnn1d": _model(0.22, 0.07), "sigma_evrard": _model(0.3, None)}
    metrics = {"split": "eval", "primary": "cnn3d", "eps_definition": "eps = log10 M_pred - log10 M_true",
               **models["cnn3d"], "models": models,
               "contamination": {"n_diagrams": 500, "n_contaminated": 42, "fraction_contaminated": 0.084},
               "notes": ["a <note> to escape"]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "config.yaml").write_text("preset: quick\nseed: 7\ntraining:\n  lr: 0.001\n")
    (tmp_path / "timings.json").write_text(json.dumps({"train_cnn3d_s": 12.5}))
    (tmp_path / "figures").mkdir()
    for name in ("predictions", "richness"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        fig.savefig(tmp_path / "figures" / f"{name}.png")
        plt.close(fig)
    (tmp_path / "models" / "cnn3d").mkdir(parents=True)
    shutil.copy(tmp_path / "figures" / "richness.png", tmp_path / "models" / "cnn3d" / "loss.png")
    return tmp_path


def test_report_is_self_contained_and_complete(run_dir):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # every figure embedded (3 PNGs, the training one included), no external resources
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(imgs) == 3
    assert base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    assert text.index("figures/predictions.png") < text.index("figures/richness.png") < text.index("loss.png")
    # metrics tables: one row per method, the primary highlighted, sigma_N with its error
    table = re.search(r"<table id=\"comparison\">(.*?)</table>", text, re.S).group(1)
    assert table.count("<tr") == 4
    assert '<tr class="primary"><td>cnn3d</td>' in table
    assert "0.040 &plusmn; 0.004" in table and "0.220" in table
    # sigma_N and sigma_0 columns appear once each (the +/- columns), header and rows alike
    head = table.split("</tr>")[0]
    assert head.count("<th>") == head.count("</th>") and head.count("&sigma;<sub>N</sub>") == 1
    assert head.count("&sigma;<sub>0</sub>") == 1
    assert all(r.count("<td") == head.count("<th") for r in table.split("</tr>")[1:-1])
    assert "<table id=\"contamination\">" in text and "0.084" in text
    # config, timings, versions; user text escaped
    assert "seed: 7" in text and "train_cnn3d_s" in text
    for pkg in ("python", "numpy", "torch", "clustermass"):
        assert f"<td>{pkg}</td>" in text
    assert "a &lt;note&gt; to escape" in text


def test_report_without_metrics_and_missing_dir(tmp_path):
    text = build_report(tmp_path).read_text()
    assert "No <code>metrics.json</code>" in text and "No figures." in text
    with pytest.raises(ClustermassError):
        build_report(tmp_path / "nope")
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ClustermassError):
        build_report(tmp_path)


def test_comparison_table_handles_missing_values():
    html = comparison_table({"primary": "a", "models": {"a": {"eps_mean": None, "n_eval": 3}}})
    assert "&ndash;" in html and "<td>3</td>" in html
    assert versions()["numpy"][0].isdigit()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if exe := shutil.which(name):
            return exe
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path_factory):
    report = build_report(run_dir)
    shot = tmp_path_factory.mktemp("shot") / "report.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,2400", report.resolve().as_uri()],
        check=True, timeout=60, capture_output=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_includes_cross_simulation_table(tmp_path):
    """A run directory holding scripts/cross_simulation.py's JSON gets its table in the report."""
    res = {"command": "python scripts/cross_simulation.py --analytic A --pm P --out X", "rows": [
        {"train": "analytic", "eval": "analytic", "same_simulator": True, "n": 10, "bias": 0.01,
         "scatter": 0.12, "raw_bias": 0.0, "raw_scatter": 0.17, "coverage_68": 0.68, "coverage_95": 0.95},
        {"train": "analytic", "eval": "pm", "same_simulator": False, "n": 10, "bias": 0.2,
         "scatter": 0.3, "raw_bias": 0.1, "raw_scatter": 0.3, "coverage_68": 0.4, "coverage_95": 0.7}]}
    (tmp_path / "cross_simulation.json").write_text(json.dumps(res))
    text = build_report(tmp_path).read_text()
    assert 'id="cross-simulation"' in text and "+0.200" in text and "--pm P" in text
    (tmp_path / "cross_simulation.json").write_text("{broken")
    with pytest.raises(ClustermassError):
        build_report(tmp_path)
