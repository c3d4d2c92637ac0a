"""Tests of the real-data recipe's mechanics: input normalisation, bins head, TTA views, bias
correction, the time budget and the recipe flagfiles."""

from __future__ import annotations

import dataclasses
import pathlib
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from boneage_tpu import UsageError, cli
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir
from boneage_tpu.evaluate import corrections
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.inference import runner as inference
from boneage_tpu.modeling import backbones, heads
from boneage_tpu.modeling import model as model_lib
from boneage_tpu.train import calibrate
from boneage_tpu.train import job as train
from tests import helpers
from tests.helpers import train_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _images(seed: int, batch: int = 3, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(30, 200, (batch, size, size, 1)).astype(np.float32)


def test_zscore_normalisation_ignores_the_export_window() -> None:
    layer = backbones.NormalizeIntensity("zscore")
    x = _images(0)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    reexported = (x - mean) * 0.5 + mean + 17.0  # contrast x0.5 about the mean, then brighter
    out, out2 = np.asarray(layer(x)), np.asarray(layer(reexported))
    np.testing.assert_allclose(out, out2, atol=1e-3)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 127.5, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 42.5, rtol=1e-4)


def test_zscore_of_a_blank_image_is_finite_and_blank() -> None:
    out = np.asarray(backbones.NormalizeIntensity("zscore")(np.full((1, 8, 8, 1), 255.0)))
    np.testing.assert_allclose(out, 127.5)


def test_percentile_normalisation_maps_the_1st_to_99th_percentile_to_0_255() -> None:
    x = np.arange(10000, dtype=np.float32).reshape(1, 100, 100, 1) / 100.0 + 40.0  # 40..140
    out = np.asarray(backbones.NormalizeIntensity("percentile")(x)).ravel()
    low, high = np.sort(x.ravel())[[int(0.01 * 9999), int(0.99 * 9999)]]
    assert out.min() == 0.0 and out.max() == 255.0
    np.testing.assert_allclose(
        out[np.argmin(np.abs(x.ravel() - (low + high) / 2))], 127.5, atol=0.2
    )
    # A linear re-window gives the same result.
    again = np.asarray(backbones.NormalizeIntensity("percentile")(x * 0.4 + 20.0)).ravel()
    np.testing.assert_allclose(out, again, atol=1e-3)


def test_normalisation_runs_under_xla() -> None:
    for mode in ("zscore", "percentile"):
        layer = backbones.NormalizeIntensity(mode)
        eager = np.asarray(layer(_images(1)))
        compiled = tf.function(lambda x, layer=layer: layer(x), jit_compile=True)
        np.testing.assert_allclose(np.asarray(compiled(_images(1))), eager, atol=1e-3)


def test_bins_head_prediction_is_the_expectation_and_spread_its_std() -> None:
    num_bins = 8
    layer = heads.BinsToMonths(num_bins, label_mean=120.0, label_std=40.0)
    spread_layer = heads.BinsToMonths(num_bins, 120.0, 40.0, spread=True)
    logits = np.random.default_rng(0).normal(size=(4, num_bins)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    centres = np.linspace(-heads.Z_RANGE, heads.Z_RANGE, num_bins)
    mean_z = (p * centres).sum(axis=1)
    std_z = np.sqrt((p * (centres - mean_z[:, None]) ** 2).sum(axis=1))
    np.testing.assert_allclose(np.asarray(layer(logits)), mean_z * 40.0 + 120.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(spread_layer(logits)), std_z * 40.0, rtol=1e-4)


def test_soft_targets_are_distributions_peaked_at_the_true_age() -> None:
    z = tf.constant([-1.0, 0.0, 2.5])
    targets = np.asarray(heads.soft_targets(z, 64))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
    centres = np.linspace(-heads.Z_RANGE, heads.Z_RANGE, 64)
    np.testing.assert_allclose(centres[targets.argmax(axis=1)], [-1.0, 0.0, 2.5], atol=0.06)
    # The loss is smallest when the logits match the target.
    good = heads.bins_loss(tf.math.log(targets + 1e-9), z)
    bad = heads.bins_loss(tf.zeros_like(targets), z)
    assert np.all(np.asarray(good) < np.asarray(bad))


def test_bins_model_exposes_logits_and_spread() -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny",
            image_size=32,
            dense_units=(8,),
            head="bins",
            num_bins=16,
            label_mean=100.0,
            label_std=30.0,
        )
    )
    inputs = {"image": tf.constant(_images(2, 2, 32)), "male": tf.constant([0.0, 1.0])}
    months, logits = heads.with_logits(model)(inputs)
    np.testing.assert_allclose(months, model(inputs), rtol=1e-6)
    assert logits.shape == (2, 16)
    _, spread = heads.with_spread(model)(inputs)
    assert np.all(np.asarray(spread) > 0)
    regression = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, dense_units=(8,))
    )
    assert heads.with_logits(regression) is None and heads.with_spread(regression) is None


