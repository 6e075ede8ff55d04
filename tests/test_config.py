"""Presets, overrides and validation of the run configuration."""

import pytest

from clustermass.config import PRESETS, dump_config, load_config, parse_override
from clustermass.errors import ConfigError


def test_presets_resolve_and_differ():
    paper = load_config("paper")
    assert paper.window.r_max == 1.6 and paper.kde.n_grid == 50 and paper.training.lr == 1e-4
    assert paper.simulation.n_train == 17000 and paper.simulation.n_test == 20000
    public = load_config("authors-public")
    assert public.window.r_max == 4.0 and public.training.lr == 5e-5 and public.training.patience == 10
    quick = load_config("quick")
    assert quick.kde.n_grid < 50 and quick.simulation.n_total < 10000
    assert set(PRESETS) >= {"quick", "paper", "authors-public"}


def test_overrides_file_and_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  max_epochs: 7\nwindow:\n  v_max: 3000\n")
    cfg = load_config("quick", f, ["training.max_epochs=3"], seed=5)
    assert cfg.training.max_epochs == 3 and cfg.window.v_max == 3000 and cfg.seed == 5
    t = tmp_path / "c.toml"
    t.write_text("[kde]\nbandwidth = 0.2\n")
    assert load_config("paper", t).kde.bandwidth == 0.2
    # round trip through the dumped YAML
    y = tmp_path / "resolved.yaml"
    y.write_text(dump_config(cfg))
    assert load_config("paper", y) == cfg


@pytest.mark.parametrize(
    "bad",
    [["training.lr=-1"], ["nosuch.key=1"], ["training.model=cnn9d"], ["simulation.log_m_max=13"], ["oops"]],
)
def test_bad_overrides_are_clear_errors(bad):
    with pytest.raises(ConfigError):
        load_config("quick", None, bad)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config("quick", tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a.c=[cnn1d]") == {"a": {"c": ["cnn1d"]}}
