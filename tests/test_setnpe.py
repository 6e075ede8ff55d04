"""The set-based neural posterior (model kind ``set``, clustermass.setnpe): invariances of the
network, the grid posterior's algebra, the bundle round trip, and training through train_model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from clustermass.config import load_config

setnpe = pytest.importorskip("clustermass.setnpe")


def _net(seed=0, **arch):
    torch.manual_seed(seed)
    net = setnpe.build_set_network(arch, {"theta": {"mean": 14.4, "std": 0.4}, "z": {"mean": 0.06, "std": 0.02},
                                          "logn": {"mean": 2.0, "std": 0.4}})
    return net.eval()


def _sets(b=4, n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, 3, generator=g) * 2 - 1
    count = torch.tensor([n, n - 7, 5, 1][:b])
    for i, c in enumerate(count):
        x[i, c:] = 0.0
    z = torch.full((b,), 0.05)
    log_n = torch.log10(count.float())
    return x, count, z, log_n


@pytest.mark.parametrize("pool", ["mean+max", "mean"])
def test_shuffled_galaxies_give_the_same_output(pool):
    net = _net(pool=pool)
    x, count, z, log_n = _sets()
    grid = torch.linspace(13.7, 15.2, 41)
    with torch.no_grad():
        ref = net.log_density_grid(net.context(x, count, z, log_n), grid)
        xs = x.clone()
        for i, c in enumerate(count):
            xs[i, :c] = x[i, torch.randperm(int(c))]
        out = net.log_density_grid(net.context(xs, count, z, log_n), grid)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    # a different set does change it (the test can fail)
    with torch.no_grad():
        other = net.log_density_grid(net.context(x * 0.5, count, z, log_n), grid)
    assert (other - ref).abs().max() > 1e-3


def test_padding_does_not_change_the_output():
    net = _net()
    x, count, z, log_n = _sets()
    with torch.no_grad():
        ref = net.context(x, count, z, log_n)
        padded = torch.cat([x, torch.zeros(x.shape[0], 50, 3)], dim=1)
        out = net.context(padded, count, z, log_n)
        # junk in the padding is masked out too
        junk = padded.clone()
        for i, c in enumerate(count):
            junk[i, c:] = 7.0
        out_junk = net.context(junk, count, z, log_n)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out_junk, ref, atol=1e-6)


def test_augmentation_rotates_the_sky_plane_only():
    x, count, _, _ = _sets()
    out = setnpe.augment_sets(x, "rotate", generator=torch.Generator().manual_seed(0))
    r_in, r_out = x[..., :2].norm(dim=-1), out[..., :2].norm(dim=-1)
    assert torch.allclose(r_in, r_out, atol=1e-6)  # projected radii kept
    assert torch.equal(out[..., 2], x[..., 2])  # v_los kept
    assert not torch.allclose(out[..., :2], x[..., :2])
    assert (out[0, count[0]:] == 0).all() and (out[2, 5:] == 0).all()  # padding stays zero
    d4 = setnpe.augment_sets(x, "d4", generator=torch.Generator().manual_seed(0))
    # multiples of 90 degrees (+ reflections) map the square window onto itself
    assert torch.allclose(d4[..., :2].abs().amax(-1), x[..., :2].abs().amax(-1), atol=1e-6)


def _store_posterior(pdf, grid, z=0.05, log_n=2.0, prior="flat"):
    store = setnpe._GridStore()
    p, c = setnpe._normalise(pdf, grid[1] - grid[0])
    med = setnpe._quantiles(c, grid, 0.5)
    n = len(pdf)
    store.put(med, np.full(n, log_n), p, np.full(n, z), np.ones(n, bool))
    post = setnpe.SetPosterior(store, grid, (1.0, 3.0))
    return (post if prior == "flat" else post.with_prior(prior)), med


def test_grid_posterior_is_normalised_and_quantiles_monotone():
    grid = np.linspace(13.7, 15.2, 301)
    mu = np.array([14.0, 14.5, 15.0])
    sig = np.array([0.1, 0.2, 0.15])
    pdf = np.exp(-0.5 * ((grid - mu[:, None]) / sig[:, None]) ** 2)
    post, med = _store_posterior(pdf, grid)
    feats = np.column_stack([med, np.full(3, 0.05), np.full(3, 2.0)])
    fine = np.linspace(13.7, 15.2, 3001)
    dens = post.pdf(feats, fine)
    assert np.allclose(np.trapezoid(dens, fine), 1.0, atol=1e-4)
    s = post.summarize(med, pd.DataFrame({"z": np.full(3, 0.05), "log_n_gal": np.full(3, 2.0)}))
    cols = ["log_m_lo2", "log_m_lo1", "log_m_median", "log_m_hi1", "log_m_hi2"]
    assert (np.diff(s[cols].to_numpy(), axis=1) > 0).all()
    # the middle cluster is an untruncated Gaussian: exact quantiles within the grid spacing
    assert s.loc[1, "log_m_median"] == pytest.approx(14.5, abs=2e-3)
    assert s.loc[1, "log_m_hi1"] - s.loc[1, "log_m_lo1"] == pytest.approx(2 * 0.2 * 0.99982, abs=5e-3)
    assert s.loc[1, "log_m_mean"] == pytest.approx(14.5, abs=2e-3)
    # the CDF at the summary quantiles gives their levels
    c = post.cdf(feats, s[["log_m_lo1", "log_m_hi1"]].to_numpy())
    assert np.allclose(c, [[0.1587, 0.8413]] * 3, atol=2e-3)
    assert np.allclose(post.cdf(feats, np.full(3, 13.0)), 0) and np.allclose(post.cdf(feats, np.full(3, 16.0)), 1)
    # the mass-function prior pulls the masses down (steeply falling prior)
    mf, _ = _store_posterior(pdf, grid, prior="mass-function")
    s_mf = mf.summarize(med, pd.DataFrame({"z": np.full(3, 0.05), "log_n_gal": np.full(3, 2.0)}))
    assert (s_mf["log_m_median"] < s["log_m_median"]).all()
    assert np.allclose(s_mf["d_pred"], s["d_pred"])  # d_pred stays the model's flat-prior median


def test_posterior_without_a_prediction_is_an_error():
    grid = np.linspace(13.7, 15.2, 301)
    post, _ = _store_posterior(np.ones((1, grid.size)), grid)
    with pytest.raises(Exception, match="predict them with this bundle first"):
        post.cdf(np.array([[14.123, 0.05, 2.0]]), np.array([14.0]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gaussian_catalogue):
    from clustermass.training import train_model

    cfg = load_config("tiny")
    cat = gaussian_catalogue(40, 3)
    out = tmp_path_factory.mktemp("set") / "set"
    bundle = train_model(cat, "set", cfg.window, cfg.kde, cfg.training, seed=0, out_dir=out, progress=False)
    return cat, bundle, out, cfg


def test_train_model_set_writes_a_loadable_bundle(trained):
    from clustermass.bundle import load_model
    from clustermass.inference import posterior_table

    cat, bundle, out, _ = trained
    assert (out / "weights.safetensors").is_file() and (out / "model.json").is_file()
    loaded = load_model(out)
    assert loaded.kind == "set" and loaded.meta["integrity"] == bundle.meta["integrity"]
    rows = cat.rows()
    a = posterior_table(bundle, cat, rows)
    b = posterior_table(loaded, cat, rows)
    cols = ["d_pred", "log_m_median", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2", "log_m_map"]
    pd.testing.assert_frame_equal(a[cols], b[cols])  # the round trip gives identical posteriors
    ok = ~a[["few_galaxies", "degenerate", "outside_window"]].any(axis=1).to_numpy()
    assert ok.sum() == len(rows) - 1  # the empty diagram gets no posterior
    assert a.loc[~ok, "log_m_median"].isna().all()
    assert np.isfinite(a.loc[ok, cols].to_numpy()).all()
    assert (a.loc[ok, "log_m_lo2"] < a.loc[ok, "log_m_median"]).all()
    assert np.allclose(a.loc[ok, "d_pred"], a.loc[ok, "log_m_median"])  # point estimate = posterior median
    mf = posterior_table(loaded, cat, rows, prior="mass-function")
    assert (mf["prior"] == "mass-function").all()
    assert (mf.loc[ok, "log_m_median"] < a.loc[ok, "log_m_median"]).all()


def test_set_bundle_refuses_edits_and_stays_guarded(trained):
    import json

    from clustermass.bundle import load_model
    from clustermass.errors import BundleError, OutputExistsError
    from clustermass.training import train_model

    cat, _, out, cfg = trained
    meta = json.loads((out / "model.json").read_text())
    meta["architecture"]["arch"]["max_gal"] = 7
    bad = out.parent / "edited"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(meta))
    (bad / "weights.safetensors").write_bytes((out / "weights.safetensors").read_bytes())
    with pytest.raises(BundleError, match="edited"):
        load_model(bad)
    with pytest.raises(OutputExistsError):
        train_model(cat, "set", cfg.window, cfg.kde, cfg.training.model_copy(update={"lr": 5e-4}), seed=0,
                    out_dir=out, progress=False)


def test_evaluate_and_validate_take_the_set_model(trained, tmp_path, evrard_catalogue):
    from clustermass.evaluation import evaluate
    from clustermass.pipeline import calibrate_stage

    _, bundle, _, cfg = trained
    cat = evrard_catalogue(60, 50, seed=2, halos=False)
    calibrate_stage(bundle, cat, cfg.calibration, split="test", progress=False)
    v = (bundle.path / "validation.json")
    assert v.is_file()
    m = evaluate({"set": bundle}, cat, tmp_path, primary="set", baselines=False, progress=False, figures=False)
    entry = m["models"]["set"] if "models" in m else m
    for key in ("coverage_68", "coverage_95", "width_68", "eps_raw_std", "eps_std", "tarp_max_deviation"):
        assert key in entry and np.isfinite(entry[key]), key


def test_infer_catalogue_with_a_set_bundle(trained, tmp_path):
    """``clustermass infer --model <set bundle> --data DIR --plots`` runs unchanged (batched)."""
    from clustermass.catalog import write_catalogue
    from clustermass.inference import infer_catalogue

    cat, _, out, _ = trained
    small = cat.subset(np.r_[0:7, len(cat.clusters) - 1])  # 7 diagrams + the empty one
    data = write_catalogue(small, tmp_path / "cat")
    with pytest.warns(UserWarning, match="few_galaxies"):
        path = infer_catalogue(out, data, tmp_path / "post", plots=True, progress=False, batch_size=3)
    table = pd.read_parquet(path)
    assert len(table) == 8 and table["log_m_median"].notna().sum() == 7
    assert len(list((tmp_path / "post" / "figures").glob("posterior_*.png"))) == 7


def test_symmetrised_posterior_is_invariant_under_the_square_symmetries(trained):
    """With ``symmetrise`` (default) the posterior averages the 8 symmetries of the square window,
    so rotating every diagram by 90 degrees or reflecting it changes no posterior."""
    from clustermass.catalog import Catalogue
    from clustermass.inference import posterior_table

    cat, bundle, _, _ = trained
    views = setnpe.square_symmetries(torch.tensor([[[0.3, -0.8, 0.1]]]))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    rows = cat.rows()[:6]
    ref = posterior_table(bundle, cat, rows)
    cols = ["log_m_median", "log_m_lo1", "log_m_hi1", "log_m_lo2", "log_m_hi2"]
    for fx, fy in ((lambda g: -g.y_proj, lambda g: g.x_proj), (lambda g: g.x_proj, lambda g: -g.y_proj)):
        g = cat.galaxies.copy()
        g["x_proj"], g["y_proj"] = fx(cat.galaxies), fy(cat.galaxies)
        moved = posterior_table(bundle, Catalogue(cat.clusters, g, cat.halos, cat.meta), rows)
        assert np.allclose(moved[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_cli_train_calibrate_evaluate_set(tmp_path, gaussian_catalogue):
    """``clustermass train --model set``, ``calibrate`` (a validation for the set model) and
    ``evaluate`` from the command line (~30 s: three processes)."""
    import json
    import subprocess
    import sys

    from clustermass.catalog import Catalogue, write_catalogue

    cat = gaussian_catalogue(60, 5)
    clusters = cat.clusters.copy()
    clusters["split"] = np.array(["train", "test", "eval"])[np.arange(len(clusters)) % 3]
    data = write_catalogue(Catalogue(clusters, cat.galaxies, cat.halos, cat.meta), tmp_path / "cat")

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "clustermass.cli", *args, "--preset", "tiny", "-q"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    model = tmp_path / "models" / "set"
    cli("train", "--data", str(data), "--model", "set", "--out", str(model))
    assert json.loads((model / "model.json").read_text())["kind"] == "set"
    assert "needs no calibration" in cli("calibrate", "--model", str(model), "--data", str(data))
    cli("evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "ev"), "--no-baselines")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "set" in metrics["models"] and 0 <= metrics["models"]["set"]["coverage_68"] <= 1