def test_rotflip_views_and_the_constant_model() -> None:
    views = inference.tta_views("rotflip")
    assert len(views) == 10 and {a for a, _ in views} == {-10.0, -5.0, 0.0, 5.0, 10.0}
    images = tf.constant(_images(3, 2, 16))
    # The unrotated views are exact: the identity and the mirror.
    np.testing.assert_array_equal(inference.view_images(images, 0.0, False), images)
    np.testing.assert_array_equal(inference.view_images(images, 0.0, True), images[:, :, ::-1])
    # A model blind to the image: every view gives the same answer, so TTA changes nothing.
    image = keras.Input((16, 16, 1), name="image")
    male = keras.Input((), name="male")
    out = keras.layers.Lambda(lambda t: 100.0 + 10.0 * t[1] + 0.0 * keras.ops.mean(t[0]))(
        [image, male]
    )
    blind = keras.Model({"image": image, "male": male}, out)
    months, spread = inference.tta_predict_fn(blind, "rotflip")(images, tf.constant([0.0, 1.0]))
    np.testing.assert_allclose(months, [100.0, 110.0], rtol=1e-6)
    np.testing.assert_array_equal(spread, [0.0, 0.0])


def test_rotated_views_rotate_about_the_centre_and_compile() -> None:
    size = 33
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = 200.0 * np.exp(-(xx**2 + yy**2) / (2 * 5.0**2)).astype(np.float32)[None, :, :, None]
    for angle in (-10.0, 5.0):
        rotated = np.asarray(inference.view_images(tf.constant(disc), angle, False))
        # A smooth blob at the centre is invariant to a rotation about the centre.
        assert np.abs(rotated - disc).max() < 2.0  # 1 % of the peak: bilinear resampling
    # An off-centre dot at (+10, 0) from the centre moves to (10 cos a, -10 sin a): positive
    # angles turn counter-clockwise on screen (rows point down).
    dot = np.zeros((1, size, size, 1), np.float32)
    dot[0, 16, 26, 0] = 100.0
    rotated = np.asarray(inference.view_images(tf.constant(dot), 10.0, False))[0, :, :, 0]
    cy, cx = (np.array(np.nonzero(rotated)) * rotated[np.nonzero(rotated)]).sum(1) / rotated.sum()
    np.testing.assert_allclose(
        [cx - 16, cy - 16], [10 * np.cos(np.radians(10)), -10 * np.sin(np.radians(10))], atol=0.3
    )
    compiled = tf.function(lambda x: inference.view_images(x, 10.0, True), jit_compile=True)
    np.testing.assert_allclose(
        compiled(tf.constant(disc)), inference.view_images(tf.constant(disc), 10.0, True), atol=1e-3
    )


