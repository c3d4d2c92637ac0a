"""Tests for the split-conformal intervals: coverage, storage, fitting, evaluate and predict."""

from __future__ import annotations

import json
import math
import pathlib
import types

import numpy as np
import pandas as pd
import pytest

from boneage_tpu import UsageError
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir, schema
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.evaluate import report
from boneage_tpu.inference import intervals
from boneage_tpu.inference import runner as inference
from boneage_tpu.train import calibrate
from tests.model_dirs import BATCH, make_run


def _noisy(rng: np.random.Generator, n: int, sigma: np.ndarray | float):
    predicted = rng.uniform(0.0, 228.0, n)
    return predicted + rng.normal(0.0, 1.0, n) * sigma, predicted


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95])
def test_coverage_on_fresh_data_is_the_level_for_known_noise(level) -> None:
    """Residuals N(0, 8): scores from 2,000 images cover 20,000 new ones at the level."""
    rng = np.random.default_rng(0)
    true, predicted = _noisy(rng, 2000, 8.0)
    scores = intervals.scores(true, predicted, None, "absolute")
    new_true, new_predicted = _noisy(rng, 20000, 8.0)
    found = intervals.coverage_metrics(
        new_true, intervals.bounds(new_predicted, None, scores, level, "absolute")
    )
    assert found["coverage"] == pytest.approx(level, abs=0.02)
    # The half-width approaches the normal quantile of the noise.
    z = {0.5: 0.674, 0.8: 1.282, 0.9: 1.645, 0.95: 1.960}[level]
    assert found["mean_width_months"] / 2 == pytest.approx(8.0 * z, rel=0.08)


def test_spread_scaled_intervals_follow_the_noise_where_absolute_ones_do_not() -> None:
    """Noise std = the spread: scaled intervals cover both halves; absolute ones miss the wide."""
    rng = np.random.default_rng(1)
    spread = rng.uniform(2.0, 20.0, 3000)
    true, predicted = _noisy(rng, 3000, spread)
    new_spread = rng.uniform(2.0, 20.0, 20000)
    new_true, new_predicted = _noisy(rng, 20000, new_spread)
    wide = new_spread > 11.0
    found = {}
    for scale in intervals.SCALES:
        scores = intervals.scores(true, predicted, spread, scale)
        bounds = intervals.bounds(new_predicted, new_spread, scores, 0.9, scale)
        inside = (bounds.low <= new_true) & (new_true <= bounds.high)
        found[scale] = (inside.mean(), inside[wide].mean(), bounds.width.mean())
    assert found["absolute"][0] == pytest.approx(0.9, abs=0.02)
    assert found["spread"][0] == pytest.approx(0.9, abs=0.02)
    assert found["absolute"][1] < 0.86 < 0.88 < found["spread"][1]
    assert found["spread"][2] < found["absolute"][2]


def test_quantile_is_the_conformal_rank_and_infinite_when_too_few() -> None:
    scores = [float(v) for v in range(1, 10)]  # n = 9
    assert intervals.quantile(scores, 0.9) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert intervals.quantile(scores, 0.5) == 5.0
    assert math.isinf(intervals.quantile(scores[:5], 0.9))  # rank 6 of 5
    with pytest.raises(intervals.IntervalError, match=r"in \(0, 1\)"):
        intervals.quantile(scores, 1.0)


def test_spread_scale_needs_a_spread_and_floors_tiny_ones() -> None:
    with pytest.raises(intervals.IntervalError, match="--head bins"):
        intervals.scores(np.ones(3), np.zeros(3), None, "spread")
    bounds = intervals.bounds(np.zeros(2), np.array([0.0, 2.0]), [1.0, 1.0, 1.0], 0.5, "spread")
    np.testing.assert_allclose(bounds.width, [2 * intervals.MIN_SPREAD_MONTHS, 4.0])


def test_unlabelled_rows_are_left_out_of_scores_and_coverage() -> None:
    true = np.array([10.0, schema.NO_LABEL, 30.0])
    assert list(intervals.scores(true, np.array([12.0, 0.0, 29.0]), None, "absolute")) == [1, 2]
    bounds = intervals.bounds(np.array([10.0, 0.0, 40.0]), None, [5.0] * 9, 0.5, "absolute")
    assert intervals.coverage_metrics(true, bounds)["coverage"] == 0.5


def test_held_out_check_covers_at_the_level_on_the_other_half() -> None:
    rng = np.random.default_rng(2)
    true, predicted = _noisy(rng, 4000, 6.0)
    check = intervals.held_out_check(true, predicted, None, 0.9, "absolute")
    assert check["coverage"] == pytest.approx(0.9, abs=0.02)
    assert check["n_fit"] == check["n_checked"] == 2000


