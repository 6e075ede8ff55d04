"""The command line: commands listed, help with units/defaults, one-line errors."""

import subprocess
import sys

import pandas as pd
import pytest

COMMANDS = ["simulate", "train", "calibrate", "evaluate", "infer", "report", "run"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "clustermass.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_commands():
    res = cli("--help")
    assert res.returncode == 0
    for c in COMMANDS:
        assert c in res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    res = cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout


def test_seed_option_where_randomness_enters():
    for c in ("simulate", "train", "run"):
        assert "--seed" in cli(c, "--help").stdout


def test_missing_catalogue_is_one_line_error(tmp_path):
    res = cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") and "not found" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_catalogue_without_required_column(tmp_path):
    d = tmp_path / "cat"
    d.mkdir()
    pd.DataFrame({"diagram_id": [0], "halo_id": [0]}).to_parquet(d / "clusters.parquet")
    pd.DataFrame({"diagram_id": [0], "x_proj": [0.0], "y_proj": [0.0], "v_los": [0.0]}).to_parquet(
        d / "galaxies.parquet")
    res = cli("train", "--data", str(d), "--out", str(tmp_path / "m"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "log_m200c" in res.stderr


def test_bad_preset_and_override(tmp_path):
    res = cli("run", "--preset", "nope", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "unknown preset" in res.stderr
    res = cli("run", "--set", "training.lr=-3", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "training.lr" in res.stderr


def _one_line_usage_error(res):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    ((), "no command"),
    (("--bogus",), "--bogus"),
    (("estimate",), "estimate"),
    (("infer",), "--model"),
    (("simulate", "--out", "x", "--seed", "-1"), "seed"),
    (("train", "--data", "d", "--out", "o", "--epochs", "abc"), "epochs"),
    (("infer", "--model", "m", "--out", "o", "--bogus"), "--bogus"),
])
def test_usage_errors_are_one_line(args, words):
    """Usage errors need no click install: typer's own exceptions are handled (fresh venv)."""
    line = _one_line_usage_error(cli(*args))
    assert words in line


def test_seed_must_be_non_negative_in_config(tmp_path):
    res = cli("simulate", "--out", str(tmp_path / "c"), "--set", "seed=-1")
    assert "seed" in _one_line_usage_error(res)


@pytest.mark.parametrize("command", ["simulate", "train", "calibrate", "evaluate", "infer", "compare",
                                     "massfunction", "run"])
def test_every_command_routes_preset_config_set(command):
    out = cli(command, "--help").stdout
    for opt in ("--preset", "--config", "--set"):
        assert opt in out, (command, opt)