def test_bias_correction_recovers_a_synthetic_linear_distortion() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(10, 220, 500)
    predicted = 0.8 * true + 25.0 + rng.normal(0, 0.5, 500)  # regression to the mean
    slope, intercept = heads.fit_linear_correction(true, predicted)
    np.testing.assert_allclose([slope, intercept], [1.25, -31.25], rtol=0.02, atol=0.5)
    assert heads.fit_linear_correction(true[:5], predicted[:5]) == (1.0, 0.0)
    # A model that has not learned (predictions unrelated to the labels) is left alone.
    assert heads.fit_linear_correction(true, rng.uniform(100, 101, 500)) == (1.0, 0.0)
    layer = heads.LinearCorrection(slope, intercept)
    corrected = np.asarray(layer(predicted.astype(np.float32)))
    assert np.mean(np.abs(corrected - true)) < 0.2 * np.mean(np.abs(predicted - true))


def test_correction_metrics_report_with_and_without() -> None:
    result = inference.SplitPredictions(
        ids=["a", "b"],
        male=np.zeros(2),
        boneage=np.array([100.0, 50.0]),
        predicted=np.array([110.0, 60.0]),
        views=np.array([[110.0, 60.0]]),
    )
    # Uncorrected: (110 - 10) / 2 = 50 and (60 - 10) / 2 = 25 -> errors 50 and 25.
    raw = corrections.uncorrected(result, (2.0, 10.0))
    np.testing.assert_array_equal(raw.predicted, [50.0, 25.0])
    np.testing.assert_array_equal(raw.views, [[50.0, 25.0]])
    np.testing.assert_array_equal(
        corrections.corrected(raw, (2.0, 10.0)).predicted, result.predicted
    )
    values = corrections.correction_metrics(result, raw, [(2.0, 10.0)])
    assert values["mae_corrected_months"] == 10.0
    assert values["mae_uncorrected_months"] == 37.5
    assert values["bias_correction"] == {"slope": 2.0, "intercept": 10.0}
    none = corrections.correction_metrics(raw, raw, [None])
    assert none["bias_correction"] is None and none["mae_corrected_months"] is None
    assert none["mae_uncorrected_months"] == 37.5


def _config(data_dir: str, model_dir: pathlib.Path, **overrides) -> config_lib.TrainConfig:
    """The trainer tests' toy config, 4 steps in loops of 2."""
    values = {"train_steps": 4, "steps_per_loop": 2, "checkpoint_every": 2, **overrides}
    return train_config(data_dir, model_dir, **values)


@pytest.mark.slow
def test_run_with_bins_head_fits_and_exports_the_bias_correction(
    toy_data, tmp_path, monkeypatch
) -> None:
    # 4 toy steps learn too little for a sane line: the fit itself is tested above; here
    # fixed lines check where they go (derived.json, the exports, evaluate's MAEs per mode).
    fitted = []
    lines = [(1.1, -3.0), (1.2, -5.0)]  # plain, then the flip means

    def fake_fit(true, predicted):
        fitted.append((len(true), np.asarray(predicted).copy()))
        return lines[len(fitted) - 1]

    monkeypatch.setattr(heads, "fit_linear_correction", fake_fit)
    config = _config(
        toy_data,
        tmp_path / "run",
        head="bins",
        num_bins=16,
        input_norm="zscore",
        fit_bias_correction=True,
    )
    result = train.run(config)
    # Every val record of the session's toy data, none of the padding; once per mode.
    assert [n for n, _ in fitted] == [10, 10]
    assert not np.allclose(fitted[0][1], fitted[1][1])  # the flip means are not the plain
    saved = model_dir.load_derived(config.model_dir)
    assert (saved.bias_slope, saved.bias_intercept) == (1.1, -3.0)
    assert saved.tta_corrections == {"flip": (1.2, -5.0)}
    assert (result["bias_slope"], result["bias_intercept"]) == (1.1, -3.0)
    assert result["tta_corrections"] == {"flip": [1.2, -5.0]}
    exported = keras.models.load_model(result["exports"]["keras"])
    assert exported.get_layer("corrected").slope == saved.bias_slope
    metrics = evaluate.run(model_dir=config.model_dir, data=toy_data, split="val")
    assert metrics["bias_correction"] == {"slope": 1.1, "intercept": -3.0}
    np.testing.assert_allclose(
        metrics["mae_corrected_months"], result["val_mae_corrected_months"], rtol=1e-4
    )
    # Fitted on this very split: the headline is the uncorrected MAE.
    assert metrics["in_sample"] and metrics["headline"] == "uncorrected"
    assert metrics["mae_months"] == pytest.approx(metrics["mae_uncorrected_months"], rel=1e-9)
    lines_csv = (pathlib.Path(metrics["output"]) / "predictions.csv").read_text().splitlines()
    assert lines_csv[0].endswith(",spread_months") and len(lines_csv) == 11
    flip = evaluate.run(model_dir=config.model_dir, data=toy_data, split="val", tta="flip")
    assert flip["bias_correction"] == {"slope": 1.2, "intercept": -5.0}
    np.testing.assert_allclose(
        flip["mae_corrected_months"], result["val_mae_flip_corrected_months"], rtol=1e-4
    )


