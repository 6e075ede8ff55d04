"""Training with Lightning, early stopping, resume and safe model bundles (tiny, CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clustermass.config import KDEConfig, TrainingConfig, WindowConfig
from clustermass.errors import BundleError, ClustermassError

WINDOW = WindowConfig()
KDE = KDEConfig(n_grid=16, bandwidth=0.5)  # wide kernels: learnable on a coarse grid


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cat(learnable_catalogue):
    """60 train + 10 test halos, 2 sight lines each (tests/conftest.py)."""
    return learnable_catalogue()


def _cfg(**kw):
    base = dict(lr=1e-3, max_epochs=3, patience=3, batch_size=20)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(cat, tmp_path_factory):
    from clustermass.training import train_model

    out = tmp_path_factory.mktemp("bundle")
    bundle = train_model(cat, "cnn3d", WINDOW, KDE, _cfg(lr=3e-3, max_epochs=5), seed=0, out_dir=out,
                         progress=False)
    return bundle, out


# ---------------------------------------------------------------- tests
def test_halo_split_never_splits_a_halo(cat):
    from clustermass.training import halo_split

    rows = cat.rows("train")
    tr, va = halo_split(cat, rows, 0.2, seed=3)
    h = cat.clusters["halo_id"].to_numpy()
    assert set(h[tr]).isdisjoint(h[va])
    assert len(set(h[va])) == 12  # round(0.2 * 60) halos, both sight lines each
    assert sorted(np.concatenate([tr, va])) == sorted(rows)
    tr2, va2 = halo_split(cat, rows, 0.2, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, halo_split(cat, rows, 0.2, seed=4)[1])


def test_tiny_training_lowers_loss_and_writes_bundle(trained, cat):
    from clustermass.training import halo_split

    bundle, out = trained
    tr = bundle.meta["training"]
    hist = tr["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    # much better than predicting the mean mass of the validation halos
    _, va = halo_split(cat, cat.rows("train"), 0.1, seed=0)
    assert tr["best_val_loss"] < 0.5 * np.var(cat.clusters["log_m200c"].to_numpy()[va])
    assert tr["best_val_loss"] < hist[0]["val_loss"]
    assert tr["n_train"] + tr["n_val"] == len(cat.rows("train"))
    assert tr["data_hash"] == cat.data_hash() and tr["seed"] == 0 and tr["precision"] == "32-true"
    for f in ("weights.safetensors", "model.json", "loss_curve.png", "checkpoints/last.ckpt"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocessing"]["kde"]["input_scale"] == 1000.0
    assert meta["architecture"]["n_grid"] == 16 and meta["kind"] == "cnn3d"
    assert abs(meta["preprocessing"]["target"]["mean"] - cat.clusters["log_m200c"].mean()) < 0.3
    assert "torch" in meta["versions"] and "clustermass" in meta["versions"]


def test_bundle_round_trip_gives_identical_predictions(trained, cat, tmp_path):
    from clustermass import load_model

    bundle, out = trained
    rows = cat.rows("test")
    p0 = bundle.predict(cat, rows=rows)
    assert p0.shape == (len(rows),)
    assert np.isfinite(p0).all(), p0
    loaded = load_model(out)
    np.testing.assert_array_equal(loaded.predict(cat, rows=rows), p0)
    np.testing.assert_allclose(loaded.predict(cat, rows=rows, batch_size=7), p0, rtol=0, atol=1e-5)
    bundle.save(tmp_path / "copy")
    np.testing.assert_array_equal(load_model(tmp_path / "copy").predict(cat, rows=rows), p0)


def test_early_stopping_restores_best_epoch(cat, tmp_path):
    from clustermass.training import halo_split, train_model

    # a too-large learning rate makes the validation loss rise after epoch 2 (seeded, CPU)
    b = train_model(cat, "cnn3d", WINDOW, KDE, _cfg(lr=0.03, max_epochs=8, patience=1), seed=0,
                    out_dir=tmp_path, progress=False)
    tr = b.meta["training"]
    vals = [r["val_loss"] for r in tr["history"]]
    assert tr["stopped_early"] and tr["epochs_run"] < 8
    assert tr["best_epoch"] == int(np.argmin(vals)) + 1 < tr["epochs_run"]
    _, va = halo_split(cat, cat.rows("train"), 0.1, seed=0)
    mse = float(np.mean((b.predict(cat, rows=va) - cat.clusters["log_m200c"].to_numpy()[va]) ** 2))
    assert mse == pytest.approx(tr["best_val_loss"], rel=1e-4)
    assert mse != pytest.approx(vals[-1], rel=1e-3)


def test_interrupted_run_resumes_like_an_uninterrupted_run(cat, tmp_path, monkeypatch):
    import clustermass.training as T

    full = T.train_model(cat, "cnn2d", WINDOW, KDE, _cfg(max_epochs=3), seed=1, out_dir=tmp_path / "a",
                         progress=False)

    def crash_in_epoch_3(self):
        if self.current_epoch == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(T.Regressor, "on_train_epoch_start", crash_in_epoch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train_model(cat, "cnn2d", WINDOW, KDE, _cfg(max_epochs=3), seed=1, out_dir=tmp_path / "b",
                      progress=False)
    monkeypatch.undo()
    assert (tmp_path / "b/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "b/weights.safetensors").exists()
    assert [r["epoch"] for r in T.read_history(tmp_path / "b/checkpoints/logs")] == [1, 2]  # Lightning's CSV

    # the same call again resumes automatically from checkpoints/last.ckpt (after epoch 2)
    more = T.train_model(cat, "cnn2d", WINDOW, KDE, _cfg(max_epochs=3), seed=1, out_dir=tmp_path / "b",
                         progress=False)
    h_full, h_more = full.meta["training"]["history"], more.meta["training"]["history"]
    assert [r["epoch"] for r in h_more] == [1, 2, 3]
    for a, b in zip(h_full, h_more, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    for (k, a), (_, b) in zip(full.network.state_dict().items(), more.network.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)

    # a finished run continues only when asked, e.g. with more epochs
    longer = T.train_model(cat, "cnn2d", WINDOW, KDE, _cfg(max_epochs=4), seed=1, out_dir=tmp_path / "b",
                           progress=False, resume=True)
    assert [r["epoch"] for r in longer.meta["training"]["history"]] == [1, 2, 3, 4]
    assert longer.meta["training"]["history"][:3] == h_more
    # checkpoints of other data or settings are never resumed
    with pytest.raises(ClustermassError, match="cannot resume"):
        T.train_model(cat, "cnn2d", WINDOW, KDE, _cfg(max_epochs=3, lr=5e-4), seed=1, out_dir=tmp_path / "b",
                      progress=False, resume=True)


def test_tampered_or_mismatched_bundle_is_refused(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from clustermass._bundlefmt import sha256_file as _sha256
    from clustermass.bundle import integrity_hash, load_model

    def reseal(meta):  # a consistent model.json, to reach the checks behind the integrity hash
        meta["integrity"] = integrity_hash(meta)
        return json.dumps(meta)

    bundle, _ = trained
    d = bundle.save(tmp_path / "b")
    w, m = d / "weights.safetensors", d / "model.json"
    good_w, good_m = w.read_bytes(), m.read_text()

    raw = bytearray(good_w)
    raw[-5] ^= 0xFF  # flip bits inside a tensor
    w.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="checksum"):
        load_model(d)

    w.write_bytes(good_w[:100])  # truncated file with a matching checksum
    meta = json.loads(good_m)
    meta["weights"]["sha256"] = _sha256(w)
    m.write_text(reseal(meta))
    with pytest.raises(BundleError, match="cannot read"):
        load_model(d)

    w.write_bytes(good_w)
    meta = json.loads(good_m)
    meta["architecture"]["arch"]["filters"] = [6, 8, 4]  # config no longer matches the weights
    m.write_text(reseal(meta))
    with pytest.raises(BundleError, match="shape mismatch"):
        load_model(d)

    state = load_file(str(w))
    state.pop("head.0.bias")
    save_file(state, str(w))
    meta = json.loads(good_m)
    meta["weights"]["sha256"] = _sha256(w)
    m.write_text(reseal(meta))
    with pytest.raises(BundleError, match="missing"):
        load_model(d)

    m.write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        load_model(d)
    with pytest.raises(BundleError, match="not found"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("edit", ["n_grid", "r_max", "v_max", "bandwidth", "input_scale", "target"])
def test_edited_preprocessing_is_refused(trained, tmp_path, edit):
    """The preprocessing a network was trained with is part of what the checksum protects."""
    from clustermass.bundle import load_model

    bundle, _ = trained
    d = bundle.save(tmp_path / "b")
    assert load_model(d).kde.n_grid == bundle.kde.n_grid
    meta = json.loads((d / "model.json").read_text())
    pre = meta["preprocessing"]
    if edit == "n_grid":
        pre["kde"]["n_grid"] -= 1
        meta["architecture"]["n_grid"] -= 1
    elif edit in ("r_max", "v_max"):
        pre["window"][edit] *= 1.5
    elif edit == "target":
        pre["target"]["mean"] += 0.1
    else:
        pre["kde"][edit] *= 2
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="edited after training"):
        load_model(d)


def test_old_bundle_without_integrity_is_refused(trained, tmp_path):
    from clustermass.bundle import load_model

    bundle, _ = trained
    d = bundle.save(tmp_path / "b")
    meta = json.loads((d / "model.json").read_text())
    meta.pop("integrity")
    meta["format_version"] = 1
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="older clustermass"):
        load_model(d)


def test_calibration_is_stored_with_the_bundle(trained, cat, tmp_path):
    from clustermass.bundle import load_model

    bundle, _ = trained
    d = bundle.save(tmp_path / "cal")
    b = load_model(d)
    assert b.calibration is None
    rows = cat.rows("test")
    pred = b.predict(cat, rows=rows)
    truth = cat.clusters["log_m200c"].to_numpy()[rows]
    b.set_calibration(pred, truth, bandwidth=0.2)
    b2 = load_model(d)
    assert b2.meta["calibration"]["bandwidth"] == 0.2 and b2.meta["calibration"]["n_pairs"] == len(rows)
    np.testing.assert_array_equal(b2.calibration["d_pred"].to_numpy(), pred)
    np.testing.assert_array_equal(b2.calibration["log_m_true"].to_numpy(), truth)
    with pytest.raises(ClustermassError):
        b2.set_calibration(pred, truth[:-1], bandwidth=0.2)
    try:
        import clustermass.posterior  # noqa: F401
    except ImportError:
        return
    assert b2.posterior() is not None


def test_augmented_training_rebuilds_grids_with_workers(cat, tmp_path):
    from clustermass.training import EpochBatchSampler, train_model

    class Rec:
        epoch = -1

        def set_epoch(self, e):
            self.epoch = e

    rec = Rec()
    s = EpochBatchSampler(10, 4, seed=0, dataset=rec)
    s.set_epoch(3)
    e3 = list(s)
    assert rec.epoch == 3 and [len(b) for b in e3] == [4, 4, 2]
    assert sorted(i for b in e3 for i in b) == list(range(10))
    assert list(s) == e3  # the order depends only on (seed, epoch)
    s.set_epoch(4)
    assert list(s) != e3

    b = train_model(cat, "cnn3d", WINDOW, KDE, _cfg(max_epochs=2, augment="rotate", num_workers=1), seed=0,
                    out_dir=tmp_path, progress=False)
    tr = b.meta["training"]
    assert tr["epochs_run"] == 2 and tr["inputs_cached"] is False and tr["augment"] == "rotate"
    assert np.isfinite([r["val_loss"] for r in tr["history"]]).all()


def test_square_symmetries_of_cached_cubes_equal_the_kde_of_transformed_galaxies(cat):
    """d4 augmentation flips/swaps cached cubes; that must be the cube of the transformed galaxies."""
    import torch

    from clustermass.datasets import apply_square_symmetries
    from clustermass.phasespace import diagram_grid

    pts = cat.points(0)
    cube = torch.as_tensor(diagram_grid(pts, "cnn3d", WINDOW, KDE))[None, None]
    transforms = {1: lambda p: p * [-1, 1, 1], 2: lambda p: p * [1, -1, 1], 4: lambda p: p[:, [1, 0, 2]],
                  7: lambda p: (p * [-1, -1, 1])[:, [1, 0, 2]]}
    for code, f in transforms.items():
        got = apply_square_symmetries(cube, [code])[0, 0].numpy()
        want = diagram_grid(f(pts), "cnn3d", WINDOW, KDE)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * want.max())  # KDE accuracy: 1e-5
    assert torch.equal(apply_square_symmetries(cube, [0]), cube)


def test_d4_training_uses_cached_cubes(cat, tmp_path):
    from clustermass.training import train_model

    b = train_model(cat, "cnn3d", WINDOW, KDE, _cfg(max_epochs=2, augment="d4"), seed=0, out_dir=tmp_path,
                    progress=False)
    tr = b.meta["training"]
    assert tr["inputs_cached"] is True and tr["augment"] == "d4" and tr["epochs_run"] == 2


def test_progress_bar_and_history_from_lightnings_csv_logger(cat, tmp_path, capsys):
    from clustermass.training import HISTORY_KEYS, read_history, train_model

    b = train_model(cat, "cnn1d", WINDOW, KDE, _cfg(max_epochs=2), seed=0, out_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "train cnn1d" in err and "2/2" in err and "val=" in err and "best=" in err  # one bar of epochs
    hist = b.meta["training"]["history"]
    assert read_history(tmp_path / "checkpoints" / "logs") == hist
    assert [list(r) for r in hist] == [list(HISTORY_KEYS)] * 2 and [r["epoch"] for r in hist] == [1, 2]
    assert all(r["train_s"] > 0 and r["train_cpu_s"] > 0 and r["val_s"] >= 0 for r in hist)


def test_read_history_keeps_the_attempt_that_made_the_weights(tmp_path):
    """A resumed attempt (CSVLogger version_1, from epoch 2 on) replaces epochs >= 2 of version_0."""
    from clustermass.training import read_history

    for version, text in ((0, "epoch,step,train_loss,val_loss\n0,4,,0.5\n0,4,0.6,\n1,9,,0.4\n1,9,0.45,\n2,14,,0.3\n"),
                          (1, "epoch,step,train_loss,val_loss,train_s\n1,9,,0.41,\n1,9,0.46,,1.5\n")):
        (tmp_path / f"version_{version}").mkdir()
        (tmp_path / f"version_{version}" / "metrics.csv").write_text(text)
    hist = read_history(tmp_path)
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in hist] == [(1, 0.6, 0.5), (2, 0.46, 0.41)]
    assert hist[1]["train_s"] == 1.5 and np.isnan(hist[0]["train_s"])
    assert read_history(tmp_path / "none") == []