def test_interval_scores_round_trip_through_derived_json_and_bad_ones_fail(tmp_path) -> None:
    scores = {
        "none": {"absolute": [0.5, 1.0, 2.0], "spread": [0.1, 0.2]},
        "flip": {"absolute": [1.0]},
    }
    model_dir.save_derived(
        str(tmp_path), config_lib.Derived(label_std=40.0, interval_scores=scores)
    )
    loaded = model_dir.load_derived(str(tmp_path))
    assert loaded.interval_scores == scores
    assert loaded.intervals("none", "spread") == [0.1, 0.2]
    assert loaded.intervals("rotflip", "absolute") is None
    old = model_dir.derived_from_dict({"label_std": 40.0})
    assert old.interval_scores == {}
    for bad, words in (
        ({"none": {"absolute": [2.0, 1.0]}}, "ascending"),
        ({"none": {"absolute": [-1.0]}}, ">= 0"),
        ({"none": {"width": [1.0]}}, "unknown scale"),
        ({"sideways": {"absolute": [1.0]}}, "expected only"),
        ({"none": {"absolute": ["x"]}}, "finite numbers"),
        ({"none": {}}, "non-empty"),
        ([1.0], "expected an object"),
    ):
        with pytest.raises(model_dir.ModelDirError, match=words):
            model_dir.derived_from_dict({"label_std": 40.0, "interval_scores": bad})


def _session(tmp_path, **flags):
    config = config_lib.TrainConfig.from_flags(data="d", model_dir=str(tmp_path), **flags)
    return types.SimpleNamespace(
        config=config,
        derived=config_lib.Derived(label_std=40.0, val_split="val"),
        model=None,
        strategy=None,
        chief=True,
    )


def test_fit_stores_each_modes_scores_around_its_corrected_predictions(tmp_path, monkeypatch):
    """One flip pass: each mode's scores are |true - its line's prediction|, spread scaled too."""
    rng = np.random.default_rng(3)
    true = np.linspace(10.0, 220.0, 60)
    views = np.stack([0.8 * true + 20.0 + rng.normal(0, 3, 60), 0.8 * true + 24.0])
    view_spreads = np.stack([np.full(60, 4.0), np.full(60, 6.0)])
    fake = inference.SplitPredictions(
        ids=[str(i) for i in range(60)],
        male=np.zeros(60),
        boneage=true,
        predicted=views.mean(axis=0),
        spread=view_spreads.mean(axis=0),
        views=views,
        view_spreads=view_spreads,
    )
    monkeypatch.setattr(inference, "predict_split", lambda *a, **k: fake)
    monkeypatch.setattr(calibrate.schema, "read_manifest", lambda path: {})
    session = _session(
        tmp_path, fit_bias_correction=True, fit_intervals=True, bias_correction_tta="flip"
    )
    result = calibrate.fit(session, log=lambda line: None)
    saved = model_dir.load_derived(str(tmp_path))
    assert set(saved.interval_scores) == {"none", "flip"}
    for mode, predicted, spread in (("none", views[0], 4.0), ("flip", fake.predicted, 5.0)):
        slope, intercept = saved.correction(mode)
        residual = np.abs(true - (slope * predicted + intercept))
        np.testing.assert_allclose(saved.intervals(mode, "absolute"), np.sort(residual), atol=1e-4)
        np.testing.assert_allclose(
            saved.intervals(mode, "spread"), np.sort(residual / (spread * slope)), atol=1e-4
        )
    check = result["interval_check"]["none"]["absolute"]
    assert check["level"] == calibrate.CHECK_LEVEL and 0.0 <= check["coverage"] <= 1.0


def test_fit_without_a_spread_stores_absolute_scores_only(tmp_path, monkeypatch):
    true = np.linspace(10.0, 220.0, 20)
    fake = inference.SplitPredictions(
        ids=[str(i) for i in range(20)],
        male=np.zeros(20),
        boneage=true,
        predicted=true + 2.0,
        views=(true + 2.0)[None],
    )
    monkeypatch.setattr(inference, "predict_split", lambda *a, **k: fake)
    monkeypatch.setattr(calibrate.schema, "read_manifest", lambda path: {})
    calibrate.fit(_session(tmp_path, fit_intervals=True, bias_correction_tta="none"), print)
    saved = model_dir.load_derived(str(tmp_path))
    assert saved.interval_scores == {"none": {"absolute": [2.0] * 20}}
    assert saved.correction("none") is None  # no --fit_bias_correction: no line