def test_bias_fit_gives_each_tta_mode_the_line_of_its_own_views(tmp_path, monkeypatch) -> None:
    """One rotflip pass: plain, flip and rotflip each get the line of their views' mean."""
    views = inference.tta_views("rotflip")
    true = np.linspace(10.0, 220.0, 50)
    # Each view is biased its own way: mirrored +3 months, rotated +0.1 per degree of angle.
    per_view = np.stack([0.8 * true + 25.0 + 3.0 * f + 0.1 * abs(a) for a, f in views])
    fake = inference.SplitPredictions(
        ids=[str(i) for i in range(50)],
        male=np.zeros(50),
        boneage=true,
        predicted=per_view.mean(axis=0),
        views=per_view,
    )
    asked = []
    monkeypatch.setattr(inference, "predict_split", lambda *a, **k: asked.append(k["tta"]) or fake)
    monkeypatch.setattr(calibrate.schema, "read_manifest", lambda path: {})
    config = config_lib.TrainConfig.from_flags(
        data="d", model_dir=str(tmp_path), fit_bias_correction=True, bias_correction_tta="rotflip"
    )
    session = types.SimpleNamespace(
        config=config,
        derived=config_lib.Derived(label_std=40.0, val_split="val"),
        model=None,
        strategy=None,
        chief=True,
    )
    result = calibrate.fit(session)
    assert asked == ["rotflip"]  # one pass over the widest mode's views
    saved = model_dir.load_derived(str(tmp_path))
    # true = 1.25 * (0.8 true + c) - 1.25 c for each mode's mean offset c.
    for mode, offset in (("none", 25.0), ("flip", 26.5), ("rotflip", 27.1)):
        np.testing.assert_allclose(saved.correction(mode), (1.25, -1.25 * offset), rtol=1e-9)
    assert set(saved.tta_corrections) == {"flip", "rotflip"}
    assert result["val_mae_rotflip_corrected_months"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_time_budget_stops_the_run_at_a_loop_end_then_validates_and_exports(
    toy_data, tmp_path, capsys
) -> None:
    # A budget of ~0 minutes: the first loop (2 steps) already exceeds it.
    config = _config(toy_data, tmp_path / "budget", train_steps=1000, max_train_minutes=1e-6)
    result = train.run(config)
    assert result["step"] == 2 and result["val_count"] == 10
    assert "time budget: stopping at step 2 of 1000" in capsys.readouterr().out
    assert (tmp_path / "budget" / "export" / "model.keras").exists()


def test_schedule_end_follows_the_measured_rate() -> None:
    from boneage_tpu.modeling import optim

    end = optim.ScheduleEnd(10_000)
    session = type("S", (), {})()
    session.config = config_lib.TrainConfig.from_flags(train_steps=10_000, max_train_minutes=60.0)
    session.schedule_end = end
    # 1,000 steps in the 10 minutes since the mark at (100 steps, 2 min): 100 steps/min,
    # 48 minutes left -> 4,800 more steps.
    train._fit_schedule_to_budget(session, 1100, 12.0, (100, 2.0))
    assert int(end.steps.numpy()) == 1100 + 4800
    # Never beyond train_steps.
    train._fit_schedule_to_budget(session, 9000, 12.0, (100, 2.0))
    assert int(end.steps.numpy()) == 10_000
    schedule = optim.WarmupSchedule(1.0, 0, 10_000, end=end)
    end.steps.assign(200)
    assert float(schedule(200)) == pytest.approx(0.0, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("name", ["rsna_cpu.flags", "rsna_gpu.flags", "rsna_tpu.flags"])
def test_recipe_flagfiles_name_only_real_flags_and_build_a_config(name: str) -> None:
    flag_values = flags.FlagValues()
    cli.define_flags(config_lib.TrainConfig, flag_values)
    flag_values(["train", f"--flagfile={REPO / 'configs' / name}", "--data=D", "--model_dir=M"])
    config = cli.config_from_flags(config_lib.TrainConfig, flag_values)
    assert config.data.path == "D" and config.model.head in config_lib.HEADS
    # Flags after the flagfile override it.
    flag_values(["train", f"--flagfile={REPO / 'configs' / name}", "--image_size=64"])
    assert cli.config_from_flags(config_lib.TrainConfig, flag_values).data.image_size == 64
    assert dataclasses.asdict(config)  # every value is a plain type


@pytest.mark.slow
def test_cpu_recipe_small_scale_learns_the_phantom(tmp_path) -> None:
    """The CPU recipe as written (flagfile), shrunk to minutes: phantom data, 96 px, 500 steps."""
    from boneage_tpu.quickstart import job as quickstart

    qs = quickstart.QuickstartConfig(
        output=str(tmp_path / "qs"),
        num_images=400,
        phantom_width=192,
        phantom_height=240,
        data_image_size=96,
        train_steps=1,
    )
    data_dir = quickstart.make_records(qs, quickstart.make_phantom(qs))
    flag_values = flags.FlagValues()
    cli.define_flags(config_lib.TrainConfig, flag_values)
    flag_values(
        [
            "train",
            f"--flagfile={REPO / 'configs' / 'rsna_cpu.flags'}",
            f"--data={data_dir}",
            f"--model_dir={tmp_path / 'model'}",
            "--image_size=96",
            "--train_steps=500",
            "--max_train_minutes=0",
            "--warmup_steps=50",
            "--eval_every=0",
            "--checkpoint_every=500",
        ]
    )
    config = cli.config_from_flags(config_lib.TrainConfig, flag_values)
    result = train.run(config)
    metrics = evaluate.run(model_dir=config.model_dir, data=data_dir, split="val", tta="flip")
    assert metrics["bias_correction"] is not None
    # A constant output lands near 1.0.
    assert metrics["mae_months"] < 0.6 * metrics["mean_predictor_mae_months"], metrics
    assert result["step"] == 500


def test_folds_are_disjoint_stratified_and_deterministic() -> None:
    from boneage_tpu.convert import plan
    from boneage_tpu.core import schema
    from boneage_tpu.data import layouts
    from boneage_tpu.data.layouts import ConvertError

    rows = [
        layouts.Row(i, f"{i:04d}", float(i * 7 % 240), bool(i % 2), f"{i}.png") for i in range(301)
    ]
    folds = plan.assign_splits(rows, val_fraction=0.1, seed=3, split_name="", num_folds=5)
    assert list(folds) == [f"fold{k}" for k in range(5)]
    ids = [{r.image_id for r in members} for members in folds.values()]
    assert sum(len(s) for s in ids) == 301 and len(set().union(*ids)) == 301  # disjoint, all
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    for stratum in range(schema.NUM_STRATA):
        per_fold = [sum(r.stratum == stratum for r in members) for members in folds.values()]
        assert max(per_fold) - min(per_fold) <= 1, (stratum, per_fold)
    again = plan.assign_splits(
        list(reversed(rows)), val_fraction=0.1, seed=3, split_name="", num_folds=5
    )
    assert again == folds
    with pytest.raises(ConvertError, match="--num_folds must be >= 2"):
        plan.assign_splits(rows, val_fraction=0.1, seed=3, split_name="", num_folds=1)
    with pytest.raises(ConvertError, match="exclude each other"):
        plan.assign_splits(rows, val_fraction=0.1, seed=3, split_name="test", num_folds=3)


def test_split_unions_pool_counts_shards_and_label_stats() -> None:
    from boneage_tpu.core import schema

    a = {
        "count": 2,
        "labeled": 2,
        "shards": [{"name": "a"}],
        "counts_by_stratum": [1, 1],
        "label_stats": {"count": 2, "mean_months": 10.0, "std_months": 0.0},
    }
    b = {
        "count": 2,
        "labeled": 2,
        "shards": [{"name": "b"}],
        "counts_by_stratum": [0, 2],
        "label_stats": {"count": 2, "mean_months": 20.0, "std_months": 0.0},
    }
    merged = schema.split_info({"splits": {"fold0": a, "fold1": b}}, "fold0+fold1")
    assert merged["count"] == 4 and [s["name"] for s in merged["shards"]] == ["a", "b"]
    assert merged["counts_by_stratum"] == [1, 3]
    assert merged["label_stats"]["mean_months"] == 15.0
    assert merged["label_stats"]["std_months"] == pytest.approx(5.0)
    with pytest.raises(schema.ManifestError, match="'fold7' not in the data"):
        schema.split_info({"splits": {"fold0": a}}, "fold0+fold7")


@pytest.mark.slow
def test_fold_training_uses_the_other_folds_and_their_stats(tmp_path) -> None:
    from PIL import Image

    from boneage_tpu.convert import job as make_tfrecords

    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["id,boneage,male"]
    for i in range(30):
        image = (np.add.outer(np.arange(40), np.arange(32)) * 2 + 5 * i) % 200 + 20
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i},{(i * 37) % 229 + 3},{i % 2 == 0}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    data_dir = str(tmp_path / "folds")
    manifest = make_tfrecords.convert(
        str(tmp_path / "labels.csv"),
        str(folder),
        data_dir,
        image_size=32,
        encoding="png",
        num_folds=3,
        num_workers=0,
        quiet=True,
    )
    assert sorted(manifest["splits"]) == ["fold0", "fold1", "fold2"]
    config = _config(data_dir, tmp_path / "fold1", fold=1, train_steps=2)
    result = train.run(config)
    saved = model_dir.load_derived(config.model_dir)
    assert (saved.train_split, saved.val_split) == ("fold0+fold2", "fold1")
    assert model_dir.load_config(config.model_dir).data.train_split == "train"  # the flag's
    ages = [(i * 37) % 229 + 3 for i in range(30)]
    fold1 = {r["id"].decode() for r in _read_ids(data_dir, manifest, "fold1")}
    train_ages = [a for i, a in enumerate(ages) if str(i) not in fold1]
    assert saved.label_mean == pytest.approx(np.mean(train_ages))
    assert result["val_count"] == manifest["splits"]["fold1"]["count"]
    with pytest.raises(UsageError, match="--fold 3: the data has folds 0..2"):
        train.run(_config(data_dir, tmp_path / "fold3", fold=3))


def _read_ids(data_dir: str, manifest: dict, split: str) -> list[dict]:
    from boneage_tpu.core import schema

    files = schema.shard_paths(data_dir, manifest, split)
    return [
        {k: v.numpy() for k, v in r.items()}
        for r in tf.data.TFRecordDataset(files).map(schema.parse_examples)
    ]


def test_batch_norm_recalibration_replaces_stale_moving_statistics(toy_data, tmp_path) -> None:
    from boneage_tpu.train import setup

    config = _config(toy_data, tmp_path / "bn", train_steps=2, augment=False)
    session = setup.prepare(config, None, None, lambda message: None)
    bn = next(
        layer
        for layer in session.model.get_layer("tiny").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    bn.moving_mean.assign(np.full(bn.moving_mean.shape, 50.0, np.float32))  # stale
    session.trainer.recalibrate_batch_norm(session.train_iterator, 60)
    # 0.9^60 of the stale value is left: the mean is back at the scale of the batches' own.
    assert np.abs(bn.moving_mean.numpy()).max() < 1.0
    assert int(session.step.numpy()) == 0  # no training step was taken