@pytest.fixture(scope="module")
def toy(toy_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("intervals")
    data_dir = toy_dataset(splits={"train": 24, "val": 11})
    manifest = schema.read_manifest(data_dir)
    scores = {"none": {"absolute": [float(v) for v in range(1, 41)]}}
    return {
        "data": data_dir,
        "manifest": manifest,
        "fitted": make_run(root / "fitted", manifest, interval_scores=scores),
        "bare": make_run(root / "bare", manifest),
    }


def test_evaluate_interval_writes_bounds_and_reports_their_coverage(toy, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = evaluate.run(
        model_dir=toy["fitted"], data=toy["data"], batch_size=BATCH, output=str(out),
        interval=0.9, gallery_size=2,
    )  # fmt: skip
    df = pd.read_csv(out / report.PREDICTIONS_NAME, dtype={"id": str})
    half = intervals.quantile([float(v) for v in range(1, 41)], 0.9)  # 37th of 40
    np.testing.assert_allclose(df["low_months"], df["predicted"] - half)
    np.testing.assert_allclose(df["high_months"], df["predicted"] + half)
    inside = (df["low_months"] <= df["boneage"]) & (df["boneage"] <= df["high_months"])
    written = json.loads((out / report.METRICS_NAME).read_text())["interval"]
    assert written == metrics["interval"]
    assert written["coverage"] == pytest.approx(inside.mean())
    assert written["mean_width_months"] == pytest.approx(2 * half)
    assert written["n_calibration"] == 40 and written["level"] == 0.9
    assert written["in_sample"] is False  # make_run's config names another data folder
    assert "90% intervals (absolute): mean width" in capsys.readouterr().out


def test_heatmap_titles_show_the_interval_on_its_own_line() -> None:
    from boneage_tpu.inference import heatmap

    title = heatmap.title_text("x", 100.0, 7.3, (88.04, 111.96, 0.9))
    assert title.splitlines() == [
        "x",
        "predicted 100.0 ± 7.3 months (8.3 y)",
        "90% interval 88.0–112.0 months",
    ]


def test_evaluate_interval_refuses_runs_without_scores_and_ensembles(toy, tmp_path):
    common = {"data": toy["data"], "batch_size": BATCH, "no_gallery": True, "interval": 0.9}
    with pytest.raises(intervals.IntervalError, match="no absolute interval scores for --tta none"):
        evaluate.run(model_dir=toy["bare"], output=str(tmp_path / "bare"), **common)
    with pytest.raises(intervals.IntervalError, match="it has --tta none: absolute"):
        evaluate.run(model_dir=toy["fitted"], tta="flip", output=str(tmp_path / "f"), **common)
    corrected = make_run(
        tmp_path / "corrected", toy["manifest"], bias_slope=1.1, bias_intercept=-3.0,
        interval_scores={"none": {"absolute": [1.0, 2.0, 3.0]}},
    )  # fmt: skip
    with pytest.raises(UsageError, match="drop --correction none"):
        evaluate.run(model_dir=corrected, correction="none", output=str(tmp_path / "c"), **common)
    with pytest.raises(UsageError, match="single --model_dir"):
        evaluate.run(model_dirs=[toy["fitted"], toy["bare"]], output=str(tmp_path / "e"), **common)


def test_predict_interval_adds_low_and_high_to_rows_and_table(toy, tmp_path):
    from boneage_tpu.predict import inputs as predict_io
    from boneage_tpu.predict import job as predict

    png = _toy_png(tmp_path)
    config = predict.PredictConfig(
        model_dir=toy["fitted"], paths=(png,), sex="F", interval=0.9, force=True
    )
    rows = predict.run(config)
    half = intervals.quantile([float(v) for v in range(1, 41)], 0.9)
    assert rows[0]["low_months"] == pytest.approx(rows[0]["predicted"] - half)
    assert rows[0]["high_months"] == pytest.approx(rows[0]["predicted"] + half)
    table = predict_io.format_rows(rows, as_csv=False)
    assert "interval (months)" in table.splitlines()[0]
    text = predict_io.format_rows(rows, as_csv=True)
    assert text.splitlines()[0] == "id,path,male,predicted_months,low_months,high_months"
    bare = predict.PredictConfig(
        model_dir=toy["bare"], paths=(png,), sex="F", interval=0.9, force=True
    )
    with pytest.raises(intervals.IntervalError, match="train it with --fit_intervals"):
        predict.run(bare)


def _toy_png(tmp_path: pathlib.Path) -> str:
    from PIL import Image

    rng = np.random.default_rng(4)
    path = tmp_path / "hand.png"
    Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8)).save(path)
    return str(path)
